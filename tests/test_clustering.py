"""Clustering core (paper 3.1): every mechanism against a plain reference computation."""
import itertools
import math

import pytest
import torch

from trilemma_moe.core.clustering import (
    ParamSimilarityCache,
    balanced_kmeans,
    cosine_similarity_matrix,
    fuse_similarity,
    intra_group_similarity,
    match_group_labels,
    param_similarity,
    prune_neighbors,
    task_similarity,
    update_centroids,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ref_cosine(x):
    rows = x.double().tolist()
    E = len(rows)
    out = torch.zeros(E, E, dtype=torch.float64)
    for i in range(E):
        for j in range(E):
            if i == j:
                out[i, j] = 1.0
                continue
            dot = sum(a * b for a, b in zip(rows[i], rows[j]))
            ni = math.sqrt(sum(a * a for a in rows[i]))
            nj = math.sqrt(sum(b * b for b in rows[j]))
            out[i, j] = 0.0 if ni == 0 or nj == 0 else dot / (ni * nj)
    return out


def _random_sym_similarity(E, seed):
    x = torch.randn(E, 6, generator=_gen(seed))
    return cosine_similarity_matrix(x)


# ---------------------------------------------------------------- similarity -----------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_matches_hand_loop(seed):
    x = torch.randn(7, 13, generator=_gen(seed))
    S = cosine_similarity_matrix(x)
    assert S.dtype == torch.float64 and S.shape == (7, 7)
    torch.testing.assert_close(S, _ref_cosine(x), rtol=0, atol=1e-12)
    assert torch.equal(S, S.T)
    assert torch.equal(S.diagonal(), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(param_similarity(x), S)
    torch.testing.assert_close(task_similarity(x), S)


def test_cosine_zero_rows():
    x = torch.randn(6, 5, generator=_gen(3))
    x[2] = 0
    x[4] = 0
    S = cosine_similarity_matrix(x)
    torch.testing.assert_close(S, _ref_cosine(x), rtol=0, atol=1e-12)
    for z in (2, 4):
        for j in range(6):
            assert S[z, j] == (1.0 if j == z else 0.0)
            assert S[j, z] == S[z, j]


def test_cosine_chunked_float32_input(monkeypatch):
    import trilemma_moe.core.similarity as C
    monkeypatch.setattr(C, "_CHUNK_ELEMS", 64)  # force many column chunks
    x = torch.randn(5, 301, generator=_gen(4))
    torch.testing.assert_close(C.cosine_similarity_matrix(x), _ref_cosine(x), rtol=0, atol=1e-12)


def test_fuse_by_hand():
    a = _random_sym_similarity(6, 5)
    b = _random_sym_similarity(6, 6)
    S = fuse_similarity(a, b, 0.7)
    for i in range(6):
        for j in range(6):
            assert abs(float(S[i, j]) - (0.7 * float(a[i, j]) + 0.3 * float(b[i, j]))) < 1e-12
    with pytest.raises(ValueError):
        fuse_similarity(a, b, 1.5)


# ---------------------------------------------------------------- pruning --------------------

def _ref_prune(S, tau, top_n):
    E = S.shape[0]
    L = S.tolist()
    keep_top = [[True] * E for _ in range(E)]
    if top_n is not None:
        keep_top = [[False] * E for _ in range(E)]
        for i in range(E):
            others = sorted((j for j in range(E) if j != i), key=lambda j: (-L[i][j], j))
            for j in others[:top_n]:
                keep_top[i][j] = True
    out = torch.empty(E, E, dtype=S.dtype)
    for i in range(E):
        for j in range(E):
            if i == j:
                out[i, j] = 1.0
                continue
            ok = (tau is None or L[i][j] >= tau) and (keep_top[i][j] or keep_top[j][i])
            out[i, j] = L[i][j] if ok else -1.0
    return out


@pytest.mark.parametrize("tau,top_n", [(0.1, None), (None, 2), (0.0, 3), (None, 20), (-0.2, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_prune_matches_hand_loop(tau, top_n, seed):
    S = _random_sym_similarity(9, 10 + seed)
    P = prune_neighbors(S, tau=tau, top_n=top_n)
    torch.testing.assert_close(P, _ref_prune(S, tau, top_n), rtol=0, atol=0)
    assert torch.equal(P, P.T)
    assert torch.equal(P.diagonal(), torch.ones(9, dtype=torch.float64))


def test_prune_none_is_copy():
    S = _random_sym_similarity(5, 7)
    P = prune_neighbors(S)
    assert torch.equal(P, S) and P.data_ptr() != S.data_ptr()


# ---------------------------------------------------------------- centroids ------------------

def test_update_centroids_by_hand():
    g = _gen(11)
    E, d, beta = 6, 4, 0.05
    mu = torch.randn(E, d, generator=g)
    init = torch.tensor([True, True, False, False, True, False])
    sums = torch.randn(E, d, generator=g)
    counts = torch.tensor([3, 0, 2, 0, 1, 5])
    mu0, init0, sums0 = mu.clone(), init.clone(), sums.clone()
    new, new_init = update_centroids(mu, init, sums, counts, beta)
    assert new.dtype == torch.float32
    for i in range(E):
        if counts[i] == 0:
            exp = mu[i]
        elif init[i]:
            exp = (1 - beta) * mu[i] + beta * sums[i] / float(counts[i])
        else:
            exp = sums[i] / float(counts[i])
        torch.testing.assert_close(new[i], exp)
    assert new_init.tolist() == [True, True, True, False, True, True]
    # Count-0 experts bit-for-bit unchanged; inputs untouched.
    assert torch.equal(new[1], mu0[1]) and torch.equal(new[3], mu0[3])
    assert torch.equal(mu, mu0) and torch.equal(init, init0) and torch.equal(sums, sums0)


# ---------------------------------------------------------------- balanced k-means -----------

SHAPES = [(8, 2), (8, 4), (16, 4), (32, 8), (64, 8), (12, 3), (32, 32), (32, 1)]


@pytest.mark.parametrize("E,G", SHAPES)
def test_kmeans_exactly_balanced_and_canonical(E, G):
    D = 1 - _random_sym_similarity(E, E * 100 + G)
    for seed in range(20):
        a = balanced_kmeans(D, G, seed)
        assert a.dtype == torch.long and a.shape == (E,)
        assert torch.bincount(a, minlength=G).tolist() == [E // G] * G
        # Canonical: groups numbered by their smallest member.
        firsts = [int(torch.nonzero(a == g)[0]) for g in range(G)]
        assert firsts == sorted(firsts) and firsts[0] == 0


@pytest.mark.parametrize("E,G", [(16, 4), (64, 8)])
def test_kmeans_deterministic(E, G):
    D = 1 - _random_sym_similarity(E, 42)
    for seed in (0, 5, 9):
        assert torch.equal(balanced_kmeans(D, G, seed), balanced_kmeans(D.clone(), G, seed))


def _same_partition(a, b):
    E = a.numel()
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :]) and E == b.numel()


@pytest.mark.parametrize("E,G", [(16, 4), (32, 8), (64, 8), (12, 3), (64, 16)])
@pytest.mark.parametrize("trial", [0, 1, 2])
def test_kmeans_recovers_planted_clusters(E, G, trial):
    g = _gen(1000 * E + 10 * G + trial)
    K = E // G
    labels = torch.arange(E) // K
    S = torch.where(labels[:, None] == labels[None, :], 0.8, 0.0).double()
    noise = 0.1 * torch.randn(E, E, generator=g, dtype=torch.float64)
    S = S + 0.5 * (noise + noise.T)
    S.fill_diagonal_(1.0)
    perm = torch.randperm(E, generator=g)
    S, planted = S[perm][:, perm], labels[perm]
    for seed in (0, 1, 2):
        a = balanced_kmeans(1 - S, G, seed)
        assert _same_partition(a, planted)


@pytest.mark.parametrize("E,G", [(16, 4), (32, 8), (64, 8)])
def test_kmeans_beats_random_balanced(E, G):
    S = _random_sym_similarity(E, 77 + E)
    D = 1 - S
    a = balanced_kmeans(D, G, 3)

    def intra(assign):
        same = assign[:, None] == assign[None, :]
        return float(D[same].sum())

    g = _gen(8)
    for _ in range(10):
        rnd = (torch.arange(E) // (E // G))[torch.randperm(E, generator=g)]
        assert intra(a) <= intra(rnd) + 1e-9


def test_kmeans_rejects_indivisible():
    D = 1 - _random_sym_similarity(10, 0)
    with pytest.raises(ValueError, match="num_groups"):
        balanced_kmeans(D, 3, 0)


def test_kmeans_balances_256_experts_into_32_groups():
    # the size of a large layer: every group gets exactly E/G members (speed is benchmarks' business)
    D = 1 - _random_sym_similarity(256, 1)
    a = balanced_kmeans(D, 32, 0)
    assert torch.bincount(a, minlength=32).tolist() == [8] * 32


# ---------------------------------------------------------------- intra-group similarity -----

def test_intra_group_similarity_by_hand():
    S = _random_sym_similarity(12, 21)
    a = (torch.arange(12) // 3)[torch.randperm(12, generator=_gen(2))]
    total, n = 0.0, 0
    for i in range(12):
        for j in range(12):
            if i != j and a[i] == a[j]:
                total += float(S[i, j])
                n += 1
    assert abs(intra_group_similarity(S, a, 4) - total / n) < 1e-12
    assert intra_group_similarity(S, torch.arange(12), 12) == 1.0


# ---------------------------------------------------------------- label matching -------------

@pytest.mark.parametrize("seed", range(8))
def test_match_group_labels_vs_brute_force(seed):
    g = _gen(seed)
    E, G = 16, 4
    old = (torch.arange(E) // 4)[torch.randperm(E, generator=g)]
    new = (torch.arange(E) // 4)[torch.randperm(E, generator=g)]
    if seed % 2:  # nearly the same partition, shuffled labels
        new = torch.randperm(G, generator=g)[old]
        i, j = 0, int(torch.nonzero(old != old[0])[0])
        new[i], new[j] = new[j].clone(), new[i].clone()
    m = match_group_labels(old, new, G)
    assert _same_partition(m, new)
    best = max(int(sum(int(p[int(n)] == int(o)) for n, o in zip(new, old)))
               for p in itertools.permutations(range(G)))
    assert int((m == old).sum()) == best


def test_match_group_labels_identity_and_permutation():
    old = torch.tensor([0, 0, 1, 1, 2, 2])
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(match_group_labels(old, perm[old], 3), old)


# ---------------------------------------------------------------- S_param cache --------------

def test_cache_first_call_and_partial_recompute():
    g = _gen(30)
    E, D = 8, 50
    w = torch.randn(E, D, generator=g)
    c = ParamSimilarityCache(lifetime=100, eps=0.05, seed=0)
    S0 = c.similarity(w, step=0)
    torch.testing.assert_close(S0, cosine_similarity_matrix(w), rtol=0, atol=0)
    assert c.full_recomputes == 1 and c.computed_step == 0

    w2 = w.clone()
    w2[1] += 0.5 * torch.randn(D, generator=g)
    w2[5] += 0.5 * torch.randn(D, generator=g)
    S1 = c.similarity(w2, step=3)
    assert sorted(c.last_recomputed.tolist()) == [1, 5]
    assert c.partial_recomputes == 1 and c.full_recomputes == 1
    torch.testing.assert_close(S1, cosine_similarity_matrix(w2), rtol=0, atol=1e-12)
    assert torch.equal(S1, S1.T)

    # Below eps: the cached value stays although the weights moved a little.
    w3 = w2.clone()
    w3[2] *= 1.0 + 1e-4
    w3[2, 0] += 1e-3
    S2 = c.similarity(w3, step=4)
    assert c.last_recomputed.numel() == 0
    assert torch.equal(S2, S1)
    assert not torch.equal(S2, cosine_similarity_matrix(w3))

    # Lifetime expiry recomputes everything.
    S3 = c.similarity(w3, step=100)
    assert c.full_recomputes == 2 and c.computed_step == 100
    torch.testing.assert_close(S3, cosine_similarity_matrix(w3), rtol=0, atol=0)
    assert sorted(c.last_recomputed.tolist()) == list(range(E))


def test_cache_sketch_large_dim_and_shape_change():
    g = _gen(31)
    E, D = 6, 3000
    w = torch.randn(E, D, generator=g)
    c = ParamSimilarityCache(lifetime=10, eps=0.02, seed=5, sketch_size=256)
    c.similarity(w, 0)
    w[4] = torch.randn(D, generator=g)
    S = c.similarity(w, 1)
    assert c.last_recomputed.tolist() == [4]
    torch.testing.assert_close(S, cosine_similarity_matrix(w), rtol=0, atol=1e-12)
    # A different number of experts forces a full recompute.
    w5 = w[:5].clone()
    S5 = c.similarity(w5, 2)
    assert c.full_recomputes == 2 and S5.shape == (5, 5)
    c.invalidate()
    c.similarity(w5, 3)
    assert c.full_recomputes == 3


def test_cache_state_dict_roundtrip(tmp_path):
    g = _gen(32)
    w = torch.randn(6, 40, generator=g)
    c = ParamSimilarityCache(lifetime=50, eps=0.05, seed=1)
    c.similarity(w, 7)
    path = tmp_path / "cache.pt"
    torch.save(c.state_dict(), path)
    state = torch.load(path, weights_only=True)
    c2 = ParamSimilarityCache(lifetime=50, eps=0.05, seed=1)
    c2.load_state_dict(state)
    assert c2.computed_step == 7 and c2.full_recomputes == 1
    w2 = w.clone()
    w2[3] += torch.randn(40, generator=g)
    S_a, S_b = c.similarity(w2, 8), c2.similarity(w2, 8)
    assert torch.equal(S_a, S_b)
    assert c2.last_recomputed.tolist() == [3] and c2.full_recomputes == 1
    # Empty cache round-trips too.
    empty = ParamSimilarityCache(lifetime=5, eps=0.1, seed=0)
    torch.save(empty.state_dict(), path)
    e2 = ParamSimilarityCache(lifetime=5, eps=0.1, seed=0)
    e2.load_state_dict(torch.load(path, weights_only=True))
    assert e2.computed_step is None
    e2.similarity(w, 0)
    assert e2.full_recomputes == 1
