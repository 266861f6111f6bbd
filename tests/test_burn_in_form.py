"""``burn_in_form="compressed"``: the layer never holds full experts. Each group starts as the
decomposition of its initial experts (what a full burn-in would have started from, grouped in slot
order), burn-in trains bases + factors, and the first clustering regroups them. Checked against
plain float64 references; under DeepSpeed ZeRO 0/1/2 the optimizer holds no full-expert state."""

import pytest
import torch
import torch.nn as nn

from layer_reference import _ref_forward, _temp
from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 12, 20


def _cfg(**kw):
    base = dict(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in=3, seed=5, burn_in_form="compressed")
    base.update(kw)
    return TrilemmaMoEConfig(**base)


def _ref_decomposition(weights, rank):
    """float64 Eq. 6-7 by hand: base = mean of the K experts, A B^T the rank-r truncated SVD of each
    residual (returned as A B^T, which the split of the singular values does not change)."""
    base = weights.mean(0)
    lows = []
    for w in weights:
        u, s, vh = torch.linalg.svd(w - base, full_matrices=False)
        lows.append(u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
    return base, torch.stack(lows)


@pytest.mark.parametrize("gated", [False, True])
def test_starts_as_the_decomposition_of_the_full_start(gated):
    full = ClusteredMoE(D, F, _cfg(burn_in_form="full"), gated=gated).double()
    comp = ClusteredMoE(D, F, _cfg(), gated=gated).double()
    K, r = full.experts_per_group, full.config.rank
    assert comp.compressed and not comp.clustered
    assert len(comp.experts.full) == 0   # no burn-in experts at all, not even empty placeholders
    for name in full.spec.matrices:
        for g in range(full.num_groups):
            w = full.experts.full[name][g * K:(g + 1) * K].detach().double()
            base, low = _ref_decomposition(w, r)
            torch.testing.assert_close(comp.experts.base[name][g].detach(), base, rtol=1e-6, atol=1e-7)
            a = comp.experts.fa[name][g * K:(g + 1) * K].detach()
            b = comp.experts.fb[name][g * K:(g + 1) * K].detach()
            torch.testing.assert_close(a @ b.transpose(-1, -2), low, rtol=1e-5, atol=1e-6)
    for name in full.spec.biases:
        torch.testing.assert_close(comp.experts.bias[name], full.experts.bias[name], rtol=0, atol=0)
    # the router starts the same: routing differs only through the experts' weights
    for p, q in zip(comp.router.parameters(), full.router.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_burn_in_forward_and_gradients_use_the_compressed_form():
    layer = ClusteredMoE(D, F, _cfg(burn_in=10)).double()
    layer.train()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    y, l_aux, counts = layer(x)
    y_ref, counts_ref = _ref_forward(layer, x, _temp(layer.config, 0))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(counts, counts_ref)
    (y.square().sum() + l_aux).backward()
    ex = layer.experts
    assert all(p.grad is not None for p in ex.matrices(compressed=True))
    # what a reducer must skip now holds no storage; everything else that trains gets a gradient
    idle = {id(p) for p in layer.idle_parameters()}
    assert len(ex.full) == 0
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad and id(p) not in idle)


def _train(layer, steps, seed=0):
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    layer.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y, l_aux, _ = layer(torch.randn(24, D, generator=gen, dtype=torch.float64))
        (y.square().mean() + l_aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_optimizer_state_covers_the_compressed_form_only():
    layer = ClusteredMoE(D, F, _cfg(burn_in=2)).double()
    opt = _train(layer, 5)
    held = sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert held == 2 * trainable     # Adam's two moments, of the compressed form, router and biases
    full_size = sum(layer.num_experts * di * do for di, do in layer.spec.matrices.values())
    assert trainable < full_size      # (the full experts alone would be more than everything held)


def test_first_clustering_moves_experts_and_keeps_the_stayers():
    """At burn_in the similarity clustering regroups the compressed experts: movers are re-expressed
    on their new group's base (rank-r truncation of their weights minus that base), every other
    expert keeps its weights exactly."""
    layer = ClusteredMoE(D, F, _cfg(burn_in=4)).double()
    _train(layer, 5)              # the first forward of step 5 clusters
    assert layer.clustered and layer.stats()["reclusters"] == 1 and layer.last_regroup["moved_experts"] > 0
    layer = ClusteredMoE(D, F, _cfg(burn_in=4, regroup_migration="movers")).double()
    _train(layer, 4)
    before = {n: w.clone() for n, w in layer.experts.effective_weights(True).items()}
    slot_before = layer.slot_of_expert().clone()
    assert layer.recluster() and layer.clustered
    slot_after = layer.slot_of_expert()
    K, r = layer.experts_per_group, layer.config.rank
    moved = slot_after // K != slot_before // K
    assert moved.any() and not moved.all()
    after = layer.experts.effective_weights(True)
    for name in layer.spec.matrices:
        for e in range(layer.num_experts):
            old, new = before[name][slot_before[e]], after[name][slot_after[e]]
            if not moved[e]:
                torch.testing.assert_close(new, old, rtol=0, atol=0)
            else:
                base = layer.experts.base[name][slot_after[e] // K].detach()
                u, s, vh = torch.linalg.svd(old - base, full_matrices=False)
                torch.testing.assert_close(new, base + u[:, :r] @ torch.diag(s[:r]) @ vh[:r], rtol=1e-6, atol=1e-8)


def test_checkpoints_resume_and_refuse_the_other_form():
    layer = ClusteredMoE(D, F, _cfg(burn_in=6)).double()
    _train(layer, 2)
    state = layer.state_dict()
    again = ClusteredMoE(D, F, _cfg(burn_in=6, seed=99)).double()
    again.load_state_dict(state)
    x = torch.randn(9, D, dtype=torch.float64)
    layer.eval(), again.eval()
    torch.testing.assert_close(again(x)[0], layer(x)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="burn_in_form='compressed'"):
        ClusteredMoE(D, F, _cfg(burn_in=6, burn_in_form="full")).double().load_state_dict(state)
    with pytest.raises(RuntimeError, match="burn_in_form='full'"):
        ClusteredMoE(D, F, _cfg(burn_in=6)).double().load_state_dict(
            ClusteredMoE(D, F, _cfg(burn_in=6, burn_in_form="full")).double().state_dict())
    # after the first clustering both forms hold the same tensors: a clustered checkpoint of a
    # full burn-in resumes in a compressed-form layer
    full = ClusteredMoE(D, F, _cfg(burn_in=1, burn_in_form="full")).double()
    _train(full, 2)
    comp = ClusteredMoE(D, F, _cfg(burn_in=1)).double()
    comp.load_state_dict(full.state_dict())
    full.eval(), comp.eval()
    torch.testing.assert_close(comp(x)[0], full(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("knobs,match", [(dict(burn_in_form="half"), "burn_in_form"),
                                         (dict(low_rank=False), "burn_in_form='compressed'.*low_rank")])
def test_knob_errors(knobs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**knobs)


def test_loaded_expert_weights_are_decomposed():
    """``load_expert_weights`` (the DeepSpeed drop-in's path) of given experts gives their
    decomposition when the layer holds no full experts."""
    layer = ClusteredMoE(D, F, _cfg()).double()
    gen = torch.Generator().manual_seed(3)
    given = [{n: torch.randn(di, do, generator=gen, dtype=torch.float64) for n, (di, do) in layer.spec.matrices.items()}
             | {n: torch.randn(k, generator=gen, dtype=torch.float64) for n, k in layer.spec.biases.items()}
             for _ in range(layer.num_experts)]
    layer.experts.load_expert_weights(given)
    K, r = layer.experts_per_group, layer.config.rank
    eff = layer.experts.effective_weights(True)
    for name in layer.spec.matrices:
        for g in range(layer.num_groups):
            base, low = _ref_decomposition(torch.stack([w[name] for w in given[g * K:(g + 1) * K]]), r)
            torch.testing.assert_close(eff[name][g * K:(g + 1) * K], base + low, rtol=1e-9, atol=1e-10)
    for name in layer.spec.biases:
        torch.testing.assert_close(layer.experts.bias[name].detach(), torch.stack([w[name] for w in given]))


# --- under DeepSpeed: ZeRO's flat buffers and optimizer hold no full-expert state --------------------
V = 30


class _TinyLM(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.emb, self.moe, self.head = nn.Embedding(V, D), moe, nn.Linear(D, V)

    def forward(self, idx):
        h = self.emb(idx)
        y, l_aux, _ = self.moe(h)
        return nn.functional.cross_entropy(self.head(h + y).reshape(-1, V), idx.roll(-1, 1).reshape(-1)) + l_aux


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_holds_no_full_expert_state(stage, dist_world_1):
    import deepspeed
    from trilemma_moe import TrilemmaMoE
    from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups

    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))
    model = _TinyLM(TrilemmaMoE(D, expert, num_experts=8, k=2, config=_cfg(burn_in=2)))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=moe_param_groups(model),
        config={"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                "zero_optimization": {"stage": stage}})
    attach_engine(engine)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = torch.randint(0, V, (4, 10), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(5):   # burn-in 2 steps, the first clustering at step 3
        loss = engine(data)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert model.moe.moe.clustered and losses[-1] < losses[0]
    opt = engine.optimizer
    moments = opt if stage == 0 else opt.optimizer     # the torch AdamW (ZeRO-1/2: inside DeepSpeed's)
    assert sum(t.numel() for st in moments.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim()) == 2 * trainable
    if stage > 0:   # one process: its fp32 partitions are every trainable element, nothing more
        assert sum(t.numel() for t in opt.single_partition_of_fp32_groups) == trainable
