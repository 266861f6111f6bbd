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
  dense product per group serves all its experts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def act_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "relu":
        return F.relu(x)
    if act == "silu":
        return F.silu(x)
    raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {act!r}")


def _segments(off: torch.Tensor):
    bounds = off.tolist()
    return [(g, bounds[g], bounds[g + 1]) for g in range(len(bounds) - 1)]


def gmm_rows(x: torch.Tensor, w: torch.Tensor, off: torch.Tensor, trans_w: bool = False) -> torch.Tensor:
    """Grouped GEMM over row segments: ``y[rows_g] = x[rows_g] @ w[g]`` (``w[g]^T`` if trans_w)."""
    n_out = w.shape[1] if trans_w else w.shape[2]
    y = x.new_zeros(x.shape[0], n_out)
    for g, s, e in _segments(off):
        if e > s:
            wg = w[g].t() if trans_w else w[g]
            y[s:e] = x[s:e] @ wg
    return y


def gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Per-group weight gradient ``dw[g] = x[rows_g]^T @ dy[rows_g]``, float32 (float64 stays)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    G = off.numel() - 1
    dw = torch.zeros(G, x.shape[1], dy.shape[1], dtype=dt, device=x.device)
    for g, s, e in _segments(off):
        if e > s:
            dw[g] = x[s:e].to(dt).t() @ dy[s:e].to(dt)
    return dw


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


def _act_combine(z, a, jloc, w, b1, bias1, a2, off, K: int, r: int, act: str):
    """(hs, q) of ``act_combine_fwd`` in float32 (float64 stays), differentiable."""
    P, f = z.shape
    KR = K * r
    dt = torch.promote_types(z.dtype, torch.float32)
    zf, af = z.to(dt), a.to(dt)
    # the factors enter the kernels' matrix products in z's dtype
    b1cat, a2cat = (cat_factors(t.to(z.dtype).to(dt), K) for t in (b1, a2))
    hs_parts, q_parts = [], []
    for g, s, e in _segments(off):
        jl, wg = jloc[s:e].long(), w[s:e].to(dt)
        hs_g = torch.zeros(e - s, f, dtype=dt, device=z.device)
        q_low = torch.zeros(e - s, KR, dtype=dt, device=z.device)
        for j in range(jl.shape[1]):
            m = _block_mask(jl, j, K, r, KR)
            am = torch.where(m, af[s:e], torch.zeros_like(af[s:e]))
            pre = zf[s:e] + am @ b1cat[g].t()
            if bias1 is not None:
                pre = pre + bias1.to(dt)[g * K + jl[:, j]]
            hw = act_ref(pre, act) * wg[:, j:j + 1]
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
                    out: torch.Tensor) -> torch.Tensor:
    """The up projection's per-expert part and the combine, for rows sorted by group.

    ``z`` [P, f] is the base GEMM's output and ``a`` [P, K*r] = x @ A1cat[g] (in practice both are
    column ranges of one GEMM output); ``b1``, ``a2`` [E, f, r] and ``bias1`` [E, f] are slot-stacked
    (slot g*K + j is expert j of group g). For each chosen expert j of a row:
        h_j = act(z + mask_j(a) @ B1cat[g]^T + bias1[slot]),   hw_j = w_j * h_j
    Writes ``out`` [P, f + q_width(K, r)] (its dtype) and returns it:
    ``out[:, :f] = hs = sum_j hw_j``; ``out[:, f:f+K*r] = sum_j mask_j(hw_j @ A2cat[g])`` (the down
    projection's rank-r inputs); ``out[:, f+K*r+e]`` = the weight of the row's expert e, 0 if not
    chosen (so ``@ bias2`` adds sum_j w_j bias2[slot_j]); zeros after that.
    """
    f = z.shape[1]
    hs, q = _act_combine(z, a, jloc, w, b1, bias1, a2, off, K, r, act)
    out[:, :f] = hs
    out[:, f:f + q.shape[1]] = q
    out[:, f + q.shape[1]:] = 0
    return out


def act_combine_bwd(z, a, jloc, w, b1, bias1, a2, dhs, dq, off, K: int, r: int, act: str,
                    dzda: torch.Tensor):
    """Gradients of ``act_combine_fwd`` for the output gradients ``dhs`` [P, f] and ``dq``
    [P, >= K*r + K] (the rank-r and weight columns; the padding's gradient is ignored).

    Writes ``dzda[:, :f] = dz`` and ``dzda[:, f:f+K*r] = da`` (dzda's dtype) and returns
    (dw [P, k], db1 [E, f, r], dbias1 [E, f] or None, da2 [E, f, r]) in float32 (float64 stays).
    ``dzda`` may be the buffer ``dhs`` and ``dq`` are views of (``[dhs | dq]``): it is written in
    place, after every read of it.
    """
    dt = torch.promote_types(z.dtype, torch.float32)
    f, KR = z.shape[1], K * r
    leaves = [t.detach().to(dt).requires_grad_() for t in (z, a, w, b1, a2)]
    bias_leaf = bias1.detach().to(dt).requires_grad_() if bias1 is not None else None
    zl, al, wl, b1l, a2l = leaves
    with torch.enable_grad():
        hs, q = _act_combine(zl, al, jloc, wl, b1l, bias_leaf, a2l, off, K, r, act)
        ins = leaves + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad((hs, q), ins, (dhs.to(dt), dq[:, :KR + K].to(dt)), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins)]
    dz, da, dw, db1, da2 = grads[:5]
    dzda[:, :f] = dz
    dzda[:, f:f + KR] = da
    dbias = grads[5] if bias_leaf is not None else None
    return dw, db1, dbias, da2
