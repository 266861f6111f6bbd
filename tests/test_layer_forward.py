"""ClusteredMoE's forward, gradients and edge cases against float64 per-token references
(``layer_reference.py``)."""
import math
import statistics

import pytest
import torch
from torch.func import functional_call

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE
from layer_reference import D, F, _cfg, _layer, _temp, _ref_routes, _ref_forward, _perturb, _x


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
