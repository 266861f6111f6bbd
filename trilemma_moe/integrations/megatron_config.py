"""Megatron-core's ``TransformerConfig`` -> our ``TrilemmaMoEConfig`` and expert shape.

Pure attribute reading (no Megatron import), so it is testable and cheap. The MoE fields of
Megatron's config map onto our knobs:

=================================  ======================  ==========================================
Megatron ``TransformerConfig``     ``TrilemmaMoEConfig``   when the Megatron field is unset
=================================  ======================  ==========================================
``num_moe_experts``                ``num_experts``         required
``moe_router_topk``                ``top_k``               (Megatron's default 2 counts as unset)
``moe_router_num_groups``          ``num_groups`` (G)      None
``moe_router_group_topk``          ``group_top_k``         None
``moe_aux_loss_coeff``             ``aux_loss_coef``       0.0 (Megatron's default; off)
``moe_z_loss_coeff``               ``z_loss_coef``         None (off)
``expert_model_parallel_size``     ``ep_size``             1
``moe_expert_capacity_factor``     ``capacity_factor``     None (dropless)
=================================  ======================  ==========================================

A Megatron field at its unset value leaves the knob to ``trilemma`` (a ``TrilemmaMoEConfig`` or
a dict of knobs), else to Megatron's meaning of unset (aux and z losses off, top-2, ep 1,
dropless) or our default (G). Both set to different values is one ``ValueError`` naming both.
Megatron MoE features this layer does not have raise, naming the field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..config import TrilemmaMoEConfig

# (Megatron field, our knob, Megatron's unset value, value our layer takes when both are unset;
#  None there = our TrilemmaMoEConfig default)
FIELD_MAP = (
    ("moe_router_topk", "top_k", 2, 2),
    ("moe_router_num_groups", "num_groups", None, None),
    ("moe_router_group_topk", "group_top_k", None, None),
    ("moe_aux_loss_coeff", "aux_loss_coef", 0.0, 0.0),
    ("moe_z_loss_coeff", "z_loss_coef", None, 0.0),
    ("expert_model_parallel_size", "ep_size", 1, 1),
    ("moe_expert_capacity_factor", "capacity_factor", None, None),
)

# Megatron MoE features with no counterpart here: (field, value meaning "off", why)
UNSUPPORTED = (
    ("moe_shared_expert_intermediate_size", None, "shared experts"),
    ("moe_router_score_function", "softmax", "our router scores with softmax at both levels"),
    ("moe_router_enable_expert_bias", False, "aux-loss-free expert bias"),
    ("moe_router_topk_scaling_factor", None, "our combine weight is p_g * p_i, unscaled"),
    ("moe_input_jitter_eps", None, "input jitter"),
    ("moe_pad_expert_input_to_capacity", False, "padding expert inputs to capacity"),
    ("moe_latent_size", None, "latent MoE projections"),
    ("tensor_model_parallel_size", 1, ("tensor parallelism (the layer is replicated, not split; use "
                                       "expert and data parallelism)")),
    ("expert_tensor_parallel_size", (None, 1), "expert tensor parallelism"),
)

_ACTIVATIONS = ("gelu", "relu", "silu")


def _knobs(trilemma: None | TrilemmaMoEConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The knobs ``trilemma`` sets explicitly: a dict's keys; for a TrilemmaMoEConfig, the fields
    that differ from our defaults (a default value cannot be told from an explicit one)."""
    if trilemma is None:
        return {}
    if isinstance(trilemma, TrilemmaMoEConfig):
        return {f.name: getattr(trilemma, f.name) for f in dataclasses.fields(trilemma)
                if getattr(trilemma, f.name) != f.default}
    if isinstance(trilemma, Mapping):
        return dict(trilemma)   # unknown keys: TrilemmaMoEConfig.from_dict names them
    raise ValueError(f"trilemma must be a TrilemmaMoEConfig, a dict of its knobs or None, got {type(trilemma).__name__}")


def _unset(value, unset) -> bool:
    return value == unset if not isinstance(unset, tuple) else value in unset


def trilemma_config(config, trilemma: None | TrilemmaMoEConfig | Mapping[str, Any] = None) -> TrilemmaMoEConfig:
    """Our layer's config from Megatron's ``TransformerConfig`` ``config`` and ``trilemma``."""
    for name, off, what in UNSUPPORTED:
        value = getattr(config, name, off if not isinstance(off, tuple) else off[0])
        if not _unset(value, off):
            raise ValueError(f"TransformerConfig.{name}={value!r}: {what} is not supported by the trilemma_moe layer")
    granularity = getattr(config, "recompute_granularity", None)
    modules = list(getattr(config, "recompute_modules", None) or [])
    if granularity == "full" or (granularity == "selective" and {"mlp", "moe"} & set(modules)):
        raise ValueError(f"TransformerConfig.recompute_granularity={granularity!r} (recompute_modules={modules}): "
                         f"recomputation re-runs the trilemma_moe layer's forward in the backward, which would count "
                         f"its routing statistics twice; recompute attention only (selective, ['core_attn'])")
    balance = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    if balance not in ("aux_loss", "none", ["aux_loss"], ["none"]):
        raise ValueError(f"TransformerConfig.moe_router_load_balancing_type={balance!r}: the trilemma_moe layer "
                         f"has its own balance loss (group and expert level, weight moe_aux_loss_coeff); use "
                         f"'aux_loss' or 'none'")
    knobs = _knobs(trilemma)
    experts = getattr(config, "num_moe_experts", None)
    if experts is None:
        raise ValueError("TransformerConfig.num_moe_experts is None: set the number of experts there "
                         "(--num-experts); the trilemma_moe layer takes it from Megatron's config")
    values = {"num_experts": experts}
    if "num_experts" in knobs and knobs["num_experts"] != experts:
        raise ValueError(f"TransformerConfig.num_moe_experts={experts} conflicts with trilemma num_experts="
                         f"{knobs['num_experts']}: set it in one place")
    for field, knob, unset, fallback in FIELD_MAP:
        m = getattr(config, field, unset)
        if isinstance(m, (list, tuple)):
            if len(set(m)) != 1:
                raise ValueError(f"TransformerConfig.{field}={m!r}: the trilemma_moe layer takes one value")
            m = m[0]
        if not _unset(m, unset):
            if knob in knobs and knobs[knob] != m:
                raise ValueError(f"TransformerConfig.{field}={m!r} conflicts with trilemma {knob}={knobs[knob]!r}: "
                                 f"set it in one place")
            values[knob] = m
        elif knob not in knobs and fallback is not None:
            values[knob] = fallback
    merged = {k: v for k, v in knobs.items() if k not in values}
    merged.update(values)
    return TrilemmaMoEConfig.from_dict(merged)


def expert_shape(config) -> tuple[int, int, str, bool, bool]:
    """(hidden_size, ffn_hidden_size, activation, gated, bias) of one expert FFN: Megatron's
    ``moe_ffn_hidden_size`` (else ``ffn_hidden_size``), ``activation_func`` (gelu, relu, silu;
    ``gated_linear_unit`` makes it SwiGLU/GeGLU), ``add_bias_linear``."""
    ffn = getattr(config, "moe_ffn_hidden_size", None) or getattr(config, "ffn_hidden_size", None)
    if ffn is None:
        raise ValueError("TransformerConfig.moe_ffn_hidden_size and ffn_hidden_size are both None")
    fn = getattr(config, "activation_func", None)
    name = getattr(fn, "__name__", repr(fn))
    if name not in _ACTIVATIONS:
        raise ValueError(f"TransformerConfig.activation_func={name}: the trilemma_moe experts support "
                         f"{list(_ACTIVATIONS)} (with gated_linear_unit for GLU variants)")
    gated = bool(getattr(config, "gated_linear_unit", False))
    return config.hidden_size, int(ffn), name, gated, bool(getattr(config, "add_bias_linear", True))


def layer_index(layer_number: int | None) -> int:
    """Megatron numbers layers from 1; our seeds use a 0-based index."""
    return 0 if layer_number is None else int(layer_number) - 1
