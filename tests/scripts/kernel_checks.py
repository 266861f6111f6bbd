"""Each Triton kernel against its torch twin on fresh random inputs.

Runs on a GPU (``--device cuda``) or, with ``TRITON_INTERPRET=1``, on the CPU through Triton's
interpreter (float32 only there). Exits non-zero on the first mismatch; prints one line per check.
"""
import argparse
import os
import sys

# this checkout's package, not whichever one the environment has installed (editable installs)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from trilemma_moe.core import quant  # noqa: E402
from trilemma_moe.kernels import reference as ref  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_offsets(P, G, gen, empty_group=True):
    cuts = torch.sort(torch.randint(0, P + 1, (G - 1,), generator=gen)).values
    if empty_group and G > 2:
        cuts[G // 2] = cuts[G // 2 - 1]   # one empty group
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([P])]).to(torch.int32)


def layer_check(dev, gen, bias, gated=False, act="gelu", bits=16, g1=1):
    """ClusteredMoE forward+backward on the fused path (Triton kernels) vs the per-slot path."""
    import copy
    from trilemma_moe import TrilemmaMoEConfig
    from trilemma_moe.core.layer import ClusteredMoE
    cfg = TrilemmaMoEConfig(num_experts=12, num_groups=3, rank=4, top_k=2, gamma=None, seed=int(gen.initial_seed()) % 1000,
                            residual_bits=bits, group_top_k=g1)
    slow = ClusteredMoE(32, 80, cfg, activation=act, bias=bias, gated=gated)
    slow.recluster(force=True)
    with torch.no_grad():
        for p in slow.experts.parameters():
            if p.numel():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    slow = slow.to(dev)
    fast = copy.deepcopy(slow)
    slow.fused, fast.fused = False, True
    x = torch.randn(150, 32, generator=gen).to(dev)
    outs = []
    for layer, kernels in ((slow, "reference"), (fast, "triton")):
        os.environ["TRILEMMA_KERNELS"] = kernels
        xx = x.clone().requires_grad_()
        y, l_aux, _ = layer(xx)
        (y.pow(2).sum() + l_aux).backward()
        outs.append((y.detach(), xx.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    # serving from the stored form (release_masters; INT4: decoded by dequant_int4) computes what
    # the masters computed, on the same kernels
    fast.eval()
    with torch.no_grad():
        y_eval = fast(x)[0]
        fast.release_masters()
        y_served = fast(x)[0]
    os.environ.pop("TRILEMMA_KERNELS")
    (ys, gxs, gps), (yf, gxf, gpf) = outs
    errs = {"y": rel(yf, ys), "dx": rel(gxf, gxs), "served": rel(y_served, y_eval)}
    errs.update({f"d{n.split('.', 1)[-1]}": rel(gpf[n], gps[n]) for n in gps})
    return errs


def empty_batch_check(dev, gated=False, bits=16):
    """A training forward+backward of zero tokens on the kernels: the same parameters get
    gradients, in the same order, as with tokens (all zero), so data-parallel reducers see the
    same set on a rank with an empty batch. Returns whether it holds."""
    from trilemma_moe import TrilemmaMoEConfig
    from trilemma_moe.core.layer import ClusteredMoE
    os.environ["TRILEMMA_KERNELS"] = "triton"
    layer = ClusteredMoE(32, 80, TrilemmaMoEConfig(num_experts=12, num_groups=3, rank=4, top_k=2, residual_bits=bits,
                                                   router_freeze_steps=0), gated=gated).to(dev)
    layer.recluster(force=True)
    layer.fused = True
    orders = []
    for T in (40, 0):
        order = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n))
                 for n, p in layer.named_parameters() if p.requires_grad]
        x = torch.randn(T, 32, device=dev, requires_grad=True)
        y, l_aux, _ = layer(x)
        (y.square().sum() + l_aux).backward()
        for h in hooks:
            h.remove()
        orders.append(order)
        zero = all(float(p.grad.abs().max()) == 0.0 for n, p in layer.named_parameters() if n in order)
        layer.zero_grad(set_to_none=True)
    os.environ.pop("TRILEMMA_KERNELS")
    return orders[0] == orders[1] and zero and y.shape == (0, 32)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="three kernel variants and one GEMM shape (each variant compiles on a GPU)")
    args = ap.parse_args(argv)
    from trilemma_moe.kernels import triton_moe as tk
    dev = torch.device(args.device)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2 ** 31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    print(f"seed {seed}", flush=True)
    tol = {"fp32": 2e-5, "bf16": 2e-2}
    failures = 0

    def report(name, err, dt):
        nonlocal failures
        ok = err < tol[dt] and err == err
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:<28} {dt} rel err {err:.2e}", flush=True)

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen).to(dev, dt)

    for dname in args.dtypes.split(","):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        # sizes that leave partial tiles and an empty group
        for P, G, d, f in ((333, 5, 64, 96),) if args.quick else ((150, 4, 48, 80), (333, 5, 64, 96)):
            off = random_offsets(P, G, gen).to(dev)
            x, w = rnd(P, d, dt=dt), rnd(G, d, f, dt=dt)
            report(f"gmm_rows P={P} G={G}", rel(tk.gmm_rows(x, w, off), ref.gmm_rows(x.float(), w.float(), off)), dname)
            wt = rnd(G, f, d, dt=dt).transpose(1, 2)     # strided weights, as the backward passes them
            report(f"gmm_rows strided w P={P}", rel(tk.gmm_rows(x, wt, off), ref.gmm_rows(x.float(), wt.float(), off)), dname)
            dyf = rnd(P, f, dt=dt)
            report(f"gmm_rows trans_w P={P}", rel(tk.gmm_rows(dyf, w, off, trans_w=True), ref.gmm_rows(dyf.float(), w.float(), off, trans_w=True)), dname)
            report(f"gmm_wgrad P={P}", rel(tk.gmm_wgrad(x, dyf, off), ref.gmm_wgrad(x.float(), dyf.float(), off)), dname)
            # stored straight in a bf16 parameter's dtype (float32 accumulation)
            report(f"gmm_wgrad into bf16 P={P}", rel(tk.gmm_wgrad(x, dyf, off, dtype=torch.bfloat16),
                                                     ref.gmm_wgrad(x.float(), dyf.float(), off)), "bf16")
            # rows read through a gather and written through a scatter (a permutation), as the layer runs them
            perm = torch.randperm(P, generator=gen).to(dev)
            report(f"gmm_rows gather/scatter P={P}", rel(tk.gmm_rows(x, w, off, x_rows=perm, y_rows=perm),
                                                          ref.gmm_rows(x.float(), w.float(), off, x_rows=perm, y_rows=perm)), dname)
            # the weight in parts stacked along K, each read where it lies (dx = dU @ [W1 | W3 | X1]^T)
            parts = (rnd(G, f, 24, dt=dt), rnd(G, f, 8, dt=dt), rnd(G, f, d - 32, dt=dt))
            report(f"gmm_rows 3 K parts trans_w P={P}",
                   rel(tk.gmm_rows(x, parts, off, trans_w=True, y_rows=perm),
                       ref.gmm_rows(x.float(), tuple(p.float() for p in parts), off, trans_w=True, y_rows=perm)), dname)
            # a column range of a wider buffer as the output (U's blocks); the other columns untouched
            wide = rnd(P, f + 40, dt=dt)
            keep = wide.clone()
            tk.gmm_rows(x, w, off, x_rows=perm, out=wide[:, 20:20 + f])
            untouched = torch.equal(wide[:, :20], keep[:, :20]) and torch.equal(wide[:, 20 + f:], keep[:, 20 + f:])
            report(f"gmm_rows into a column range P={P}", rel(wide[:, 20:20 + f], ref.gmm_rows(x.float(), w.float(), off, x_rows=perm))
                   if untouched else float("inf"), dname)

        # (act, (P, G, K, r, k, f, bias), gated). A covering set, not the activations x shapes product:
        # each activation and each shape at least once, each tile bucket (K*r <= 64 or <= 128, plain
        # or gated), with and without bias, k = 1 and 2, K*r a power of two and not. The activation
        # is one constexpr branch applied elementwise, so its pairing with a shape adds no kernel path.
        shapes = ((130, 4, 4, 4, 2, 72, True),     # K*r = 16, k = 2, bias
                  (97, 3, 3, 5, 1, 40, False),     # K*r = 15: not a power of two; k = 1, no bias
                  (200, 2, 8, 16, 2, 64, True))    # K*r = 128: the larger tile bucket
        acts = ("gelu", "gelu_tanh", "relu", "silu", "identity")
        variants = [(act, shapes[i % len(shapes)], False) for i, act in enumerate(acts)]
        variants += [("silu", shapes[0], True), ("gelu", shapes[1], True), ("silu", (120, 2, 8, 16, 2, 40, True), True)]
        if args.quick:
            variants = [("gelu", (700, 8, 4, 16, 2, 200, True), False), ("relu", (97, 3, 3, 5, 1, 40, False), False),
                        ("silu", (300, 3, 4, 4, 2, 80, True), True)]   # the gated layer check's constexprs
        for act, (P, G, K, r, k, f, bias), gated in variants:
            off = random_offsets(P, G, gen).to(dev)
            KR, E, QW = K * r, G * K, ref.q_width(K, r)
            n = 2 if gated else 1
            # z, a (gated: z, z3, a, a3) as column ranges of one buffer, as the layer passes them
            u = rnd(P, n * (f + KR), dt=dt)
            u[:, n * f:] *= 0.5
            z, a = u[:, :f], u[:, n * f:n * f + KR]
            jloc = torch.stack([torch.randperm(K, generator=gen)[:k] for _ in range(P)]).to(dev)
            w = torch.rand(P, k, generator=gen).to(dev)
            # slot-stacked float32 factors (the parameters); the kernels cast them to z's dtype
            b1, a2 = rnd(E, f, r) * 0.3, rnd(E, f, r) * 0.3
            bias1 = rnd(E, f) if bias else None
            gate, gate_r = {}, {}
            if gated:
                gate = dict(z3=u[:, f:2 * f], a3=u[:, 2 * f + KR:], b3=rnd(E, f, r) * 0.3, bias3=rnd(E, f) if bias else None)
                gate_r = dict(z3=gate["z3"].float(), a3=gate["a3"].float(), b3=gate["b3"].to(dt).float(),
                              bias3=gate["bias3"])
            out = torch.full((P, f + QW), float("nan"), dtype=dt, device=dev)   # every column must be written
            tk.act_combine_fwd(z, a, jloc, w, b1, bias1, a2, off, K, r, act, out, **gate)
            out_r = ref.act_combine_fwd(z.float(), a.float(), jloc, w, b1.to(dt).float(), bias1, a2.to(dt).float(),
                                        off, K, r, act, torch.empty(P, f + QW, dtype=torch.float64, device=dev), **gate_r)
            name = f"{'gated ' if gated else ''}{act} K={K} r={r} k={k}"
            report(f"fwd hs {name}", rel(out[:, :f], out_r[:, :f]), dname)
            report(f"fwd q {name}", rel(out[:, f:], out_r[:, f:]), dname)
            dv = rnd(P, f + QW, dt=dt)
            dzda = torch.full((P, n * (f + KR)), float("nan"), dtype=dt, device=dev)
            got = tk.act_combine_bwd(z, a, jloc, w, b1, bias1, a2, dv[:, :f], dv[:, f:], off, K, r, act, dzda, **gate)
            dzda_r = torch.empty(P, n * (f + KR), dtype=torch.float64, device=dev)
            want = ref.act_combine_bwd(z.float(), a.float(), jloc, w, b1.to(dt).float(), bias1, a2.to(dt).float(),
                                       dv[:, :f].float(), dv[:, f:].float(), off, K, r, act, dzda_r, **gate_r)
            cols = {"dz": slice(0, f), "da": slice(n * f, n * f + KR)}
            if gated:
                cols.update(dz3=slice(f, 2 * f), da3=slice(2 * f + KR, None))
            for label, c in cols.items():
                report(f"bwd {label} {name}", rel(dzda[:, c], dzda_r[:, c]), dname)
            if not gated:   # in place, as the layer runs it: [dz | da] over [dhs | dq]
                dv2 = dv.clone()
                tk.act_combine_bwd(z, a, jloc, w, b1, bias1, a2, dv2[:, :f], dv2[:, f:], off, K, r, act,
                                   dv2[:, :f + KR])
                report(f"bwd in place {name}", rel(dv2[:, :f + KR], dzda_r), dname)
            assert len(got) == len(want) == (6 if gated else 4)
            for label, g_, w_ in zip(("dw", "db1", "dbias1", "da2", "db3", "dbias3"), got, want):
                if w_ is None:
                    assert g_ is None
                    continue
                report(f"bwd {label} {name}", rel(g_, w_), dname)
    for dname in args.dtypes.split(","):
        # the whole layer on the kernels (glue included) against its per-slot path, float32
        if dname == "fp32":
            # each of bias, gated, INT4 and g1 = 2 on and off at least once (the kernels' own
            # variants are swept above; this is the glue around them)
            for bias, gated, act, bits, g1 in ((True, True, "silu", 16, 1), (True, False, "gelu", 4, 1),
                                               (False, False, "relu", 16, 2)):
                errs = layer_check(dev, gen, bias, gated, act, bits, g1)
                for label, err in errs.items():
                    report(f"layer {label} bias={bias}{' gated' if gated else ''}{' int4' if bits == 4 else ''}"
                           f"{' g1=2' if g1 == 2 else ''}", err, "fp32")
            for gated, bits in ((False, 16), (True, 4)):
                ok = empty_batch_check(dev, gated, bits)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} layer empty batch{' gated' if gated else ''}"
                      f"{' int4' if bits == 4 else ''}  fp32 same gradients, same order, all zero", flush=True)
        # INT4 quantize-dequantize: bit for bit (same divisions, same rounding)
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        for E, rows, r in ((6, 37, 5), (4, 130, 16)):
            w = rnd(E, rows, r, dt=dt) * 0.2
            w[1, :, 2] = 0                       # an all-zero column (scale 1, exact)
            w[2, :, 0] = w[2, :, 0].abs()        # a column that never goes below 0
            # exact ties for round-half-to-even: scale 0.25, -lo/s = 7.5, w/s = 0.5, 1.5, -2.5, ...
            ties = torch.tensor([-1.875, 1.875, 0.125, 0.375, -0.625, 0.875, -0.125, 1.125])
            w[3, :, 1] = ties.repeat(rows // 8 + 1)[:rows].to(dt)
            got, want = tk.fake_quant(w), ref.fake_quant(w)
            exact = bool(torch.equal(got, want))
            failures += not exact
            print(f"{'ok  ' if exact else 'FAIL'} fake_quant E={E} rows={rows} r={r}  {dname} "
                  f"{'bit-exact' if exact else f'max |diff| {float((got - want).abs().max()):.3g}'}", flush=True)
            # serving's decode of the packed form (odd row counts leave a half-filled last byte)
            qt = quant.quantize(w)
            got, want = tk.dequant_int4(qt, rows, dt), ref.dequant_int4(qt, rows, dt)
            exact = bool(torch.equal(got, want)) and bool(torch.equal(got, ref.fake_quant(w)))
            failures += not exact
            print(f"{'ok  ' if exact else 'FAIL'} dequant_int4 E={E} rows={rows} r={r}  {dname} "
                  f"{'bit-exact' if exact else f'max |diff| {float((got - want).abs().max()):.3g}'}", flush=True)
    print("all kernel checks passed" if not failures else f"{failures} kernel checks FAILED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
