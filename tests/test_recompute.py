"""``recompute_experts``: activation checkpointing of the expert compute (ExpertSlots.forward runs
under torch.utils.checkpoint, so the backward keeps only its inputs and recomputes the rest)."""
import pytest
import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

D, F = 12, 20


def _run(layer, x):
    y, l_aux, counts = layer(x)
    (y.square().sum() + l_aux).backward()
    return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}, x.grad.clone()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form,bits", [("full", 16), ("compressed", 16), ("compressed", 4)])
def test_recompute_gives_the_same_outputs_and_gradients(gated, form, bits):
    """Bit for bit (float64, fresh random inputs): the same operations run again in the backward."""
    outs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in=5, burn_in_form=form,
                                residual_bits=bits, recompute_experts=recompute)
        layer = ClusteredMoE(D, F, cfg, gated=gated).double()
        layer.train()
        x = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        outs.append(_run(layer, x))
    (y0, g0, x0), (y1, g1, x1) = outs
    assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert set(g0) == set(g1) and g0
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_recompute_keeps_only_the_inputs_of_the_expert_compute():
    """What the autograd graph saves for the backward, counted with saved_tensors_hooks: with
    recompute_experts the expert compute's hidden activations (d_ff wide, per routed row) are gone."""
    def saved_bytes(recompute):
        torch.manual_seed(0)
        cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in_form="compressed",
                                recompute_experts=recompute)
        layer = ClusteredMoE(16, 256, cfg)
        layer.train()
        x = torch.randn(64, 16, requires_grad=True)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, l_aux, _ = layer(x)
        return total[0]
    plain, recomputed = saved_bytes(False), saved_bytes(True)
    # without: several (rows x d_ff) tensors (pre-activation, activation, weighted activation, ...)
    rows_by_ffn = 64 * 2 * 256 * 4
    assert plain > 3 * rows_by_ffn, plain
    assert recomputed < rows_by_ffn, (plain, recomputed)


def test_recompute_experts_must_be_a_bool():
    with pytest.raises(ValueError, match="recompute_experts must be True or False"):
        TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, recompute_experts="yes")
