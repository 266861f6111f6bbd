"""Plain-torch twins of the GPU kernels (``triton_moe.py``): the same functions, same arguments.

They define what each kernel computes, serve as the reference in the kernel tests, and run the
fused expert path where Triton is unavailable (CPU, or a GPU without Triton).

Shared conventions (rows = (token, group) pairs sorted by group):
* ``off`` int32 [G+1]: rows of group g are ``off[g]:off[g+1]``;
* ``jloc`` [P, k]: the chosen experts' positions inside the row's group (0..K-1), ``w`` [P, k]
  their combine weights;
* rank-r factors are slot-stacked ``[E, n, r]`` (slot g*K + j = expert j of group g); ``*cat``
  views of them hold a group's K factors side by side: ``[G, n, K*r]``, block j = expert j. A row's
  low-rank term for expert j is ``mask_j(x A_cat) B_cat^T``: the mask keeps block j, so one small
  dense product per group serves all its experts;
* gated experts pass a second stream (``z3, a3, b3, bias3``, laid out like ``z, a, b1, bias1``):
  ``h_j = act(z-stream) * (z3-stream)``; without it the functions are the non-gated ones.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import int4

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "identity": 4}


def act_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "relu":
        return F.relu(x)
    if act == "silu":
        return F.silu(x)
    if act == "identity":
        return x
    raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {act!r}")


def _segments(off: torch.Tensor):
    bounds = off.tolist()
    return [(g, bounds[g], bounds[g + 1]) for g in range(len(bounds) - 1)]


def weight_parts(w, kd: int, trans_w: bool) -> tuple:
    """``w`` as a tuple of parts stacked along K (a lone tensor is one part), checked against x's
    ``kd`` columns: the parts' K extents must add up to it."""
    ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    ks = [wi.shape[2] if trans_w else wi.shape[1] for wi in ws]
    ns = {wi.shape[1] if trans_w else wi.shape[2] for wi in ws}
    if sum(ks) != kd or len(ns) != 1 or len({wi.shape[0] for wi in ws}) != 1:
        raise ValueError(f"gmm_rows: weight parts {[tuple(wi.shape) for wi in ws]} (trans_w={trans_w}) do not "
                         f"stack along K to the {kd} columns of x")
    return ws


def out_rows(out: Optional[torch.Tensor], rows: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """The output buffer of a grouped GEMM: ``out`` (any row stride, e.g. a column range of a wider
    buffer) after a shape check, or a new [rows, n] tensor."""
    if out is None:
        return torch.empty(rows, n, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != (rows, n) or out.dtype != like.dtype:
        raise ValueError(f"gmm_rows: out is {tuple(out.shape)} {out.dtype}, expected ({rows}, {n}) {like.dtype}")
    return out


def gmm_rows(x: torch.Tensor, w, off: torch.Tensor, trans_w: bool = False,
             x_rows: Optional[torch.Tensor] = None, y_rows: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped GEMM over row segments: ``y[rows_g] = x[rows_g] @ w[g]`` (``w[g]^T`` if trans_w).

    ``w``: a [G, K, N] tensor, or a tuple of up to three stacked along K (``[w1; w2; w3]``, each
    read where it lies: x's first columns meet w1, the next w2...), so a weight assembled from
    parameters and small extras needs no concatenated copy.
    ``x_rows``: row m reads ``x[x_rows[m]]`` (a gather in the load); ``y_rows``, a permutation:
    row m is written to ``y[y_rows[m]]`` (a scatter in the store). ``out``: write into this
    buffer (e.g. a column range of a wider one) and return it."""
    ws = weight_parts(w, x.shape[1], trans_w)
    if x_rows is not None:
        x = x.index_select(0, x_rows)
    n_out = ws[0].shape[1] if trans_w else ws[0].shape[2]
    direct = out is not None and y_rows is None
    y = out_rows(out, x.shape[0], n_out, x).zero_() if direct else x.new_zeros(x.shape[0], n_out)
    for g, s, e in _segments(off):
        if e > s:
            # one product per group (one rounding, as the kernel's float32 accumulator); the
            # group's parts are stacked per group only
            wg = [wi[g].t() if trans_w else wi[g] for wi in ws]
            y[s:e] = x[s:e] @ (wg[0] if len(wg) == 1 else torch.cat(wg))
    if y_rows is None:
        return y
    return out_rows(out, y.shape[0], n_out, x).index_copy_(0, y_rows, y)


def gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, off: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per-group weight gradient ``dw[g] = x[rows_g]^T @ dy[rows_g]``, accumulated in float32
    (float64 stays) and stored as ``dtype`` (default: the accumulation dtype); a bf16 parameter's
    gradient is then written once, without a float32 buffer of its size."""
    acc = torch.promote_types(x.dtype, torch.float32)
    G = off.numel() - 1
    dw = torch.zeros(G, x.shape[1], dy.shape[1], dtype=dtype or acc, device=x.device)
    for g, s, e in _segments(off):
        if e > s:
            dw[g] = x[s:e].to(acc).t() @ dy[s:e].to(acc)
    return dw


def dequant_int4(qt: dict, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of slot-stacked packed INT4 factors (``int4.quantize`` of an
    ``(E, rows, r)`` tensor) as ``dtype``: what serving from the stored form computes with."""
    return int4.dequantize(qt, rows, dtype)


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """INT4 quantize-dequantize of slot-stacked factors ``(E, rows, r)``: the values the packed
    form decodes to (one scale and zero point per (slot, rank column); ``int4.py``)."""
    with torch.no_grad():
        return int4.fake_quant(w)


def q_width(K: int, r: int) -> int:
    """Columns of the rank-r block that follows hs in the combine output: the K*r down-projection
    inputs, K combine-weight columns, zero padding to a multiple of 16 (aligned rows for the
    following GEMM)."""
    return -(-(K * r + K) // 16) * 16


def _block_mask(jloc: torch.Tensor, j: int, K: int, r: int, width: int) -> torch.Tensor:
    """[P, width] mask of block jloc[:, j] (columns j*r .. j*r+r-1)."""
    blk = torch.arange(width, device=jloc.device) // r
    return blk.unsqueeze(0) == jloc[:, j:j + 1].long()


def cat_factors(t: torch.Tensor, K: int) -> torch.Tensor:
    """[E, n, r] slot-stacked factors -> [G, n, K*r], block j = the group's expert j."""
    E, n, r = t.shape
    return t.view(E // K, K, n, r).permute(0, 2, 1, 3).reshape(E // K, n, K * r)


def _act_combine(z, a, jloc, w, b1, bias1, a2, off, K: int, r: int, act: str,
                 z3=None, a3=None, b3=None, bias3=None):
    """(hs, q) of ``act_combine_fwd`` in float32 (float64 stays), differentiable."""
    P, f = z.shape
    KR = K * r
    gated = z3 is not None
    dt = torch.promote_types(z.dtype, torch.float32)
    # the factors enter the kernels' matrix products in z's dtype
    cat = lambda t: cat_factors(t.to(z.dtype).to(dt), K)  # noqa: E731
    b1cat, a2cat = cat(b1), cat(a2)
    # (z, a, B cat, bias) of each stream: the activation's input, and the gated experts' up value
    streams = [(z.to(dt), a.to(dt), b1cat, bias1)]
    if gated:
        streams.append((z3.to(dt), a3.to(dt), cat(b3), bias3))
    hs_parts, q_parts = [], []
    for g, s, e in _segments(off):
        jl, wg = jloc[s:e].long(), w[s:e].to(dt)
        hs_g = torch.zeros(e - s, f, dtype=dt, device=z.device)
        q_low = torch.zeros(e - s, KR, dtype=dt, device=z.device)
        for j in range(jl.shape[1]):
            m = _block_mask(jl, j, K, r, KR)
            pres = []
            for zs, as_, bcat, bias in streams:
                pre = zs[s:e] + torch.where(m, as_[s:e], torch.zeros_like(as_[s:e])) @ bcat[g].t()
                if bias is not None:
                    pre = pre + bias.to(dt)[g * K + jl[:, j]]
                pres.append(pre)
            h = act_ref(pres[0], act) * pres[1] if gated else act_ref(pres[0], act)
            hw = h * wg[:, j:j + 1]
            hs_g = hs_g + hw
            qj = hw @ a2cat[g]
            q_low = q_low + torch.where(m, qj, torch.zeros_like(qj))
        q_w = torch.zeros(e - s, K, dtype=dt, device=z.device).scatter(1, jl, wg)
        hs_parts.append(hs_g)
        q_parts.append(torch.cat([q_low, q_w], dim=1))
    hs = torch.cat(hs_parts) if hs_parts else z.new_zeros(0, f, dtype=dt)
    q = torch.cat(q_parts) if q_parts else z.new_zeros(0, KR + K, dtype=dt)
    return hs, q


def act_combine_fwd(z, a, jloc, w, b1, bias1: Optional[torch.Tensor], a2, off, K: int, r: int, act: str,
                    out: torch.Tensor, z3=None, a3=None, b3=None, bias3=None) -> torch.Tensor:
    """The up projection's per-expert part and the combine, for rows sorted by group.

    ``z`` [P, f] is the base GEMM's output and ``a`` [P, K*r] = x @ A1cat[g] (in practice both are
    column ranges of one GEMM output); ``b1``, ``a2`` [E, f, r] and ``bias1`` [E, f] are slot-stacked
    (slot g*K + j is expert j of group g). For each chosen expert j of a row:
        h_j = act(z + mask_j(a) @ B1cat[g]^T + bias1[slot]),   hw_j = w_j * h_j
    Gated experts pass the up projection's stream too (``z3``, ``a3``, ``b3``, ``bias3``, shaped
    like z, a, b1, bias1; ``bias3`` given iff ``bias1`` is):
        h_j = act(z + mask_j(a) @ B1cat[g]^T + bias1[slot]) * (z3 + mask_j(a3) @ B3cat[g]^T + bias3[slot])
    Writes ``out`` [P, f + q_width(K, r)] (its dtype) and returns it:
    ``out[:, :f] = hs = sum_j hw_j``; ``out[:, f:f+K*r] = sum_j mask_j(hw_j @ A2cat[g])`` (the down
    projection's rank-r inputs); ``out[:, f+K*r+e]`` = the weight of the row's expert e, 0 if not
    chosen (so ``@ bias2`` adds sum_j w_j bias2[slot_j]); zeros after that.
    """
    f = z.shape[1]
    hs, q = _act_combine(z, a, jloc, w, b1, bias1, a2, off, K, r, act, z3, a3, b3, bias3)
    out[:, :f] = hs
    out[:, f:f + q.shape[1]] = q
    out[:, f + q.shape[1]:] = 0
    return out


def act_combine_bwd(z, a, jloc, w, b1, bias1, a2, dhs, dq, off, K: int, r: int, act: str,
                    dzda: torch.Tensor, z3=None, a3=None, b3=None, bias3=None):
    """Gradients of ``act_combine_fwd`` for the output gradients ``dhs`` [P, f] and ``dq``
    [P, >= K*r + K] (the rank-r and weight columns; the padding's gradient is ignored).

    Writes ``dzda[:, :f] = dz`` and ``dzda[:, f:f+K*r] = da`` (dzda's dtype) and returns
    (dw [P, k], db1 [E, f, r], dbias1 [E, f] or None, da2 [E, f, r]) in float32 (float64 stays).
    ``dzda`` may be the buffer ``dhs`` and ``dq`` are views of (``[dhs | dq]``): it is written in
    place, after every read of it (non-gated only: the gated layout is wider).
    Gated (``z3`` given): ``dzda`` [P, 2f + 2K*r] gets ``[dz | dz3 | da | da3]`` (the column layout
    of the up GEMM's output) and (db3, dbias3 or None) follow the four gradients above.
    """
    dt = torch.promote_types(z.dtype, torch.float32)
    f, KR = z.shape[1], K * r
    gated = z3 is not None
    leaf = lambda t: t.detach().to(dt).requires_grad_() if t is not None else None  # noqa: E731
    zl, al, wl, b1l, a2l, bias1l = map(leaf, (z, a, w, b1, a2, bias1))
    z3l, a3l, b3l, bias3l = map(leaf, (z3, a3, b3, bias3))
    ins = [t for t in (zl, al, wl, b1l, a2l, bias1l, z3l, a3l, b3l, bias3l) if t is not None]
    with torch.enable_grad():
        hs, q = _act_combine(zl, al, jloc, wl, b1l, bias1l, a2l, off, K, r, act, z3l, a3l, b3l, bias3l)
        grads = torch.autograd.grad((hs, q), ins, (dhs.to(dt), dq[:, :KR + K].to(dt)), allow_unused=True)
    grad = {id(t): torch.zeros_like(t) if g_ is None else g_ for t, g_ in zip(ins, grads)}
    get = lambda t: grad[id(t)] if t is not None else None  # noqa: E731
    nz = 2 if gated else 1     # dzda: the z columns of every stream, then their a columns
    dzda[:, :f] = get(zl)
    dzda[:, nz * f:nz * f + KR] = get(al)
    out = (get(wl), get(b1l), get(bias1l), get(a2l))
    if not gated:
        return out
    dzda[:, f:2 * f] = get(z3l)
    dzda[:, 2 * f + KR:2 * f + 2 * KR] = get(a3l)
    return out + (get(b3l), get(bias3l))
