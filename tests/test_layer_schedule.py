"""The training protocol (core/schedule.py, paper 3.5): burn-in, regroup interval, delta, static
grouping, gradient accumulation, eval forwards, router freeze and temperature."""

import pytest
import torch

from layer_reference import D, _cfg, _layer, _temp, _ref_forward, _force_new_grouping, _partition, _x
from trilemma_moe import TrilemmaMoEConfig


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


def _check_steps(layer, x, steps):
    """The training forwards at which a clustering or regroup check ran (applied or skipped)."""
    attempts = []
    for step in range(steps):
        s = layer.stats()
        n0 = s["reclusters"] + s["skipped_reclusters"]
        _fwd(layer, x)
        s = layer.stats()
        if s["reclusters"] + s["skipped_reclusters"] > n0:
            attempts.append(step)
    return attempts


def test_the_default_config_clusters_once_and_dynamic_regroup_checks_after():
    """The library's default (no dynamic_regroup given): clustered once at the end of burn-in, no
    regroup check at the later recluster_interval steps; the same config with dynamic_regroup=True
    checks at each of them (_cfg is not used: it asks for regroups)."""
    knobs = dict(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in=2, recluster_interval=3, delta=0.0,
                 gamma=None)
    x = _x((16, D), 7)
    static = _layer(TrilemmaMoEConfig(**knobs))
    assert _check_steps(static, x, 15) == [2]
    s = static.stats()
    assert s["reclusters"] == 1 and s["skipped_reclusters"] == 0 and static.compressed
    dynamic = _layer(TrilemmaMoEConfig(**knobs, dynamic_regroup=True))
    assert _check_steps(dynamic, x, 15) == [2, 5, 8, 11, 14]


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
