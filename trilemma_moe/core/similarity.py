"""Expert similarity for the online clustering (paper section 3.1, Eqs. 2-5): S_param of the
experts' weights (with :class:`ParamSimilarityCache` between regroups), S_task of their activation
centroids (and the centroids' EMA), their fusion and the neighbour pruning.

Pure torch: no deepspeed, no torch.distributed, so every rank can run it on identical inputs
and get identical results. The grouping itself is ``clustering.py``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "cosine_similarity_matrix",
    "param_similarity",
    "task_similarity",
    "fuse_similarity",
    "prune_neighbors",
    "update_centroids",
    "ParamSimilarityCache",
    "CountSketch",
    "sketch_error_bound",
    "probe_logit_similarity",
]

# Elements (not bytes) of one float64 chunk when streaming over the feature dimension: keeps the
# float64 working copy of a (E, 2M) float32 weight matrix at ~64 MB instead of a full copy.
_CHUNK_ELEMS = 1 << 23


def _col_chunks(num_rows: int, num_cols: int):
    step = max(1, _CHUNK_ELEMS // max(1, num_rows))
    for start in range(0, num_cols, step):
        yield start, min(num_cols, start + step)


def _gram_to_cosine(dots: Tensor, sq_rows: Tensor, sq_cols: Tensor) -> Tensor:
    """dots[i, j] / (||a_i|| ||b_j||), 0 where either norm is 0, clamped to [-1, 1]."""
    n_r = sq_rows.clamp_min(0).sqrt()
    n_c = sq_cols.clamp_min(0).sqrt()
    denom = n_r[:, None] * n_c[None, :]
    out = torch.where(denom > 0, dots / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(dots))
    return out.clamp_(-1.0, 1.0)


def cosine_similarity_matrix(x: Tensor) -> Tensor:
    """Row-wise cosine similarity of ``x`` [E, D] as a float64 [E, E] matrix.

    A zero row has similarity 0 with every other row and 1 with itself; diagonal is exactly 1.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [E, D] tensor, got shape {tuple(x.shape)}")
    x = x.detach()
    E, D = x.shape
    gram = torch.zeros(E, E, dtype=torch.float64, device=x.device)
    # Stream over columns so only one float64 chunk exists at a time.
    for s, e in _col_chunks(E, D):
        xc = x[:, s:e].to(torch.float64)
        gram += xc @ xc.T
    sq = gram.diagonal().clone()
    sim = _gram_to_cosine(gram, sq, sq)
    sim = 0.5 * (sim + sim.T)  # matmul rounding need not be bitwise symmetric
    sim.fill_diagonal_(1.0)
    return sim


def param_similarity(flat_weights: Tensor) -> Tensor:
    """S_param (Eq. 2): cosine of the experts' flattened weights, [E, D] -> [E, E] float64."""
    return cosine_similarity_matrix(flat_weights)


def task_similarity(centroids: Tensor) -> Tensor:
    """S_task (Eq. 3): cosine of the experts' activation centroids, [E, d] -> [E, E] float64."""
    return cosine_similarity_matrix(centroids)


def probe_logit_similarity(logits: Tensor) -> Tensor:
    """S_task from a shared probe batch: ``logits`` [n, E] are every expert's router logit on the
    same n tokens (no routing decides who sees what). Each token's logits are centred over the
    experts (a token that excites every expert says nothing about which are alike), then the
    experts' columns are compared by cosine -> [E, E] float64."""
    z = logits.detach().to(torch.float64)
    z = z - z.mean(dim=1, keepdim=True)
    return cosine_similarity_matrix(z.T.contiguous())


def fuse_similarity(s_param: Tensor, s_task: Tensor, alpha: float) -> Tensor:
    """Fused similarity S = alpha * S_param + (1 - alpha) * S_task (Eq. 4)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if s_param.shape != s_task.shape:
        raise ValueError(f"shape mismatch: S_param {tuple(s_param.shape)} vs S_task {tuple(s_task.shape)}")
    return alpha * s_param + (1.0 - alpha) * s_task


def prune_neighbors(S: Tensor, tau: Optional[float] = None, top_n: Optional[int] = None) -> Tensor:
    """Approximate neighbour graph: drop pairs with S < tau and/or outside each expert's top_n.

    A pair survives top_n if either endpoint keeps it (result stays symmetric). Dropped pairs get
    similarity -1 (distance 2); the diagonal stays 1. With both None a copy of S is returned.
    """
    out = S.clone()
    if tau is None and top_n is None:
        return out
    E = S.shape[0]
    eye = torch.eye(E, dtype=torch.bool, device=S.device)
    keep = torch.ones(E, E, dtype=torch.bool, device=S.device)
    if tau is not None:
        keep &= S >= tau
    if top_n is not None:
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        if top_n < E - 1:
            # Exclude self from the ranking; stable sort -> ties go to the lower index.
            ranked = S.masked_fill(eye, float("-inf"))
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :top_n]
            mine = torch.zeros(E, E, dtype=torch.bool, device=S.device)
            mine.scatter_(1, order, True)
            keep &= mine | mine.T
    out = torch.where(keep, out, torch.full_like(out, -1.0))
    out[eye] = 1.0
    return out


def update_centroids(centroids: Tensor, initialized: Tensor, token_sums: Tensor,
                     token_counts: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """EMA of activation centroids (Eq. 5); returns (new_centroids, new_initialized).

    Experts with no tokens stay unchanged; an expert seen for the first time takes the batch
    mean directly so the zero start does not bias its cosine. Inputs are not modified.
    """
    counts = token_counts.to(device=centroids.device, dtype=centroids.dtype)
    seen = counts > 0
    init = initialized.to(device=centroids.device, dtype=torch.bool)
    # weight of the batch mean: 0 unseen (lerp keeps the old row exactly), 1 first seen (exactly
    # the mean), beta otherwise; one lerp instead of two nested selects
    w = torch.where(init, beta, 1.0).to(centroids.dtype) * seen
    mean = token_sums.to(device=centroids.device, dtype=centroids.dtype) / counts.clamp(min=1)[:, None]
    return torch.lerp(centroids, mean, w[:, None]), init | seen


_PRIME = (1 << 31) - 1   # Mersenne prime of the polynomial hashes


def _poly_hash(idx: Tensor, coeffs) -> Tensor:
    """sum_k c_k idx^k mod p by Horner's rule; every product stays below 2^62 (no int64 overflow)."""
    h = torch.zeros_like(idx)
    for c in coeffs:
        h = (h * idx + c) % _PRIME
    return h


class CountSketch:
    """A linear map R^D -> R^s (Charikar-Chen-Farach-Colton): coordinate j goes, with a sign
    sigma(j), into bucket h(j). h is 2-wise and sigma 4-wise independent polynomial hashes of the
    *global* coordinate index, derived from ``seed`` alone, so every rank sketches its own experts
    with the same map and nothing of size D is stored: chunks of any size are added in any order.

    For unit vectors a, b the sketched inner product is unbiased with variance
    ``(1 + <a,b>^2 - 2 sum_j a_j^2 b_j^2) / s <= 2 / s`` (:func:`sketch_error_bound`)."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"sketch size must be >= 1, got {size}")
        self.size = int(size)
        gen = torch.Generator().manual_seed(int(seed))
        c = torch.randint(1, _PRIME, (6,), generator=gen).tolist()
        self._bucket, self._sign = c[:2], c[2:]

    def add(self, out: Tensor, values: Tensor, start: int) -> None:
        """``out[:, h(j)] += sigma(j) values[:, j - start]`` for the coordinates j in
        ``[start, start + values.shape[1])``; ``out`` is [rows, s]."""
        idx = torch.arange(start, start + values.shape[1], dtype=torch.int64, device=values.device) % _PRIME
        bucket = _poly_hash(idx, self._bucket) % self.size
        sign = (_poly_hash(idx, self._sign) & 1).to(values.dtype) * 2 - 1
        out.index_add_(1, bucket, (values * sign).to(out.dtype))


def sketch_error_bound(size: int, failure: float) -> float:
    """epsilon with P(|<Sa,Sb> - <a,b>| > epsilon) <= ``failure`` for unit a, b (Chebyshev on the
    variance bound 2/s): sqrt(2 / (s * failure))."""
    return math.sqrt(2.0 / (size * failure))


class ParamSimilarityCache:
    """Caches S_param between regroups, recomputing only experts whose weights moved (> eps).

    The change test uses a fixed random sketch of ``sketch_size`` coordinates per expert; a full
    recompute happens on the first call, after ``lifetime`` steps, after ``invalidate()``, or
    when the shape of the weights changes.
    """

    def __init__(self, lifetime: int, eps: float, seed: int, sketch_size: int = 4096):
        if lifetime < 1:
            raise ValueError(f"lifetime must be >= 1, got {lifetime}")
        if sketch_size < 1:
            raise ValueError(f"sketch_size must be >= 1, got {sketch_size}")
        self.lifetime = int(lifetime)
        self.eps = float(eps)
        self.seed = int(seed)
        self.sketch_size = int(sketch_size)
        self.computed_step: Optional[int] = None
        self.last_recomputed = torch.zeros(0, dtype=torch.long)
        self.full_recomputes = 0
        self.partial_recomputes = 0
        self._sim: Optional[Tensor] = None
        self._fp: Optional[Tensor] = None
        self._idx: Optional[Tensor] = None
        self._shape: Optional[Tuple[int, int]] = None

    def invalidate(self) -> None:
        """Force a full recompute on the next call."""
        self._sim = None
        self._fp = None

    def _sketch_index(self, D: int) -> Tensor:
        if self._idx is None or self._shape is None or self._shape[1] != D:
            if D <= self.sketch_size:
                self._idx = torch.arange(D, dtype=torch.long)
            else:
                gen = torch.Generator().manual_seed(self.seed)
                self._idx = torch.sort(torch.randperm(D, generator=gen)[: self.sketch_size]).values
        return self._idx

    def _fingerprint(self, w: Tensor) -> Tensor:
        return w.index_select(1, self._idx.to(w.device)).to("cpu", torch.float64)

    def similarity(self, flat_weights: Tensor, step: int) -> Tensor:
        """S_param of ``flat_weights`` [E, D] at ``step`` (float64 [E, E], a fresh copy)."""
        if flat_weights.dim() != 2:
            raise ValueError(f"expected [E, D] flat weights, got shape {tuple(flat_weights.shape)}")
        w = flat_weights.detach()
        E, D = w.shape
        step = int(step)
        full = (self._sim is None or self._fp is None or self.computed_step is None
                or self._shape != (E, D) or step - self.computed_step >= self.lifetime)
        self._sketch_index(D)
        if full:
            self._shape = (E, D)
            self._sim = cosine_similarity_matrix(w).cpu()
            self._fp = self._fingerprint(w)
            self.computed_step = step
            self.full_recomputes += 1
            self.last_recomputed = torch.arange(E, dtype=torch.long)
            return self._sim.clone()

        fp = self._fingerprint(w)
        rel = (fp - self._fp).norm(dim=1) / self._fp.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        changed = torch.nonzero(rel > self.eps).flatten()
        self.last_recomputed = changed
        if changed.numel() > 0:
            rows = self._exact_rows(w, changed)
            # Pairs of two changed experts were computed twice (row i and row j); average them so
            # the matrix stays bitwise symmetric whatever the matmul rounding.
            block = rows[:, changed]
            rows[:, changed] = 0.5 * (block + block.T)
            self._sim[changed, :] = rows
            self._sim[:, changed] = rows.T
            self._sim[changed, changed] = 1.0
            self._fp[changed] = fp[changed]
            self.partial_recomputes += 1
        return self._sim.clone()

    @staticmethod
    def _exact_rows(w: Tensor, rows: Tensor) -> Tensor:
        """Cosine of experts ``rows`` against all experts, streamed over columns in float64."""
        E, D = w.shape
        r = rows.to(w.device)
        dots = torch.zeros(r.numel(), E, dtype=torch.float64, device=w.device)
        sq = torch.zeros(E, dtype=torch.float64, device=w.device)
        for s, e in _col_chunks(E, D):
            xc = w[:, s:e].to(torch.float64)
            dots += xc[r] @ xc.T
            sq += (xc * xc).sum(1)
        return _gram_to_cosine(dots, sq[r], sq).cpu()

    def state_dict(self) -> Dict[str, object]:
        """Tensors and ints only, so ``torch.load(weights_only=True)`` can read it."""
        has = int(self._sim is not None and self._fp is not None)
        return {
            "has_cache": has,
            "computed_step": -1 if self.computed_step is None else int(self.computed_step),
            "full_recomputes": int(self.full_recomputes),
            "partial_recomputes": int(self.partial_recomputes),
            "shape": torch.tensor(self._shape if self._shape is not None else (-1, -1), dtype=torch.long),
            "sim": self._sim.clone() if has else torch.zeros(0, dtype=torch.float64),
            "fingerprints": self._fp.clone() if has else torch.zeros(0, dtype=torch.float64),
            "sketch_index": self._idx.clone() if self._idx is not None else torch.zeros(0, dtype=torch.long),
            "last_recomputed": self.last_recomputed.clone(),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        cs = int(state["computed_step"])
        self.computed_step = None if cs < 0 else cs
        self.full_recomputes = int(state["full_recomputes"])
        self.partial_recomputes = int(state["partial_recomputes"])
        shape = [int(v) for v in state["shape"].tolist()]
        self._shape = None if shape[0] < 0 else (shape[0], shape[1])
        idx = state["sketch_index"]
        self._idx = idx.clone().long() if idx.numel() > 0 else None
        if int(state["has_cache"]) and self._shape is not None:
            self._sim = state["sim"].clone().to(torch.float64)
            self._fp = state["fingerprints"].clone().to(torch.float64)
        else:
            self._sim = None
            self._fp = None
        self.last_recomputed = state["last_recomputed"].clone().long()
