"""Hierarchical routing (paper 3.3) against per-token python references, and against a
re-implementation of Megatron-core's group-limited top-k (g1 = 1)."""
import math

import pytest
import torch

from trilemma_moe.core.routing import HierarchicalRouter, Routing, aux_losses, hierarchical_topk, slot_hits


def _softmax(vals):
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    s = sum(e)
    return [x / s for x in e]


def _ref_route_token(gl, el, g1, k):
    """One token. gl: list[G] group logits, el: list[G][K] expert logits.
    Returns {slot: weight} with weight = p_g * p_i (softmax over all groups, softmax over the
    chosen group's experts only)."""
    G, K = len(gl), len(el[0])
    pg = _softmax(gl)
    groups = sorted(range(G), key=lambda g: -pg[g])[:g1]
    out = {}
    for g in groups:
        pi = _softmax(el[g])
        for j in sorted(range(K), key=lambda j: -pi[j])[:k]:
            out[g * K + j] = pg[g] * pi[j]
    return out


def _as_dicts(r: Routing):
    T = r.slot_idx.shape[0]
    slots = r.slot_idx.reshape(T, -1).tolist()
    w = r.weights.reshape(T, -1).tolist()
    return [dict(zip(s, ws)) for s, ws in zip(slots, w)]


@pytest.mark.parametrize("G,K,g1,k", [(4, 4, 1, 2), (2, 8, 1, 1), (8, 2, 1, 2), (4, 4, 2, 2), (3, 5, 2, 3),
                                      (8, 4, 2, 1), (1, 6, 1, 3), (5, 1, 2, 1)])
def test_hierarchical_topk_matches_per_token_loop(G, K, g1, k):
    torch.manual_seed(G * 100 + K * 10 + g1 + k)
    T = 40
    gl = torch.randn(T, G, dtype=torch.float64) * 2
    el = torch.randn(T, G, K, dtype=torch.float64) * 2
    r = hierarchical_topk(gl, el, g1, k)
    assert r.group_idx.shape == (T, g1) and r.slot_idx.shape == (T, g1, k) and r.weights.shape == (T, g1, k)
    got = _as_dicts(r)
    for t in range(T):
        ref = _ref_route_token(gl[t].tolist(), el[t].tolist(), g1, k)
        assert set(got[t]) == set(ref), f"token {t}"
        for s, w in ref.items():
            assert got[t][s] == pytest.approx(w, rel=1e-12, abs=1e-15)
        # chosen groups are the groups of the chosen slots
        assert set(r.group_idx[t].tolist()) == {s // K for s in ref}
    # full probability tensors
    for t in range(T):
        pg = _softmax(gl[t].tolist())
        assert r.group_probs[t].tolist() == pytest.approx(pg, rel=1e-12)
        for g in range(G):
            assert r.expert_probs[t, g].tolist() == pytest.approx(_softmax(el[t, g].tolist()), rel=1e-12)


def test_weights_are_not_renormalised():
    # g1 = 1, k = K: the combine weights of a token sum to p_g* (not to 1)
    torch.manual_seed(0)
    gl = torch.randn(10, 3, dtype=torch.float64)
    el = torch.randn(10, 3, 4, dtype=torch.float64)
    r = hierarchical_topk(gl, el, 1, 4)
    pg_max = torch.softmax(gl, -1).max(-1).values
    torch.testing.assert_close(r.weights.sum((-1, -2)), pg_max, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ Megatron-core comparison ---

def _megatron_group_limited_topk(scores, num_groups, group_topk, topk):
    """Megatron-core's group-limited routing (written here from its description, not imported):
    group score = sum of the top (topk // group_topk) expert scores of each contiguous group of
    E / G experts; keep the top group_topk groups; mask the other experts; top-k over what is left.
    Returns (group_scores, list of expert-index sets per token)."""
    T, E = scores.shape
    per_group = E // num_groups
    group_scores = scores.view(T, num_groups, per_group).topk(topk // group_topk, dim=-1).values.sum(-1)
    chosen = []
    for t in range(T):
        gs = group_scores[t].tolist()
        keep = sorted(range(num_groups), key=lambda g: -gs[g])[:group_topk]
        masked = [(scores[t, e].item() if e // per_group in keep else -math.inf) for e in range(E)]
        chosen.append(set(sorted(range(E), key=lambda e: -masked[e])[:topk]))
    return group_scores, chosen


@pytest.mark.parametrize("G,K,k", [(4, 4, 2), (8, 8, 2), (2, 16, 4), (8, 4, 1), (16, 4, 3), (4, 8, 8)])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "raw"])
def test_g1_equals_megatron_group_limited_topk(G, K, k, score_fn):
    """With g1 = 1 our two-stage routing, fed the Megatron group score as the group logit and the
    expert scores as the expert logits, selects exactly Megatron's experts.

    Only g1 = 1 is comparable: for g1 > 1 Megatron takes the top-k over the union of the chosen
    groups, while we take the top-k inside each chosen group (g1 * k experts)."""
    torch.manual_seed(1000 * G + 10 * K + k)
    E = G * K
    for trial in range(5):
        T = 64
        logits = torch.randn(T, E, dtype=torch.float64) * (0.5 + trial)
        scores = {"softmax": lambda z: torch.softmax(z, -1), "sigmoid": torch.sigmoid,
                  "raw": lambda z: z}[score_fn](logits)
        group_scores, meg = _megatron_group_limited_topk(scores, G, 1, k)
        r = hierarchical_topk(group_scores, scores.view(T, G, K), 1, k)
        ours = [set(s) for s in r.slot_idx.reshape(T, -1).tolist()]
        assert ours == meg


# ------------------------------------------------------------------ router module --------------

def _router(d=8, G=3, K=4, g1=1, k=2, seed=0, dtype=torch.float64):
    r = HierarchicalRouter(d, G, K, g1, k, generator=torch.Generator().manual_seed(seed))
    return r.to(dtype)


def test_router_logits_and_temperature():
    torch.manual_seed(1)
    router = _router()
    x = torch.randn(20, 8, dtype=torch.float64)
    u = router.group_proto.detach()
    v = router.expert_vec.detach()
    for temp in (1.0, 0.7, 2.5):
        r = router(x, temperature=temp)
        ref_gl = torch.stack([torch.stack([(x[t] * u[g]).sum() for g in range(3)]) for t in range(20)]) / temp
        ref_el = (x @ v.T / temp).view(20, 3, 4)
        torch.testing.assert_close(r.group_logits.double(), ref_gl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.expert_logits.double(), ref_el, rtol=1e-6, atol=1e-6)
        # and the routing is the hierarchical top-k of those (temperature-divided) logits
        for t, got in enumerate(_as_dicts(r)):
            ref = _ref_route_token(ref_gl[t].tolist(), ref_el[t].tolist(), 1, 2)
            assert set(got) == set(ref)
            for s, w in ref.items():
                assert got[s] == pytest.approx(w, rel=1e-5)
    # temperature changes the weights: sharper at lower temperature
    hi = router(x, temperature=4.0).weights
    lo = router(x, temperature=0.25).weights
    assert float(lo.detach().max()) > float(hi.detach().max())


def test_router_dtype_follows_double_input():
    """A float64 router on float64 input computes its logits in float64."""
    torch.manual_seed(2)
    router = _router()
    x = torch.randn(5, 8, dtype=torch.float64)
    r = router(x)
    ref = x @ router.group_proto.detach().T
    torch.testing.assert_close(r.group_logits, ref, rtol=1e-14, atol=1e-14)


def test_router_upcasts_low_precision_input():
    router = _router(dtype=torch.bfloat16)
    x = torch.randn(5, 8).to(torch.bfloat16)
    r = router(x)
    assert r.group_logits.dtype == torch.float32 and r.weights.dtype == torch.float32


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_router_gets_no_gradient(frozen):
    torch.manual_seed(3)
    router = _router(g1=2)
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    r = router(x, temperature=0.9, frozen=frozen)
    loss = r.weights.sum() + aux_losses(r, 0.1, 0.01)
    loss.backward()
    if frozen:
        assert router.group_proto.grad is None and router.expert_vec.grad is None
    else:
        assert router.group_proto.grad is not None and float(router.group_proto.grad.abs().sum()) > 0
        assert router.expert_vec.grad is not None and float(router.expert_vec.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # x still gets its gradient
    # frozen routing is numerically identical
    with torch.no_grad():
        a = router(x, frozen=True)
        b = router(x, frozen=False)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.slot_idx, b.slot_idx)


def test_router_regroup_permutes_and_mixes():
    from trilemma_moe.core.state_io import TorchParamIO

    router = _router(G=2, K=3)
    v0 = router.expert_vec.detach().clone()
    u0 = router.group_proto.detach().clone()
    new_to_old = torch.tensor([0, 4, 2, 3, 1, 5])
    overlap = torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]], dtype=torch.float64)
    router.regroup(new_to_old, overlap, TorchParamIO())
    for s in range(6):
        torch.testing.assert_close(router.expert_vec[s].detach(), v0[int(new_to_old[s])], rtol=0, atol=0)
    ref = torch.stack([2 / 3 * u0[0] + 1 / 3 * u0[1], 1 / 3 * u0[0] + 2 / 3 * u0[1]])
    torch.testing.assert_close(router.group_proto.detach(), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ auxiliary losses -----------

def _ref_aux(gl, el, group_idx, slot_idx, aux_coef, z_coef):
    """Formulas of aux_losses' docstring, computed with python loops in float64."""
    T, G, K = el.shape
    E = G * K
    pg = [_softmax(gl[t].tolist()) for t in range(T)]
    pe = [[_softmax(el[t, g].tolist()) for g in range(G)] for t in range(T)]
    gsel = group_idx.reshape(T, -1).tolist()
    ssel = slot_idx.reshape(T, -1).tolist()
    n_g = sum(len(x) for x in gsel)
    n_e = sum(len(x) for x in ssel)
    f_g = [sum(row.count(g) for row in gsel) / n_g for g in range(G)]
    f_e = [sum(row.count(e) for row in ssel) / n_e for e in range(E)]
    P = [sum(pg[t][g] for t in range(T)) / T for g in range(G)]
    Q = [sum(pg[t][e // K] * pe[t][e // K][e % K] for t in range(T)) / T for e in range(E)]
    lb_g = G * sum(f * p for f, p in zip(f_g, P))
    lb_e = E * sum(f * q for f, q in zip(f_e, Q))

    def lse(vals):
        m = max(vals)
        return m + math.log(sum(math.exp(v - m) for v in vals))

    z_g = sum(lse(gl[t].tolist()) ** 2 for t in range(T)) / T
    z_terms = [lse(el[t, g].tolist()) ** 2 for t in range(T) for g in gsel[t]]
    z_e = sum(z_terms) / len(z_terms)
    return aux_coef * (lb_g + lb_e) + z_coef * (z_g + z_e), lb_g, lb_e, z_g, z_e


@pytest.mark.parametrize("G,K,g1,k", [(4, 4, 1, 2), (3, 5, 2, 2), (2, 4, 2, 1), (8, 2, 1, 1)])
@pytest.mark.parametrize("aux_coef,z_coef", [(0.01, 0.001), (1.0, 0.0), (0.0, 1.0), (0.3, 0.2)])
def test_aux_losses_match_hand_computation(G, K, g1, k, aux_coef, z_coef):
    torch.manual_seed(G + K + g1 + k)
    T = 30
    gl = torch.randn(T, G, dtype=torch.float64) * 1.5
    el = torch.randn(T, G, K, dtype=torch.float64) * 1.5
    r = hierarchical_topk(gl, el, g1, k)
    ref = _ref_aux(gl, el, r.group_idx, r.slot_idx, aux_coef, z_coef)[0]
    assert float(aux_losses(r, aux_coef, z_coef)) == pytest.approx(ref, rel=1e-6, abs=1e-12)


def test_aux_loss_uniform_routing_equals_two_coef():
    G, K, k = 4, 3, 1
    E = G * K
    T = E * 5
    gl = torch.zeros(T, G, dtype=torch.float64)       # uniform p_g = 1/G
    el = torch.zeros(T, G, K, dtype=torch.float64)    # uniform p_i = 1/K
    slot = torch.arange(T) % E                         # every expert chosen equally often
    group = slot // K
    r = Routing(group_idx=group.view(T, 1), slot_idx=slot.view(T, 1, 1),
                weights=torch.full((T, 1, 1), 1.0 / E, dtype=torch.float64),
                group_probs=torch.softmax(gl, -1), expert_probs=torch.softmax(el, -1),
                group_logits=gl, expert_logits=el)
    for coef in (0.01, 0.5, 1.0):
        assert float(aux_losses(r, coef, 0.0)) == pytest.approx(2 * coef, rel=1e-6)
    # z-loss of zero logits: logsumexp = log G (groups) and log K (experts)
    zl = float(aux_losses(r, 0.0, 1.0))
    assert zl == pytest.approx(math.log(G) ** 2 + math.log(K) ** 2, rel=1e-12)


def test_aux_loss_penalises_collapse():
    # all tokens to one group/expert with probability mass concentrated there: G + E > 2
    G, K = 4, 4
    T = 32
    gl = torch.zeros(T, G, dtype=torch.float64)
    gl[:, 0] = 50.0
    el = torch.zeros(T, G, K, dtype=torch.float64)
    el[:, :, 0] = 50.0
    r = hierarchical_topk(gl, el, 1, 1)
    lb = float(aux_losses(r, 1.0, 0.0))
    assert lb == pytest.approx(G + G * K, rel=1e-6)


def test_z_loss_by_hand_small_example():
    gl = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    el = torch.tensor([[[0.5, -0.5, 1.0], [2.0, 0.0, 0.0]],
                       [[0.0, 0.0, 0.0], [3.0, 1.0, -1.0]]], dtype=torch.float64)
    r = hierarchical_topk(gl, el, 1, 2)
    assert r.group_idx.view(-1).tolist() == [1, 0]
    lse = lambda *v: math.log(sum(math.exp(a) for a in v))  # noqa: E731
    z_g = (lse(1.0, 2.0) ** 2 + lse(0.0, -1.0) ** 2) / 2
    z_e = (lse(2.0, 0.0, 0.0) ** 2 + lse(0.0, 0.0, 0.0) ** 2) / 2
    assert float(aux_losses(r, 0.0, 0.1)) == pytest.approx(0.1 * (z_g + z_e), rel=1e-12)


def test_aux_losses_empty():
    r = hierarchical_topk(torch.zeros(0, 2), torch.zeros(0, 2, 3), 1, 2)
    out = aux_losses(r, 0.01, 0.001)
    assert out.shape == () and float(out) == 0.0


def test_aux_loss_gradient_reaches_router():
    torch.manual_seed(4)
    router = _router(g1=1)
    x = torch.randn(24, 8, dtype=torch.float64)
    r = router(x)
    aux_losses(r, 1.0, 0.0).backward()
    assert float(router.group_proto.grad.abs().sum()) > 0 and float(router.expert_vec.grad.abs().sum()) > 0


# ------------------------------------------------------------------ fused router + losses ------

from trilemma_moe.core.routing import FusedRouterLoss  # noqa: E402


def _fused_inputs(G, K, d=7, T=33, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    u = torch.randn(G, d, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(G * K, d, generator=gen, dtype=torch.float64).requires_grad_()
    return x, u, v, gen


def _composite(x, u, v, t, G, K, g1, k, aux_coef, z_coef):
    logits = x @ torch.cat([u, v]).t()
    if t != 1.0:
        logits = logits / t
    gl, el = logits.split([G, G * K], dim=1)
    r = hierarchical_topk(gl, el.view(-1, G, K), g1, k)
    return r, aux_losses(r, aux_coef, z_coef)


FUSED_CASES = [(4, 4, 1, 2, 1.0, 0.01, 0.001), (3, 5, 2, 2, 0.7, 0.3, 0.2), (2, 4, 2, 1, 1.0, 1.0, 0.0),
               (8, 2, 1, 1, 2.5, 0.0, 1.0), (4, 3, 2, 3, 1.3, 0.0, 0.0), (5, 4, 3, 2, 0.9, 0.5, 0.05),
               (1, 6, 1, 3, 1.0, 0.2, 0.1), (6, 1, 2, 1, 1.0, 0.2, 0.1)]


@pytest.mark.parametrize("G,K,g1,k,t,aux_coef,z_coef", FUSED_CASES)
def test_fused_router_loss_matches_composite(G, K, g1, k, t, aux_coef, z_coef):
    x, u, v, gen = _fused_inputs(G, K, seed=G * 100 + K * 10 + g1 + k)
    r, loss = _composite(x, u, v, t, G, K, g1, k, aux_coef, z_coef)
    w, floss, gidx, sidx, pg, pe, logits, hits, counts = FusedRouterLoss.apply(x, u, v, t, G, K, g1, k,
                                                                               aux_coef, z_coef)
    assert torch.equal(gidx, r.group_idx) and torch.equal(sidx, r.slot_idx)
    torch.testing.assert_close(w, r.weights, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(floss, loss.to(floss.dtype), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pg, r.group_probs, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pe, r.expert_probs, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(logits, torch.cat([r.group_logits, r.expert_logits.flatten(1)], 1), rtol=1e-14, atol=1e-14)
    assert torch.equal(hits, slot_hits(r.slot_idx, G * K).double()) and torch.equal(counts, hits.sum(0))
    for trial in range(3):
        gw = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        gl = torch.randn((), generator=gen, dtype=w.dtype)
        for upstream in ([gw, gl], [gw, None], [None, gl]):   # None: that output unused
            # (both coefficients 0: the reference loss is a constant, the fused one's gradient 0)
            keep = [i for i, g in enumerate(upstream) if g is not None and (r.weights, loss)[i].requires_grad]
            if not keep:
                continue
            outs_ref = [(r.weights, loss)[i] for i in keep]
            outs = [(w, floss)[i] for i in keep]
            grads = [upstream[i] for i in keep]
            ref = torch.autograd.grad(outs_ref, (x, u, v), grads, retain_graph=True)
            got = torch.autograd.grad(outs, (x, u, v), grads, retain_graph=True)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_fused_router_loss_finite_differences():
    G, K, g1, k, t = 3, 4, 2, 2, 0.8
    x, u, v, gen = _fused_inputs(G, K, d=5, T=17, seed=11)

    def f(x, u, v):
        w, loss, *_ = FusedRouterLoss.apply(x, u, v, t, G, K, g1, k, 0.3, 0.05)
        return w, loss
    gw = torch.randn((17, g1, k), generator=gen, dtype=torch.float64)
    gl = 0.7
    w, loss = f(x, u, v)
    ana = torch.autograd.grad([w, loss], (x, u, v), [gw, torch.tensor(gl, dtype=torch.float64)])
    h = 1e-6
    for _ in range(6):
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in (x, u, v)]
        analytic = float(sum((a * dd).sum() for a, dd in zip(ana, dirs)))
        with torch.no_grad():
            wp, lp = f(*[p + h * dd for p, dd in zip((x, u, v), dirs)])
            wm, lm = f(*[p - h * dd for p, dd in zip((x, u, v), dirs)])
            numeric = float(((wp - wm) * gw).sum() + (lp - lm) * gl) / (2 * h)
        # the selection is piecewise constant: the step must not change it (it does not here)
        assert abs(analytic - numeric) < 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("frozen", [True, False])
def test_fused_router_frozen_and_dtypes(frozen):
    torch.manual_seed(3)
    router = _router(g1=2)
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    r, loss, hits, counts = router.route_with_losses(x, 0.1, 0.01, temperature=0.9, frozen=frozen)
    (r.weights.sum() + loss).backward()
    if frozen:
        assert router.group_proto.grad is None and router.expert_vec.grad is None
    else:
        assert float(router.group_proto.grad.abs().sum()) > 0 and float(router.expert_vec.grad.abs().sum()) > 0
    assert float(x.grad.abs().sum()) > 0
    # low-precision router and input: float32 logits, gradients in the parameters' dtype
    router = _router(dtype=torch.bfloat16)
    xb = torch.randn(5, 8).to(torch.bfloat16).requires_grad_()
    r, loss, hits, counts = router.route_with_losses(xb, 0.1, 0.01)
    assert r.group_logits.dtype == torch.float32 and r.weights.dtype == torch.float32 and loss.dtype == torch.float32
    (r.weights.sum() + loss).backward()
    assert xb.grad.dtype == torch.bfloat16 and router.expert_vec.grad.dtype == torch.bfloat16
