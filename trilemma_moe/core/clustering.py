"""Online dual-similarity clustering (paper section 3.1, Eqs. 2-5).

Pure torch (numpy only for the small assignment problem): no deepspeed, no torch.distributed,
so every rank can run it on identical inputs and get identical groups.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "cosine_similarity_matrix",
    "param_similarity",
    "task_similarity",
    "fuse_similarity",
    "prune_neighbors",
    "update_centroids",
    "balanced_kmeans",
    "intra_group_similarity",
    "match_group_labels",
    "ParamSimilarityCache",
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


# ----------------------------------------------------------------------------------------------
# balanced k-means on a distance matrix
# ----------------------------------------------------------------------------------------------

def _greedy_capacity_assign(cost: Tensor, capacity: int) -> Tensor:
    """Assign experts to groups by increasing cost, each group taking at most ``capacity``."""
    E, G = cost.shape
    # Stable sort over the row-major flattening: ties go to the lower (expert, group) index.
    order = torch.sort(cost.reshape(-1), stable=True).indices.tolist()
    assign = [-1] * E
    fill = [0] * G
    left = E
    for flat in order:
        i, g = divmod(flat, G)
        if assign[i] >= 0 or fill[g] >= capacity:
            continue
        assign[i] = g
        fill[g] += 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(assign, dtype=torch.long)


def _onehot(assign: Tensor, G: int) -> Tensor:
    M = torch.zeros(assign.numel(), G, dtype=torch.float64)
    M[torch.arange(assign.numel()), assign] = 1.0
    return M


def _intra_cost(D: Tensor, assign: Tensor) -> float:
    same = assign[:, None] == assign[None, :]
    return float(D[same].sum())


def _canonical(assign: Tensor, G: int) -> Tensor:
    """Relabel groups in order of their smallest member, so group 0 holds expert 0."""
    E = assign.numel()
    first = torch.full((G,), E, dtype=torch.long)
    first.scatter_reduce_(0, assign, torch.arange(E), reduce="amin")
    rank = torch.empty(G, dtype=torch.long)
    rank[torch.argsort(first, stable=True)] = torch.arange(G)
    return rank[assign]


def balanced_kmeans(distance: Tensor, num_groups: int, seed: int, iters: int = 30) -> Tensor:
    """Balanced k-means++ on a precomputed distance matrix (D = 1 - S).

    Returns a LongTensor [E] of canonical group labels, exactly E / num_groups experts per group.
    Deterministic for a given (distance, num_groups, seed, iters).
    """
    if distance.dim() != 2 or distance.shape[0] != distance.shape[1]:
        raise ValueError(f"distance must be a square [E, E] matrix, got {tuple(distance.shape)}")
    E = distance.shape[0]
    G = int(num_groups)
    if G < 1 or G > E:
        raise ValueError(f"num_groups ({num_groups}) must be in [1, {E}]")
    if E % G != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts ({E})")
    K = E // G
    if G == 1:
        return torch.zeros(E, dtype=torch.long)
    if K == 1:
        return torch.arange(E, dtype=torch.long)

    D = distance.detach().to("cpu", torch.float64)
    D = 0.5 * (D + D.T)  # the objective only sees D[i,j] + D[j,i]
    D.fill_diagonal_(0.0)  # self-distance never counts (mean over members excludes self)

    # (a) k-means++ seeding on distances only.
    gen = torch.Generator().manual_seed(int(seed))
    seeds = [int(torch.randint(E, (1,), generator=gen))]
    chosen = torch.zeros(E, dtype=torch.bool)
    chosen[seeds[0]] = True
    nearest = D[seeds[0]].clamp_min(0).clone()
    for _ in range(1, G):
        w = (nearest * nearest).masked_fill(chosen, 0.0)
        if not bool(w.sum() > 0):
            w = (~chosen).to(torch.float64)
        nxt = int(torch.multinomial(w, 1, generator=gen))
        seeds.append(nxt)
        chosen[nxt] = True
        nearest = torch.minimum(nearest, D[nxt].clamp_min(0))

    # (b) balanced assignment to the seeds.
    assign = _greedy_capacity_assign(D[:, seeds], K)

    # (c) Lloyd-style refinement with average-linkage centres; the capacity-constrained greedy
    # is not guaranteed monotone, so keep the best assignment seen.
    best, best_cost = assign, _intra_cost(D, assign)
    ar = torch.arange(E)
    for _ in range(int(iters)):
        M = _onehot(assign, G)
        R = D @ M  # R[i, g] = sum of D[i, j] over members j of g (self contributes 0)
        cnt = M.sum(0)[None, :].expand(E, G).clone()
        cnt[ar, assign] -= 1.0  # own group: mean over the other K-1 members
        new = _greedy_capacity_assign(R / cnt, K)
        if torch.equal(new, assign):
            break
        assign = new
        c = _intra_cost(D, assign)
        if c < best_cost - 1e-12:
            best, best_cost = assign, c
    assign = best.clone()

    # (d) greedy pairwise swaps of boundary experts. Swapping i (group a) with j (group b) changes
    # the unordered intra-group distance sum by R[i,b] + R[j,a] - R[i,a] - R[j,b] - 2 D[i,j].
    R = D @ _onehot(assign, G)
    tol = 1e-12 * max(1.0, float(D.abs().max())) * E
    for _ in range(E * E):
        own = R[ar, assign]
        A = R[:, assign]  # A[i, j] = R[i, group of j]
        delta = A + A.T - own[:, None] - own[None, :] - 2.0 * D
        delta.masked_fill_(assign[:, None] == assign[None, :], float("inf"))
        flat = int(torch.argmin(delta))  # first minimum -> deterministic
        if not float(delta.view(-1)[flat]) < -tol:
            break
        i, j = divmod(flat, E)
        a, b = int(assign[i]), int(assign[j])
        R[:, a] += D[:, j] - D[:, i]
        R[:, b] += D[:, i] - D[:, j]
        assign[i], assign[j] = b, a
    return _canonical(assign, G)


def intra_group_similarity(S: Tensor, assignment: Tensor, num_groups: int) -> float:
    """Mean of S over ordered pairs (i != j) in the same group; 1.0 when groups are singletons."""
    a = assignment.to(S.device)
    E = a.numel()
    same = (a[:, None] == a[None, :]) & ~torch.eye(E, dtype=torch.bool, device=S.device)
    if not bool(same.any()):
        return 1.0
    return float(S.to(torch.float64)[same].mean())


# ----------------------------------------------------------------------------------------------
# label matching
# ----------------------------------------------------------------------------------------------

def _hungarian_min(cost: np.ndarray) -> np.ndarray:
    """Square min-cost assignment (Kuhn-Munkres with potentials, O(n^3), inner loop in numpy).

    Returns col_of_row: row r is matched to column col_of_row[r].
    """
    n = cost.shape[0]
    INF = float("inf")
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j] = row matched to column j (1-based, 0 = none)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, INF)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1, :] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], INF)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            used_idx = np.nonzero(used)[0]
            u[p[used_idx]] += delta
            v[used_idx] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while True:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
            if j0 == 0:
                break
    col_of_row = np.zeros(n, dtype=np.int64)
    for j in range(1, n + 1):
        col_of_row[p[j] - 1] = j - 1
    return col_of_row


def match_group_labels(old_assignment: Tensor, new_assignment: Tensor, num_groups: int) -> Tensor:
    """Relabel new_assignment's groups to overlap old_assignment maximally (partition unchanged)."""
    G = int(num_groups)
    old = old_assignment.detach().to("cpu", torch.long)
    new = new_assignment.detach().to("cpu", torch.long)
    if old.shape != new.shape:
        raise ValueError(f"assignment shapes differ: {tuple(old.shape)} vs {tuple(new.shape)}")
    overlap = torch.zeros(G, G, dtype=torch.float64)  # overlap[new label, old label]
    overlap.index_put_((new, old), torch.ones(new.numel(), dtype=torch.float64), accumulate=True)
    # Own exact Hungarian: deterministic, and scipy is not a dependency.
    mapping = torch.from_numpy(_hungarian_min(-overlap.numpy()))
    return mapping[new].to(new_assignment.device)


# ----------------------------------------------------------------------------------------------
# cached S_param
# ----------------------------------------------------------------------------------------------

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
