"""DeepSpeed drop-in: ``TrilemmaMoE`` is a ``deepspeed.moe.layer.MoE`` (the engine finds MoE
layers with isinstance), so ``deepspeed.initialize`` builds expert-aware optimizer groups and
reduces our expert gradients over DeepSpeed's expert-data-parallel group.

A thin shell: the math lives in ``trilemma_moe.core.layer.ClusteredMoE``.
"""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..config import TrilemmaMoEConfig
from ..core.checkpoint import from_slot_keys, to_slot_keys
from ..core.experts import spec_from_module
from ..core.layer import ClusteredMoE
from ..core.state_io import TorchParamIO

try:
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
    HAVE_DEEPSPEED = True
except ImportError:  # the layer still works as a plain nn.Module
    _DeepSpeedMoE = nn.Module
    HAVE_DEEPSPEED = False

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _require_deepspeed(what: str) -> None:
    if not HAVE_DEEPSPEED:
        raise ImportError(f"{what} needs DeepSpeed: pip install 'trilemma_moe[deepspeed]'")


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

    def read_state(self, p, key):
        """The full optimizer state, or None on every rank if any rank has none yet (agreed over
        the whole world: the rule applied to it may fetch rows across the expert-parallel group,
        so every rank must take the same branch)."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_optimizer_state
        mapping = p._hp_mapping
        if mapping is not None and not (mapping.optim_fragment and key in mapping.optim_fragment):
            self._relink()
        have = mapping is None or (mapping.optim_fragment is not None and key in mapping.optim_fragment)
        flag = torch.tensor([1.0 if have else 0.0])
        if dist.is_initialized():
            flag = flag.to(_comm_device(None, p.device))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0.0:
            return None
        return safe_get_full_optimizer_state(p, key)

    def write(self, p, value, rule):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        p.data.copy_(value.to(p.dtype))
        if not hasattr(p, "_hp_mapping"):
            return
        safe_set_full_fp32_param(p, value.float().to(p.device))
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


def _comm_device(group, fallback: torch.device) -> torch.device:
    """NCCL moves only CUDA tensors; gloo takes CPU ones."""
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


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
            work = tensor.to(_comm_device(self.group, tensor.device))
            dist.all_reduce(work, group=self.group)
            tensor.copy_(work / dist.get_world_size(self.group))

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._active():
            import torch.distributed as dist
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            work = tensor.to(_comm_device(self.group, tensor.device))
            dist.broadcast(work, src=src, group=self.group)
            return work.to(tensor.device)
        return tensor


def _uses_deepspeed_partitions(module: nn.Module) -> bool:
    return any(hasattr(p, "_hp_mapping") for p in module.parameters())


class TrilemmaMoE(_DeepSpeedMoE):
    """Drop-in replacement for ``deepspeed.moe.layer.MoE``.

    Accepts MoE's constructor arguments plus ``config=TrilemmaMoEConfig(...)`` (or our knobs as
    keywords). ``num_experts`` and ``k`` set ``config.num_experts``/``config.top_k``.
    Routing is dropless: ``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``,
    ``drop_tokens`` and ``use_rts`` are accepted for signature compatibility and do not apply
    (``config.capacity_factor`` turns on token dropping). ``ep_size > 1`` places
    ``num_groups/ep_size`` groups on each rank of DeepSpeed's expert-parallel group (created
    here if needed: call ``deepspeed.init_distributed()`` first) or of ``topology``.

    ``forward(hidden_states, used_token=None) -> (output, l_aux, exp_counts)``; exp_counts has
    length ``num_experts`` and counts (token, expert) assignments of all k choices.
    """

    def __init__(self, hidden_size: int, expert: Optional[nn.Module] = None, num_experts: Optional[int] = None,
                 ep_size: int = 1, k: Optional[int] = None, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4, use_residual: bool = False,
                 noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True,
                 use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, *, config: Optional[TrilemmaMoEConfig] = None,
                 ffn_hidden_size: Optional[int] = None, activation: str = "gelu", gated: bool = False,
                 bias: bool = True, layer_index: int = 0, topology=None, **knobs: Any) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own experts and gate
        overrides = dict(knobs)
        if num_experts is not None:
            overrides["num_experts"] = num_experts
        if k is not None:
            overrides["top_k"] = k
        if ep_size != 1:
            if config is not None and config.ep_size not in (1, ep_size):
                raise ValueError(f"ep_size={ep_size} but config.ep_size={config.ep_size}: set one of them")
            overrides["ep_size"] = ep_size
        if config is None:
            config = TrilemmaMoEConfig.from_dict({}, **overrides)
        elif overrides:
            config = TrilemmaMoEConfig.from_dict(config.to_dict(), **overrides)
        ep_size = config.ep_size
        if use_residual:
            raise ValueError("use_residual=True (Residual MoE) is not supported by TrilemmaMoE")
        if noisy_gate_policy not in (None, "None"):
            raise ValueError(f"noisy_gate_policy={noisy_gate_policy!r} is not supported by TrilemmaMoE (use None)")
        if (capacity_factor, eval_capacity_factor, min_capacity) != (1.0, 1.0, 4):
            warnings.warn("TrilemmaMoE routes dropless: capacity_factor, eval_capacity_factor and min_capacity "
                          "have no effect (token dropping is our config's capacity_factor/min_capacity knobs)")
        if use_tutel or enable_expert_tensor_parallelism:
            raise ValueError("use_tutel and enable_expert_tensor_parallelism are not supported by TrilemmaMoE")
        if expert is not None:
            spec, _ = spec_from_module(expert, hidden_size)
        else:
            if ffn_hidden_size is None:
                raise ValueError("pass an expert FFN module or ffn_hidden_size")
            spec = None
        # Experts start distinct (seed, layer, expert index), not as deep copies of `expert`:
        # identical experts would make every similarity 1.
        comm = None
        if ep_size > 1:
            # Groups are placed on ranks at construction (each rank builds only its own), so the
            # expert-parallel groups must exist now: DeepSpeed's (made once, shared by layers) or passed in.
            from ..parallel import ExpertParallelComm, ExpertParallelTopology
            if topology is None:
                _require_deepspeed("ep_size > 1 without a topology")
                topology = ExpertParallelTopology.from_deepspeed(ep_size)
            comm = ExpertParallelComm(topology, config, layer_index,
                                      extra={"hidden_size": hidden_size, "spec": repr(spec)})
        self.moe = ClusteredMoE(hidden_size, ffn_hidden_size or spec.ffn_hidden_size, config,
                                activation=activation, gated=gated, bias=bias, layer_index=layer_index, spec=spec,
                                expert_parallel=comm)
        self.config = config
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = config.num_experts
        self.num_local_experts = config.num_experts // ep_size
        self.ep_group = None if comm is None else comm.topo.ep_group
        for p in self.moe.experts.parameters():
            # DeepSpeed's tags for expert parameters: reduced over the expert-data-parallel group.
            p.allreduce = False
            p.group_name = self.expert_group_name
        # Checkpoints by slot in DeepSpeed-MoE's key naming (core/checkpoint.py): one file per global
        # expert slot from engine.save_checkpoint, the same keys in a plain state_dict.
        if config.offload_idle_steps is not None:
            from .aio import make_tier
            self.moe.offload_tier = make_tier(config.offload_dir, config.aio)
        self._register_state_dict_hook(TrilemmaMoE._slot_keys_out)
        self.register_load_state_dict_pre_hook(TrilemmaMoE._slot_keys_in)

    @staticmethod
    def _slot_keys_out(module, state, prefix, local_metadata):
        ex = module.moe.experts
        if module.ep_size > 1 and module.ep_group is not None:
            # DeepSpeed names expert files by ep_rank * num_local_experts + local slot: that must be
            # the global slot, i.e. ranks hold contiguous groups in rank order.
            import torch.distributed as dist
            first = getattr(ex, "group_offset", 0) * ex.K
            expected = dist.get_rank(group=module.ep_group) * ex.num_experts
            if first != expected:
                raise RuntimeError(f"{prefix}: local slots start at global slot {first}, but DeepSpeed will name "
                                   f"them from {expected} (ep rank x local slots); checkpoint files would be "
                                   f"mislabelled")
        to_slot_keys(state, prefix, ex.num_experts, ex.K)

    @staticmethod
    def _slot_keys_in(module, state, prefix, *args):
        ex = module.moe.experts
        stacked = dict(ex.state_dict(keep_vars=True))
        from_slot_keys(state, prefix, ex.num_experts, ex.K, stacked)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine: create (once) and remember the expert process groups."""
        _require_deepspeed("set_deepspeed_parallelism")
        from deepspeed.utils import groups
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size,
                                                    use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)
        if self.moe.ep is not None:
            return  # the expert-parallel communicator already keeps every rank in agreement
        # With ep_size 1 every rank holds all experts: replicas over the expert-data-parallel group.
        self.moe.sync = DataParallelSync(groups._get_expert_data_parallel_group(self.expert_group_name))

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if not isinstance(self.moe.io, DeepSpeedParamIO) and _uses_deepspeed_partitions(self.moe):
            # Under ZeRO-1/2 or the bf16 optimizer, regroups must write through DeepSpeed.
            self.moe.set_param_io(DeepSpeedParamIO())
        return self.moe(hidden_states, used_token)

    # --- delegation -------------------------------------------------------------------------
    def recluster(self, force: bool = False) -> bool:
        return self.moe.recluster(force=force)

    def group_assignment(self) -> torch.Tensor:
        return self.moe.group_assignment()

    def stats(self) -> Dict[str, float]:
        return self.moe.stats()

    def attach_optimizer(self, optimizer) -> None:
        self.moe.attach_optimizer(optimizer)

    def expert_parameter_count(self) -> int:
        return self.moe.expert_parameter_count()

    def comm_stats(self) -> Dict[str, float]:
        return self.moe.comm_stats()

    def memory_report(self) -> Dict[str, int]:
        return self.moe.memory_report()

    def offload_stats(self) -> Dict[str, float]:
        return self.moe.offload_stats()


def ensure_process_group() -> None:
    """DeepSpeed's MoE needs its process groups; outside the launcher / ``deepspeed.initialize``
    start a world-1 group (gloo on CPU) so a single process runs."""
    import deepspeed
    import deepspeed.comm as ds_dist

    if ds_dist.is_initialized():
        return
    for key, val in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, val)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def clustered_layers(model: nn.Module) -> List[ClusteredMoE]:
    return [m for m in model.modules() if isinstance(m, ClusteredMoE)]


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
    """After ``deepspeed.initialize``, on every rank: let every clustered layer move optimizer
    state on regroups, and follow the engine's skipped steps.

    ZeRO-1/2 and bf16 go through DeepSpeed's fp32 partitions; ZeRO-0 in fp32 uses the torch
    optimizer the engine wraps. A step the engine skips (fp16 loss-scale overflow, or a
    non-finite gradient norm under ZeRO-1/2) is not counted by the layers either: their step
    counters, regroup schedule and activation centroids stay as if it had not run
    (``ClusteredMoE.skipped_steps_source``). Also unlinks DeepSpeed's CPU all-reduce shared memory
    so a CPU run leaves none behind (:func:`unlink_cpu_allreduce_shm`). Returns the number of
    layers attached.
    """
    unlink_cpu_allreduce_shm()
    layers = clustered_layers(engine.module)
    _guard_load_checkpoint(engine, layers)
    opt = getattr(engine, "optimizer", None)
    for layer in layers:
        layer.skipped_steps_source = lambda: engine.skipped_steps
        if _uses_deepspeed_partitions(layer):
            layer.set_param_io(DeepSpeedParamIO(opt))
        else:
            inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
            layer.attach_optimizer(inner if isinstance(inner, torch.optim.Optimizer) else None)
    return len(layers)


def _guard_load_checkpoint(engine, layers: List[ClusteredMoE]) -> None:
    """``engine.load_checkpoint`` with optimizer state refuses a checkpoint saved at another
    ep_size with one clear error (DeepSpeed would fail on a missing per-rank file at ZeRO-0, and
    at ZeRO-1/2 load partitions of another layout without a word). The layers check it when
    the module state arrives, before DeepSpeed reads any optimizer file; module-only loads (at
    any ep_size: expert files are per global slot) are untouched."""
    load = engine.load_checkpoint
    if getattr(load, "_trilemma_guarded", False):
        return
    signature = inspect.signature(load)

    @functools.wraps(load)
    def load_checkpoint(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        full = bool(bound.arguments.get("load_optimizer_states", True)) and \
            not bound.arguments.get("load_module_only", False)
        for layer in layers:
            layer.refuse_ep_size_change = full
        try:
            return load(*args, **kwargs)
        finally:
            for layer in layers:
                layer.refuse_ep_size_change = False

    load_checkpoint._trilemma_guarded = True
    engine.load_checkpoint = load_checkpoint


def moe_param_groups(model: nn.Module, weight_decay: float = 0.0, lr: Optional[float] = None) -> List[Dict]:
    """Optimizer parameter groups as DeepSpeed needs them for MoE: expert parameters (tagged
    ``allreduce=False``) in their own group per expert-parallel group name."""
    _require_deepspeed("moe_param_groups")
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    group: Dict[str, Any] = {"params": [p for p in model.parameters() if p.requires_grad],
                             "name": "parameters", "weight_decay": weight_decay}
    if lr is not None:
        group["lr"] = lr
    return split_params_into_different_moe_groups_for_optimizer(group)


def replace_moe_layers(model: nn.Module, config: TrilemmaMoEConfig) -> int:
    """Swap every ``deepspeed.moe.layer.MoE`` in ``model`` for a TrilemmaMoE; returns the count.

    The DeepSpeed layer's expert weights seed the first clustering. Untrained DeepSpeed layers hold
    identical deep copies of one expert; those are re-initialised from (seed, layer, expert) instead,
    with a warning, since identical experts cannot be clustered.
    """
    _require_deepspeed("replace_moe_layers")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, _DeepSpeedMoE) and not isinstance(m, TrilemmaMoE)]
    for index, (name, old) in enumerate(targets):
        if not name:
            raise ValueError("replace_moe_layers: pass the model that contains the MoE layer, not the layer itself")
        if old.num_experts != config.num_experts:
            raise ValueError(f"num_experts: layer {name!r} has {old.num_experts} experts, "
                             f"config.num_experts is {config.num_experts}")
        if old.ep_size != 1:
            raise ValueError(f"layer {name!r} has ep_size={old.ep_size}; only ep_size=1 layers can be replaced yet")
        ds_experts = list(old.deepspeed_moe.experts.deepspeed_experts)
        gate = old.deepspeed_moe.gate
        hidden = gate.wg.in_features
        new = TrilemmaMoE(hidden, expert=ds_experts[0], num_experts=old.num_experts, k=gate.k,
                          config=config, layer_index=index)
        weights = [spec_from_module(e, hidden)[1] for e in ds_experts]
        first = weights[0]
        identical = all(all(torch.equal(w[n], first[n]) for n in first) for w in weights[1:])
        if identical:
            warnings.warn(f"{name}: DeepSpeed experts are identical copies; initialising them from the seed instead")
        else:
            new.moe.experts.load_expert_weights(weights)
        ref = next(old.parameters())
        new.to(device=ref.device, dtype=ref.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(targets)
