"""The layer on a CUDA device gives what it gives on the CPU (skipped where there is no GPU)."""
import copy

import pytest
import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D, F = 32, 64


def _pair(dtype=torch.float64, gated=False):
    # dynamic_regroup=True: training runs through the first clustering and a regroup (the library's
    # default clusters once)
    cfg = TrilemmaMoEConfig(num_experts=16, num_groups=4, rank=4, burn_in=2, recluster_interval=2,
                            delta=0.0, gamma=None, dynamic_regroup=True)
    cpu = ClusteredMoE(D, F, cfg, gated=gated).to(dtype)
    gpu = copy.deepcopy(cpu).cuda()
    return cpu, gpu


@pytest.mark.parametrize("gated", [False, True])
def test_training_on_cuda_matches_cpu_through_clustering(gated):
    cpu, gpu = _pair(gated=gated)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (cpu, gpu)]
    for m, o in zip((cpu, gpu), opts):
        m.attach_optimizer(o)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(64, D, generator=gen, dtype=torch.float64)
        outs = []
        for m, o, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            o.zero_grad(set_to_none=True)
            y, l_aux, counts = m(x.to(dev))
            (y.pow(2).mean() + l_aux).backward()
            o.step()
            outs.append((y.detach().cpu(), counts.cpu()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-9, atol=1e-10)
        assert torch.equal(outs[1][1], outs[0][1])
    assert gpu.compressed and gpu.stats()["reclusters"] >= 2
    assert torch.equal(gpu.group_assignment(), cpu.group_assignment())


def test_bf16_forward_backward_on_cuda():
    cfg = TrilemmaMoEConfig(num_experts=32, num_groups=8, rank=16)
    layer = ClusteredMoE(256, 1024, cfg).cuda()
    layer.recluster(force=True)
    x = torch.randn(4096, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, l_aux, counts = layer(x)
    (y.float().pow(2).mean() + l_aux).backward()
    assert torch.isfinite(y).all() and x.grad is not None and torch.isfinite(x.grad).all()
    assert int(counts.sum()) == 4096 * 2


@pytest.mark.parametrize("bits", [4, 16])
def test_bf16_serving_from_the_stored_form_on_cuda(bits):
    """bf16 parameters on the fused path (Triton kernels): after release_masters the layer serves
    from the stacked stored form (INT4 decoded by dequant_int4) exactly what it computed before."""
    cfg = TrilemmaMoEConfig(num_experts=32, num_groups=8, rank=16, residual_bits=bits)
    layer = ClusteredMoE(256, 1024, cfg).cuda()
    layer.recluster(force=True)
    layer = layer.to(torch.bfloat16).eval()
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = layer(x)[0]
        layer.release_masters()
        after = layer(x)[0]
    assert torch.isfinite(before).all() and torch.equal(before, after)
