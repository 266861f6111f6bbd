"""What real runs throw at one layer: tokens with NaN/inf features, optimizer steps the engine
skips (fp16 loss-scale overflow), activations of another dtype than the layer's."""
import pytest
import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 10, 16


def layer(**kw):
    # dynamic_regroup=True: the regroup schedule after the first clustering is part of what a skip
    # must leave untouched (the library's default clusters once)
    base = dict(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in=3, recluster_interval=2, delta=0.0,
                seed=7, router_freeze_steps=1, gamma=None, dynamic_regroup=True)
    base.update(kw)
    return ClusteredMoE(D, F, TrilemmaMoEConfig(**base)).double()


def train_forward(m, x):
    y, l_aux, _ = m(x)
    (y.square().sum() + l_aux).backward()


def test_nonfinite_tokens_stay_out_of_the_centroids_and_are_counted():
    torch.manual_seed(0)
    a, b = layer(), layer()
    x = torch.randn(20, D, dtype=torch.float64)
    bad = x.clone()
    bad[3, 2], bad[11, 0], bad[17] = float("nan"), float("inf"), -float("inf")
    finite = torch.ones(20, dtype=torch.bool)
    finite[[3, 11, 17]] = False
    with torch.no_grad():   # routing is per token: the finite rows route alike in both layers
        a(bad)
    a.train(), b.train()
    a(bad)
    b(x[finite])
    assert torch.isfinite(a.centroids).all()
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=1e-12)
    assert torch.equal(a.centroid_seen, b.centroid_seen)
    assert a.stats()["nonfinite_tokens"] == 3 and b.stats()["nonfinite_tokens"] == 0


def test_clustering_refuses_nonfinite_centroids_naming_layer_and_experts():
    m = layer()
    m.train()
    train_forward(m, torch.randn(12, D, dtype=torch.float64))
    with torch.no_grad():
        m.centroids[5, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer 0: the activation centroids of experts \[5\] are not finite"):
        m.recluster(force=True)
    assert not m.compressed   # nothing was changed


def test_clustering_refuses_nonfinite_weights_naming_the_experts():
    m = layer()
    with torch.no_grad():
        m.experts.full["w2"][6, 0, 0] = float("inf")   # slot 6 holds expert 6 before any regroup
    with pytest.raises(FloatingPointError, match=r"layer 0: the expert weights of experts \[6\] are not finite"):
        m.recluster(force=True)
    assert not m.compressed


@pytest.mark.parametrize("gas", [1, 2])
def test_a_skipped_optimizer_step_is_not_counted(gas):
    """The engine skips one optimizer step (its running skip count goes up after that step): the
    layer's step counter, activation centroids and regroup schedule end as if the step's
    micro-batches had never been seen; the regroup at the skipped step's start stays applied."""
    skips = [0]
    a, b = layer(gradient_accumulation_steps=gas), layer(gradient_accumulation_steps=gas)
    a.skipped_steps_source = lambda: skips[0]
    b.skipped_steps_source = lambda: 0
    a.train(), b.train()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(9, D, generator=gen, dtype=torch.float64) for _ in range(8 * gas)]
    skipped = {3 * gas + j for j in range(gas)}   # step 3: the first clustering runs at its start
    for i, x in enumerate(batches):
        train_forward(a, x)
        if i not in skipped:
            train_forward(b, x)
        if i == max(skipped):
            skips[0] += 1   # engine.step() of step 3 overflowed
            assert a.step == 3 and a.compressed
        a.zero_grad(), b.zero_grad()
        if i < min(skipped):
            b.load_state_dict(a.state_dict())   # the same weights until the skip
    assert a.step == b.step == 7
    assert a._c("reclusters") == b._c("reclusters") == 2   # at steps 3 and 5
    assert a.counters.tolist() == b.counters.tolist()
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=1e-12)
    assert torch.equal(a.expert_of_slot, b.expert_of_slot)


def test_skip_count_reloaded_from_a_checkpoint_is_a_new_baseline():
    skips = [0]
    m = layer()
    m.skipped_steps_source = lambda: skips[0]
    m.train()
    for _ in range(2):
        train_forward(m, torch.randn(6, D, dtype=torch.float64))
    m.load_state_dict(m.state_dict())
    skips[0] = 5    # the engine's count as loaded with the checkpoint: no step of ours was skipped
    train_forward(m, torch.randn(6, D, dtype=torch.float64))
    assert m.step == 3


def test_hidden_states_of_another_dtype_is_one_clear_error():
    m = ClusteredMoE(D, F, TrilemmaMoEConfig(num_experts=4, num_groups=2, rank=2))
    with pytest.raises(TypeError, match=r"hidden_states is torch.bfloat16 but layer 0's expert parameters are "
                                        r"torch.float32"):
        m(torch.randn(3, D, dtype=torch.bfloat16))
    m.experts.to(torch.bfloat16)   # bf16 experts beside a float32 router: the router upcasts itself
    y, _, _ = m(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    m.experts.to(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # mixed precision is legitimate
        y, _, _ = m(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.shape == (3, D)
