"""Precision and memory of a clustered layer (paper 3.4): the stored form inference reads
(FP16/BF16 bases, INT4 or 16-bit residuals), idle groups offloaded through an offload tier, and
the byte accounting of what is held.

Training always computes from the master parameters; an inference forward reads the stored form
when ``offload_idle_steps`` is set or after :func:`release_masters`. The store is rebuilt from the
masters whenever they changed since it was built, so it is never stale.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import quant
from .compression import held_numel
from .offload import CPUTier, GroupStore


def store_views(layer, group_counts, group_probs=None):
    """The weight views of an inference forward that reads the store, or None (the masters)."""
    if not layer._serving:
        if layer.config.offload_idle_steps is None or not layer.compressed:
            return None
        ensure_store(layer)
    return layer._store.step(group_counts, group_probs)


def ensure_store(layer) -> GroupStore:
    """The layer's store, rebuilt from the masters whenever they changed since it was built."""
    key = (layer._c("micro_step"), layer._c("reclusters"),
           sum(p._version for p in layer.experts.expert_parameters(True)))
    if layer._store is None:
        tier = layer.offload_tier if layer.offload_tier is not None else CPUTier()
        cfg = layer.config
        layer._store = GroupStore(layer.experts, cfg.residual_bits, tier, layer.layer_index,
                                  cfg.offload_idle_steps, cfg.prefetch_lookahead, cfg.prefetch_ema_rate,
                                  cfg.prefetch_router_evidence, cfg.prefetch_threshold)
    elif key != layer._store_key:
        layer._store.build()
    layer._store_key = key
    return layer._store


@torch.no_grad()
def release_masters(layer) -> None:
    """See ``ClusteredMoE.release_masters``."""
    if not layer.compressed:
        raise RuntimeError("release_masters: the layer is not compressed yet (it still trains full experts)")
    if layer.ep is not None:
        raise NotImplementedError("release_masters: serving from the stored form runs in one process "
                                  "(ep_size=1); consolidate the checkpoint with `trilemma-moe reshard` first")
    ensure_store(layer)
    layer._serving = True
    for p in layer.experts.parameters():
        p.requires_grad_(False)
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def offload_stats(store: Optional[GroupStore]) -> Dict[str, float]:
    if store is None:
        return {"accesses": 0, "hits": 0, "misses": 0, "bytes_written": 0, "bytes_read": 0, "stall_s": 0.0,
                "steps": 0, "hit_rate": float("nan"), "resident_bytes": 0, "offloaded_bytes": 0}
    return store.summary()


@torch.no_grad()
def memory_report(layer) -> Dict[str, int]:
    """Bytes per component, from the tensors held (and, for the stored residuals, from the
    packed tensors built now from the current masters).

    ``bases``, ``residual_masters`` (the optimizer's factors), ``biases``, ``router``,
    ``burn_in_full`` (full experts' storage still held): held now. ``residual_stored``: the
    residuals as stored (offload files, inference store): INT4 ``residual_packed`` +
    ``residual_scales`` (scales and zero points) at ``residual_bits=4``, else the factors as
    held. ``stored_experts`` = bases + residual_stored + biases. ``store_resident`` /
    ``store_offloaded``: the offload store's groups in memory / on the offload tier.
    """
    def nb(ts):
        return sum(held_numel(t) * t.element_size() for t in ts)
    ex = layer.experts
    factors = list(ex.fa.values()) + list(ex.fb.values())
    r = {"bases": nb(ex.base.values()), "residual_masters": nb(factors), "biases": nb(ex.bias.values()),
         "router": nb(layer.router.parameters()), "burn_in_full": nb(ex.full.values())}
    if layer._serving:   # masters freed: the stored form is what the store holds (resident + offloaded)
        r.update(layer._store.resident_breakdown())
        r["stored_experts"] = r["bases"] + r["residual_stored"] + r["biases"] + layer._store.offloaded_bytes()
    elif layer.config.residual_bits == 4:
        qs = [quant.quantize(p) for p in factors]
        r["residual_packed"] = nb(q["packed"] for q in qs)
        r["residual_scales"] = nb(t for q in qs for t in (q["scale"], q["zero"]))
        r["residual_stored"] = r["residual_packed"] + r["residual_scales"]
    else:
        r["residual_stored"] = r["residual_masters"]
    if not layer._serving:
        r["stored_experts"] = r["bases"] + r["residual_stored"] + r["biases"]
    st = offload_stats(layer._store)
    r["store_resident"], r["store_offloaded"] = int(st["resident_bytes"]), int(st["offloaded_bytes"])
    return r
