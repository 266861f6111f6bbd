"""``DeepSpeedStyleMoE``: DeepSpeed-MoE's layer interface over :class:`~trilemma_moe.core.layer.ClusteredMoE`
(constructor arguments, ``forward -> (output, l_aux, exp_counts)``, DeepSpeed's expert-parameter
tags, per-slot checkpoint keys), importable without DeepSpeed. The user-facing
``TrilemmaMoE`` (``integrations/deepspeed.py``) adds ``deepspeed.moe.layer.MoE`` as a base class
so that ``deepspeed.initialize`` finds it. DeepSpeed is imported only where it is used
(``set_deepspeed_parallelism``, ``ep_size > 1`` without a topology).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..config import TrilemmaMoEConfig, dropin_structure
from ..core.experts import spec_from_module
from ..core.layer import ClusteredMoE
from .deepspeed_engine import DataParallelSync, DeepSpeedParamIO, _uses_deepspeed_partitions, deepspeed_param_io
from .deepspeed_zero3 import gathered_parameters, tag_expert_parameters
from .deepspeed_keys import register_slot_key_hooks

logger = logging.getLogger(__name__)


def require_deepspeed(what: str) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs DeepSpeed: pip install 'trilemma_moe[deepspeed]'") from None


_reported = set()   # structure choices already logged by this process


def _dropin_defaults(knobs: Dict[str, Any], hidden_size: int, ffn_hidden_size: int) -> Dict[str, Any]:
    """The knobs of a layer built without a TrilemmaMoEConfig: MoE's signature defaults
    (num_experts=1, k=1) where the caller gave neither, and num_groups/rank the caller did not
    give chosen from the shapes by :func:`~trilemma_moe.config.dropin_structure` (logged once)."""
    knobs = dict(knobs)
    knobs.setdefault("num_experts", 1)
    knobs.setdefault("top_k", 1)
    if "num_groups" in knobs and "rank" in knobs:
        return knobs
    G, r = dropin_structure(knobs["num_experts"], knobs.get("ep_size", 1), hidden_size, ffn_hidden_size,
                            knobs["top_k"])
    chosen = {name: value for name, value in (("num_groups", G), ("rank", r)) if name not in knobs}
    knobs.update(chosen)
    message = (f"TrilemmaMoE without a TrilemmaMoEConfig: {', '.join(f'{n}={v}' for n, v in chosen.items())} "
               f"chosen for num_experts={knobs['num_experts']}, ep_size={knobs.get('ep_size', 1)}, "
               f"hidden {hidden_size}, ffn {ffn_hidden_size} (pass them, or a config, to set them)")
    if message not in _reported:
        _reported.add(message)
        logger.warning(message)
    return knobs


class DeepSpeedStyleMoE(nn.Module):
    """``TrilemmaMoE`` without DeepSpeed's ``MoE`` base class: what a run that does not use
    DeepSpeed builds (``models.OursFFN`` when DeepSpeed is not imported), with the same
    parameters, state-dict keys and numbers.

    Accepts MoE's constructor arguments plus ``config=TrilemmaMoEConfig(...)`` (or our knobs as
    keywords). ``num_experts`` and ``k`` set ``config.num_experts``/``config.top_k``; ``k`` and a
    config (or ``top_k`` knob) that disagree are refused. Without a config, what the caller leaves
    out keeps MoE's signature defaults (``num_experts=1``, ``k=1``: top-1 routing) and
    ``num_groups``/``rank`` follow the shapes (:func:`~trilemma_moe.config.dropin_structure`,
    logged once); a given config is used as it is.
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
        if expert is not None:
            spec, _ = spec_from_module(expert, hidden_size)
        else:
            if ffn_hidden_size is None:
                raise ValueError("pass an expert FFN module or ffn_hidden_size")
            spec = None
        overrides = dict(knobs)
        if num_experts is not None:
            overrides["num_experts"] = num_experts
        if k is not None:
            for where, top_k in (("top_k", knobs.get("top_k")), ("config.top_k", getattr(config, "top_k", None))):
                if top_k is not None and top_k != k:
                    raise ValueError(f"k={k} but {where}={top_k}: set one of them")
            overrides["top_k"] = k
        if ep_size != 1:
            if config is not None and config.ep_size not in (1, ep_size):
                raise ValueError(f"ep_size={ep_size} but config.ep_size={config.ep_size}: set one of them")
            overrides["ep_size"] = ep_size
        if config is None:
            config = TrilemmaMoEConfig.from_dict(_dropin_defaults(
                overrides, hidden_size, ffn_hidden_size or spec.ffn_hidden_size))
        elif overrides:
            config = config.replace(**overrides)
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
        # Experts start distinct (seed, layer, expert index), not as deep copies of `expert`:
        # identical experts would make every similarity 1.
        comm = None
        if ep_size > 1:
            # Groups are placed on ranks at construction (each rank builds only its own), so the
            # expert-parallel groups must exist now: DeepSpeed's (made once, shared by layers) or passed in.
            from ..parallel import ExpertParallelComm, ExpertParallelTopology
            if topology is None:
                require_deepspeed("ep_size > 1 without a topology")
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
        tag_expert_parameters(self.moe.experts.parameters(), self.expert_group_name)   # and partitioned over it at stage 3
        if config.offload_idle_steps is not None:
            from .aio import make_tier
            self.moe.offload_tier = make_tier(config.offload_dir, config.aio)
        # Checkpoints by slot in DeepSpeed-MoE's key naming (deepspeed_keys.py): one file per global
        # expert slot from engine.save_checkpoint, the same keys in a plain state_dict.
        register_slot_key_hooks(self)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine: create (once) and remember the expert process groups."""
        require_deepspeed("set_deepspeed_parallelism")
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
        """``(output, l_aux, exp_counts)`` as DeepSpeed's ``MoE`` returns them (see the class);
        ``used_token``: one bool per token, False rows get no expert output."""
        if not isinstance(self.moe.io, DeepSpeedParamIO) and _uses_deepspeed_partitions(self.moe):
            # Under ZeRO-1/2/3 or the bf16 optimizer, regroups must write through DeepSpeed.
            self.moe.set_param_io(deepspeed_param_io(self.moe))
        return self.moe(hidden_states, used_token)

    # --- delegation -------------------------------------------------------------------------
    def recluster(self, force: bool = False) -> bool:
        """:meth:`.ClusteredMoE.recluster`, with ZeRO-3's partitioned parameters gathered first."""
        with gathered_parameters(self.moe.parameters()):   # ZeRO-3: between steps they are partitioned
            return self.moe.recluster(force=force)

    def group_assignment(self) -> torch.Tensor:
        """:meth:`.ClusteredMoE.group_assignment`."""
        return self.moe.group_assignment()

    def stats(self) -> Dict[str, float]:
        """:meth:`.ClusteredMoE.stats`."""
        return self.moe.stats()

    def attach_optimizer(self, optimizer) -> None:
        """:meth:`.ClusteredMoE.attach_optimizer`."""
        self.moe.attach_optimizer(optimizer)

    def expert_parameter_count(self) -> int:
        """:meth:`.ClusteredMoE.expert_parameter_count`."""
        return self.moe.expert_parameter_count()

    def comm_stats(self) -> Dict[str, float]:
        """:meth:`.ClusteredMoE.comm_stats`."""
        return self.moe.comm_stats()

    def memory_report(self) -> Dict[str, int]:
        """:meth:`.ClusteredMoE.memory_report`."""
        return self.moe.memory_report()

    def offload_stats(self) -> Dict[str, float]:
        """:meth:`.ClusteredMoE.offload_stats`."""
        return self.moe.offload_stats()
