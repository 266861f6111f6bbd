"""Optimizer-step boundaries told to the layer (``on_optimizer_step``, the hook
``attach_optimizer`` registers) against the forward-counting clock of a bare layer: the same
schedule, the same statistics; a step the engine skipped leaves no trace."""
import pytest
import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 10, 16


def layer(**kw):
    # dynamic_regroup=True: the schedule under test includes the regroup checks after the first clustering
    base = dict(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in=3, recluster_interval=2, delta=0.0,
                seed=7, router_freeze_steps=1, gamma=None, dynamic_regroup=True)
    base.update(kw)
    return ClusteredMoE(D, F, TrilemmaMoEConfig(**base)).double().train()


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(9, D, generator=gen, dtype=torch.float64) for _ in range(n)]


def micro_step(m, x, gas):
    y, l_aux, _ = m(x)
    ((y.square().sum() + l_aux) / gas).backward()


@pytest.mark.parametrize("gas", [1, 3])
def test_told_steps_follow_the_same_schedule_as_counted_ones(gas):
    counted, told = layer(gradient_accumulation_steps=gas), layer(gradient_accumulation_steps=gas)
    told.load_state_dict(counted.state_dict())
    opt_c = torch.optim.SGD(counted.parameters(), lr=0.05)
    opt_t = torch.optim.SGD(told.parameters(), lr=0.05)
    counted.io.optimizer = opt_c          # the same state rules, no hook: the layer counts forwards
    told.attach_optimizer(opt_t)          # the hook tells it
    for i, x in enumerate(batches(9 * gas, seed=1)):
        for m in (counted, told):
            micro_step(m, x, gas)
        if (i + 1) % gas:
            assert told.step == counted.step == i // gas      # inside a step
        else:
            for m, o in ((counted, opt_c), (told, opt_t)):
                o.step()
                o.zero_grad()
            assert told.step == counted.step == (i + 1) // gas
    assert told.schedule.told and not counted.schedule.told
    assert told.stats()["reclusters"] == counted.stats()["reclusters"] == 3   # at the starts of steps 3, 5, 7 (delta 0)
    assert told.counters.tolist() == counted.counters.tolist()
    torch.testing.assert_close(told.centroids, counted.centroids, rtol=0, atol=0)
    for (n, p), q in zip(told.named_parameters(), counted.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("gas", [1, 2])
def test_a_step_told_as_skipped_leaves_no_trace(gas):
    a, b = layer(gradient_accumulation_steps=gas), layer(gradient_accumulation_steps=gas)
    xs = batches(8 * gas, seed=2)
    skipped = 3   # the first clustering runs at this step's start and stays applied
    for step in range(8):
        if step < skipped:
            b.load_state_dict(a.state_dict())   # the same weights until the skip
        for j in range(gas):
            micro_step(a, xs[step * gas + j], gas)
            if step != skipped:
                micro_step(b, xs[step * gas + j], gas)
        a.on_optimizer_step(applied=step != skipped)
        if step != skipped:
            b.on_optimizer_step()
        else:
            assert a.step == 3 and a.compressed
        a.zero_grad(), b.zero_grad()
    assert a.step == b.step == 7
    assert a.counters.tolist() == b.counters.tolist()
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=1e-12)
    assert torch.equal(a.expert_of_slot, b.expert_of_slot)


def test_the_step_does_not_move_inside_an_optimizer_step_and_checkpoints_hold_its_start():
    m = layer(gradient_accumulation_steps=1, burn_in=100)
    m.on_optimizer_step()                     # told from now on
    for _ in range(3):
        micro_step(m, batches(1, seed=3)[0], 1)
        assert m.step == 1                    # forwards alone do not make steps any more
    fresh = layer(gradient_accumulation_steps=1, burn_in=100)
    fresh.load_state_dict(m.state_dict())
    assert fresh.step == 1
    m.on_optimizer_step()
    assert m.step == 2


def test_attach_optimizer_none_removes_the_hook():
    m = layer()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    m.attach_optimizer(opt)
    opt.step()
    assert m.step == 1
    m.attach_optimizer(None)
    opt.step()
    assert m.step == 1


def test_attached_layers_take_the_engines_accumulation_not_the_configs():
    """A config saying gas 1 under an optimizer stepping every 2 forwards: the attached layer
    counts optimizer steps, not forwards, from the first one on."""
    m = layer(gradient_accumulation_steps=1, burn_in=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    m.attach_optimizer(opt)
    for step in range(3):
        for x in batches(2, seed=10 + step):
            micro_step(m, x, 2)
        assert m.step == step and (m.compressed == (step == 2))
        opt.step()
        opt.zero_grad()
    assert m.step == 3
