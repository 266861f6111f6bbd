"""Regroups after the first clustering (issue: dynamic == static): the CountSketch S_param and its
error bound, the probe similarity, the move cost, and that regroups now move experts.

Every mechanism against a plain reference on fresh random inputs (float64 where it matters)."""
import math

import pytest
import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core import regroup
from trilemma_moe.core.layer import ClusteredMoE
from trilemma_moe.core.similarity import (_PRIME, CountSketch, cosine_similarity_matrix, probe_logit_similarity,
                                          sketch_error_bound)


def _correlated_rows(E, D, gen):
    """E rows with a spread of cosines: 4 clusters of shared directions plus individual noise."""
    centres = torch.randn(4, D, generator=gen, dtype=torch.float64)
    mix = torch.rand(E, 1, generator=gen, dtype=torch.float64)
    return mix * centres[torch.arange(E) % 4] + torch.randn(E, D, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------ CountSketch --------------------
def _reference_sketch(rows, size, sk):
    """Coordinate by coordinate with Python integers (no int64 arithmetic): bucket and sign."""
    out = torch.zeros(rows.shape[0], size, dtype=torch.float64)
    for j in range(rows.shape[1]):
        hb = 0
        for c in sk._bucket:
            hb = (hb * (j % _PRIME) + c) % _PRIME
        hs = 0
        for c in sk._sign:
            hs = (hs * (j % _PRIME) + c) % _PRIME
        out[:, hb % size] += (1 if hs & 1 else -1) * rows[:, j]
    return out


def test_count_sketch_matches_a_coordinate_loop_and_is_chunk_invariant():
    gen = torch.Generator().manual_seed(11)
    rows = torch.randn(3, 300, generator=gen, dtype=torch.float64)
    sk = CountSketch(17, seed=5)
    whole = torch.zeros(3, 17, dtype=torch.float64)
    sk.add(whole, rows, 0)
    assert torch.allclose(whole, _reference_sketch(rows, 17, sk), rtol=0, atol=1e-12)
    # any cut into chunks, added in any order, gives the same sketch (ranks sketch their own rows)
    parts = torch.zeros(3, 17, dtype=torch.float64)
    for start, stop in ((200, 300), (0, 77), (77, 200)):
        sk.add(parts, rows[:, start:stop], start)
    assert torch.allclose(parts, whole, rtol=0, atol=1e-12)
    # the map depends on the seed only
    again = torch.zeros(3, 17, dtype=torch.float64)
    CountSketch(17, seed=5).add(again, rows, 0)
    assert torch.equal(again, whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sketched_cosines_stay_within_the_stated_bound(seed):
    """For unit rows the sketched inner product is unbiased with variance <= 2/s: its mean squared
    error over all pairs is below 2/s, and at most ``failure`` of the pairs miss by more than
    ``sketch_error_bound(s, failure)`` (Chebyshev)."""
    gen = torch.Generator().manual_seed(100 + seed)
    E, D, s = 32, 1 << 15, 1024
    rows = _correlated_rows(E, D, gen)
    unit = rows / rows.norm(dim=1, keepdim=True)
    exact = cosine_similarity_matrix(rows)
    out = torch.zeros(E, s, dtype=torch.float64)
    CountSketch(s, seed=seed).add(out, unit, 0)
    est = out @ out.T
    off = ~torch.eye(E, dtype=torch.bool)
    err = (est - exact)[off]
    assert float(err.pow(2).mean()) <= 2.0 / s
    for failure in (0.05, 0.2):
        assert float((err.abs() > sketch_error_bound(s, failure)).double().mean()) <= failure
    assert exact[off].abs().max() > 0.3   # the test inputs do have similar pairs


def test_sketch_error_bound_formula():
    assert sketch_error_bound(4096, 0.05) == pytest.approx(math.sqrt(2 / (4096 * 0.05)))


# ------------------------------------------------------------------ probe similarity ---------------
def test_probe_logit_similarity_against_a_float64_loop():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 6, generator=gen)
    got = probe_logit_similarity(logits)
    z = logits.double()
    z = z - z.mean(1, keepdim=True)
    for i in range(6):
        for j in range(6):
            ref = float(z[:, i] @ z[:, j]) / float(z[:, i].norm() * z[:, j].norm())
            assert got[i, j].item() == pytest.approx(1.0 if i == j else ref, abs=1e-12)


# ------------------------------------------------------------------ weight chunks ------------------
@pytest.mark.parametrize("gated", [False, True])
def test_weight_chunks_are_the_effective_weights(gated):
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, burn_in=0)
    layer = ClusteredMoE(12, 20, cfg, gated=gated, activation="silu")
    layer.recluster(force=True)
    with torch.no_grad():
        for p in layer.experts.fa.values():
            p.normal_()
    ex = layer.experts
    for with_base in (True, False):
        eff = ex.effective_weights(True)
        if not with_base:   # the residuals only: effective minus each slot's group base
            eff = {n: w - ex.base[n].detach().repeat_interleave(ex.K, 0) for n, w in eff.items()}
        flat = torch.cat([w.reshape(8, -1) for w in eff.values()], dim=1)
        got = torch.zeros_like(flat)
        for offset, chunk in ex.weight_chunks(True, with_base=with_base, max_elems=100):
            got[:, offset:offset + chunk.shape[1]] = chunk
        assert torch.allclose(got, flat, atol=1e-6)
        assert max(c.numel() for _, c in ex.weight_chunks(True, max_elems=100)) <= 8 * 20


# ------------------------------------------------------------------ regroups that move experts ----
def _trained_layer(sim, move_cost, steps=40, seed=0):
    cfg = TrilemmaMoEConfig(num_experts=16, num_groups=4, rank=4, burn_in=5, recluster_interval=5,
                            regroup_similarity=sim, regroup_move_cost=move_cost, seed=seed,
                            dynamic_regroup=True)   # regroup checks every 5 steps (the default clusters once)
    torch.manual_seed(seed)
    layer = ClusteredMoE(32, 64, cfg)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y, l_aux, _ = layer(torch.randn(128, 32, generator=gen))
        (y.pow(2).mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    return layer


def test_the_paper_similarity_is_a_fixed_point_and_the_probe_one_is_not():
    """After compression a group's members share a base (S_param) and only its tokens (S_task):
    the paper's similarity confirms the grouping in place; the probe similarity moves experts,
    and each move is reported (stats, events) with the measured error of the movers."""
    paper = _trained_layer("weights", 0.0)
    s = paper.stats()
    assert s["skipped_reclusters"] >= 5 and s["experts_moved"] == 0 and abs(s["last_gain"]) < 1e-9
    probe = _trained_layer("probe", 0.0)
    s = probe.stats()
    assert s["experts_moved"] > 0 and s["experts_moved"] == sum(e["moved"] for e in probe.regroup_events)
    assert all(0.0 < e["movers_error"] < 1.0 and e["gain"] >= probe.config.delta for e in probe.regroup_events)
    assert s["regroup_seconds"] > 0


def test_the_move_cost_only_removes_moves():
    moved = [_trained_layer("probe", lam).stats()["experts_moved"] for lam in (0.0, 0.3, 5.0)]
    assert moved[0] >= moved[1] >= moved[2] == 0 and moved[0] > 0


def test_probe_similarity_sees_router_preferences_not_routing():
    """Two experts in different groups given the same router vector and residuals: the probe
    similarity rates them alike (1.0) whatever the routing sent them, and a forced regroup puts
    them in one group."""
    layer = _trained_layer("probe", 0.0, steps=6)   # compressed at step 5
    K = layer.experts_per_group
    groups = layer.group_assignment()
    a = 0
    b = int((groups != groups[a]).nonzero()[0])
    slot = layer.slot_of_expert()
    with torch.no_grad():
        v = layer.router.expert_vec
        v[slot[b]] = v[slot[a]]
        for n in layer.experts.fa:
            layer.experts.fa[n][slot[b]] = layer.experts.fa[n][slot[a]] * 10
            layer.experts.fb[n][slot[b]] = layer.experts.fb[n][slot[a]]
            layer.experts.fa[n][slot[a]] *= 10
    probe = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    flat = regroup.param_sketches(layer, slot)
    sim = regroup.similarity_for_regroup(layer, flat, slot, groups, probe)
    assert sim[a, b].item() == pytest.approx(1.0, abs=1e-9)
    layer.recluster(force=True, probe=probe)
    new = layer.group_assignment()
    assert new[a] == new[b] and (new != groups).sum() > 0
    assert K == 4


def test_a_probe_without_tokens_moves_nothing():
    layer = _trained_layer("probe", 0.0, steps=6)
    before = layer.group_assignment()
    layer.probe = None
    assert not layer.recluster()
    assert torch.equal(layer.group_assignment(), before) and layer.stats()["last_gain"] == 0.0


def test_an_empty_micro_batch_keeps_the_probe():
    layer = _trained_layer("probe", 0.0, steps=2)
    kept = layer.probe.clone()
    y, l_aux, _ = layer(torch.zeros(0, 32))
    (y.sum() + l_aux).backward()
    assert torch.equal(layer.probe, kept)
    x = torch.randn(1000, 32)
    layer(x)
    assert layer.probe.shape == (layer.config.probe_tokens, 32)
    assert torch.equal(layer.probe[0], x[0]) and torch.equal(layer.probe[-1], x[-1])


@pytest.mark.parametrize("knob,value", [("regroup_similarity", "outputs"), ("svd", "fast"),
                                        ("regroup_move_cost", -1.0), ("probe_tokens", 0),
                                        ("param_sketch_size", 0)])
def test_bad_regroup_knobs_name_themselves(knob, value):
    with pytest.raises(ValueError, match=knob):
        TrilemmaMoEConfig(**{knob: value})


# ------------------------------------------------------------------ movers-only migration ---------
def test_movers_only_migration_against_a_float64_reference():
    """regroup_migration="movers": every base (value and moments) and every staying expert's
    factors (values and moments) are untouched; a mover's factors are the rank-r truncated SVD of
    its weights minus its new group's base (computed here in float64), with fresh moments (first
    zero, second the old row's mean); the reported movers' error is that truncation's."""
    from layer_reference import _force_new_grouping
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=4, top_k=1, rank=2, alpha=0.0, burn_in=0,
                            dynamic_regroup=False, regroup_migration="movers")
    torch.manual_seed(4)
    layer = ClusteredMoE(16, 24, cfg).double()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        y, l_aux, _ = layer(x)
        (y.pow(2).mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    assert layer.compressed
    ex, K = layer.experts, layer.experts_per_group
    eff = ex.effective_weights(True)
    old_slot = layer.slot_of_expert().clone()
    base = {n: p.detach().clone() for n, p in ex.base.items()}
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()}
             for p in [*ex.base.values(), *ex.fa.values(), *ex.fb.values()]}
    old_fa = {n: p.detach().clone() for n, p in ex.fa.items()}
    _force_new_grouping(layer, seed=3)
    assert layer.recluster(force=True)
    new_slot = layer.slot_of_expert()
    movers = [e for e in range(8) if int(new_slot[e]) // K != int(old_slot[e]) // K]
    stayers = [e for e in range(8) if e not in movers]
    assert movers and stayers and all(int(new_slot[e]) == int(old_slot[e]) for e in stayers)
    errors = []
    for n in ex.base:
        assert torch.equal(ex.base[n].detach(), base[n])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[ex.base[n]][key], state[id(ex.base[n])][key])
        for e in stayers:
            s = int(new_slot[e])
            assert torch.equal(ex.fa[n][s].detach(), old_fa[n][s])
            assert torch.equal(opt.state[ex.fa[n]]["exp_avg"][s], state[id(ex.fa[n])]["exp_avg"][s])
        after = ex.effective_weights(True)[n]
        for e in movers:
            s, s0 = int(new_slot[e]), int(old_slot[e])
            residual = eff[n][s0] - base[n][s // K]
            u, sv, vh = torch.linalg.svd(residual)
            ref = base[n][s // K] + (u[:, :2] * sv[:2]) @ vh[:2]
            torch.testing.assert_close(after[s], ref, rtol=0, atol=1e-10)
            errors.append(float((eff[n][s0] - ref).norm() / eff[n][s0].norm()))
            assert float(opt.state[ex.fa[n]]["exp_avg"][s].abs().sum()) == 0.0
            sq0 = state[id(ex.fa[n])]["exp_avg_sq"][s0].mean()
            torch.testing.assert_close(opt.state[ex.fa[n]]["exp_avg_sq"][s], torch.full_like(
                opt.state[ex.fa[n]]["exp_avg_sq"][s], float(sq0)), rtol=1e-12, atol=0)
    per_mover = torch.tensor(errors, dtype=torch.float64).view(len(ex.base), len(movers)).mean(0)
    assert layer.stats()["movers_error"] == pytest.approx(float(per_mover.mean()), rel=1e-9)


# ------------------------------------------------------------------ only the movers' weights -------
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_slot_weights_are_the_effective_weights_rows_bitwise(gated, compressed, dtype):
    """Any subset of slots (out of order, repeated, empty) is bitwise the same rows of
    ``effective_weights``, which are base[slot // K] + A B^T (or the full weights) in >= float32."""
    from trilemma_moe.core.experts import ExpertSlots, ExpertSpec
    ex = ExpertSlots(ExpertSpec(12, 20, "silu", gated, True), 3, 4, 3, seed=2).to(dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    eff = ex.effective_weights(compressed)
    for n, (di, do) in ex.spec.matrices.items():
        if compressed:
            ref = (ex.base[n].detach().double().repeat_interleave(4, 0)
                   + ex.fa[n].detach().double() @ ex.fb[n].detach().double().transpose(-1, -2))
        else:
            ref = ex.full[n].detach().double()
        assert eff[n].dtype == dt and eff[n].shape == (12, di, do)
        torch.testing.assert_close(eff[n].double(), ref, rtol=1e-5, atol=1e-5)
        for slots in ([11, 0, 5], [3], [7, 7, 2, 9, 4, 1], [], list(range(12))):
            idx = torch.tensor(slots, dtype=torch.long)
            got = ex.slot_weights(n, idx, compressed)
            assert got.dtype == dt and got.shape == (len(slots), di, do)
            assert torch.equal(got, eff[n][idx])


def _recording_slot_weights(layer, calls):
    """Wraps the layer's ``ExpertSlots.slot_weights`` to record (matrix, slots, compressed)."""
    inner = layer.experts.slot_weights

    def record(name, slots, compressed, read=lambda p: p.detach()):
        calls.append((name, sorted(slots.tolist()), compressed))
        return inner(name, slots, compressed, read=read)
    layer.experts.slot_weights = record


@pytest.mark.parametrize("low_rank", [True, False])
def test_a_movers_regroup_builds_only_the_movers_weights(low_rank):
    """After the first clustering (which needs whole groups: every slot's burn-in weights), a
    regroup with the movers migration builds effective weights for the movers' old slots only,
    once per matrix; the full-experts ablation builds none."""
    from layer_reference import _force_new_grouping
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=4, top_k=1, rank=2, alpha=0.0, burn_in=0,
                            dynamic_regroup=False, regroup_migration="movers", low_rank=low_rank,
                            regroup_similarity="weights")   # the forced centroids decide the grouping
    torch.manual_seed(4)
    layer = ClusteredMoE(16, 24, cfg, gated=True, activation="silu")
    calls = []
    _recording_slot_weights(layer, calls)
    layer(torch.randn(64, 16, generator=torch.Generator().manual_seed(5)))   # burn_in=0: clusters first
    assert layer.clustered
    names = sorted(layer.experts.spec.matrices)
    assert sorted(calls) == ([(n, list(range(8)), False) for n in names] if low_rank else [])
    calls.clear()
    for seed in (3, 4):
        old_slot = layer.slot_of_expert().clone()
        _force_new_grouping(layer, seed=seed)
        assert layer.recluster(force=True)
        new_slot = layer.slot_of_expert()
        movers = [e for e in range(8) if int(new_slot[e]) // 2 != int(old_slot[e]) // 2]
        assert 0 < len(movers) < 8
        wanted = sorted(int(old_slot[e]) for e in movers)
        assert sorted(calls) == ([(n, wanted, True) for n in names] if low_rank else [])
        calls.clear()
