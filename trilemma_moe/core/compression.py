"""Shared base + rank-r residual factors per group (paper section 3.2, Eqs. 6-8).

Weight matrices are stored ``(d_in, d_out)`` so an expert applies ``x @ W``; the residual of
expert i is ``A_i @ B_i.T`` with ``A_i: (d_in, r)`` and ``B_i: (d_out, r)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SVD_METHODS

POWER_ITERS = 2            # q: subspace iterations; sharpen a flat residual spectrum's decay to s^(2q+1)


def oversampling(rank: int) -> int:
    """p extra test vectors: HMT (2011, sec. 4.2) suggest 5-10; we take max(8, r) (l = 2r at
    r >= 8). Residuals of independently initialised experts have a flat spectrum, the hard case;
    there, with q = 2, this keeps the Frobenius error within 1% of the optimum at the project's
    shapes (benchmarks/svd_error.py), at about 2/3 of the cost of p = 2r."""
    return max(8, rank)


def randomized_svd(m: torch.Tensor, rank: int, seed: int = 0, power_iters: int = POWER_ITERS):
    """Top-``rank`` singular triplets of ``m`` (..., d_in, d_out), batched over the leading dims,
    by randomized subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1): a Gaussian
    test matrix of l = rank + p columns, ``power_iters`` rounds of ``m m^T`` with a QR after every
    product (keeps the basis from collapsing onto the top singular vector in finite precision),
    then an exact SVD of the small projection ``Q^T m`` (l x d_out). Returns ``(u, s, v)`` with
    ``u (..., d_in, r)``, ``s (..., r)``, ``v (..., d_out, r)``.

    The test matrix comes from a private ``torch.Generator`` seeded by ``seed``, never from
    torch's global RNG (as ``torch.svd_lowrank`` does): drawing from it would shift the training
    RNG stream and make ranks that decompose different numbers of groups disagree afterwards.
    """
    d_in, d_out = m.shape[-2:]
    l = min(rank + oversampling(rank), d_in, d_out)
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(*m.shape[:-2], d_out, l, generator=gen, device=m.device, dtype=m.dtype)
    q = torch.linalg.qr(m @ omega).Q                       # (..., d_in, l): range of m
    mt = m.transpose(-1, -2)
    for _ in range(power_iters):
        q = torch.linalg.qr(m @ torch.linalg.qr(mt @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.transpose(-1, -2) @ m, full_matrices=False)   # (..., l, d_out)
    return (q @ ub[..., :, :rank]), s[..., :rank], vh[..., :rank, :].transpose(-1, -2)


def truncated_svd(m: torch.Tensor, rank: int, svd: str = "exact", seed: int = 0):
    """Top-``rank`` ``(u, s, v)`` of ``m`` (..., d_in, d_out): ``"exact"`` (``torch.linalg.svd``, full)
    or ``"randomized"`` (:func:`randomized_svd`, seeded by ``seed``)."""
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if svd == "randomized":
        return randomized_svd(m, rank, seed=seed)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[..., :, :rank], s[..., :rank], vh[..., :rank, :].transpose(-1, -2)


def split_factors(residual: torch.Tensor, rank: int, svd: str = "exact", seed: int = 0):
    """``(A, B)`` with ``A B^T`` the rank-r truncation of ``residual``, the singular values split
    evenly (A = U sqrt(S), B = V sqrt(S)) so both factors start at the same scale."""
    u, s, v = truncated_svd(residual, rank, svd, seed)
    root = s.sqrt().unsqueeze(-2)
    return u * root, v * root


@dataclass
class GroupDecomposition:
    base: torch.Tensor          # (..., d_in, d_out): mean of the group's experts (Eq. 6)
    a: torch.Tensor             # (..., K, d_in, r)
    b: torch.Tensor             # (..., K, d_out, r)
    rel_error: torch.Tensor     # (..., K): ||W_i - W~_i||_F / ||W_i||_F after truncation (and gate)
    gated: torch.Tensor         # (..., K) bool: residual zeroed by the gamma gate


def decompose_groups(weights: torch.Tensor, rank: int, gamma: float | None = None, svd: str = "exact",
                     seed: int = 0) -> GroupDecomposition:
    """Decompose ``weights`` of shape ``(..., K, d_in, d_out)`` group-wise.

    base = mean over K (Eq. 6); residual factors from the truncated SVD of ``W_i - base``
    (Eq. 7), which is the Frobenius-optimal rank-r residual (Eckart-Young). The singular values
    are split evenly, ``A = U sqrt(S)``, ``B = V sqrt(S)``, so both factors start at the same
    scale and receive comparable gradients.

    gamma gate: an expert whose residual is negligible, ``||W_i - base|| <= gamma * ||base||``,
    gets an exactly-zero residual. Only ``A`` is zeroed: with ``B`` kept, ``dL/dA = G B`` is
    non-zero, so the residual can grow back in training (zeroing both would be a saddle).
    We gate on the relative norm, not on the cosine to the base named in the paper: residuals
    of independently initialised experts are nearly orthogonal to the base, so the literal
    cosine criterion would zero all of them.

    ``svd``: ``"exact"`` (``torch.linalg.svd``, full) or ``"randomized"`` (:func:`randomized_svd`,
    seeded by ``seed``; near the Eckart-Young optimum at a fraction of the cost for r << d).
    """
    if svd not in SVD_METHODS:   # before any work: a typo fails fast, also for tiny inputs
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if weights.dim() < 3:
        raise ValueError(f"weights must be (..., K, d_in, d_out), got shape {tuple(weights.shape)}")
    d_in, d_out = weights.shape[-2:]
    if rank > min(d_in, d_out):
        raise ValueError(f"rank ({rank}) must be <= min(d_in, d_out) = {min(d_in, d_out)}")
    base = weights.mean(dim=-3)
    residual = weights - base.unsqueeze(-3)
    a, b = split_factors(residual, rank, svd, seed)
    if gamma is not None:
        res_norm = residual.flatten(-2).norm(dim=-1)
        base_norm = base.flatten(-2).norm(dim=-1).unsqueeze(-1)
        gated = res_norm <= gamma * base_norm
        a = a * (~gated).to(a.dtype)[..., None, None]
    else:
        gated = torch.zeros(weights.shape[:-2], dtype=torch.bool, device=weights.device)
    approx = base.unsqueeze(-3) + a @ b.transpose(-1, -2)
    w_norm = weights.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(weights.dtype).tiny)
    rel_error = (weights - approx).flatten(-2).norm(dim=-1) / w_norm
    return GroupDecomposition(base=base, a=a, b=b, rel_error=rel_error, gated=gated)


def reconstruct(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Effective expert weights ``base + A B^T``: base ``(..., d_in, d_out)``, factors ``(..., K, d, r)``."""
    return base.unsqueeze(-3) + a @ b.transpose(-1, -2)


def compression_ratio(experts_per_group: int, d_in: int, d_out: int, rank: int) -> float:
    """Eq. 8: ``K d_in d_out / (d_in d_out + K r (d_in + d_out))`` (biases ignored)."""
    k = experts_per_group
    return k * d_in * d_out / (d_in * d_out + k * rank * (d_in + d_out))


def held_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` as its module holds it: between forwards a ZeRO-3 partitioned parameter
    has ``numel() == 0`` and keeps its full size in ``ds_numel``."""
    return getattr(p, "ds_numel", p.numel())


def held_compression_ratio(experts) -> float:
    """Full expert weights (slots x matrices) over the compressed tensors an ``ExpertSlots``
    holds (bases + factors; biases excluded as in Eq. 8)."""
    full = sum(experts.num_experts * di * do for di, do in experts.spec.matrices.values())
    comp = sum(held_numel(experts.base[n]) + held_numel(experts.fa[n]) + held_numel(experts.fb[n])
               for n in experts.spec.matrices)
    return full / comp


def residual_factors(residual: torch.Tensor, rank: int, weights: torch.Tensor, svd: str = "exact", seed: int = 0):
    """Rank-r factors of ``residual`` (..., d_in, d_out) by truncated SVD, split as in
    :func:`decompose_groups` (A = U sqrt(S), B = V sqrt(S)), and the relative error of
    ``weights - residual + A B^T`` against ``weights`` (the re-truncation a moved expert pays when
    it is re-expressed on another group's base ``weights - residual``). ``svd``, ``seed``: as in
    :func:`decompose_groups`."""
    a, b = split_factors(residual, rank, svd, seed)
    lost = (residual - a @ b.transpose(-1, -2)).flatten(-2).norm(dim=-1)
    return a, b, lost / weights.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(weights.dtype).tiny)
