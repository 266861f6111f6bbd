"""Plain-torch twins of the GPU kernels (``triton_moe.py``): the same functions, same arguments.

They define what each kernel computes, serve as the reference in the kernel tests, and run the
fused expert path where Triton is unavailable (CPU, or a GPU without Triton).

Shared conventions (rows = (token, group) pairs sorted by group):
* ``off`` int32 [G+1]: rows of group g are ``off[g]:off[g+1]``;
* ``jloc`` [P, k]: the chosen experts' positions inside the row's group (0..K-1), ``w`` [P, k]
  their combine weights;
* ``*cat`` tensors hold a group's K rank-r factors side by side: ``[G, n, K*r]``, block j = expert j.
  A row's low-rank term for expert j is ``mask_j(x A_cat) B_cat^T``: the mask keeps block j, so one
  small dense GEMM per group serves all its experts.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


def _block_mask(jloc: torch.Tensor, j: int, K: int, r: int, width: int) -> torch.Tensor:
    """[P, width] mask of block jloc[:, j] (columns j*r .. j*r+r-1)."""
    blk = torch.arange(width, device=jloc.device) // r
    return blk.unsqueeze(0) == jloc[:, j:j + 1].long()


def act_combine_fwd(z, a, jloc, w, b1cat, bias1: Optional[torch.Tensor], a2cat, off, K: int, r: int,
                    act: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The up projection's per-expert part and the combine, for rows sorted by group.

    For each chosen expert j of a row (group g, slot g*K+jloc):
        h_j = act(z + mask_j(a) @ b1cat[g]^T + bias1[slot]),   hw_j = w_j * h_j
    Returns ``hs = sum_j hw_j`` ([P, f], z's dtype) and ``q`` [P, K*r + K] (float32):
    ``q[:, :K*r] = sum_j mask_j(hw_j @ a2cat[g])`` (the down projection's rank-r inputs) and
    ``q[:, K*r + jloc_j] = w_j`` (so ``q @ [b2cat | bias2]^T`` adds sum_j w_j bias2[slot_j]).
    """
    P, f = z.shape
    KR = K * r
    dt = torch.promote_types(z.dtype, torch.float32)
    zf, af = z.to(dt), a.to(dt)
    hs_parts, q_parts = [], []
    for g, s, e in _segments(off):
        jl, wg = jloc[s:e].long(), w[s:e].to(dt)
        hs_g = torch.zeros(e - s, f, dtype=dt, device=z.device)
        q_low = torch.zeros(e - s, KR, dtype=dt, device=z.device)
        for j in range(jl.shape[1]):
            m = _block_mask(jl, j, K, r, KR)
            am = torch.where(m, af[s:e], torch.zeros_like(af[s:e]))
            pre = zf[s:e] + am @ b1cat[g].to(dt).t()
            if bias1 is not None:
                pre = pre + bias1.to(dt)[g * K + jl[:, j]]
            hw = act_ref(pre, act) * wg[:, j:j + 1]
            hs_g = hs_g + hw
            qj = hw @ a2cat[g].to(dt)
            q_low = q_low + torch.where(m, qj, torch.zeros_like(qj))
        q_w = torch.zeros(e - s, K, dtype=dt, device=z.device).scatter(1, jl, wg)
        hs_parts.append(hs_g)
        q_parts.append(torch.cat([q_low, q_w], dim=1))
    hs = torch.cat(hs_parts) if hs_parts else z.new_zeros(0, f, dtype=dt)
    q = torch.cat(q_parts) if q_parts else z.new_zeros(0, KR + K, dtype=dt)
    return hs.to(z.dtype), q


def act_combine_bwd(z, a, jloc, w, b1cat, bias1, a2cat, dhs, dq, off, K: int, r: int, act: str):
    """Gradients of ``act_combine_fwd``'s (hs, q[:, :K*r]) with respect to
    (z, a, w, b1cat, bias1, a2cat), by autograd through the forward above.

    ``dq`` is [P, >= K*r]; only its first K*r columns are used (the weight columns' gradient is
    added to dw by the caller). Returns (dz, da, dw, db1cat, dbias1 or None, da2cat) in float32
    (float64 stays float64).
    """
    dt = torch.promote_types(z.dtype, torch.float32)
    KR = K * r
    leaves = [t.detach().to(dt).requires_grad_() for t in (z, a, w, b1cat, a2cat)]
    bias_leaf = bias1.detach().to(dt).requires_grad_() if bias1 is not None else None
    zl, al, wl, b1l, a2l = leaves
    with torch.enable_grad():
        hs, q = act_combine_fwd(zl, al, jloc, wl, b1l, bias_leaf, a2l, off, K, r, act)
        ins = leaves + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad((hs, q[:, :KR]), ins, (dhs.to(dt), dq[:, :KR].to(dt)), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins)]
    dz, da, dw, db1, da2 = grads[:5]
    dbias = grads[5] if bias_leaf is not None else None
    return dz, da, dw, db1, dbias, da2
