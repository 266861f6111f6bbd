"""Regroups (core/regroup.py): what they preserve, what moves with an expert (router rows,
optimizer moments), and no loss spike across them."""

import pytest
import torch

from trilemma_moe.core.layer import ClusteredMoE
from layer_reference import D, F, _cfg, _layer, _perturb, _snapshot_by_expert, _force_new_grouping, _partition, _x


# ------------------------------------------------------------------ regroup: function ----------

def test_first_clustering_full_rank_preserves_experts():
    cfg = _cfg(rank=min(D, F), alpha=0.0)
    layer = _layer(cfg, gated=True)
    full = {n: layer.experts.full[n].detach().clone() for n in layer.spec.matrices}
    bias = {n: p.detach().clone() for n, p in layer.experts.bias.items()}
    layer.recluster(force=True)
    after = _snapshot_by_expert(layer)
    for n, w in full.items():  # before the first clustering expert e sits in slot e
        torch.testing.assert_close(after[n], w, rtol=0, atol=1e-10)
    for n, b in bias.items():
        torch.testing.assert_close(after[n], b, rtol=0, atol=0)
    # (the layer's function is not preserved in general: experts that change group are routed
    # through a different group prototype)


@pytest.mark.parametrize("G", [2, 4])
def test_full_rank_regroup_preserves_effective_weights(G):
    cfg = _cfg(num_experts=8, num_groups=G, top_k=2 if G == 2 else 1, rank=min(D, F), alpha=0.0)
    layer = _layer(cfg, gated=True)
    layer.recluster(force=True)
    _perturb(layer, scale=0.2, seed=G)
    before = _snapshot_by_expert(layer)
    slots_before = layer.slot_of_expert().clone()
    target = _force_new_grouping(layer, seed=G)
    assert layer.recluster(force=True)
    assert _partition(layer) == target
    moved = (layer.slot_of_expert() != slots_before)
    assert int(moved.sum()) > 0
    assert layer.stats()["moved_experts"] == int(moved.sum())
    after = _snapshot_by_expert(layer)
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=1e-10)


@pytest.mark.parametrize("K,rank", [(4, min(D, F)), (2, 3), (4, 3), (8, 2)])
def test_single_group_recluster_is_function_preserving(K, rank):
    """G = 1: the grouping can never change, so a forced regroup after the first clustering
    must leave the layer's function unchanged, for any rank."""
    cfg = _cfg(num_experts=K, num_groups=1, top_k=2, rank=rank)
    layer = _layer(cfg, gated=False)
    layer.recluster(force=True)
    layer.eval()
    x = _x((25, D), 3)
    y0 = layer(x)[0]
    assert layer.recluster(force=True)
    torch.testing.assert_close(layer(x)[0], y0, rtol=0, atol=1e-10)
    # also after the parameters moved away from a fresh decomposition (training)
    _perturb(layer, scale=0.1, seed=K)
    y1 = layer(x)[0]
    assert layer.recluster(force=True)
    torch.testing.assert_close(layer(x)[0], y1, rtol=0, atol=1e-10)


def test_unchanged_groups_keep_their_function_when_others_move():
    """G = 4, rank < full: a regroup that moves experts between two groups must leave the
    experts of untouched groups exactly as they were."""
    cfg = _cfg(num_experts=8, num_groups=4, top_k=1, rank=2, alpha=0.0)
    layer = _layer(cfg)
    layer.recluster(force=True)
    _perturb(layer, scale=0.1, seed=9)
    before = _snapshot_by_expert(layer)
    cur = layer.group_assignment().tolist()
    groups = [[e for e in range(8) if cur[e] == g] for g in range(4)]
    # swap one expert between groups 0 and 1; groups 2 and 3 stay
    target = [set(groups[0][:1] + groups[1][:1]), set(groups[0][1:] + groups[1][1:]),
              set(groups[2]), set(groups[3])]
    gen = torch.Generator().manual_seed(0)
    protos = torch.linalg.qr(torch.randn(D, 4, generator=gen, dtype=torch.float64))[0].T
    with torch.no_grad():
        for g, members in enumerate(target):
            for e in members:
                layer.centroids[e] = 5 * protos[g]
    assert layer.recluster(force=True)
    assert _partition(layer) == {frozenset(s) for s in target}
    after = _snapshot_by_expert(layer)
    for e in groups[2] + groups[3]:
        for n in before:
            torch.testing.assert_close(after[n][e], before[n][e], rtol=0, atol=1e-12)


def test_unchanged_groups_keep_their_factor_moments():
    """Adam moments of factors in groups a regroup leaves untouched stay as they were (the paper's
    re-decomposition of changed groups; the movers-only migration: tests/test_regroup_dynamic.py)."""
    cfg = _cfg(num_experts=8, num_groups=4, top_k=1, rank=2, alpha=0.0, burn_in=0, dynamic_regroup=False,
               regroup_migration="redecompose")
    layer = _layer(cfg)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    _train_steps(layer, opt, _x((64, D), 3), 3)
    assert layer.compressed
    slot_before = layer.slot_of_expert().clone()
    cur = layer.group_assignment().tolist()
    groups = [[e for e in range(8) if cur[e] == g] for g in range(4)]
    target = [set(groups[0][:1] + groups[1][:1]), set(groups[0][1:] + groups[1][1:]),
              set(groups[2]), set(groups[3])]
    protos = torch.linalg.qr(torch.randn(D, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    with torch.no_grad():
        for g, members in enumerate(target):
            for e in members:
                layer.centroids[e] = 5 * protos[g]
    factors = list(layer.experts.fa.values()) + list(layer.experts.fb.values())
    old = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in factors}
    assert layer.recluster(force=True)
    kept_slots = torch.cat([slot_before[torch.tensor(groups[g])] for g in (2, 3)])
    assert torch.equal(layer.slot_of_expert()[torch.tensor(groups[2] + groups[3])], kept_slots)
    for p in factors:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key][kept_slots], old[id(p)][key][kept_slots], rtol=0, atol=0)
        moved = torch.cat([slot_before[torch.tensor(groups[g])] for g in (0, 1)])
        assert float(opt.state[p]["exp_avg"][moved].abs().sum()) == 0.0

# ------------------------------------------------------------------ regroup: router & state ----

def test_regroup_moves_router_rows_and_mixes_prototypes():
    cfg = _cfg(num_experts=8, num_groups=2, alpha=0.0)
    layer = _layer(cfg)
    layer.recluster(force=True)
    _perturb(layer, seed=4)
    with torch.no_grad():
        layer.router.group_proto.add_(0.3 * torch.randn_like(layer.router.group_proto))
    K = layer.experts_per_group
    old_slot = layer.slot_of_expert().clone()
    v_old = layer.router.expert_vec.detach().clone()
    u_old = layer.router.group_proto.detach().clone()
    b_old = {n: p.detach().clone() for n, p in layer.experts.bias.items()}
    _force_new_grouping(layer, seed=1)
    assert layer.recluster(force=True)
    new_slot = layer.slot_of_expert()
    assert int((new_slot != old_slot).sum()) > 0
    for e in range(8):
        torch.testing.assert_close(layer.router.expert_vec[new_slot[e]].detach(), v_old[old_slot[e]], rtol=0, atol=0)
        for n in b_old:
            torch.testing.assert_close(layer.experts.bias[n][new_slot[e]].detach(), b_old[n][old_slot[e]],
                                       rtol=0, atol=0)
    overlap = torch.zeros(2, 2, dtype=torch.float64)
    for e in range(8):
        overlap[int(new_slot[e]) // K, int(old_slot[e]) // K] += 1.0 / K
    ref_u = torch.stack([sum(overlap[g2, g] * u_old[g] for g in range(2)) for g2 in range(2)])
    torch.testing.assert_close(layer.router.group_proto.detach(), ref_u, rtol=0, atol=1e-12)


def _train_steps(layer, opt, x, n, target=None):
    losses = []
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        y, l_aux, _ = layer(x)
        fit = ((y - target) ** 2).mean() if target is not None else (y ** 2).mean()
        (fit + l_aux).backward()
        opt.step()
        losses.append(float(fit.detach()))
    return losses


def test_optimizer_state_rules_on_regroup():
    cfg = _cfg(num_experts=8, num_groups=2, burn_in=3, dynamic_regroup=False, alpha=0.0,
               regroup_migration="redecompose")
    layer = _layer(cfg, gated=True)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    x = _x((32, D), 5)
    _train_steps(layer, opt, x, 3)
    assert not layer.compressed
    full = list(layer.experts.full.values())
    assert all(p in opt.state for p in full)
    _train_steps(layer, opt, x, 4)  # the first of these clusters
    assert layer.compressed and layer.stats()["reclusters"] == 1
    for p in full:  # burn-in weights released
        assert p.numel() == 0 and not p.requires_grad and p.grad is None and p not in opt.state
    ex = layer.experts
    K = layer.experts_per_group
    tracked = {"base": list(ex.base.values()), "fa": list(ex.fa.values()), "fb": list(ex.fb.values()),
               "bias": list(ex.bias.values()), "v": [layer.router.expert_vec], "u": [layer.router.group_proto]}
    for ps in tracked.values():
        for p in ps:
            assert "exp_avg" in opt.state[p] and float(opt.state[p]["exp_avg_sq"].abs().sum()) > 0
    old = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for ps in tracked.values() for p in ps}
    old_slot = layer.slot_of_expert().clone()
    _force_new_grouping(layer, seed=2)
    assert layer.recluster(force=True)
    new_slot = layer.slot_of_expert()
    assert int((new_slot != old_slot).sum()) > 0
    # new slot s holds expert e; it came from old slot new_to_old[s]
    new_to_old = torch.empty(8, dtype=torch.long)
    for e in range(8):
        new_to_old[new_slot[e]] = old_slot[e]
    overlap = torch.zeros(2, 2, dtype=torch.float64)
    for e in range(8):
        overlap[int(new_slot[e]) // K, int(old_slot[e]) // K] += 1.0 / K
    for kind, ps in tracked.items():
        for p in ps:
            st, st0 = opt.state[p], old[id(p)]
            assert torch.equal(st["step"], st0["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                new, prev = st[key], st0[key]
                if kind in ("bias", "v"):
                    ref = prev[new_to_old]
                elif kind in ("base", "u"):
                    ref = torch.stack([sum(overlap[g2, g] * prev[g] for g in range(2)) for g2 in range(2)])
                elif key == "exp_avg":
                    ref = torch.zeros_like(prev)
                else:
                    ref = torch.stack([torch.full_like(prev[s], float(prev[new_to_old[s]].mean()))
                                       for s in range(8)])
                torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-15, msg=f"{kind} {key}")


@pytest.mark.parametrize("rank", [16, 4])
def test_no_loss_spike_across_regroups(rank):
    """Regroups every 10 steps (delta = 0 so they apply). At full rank (16 = min(d, d_ff)) the
    first clustering is exact too; at rank 4 the first clustering truncates by design, so only
    the later regroups are checked there. The step right after a regroup also checks the
    optimizer-state rules (fresh factors restart with scaled second moments)."""
    torch.manual_seed(0)
    cfg = _cfg(num_experts=8, num_groups=2, rank=rank, burn_in=10, recluster_interval=10, delta=0.0)
    layer = ClusteredMoE(16, 32, cfg).double()
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    layer.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    target = torch.tanh(x @ torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4)
    losses, applied = [], []
    for step in range(60):
        before = layer.stats()["reclusters"]
        losses += _train_steps(layer, opt, x, 1, target)
        if layer.stats()["reclusters"] > before:
            applied.append(step)
    assert applied == [10, 20, 30, 40, 50]
    for s in (applied if rank == 16 else applied[1:]):
        assert losses[s] <= 1.05 * losses[s - 1], (s, losses[s - 1], losses[s])
        assert losses[s + 1] <= 1.05 * losses[s - 1], (s, losses[s - 1], losses[s + 1])
    assert losses[-1] < 0.5 * losses[0]
