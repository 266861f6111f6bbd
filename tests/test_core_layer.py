"""ClusteredMoE (core/layer.py) against explicit per-token float64 references.

Every expectation is recomputed here from the layer's raw parameters (router prototypes and
expert vectors, full / base / factor / bias tensors) with python loops; nothing is taken from
the layer's routing, dispatch or combine internals.
"""
import math
import statistics

import pytest
import torch
from torch.func import functional_call

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 6, 10


# ------------------------------------------------------------------ helpers --------------------

def _cfg(**kw):
    base = dict(num_experts=8, num_groups=2, rank=3, top_k=2, group_top_k=1, burn_in=10 ** 6,
                gamma=None, router_temperature_steps=1000)
    base.update(kw)
    return TrilemmaMoEConfig(**base)


def _layer(cfg=None, d=D, f=F, **kw):
    return ClusteredMoE(d, f, cfg or _cfg(), **kw).double()


def _act(name, z):
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "silu":
        return z / (1.0 + torch.exp(-z))
    raise KeyError(name)


def _temp(cfg, step):
    """Linear schedule start -> end over router_temperature_steps, then flat (by hand)."""
    n = cfg.router_temperature_steps
    if n == 0:
        return cfg.router_temperature_end
    frac = min(step, n) / n
    return cfg.router_temperature_start + frac * (cfg.router_temperature_end - cfg.router_temperature_start)


def _softmax(vals):
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    s = sum(e)
    return [x / s for x in e]


def _slot_weights(layer):
    """Per-slot float64 matrices {name: [E x (d_in, d_out)]} and biases, read from the parameters."""
    ex, K = layer.experts, layer.experts_per_group
    W = {}
    for name in layer.spec.matrices:
        mats = []
        for s in range(layer.num_experts):
            if layer.compressed:
                mats.append(ex.base[name][s // K].detach().double()
                            + ex.fa[name][s].detach().double() @ ex.fb[name][s].detach().double().T)
            else:
                mats.append(ex.full[name][s].detach().double())
        W[name] = mats
    b = {name: ex.bias[name].detach().double() for name in layer.spec.biases}
    return W, b


def _ref_routes(layer, x, temperature):
    """Per token {slot: p_g * p_i}, from x @ group_proto.T / t and x @ expert_vec.T / t."""
    G, K = layer.num_groups, layer.experts_per_group
    g1, k = layer.config.group_top_k, layer.config.top_k
    u = layer.router.group_proto.detach().double()
    v = layer.router.expert_vec.detach().double()
    routes = []
    for t in range(x.shape[0]):
        gl = [(float(u[g] @ x[t]) / temperature) for g in range(G)]
        pg = _softmax(gl)
        chosen = {}
        for g in sorted(range(G), key=lambda g: -pg[g])[:g1]:
            el = [float(v[g * K + j] @ x[t]) / temperature for j in range(K)]
            pi = _softmax(el)
            for j in sorted(range(K), key=lambda j: -pi[j])[:k]:
                chosen[g * K + j] = pg[g] * pi[j]
        routes.append(chosen)
    return routes


def _ref_forward(layer, hidden, temperature, used=None):
    """Explicit per-token, per-expert float64 computation. Returns (y, exp_counts by expert id)."""
    gated = layer.spec.gated
    act = layer.spec.activation
    x = hidden.detach().double().reshape(-1, layer.hidden_size)
    W, b = _slot_weights(layer)
    keep = [True] * x.shape[0] if used is None else [bool(u) for u in used.reshape(-1).tolist()]
    y = torch.zeros_like(x)
    slot_counts = [0] * layer.num_experts
    routes = _ref_routes(layer, x, temperature)
    for t in range(x.shape[0]):
        if not keep[t]:
            continue
        for s, w in routes[t].items():
            pre = x[t] @ W["w1"][s] + (b["b1"][s] if "b1" in b else 0.0)
            h = _act(act, pre)
            if gated:
                h = h * (x[t] @ W["w3"][s] + (b["b3"][s] if "b3" in b else 0.0))
            y[t] += w * (h @ W["w2"][s] + (b["b2"][s] if "b2" in b else 0.0))
            slot_counts[s] += 1
    soe = layer.slot_of_expert().tolist()
    counts = torch.tensor([slot_counts[soe[e]] for e in range(layer.num_experts)])
    return y.reshape(hidden.shape), counts


def _perturb(layer, scale=0.1, seed=0):
    """Move the parameters in use off their freshly decomposed values (simulates training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.experts.expert_parameters(layer.compressed):
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _snapshot_by_expert(layer):
    """Effective weights and biases per expert id (float64)."""
    eff = layer.experts.effective_weights(layer.compressed)
    soe = layer.slot_of_expert()
    out = {n: w[soe].clone() for n, w in eff.items()}
    for n, p in layer.experts.bias.items():
        out[n] = p.detach()[soe].clone()
    return out


def _force_new_grouping(layer, seed=0):
    """Set activation centroids so that a task-similarity clustering (alpha = 0) must produce a
    partition different from the current one. Returns the target partition (list of sets)."""
    E, G, K = layer.num_experts, layer.num_groups, layer.experts_per_group
    cur = layer.group_assignment().tolist()
    cur_sets = {frozenset(e for e in range(E) if cur[e] == g) for g in range(G)}
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(E, generator=gen).tolist()
        target = [None] * E
        for pos, e in enumerate(perm):
            target[e] = pos // K
        target_sets = {frozenset(e for e in range(E) if target[e] == g) for g in range(G)}
        if target_sets != cur_sets:
            break
    protos = torch.linalg.qr(torch.randn(layer.hidden_size, G, generator=gen, dtype=torch.float64))[0].T
    with torch.no_grad():
        for e in range(E):
            layer.centroids[e] = (protos[target[e]] * 5
                                  + 0.01 * torch.randn(layer.hidden_size, generator=gen, dtype=torch.float64))
    return target_sets


def _partition(layer):
    a = layer.group_assignment().tolist()
    return {frozenset(e for e in range(layer.num_experts) if a[e] == g) for g in range(layer.num_groups)}


def _x(shape, seed):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64)


# ------------------------------------------------------------------ forward vs reference -------

_VARIANTS = [
    # E, G, k, g1, gated, bias, activation
    (8, 2, 2, 1, False, True, "gelu"),
    (8, 2, 2, 1, True, True, "silu"),
    (8, 4, 1, 2, False, False, "relu"),
    (12, 3, 2, 2, True, False, "gelu_tanh"),
    (16, 4, 3, 2, False, True, "gelu"),
    (8, 2, 4, 2, True, True, "gelu"),
]


@pytest.mark.parametrize("E,G,k,g1,gated,bias,act", _VARIANTS)
@pytest.mark.parametrize("phase", ["full", "compressed"])
def test_forward_matches_reference(E, G, k, g1, gated, bias, act, phase):
    cfg = _cfg(num_experts=E, num_groups=G, top_k=k, group_top_k=g1)
    layer = _layer(cfg, gated=gated, bias=bias, activation=act)
    if phase == "compressed":
        assert layer.recluster(force=True)
        assert layer.compressed
        _perturb(layer, seed=E + G)
    layer.eval()
    x = _x((3, 5, D), seed=E * 10 + k)
    y, l_aux, counts = layer(x)
    ref_y, ref_counts = _ref_forward(layer, x, _temp(cfg, 0))
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    assert counts.tolist() == ref_counts.tolist()
    assert int(counts.sum()) == 15 * g1 * k
    assert torch.isfinite(l_aux) and l_aux.shape == ()


@pytest.mark.parametrize("phase", ["full", "compressed"])
@pytest.mark.parametrize("g1", [1, 2])
def test_used_token_masking(phase, g1):
    cfg = _cfg(num_experts=8, num_groups=4, top_k=2, group_top_k=g1)
    layer = _layer(cfg, gated=True)
    if phase == "compressed":
        layer.recluster(force=True)
        _perturb(layer, seed=3)
    layer.eval()
    x = _x((4, 6, D), seed=11)
    torch.manual_seed(12)
    used = torch.rand(4, 6) > 0.4
    assert 0 < int(used.sum()) < 24
    y, _, counts = layer(x, used_token=used)
    ref_y, ref_counts = _ref_forward(layer, x, 1.0, used=used)
    assert bool((y[~used] == 0).all())
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    assert counts.tolist() == ref_counts.tolist()
    assert int(counts.sum()) == int(used.sum()) * g1 * 2
    # the kept tokens get exactly what they get without a mask
    y_all, _, _ = layer(x)
    torch.testing.assert_close(y[used], y_all[used], rtol=0, atol=1e-13)
    with pytest.raises(ValueError):
        layer(x, used_token=torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------ gradients -------------------

def _min_margin(layer, x, temperature):
    """Smallest gap (in logits) at a top-k boundary: top-g1 groups and top-k inside the chosen ones."""
    G, K = layer.num_groups, layer.experts_per_group
    g1, k = layer.config.group_top_k, layer.config.top_k
    u = layer.router.group_proto.detach().double()
    v = layer.router.expert_vec.detach().double()
    gaps = [float("inf")]
    for t in range(x.shape[0]):
        gl = sorted(((float(u[g] @ x[t]) / temperature), g) for g in range(G))[::-1]
        if g1 < G:
            gaps.append(gl[g1 - 1][0] - gl[g1][0])
        for _, g in gl[:g1]:
            el = sorted(float(v[g * K + j] @ x[t]) / temperature for j in range(K))[::-1]
            if k < K:
                gaps.append(el[k - 1] - el[k])
    return min(gaps)


def _tiny_layer_and_input(g1, compressed, gated):
    cfg = _cfg(num_experts=6, num_groups=3, top_k=1, group_top_k=g1, rank=2)
    for seed in range(50):
        layer = ClusteredMoE(4, 5, cfg, gated=gated, activation="gelu").double()
        if compressed:
            layer.recluster(force=True)
            _perturb(layer, scale=0.05, seed=seed)
        layer.eval()
        x = _x((5, 4), seed=100 + seed)
        if _min_margin(layer, x, 1.0) > 1e-3:
            return layer, x
    raise AssertionError("no tie-free input found")


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("g1,gated", [(1, False), (2, True)])
def test_gradcheck_input(compressed, g1, gated):
    layer, x = _tiny_layer_and_input(g1, compressed, gated)
    x = x.clone().requires_grad_(True)

    def fn(inp):
        y, l_aux, _ = layer(inp)
        return y, l_aux

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("compressed", [False, True])
def test_gradcheck_parameters(compressed):
    layer, x = _tiny_layer_and_input(2, compressed, gated=True)
    if compressed:
        names = ["experts.base.w1", "experts.fa.w2", "experts.fb.w3", "experts.bias.b1",
                 "router.group_proto", "router.expert_vec"]
    else:
        names = ["experts.full.w1", "experts.full.w3", "experts.full.w2", "experts.bias.b2",
                 "router.group_proto", "router.expert_vec"]
    params = dict(layer.named_parameters())
    for name in names:
        p0 = params[name].detach().clone().requires_grad_(True)

        def fn(p, name=name):
            y, l_aux, _ = functional_call(layer, {name: p}, (x,))
            return y, l_aux

        assert torch.autograd.gradcheck(fn, (p0,), eps=1e-6, atol=1e-7, rtol=1e-5), name


def test_parameter_grads_match_finite_differences():
    """Plain backward (no functional_call) on the module's own parameters vs central differences."""
    layer, x = _tiny_layer_and_input(1, True, gated=False)
    torch.manual_seed(5)
    R = torch.randn(5, 4, dtype=torch.float64)

    def loss():
        y, l_aux, _ = layer(x)
        return (y * R).sum() + l_aux

    layer.zero_grad(set_to_none=True)
    loss().backward()
    for p in (layer.experts.base["w2"], layer.experts.fa["w1"], layer.router.expert_vec):
        flat = p.data.view(-1)
        for idx in torch.randperm(flat.numel())[:6].tolist():
            old = float(flat[idx])
            with torch.no_grad():
                flat[idx] = old + 1e-6
                lp = float(loss())
                flat[idx] = old - 1e-6
                lm = float(loss())
                flat[idx] = old
            assert float(p.grad.view(-1)[idx]) == pytest.approx((lp - lm) / 2e-6, rel=1e-5, abs=1e-8)


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
    """Adam moments of factors in groups a regroup leaves untouched stay as they were."""
    cfg = _cfg(num_experts=8, num_groups=4, top_k=1, rank=2, alpha=0.0, burn_in=0, dynamic_regroup=False)
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
    cfg = _cfg(num_experts=8, num_groups=2, burn_in=3, dynamic_regroup=False, alpha=0.0)
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


# ------------------------------------------------------------------ protocol -------------------

def _fwd(layer, x):
    y, l_aux, _ = layer(x)
    return y


def test_burn_in_respected():
    layer = _layer(_cfg(burn_in=3))
    x = _x((8, D), 6)
    for i in range(3):
        _fwd(layer, x)
        assert not layer.compressed and layer.step == i + 1
    _fwd(layer, x)
    assert layer.compressed and layer.stats()["reclusters"] == 1


def test_burn_in_zero_clusters_on_first_training_forward():
    layer = _layer(_cfg(burn_in=0))
    _fwd(layer, _x((8, D), 6))
    assert layer.compressed


def test_recluster_interval_honoured():
    layer = _layer(_cfg(burn_in=2, recluster_interval=3, delta=0.0))
    x = _x((16, D), 7)
    attempts = []
    for step in range(15):
        s = layer.stats()
        n0 = s["reclusters"] + s["skipped_reclusters"]
        assert layer.step == step
        _fwd(layer, x)
        s = layer.stats()
        if s["reclusters"] + s["skipped_reclusters"] > n0:
            attempts.append(step)
    assert attempts == [2, 5, 8, 11, 14]


def test_delta_skip_counts():
    layer = _layer(_cfg(burn_in=1, recluster_interval=2, delta=10.0))  # gain can never reach 10
    x = _x((16, D), 8)
    for _ in range(8):
        _fwd(layer, x)
    s = layer.stats()
    assert s["reclusters"] == 1  # only the first clustering (not subject to delta)
    assert s["skipped_reclusters"] == 3  # steps 3, 5, 7
    assert s["last_gain"] < 10.0
    # force overrides delta
    assert layer.recluster(force=True)
    assert layer.stats()["reclusters"] == 2 and layer.stats()["skipped_reclusters"] == 3


def test_delta_zero_applies_a_real_improvement():
    cfg = _cfg(burn_in=10 ** 6, recluster_interval=1, delta=0.0, alpha=0.0)
    layer = _layer(cfg)
    layer.recluster(force=True)
    target = _force_new_grouping(layer, seed=3)  # strictly better grouping available: gain > 0
    assert layer.recluster(force=False)
    assert _partition(layer) == target and layer.stats()["last_gain"] > 0
    # nothing better left: same partition again, gain 0 -> not below delta=0 -> applied, nothing moves
    layer.recluster(force=False)
    assert _partition(layer) == target


def test_static_grouping_clusters_once():
    layer = _layer(_cfg(burn_in=2, recluster_interval=1, delta=0.0, dynamic_regroup=False))
    x = _x((16, D), 9)
    for _ in range(10):
        _fwd(layer, x)
    s = layer.stats()
    assert s["reclusters"] == 1 and s["skipped_reclusters"] == 0 and layer.compressed


def test_gradient_accumulation_reclusters_on_step_boundaries():
    layer = _layer(_cfg(burn_in=2, recluster_interval=1, delta=0.0, gradient_accumulation_steps=2))
    x = _x((16, D), 10)
    attempts = []
    for micro in range(12):
        s = layer.stats()
        n0 = s["reclusters"] + s["skipped_reclusters"]
        assert layer.step == micro // 2
        _fwd(layer, x)
        s = layer.stats()
        if s["reclusters"] + s["skipped_reclusters"] > n0:
            attempts.append(micro)
        if micro < 4:
            assert not layer.compressed
    assert attempts == [4, 6, 8, 10]


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_eval_and_no_grad_forwards_do_not_count(mode):
    layer = _layer(_cfg(burn_in=0))
    x = _x((8, D), 11)
    c0 = layer.centroids.clone()
    for _ in range(3):
        if mode == "eval":
            layer.eval()
            _fwd(layer, x)
        else:
            with torch.no_grad():
                _fwd(layer, x)
    assert layer.step == 0 and not layer.compressed
    assert torch.equal(layer.centroids, c0)
    layer.train()
    _fwd(layer, x)
    assert layer.step == 1 and layer.compressed


@pytest.mark.parametrize("freeze", [1, 2])
def test_router_frozen_after_regroup(freeze):
    layer = _layer(_cfg(burn_in=2, dynamic_regroup=False, router_freeze_steps=freeze))
    x = _x((16, D), 12)
    has_grad = []
    for _ in range(6):
        layer.zero_grad(set_to_none=True)
        y, l_aux, _ = layer(x)
        (y.pow(2).sum() + l_aux).backward()
        g = layer.router.group_proto.grad
        v = layer.router.expert_vec.grad
        assert (g is None) == (v is None)
        has_grad.append(g is not None and float(g.abs().sum()) > 0 and float(v.abs().sum()) > 0)
    frozen = [False, False] + [True] * freeze + [False] * (4 - freeze)
    assert has_grad == [not f for f in frozen]
    # a manual regroup between steps freezes the next step
    layer.recluster(force=True)
    layer.zero_grad(set_to_none=True)
    y, l_aux, _ = layer(x)
    (y.pow(2).sum() + l_aux).backward()
    assert layer.router.group_proto.grad is None


def test_frozen_router_step_computes_the_same_output():
    layer = _layer(_cfg(burn_in=0))
    x = _x((10, D), 13)
    y = _fwd(layer, x)  # clusters, then routes with the frozen router
    assert layer.compressed
    ref, _ = _ref_forward(layer, x, _temp(layer.config, 0))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_temperature_schedule_applied_in_training():
    cfg = _cfg(router_temperature_start=1.0, router_temperature_end=0.5, router_temperature_steps=4)
    layer = _layer(cfg)
    x = _x((12, D), 14)
    for step in range(7):
        t = 1.0 + (0.5 - 1.0) * min(step, 4) / 4
        assert layer.stats()["temperature"] == pytest.approx(t, abs=1e-15)
        ref, _ = _ref_forward(layer, x, t)
        torch.testing.assert_close(_fwd(layer, x), ref, rtol=0, atol=1e-12)
    layer.eval()
    ref, _ = _ref_forward(layer, x, 0.5)
    torch.testing.assert_close(_fwd(layer, x), ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ bad input / edge cases -----

def test_wrong_hidden_size():
    layer = _layer()
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, D + 1, dtype=torch.float64))


def test_invalid_config_raises_at_construction():
    with pytest.raises(ValueError, match="num_experts"):
        ClusteredMoE(D, F, TrilemmaMoEConfig(num_experts=6, num_groups=4, top_k=1))
    with pytest.raises(ValueError):
        ClusteredMoE(D, F, {"num_experts": 8})
    with pytest.raises(ValueError, match="activation"):
        ClusteredMoE(D, F, _cfg(), activation="tanh")


@pytest.mark.parametrize("d,f,rank", [(4, 16, 5), (16, 4, 5), (6, 6, 7)])
def test_rank_too_large_for_layer(d, f, rank):
    with pytest.raises(ValueError, match="rank"):
        ClusteredMoE(d, f, _cfg(rank=rank))
    ClusteredMoE(d, f, _cfg(rank=min(d, f)))


@pytest.mark.parametrize("phase", ["full", "compressed"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
def test_empty_batch(phase, training, shape):
    layer = _layer()
    if phase == "compressed":
        layer.recluster(force=True)
    layer.train(training)
    x = torch.zeros(*shape, dtype=torch.float64, requires_grad=True)
    y, l_aux, counts = layer(x)
    assert y.shape == x.shape
    assert l_aux.shape == () and bool(torch.isfinite(l_aux))
    assert counts.shape == (8,) and counts.dtype == torch.long and int(counts.abs().sum()) == 0
    (y.sum() + l_aux).backward()  # still differentiable
    s = layer.stats()
    assert s["load_cv"] == 0.0 and s["group_load_cv"] == 0.0


@pytest.mark.parametrize("gas", [1, 2])
def test_empty_training_batches_still_count_steps(gas):
    """An empty micro-batch (e.g. all tokens masked on this rank) is still a training forward:
    the step count, and so the regroup schedule, must not drift."""
    layer = _layer(_cfg(burn_in=2, recluster_interval=2, delta=0.0, gradient_accumulation_steps=gas))
    x = _x((8, D), 30)
    empty = torch.zeros(0, D, dtype=torch.float64)
    attempts = []
    for micro in range(8 * gas):
        assert layer.step == micro // gas
        s = layer.stats()
        n0 = s["reclusters"] + s["skipped_reclusters"]
        layer(empty if micro % 3 == 0 else x)
        s = layer.stats()
        if s["reclusters"] + s["skipped_reclusters"] > n0:
            attempts.append(micro)
    assert attempts == [2 * gas, 4 * gas, 6 * gas]


def test_all_tokens_masked_is_empty():
    layer = _layer()
    x = _x((3, D), 15)
    y, l_aux, counts = layer(x, used_token=torch.zeros(3, dtype=torch.bool))
    assert bool((y == 0).all()) and int(counts.sum()) == 0 and bool(torch.isfinite(l_aux))


@pytest.mark.parametrize("phase", ["full", "compressed"])
def test_all_tokens_to_one_group(phase):
    cfg = _cfg(num_experts=12, num_groups=3, top_k=2)
    layer = _layer(cfg)
    if phase == "compressed":
        layer.recluster(force=True)
    layer.eval()
    T, gstar = 40, 1
    gen = torch.Generator().manual_seed(16)
    c = torch.full((D,), 1.0, dtype=torch.float64)
    x = 0.3 * torch.randn(T, D, generator=gen, dtype=torch.float64) + c
    with torch.no_grad():
        layer.router.group_proto.copy_(-2.0 * c.expand(3, D))
        layer.router.group_proto[gstar] = 2.0 * c
    routes = _ref_routes(layer, x, 1.0)
    assert all({s // 4 for s in r} == {gstar} for r in routes)
    y, _, counts = layer(x)
    ref_y, ref_counts = _ref_forward(layer, x, 1.0)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    assert counts.tolist() == ref_counts.tolist()
    assert int(counts.sum()) == T * 2
    groups = layer.group_assignment()
    assert bool((counts[groups != gstar] == 0).all()) and int(counts[groups == gstar].sum()) == T * 2
    group_counts = [float(counts[groups == g].sum()) for g in range(3)]
    ref_cv = statistics.pstdev(group_counts) / statistics.mean(group_counts)
    assert layer.stats()["group_load_cv"] == pytest.approx(ref_cv, rel=1e-12)
    assert ref_cv == pytest.approx(math.sqrt(2), rel=1e-12)


# ------------------------------------------------------------------ stats ----------------------

def test_stats_keys_and_load_cv():
    layer = _layer(_cfg(num_experts=8, num_groups=2, top_k=2))
    layer.eval()
    y, _, counts = layer(_x((50, D), 17))
    s = layer.stats()
    for key in ("load_cv", "group_load_cv", "reclusters", "compression_ratio"):
        assert key in s
    c = [float(v) for v in counts.tolist()]
    assert s["load_cv"] == pytest.approx(statistics.pstdev(c) / statistics.mean(c), rel=1e-12)
    groups = layer.group_assignment().tolist()
    gc = [sum(c[e] for e in range(8) if groups[e] == g) for g in range(2)]
    assert s["group_load_cv"] == pytest.approx(statistics.pstdev(gc) / statistics.mean(gc), rel=1e-12, abs=1e-15)
    assert s["reclusters"] == 0 and s["compression_ratio"] == 1.0


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False), (True, True)])
def test_compression_ratio_and_parameter_count(gated, bias):
    E, G, r, d, f = 8, 2, 2, 16, 32
    cfg = _cfg(num_experts=E, num_groups=G, rank=r)
    layer = ClusteredMoE(d, f, cfg, gated=gated, bias=bias)
    mats = [(d, f), (f, d)] + ([(d, f)] if gated else [])
    n_bias = (E * (f + d + (f if gated else 0))) if bias else 0
    assert layer.expert_parameter_count() == E * sum(a * b for a, b in mats) + n_bias
    layer.recluster(force=True)
    comp = sum(G * a * b + E * r * (a + b) for a, b in mats)
    assert layer.expert_parameter_count() == comp + n_bias
    ratio = (E * sum(a * b for a, b in mats)) / comp
    assert layer.stats()["compression_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert ratio > 1
    K = E // G
    assert layer.formula_compression_ratio() == pytest.approx(K * d * f / (d * f + K * r * (d + f)), rel=1e-12)


def test_group_assignment_balanced():
    layer = _layer(_cfg(num_experts=12, num_groups=3, top_k=2))
    for phase in range(3):
        a = layer.group_assignment()
        assert a.shape == (12,) and a.dtype == torch.long
        assert sorted(a.tolist()) == sorted([g for g in range(3) for _ in range(4)])
        if layer.compressed:
            _force_new_grouping(layer, seed=phase)
        layer.recluster(force=True)


# ------------------------------------------------------------------ determinism ----------------

def _train_run(layer_index=0):
    cfg = _cfg(num_experts=8, num_groups=2, burn_in=3, recluster_interval=3, delta=0.0)
    layer = ClusteredMoE(D, F, cfg, layer_index=layer_index).double()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(21)
    for _ in range(12):
        x = torch.randn(24, D, generator=gen, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        y, l_aux, _ = layer(x)
        (y.pow(2).mean() + l_aux).backward()
        opt.step()
    layer.eval()
    return layer, layer(_x((10, D), 22))[0]


def test_same_seed_same_everything():
    a, ya = _train_run()
    b, yb = _train_run()
    assert a.compressed and b.compressed
    assert torch.equal(ya, yb)
    assert torch.equal(a.group_assignment(), b.group_assignment())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        _assert_same(sa[k], sb[k], k)


def _assert_same(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_layer_index_changes_weights():
    a = ClusteredMoE(D, F, _cfg(), layer_index=0)
    b = ClusteredMoE(D, F, _cfg(), layer_index=1)
    for n in a.experts.full:
        assert not torch.allclose(a.experts.full[n], b.experts.full[n])
    assert not torch.allclose(a.router.group_proto, b.router.group_proto)


def test_expert_init_independent_of_num_experts():
    small = ClusteredMoE(D, F, _cfg(num_experts=8, num_groups=2), layer_index=3)
    large = ClusteredMoE(D, F, _cfg(num_experts=16, num_groups=4), layer_index=3)
    for n in small.experts.full:
        assert torch.equal(small.experts.full[n], large.experts.full[n][:8])
    for n in small.experts.bias:
        assert torch.equal(small.experts.bias[n], large.experts.bias[n][:8])
    # and differs between experts
    assert not torch.allclose(small.experts.full["w1"][0], small.experts.full["w1"][1])


# ------------------------------------------------------------------ state_dict round trip ----

def _train_losses(layer, opt, x, target, steps):
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        y, l_aux, _ = layer(x)
        loss = ((y - target) ** 2).mean() + l_aux
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


@pytest.mark.parametrize("save_at", [2, 7])  # during burn-in, and after the first clustering
def test_state_dict_round_trip_resumes_the_same_curve(tmp_path, save_at):
    """Save model + optimizer, load into a fresh layer (weights_only), and the continued loss
    curve equals the uninterrupted one exactly."""
    cfg = _cfg(num_experts=8, num_groups=2, burn_in=4, recluster_interval=2, delta=0.0)
    x, target = _x((24, D), 1), _x((24, D), 2)

    def fresh():
        layer = _layer(cfg)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        layer.attach_optimizer(opt)
        return layer, opt

    ref, ref_opt = fresh()
    _train_losses(ref, ref_opt, x, target, save_at)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": ref.state_dict(), "opt": ref_opt.state_dict()}, path)
    expected = _train_losses(ref, ref_opt, x, target, 6)

    layer, opt = fresh()
    ckpt = torch.load(path, weights_only=True)
    layer.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert layer.compressed == (save_at > cfg.burn_in)
    got = _train_losses(layer, opt, x, target, 6)
    assert got == expected
    assert torch.equal(layer.group_assignment(), ref.group_assignment())
    assert layer.stats()["reclusters"] == ref.stats()["reclusters"] >= 1


def test_loading_burn_in_state_into_compressed_layer_is_refused():
    cfg = _cfg(num_experts=8, num_groups=2)
    early = _layer(cfg).state_dict()
    layer = _layer(cfg)
    layer.recluster(force=True)
    with pytest.raises(RuntimeError, match="uncompressed"):
        layer.load_state_dict(early)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("g1", [1, 2])
def test_fused_router_trains_like_composite_router(fused, g1):
    """The one-node router + losses (routing.FusedRouterLoss, the default with one process) and the
    composite path (router forward + aux_losses under autograd) give the same training run: same
    losses and parameters step by step, across a regroup (with its router-frozen step) and a
    changing temperature, on the expert path of either kind."""
    import copy
    cfg = _cfg(num_experts=8, num_groups=4, group_top_k=g1, burn_in=2, recluster_interval=3,
               router_freeze_steps=1, router_temperature_steps=4, aux_loss_coef=0.2, z_loss_coef=0.05)
    torch.manual_seed(0)
    a = _layer(cfg)
    b = copy.deepcopy(a)
    b.fused_router = False
    x = _x((40, D), 5)
    runs = []
    for layer in (a, b):
        layer.fused = fused
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        out = []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            y, l_aux, counts = layer(x)
            ((y ** 2).mean() + l_aux).backward()
            opt.step()
            out.append((float(y.detach().square().mean()), float(l_aux.detach()), counts.clone()))
        runs.append((out, [p.detach().clone() for p in layer.parameters()]))
    (out_a, pa), (out_b, pb) = runs
    assert a.step == b.step == 6 and int(a.counters[a._COUNTERS.index("reclusters")]) >= 1
    for (fa, la, ca), (fb, lb, cb) in zip(out_a, out_b):
        assert fa == pytest.approx(fb, rel=1e-12, abs=1e-15) and la == pytest.approx(lb, rel=1e-12, abs=1e-15)
        assert torch.equal(ca, cb)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
