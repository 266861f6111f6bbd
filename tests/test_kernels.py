"""The fused expert path against the per-slot path, and every Triton kernel against its torch twin.

On the CPU the fused path runs the kernels' torch twins (``kernels/reference.py``) through the same
autograd code the GPU runs; the Triton kernels themselves run through Triton's interpreter
(subprocess, float32) and, on a GPU, compiled (float32 and bf16).
"""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE
from trilemma_moe.kernels import fused, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join(ROOT, "tests", "scripts", "kernel_checks.py")
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# Triton 3.6's interpreter turns 1-element arrays into loop bounds, which numpy >= 2.4 refuses
# (the test extra pins numpy < 2.4 for it).
_NP = tuple(int(p) for p in __import__("numpy").__version__.split(".")[:2])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layer(E=16, G=4, r=4, k=2, g1=1, act="gelu", bias=True, d=24, f=40, seed=0, dtype=torch.float64, bits=16,
           gated=False):
    cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=r, top_k=k, group_top_k=g1, gamma=None, seed=seed,
                            residual_bits=bits)
    layer = ClusteredMoE(d, f, cfg, activation=act, bias=bias, gated=gated).to(dtype)
    layer.recluster(force=True)
    with torch.no_grad():  # factors and biases away from their SVD values, so every term matters
        for p in layer.experts.parameters():
            if p.numel():
                p.add_(torch.randn_like(p) * 0.1)
    return layer


def _run(layer, x):
    xx = x.detach().clone().requires_grad_()
    y, l_aux, counts = layer(xx)
    (y.pow(2).sum() + l_aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), l_aux.detach(), counts, xx.grad, grads


@pytest.mark.parametrize("act,bias,g1,k,E,G,r,bits,gated", [
    ("gelu", True, 1, 2, 16, 4, 4, 16, False),
    ("gelu", True, 1, 2, 16, 4, 4, 4, False),      # INT4 residuals: both paths see the same dequantized factors
    ("relu", False, 2, 2, 12, 4, 5, 16, False),     # K*r = 15: not a power of two
    ("silu", True, 2, 1, 8, 2, 3, 16, False),
    ("gelu_tanh", True, 1, 3, 32, 4, 2, 16, False),
    # gated experts: act(x W1 + b1) * (x W3 + b3)
    ("silu", True, 1, 2, 16, 4, 4, 16, True),
    ("silu", False, 2, 1, 8, 2, 3, 16, True),
    ("gelu", False, 2, 2, 12, 4, 5, 16, True),
    ("gelu", True, 1, 1, 16, 4, 4, 16, True),
    ("silu", True, 2, 2, 16, 4, 4, 4, True),
])
def test_fused_path_equals_slot_path(act, bias, g1, k, E, G, r, bits, gated):
    torch.manual_seed(E * 7 + r + gated)
    slow = _layer(E, G, r, k, g1, act, bias, bits=bits, gated=gated)
    fast = copy.deepcopy(slow)
    fast.fused = True
    x = torch.randn(3, 37, 24, dtype=torch.float64)
    ys, ls, cs, gxs, gps = _run(slow, x)
    yf, lf, cf, gxf, gpf = _run(fast, x)
    torch.testing.assert_close(yf, ys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lf, ls, rtol=1e-12, atol=1e-12)
    assert torch.equal(cf, cs)
    torch.testing.assert_close(gxf, gxs, rtol=1e-11, atol=1e-12)
    assert sorted(gpf) == sorted(gps)
    for n in gps:
        torch.testing.assert_close(gpf[n], gps[n], rtol=1e-11, atol=1e-12, msg=n)


@pytest.mark.parametrize("bias,gated", [(True, False), (False, False), (True, True), (False, True)])
def test_bf16_autocast_fused_and_slot_paths_agree(bias, gated):
    """Under bf16 autocast (CPU here) both paths run and agree to bf16 accuracy."""
    torch.manual_seed(5)
    slow = _layer(E=16, G=4, r=4, bias=bias, dtype=torch.float32, act="silu" if gated else "gelu", gated=gated)
    fast = copy.deepcopy(slow)
    fast.fused = True
    x = torch.randn(64, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys, _, cs = slow(x)
        yf, _, cf = fast(x)
    yref, _, _ = slow(x)
    assert torch.equal(cs, cf)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(yf, yref) < 3e-2 and rel(ys, yref) < 3e-2 and rel(yf, ys) < 3e-2


@pytest.mark.parametrize("gated", [False, True])
def test_fused_expert_forward_gradcheck(gated):
    torch.manual_seed(1)
    layer = _layer(E=8, G=2, r=2, k=2, g1=2, d=6, f=10, act="silu" if gated else "gelu", gated=gated)
    ex = layer.experts
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    r = layer.route(x.detach())
    w = r.weights.detach().clone().requires_grad_()

    # x and w: <v, J u> by autograd against a central difference along random directions u, a
    # fresh graph each time (the fused backward frees its activations, so torch's gradcheck, which
    # runs a backward twice, does not apply); parameter entries by central differences below
    def f(x, w):
        return fused.fused_expert_forward(ex, x, r.group_idx, r.slot_idx, w)
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        ux, uw = torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.randn(w.shape, generator=gen, dtype=w.dtype)
        v = torch.randn(9, 6, generator=gen, dtype=x.dtype)
        gx, gw = torch.autograd.grad(f(x, w), (x, w), v)
        analytic = float((gx * ux).sum() + (gw * uw).sum())
        with torch.no_grad():
            h = 1e-6
            numeric = float(((f(x + h * ux, w + h * uw) - f(x - h * ux, w - h * uw)) * v).sum() / (2 * h))
        assert abs(analytic - numeric) < 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        y = f(x, w)
        torch.autograd.grad(y.sum(), x, retain_graph=True)
        torch.autograd.grad(y.sum(), x)
    y = fused.fused_expert_forward(ex, x, r.group_idx, r.slot_idx, w)
    g = torch.randn_like(y)
    params = [(ex.fa["w2"], (3, 4, 1))]
    if gated:   # the up projection's stream: base, factors, bias
        params += [(ex.base["w3"], (1, 2, 7)), (ex.fa["w3"], (5, 3, 0)), (ex.fb["w3"], (6, 8, 1)), (ex.bias["b3"], (2, 9))]
    analytic = torch.autograd.grad(y, [p for p, _ in params], g)
    eps = 1e-6
    for (p, idx), a in zip(params, analytic):
        with torch.no_grad():
            p[idx] += eps
            up = (fused.fused_expert_forward(ex, x, r.group_idx, r.slot_idx, w) * g).sum()
            p[idx] -= 2 * eps
            down = (fused.fused_expert_forward(ex, x, r.group_idx, r.slot_idx, w) * g).sum()
            p[idx] += eps
        assert abs(float((up - down) / (2 * eps)) - float(a[idx])) < 1e-7


@pytest.mark.parametrize("gated,bits", [(False, 16), (True, 16), (False, 4)])
def test_fused_layer_dispatches_no_host_sync(gated, bits):
    """The fused training step must not wait for the device (no .item(), .tolist(), nonzero,
    bincount): counted with benchmarks/op_profile.py's dispatch counter, the kernels charged as
    their Triton launches. The operation count is guarded too (120 at the time of writing, bf16
    autocast); a rise past the bound is worth a look."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import op_profile
    layer = _layer(E=16, G=4, r=4, k=2, act="silu" if gated else "gelu", gated=gated, bits=bits, dtype=torch.float32)
    layer.fused = True
    x = torch.randn(64, 24, requires_grad=True)
    op_profile._once(layer, x, torch.bfloat16)
    counter = op_profile.OpProfiler()
    saved = fused.ops_for
    fused.ops_for = lambda *a, **k: op_profile._CountedKernels(counter)
    try:
        with counter:
            op_profile._once(layer, x, torch.bfloat16)
    finally:
        fused.ops_for = saved
    assert not counter.syncs, dict(counter.syncs)
    assert sum(counter.ops.values()) <= 140, counter.ops.most_common(10)


def test_sort_by_group_and_gathers():
    gen = torch.Generator().manual_seed(2)
    G, T, g1 = 5, 40, 2
    group_idx = torch.stack([torch.randperm(G, generator=gen)[:g1] for _ in range(T)])
    group_idx[:, 0] = group_idx[:, 0].clamp(max=3)    # group 4 nearly empty, maybe empty
    order, inverse, off, token_of_row = fused.sort_by_group(group_idx, G)
    flat = group_idx.reshape(-1)
    assert torch.equal(off.long(), torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(flat, minlength=G).cumsum(0)]))
    assert torch.equal(flat[order], torch.sort(flat, stable=True).values)
    assert torch.equal(inverse[order], torch.arange(T * g1))
    x = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: fused.GatherRows.apply(x, token_of_row, inverse, g1), (x,))
    rows = torch.randn(T * g1, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda y: fused.SumGatherRows.apply(y, inverse, token_of_row, g1), (rows,))
    ref = rows.detach()[inverse].view(T, g1, 3).sum(1)
    torch.testing.assert_close(fused.SumGatherRows.apply(rows, inverse, token_of_row, g1), ref)


def test_gmm_rows_weight_parts_and_output_range_match_one_product():
    """The grouped GEMM's weight in parts stacked along K, and its output written into a column
    range: the same as the plain product with the concatenated weight (float64, fresh inputs)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    G, P, n = 3, 37, 11
    off = torch.tensor([0, 15, 15, P], dtype=torch.int32)
    for trans_w in (False, True):
        parts = [torch.randn(G, n, kd, generator=gen, dtype=torch.float64) if trans_w else
                 torch.randn(G, kd, n, generator=gen, dtype=torch.float64) for kd in (5, 8, 3)]
        x = torch.randn(P, 16, generator=gen, dtype=torch.float64)
        perm = torch.randperm(P, generator=gen)
        whole = torch.cat(parts, dim=2 if trans_w else 1)
        expect = torch.empty(P, n, dtype=torch.float64)
        for g, (s, e) in enumerate(zip(off.tolist()[:-1], off.tolist()[1:])):
            expect[s:e] = x[perm[s:e]] @ (whole[g].t() if trans_w else whole[g])
        wide = torch.randn(P, n + 4, generator=gen, dtype=torch.float64)
        left = wide[:, :4].clone()
        got = reference.gmm_rows(x, tuple(parts), off, trans_w=trans_w, x_rows=perm, out=wide[:, 4:])
        assert got.data_ptr() == wide[:, 4:].data_ptr() and torch.equal(wide[:, :4], left)
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
        scattered = reference.gmm_rows(x, tuple(parts), off, trans_w=trans_w, x_rows=perm, y_rows=perm)
        torch.testing.assert_close(scattered[perm], expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not stack along K to the 16 columns"):
        reference.gmm_rows(x, (parts[0], parts[1]), off, trans_w=True)
    with pytest.raises(ValueError, match=r"out is \(37, 3\)"):
        reference.gmm_rows(x, tuple(parts), off, trans_w=True, out=wide[:, :3])


def test_fused_forward_keeps_bf16_base_weights_in_place():
    """bf16 parameters (DeepSpeed's bf16 engine): the base GEMMs read W1/W2 where they lie; the
    backward keeps the parameters themselves, not weight-sized copies."""
    layer = _layer(dtype=torch.bfloat16)
    layer.fused = True
    x = torch.randn(64, 24, dtype=torch.bfloat16, requires_grad=True)
    y, _, _ = layer(x)
    node = y.grad_fn
    while node is not None and "FusedExperts" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None, "the fused expert stage is not in the graph"
    saved = {t.data_ptr() for t in node.saved_tensors if t is not None}
    for name in ("w1", "w2"):
        assert layer.experts.base[name].data_ptr() in saved, name
    weight_sized = [t.shape for t in node.saved_tensors if t is not None and t.numel() >= layer.experts.base["w1"].numel()
                    and t.data_ptr() not in {p.data_ptr() for p in layer.parameters()}]
    assert not weight_sized, weight_sized


def test_fused_and_slot_paths_train_the_same_through_regroups():
    cfg = TrilemmaMoEConfig(num_experts=16, num_groups=4, rank=4, burn_in=2, recluster_interval=2, delta=0.0,
                            dynamic_regroup=True)   # through regroups: the library's default clusters once
    slow = ClusteredMoE(16, 32, cfg).double()
    fast = copy.deepcopy(slow)
    fast.fused = True
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (slow, fast)]
    for m, o in zip((slow, fast), opts):
        m.attach_optimizer(o)
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        x = torch.randn(48, 16, generator=gen, dtype=torch.float64)
        losses = []
        for m, o in zip((slow, fast), opts):
            o.zero_grad(set_to_none=True)
            y, l_aux, _ = m(x)
            loss = y.pow(2).mean() + l_aux
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-10 * max(1.0, abs(losses[0])), (step, losses)
    assert fast.stats()["reclusters"] >= 3
    assert torch.equal(fast.group_assignment(), slow.group_assignment())


def test_capacity_factor_keeps_the_slot_path():
    layer = _layer()
    layer.fused = True
    assert layer._use_fused(torch.zeros(1, 24))
    layer.config.capacity_factor = 1.0    # token dropping is done by dispatch(), which the fused path skips
    assert not layer._use_fused(torch.zeros(1, 24))


def test_gated_experts_take_the_fused_path():
    layer = _layer(E=8, G=2, r=2, d=8, f=16, act="silu", gated=True)
    layer.fused = True
    assert layer._use_fused(torch.zeros(1, 8))


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(_NP >= (2, 4), reason="Triton's interpreter needs numpy < 2.4")
def test_triton_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, CHECKS, "--device", "cpu", "--dtypes", "fp32"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "all kernel checks passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@cuda
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_kernels_on_gpu():
    proc = subprocess.run([sys.executable, CHECKS, "--device", "cuda", "--dtypes", "fp32,bf16", "--quick"],
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0 and "all kernel checks passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@cuda
@pytest.mark.parametrize("bias,gated", [(True, False), (False, False), (True, True)])
def test_fused_layer_on_gpu_matches_slot_path(bias, gated):
    """Same device, dtype and routing: the Triton path against the per-slot path (float32), and
    the bf16 fused path against the float32 one."""
    torch.manual_seed(4)
    slow = _layer(E=32, G=8, r=16, k=2, d=64, f=256, bias=bias, dtype=torch.float32, gated=gated,
                  act="silu" if gated else "gelu").cuda()
    slow.fused = False
    fast = copy.deepcopy(slow)
    fast.fused = None
    assert fast._use_fused(torch.zeros(1, device="cuda")) == fused.triton_available()
    x = torch.randn(1000, 64, device="cuda")
    ys, _, cs, gxs, gps = _run(slow, x)
    yf, _, cf, gxf, gpf = _run(fast, x)
    rel = lambda a, b: float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())  # noqa: E731
    assert torch.equal(cf, cs)
    assert rel(yf, ys) < 1e-4 and rel(gxf, gxs) < 1e-4
    for n in gps:
        assert rel(gpf[n], gps[n]) < 1e-4, n
    with torch.autocast("cuda", dtype=torch.bfloat16):   # bf16 fused vs bf16 per-slot: same routing
        yb, _, _ = fast(x)
        yb_slow, _, _ = slow(x)
    assert rel(yb, ys) < 3e-2 and rel(yb, yb_slow) < 2e-2
