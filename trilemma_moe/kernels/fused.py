"""Fast path of the compressed layer: sort-based dispatch, grouped GEMMs and the fused kernels.

The expert stage for rows = (token, chosen group) pairs sorted by group::

    z  = x @ W1[g]                  a = x @ A1cat[g]            (grouped GEMMs)
    hs, q = act_combine_fwd(z, a)   hs = sum_j w_j act(z + mask_j(a) B1cat[g]^T + b1_j)
    y  = hs @ W2[g] + q @ [B2cat[g] | b2[g]]^T                  (grouped GEMMs)

Per token this is one base GEMM per matrix (not one per chosen expert) plus rank-r terms, and the
second base GEMM acts on ``sum_j w_j h_j``. The kernels come from ``triton_moe`` on CUDA when
Triton is importable and from their plain-torch twins in ``reference`` otherwise (same function);
the autograd code below is shared, so the CPU tests check the same backward the GPU runs.

Dispatch is sort-based: one stable argsort by group, its inverse permutation, and gathers in both
directions (forward and backward), so no step scatters with atomics.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import torch

from . import reference


@functools.lru_cache(maxsize=None)
def _triton_module() -> Optional[ModuleType]:
    try:
        from . import triton_moe
    except ImportError:
        return None
    return triton_moe


def triton_available() -> bool:
    return _triton_module() is not None


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ops_for(device: torch.device, dtype: torch.dtype = torch.float32) -> ModuleType:
    """The Triton kernels for CUDA tensors of a dtype Triton's matrix units take (when Triton
    imports), else the torch twins (float64 stays exact on either device).

    ``TRILEMMA_KERNELS=reference`` forces the twins (for A/B checks on a GPU)."""
    if os.environ.get("TRILEMMA_KERNELS") == "reference":
        return reference
    if device.type == "cuda" and dtype in _TRITON_DTYPES and triton_available():
        return _triton_module()
    return reference


# --- sort-based dispatch --------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """``out = src[index]`` where every source row is read exactly ``fan`` times and
    ``inverse.view(-1, fan)`` lists, for each source row, the output rows that read it; the
    backward is then a gather plus a sum (no atomics)."""

    @staticmethod
    def forward(ctx, src, index, inverse, fan: int):
        ctx.save_for_backward(inverse)
        ctx.fan = fan
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return g.view(-1, ctx.fan, *g.shape[1:]).sum(1), None, None, None


class _SumGatherRows(torch.autograd.Function):
    """``out[t] = sum_{j < fan} src[inverse[t * fan + j]]``; backward ``grad[index]`` (a gather)."""

    @staticmethod
    def forward(ctx, src, inverse, index, fan: int):
        ctx.save_for_backward(index)
        g = src.index_select(0, inverse)
        return g.view(-1, fan, *g.shape[1:]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


def sort_by_group(group_idx: torch.Tensor, num_groups: int):
    """(token, group) pairs -> (order, inverse, off, token_of_row), all on the device, no host sync.

    order: pair ids sorted by group (stable); inverse[pair] = its row; off int32 [G+1];
    token_of_row = order // g1."""
    T, g1 = group_idx.shape
    flat = group_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    bounds = torch.arange(num_groups + 1, device=flat.device, dtype=flat.dtype)
    off = torch.searchsorted(flat[order], bounds).to(torch.int32)
    return order, inverse, off, order // g1


# --- the expert stage -----------------------------------------------------------------------------
class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, act, K, r, x, off, jloc, w, W1, A1, B1, bias1, W2, A2, B2ext):
        with torch.autocast(x.device.type, enabled=False):
            z = ops.gmm_rows(x, W1, off)
            a = ops.gmm_rows(x, A1, off)
            hs, q = ops.act_combine_fwd(z, a, jloc, w, B1, bias1, A2, off, K, r, act)
            qc = q.to(x.dtype)
            y = ops.gmm_rows(hs, W2, off) + ops.gmm_rows(qc, B2ext, off, trans_w=True)
        ctx.save_for_backward(x, off, jloc, w, W1, A1, B1, bias1, W2, A2, B2ext, z, a, hs, qc)
        ctx.ops, ctx.act, ctx.K, ctx.r = ops, act, K, r
        return y

    @staticmethod
    def backward(ctx, dy):
        x, off, jloc, w, W1, A1, B1, bias1, W2, A2, B2ext, z, a, hs, qc = ctx.saved_tensors
        ops, K, r = ctx.ops, ctx.K, ctx.r
        KR = K * r
        with torch.autocast(x.device.type, enabled=False):
            dy = dy.contiguous().to(x.dtype)
            dhs = ops.gmm_rows(dy, W2, off, trans_w=True)
            dW2 = ops.gmm_wgrad(hs, dy, off)
            dq = ops.gmm_rows(dy, B2ext, off)
            dB2ext = ops.gmm_wgrad(dy, qc, off)
            dz, da, dw, dB1, dbias1, dA2 = ops.act_combine_bwd(z, a, jloc, w, B1, bias1, A2, dhs, dq, off,
                                                               K, r, ctx.act)
            dw = dw + dq[:, KR:].to(dw.dtype).gather(1, jloc.long())
            dzc, dac = dz.to(x.dtype), da.to(x.dtype)
            dx = ops.gmm_rows(dzc, W1, off, trans_w=True) + ops.gmm_rows(dac, A1, off, trans_w=True)
            dW1 = ops.gmm_wgrad(x, dzc, off)
            dA1 = ops.gmm_wgrad(x, dac, off)

        def cast(g, like):
            return None if g is None else g.to(like.dtype)
        return (None, None, None, None, dx, None, None, cast(dw, w), cast(dW1, W1), cast(dA1, A1), cast(dB1, B1),
                cast(dbias1, bias1) if bias1 is not None else None, cast(dW2, W2), cast(dA2, A2), cast(dB2ext, B2ext))


def _cat_factors(t: torch.Tensor, G: int, K: int) -> torch.Tensor:
    """[E, n, r] slot-stacked factors -> [G, n, K*r], block j = the group's expert j."""
    E, n, r = t.shape
    return t.view(G, K, n, r).permute(0, 2, 1, 3).reshape(G, n, K * r)


def supports(slots) -> bool:
    """The fused path covers non-gated experts (gated ones run the per-slot path)."""
    return not slots.spec.gated


def fused_expert_forward(slots, x: torch.Tensor, group_idx: torch.Tensor, slot_idx: torch.Tensor,
                         weights: torch.Tensor, ops: Optional[ModuleType] = None) -> torch.Tensor:
    """Compressed experts of ``slots`` (an ``ExpertSlots``) for tokens x [T, d] routed to
    ``group_idx`` [T, g1] (local group ids), ``slot_idx`` [T, g1, k] (local slot ids) with combine
    ``weights`` [T, g1, k]. Returns [T, d]: sum over chosen (group, expert) of w * expert(x)."""
    if slots.spec.gated:
        raise ValueError("fused_expert_forward: gated experts are not supported by the fused path")
    G, K = slots.G, slots.K
    T, g1 = group_idx.shape
    k = slot_idx.shape[-1]
    P = T * g1
    if torch.is_autocast_enabled(x.device.type):
        cdt = torch.get_autocast_dtype(x.device.type)
    else:
        cdt = x.dtype
    ops = ops or ops_for(x.device, cdt)
    order, inverse, off, token_of_row = sort_by_group(group_idx, G)
    xp = _GatherRows.apply(x.to(cdt), token_of_row, inverse, g1).contiguous()
    jloc = (slot_idx.reshape(P, k) - group_idx.reshape(P, 1) * K).index_select(0, order).to(torch.int32).contiguous()
    wdt = torch.promote_types(weights.dtype, torch.float32)
    w = _GatherRows.apply(weights.reshape(P, k).to(wdt), order, inverse, 1).contiguous()

    def c(t):
        return t.to(cdt).contiguous()
    base, fa, fb, bias = slots.base, slots.fa, slots.fb, slots.bias
    W1, W2 = c(base["w1"]), c(base["w2"])
    res = slots.residual   # the factors as the forward sees them (INT4 values at residual_bits=4)
    A1, B1 = c(_cat_factors(res(fa["w1"]), G, K)), c(_cat_factors(res(fb["w1"]), G, K))
    A2, B2 = c(_cat_factors(res(fa["w2"]), G, K)), _cat_factors(res(fb["w2"]), G, K)
    d = B2.shape[1]
    if "b2" in bias:
        b2 = bias["b2"].view(G, K, d).transpose(1, 2)
    else:
        b2 = torch.zeros(G, d, K, dtype=B2.dtype, device=B2.device)
    B2ext = c(torch.cat([B2, b2], dim=2))
    bias1 = c(bias["b1"]) if "b1" in bias else None
    y_rows = _FusedExperts.apply(ops, slots.spec.activation, K, slots.rank, xp, off, jloc, w,
                                 W1, A1, B1, bias1, W2, A2, B2ext)
    return _SumGatherRows.apply(y_rows, inverse, token_of_row, g1)
