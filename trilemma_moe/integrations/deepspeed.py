"""DeepSpeed drop-in: ``TrilemmaMoE`` is a ``deepspeed.moe.layer.MoE`` (the engine finds MoE
layers with isinstance), so ``deepspeed.initialize`` builds expert-aware optimizer groups and
reduces our expert gradients over DeepSpeed's expert-data-parallel group.

The user-facing half: ``TrilemmaMoE``, ``moe_param_groups``, ``replace_moe_layers`` and
``ensure_process_group``. The layer's body is :class:`~.deepspeed_layer.DeepSpeedStyleMoE` (a thin
shell: the math lives in ``trilemma_moe.core.layer.ClusteredMoE``); what runs after
``deepspeed.initialize`` (``attach_engine``, ZeRO state I/O, replica sync) is in
``deepspeed_engine.py``, the per-slot checkpoint keys in ``deepspeed_keys.py``. Importing this
module imports DeepSpeed when it is installed.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..config import TrilemmaMoEConfig
from ..core.experts import spec_from_module
from ..core.layer import clustered_layers  # noqa: F401  (re-exported)
from .deepspeed_engine import (DataParallelSync, DeepSpeedParamIO, attach_engine,  # noqa: F401  (re-exported)
                               unlink_cpu_allreduce_shm)
from .deepspeed_layer import DeepSpeedStyleMoE, require_deepspeed

try:
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
    from deepspeed.utils import set_z3_leaf_module
    from .deepspeed_zero3 import permit_stage3
    HAVE_DEEPSPEED = True
except ImportError:  # the layer still works as a plain nn.Module
    _DeepSpeedMoE = nn.Module
    HAVE_DEEPSPEED = False

__all__ = ["TrilemmaMoE", "moe_param_groups", "replace_moe_layers", "ensure_process_group", "attach_engine",
           "DeepSpeedParamIO", "DataParallelSync", "unlink_cpu_allreduce_shm", "clustered_layers", "HAVE_DEEPSPEED"]


class TrilemmaMoE(DeepSpeedStyleMoE, _DeepSpeedMoE):
    """Drop-in replacement for ``deepspeed.moe.layer.MoE``: :class:`~.deepspeed_layer.DeepSpeedStyleMoE` (its
    constructor arguments, forward and methods) with DeepSpeed's ``MoE`` as a base class, so that
    the engine treats it as an MoE layer. Without DeepSpeed installed it is a plain ``nn.Module``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if HAVE_DEEPSPEED:
            # ZeRO-3 gathers the whole layer before its forward (deepspeed_zero3.py)
            set_z3_leaf_module(self.moe, True)


if HAVE_DEEPSPEED:
    permit_stage3()


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


def moe_param_groups(model: nn.Module, weight_decay: float = 0.0, lr: Optional[float] = None) -> List[Dict]:
    """Optimizer parameter groups as DeepSpeed needs them for MoE: expert parameters (tagged
    ``allreduce=False``) in their own group per expert-parallel group name."""
    require_deepspeed("moe_param_groups")
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
    require_deepspeed("replace_moe_layers")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, _DeepSpeedMoE) and not isinstance(m, DeepSpeedStyleMoE)]
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
        ref = next(old.parameters())
        # in the old layer's dtype before the copy: a float64 model must not pass through float32
        new.to(device=ref.device, dtype=ref.dtype)
        weights = [spec_from_module(e, hidden)[1] for e in ds_experts]
        first = weights[0]
        identical = all(all(torch.equal(w[n], first[n]) for n in first) for w in weights[1:])
        if identical:
            warnings.warn(f"{name}: DeepSpeed experts are identical copies; initialising them from the seed instead")
        else:
            new.moe.experts.load_expert_weights(weights)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(targets)
