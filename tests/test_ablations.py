"""The ablations of the paper's Table 3 as knobs of one layer (``grouping``, ``low_rank``,
``routing``), each against a float64 reference recomputed from the raw parameters."""
import pytest
import torch

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.routing import flat_topk
from trilemma_moe.models import OURS_VARIANTS, build_ffn
from layer_reference import _cfg, _force_new_grouping, _layer, _partition, _perturb, _ref_forward, _snapshot_by_expert, _temp, _x


# --- w/o hierarchical routing: flat top-k over all experts ------------------------------------
def test_flat_topk_group_view_is_the_flat_softmax():
    logits = torch.randn(50, 12, dtype=torch.float64)
    r = flat_topk(logits, 3, 2)
    joint = (r.group_probs.unsqueeze(-1) * r.expert_probs).reshape(50, 12)
    torch.testing.assert_close(joint, logits.softmax(-1), rtol=0, atol=1e-12)
    top = logits.softmax(-1).topk(2, dim=-1)
    assert torch.equal(r.slot_idx.squeeze(-1), top.indices)
    torch.testing.assert_close(r.weights.squeeze(-1), top.values, rtol=0, atol=0)
    assert torch.equal(r.group_idx, top.indices // 4)


@pytest.mark.parametrize("compressed", [False, True])
def test_flat_routing_forward_matches_reference(compressed):
    cfg = _cfg(routing="flat", num_experts=8, num_groups=2, top_k=3, router_freeze_steps=0)
    layer = _layer(cfg)
    if compressed:
        layer.recluster(force=True)
        _perturb(layer, seed=3)
    layer.train()
    x = _x((4, 9, layer.hidden_size), seed=11)
    t = _temp(cfg, layer.step)   # the temperature of the step this forward belongs to
    y, l_aux, counts = layer(x)
    y_ref, counts_ref = _ref_forward(layer, x, t)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(counts.cpu(), counts_ref)
    (y.square().sum() + l_aux).backward()
    # the group stage is gone: its prototypes get no gradient and are declared idle for reducers
    assert layer.router.group_proto.grad is None and layer.router.expert_vec.grad is not None
    assert any(p is layer.router.group_proto for p in layer.idle_parameters())


# --- w/o low-rank compression: full experts, clustered and hierarchically routed --------------
def test_full_experts_move_whole_through_regroups_with_their_moments():
    cfg = _cfg(low_rank=False, alpha=0.0, num_experts=8, num_groups=4, top_k=1)
    layer = _layer(cfg)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer.attach_optimizer(opt)
    layer.train()
    x = _x((32, layer.hidden_size), seed=1)
    for _ in range(2):
        y, l_aux, _ = layer(x)
        (y.square().mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    full_params = layer.expert_parameter_count()
    for first in (True, False):
        before = _snapshot_by_expert(layer)
        w1 = layer.experts.full["w1"]
        moments = {n: opt.state[w1][n][layer.slot_of_expert()].clone() for n in ("exp_avg", "exp_avg_sq")}
        target = _force_new_grouping(layer, seed=5)
        assert layer.recluster(force=True)
        assert layer.clustered and not layer.compressed
        assert _partition(layer) == target
        after = _snapshot_by_expert(layer)
        for name in before:   # every expert keeps its exact weights, wherever it now sits
            assert torch.equal(before[name], after[name]), name
        for n, m in moments.items():
            assert torch.equal(opt.state[w1][n][layer.slot_of_expert()], m), n
        assert layer.expert_parameter_count() == full_params
        assert layer.measured_compression_ratio() == 1.0
        assert layer.stats()["reconstruction_error"] == 0.0
    layer.eval()
    y, _, _ = layer(x)
    torch.testing.assert_close(y, _ref_forward(layer, x, _temp(cfg, layer.step))[0], rtol=1e-10, atol=1e-12)


def test_full_experts_checkpoint_round_trip_keeps_full_weights():
    cfg = _cfg(low_rank=False)
    layer = _layer(cfg)
    layer.recluster(force=True)
    _perturb(layer, seed=2)
    fresh = _layer(cfg)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.clustered and not fresh.compressed
    for name, p in layer.experts.full.items():
        assert torch.equal(fresh.experts.full[name], p)


# --- w/o online clustering: a fixed random balanced grouping ----------------------------------
def test_random_grouping_is_balanced_seeded_and_final():
    parts = []
    for seed in (0, 0, 1):
        cfg = _cfg(grouping="random", dynamic_regroup=False, num_experts=12, num_groups=3, seed=seed)
        layer = _layer(cfg)
        layer.recluster(force=True)
        a = layer.group_assignment()
        assert torch.equal(torch.bincount(a, minlength=3), torch.full((3,), 4))
        parts.append(_partition(layer))
    assert parts[0] == parts[1] and parts[0] != parts[2]


def test_random_grouping_ignores_the_similarity():
    """The same layer clustered on two different activation statistics gets the same groups."""
    parts = []
    for seed in (1, 2):
        layer = _layer(_cfg(grouping="random", dynamic_regroup=False, alpha=0.0))
        _force_new_grouping(layer, seed=seed)
        layer.recluster(force=True)
        parts.append(_partition(layer))
    assert parts[0] == parts[1]


@pytest.mark.parametrize("knobs,match", [
    (dict(grouping="random", dynamic_regroup=True), "dynamic_regroup=False"),
    (dict(grouping="kmeans"), "grouping"),
    (dict(routing="topk"), "routing"),
    (dict(low_rank=0), "low_rank"),
    (dict(routing="flat", ep_size=2, num_groups=2), "ep_size"),
])
def test_ablation_knob_errors_name_the_knob(knobs, match):
    with pytest.raises(ValueError, match=match):
        TrilemmaMoEConfig(**knobs)


# --- the trainer's variants ------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(OURS_VARIANTS))
def test_every_variant_builds_its_knobs_and_clusters(kind):
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=2, burn_in=1, recluster_interval=1)
    ffn = build_ffn(kind, 16, 32, cfg, seed=0)
    for knob, value in OURS_VARIANTS[kind].items():
        assert getattr(ffn.config, knob) == value
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-2)
    ffn.layer.moe.attach_optimizer(opt)
    x = torch.randn(64, 16)
    for _ in range(4):
        y, l_aux = ffn(x)
        (y.square().mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    s = ffn.stats()
    assert s["clustered"] and s["compressed"] == (kind != "full-experts")
    assert torch.isfinite(y).all()
