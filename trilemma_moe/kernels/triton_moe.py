"""Triton kernels of the clustered-expert layer (GPU fast path). Each has a plain-torch twin of the
same name and arguments in ``reference.py``; see there for the conventions.

* ``gmm_rows`` / ``gmm_wgrad``: grouped GEMMs over rows sorted by group (the group base GEMMs and
  their gradients). Ordinary tiled GEMMs, one tile schedule over all groups in one launch, so they
  need neither ``torch._grouped_mm`` (a per-expert loop on A100) nor a host sync for group sizes.
* ``act_combine_fwd``: the rank-r part of the up projection of the k chosen experts, the
  activation and the ``sum_j w_j h_j`` combine, fused: z (the base GEMM's output) is read once and
  only hs and the down projection's rank-r inputs are written; h_j never reaches memory.
* ``act_combine_bwd``: its backward, recomputing h_j from z, in two kernels without atomics: one
  walks f for each row tile (dz, and da, dw reduced over f), one walks the rows of a group for each
  column chunk (the factor and bias gradients, reduced over rows).
* Gated experts (``act(..) * up``) are a ``GATED`` constexpr branch of the same three kernels:
  the up stream (z3, a3, B3, bias3) is read alongside and its gradients written alongside.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from .reference import ACT_CODES


@triton.jit
def _group_tile(off_ptr, pid, G: tl.constexpr, BM: tl.constexpr):
    """Tile ``pid`` of the concatenated per-group row tiles -> (group, first row, end row).

    Beyond the last tile: group 0 with an empty row range (every load and store masked)."""
    # int32 from the start: a loop-carried variable may not change type
    tile0 = tl.full((), 0, tl.int32)
    g_sel = tl.full((), 0, tl.int32)
    r0 = tl.full((), 0, tl.int32)
    r1 = tl.full((), 0, tl.int32)
    for g in range(G):
        s = tl.load(off_ptr + g)
        e = tl.load(off_ptr + g + 1)
        nt = (e - s + BM - 1) // BM
        hit = (pid >= tile0) & (pid < tile0 + nt)
        g_sel = tl.where(hit, g, g_sel)
        r0 = tl.where(hit, s + (pid - tile0) * BM, r0)
        r1 = tl.where(hit, e, r1)
        tile0 += nt
    return g_sel, r0, r1


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 1:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 2:
        return tl.maximum(x, 0.0)
    elif ACT == 3:
        return x * tl.sigmoid(x)
    else:
        return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 1:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif ACT == 2:
        return tl.where(x > 0, 1.0, 0.0)
    elif ACT == 3:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return tl.zeros_like(x) + 1.0


# --- grouped GEMMs -----------------------------------------------------------------------------
@triton.jit
def _row_index(idx_ptr, rows, mask, HAS_IDX: tl.constexpr):
    """Rows of the tensor behind a sorted-row position: idx[rows] (a gather/scatter), or rows."""
    if HAS_IDX:
        return tl.load(idx_ptr + rows, mask=mask, other=0)
    else:
        return rows


@triton.jit
def _k_phase(acc, x_ptr, xr, mmask, kx0, KD, sxm, sxk, w_ptr, swk, swn, rn, nmask,
             IEEE: tl.constexpr, BK: tl.constexpr):
    """acc += x[xr, kx0:kx0+KD] @ w[:KD, rn] (w already at its group)."""
    rk = tl.arange(0, BK)
    for k0 in range(0, KD, BK):
        kmask = (k0 + rk) < KD
        xt = tl.load(x_ptr + xr[:, None] * sxm + (kx0 + k0 + rk)[None, :] * sxk,
                     mask=mmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + (k0 + rk)[:, None] * swk + rn[None, :] * swn, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += _mm(xt, wt, IEEE)
    return acc


@triton.jit
def _gmm_rows_kernel(x_ptr, w_ptr, w2_ptr, w3_ptr, y_ptr, off_ptr, xi_ptr, yi_ptr, N, KD, KD2, KD3, sxm, sxk,
                     swg, swk, swn, sw2g, sw2k, sw2n, sw3g, sw3k, sw3n, sym, syn,
                     G: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     X_IDX: tl.constexpr, Y_IDX: tl.constexpr, PARTS: tl.constexpr):
    """y[yi[m]] = x[xi[m]] @ [w; w2; w3][g(m)] for the sorted rows m (xi, yi: optional row indices).

    The weight is up to three tensors stacked along K, each read where it lies: x's first KD
    columns meet w, the next KD2 w2, the next KD3 w3 (one loop each, each with its own strides,
    so every loop keeps the launcher's stride specialisations and its software pipeline)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g, r0, r1 = _group_tile(off_ptr, pid_m, G, BM)
    rm = r0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < r1
    nmask = rn < N
    xr = _row_index(xi_ptr, rm, mmask, X_IDX)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _k_phase(acc, x_ptr, xr, mmask, 0, KD, sxm, sxk, w_ptr + g * swg, swk, swn, rn, nmask, IEEE, BK)
    if PARTS >= 2:
        acc = _k_phase(acc, x_ptr, xr, mmask, KD, KD2, sxm, sxk, w2_ptr + g * sw2g, sw2k, sw2n, rn, nmask, IEEE, BK)
    if PARTS >= 3:
        acc = _k_phase(acc, x_ptr, xr, mmask, KD + KD2, KD3, sxm, sxk, w3_ptr + g * sw3g, sw3k, sw3n, rn, nmask,
                       IEEE, BK)
    yr = _row_index(yi_ptr, rm, mmask, Y_IDX)
    tl.store(y_ptr + yr[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gmm_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, off_ptr, M, N, sxr, sxm, sdr, sdn, swg, swm, swn,
                      G: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dw[g] (M x N) = x[rows_g]^T (M x rows) @ dy[rows_g] (rows x N). (No row gathers here: an index
    load in the reduction loop costs the software pipeline its stages, per ptxas/Triton's own counts.)"""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    s = tl.load(off_ptr + g)
    e = tl.load(off_ptr + g + 1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(s, e, BK):
        kmask = (k0 + rk) < e
        xt = tl.load(x_ptr + (k0 + rk)[None, :] * sxr + rm[:, None] * sxm, mask=kmask[None, :] & mmask[:, None], other=0.0)
        dt = tl.load(dy_ptr + (k0 + rk)[:, None] * sdr + rn[None, :] * sdn, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += _mm(xt, dt, IEEE)
    tl.store(dw_ptr + g * swg + rm[:, None] * swm + rn[None, :] * swn, acc.to(dw_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# Fixed tilings, not autotuning: every distinct shape would otherwise compile and time each
# candidate at its first call (minutes over a model's shapes). Triton's interpreter (CPU tests)
# gets small tiles.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(dtype: torch.dtype, n: int) -> dict:
    if _INTERPRETED:
        return dict(BM=32, BN=32, BK=16)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=2)
    return dict(BM=128, BN=128 if n >= 128 else 64, BK=64, num_warps=8, num_stages=3)


def _check(off: torch.Tensor, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device != off.device:
            raise ValueError(f"all kernel inputs must be on {off.device}, got a tensor on {t.device}")


def gmm_rows(x: torch.Tensor, w, off: torch.Tensor, trans_w: bool = False,
             x_rows: Optional[torch.Tensor] = None, y_rows: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    G = off.numel() - 1
    ws = reference.weight_parts(w, x.shape[1], trans_w)
    if len(ws) > 3:
        raise ValueError(f"gmm_rows takes at most 3 weight parts stacked along K, got {len(ws)}")
    P = x_rows.numel() if x_rows is not None else x.shape[0]
    N = ws[0].shape[1] if trans_w else ws[0].shape[2]
    _check(off, x, *ws, x_rows, y_rows, out)
    y = reference.out_rows(out, P, N, x)
    # per part: (K extent, group stride, K stride, N stride); absent parts repeat the first (never read)
    parts = [(wi.shape[2] if trans_w else wi.shape[1], wi.stride(0),
              wi.stride(2) if trans_w else wi.stride(1), wi.stride(1) if trans_w else wi.stride(2)) for wi in ws]
    parts += [parts[0]] * (3 - len(parts))
    wp = list(ws) + [ws[0]] * (3 - len(ws))
    t = _tiles(x.dtype, N)
    grid = (triton.cdiv(P, t["BM"]) + G, triton.cdiv(N, t["BN"]))
    _gmm_rows_kernel[grid](x, wp[0], wp[1], wp[2], y, off, x_rows if x_rows is not None else off,
                           y_rows if y_rows is not None else off, N, parts[0][0], parts[1][0], parts[2][0],
                           x.stride(0), x.stride(1), *parts[0][1:], *parts[1][1:], *parts[2][1:], y.stride(0), y.stride(1),
                           G=G, IEEE=x.dtype == torch.float32, X_IDX=x_rows is not None, Y_IDX=y_rows is not None,
                           PARTS=len(ws), **t)
    return y


def gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, off: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    G = off.numel() - 1
    M, N = x.shape[1], dy.shape[1]
    _check(off, x, dy)
    dw = torch.empty(G, M, N, dtype=dtype or torch.float32, device=x.device)
    t = _tiles(x.dtype, N)
    grid = (triton.cdiv(M, t["BM"]), triton.cdiv(N, t["BN"]), G)
    _gmm_wgrad_kernel[grid](x, dy, dw, off, M, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                            dw.stride(0), dw.stride(1), dw.stride(2), G=G, IEEE=x.dtype == torch.float32, **t)
    return dw


# --- fused rank-r up projection + activation + combine ------------------------------------------
# No atomics: a reduction over f (q, da, dw) is done by one program that walks all of f for its
# rows; a reduction over rows (the factor and bias gradients) by one program that walks all rows
# of its group for its columns. (A first version tiled rows x columns and reduced with float32
# atomics: 5 ms of an 8 ms layer on an H100, all of it atomic traffic.)
# The factors are read from (and their gradients written to) the slot-stacked parameters
# [E, f, r] directly, cast to z's dtype on load: no per-step [G, f, K*r] copies.
@triton.jit
def _factor_tile(ptr, g, cols, kk, cmask, kmask, sfe, sff, like_ptr, K: tl.constexpr, R: tl.constexpr):
    """[BN, KRP] tile of a factor's cat view, e.g. B1cat[g] (columns kk = the group's K rank-r blocks
    side by side), read from the slot-stacked [E, f, r] parameter in like_ptr's dtype."""
    offs = (g * K + kk // R)[None, :] * sfe + cols[:, None] * sff + (kk % R)[None, :]
    return tl.load(ptr + offs, mask=cmask[:, None] & kmask[None, :], other=0.0).to(like_ptr.dtype.element_ty)


@triton.jit
def _chosen(j_ptr, w_ptr, rows, rmask, sjm, swm, j, blk):
    """Expert position e, weight w and the block mask of choice j of each row."""
    e = tl.load(j_ptr + rows * sjm + j, mask=rmask, other=0)
    wj = tl.load(w_ptr + rows * swm + j, mask=rmask, other=0.0).to(tl.float32)
    sel = blk[None, :] == e[:, None]
    return e, wj, sel


@triton.jit
def _pre(z, a, sel, b1, bias_ptr, g, e, cols, tile_mask, F, K: tl.constexpr, HAS_BIAS: tl.constexpr,
         IEEE: tl.constexpr):
    """One stream's value for choice j: z + mask_j(a) B^T + bias[slot] (the activation's input, or
    the gated experts' up value), and the masked a."""
    am = tl.where(sel, a, 0.0).to(b1.dtype)
    pre = z + _mm(am, tl.trans(b1), IEEE)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + (g * K + e)[:, None] * F + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    return pre, am


@triton.jit
def _h_grads(pre, up, gh, wj, tile_mask, ACT: tl.constexpr, GATED: tl.constexpr):
    """h_j (unweighted: act(pre), GATED: act(pre) * up) and, for gh = d loss / d hw_j, the
    gradients of pre and (GATED) of up, 0 outside the tile."""
    s = _act(pre, ACT)
    dh = gh * wj[:, None]
    if GATED:
        h = s * up
        dpre = tl.where(tile_mask, dh * up * _act_grad(pre, ACT), 0.0)
        dup = tl.where(tile_mask, dh * s, 0.0)
    else:
        h = s
        dpre = tl.where(tile_mask, dh * _act_grad(pre, ACT), 0.0)
        dup = dpre    # not used
    return h, dpre, dup


# GATED: the up projection's stream (z3, a3, b3, bias3; pointers laid out like z, a, b1, bias)
# rides along the activation input's: h_j = act(pre) * up. Without GATED its pointers are dummies.
@triton.jit
def _act_combine_fwd_kernel(z_ptr, a_ptr, j_ptr, w_ptr, b1_ptr, bias_ptr, a2_ptr, out_ptr, off_ptr,
                            z3_ptr, a3_ptr, b3_ptr, bias3_ptr,
                            F, KR, QW, szm, sam, sjm, swm, sfe, sff, som,
                            G: tl.constexpr, K: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr,
                            KRP: tl.constexpr, WP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr):
    g, r0, r1 = _group_tile(off_ptr, tl.program_id(0), G, BM)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    kk = tl.arange(0, KRP)
    kmask = kk < KR
    blk = kk // R
    a = tl.load(a_ptr + rows[:, None] * sam + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    if GATED:
        a3 = tl.load(a3_ptr + rows[:, None] * sam + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    q = tl.zeros((BM, KRP), dtype=tl.float32)
    for f0 in range(0, F, BN):
        cols = f0 + tl.arange(0, BN)
        cmask = cols < F
        tile_mask = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        b1 = _factor_tile(b1_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
        a2 = _factor_tile(a2_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
        if GATED:
            z3 = tl.load(z3_ptr + rows[:, None] * szm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            b3 = _factor_tile(b3_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
        hs = tl.zeros((BM, BN), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e, wj, sel = _chosen(j_ptr, w_ptr, rows, rmask, sjm, swm, j, blk)
            pre, am = _pre(z, a, sel, b1, bias_ptr, g, e, cols, tile_mask, F, K, HAS_BIAS, IEEE)
            h = _act(pre, ACT)
            if GATED:
                up, am3 = _pre(z3, a3, sel, b3, bias3_ptr, g, e, cols, tile_mask, F, K, HAS_BIAS, IEEE)
                h = h * up
            hw = h * wj[:, None]
            hs += hw
            q += tl.where(sel, _mm(hw.to(a2.dtype), a2, IEEE), 0.0)   # chosen experts' blocks are disjoint
        tl.store(out_ptr + rows[:, None] * som + cols[None, :], hs.to(out_ptr.dtype.element_ty), mask=tile_mask)
    q_ptr = out_ptr + F
    tl.store(q_ptr + rows[:, None] * som + kk[None, :], q.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & kmask[None, :])
    # the weight columns (w of the chosen experts, 0 elsewhere) and the zero padding after them
    wc = tl.arange(0, WP)
    wts = tl.zeros((BM, WP), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e, wj, sel = _chosen(j_ptr, w_ptr, rows, rmask, sjm, swm, j, blk)
        wts += tl.where(wc[None, :] == e[:, None], wj[:, None], 0.0)
    tl.store(q_ptr + rows[:, None] * som + KR + wc[None, :], wts.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (wc[None, :] < QW - KR))


@triton.jit
def _act_combine_bwd_rows_kernel(z_ptr, a_ptr, j_ptr, w_ptr, b1_ptr, bias_ptr, a2_ptr, dhs_ptr, dq_ptr, off_ptr,
                                 dz_ptr, da_ptr, dw_ptr, z3_ptr, a3_ptr, b3_ptr, bias3_ptr, dz3_ptr, da3_ptr,
                                 F, KR, szm, sam, sjm, swm, sfe, sff, sdhm, sdqm, sdzm, sdam, sdwm,
                                 G: tl.constexpr, K: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr,
                                 TP: tl.constexpr, KRP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr):
    """Per row: dz (over f, stored chunk by chunk), da and dw (reduced over f in registers); GATED:
    dz3 and da3 likewise."""
    g, r0, r1 = _group_tile(off_ptr, tl.program_id(0), G, BM)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    kk = tl.arange(0, KRP)
    kmask = kk < KR
    blk = kk // R
    tcol = tl.arange(0, TP)
    rk_mask = rmask[:, None] & kmask[None, :]
    a = tl.load(a_ptr + rows[:, None] * sam + kk[None, :], mask=rk_mask, other=0.0)
    dq = tl.load(dq_ptr + rows[:, None] * sdqm + kk[None, :], mask=rk_mask, other=0.0)
    da = tl.zeros((BM, KRP), dtype=tl.float32)
    if GATED:
        a3 = tl.load(a3_ptr + rows[:, None] * sam + kk[None, :], mask=rk_mask, other=0.0)
        da3 = tl.zeros((BM, KRP), dtype=tl.float32)
    dw = tl.zeros((BM, TP), dtype=tl.float32)
    for j in tl.static_range(TOPK):    # the weight columns of q: d q[:, KR + e_j] / d w_j = 1
        e, wj, sel = _chosen(j_ptr, w_ptr, rows, rmask, sjm, swm, j, blk)
        dqw = tl.load(dq_ptr + rows * sdqm + KR + e, mask=rmask, other=0.0).to(tl.float32)
        dw += tl.where(tcol[None, :] == j, dqw[:, None], 0.0)
    for f0 in range(0, F, BN):
        cols = f0 + tl.arange(0, BN)
        cmask = cols < F
        tile_mask = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dhs = tl.load(dhs_ptr + rows[:, None] * sdhm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        b1 = _factor_tile(b1_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
        a2 = _factor_tile(a2_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
        dz = tl.zeros((BM, BN), dtype=tl.float32)
        if GATED:
            z3 = tl.load(z3_ptr + rows[:, None] * szm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            b3 = _factor_tile(b3_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
            dz3 = tl.zeros((BM, BN), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e, wj, sel = _chosen(j_ptr, w_ptr, rows, rmask, sjm, swm, j, blk)
            pre, am = _pre(z, a, sel, b1, bias_ptr, g, e, cols, tile_mask, F, K, HAS_BIAS, IEEE)
            up = pre    # a placeholder unless GATED
            if GATED:
                up, am3 = _pre(z3, a3, sel, b3, bias3_ptr, g, e, cols, tile_mask, F, K, HAS_BIAS, IEEE)
            dqm = tl.where(sel, dq, 0.0).to(b1.dtype)
            gh = dhs + _mm(dqm, tl.trans(a2), IEEE)              # d loss / d hw_j
            h, dpre, dup = _h_grads(pre, up, gh, wj, tile_mask, ACT, GATED)
            dw += tl.where(tcol[None, :] == j, tl.sum(h * gh, axis=1)[:, None], 0.0)
            dz += dpre
            da += tl.where(sel, _mm(dpre.to(b1.dtype), b1, IEEE), 0.0)
            if GATED:
                dz3 += dup
                da3 += tl.where(sel, _mm(dup.to(b3.dtype), b3, IEEE), 0.0)
        tl.store(dz_ptr + rows[:, None] * sdzm + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
        if GATED:
            tl.store(dz3_ptr + rows[:, None] * sdzm + cols[None, :], dz3.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(da_ptr + rows[:, None] * sdam + kk[None, :], da.to(da_ptr.dtype.element_ty), mask=rk_mask)
    if GATED:
        tl.store(da3_ptr + rows[:, None] * sdam + kk[None, :], da3.to(da_ptr.dtype.element_ty), mask=rk_mask)
    tl.store(dw_ptr + rows[:, None] * sdwm + tcol[None, :], dw, mask=rmask[:, None] & (tcol[None, :] < TOPK))


@triton.jit
def _act_combine_bwd_cols_kernel(z_ptr, a_ptr, j_ptr, w_ptr, b1_ptr, bias_ptr, a2_ptr, dhs_ptr, dq_ptr, off_ptr,
                                 db1_ptr, dbias_ptr, da2_ptr, z3_ptr, a3_ptr, b3_ptr, bias3_ptr, db3_ptr, dbias3_ptr,
                                 F, KR, szm, sam, sjm, swm, sfe, sff, sdhm, sdqm,
                                 K: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                                 KRP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr):
    """Per (column chunk, group): the factor and bias gradients, reduced over the group's rows in
    registers and written slot-stacked ([E, f, r] and [E, f], float32); GATED: db3 and dbias3 too."""
    g = tl.program_id(1)
    s = tl.load(off_ptr + g)
    t = tl.load(off_ptr + g + 1)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < F
    kk = tl.arange(0, KRP)
    kmask = kk < KR
    blk = kk // R
    kx = tl.arange(0, KP)
    b1 = _factor_tile(b1_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
    a2 = _factor_tile(a2_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
    db1 = tl.zeros((BN, KRP), dtype=tl.float32)
    da2 = tl.zeros((BN, KRP), dtype=tl.float32)
    dbias = tl.zeros((KP, BN), dtype=tl.float32)
    if GATED:
        b3 = _factor_tile(b3_ptr, g, cols, kk, cmask, kmask, sfe, sff, z_ptr, K, R)
        db3 = tl.zeros((BN, KRP), dtype=tl.float32)
        dbias3 = tl.zeros((KP, BN), dtype=tl.float32)
    for r0 in range(s, t, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < t
        tile_mask = rmask[:, None] & cmask[None, :]
        rk_mask = rmask[:, None] & kmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dhs = tl.load(dhs_ptr + rows[:, None] * sdhm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + rows[:, None] * sam + kk[None, :], mask=rk_mask, other=0.0)
        dq = tl.load(dq_ptr + rows[:, None] * sdqm + kk[None, :], mask=rk_mask, other=0.0)
        if GATED:
            z3 = tl.load(z3_ptr + rows[:, None] * szm + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            a3 = tl.load(a3_ptr + rows[:, None] * sam + kk[None, :], mask=rk_mask, other=0.0)
        for j in tl.static_range(TOPK):
            e, wj, sel = _chosen(j_ptr, w_ptr, rows, rmask, sjm, swm, j, blk)
            pre, am = _pre(z, a, sel, b1, bias_ptr, g, e, cols, tile_mask, F, K, HAS_BIAS, IEEE)
            up = pre    # a placeholder unless GATED
            if GATED:
                up, am3 = _pre(z3, a3, sel, b3, bias3_ptr, g, e, cols, tile_mask, F, K, HAS_BIAS, IEEE)
            dqm = tl.where(sel, dq, 0.0).to(b1.dtype)
            gh = dhs + _mm(dqm, tl.trans(a2), IEEE)
            h, dpre, dup = _h_grads(pre, up, gh, wj, tile_mask, ACT, GATED)
            da2 += _mm(tl.trans((h * wj[:, None]).to(b1.dtype)), dqm, IEEE)
            dpre = dpre.to(b1.dtype)
            db1 += _mm(tl.trans(dpre), am, IEEE)
            if GATED:
                dup = dup.to(b1.dtype)
                db3 += _mm(tl.trans(dup), am3, IEEE)
            if HAS_BIAS:
                onehot = tl.where((kx[None, :] == e[:, None]) & rmask[:, None], 1.0, 0.0).to(b1.dtype)
                dbias += _mm(tl.trans(onehot), dpre, IEEE)
                if GATED:
                    dbias3 += _mm(tl.trans(onehot), dup, IEEE)
    offs = (g * K + blk)[None, :] * (F * R) + cols[:, None] * R + (kk % R)[None, :]
    fac_mask = cmask[:, None] & kmask[None, :]
    tl.store(db1_ptr + offs, db1, mask=fac_mask)
    tl.store(da2_ptr + offs, da2, mask=fac_mask)
    bias_offs = (g * K + kx)[:, None] * F + cols[None, :]
    bias_mask = (kx[:, None] < K) & cmask[None, :]
    if HAS_BIAS:
        tl.store(dbias_ptr + bias_offs, dbias, mask=bias_mask)
    if GATED:
        tl.store(db3_ptr + offs, db3, mask=fac_mask)
        if HAS_BIAS:
            tl.store(dbias3_ptr + bias_offs, dbias3, mask=bias_mask)


# Tiles of the combine kernels: (BM, BN) per kernel, 8 warps, by the padded width K*r of the
# factor tiles and gated or not. Chosen from ptxas' resource counts of ahead-of-time compilations
# for sm_80 and sm_90 (benchmarks/kernel_resources.py prints them) so that the kernels do not
# spill registers (a few bytes at most, gated); the previous 4-warp tiles spilled up to 1.5 KB
# per thread in the column kernel's row loop at the paper's K*r = 64. Not yet timed on a GPU.
_COMBINE_TILES = {  # (KRP <= ..., gated): {kernel: (BM, BN)}
    (64, False): {"fwd": (32, 64), "rows": (16, 64), "cols": (16, 64)},
    (128, False): {"fwd": (16, 64), "rows": (16, 32), "cols": (16, 32)},
    (None, False): {"fwd": (16, 32), "rows": (16, 16), "cols": (16, 16)},
    (64, True): {"fwd": (32, 32), "rows": (16, 32), "cols": (16, 64)},
    (128, True): {"fwd": (16, 32), "rows": (16, 16), "cols": (16, 32)},
    (None, True): {"fwd": (16, 16), "rows": (16, 16), "cols": (16, 16)},
}
_COMBINE_WARPS = 8


def combine_tiles(K: int, r: int, gated: bool, kernel: str) -> dict:
    """BM, BN and num_warps of one combine kernel ("fwd", "rows" or "cols")."""
    KRP = max(16, triton.next_power_of_2(K * r))
    bucket = 64 if KRP <= 64 else 128 if KRP <= 128 else None
    BM, BN = _COMBINE_TILES[(bucket, gated)][kernel]
    return dict(BM=BM, BN=BN, num_warps=_COMBINE_WARPS)


def _common(z, a, jloc, w, b1, bias1, a2, off, K, r, z3, a3, b3, bias3):
    _check(off, z, a, jloc, w, b1, bias1, a2, z3, a3, b3, bias3)
    if not (z.stride(1) == 1 and a.stride(1) == 1 and b1.stride(2) == 1 and a2.stride() == b1.stride()):
        raise ValueError("act_combine: z and a must be contiguous in their last dimension, and b1 and a2 "
                         "slot-stacked [E, f, r] with equal strides and unit stride in r")
    if bias1 is not None and not bias1.is_contiguous():
        raise ValueError("act_combine: bias1 must be contiguous [E, f]")
    gated = z3 is not None
    if gated and not (a3 is not None and b3 is not None and z3.stride() == z.stride() and a3.stride() == a.stride()
                      and b3.stride() == b1.stride() and (bias3 is None) == (bias1 is None)
                      and (bias3 is None or bias3.is_contiguous())):
        raise ValueError("act_combine: the gated operands z3, a3, b3 (and bias3 iff bias1) must be laid out "
                         "like z, a, b1 and bias1")
    KR = K * r
    return z.shape[0], z.shape[1], off.numel() - 1, KR, max(16, triton.next_power_of_2(KR)), gated


def act_combine_fwd(z, a, jloc, w, b1, bias1: Optional[torch.Tensor], a2, off, K: int, r: int, act: str,
                    out: torch.Tensor, z3=None, a3=None, b3=None, bias3=None) -> torch.Tensor:
    P, f, G, KR, KRP, gated = _common(z, a, jloc, w, b1, bias1, a2, off, K, r, z3, a3, b3, bias3)
    QW = out.shape[1] - f
    if QW < KR + K or out.stride(1) != 1:
        raise ValueError(f"act_combine_fwd: out must be [P, f + >= {KR + K}] with unit column stride")
    bias_arg = bias1 if bias1 is not None else z
    gate = (z3, a3, b3, bias3 if bias3 is not None else bias_arg) if gated else (z, a, b1, bias_arg)
    tiles = combine_tiles(K, r, gated, "fwd")
    _act_combine_fwd_kernel[(triton.cdiv(P, tiles["BM"]) + G,)](
        z, a, jloc, w, b1, bias_arg, a2, out, off, *gate,
        f, KR, QW, z.stride(0), a.stride(0), jloc.stride(0), w.stride(0), b1.stride(0), b1.stride(1), out.stride(0),
        G=G, K=K, R=r, TOPK=jloc.shape[1], KRP=KRP, WP=triton.next_power_of_2(QW - KR),
        ACT=ACT_CODES[act], HAS_BIAS=bias1 is not None, GATED=gated, IEEE=z.dtype == torch.float32, **tiles)
    return out


def act_combine_bwd(z, a, jloc, w, b1, bias1, a2, dhs, dq, off, K: int, r: int, act: str, dzda: torch.Tensor,
                    z3=None, a3=None, b3=None, bias3=None):
    P, f, G, KR, KRP, gated = _common(z, a, jloc, w, b1, bias1, a2, off, K, r, z3, a3, b3, bias3)
    _check(off, dhs, dq, dzda)
    if dhs.stride(1) != 1 or dq.stride(1) != 1 or dzda.stride(1) != 1 or dq.shape[1] < KR + K:
        raise ValueError(f"act_combine_bwd: dhs, dq and dzda must have unit column stride, dq >= {KR + K} columns")
    f32 = dict(dtype=torch.float32, device=z.device)
    topk = jloc.shape[1]
    E = G * K
    grads = lambda: (torch.empty(E, f, r, **f32), torch.empty(E, f, **f32) if bias1 is not None else None)  # noqa: E731
    dw = torch.empty(P, topk, **f32)
    da2 = torch.empty(E, f, r, **f32)
    db1, dbias = grads()
    db3, dbias3 = grads() if gated else (db1, dbias)     # dummies unless gated
    common = dict(K=K, R=r, TOPK=topk, KRP=KRP, ACT=ACT_CODES[act], HAS_BIAS=bias1 is not None,
                  GATED=gated, IEEE=z.dtype == torch.float32)
    cols, rows = combine_tiles(K, r, gated, "cols"), combine_tiles(K, r, gated, "rows")
    bias_arg = bias1 if bias1 is not None else z
    # dzda has the up GEMM's columns: [dz | da], gated [dz | dz3 | da | da3]
    n = 2 if gated else 1
    dz, da = dzda[:, :f], dzda[:, n * f:n * f + KR]
    dz3, da3 = (dzda[:, f:2 * f], dzda[:, 2 * f + KR:2 * f + 2 * KR]) if gated else (dz, da)
    gate = (z3, a3, b3, bias3 if bias3 is not None else bias_arg) if gated else (z, a, b1, bias_arg)
    # columns first: a non-gated dzda may be dhs/dq's own buffer (written in place by the row
    # kernel, each program after reading its rows)
    no_bias = db1    # a dummy pointer where there are no biases
    _act_combine_bwd_cols_kernel[(triton.cdiv(f, cols["BN"]), G)](
        z, a, jloc, w, b1, bias_arg, a2, dhs, dq, off, db1, dbias if dbias is not None else no_bias, da2,
        *gate, db3, dbias3 if dbias3 is not None else no_bias,
        f, KR, z.stride(0), a.stride(0), jloc.stride(0), w.stride(0), b1.stride(0), b1.stride(1),
        dhs.stride(0), dq.stride(0), KP=max(16, triton.next_power_of_2(K)), **common, **cols)
    _act_combine_bwd_rows_kernel[(triton.cdiv(P, rows["BM"]) + G,)](
        z, a, jloc, w, b1, bias_arg, a2, dhs, dq, off, dz, da, dw, *gate, dz3, da3,
        f, KR, z.stride(0), a.stride(0), jloc.stride(0), w.stride(0), b1.stride(0), b1.stride(1),
        dhs.stride(0), dq.stride(0), dz.stride(0), da.stride(0), dw.stride(0),
        G=G, TP=triton.next_power_of_2(topk), **common, **rows)
    out = (dw, db1, dbias, da2)
    return out + (db3, dbias3) if gated else out


# --- INT4 residuals: quantize-dequantize in one kernel ---------------------------------------------
# The forward of a layer with INT4 residuals sees fake_quant(master factor) (core/quant.py); in
# plain torch that is ~28 small operations per factor tensor, here one launch. Bit-exact with the
# twin: IEEE divisions (div_rn), round-half-to-even built from floor (the interpreter has no
# libdevice), the scale rounded through float16 as it is stored.
@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    h = f + 0.5                                                  # exact for the small values here
    odd = f - 2.0 * tl.floor(f * 0.5)                            # 1.0 if f is odd
    return f + tl.where(x > h, 1.0, tl.where(x < h, 0.0, odd))


@triton.jit
def _fake_quant_kernel(w_ptr, out_ptr, ROWS, R, sws, swr, sos, sor,
                       BR: tl.constexpr, RP: tl.constexpr, QMAX: tl.constexpr):
    """One program per slot: the per-column range over all rows, then the codes and their values."""
    slot = tl.program_id(0)
    cols = tl.arange(0, RP)
    cmask = cols < R
    lo = tl.zeros((RP,), dtype=tl.float32)         # the range always contains 0
    hi = tl.zeros((RP,), dtype=tl.float32)
    for r0 in range(0, ROWS, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows < ROWS)[:, None] & cmask[None, :]
        w = tl.load(w_ptr + slot * sws + rows[:, None] * swr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(w, axis=0))
        hi = tl.maximum(hi, tl.max(w, axis=0))
    scale = tl.math.div_rn(hi - lo, QMAX * 1.0).to(tl.float16).to(tl.float32)
    scale = tl.where(scale > 0, scale, 1.0)
    zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-lo, scale)), 0.0), QMAX * 1.0)
    for r0 in range(0, ROWS, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows < ROWS)[:, None] & cmask[None, :]
        w = tl.load(w_ptr + slot * sws + rows[:, None] * swr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(w, scale[None, :])) + zero[None, :]
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
        tl.store(out_ptr + slot * sos + rows[:, None] * sor + cols[None, :],
                 ((q - zero[None, :]) * scale[None, :]).to(out_ptr.dtype.element_ty), mask=m)


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 3 or w.stride(2) != 1:
        raise ValueError(f"fake_quant expects slot-stacked (E, rows, r) factors with unit stride in r, "
                         f"got shape {tuple(w.shape)} strides {w.stride()}")
    E, rows, r = w.shape
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    if w.numel():
        _fake_quant_kernel[(E,)](w, out, rows, r, w.stride(0), w.stride(1), out.stride(0), out.stride(1),
                                 BR=16 if _INTERPRETED else 64, RP=max(16, triton.next_power_of_2(r)),
                                 QMAX=15, num_warps=4)
    return out



# Serving reads the packed form: one launch decodes a whole slot-stacked factor tensor (the torch
# twin is ~8 operations). Bit-exact: (code - zero) is exact in float32, times the float16 scale is
# one rounding, as in core/quant.py.
@triton.jit
def _dequant_int4_kernel(p_ptr, s_ptr, z_ptr, out_ptr, ROWS, R, sps, spr, sss, szs, sos, sor,
                         BR: tl.constexpr, RP: tl.constexpr):
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = tl.arange(0, RP)
    cmask = cols < R
    m = (rows < ROWS)[:, None] & cmask[None, :]
    byte = tl.load(p_ptr + slot * sps + (rows // 2)[:, None] * spr + cols[None, :], mask=m, other=0).to(tl.int32)
    code = (byte >> ((rows % 2) * 4)[:, None]) & 15          # low nibble: even row
    scale = tl.load(s_ptr + slot * sss + cols, mask=cmask, other=1.0).to(tl.float32)
    zero = tl.load(z_ptr + slot * szs + cols, mask=cmask, other=0).to(tl.float32)
    val = (code.to(tl.float32) - zero[None, :]) * scale[None, :]
    tl.store(out_ptr + slot * sos + rows[:, None] * sor + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=m)


def dequant_int4(qt: dict, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    p, s, z = qt["packed"], qt["scale"], qt["zero"]
    if p.dim() != 3 or p.stride(2) != 1 or s.stride(2) != 1 or z.stride(2) != 1:
        raise ValueError(f"dequant_int4 expects slot-stacked packed factors (E, rows/2, r) with unit stride in r, "
                         f"got packed {tuple(p.shape)} strides {p.stride()}")
    E, _, r = p.shape
    out = torch.empty(E, rows, r, dtype=dtype, device=p.device)
    BR = 16 if _INTERPRETED else 64
    if out.numel():
        _dequant_int4_kernel[(E, triton.cdiv(rows, BR))](p, s, z, out, rows, r, p.stride(0), p.stride(1), s.stride(0),
                                                         z.stride(0), out.stride(0), out.stride(1),
                                                         BR=BR, RP=max(16, triton.next_power_of_2(r)), num_warps=4)
    return out
