"""INT4 residuals: packing against a plain float64 reference, straight-through training,
the layer's forward with INT4 factors, and memory_report from the tensors held."""
import math

import pytest
import torch

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core import quant
from trilemma_moe.core.layer import ClusteredMoE


def _reference_codes(w):
    """Per (slot, column) asymmetric 4-bit codes, computed element by element in float64."""
    E, R, C = w.shape
    codes = torch.zeros(E, R, C, dtype=torch.long)
    scales = torch.zeros(E, C, dtype=torch.float64)
    zeros = torch.zeros(E, C, dtype=torch.long)
    for e in range(E):
        for c in range(C):
            col = [float(v) for v in w[e, :, c]]
            lo, hi = min(min(col), 0.0), max(max(col), 0.0)
            s = float(torch.tensor((hi - lo) / 15, dtype=torch.float64).to(torch.float16))
            s = s if s > 0 else 1.0
            z = min(max(round(-lo / s), 0), 15)
            scales[e, c], zeros[e, c] = s, z
            for r in range(R):
                codes[e, r, c] = min(max(round(col[r] / s) + z, 0), 15)
    return codes, scales, zeros


@pytest.mark.parametrize("rows", [7, 8])
def test_pack_matches_plain_reference(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(3, rows, 5, generator=g) * 0.1
    w[1, :, 2] = 0.0                      # a gated (all-zero) residual column is exact
    w[2, :, 0] = torch.rand(rows, generator=g) + 0.5   # all positive: the range is widened to 0
    qt = quant.quantize(w)
    assert qt["packed"].dtype == torch.uint8 and qt["packed"].shape == (3, math.ceil(rows / 2), 5)
    assert qt["scale"].dtype == torch.float16 and qt["zero"].dtype == torch.uint8
    codes, scales, zeros = _reference_codes(w)
    # nibbles: low = even row, high = odd row
    p = qt["packed"].long()
    unpacked = torch.stack([p & 15, p >> 4], dim=2).reshape(3, -1, 5)[:, :rows]
    assert torch.equal(unpacked, codes)
    torch.testing.assert_close(qt["scale"].double().squeeze(1), scales, rtol=0, atol=0)
    deq = quant.dequantize(qt, rows, torch.float64)
    ref = (unpacked.double() - zeros.unsqueeze(1).double()) * scales.unsqueeze(1)
    torch.testing.assert_close(deq, ref, rtol=0, atol=1e-12)
    assert (deq - w.double()).abs().le(scales.unsqueeze(1) / 2 + 1e-6).all()   # half a step at most
    assert torch.equal(deq[1, :, 2], torch.zeros(rows, dtype=torch.float64))
    # fake_quant is exactly the stored values, in the input dtype
    assert torch.equal(quant.fake_quant(w), quant.dequantize(qt, rows, torch.float32))


def test_fake_quant_gradient_is_straight_through():
    w = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 9, 3, dtype=torch.float64)
    (quant.fake_quant(w) * up).sum().backward()
    assert torch.equal(w.grad, up)


def test_stored_int4_residual_bytes_vs_bf16():
    g = torch.Generator().manual_seed(0)
    for rows in (128, 768, 3072):
        w = torch.randn(4, rows, 16, generator=g)
        ratio = quant.nbytes(quant.quantize(w)) / w.to(torch.bfloat16).nbytes
        assert ratio <= 0.27, (rows, ratio)
        assert ratio == pytest.approx(0.25 + 1.5 / rows, abs=1e-9)


def _layers(bits_dtype=torch.float64):
    cfg4 = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, burn_in=0, seed=2, residual_bits=4)
    cfg16 = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, burn_in=0, seed=2)
    a, b = ClusteredMoE(12, 20, cfg4).to(bits_dtype), ClusteredMoE(12, 20, cfg16).to(bits_dtype)
    a.recluster(force=True)
    b.recluster(force=True)
    return a, b


def test_int4_layer_is_the_16_bit_layer_with_dequantized_factors():
    a, b = _layers()
    with torch.no_grad():
        for pd_a, pd_b in ((a.experts.fa, b.experts.fa), (a.experts.fb, b.experts.fb)):
            for n in pd_a:
                pd_b[n].copy_(quant.dequantize(quant.quantize(pd_a[n]), pd_a[n].shape[1], torch.float64))
    x = torch.randn(30, 12, dtype=torch.float64)
    ya, la, _ = a(x)
    yb, lb, _ = b(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-13)
    # and the masters move: INT4 gradients reach them (straight through)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for n in a.experts.fa:
        torch.testing.assert_close(a.experts.fa[n].grad, b.experts.fa[n].grad, rtol=1e-10, atol=1e-12)
        assert a.experts.fa[n].grad.abs().sum() > 0


def test_int4_training_keeps_master_factors_and_learns():
    torch.manual_seed(0)
    a, _ = _layers(torch.float32)
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    x = torch.randn(64, 12)
    target = torch.randn(64, 12)
    losses = []
    for _ in range(30):
        y, l_aux, _ = a(x)
        loss = (y - target).square().mean()
        opt.zero_grad()
        (loss + l_aux).backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    w = a.experts.fa["w1"]
    assert w.dtype == torch.float32 and not torch.equal(quant.fake_quant(w), w)  # masters are off-grid


def test_memory_report_counts_tensors_held():
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=4, burn_in=0, residual_bits=4, seed=1)
    layer = ClusteredMoE(16, 24, cfg)
    before = layer.memory_report()
    assert before["burn_in_full"] == 8 * (16 * 24 * 2) * 4
    layer.recluster(force=True)
    r = layer.memory_report()
    assert r["burn_in_full"] == 0      # released after the first clustering (plain torch)
    assert r["bases"] == 2 * 16 * 24 * 2 * 4
    assert r["residual_masters"] == 8 * 4 * (16 + 24) * 2 * 4
    # packed: ceil(rows/2) bytes per column; scale 2 B + zero 1 B per (slot, column)
    assert r["residual_packed"] == 8 * 4 * (8 + 12) * 2
    assert r["residual_scales"] == 8 * 4 * 4 * 3
    assert r["residual_stored"] == r["residual_packed"] + r["residual_scales"]
    assert r["router"] == (2 + 8) * 16 * 4
    assert r["stored_experts"] == r["bases"] + r["residual_stored"] + r["biases"]


@pytest.mark.parametrize("knob,value", [("residual_bits", 8), ("residual_bits", True), ("offload_idle_steps", 0),
                                        ("prefetch_lookahead", -1), ("prefetch_ema_rate", 0.0),
                                        ("prefetch_threshold", 1.5), ("prefetch_router_evidence", 1),
                                        ("offload_dir", ""), ("aio", {"blocksize": 1})])
def test_memory_knobs_are_validated(knob, value):
    with pytest.raises(ValueError, match=knob):
        TrilemmaMoEConfig(**{knob: value})


def test_offload_dir_and_aio_come_from_the_deepspeed_config():
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme/opt"}},
          "aio": {"block_size": 262144, "queue_depth": 16}, "trilemma_moe": {"offload_idle_steps": 3}}
    cfg = TrilemmaMoEConfig.from_deepspeed_config(ds)
    assert cfg.offload_dir == "/nvme/opt" and cfg.aio == {"block_size": 262144, "queue_depth": 16}
    ds["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/nvme/param"}
    assert TrilemmaMoEConfig.from_deepspeed_config(ds).offload_dir == "/nvme/param"
    ds["trilemma_moe"]["offload_dir"] = "/ours"
    assert TrilemmaMoEConfig.from_deepspeed_config(ds).offload_dir == "/ours"
    assert TrilemmaMoEConfig.from_deepspeed_config({}).offload_dir is None
