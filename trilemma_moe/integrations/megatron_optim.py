"""Regroups under Megatron-core's optimizers: parameters rewritten together with their fp32
masters and Adam moments (``core/state_io.py`` has the rules), and the layers told where
optimizer steps end.

=====================================================  ==========================================
Megatron optimizer                                     what a regroup does
=====================================================  ==========================================
``FP32Optimizer`` (fp32 params, torch/Apex/TE Adam)    params and ``optimizer.state[param]``
``Float16OptimizerWithFloat16Params`` (bf16/fp16)      bf16 params, their fp32 ``main_param`` and
                                                       ``optimizer.state[main_param]``
``ChainedOptimizer`` of the above                      each parameter through the optimizer holding it
a plain ``torch.optim`` optimizer                      params and ``optimizer.state[param]``
``DistributedOptimizer`` (use_distributed_optimizer)   refused: its masters and moments are flat
                                                       shards over the data-parallel ranks
=====================================================  ==========================================
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.layer import ClusteredMoE, clustered_layers
from ..core.state_io import TorchParamIO
from .deepspeed_engine import attached_layers, wrap_once

DISTRIBUTED_OPTIMIZER_REFUSAL = (
    "Megatron's DistributedOptimizer (use_distributed_optimizer=True / --use-distributed-optimizer) keeps "
    "the fp32 masters and Adam moments as flat shards over the data-parallel ranks, which the trilemma_moe "
    "regroup cannot rewrite; it would silently undo the clustering at the next step. Train with "
    "use_distributed_optimizer=False (Megatron's Float16OptimizerWithFloat16Params / FP32Optimizer)")


def _inner_optimizers(optimizer) -> list:
    """The Megatron optimizers of ``optimizer`` (a ChainedOptimizer's members, or itself)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_distributed(opt) -> bool:
    return any(cls.__name__ == "DistributedOptimizer" for cls in type(opt).__mro__)


def masters_of(optimizer) -> dict[int, tuple[torch.optim.Optimizer, torch.Tensor]]:
    """id(model parameter) -> (torch optimizer holding its state, the tensor that state is keyed
    by: its fp32 master, or the parameter itself)."""
    out: dict[int, tuple[torch.optim.Optimizer, torch.Tensor]] = {}
    if optimizer is None:
        return out
    for opt in _inner_optimizers(optimizer):
        if _is_distributed(opt):
            raise RuntimeError(DISTRIBUTED_OPTIMIZER_REFUSAL)
        inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
        if inner is None:
            continue   # a stub optimizer (no parameters on this rank)
        if hasattr(opt, "float16_groups"):      # Float16OptimizerWithFloat16Params
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p, master in zip(model_group, main_group):
                    out[id(p)] = (inner, master)
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    out[id(p)] = (inner, p)
        else:                                    # FP32Optimizer or a torch optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    out[id(p)] = (inner, p)
    return out


class MegatronParamIO(TorchParamIO):
    """Regroup writes through a Megatron optimizer: the parameter, its fp32 master (when the
    optimizer keeps one) and the moments keyed by the master. Storage of the burn-in experts is
    kept after the first clustering (Megatron's DDP grad buffers are laid out over it)."""

    def __init__(self, optimizer=None):
        super().__init__(None)
        self.megatron_optimizer = optimizer
        self._masters = masters_of(optimizer)

    def _master(self, p: torch.Tensor) -> tuple[torch.optim.Optimizer | None, torch.Tensor]:
        if id(p) in self._masters:
            return self._masters[id(p)]
        if getattr(p, "main_param_sharded", False):
            raise RuntimeError(DISTRIBUTED_OPTIMIZER_REFUSAL)
        if getattr(p, "main_param", None) is not None:
            raise RuntimeError("this parameter has an fp32 master (Megatron's mixed-precision optimizer) that the "
                               "trilemma_moe layer was not given, so a regroup would be undone at the next step: "
                               "call trilemma_moe.integrations.megatron.attach_megatron_optimizer(model, optimizer) "
                               "after get_megatron_optimizer")
        return None, p

    def read(self, p: torch.Tensor) -> torch.Tensor:
        return self._master(p)[1].detach()

    def _states(self, p):
        opt, master = self._master(p)
        return {} if opt is None else opt.state.get(master, {})

    def write(self, p: torch.Tensor, value: torch.Tensor, rule) -> None:
        master = self._master(p)[1]
        if master is not p:
            master.data.copy_(value.to(master.dtype))
        super().write(p, value, rule)   # p.data and the moments of _states(p)

    def release(self, p: torch.Tensor) -> None:
        # The burn-in experts stop receiving gradients; their storage stays (DDP's buffers and
        # the optimizer's masters are laid out over it), so checkpoints always hold them.
        pass


def _layers_of(model) -> list[ClusteredMoE]:
    chunks: Iterable[nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    return [layer for chunk in chunks for layer in clustered_layers(chunk)]


def attach_megatron_optimizer(model, optimizer) -> int:
    """On every rank, after ``get_megatron_optimizer`` (or with any torch optimizer): regroups move
    parameters, fp32 masters and Adam moments through ``optimizer``, and the layers count the
    optimizer's steps (a step Megatron skips, fp16 overflow, is not counted). ``model`` is a module
    or Megatron's list of model chunks. Raises for Megatron's DistributedOptimizer. Returns the
    number of layers attached."""
    layers = _layers_of(model)
    io = MegatronParamIO(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        for layer in layers:
            layer.attach_optimizer(optimizer, io)   # its step hook tells the layer
        return len(layers)
    for layer in layers:
        layer.set_param_io(io)
        layer.follow_optimizer_steps()
    optimizer.__dict__["_trilemma_layers"] = layers   # read by the step wrapper (a second call refreshes it)
    wrap_once(optimizer, "step", _step_tells_layers)
    return len(layers)


def _step_tells_layers(optimizer, step):
    def wrapped(*args, **kwargs):
        out = step(*args, **kwargs)
        # Megatron's step returns (update_successful, grad_norm, num_zeros_in_grad)
        applied = bool(out[0]) if isinstance(out, tuple) else True
        for layer in attached_layers(optimizer):
            layer.on_optimizer_step(applied)
        return out
    return wrapped
