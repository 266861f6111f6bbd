"""Training-loop pieces for a Megatron-core model holding our layers, for loops that do not run
Megatron-LM's own (``launch/train_megatron.py``, the tests):

* :func:`reduce_gradients`: the reduction Megatron's ``DistributedDataParallel`` performs, for a
  model not wrapped in it (its gradient buffers live on CUDA, so on a CPU machine it cannot run):
  a parameter tagged ``allreduce = False`` (our experts) over the expert-data-parallel group, any
  other over the data-parallel group, both divided by the data-parallel size;
* :func:`save_checkpoint` / :func:`load_checkpoint`: ``megatron.core.dist_checkpointing`` of the
  model's ``sharded_state_dict`` and the optimizer's state: a Megatron optimizer's own
  ``sharded_state_dict``, or a plain torch optimizer's state mapped onto the model's sharded
  tensors (what Megatron's ``FP32Optimizer`` does), so the Adam moments of the experts reshard with
  them at another expert-parallel size. Without CUDA, Megatron's checkpoint writer gets its CPU
  stand-ins (``megatron_cpu.cpu_checkpoint_substitutes``).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)

from .megatron_cpu import cpu_checkpoint_substitutes


def reduce_gradients(model: torch.nn.Module) -> None:
    """Average gradients over data-parallel replicas as Megatron's DDP does (see the module doc)."""
    dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    edp = parallel_state.get_expert_data_parallel_group()
    size = dist.get_world_size(dp)
    for p in model.parameters():
        if p.grad is None:
            continue
        dist.all_reduce(p.grad, group=edp if not getattr(p, "allreduce", True) else dp)
        p.grad.div_(size)


def _is_megatron_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "sharded_state_dict") and not isinstance(optimizer, torch.optim.Optimizer)


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero state for parameters without any (Megatron's init_state_fn before a load); Adam's
    first step from it is the same as from no state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def torch_optimizer_sharded_state(model_sd, optimizer: torch.optim.Optimizer):
    """A torch Adam's state dict whose moments are ShardedTensors laid out like the model's
    parameters; per-parameter steps are kept as plain (common) values."""
    _init_adam_state(optimizer)
    sd = optimizer.state_dict()
    steps = {pid: float(s["step"]) for pid, s in sd["state"].items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optim_state_to_sharding_state(sd, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys=("step",))
    sd["steps"] = steps
    return sd


def _checkpoint_state(model, optimizer, is_loading: bool):
    model_sd = model.sharded_state_dict()
    if _is_megatron_optimizer(optimizer):
        return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}
    return {"model": model_sd, "optimizer": torch_optimizer_sharded_state(model_sd, optimizer)}


def save_checkpoint(model, optimizer, directory: str) -> None:
    """Collective: every rank writes its shards of ``model`` and ``optimizer`` into ``directory``."""
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)    # dist_checkpointing writes into an existing, empty folder
    dist.barrier()
    state = _checkpoint_state(model, optimizer, is_loading=False)
    with cpu_checkpoint_substitutes():
        dist_checkpointing.save(state, directory)


def load_checkpoint(model, optimizer, directory: str) -> None:
    """Collective: load ``directory`` (saved at any expert-parallel size dividing G) into
    ``model`` and ``optimizer``."""
    with cpu_checkpoint_substitutes():
        loaded = dist_checkpointing.load(_checkpoint_state(model, optimizer, is_loading=True), directory)
    model.load_state_dict(loaded["model"])
    state = loaded["optimizer"]
    if not _is_megatron_optimizer(optimizer):
        steps = state.pop("steps")
        for pid, st in state["state"].items():
            st["step"] = torch.tensor(steps[pid])
    optimizer.load_state_dict(state)
