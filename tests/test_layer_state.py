"""What a layer reports and remembers: stats, parameter counts, determinism of its init,
state_dict round trips, and the fused router against the composite one."""
import statistics

import pytest
import torch

from trilemma_moe.core.layer import ClusteredMoE
from layer_reference import D, F, _cfg, _layer, _force_new_grouping, _x


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
