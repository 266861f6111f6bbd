"""The engine-facing half of the DeepSpeed integration: what runs after ``deepspeed.initialize``.

``attach_engine(engine)`` (on every rank) tells every clustered layer of the engine's model about
the engine's optimizer steps (applied or skipped), lets regroups rewrite parameters and optimizer
state through DeepSpeed's fp32 partitions (:class:`DeepSpeedParamIO`), guards
``engine.load_checkpoint`` against a change of ep_size, and unlinks DeepSpeed's CPU all-reduce
shared memory. :class:`DataParallelSync` keeps ep_size-1 replicas in step.

DeepSpeed itself is imported inside the functions only: the user-facing layer
(``deepspeed_layer.py``) uses this module without DeepSpeed installed.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from ..core.layer import ClusteredMoE, clustered_layers
from ..core.state_io import TorchParamIO
from ..parallel.comm import all_gather_probe_rows, comm_device

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class DeepSpeedParamIO(TorchParamIO):
    """Regroup writes that go through ZeRO-1/2 (and the bf16 optimizer's) fp32 master partitions.

    Writing only ``p.data`` would be undone at the next step, when DeepSpeed copies its masters
    back; the ``safe_*`` helpers address the partitions (they all-reduce over the data-parallel
    group, so every rank must regroup at the same step: they do, the clustering is deterministic).
    """

    # Under ZeRO a parameter outside this rank's partition has ``_hp_mapping = None`` but the
    # safe_* helpers still join the all-reduce: dispatch on the attribute's presence, never on
    # its value, or the ranks' collectives go out of step.
    def __init__(self, optimizer=None):
        super().__init__(None)
        self.ds_optimizer = optimizer   # the engine's ZeRO / bf16 optimizer (attach_engine)

    def _relink(self) -> None:
        """DeepSpeed links each parameter's view of the optimizer state once, after the first
        ``step()`` of its FIRST parameter group: groups stepped after it (the expert group of an
        MoE model) get empty views for good, and ``safe_get/set_full_optimizer_state`` cannot
        reach their moments. Linking again once state exists fixes the views (narrow() only)."""
        opt = self.ds_optimizer
        if opt is not None and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def read(self, p):
        from deepspeed.utils import safe_get_full_fp32_param
        if not hasattr(p, "_hp_mapping"):
            return p.detach()
        return safe_get_full_fp32_param(p).to(p.device)

    def _has_state(self, p, key) -> bool:
        """Whether this rank's part of ``p`` has optimizer state ``key`` (True for a parameter
        outside this rank's partition)."""
        mapping = p._hp_mapping
        if mapping is not None and not (mapping.optim_fragment and key in mapping.optim_fragment):
            self._relink()
        return mapping is None or (mapping.optim_fragment is not None and key in mapping.optim_fragment)

    def read_state(self, p, key):
        """The full optimizer state, or None on every rank if any rank has none yet (agreed over
        the whole world: the rule applied to it may fetch rows across the expert-parallel group,
        so every rank must take the same branch)."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_optimizer_state
        flag = torch.tensor([1.0 if self._has_state(p, key) else 0.0])
        if dist.is_initialized():
            flag = flag.to(comm_device(None, p.device))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0.0:
            return None
        return safe_get_full_optimizer_state(p, key)

    def write(self, p, value, rule):
        from deepspeed.utils import safe_set_full_fp32_param
        p.data.copy_(value.to(p.dtype))
        if not hasattr(p, "_hp_mapping"):
            return
        safe_set_full_fp32_param(p, value.float().to(p.device))
        self._write_states(p, rule)

    def _write_states(self, p, rule) -> None:
        """Adam's moments of ``p`` rewritten by ``rule`` (state_io's rules), through the fp32 partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state
        if rule is None:
            return
        for key in _ADAM_KEYS:
            old = self.read_state(p, key)
            if old is not None:
                safe_set_full_optimizer_state(p, rule(key, old.float()).to(old.device), key)

    def release(self, p):
        # ZeRO owns flat buffers over these parameters; they simply stop receiving gradients.
        # Their storage is kept until the memory work (offload) frees it.
        pass


class DataParallelSync:
    """Keeps replicas of a layer in step: centroids are averaged over the data-parallel group
    before clustering and rank 0's regroup decision is broadcast (all ranks call at the same step)."""

    def __init__(self, group=None):
        self.group = group

    def _active(self) -> bool:
        import torch.distributed as dist
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def average_(self, tensor: torch.Tensor) -> None:
        if self._active():
            import torch.distributed as dist
            work = tensor.to(comm_device(self.group, tensor.device))
            dist.all_reduce(work, group=self.group)
            tensor.copy_(work / dist.get_world_size(self.group))

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._active():
            import torch.distributed as dist
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            work = tensor.to(comm_device(self.group, tensor.device))
            dist.broadcast(work, src=src, group=self.group)
            return work.to(tensor.device)
        return tensor

    def gather_rows(self, rows: Optional[torch.Tensor], limit: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Every replica's probe tokens, in rank order, on every replica (``probe_rows_block``)."""
        return all_gather_probe_rows(rows, limit, like, self.group)[0] if self._active() else rows


def _uses_deepspeed_partitions(module: nn.Module) -> bool:
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in module.parameters())


def deepspeed_param_io(module: nn.Module, optimizer=None) -> DeepSpeedParamIO:
    """The ParamIO for a layer whose parameters DeepSpeed partitions: ZeRO-3's (``ds_id``) or
    ZeRO-1/2's and the bf16 optimizer's (``_hp_mapping``)."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        from .deepspeed_zero3 import Zero3ParamIO
        return Zero3ParamIO(optimizer)
    return DeepSpeedParamIO(optimizer)


def unlink_cpu_allreduce_shm() -> bool:
    """Keep DeepSpeed's CPU backend from leaking shared memory; returns whether this rank
    unlinked its segment. Collective when it acts (every rank decides alike).

    When all ranks share one machine, DeepSpeed's torch backend on the CPU gives each rank a
    POSIX shared-memory segment for its all-reduce (``/dev/shm/deepspeed_allreduce_buffer_<uid>_
    <addr>_<port>_<rank>``, 69 MB in 0.19) and never unlinks it. Every run then leaves them in
    /dev/shm, which is RAM, until a reboot (DeepSpeed PR #4115's discussion; a full /dev/shm later
    kills jobs with SIGBUS). Each rank has mapped every segment by the time its init returned, so
    after a barrier each rank unlinks its own name: the mappings stay valid, and the memory goes
    back when the last rank exits, however it exits."""
    import deepspeed.comm as ds_dist
    from deepspeed.comm import comm as ds_comm

    if not ds_dist.is_initialized() or getattr(ds_comm.cdb, "shm_comm_op", None) is None:
        return False
    world = ds_dist.get_world_size()
    if world != int(os.environ.get("LOCAL_SIZE", "0")):     # DeepSpeed's own test for creating them
        return False
    ds_dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{ds_dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        return False
    return True


def attach_engine(engine) -> int:
    """After ``deepspeed.initialize``, on every rank: tell every clustered layer when an optimizer
    step ends and whether the engine applied it, and let regroups move optimizer state.

    ``engine.step`` is wrapped (once): at each gradient-accumulation boundary every layer gets
    ``on_optimizer_step(applied=engine.was_step_applied())``. A step the engine skips (fp16
    loss-scale overflow; a non-finite gradient norm under ZeRO-1/2 or bf16) is then not counted by
    the layers either: their step counters, regroup schedule and activation centroids stay as if
    it had not run. ZeRO-1/2/3 and bf16 move optimizer state through DeepSpeed's fp32 partitions;
    ZeRO-0 in fp32 through the torch optimizer the engine wraps. Also unlinks DeepSpeed's CPU
    all-reduce shared memory so a CPU run leaves none behind (:func:`unlink_cpu_allreduce_shm`).
    Returns the number of layers attached.
    """
    _refuse_layers_the_engine_missed(engine.module)
    unlink_cpu_allreduce_shm()
    layers = clustered_layers(engine.module)
    engine.__dict__["_trilemma_layers"] = layers   # read by the wrappers (a second call refreshes it)
    wrap_once(engine, "step", _step_tells_layers)
    wrap_once(engine, "load_checkpoint", _load_checkpoint_guarded)
    wrap_once(engine, "save_checkpoint", _save_checkpoint_gathers)
    opt = getattr(engine, "optimizer", None)
    for layer in layers:
        if _uses_deepspeed_partitions(layer):
            layer.set_param_io(deepspeed_param_io(layer, opt))
        else:
            # the optimizer's state only: the steps come from engine.step (a torch step hook
            # as well would count each step twice)
            inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
            layer.set_param_io(TorchParamIO(inner if isinstance(inner, torch.optim.Optimizer) else None))
        layer.follow_optimizer_steps()   # the engine's steps, whatever our config's accumulation says
    return len(layers)


def _refuse_layers_the_engine_missed(model: nn.Module) -> None:
    """A shell built before DeepSpeed was imported (``models.OursFFN`` then builds it without
    DeepSpeed's ``MoE`` base) was not treated as an MoE layer by ``deepspeed.initialize``."""
    from deepspeed.moe.layer import MoE
    for name, m in model.named_modules():
        if isinstance(getattr(m, "moe", None), ClusteredMoE) and not isinstance(m, MoE):
            raise RuntimeError(f"{name or type(m).__name__}: this clustered layer is not a deepspeed.moe.layer.MoE, "
                               f"so deepspeed.initialize did not treat it as an MoE layer; it was built before "
                               f"DeepSpeed was imported: import deepspeed before building the model")


def wrap_once(obj, name: str, make: Callable) -> None:
    """Replace ``obj.<name>`` (an engine's or optimizer's method) by ``make(obj, original)``
    unless an earlier attach call already did."""
    method = getattr(obj, name)
    if getattr(method, "_trilemma_wrapped", False):
        return
    wrapped = functools.wraps(method)(make(obj, method))
    wrapped._trilemma_wrapped = True
    setattr(obj, name, wrapped)


def attached_layers(obj) -> List[ClusteredMoE]:
    """The layers the last attach call gave ``obj`` (its wrappers read them, so a second call
    refreshes the list without wrapping twice)."""
    return obj.__dict__.get("_trilemma_layers", [])


def _step_tells_layers(engine, step: Callable) -> Callable:
    """``engine.step`` that ends with ``on_optimizer_step(applied)`` on every layer when it took
    an optimizer step. Whether it does is known before the call: the engine's own test
    (``is_gradient_accumulation_boundary``; with ``managed_gradient_accumulation`` off every call
    is a boundary). After it, ``was_step_applied()`` is False when the engine skipped the update
    (its ``optimizer.overflow``: fp16 overflow, or ZeRO-1/2 / bf16 saw a non-finite norm)."""
    def wrapped(*args, **kwargs):
        managed = getattr(engine, "managed_gradient_accumulation", None)
        boundary = engine.is_gradient_accumulation_boundary() or (callable(managed) and not managed())
        out = step(*args, **kwargs)
        if boundary:
            applied = bool(engine.was_step_applied())
            for layer in attached_layers(engine):
                layer.on_optimizer_step(applied)
        return out
    return wrapped


def _load_checkpoint_guarded(engine, load: Callable) -> Callable:
    """``engine.load_checkpoint`` with optimizer state refuses a checkpoint saved at another
    ep_size with one clear error (DeepSpeed would fail on a missing per-rank file at ZeRO-0, and
    at ZeRO-1/2 load partitions of another layout without a word). The layers check it when
    the module state arrives, before DeepSpeed reads any optimizer file; module-only loads (at
    any ep_size: expert files are per global slot) are untouched."""
    signature = inspect.signature(load)

    def load_checkpoint(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        full = bool(bound.arguments.get("load_optimizer_states", True)) and \
            not bound.arguments.get("load_module_only", False)
        layers = attached_layers(engine)
        for layer in layers:
            layer.refuse_ep_size_change = full
        from .deepspeed_zero3 import apply_loaded, drop_stash, zero3_layers
        shells = zero3_layers(engine.module)
        try:
            out = load(*args, **kwargs)
            apply_loaded(shells, masters=not full)
            return out
        except RuntimeError as exc:
            if shells and "load_module_only=True" in str(exc):
                # the layer's advice does not hold at stage 3: DeepSpeed restores stage-3 weights
                # from partition files saved for one placement only
                raise RuntimeError(f"{str(exc).split(';')[0]}; under ZeRO stage 3 a checkpoint resumes only at the "
                                   f"world size and ep_size it was saved with (DeepSpeed keeps dense weights in "
                                   f"partition files for that placement only)") from exc
            raise
        finally:
            drop_stash(shells, "_zero3_loaded")
            for layer in layers:
                layer.refuse_ep_size_change = False
    return load_checkpoint


def _save_checkpoint_gathers(engine, save: Callable) -> Callable:
    """``engine.save_checkpoint`` that, under ZeRO-3, first gathers each of our layers' parameters
    on every rank so that the expert files hold whole experts (``deepspeed_zero3.stash_for_save``)."""
    def save_checkpoint(*args, **kwargs):
        from .deepspeed_zero3 import drop_stash, stash_for_save, zero3_layers
        shells = zero3_layers(engine.module)
        stash_for_save(shells)
        try:
            return save(*args, **kwargs)
        finally:
            drop_stash(shells, "_zero3_saved")
    return save_checkpoint
