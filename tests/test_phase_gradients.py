"""Which parameters receive a gradient, and in which order, depends on the phase of training,
never on the data a rank happened to get.

Data-parallel reducers see this directly: DeepSpeed's ZeRO-1/2 buckets only parameters whose
``.grad`` is set, in the order their gradients are accumulated (stage 2 fills its buckets from the
gradient hooks), and a replica that presents another set or order all-reduces a buffer of another
size or layout. So for each phase (burn-in, compressed; per-slot and fused expert paths;
composite and fused router; gated; INT4) the backward of a batch routed normally, one routed
entirely to one group, one token, an empty batch and an all-False ``used_token`` must accumulate
gradients into the same parameters in the same order, and the layers before the MoE must be
reached in every case."""
import pytest
import torch
import torch.nn as nn

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 12, 20


class Stack(nn.Module):
    """pre -> MoE -> head, with no residual around the MoE: the layers before it receive a
    gradient only through the MoE's output."""

    def __init__(self, moe):
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.moe = moe
        self.head = nn.Linear(D, 3)

    def forward(self, x, used_token=None):
        y, l_aux, _ = self.moe(self.pre(x), used_token)
        return self.head(y).square().sum() + l_aux


def make(phase, gated=False, bits=16, g1=1, fused=False, fused_router=True, frozen=False):
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2 if g1 == 1 else 4, rank=3, top_k=2, group_top_k=g1,
                            burn_in=10_000, seed=11, residual_bits=bits,
                            router_freeze_steps=1 if frozen else 0, gamma=None)
    moe = ClusteredMoE(D, F, cfg, gated=gated)
    moe.fused, moe.fused_router = fused, fused_router
    if phase == "compressed":
        moe.recluster(force=True)
        if not frozen:   # a forward past the router's freeze
            moe.counters[moe._COUNTERS.index("frozen_until")] = 0
            moe.schedule.reloaded()
    torch.manual_seed(0)
    return Stack(moe)


def skewed_batch(model, n, group):
    """Tokens whose group logit dominates: all of them go to ``group``."""
    u = model.moe.router.group_proto.detach()
    w, b = model.pre.weight.detach(), model.pre.bias.detach()
    target = 50.0 * u[group] / u[group].norm() ** 2
    # solve pre(x) = noise + target for x
    h = 0.1 * torch.randn(n, D) + target
    return torch.linalg.solve(w, (h - b).t()).t()


def batches(model):
    torch.manual_seed(1)
    return {
        "normal": (torch.randn(10, D), None),
        "skewed": (skewed_batch(model, 10, 1), None),
        "one token": (torch.randn(1, D), None),
        "empty": (torch.randn(0, D), None),
        "used_token all False": (torch.randn(6, D), torch.zeros(6, dtype=torch.bool)),
        "used_token partly": (torch.randn(6, D), torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool)),
    }


def grad_order(model, x, used_token):
    order = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n))
             for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model(x, used_token).backward()
    for h in hooks:
        h.remove()
    return order


def expected_set(model, frozen):
    moe = model.moe
    active = {id(p) for p in moe.experts.expert_parameters(moe.compressed)}
    names = set()
    for n, p in model.named_parameters():
        if n.startswith("moe.experts.") and id(p) not in active:
            continue
        if n.startswith("moe.router.") and frozen:
            continue
        names.add(n)
    return names


CASES = [
    dict(phase="burn-in"),
    dict(phase="burn-in", fused_router=False),
    dict(phase="burn-in", gated=True),
    dict(phase="compressed"),
    dict(phase="compressed", fused_router=False),
    dict(phase="compressed", fused=True),
    dict(phase="compressed", fused=True, gated=True, bits=4),
    dict(phase="compressed", gated=True),
    dict(phase="compressed", bits=4),
    dict(phase="compressed", g1=2),
    dict(phase="compressed", g1=2, fused=True),
    dict(phase="compressed", frozen=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradient_set_and_order_depend_on_phase_not_data(case):
    orders = {}
    for name in batches(make(**case)):
        model = make(**case)   # each batch at the same step: a training forward advances the phase
        x, used = batches(model)[name]
        orders[name] = grad_order(model, x, used)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values()), name
        if name in ("empty", "used_token all False"):
            assert all(float(g.abs().max()) == 0.0 for n, g in grads.items() if n.startswith("moe.")), name
    reference = orders["normal"]
    assert set(reference) == expected_set(model, case.get("frozen", False))
    assert "pre.weight" in reference   # reached through the MoE's output alone
    for name, order in orders.items():
        assert order == reference, f"{name}: gradients accumulated as {order}, a normal batch gives {reference}"


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_switch_baseline_gradients_do_not_depend_on_routing(impl):
    """The --ffn switch baseline under ZeRO-2 has the same obligation: an expert nobody routed to
    still gets its (zero) gradient, in the same order."""
    from trilemma_moe.models import SwitchTop2FFN
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")

    def run(x):
        torch.manual_seed(0)
        layer = SwitchTop2FFN(D, F, num_experts=4, k=2, seed=3, impl=impl)
        if x is None:   # every token to experts 0 and 1
            with torch.no_grad():
                w = layer.router.weight
                x = (torch.linalg.pinv(w) @ torch.tensor([30.0, 30.0, 0.0, 0.0])).expand(5, D) + 0.01 * torch.randn(5, D)
        order = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n))
                 for n, p in layer.named_parameters()]
        y, l_aux = layer(x)
        (y.square().sum() + l_aux).backward()
        for h in hooks:
            h.remove()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        return order

    reference = run(torch.randn(9, D))
    assert run(None) == reference
    assert run(torch.randn(0, D)) == reference
