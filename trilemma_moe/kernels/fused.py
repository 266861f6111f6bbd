"""Fast path of the compressed layer: sort-based dispatch, grouped GEMMs and the fused kernels.

The expert stage for rows = (token, chosen group) pairs sorted by group, the shape of one dense FFN::

    [z | a]  = x @ [W1[g] | A1cat[g]]                                  (grouped GEMMs)
    [hs | q] = act_combine_fwd(z, a)    hs = sum_j w_j act(z + mask_j(a) B1cat[g]^T + b1_j)
    y        = [hs | q] @ [W2[g]; B2cat[g]^T; b2[g]; 0]                 (grouped GEMM)

The bracketed weights are never concatenated: the GEMMs take them in parts (the base parameter
where it lies, the small rank-r block assembled), so no weight-sized copy is made per step.
Gated experts (SwiGLU-style) add the up projection's stream z3 = x @ W3[g], a3 = x @ A3cat[g] to
U and ``h_j = act(z + mask_j(a) B1cat^T + b1_j) * (z3 + mask_j(a3) B3cat^T + b3_j)``.
Per token this is one base GEMM per matrix (not one per chosen expert) plus rank-r terms, and the
second base GEMM acts on ``sum_j w_j h_j``. The kernels come from ``triton_moe`` on CUDA when
Triton is importable and from their plain-torch twins in ``reference`` otherwise (same function);
the autograd code below is shared, so the CPU tests check the same backward the GPU runs.

Dispatch is sort-based: one stable sort by group and its inverse permutation. The first GEMM
reads each row's token through the sort index, the second writes each row to its token when a
token has one group (a permutation: no two rows collide), and a token's g1 > 1 rows are summed by
a gather; no step scatters with atomics.
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

    ``TRILEMMA_KERNELS=reference`` forces the twins (for A/B checks on a GPU);
    ``TRILEMMA_KERNELS=triton`` forces the Triton kernels (on the CPU: under ``TRITON_INTERPRET=1``,
    which runs the whole fused layer through Triton's interpreter in the tests)."""
    choice = os.environ.get("TRILEMMA_KERNELS")
    if choice == "reference":
        return reference
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("TRILEMMA_KERNELS=triton, but triton does not import")
        return _triton_module()
    if device.type == "cuda" and dtype in _TRITON_DTYPES and triton_available():
        return _triton_module()
    return reference


# --- sort-based dispatch --------------------------------------------------------------------------
class GatherRows(torch.autograd.Function):
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


class SumGatherRows(torch.autograd.Function):
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
    sorted_groups, order = torch.sort(group_idx.reshape(-1), stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    bounds = torch.arange(num_groups + 1, device=order.device, dtype=sorted_groups.dtype)
    off = torch.searchsorted(sorted_groups, bounds, out_int32=True)
    return order, inverse, off, order if g1 == 1 else order // g1


# --- the expert stage -----------------------------------------------------------------------------
def _up_factors(A: list, K: int, dtype: torch.dtype) -> torch.Tensor:
    """[A1cat[g]] (gated: [A1cat[g] | A3cat[g]]) as one [G, d, n*K*r] weight: the rank-r input
    projections, output columns of the up GEMM next to the base's (small: the base weights are
    read where they lie)."""
    E, d, r = A[0].shape
    G = E // K
    KR = K * r
    out = torch.empty(G, d, len(A) * KR, dtype=dtype, device=A[0].device)
    for i, Ai in enumerate(A):
        out[:, :, i * KR:(i + 1) * KR].view(G, d, K, r).copy_(Ai.view(G, K, d, r).permute(0, 2, 1, 3))
    return out


def _down_extra(B2: torch.Tensor, bias2: Optional[torch.Tensor], K: int, dtype: torch.dtype) -> torch.Tensor:
    """[B2cat[g]^T; bias2 of the group's experts; 0] as one [G, q_width, d] weight: the K rows of
    the down GEMM below the base W2[g], matching the q columns of ``act_combine_fwd``'s output."""
    E, d, r = B2.shape
    G = E // K
    KR = K * r
    out = torch.empty(G, reference.q_width(K, r), d, dtype=dtype, device=B2.device)
    out[:, :KR].view(G, K, r, d).copy_(B2.view(G, K, d, r).transpose(2, 3))
    if bias2 is not None:
        out[:, KR:KR + K].copy_(bias2.view(G, K, d))
        out[:, KR + K:].zero_()
    else:
        out[:, KR:].zero_()
    return out


def _split_factors(t: torch.Tensor, K: int) -> torch.Tensor:
    """[G, n, K*r] (block j = expert j) -> slot-stacked [E, n, r]; inverse of ``cat_factors``."""
    G, n, KR = t.shape
    return t.reshape(G, n, K, KR // K).permute(0, 2, 1, 3).reshape(G * K, n, KR // K)


def _split_up(U: torch.Tensor, f: int, KR: int, B3, bias3):
    """(z, a, gate): the activation input's column ranges of the up GEMM's output U, and the
    act_combine kernels' keyword operands of the gated stream (none for non-gated experts)."""
    if B3 is None:
        return U[:, :f], U[:, f:f + KR], {}
    return U[:, :f], U[:, 2 * f:2 * f + KR], dict(z3=U[:, f:2 * f], a3=U[:, 2 * f + KR:], b3=B3, bias3=bias3)


class _FusedExperts(torch.autograd.Function):
    """The expert stage in the shape of one dense FFN: the rank-r input projections ride along
    the first base GEMM as extra output columns, and the down projection's rank-r terms and
    biases along the second as extra K rows.

        U = x @ [W1 | A1cat]                     z = U[:, :f], a = U[:, f:]
          (gated: x @ [W1 | W3 | A1cat | A3cat]  z, z3, a, a3)
        V = act_combine_fwd(z, a, ...)           [hs | q]
        y = V @ [W2; B2cat^T; bias2; 0]

    The base weights are read where they lie (cast to the compute dtype, x's, only when theirs
    differs): the GEMMs take the weight in parts, so no weight-sized [W1 | A1cat] copy is made,
    kept for the backward, or freed; only the small rank-r blocks (X1 = [A1cat | A3cat],
    X2 = [B2cat^T; bias2; 0]) are assembled. U's column blocks are written by one GEMM per part
    (x is read once per part); y and dx read their K parts in one GEMM. Gradients come back in
    each parameter's own dtype. The gated operands (W3 .. bias3) are None for non-gated experts.
    The backward frees each [rows, f] buffer as soon as its last reader is done (U and V are held
    on ctx, not saved, so they can be dropped early); for non-gated experts the combine's backward
    writes [dz | da] over [dhs | dq] in place, so at most two such buffers are alive at once. The
    base weights' gradients are computed straight into their own buffers, in their own dtype
    (a bf16 parameter gets no float32 gradient buffer of its size)."""

    @staticmethod
    def forward(ctx, ops, act, K, r, x, rows, inverse, off, jloc, w, W1, W2, A1, B1, bias1, A2, B2, bias2,
                W3=None, A3=None, B3=None, bias3=None):
        # x: the tokens [T, d]; sorted row m reads token rows[m] inside the first GEMMs (no gathered
        # copy of x). One group per token (rows a permutation): the second GEMM writes row m to
        # token rows[m], so y is in token order; else y is in row order (the caller sums a
        # token's rows).
        cdt = x.dtype
        f = W1.shape[2]
        gated = W3 is not None
        scatter = rows.numel() == x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            Wup = [W1.to(cdt), W3.to(cdt)] if gated else [W1.to(cdt)]
            X1 = _up_factors([A1, A3] if gated else [A1], K, cdt)
            W2c = W2.to(cdt)
            X2 = _down_extra(B2, bias2, K, cdt)
            U = x.new_empty(rows.numel(), len(Wup) * f + X1.shape[2])
            col = 0
            for part in Wup + [X1]:   # U's column blocks [z | z3 | a a3]
                ops.gmm_rows(x, part, off, x_rows=rows, out=U[:, col:col + part.shape[2]])
                col += part.shape[2]
            z, a, gate = _split_up(U, f, K * r, B3, bias3)
            V = ops.act_combine_fwd(z, a, jloc, w, B1, bias1, A2, off, K, r, act,
                                    x.new_empty(rows.numel(), f + X2.shape[1]), **gate)
            y = ops.gmm_rows(V, (W2c, X2), off, y_rows=rows if scatter else None)
        ctx.save_for_backward(x, rows, inverse, off, jloc, w, W2c, X1, X2, B1, bias1, A2, B3, bias3, *Wup)
        ctx.U, ctx.V = U, V
        ctx.ops, ctx.act, ctx.K, ctx.r, ctx.gated, ctx.scatter = ops, act, K, r, gated, scatter
        ctx.dtypes = [t.dtype if t is not None else None for t in (W1, W2, A1, B2, bias2, W3, A3)]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rows, inverse, off, jloc, w, W2c, X1, X2, B1, bias1, A2, B3, bias3, *Wup = ctx.saved_tensors
        U, V = ctx.U, ctx.V
        if U is None:
            raise RuntimeError("the fused expert stage's backward ran twice (retain_graph): it frees its "
                               "activations as it goes; set layer.fused = False for double backward")
        ctx.U = ctx.V = None
        ops, K, r, gated = ctx.ops, ctx.K, ctx.r, ctx.gated
        n, KR = len(Wup), K * r
        f = W2c.shape[1]
        E = X1.shape[0] * K
        tW1, tW2, tA1, tB2, tb2, tW3, tA3 = ctx.dtypes
        with torch.autocast(x.device.type, enabled=False):
            dy = dy.contiguous().to(x.dtype)
            # the weight gradients want rows in sorted order: gather dy (token order when the output
            # was scattered) and x once here (an index load inside a GEMM's reduction loop would
            # cost it its software pipeline)
            if ctx.scatter:
                dy = dy.index_select(0, rows)
            dV = dy.new_empty(dy.shape[0], f + X2.shape[1])            # [dhs | dq]
            ops.gmm_rows(dy, W2c, off, trans_w=True, out=dV[:, :f])
            ops.gmm_rows(dy, X2, off, trans_w=True, out=dV[:, f:])
            dW2 = ops.gmm_wgrad(V[:, :f], dy, off, dtype=tW2)
            dq_w = ops.gmm_wgrad(V[:, f:], dy, off)
            del V, dy
            # (the reshapes copy: the gradients do not keep dq_w alive)
            dB2 = dq_w[:, :KR].reshape(-1, K, r, dq_w.shape[2]).transpose(2, 3).reshape(E, -1, r).to(tB2)
            dbias2 = dq_w[:, KR:KR + K].reshape(E, -1).to(tb2) if tb2 is not None else None
            del dq_w
            # [dz | da] over [dhs | dq] in place; gated [dz | dz3 | da | da3] is wider: its own buffer
            dU = torch.empty_like(U) if gated else dV[:, :U.shape[1]]
            z, a, gate = _split_up(U, f, KR, B3, bias3)
            dw, dB1, dbias1, dA2, *dgate = ops.act_combine_bwd(z, a, jloc, w, B1, bias1, A2, dV[:, :f], dV[:, f:],
                                                               off, K, r, ctx.act, dU, **gate)
            del U, z, a, gate, dV
            # dx = dU @ [W1 | W3 | X1]^T: the parts stacked along K, read where they lie
            parts = tuple(Wup) + (X1,)
            if ctx.scatter:   # row m's gradient goes straight to token rows[m]
                dx = ops.gmm_rows(dU, parts, off, trans_w=True, y_rows=rows)
            else:             # a token's g1 rows summed: gathers, no atomics
                dx_rows = ops.gmm_rows(dU, parts, off, trans_w=True)
                dx = dx_rows.index_select(0, inverse).view(x.shape[0], -1, x.shape[1]).sum(1)
                del dx_rows
            xr = x.index_select(0, rows)
            dW1 = ops.gmm_wgrad(xr, dU[:, :f], off, dtype=tW1)
            dW3 = ops.gmm_wgrad(xr, dU[:, f:2 * f], off, dtype=tW3) if gated else None
            dA_x = ops.gmm_wgrad(xr, dU[:, n * f:], off)       # [A1cat | A3cat] columns
            del xr
            del dU
            dA1 = _split_factors(dA_x[:, :, :KR], K).to(tA1)
            dA3 = _split_factors(dA_x[:, :, KR:], K).to(tA3) if gated else None
            del dA_x
        dbias1 = dbias1.to(bias1.dtype) if bias1 is not None else None
        grads = (None, None, None, None, dx, None, None, None, None, dw.to(w.dtype), dW1, dW2, dA1, dB1.to(B1.dtype),
                 dbias1, dA2.to(A2.dtype), dB2, dbias2)
        if not gated:
            return grads + (None, None, None, None)
        dB3, dbias3 = dgate
        return grads + (dW3, dA3, dB3.to(B3.dtype), dbias3.to(bias3.dtype) if bias3 is not None else None)


class _FakeQuant(torch.autograd.Function):
    """INT4 quantize-dequantize by the ops' kernel, straight-through gradient (as core.quant)."""

    @staticmethod
    def forward(ctx, ops, w):
        return ops.fake_quant(w)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def fused_expert_forward(slots, x: torch.Tensor, group_idx: torch.Tensor, slot_idx: torch.Tensor,
                         weights: torch.Tensor, ops: Optional[ModuleType] = None) -> torch.Tensor:
    """Compressed experts of ``slots`` (an ``ExpertSlots``) for tokens x [T, d] routed to
    ``group_idx`` [T, g1] (local group ids), ``slot_idx`` [T, g1, k] (local slot ids) with combine
    ``weights`` [T, g1, k]. Returns [T, d]: sum over chosen (group, expert) of w * expert(x)."""
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
    # the chosen experts' positions inside their group, in row order
    jloc = (slot_idx.reshape(P, k) % K).index_select(0, order)
    w = GatherRows.apply(weights.reshape(P, k), order, inverse, 1)
    def res(p):   # a factor as the forward sees it: its INT4 values at residual_bits=4
        return _FakeQuant.apply(ops, p) if slots.residual_bits == 4 else p
    fa, fb, bias = slots.fa, slots.fb, slots.bias
    gate = (slots.base["w3"], res(fa["w3"]), res(fb["w3"]), bias.get("b3")) if slots.spec.gated else ()
    y = _FusedExperts.apply(ops, slots.spec.activation, K, slots.rank, x.to(cdt), token_of_row, inverse, off,
                            jloc, w, slots.base["w1"], slots.base["w2"], res(fa["w1"]), res(fb["w1"]), bias.get("b1"),
                            res(fa["w2"]), res(fb["w2"]), bias.get("b2"), *gate)
    # one group per token: y is already in token order; else sum each token's g1 rows
    return y if g1 == 1 else SumGatherRows.apply(y, inverse, token_of_row, g1)
