"""Float64 references for ClusteredMoE tests: every expectation is recomputed from the layer's
raw parameters (router prototypes and expert vectors, full / base / factor / bias tensors) with
python loops; nothing is taken from the layer's routing, dispatch or combine internals."""
import math

import torch

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 6, 10


def _cfg(**kw):
    # the paper's similarity: these references force groupings through the activation centroids.
    # dynamic_regroup=True: these tests follow the layer through regroup checks (the library's
    # default clusters once); a test about clustering once passes dynamic_regroup=False itself
    base = dict(num_experts=8, num_groups=2, rank=3, top_k=2, group_top_k=1, burn_in=10 ** 6,
                gamma=None, router_temperature_steps=1000, regroup_similarity="weights", regroup_move_cost=0.0,
                dynamic_regroup=True)
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


def _ref_flat_routes(layer, x, temperature):
    """Per token {slot: p}: one softmax of x @ expert_vec.T / t over all E slots, its top-k."""
    v = layer.router.expert_vec.detach().double()
    routes = []
    for t in range(x.shape[0]):
        p = _softmax([float(v[s] @ x[t]) / temperature for s in range(layer.num_experts)])
        routes.append({s: p[s] for s in sorted(range(layer.num_experts), key=lambda s: -p[s])[:layer.config.top_k]})
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
    routes = (_ref_flat_routes if layer.config.routing == "flat" else _ref_routes)(layer, x, temperature)
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
