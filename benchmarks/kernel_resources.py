"""Registers, spills and shared memory of every Triton kernel of the fused path, as compiled for a
GPU architecture, without a GPU: Triton compiles ahead of time for the target and the ptxas it
ships reports the resources (``cuobjdump --dump-resource-usage``).

A kernel that needs more than 255 registers per thread spills to local memory ("STACK" bytes per
thread), which costs memory traffic in its inner loop; the combine kernels' tiles
(``triton_moe.combine_tiles``) are chosen so that none spills (or a few bytes). Shared memory
shows whether the GEMMs' loads are software-pipelined (num_stages buffers of the A and B tiles). Kernels are compiled exactly as
the layer launches them (tiles, warps, stages from ``triton_moe``), in bf16, for the given
configurations.

    python benchmarks/kernel_resources.py                       # sm_80 (A100) and sm_90 (H100)
    python benchmarks/kernel_resources.py --arch 90 --K 4 8 --gated
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from trilemma_moe.kernels import triton_moe as tk

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
BF16 = ("x_ptr", "w_ptr", "w2_ptr", "w3_ptr", "y_ptr", "dy_ptr", "z_ptr", "a_ptr", "z3_ptr", "a3_ptr", "out_ptr", "dhs_ptr", "dq_ptr",
        "dz_ptr", "da_ptr", "dz3_ptr", "da3_ptr")


def resources(kernel, constexprs: dict, arch: int, num_warps: int, num_stages: int = 2) -> dict:
    """Compile ``kernel`` for sm_<arch>; unit strides are specialised to 1 as Triton's launcher does."""
    ptr_types = {n: "bf16" for n in BF16}
    ptr_types.update(j_ptr="i64", off_ptr="i32", xi_ptr="i64", yi_ptr="i64", di_ptr="i64")
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr_types.get(name, "fp32")
        else:
            sig[name] = "i32"
    # Triton's launcher marks pointers and integers divisible by 16 ("D"), which enables vector
    # loads and the software pipeline; at the paper's sizes every size and stride is, except the
    # row strides of the [P, k] routing tensors
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if sig.get(name, "constexpr") != "constexpr" and name not in ("sjm", "swm", "sdwm")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump's output: {out[-300:]}")
    # shared memory is allocated dynamically by Triton: its own metadata has the size
    return dict(reg=int(m.group(1)), stack=int(m.group(2)), shared=int(compiled.metadata.shared))


def kernels(K: int, r: int, gated: bool, G: int = 8, topk: int = 2):
    """(name, kernel, constexprs, num_warps, num_stages) as the layer launches them in bf16."""
    common = dict(K=K, R=r, TOPK=topk, KRP=max(16, triton.next_power_of_2(K * r)), ACT=0, HAS_BIAS=True,
                  GATED=gated, IEEE=False)
    for name, kernel, extra, kind in (
            ("act_combine_fwd", tk._act_combine_fwd_kernel, dict(G=G, WP=triton.next_power_of_2(16)), "fwd"),
            ("act_combine_bwd rows", tk._act_combine_bwd_rows_kernel, dict(G=G, TP=triton.next_power_of_2(topk)),
             "rows"),
            ("act_combine_bwd cols", tk._act_combine_bwd_cols_kernel, dict(KP=max(16, triton.next_power_of_2(K))),
             "cols")):
        t = tk.combine_tiles(K, r, gated, kind)
        yield name, kernel, dict(common, **extra, BM=t["BM"], BN=t["BN"]), t["num_warps"], 2


def gemm_kernels(G: int = 8, n: int = 3072):
    import torch
    t = tk._tiles(torch.bfloat16, n)
    tiles = dict(BM=t["BM"], BN=t["BN"], BK=t["BK"])
    # as the layer launches them: the unit strides the launcher specialises to 1, and which side
    # reads (X_IDX) or writes (Y_IDX) its rows through the token index
    base = dict(G=G, IEEE=False, **tiles)
    for name, consts in (("gmm_rows x@W1, x@A1cat (x gathered)", dict(sxk=1, swn=1, syn=1, X_IDX=True, Y_IDX=False, PARTS=1)),
                         ("gmm_rows [hs|q]@[W2; X2] (y scattered)",
                          dict(sxk=1, swn=1, sw2n=1, syn=1, X_IDX=False, Y_IDX=True, PARTS=2)),
                         ("gmm_rows dy@W2^T, dy@X2^T", dict(sxk=1, swk=1, syn=1, X_IDX=False, Y_IDX=False, PARTS=1)),
                         ("gmm_rows dU@[W1|X1]^T (dx scattered)",
                          dict(sxk=1, swk=1, sw2k=1, syn=1, X_IDX=False, Y_IDX=True, PARTS=2)),
                         ("gmm_rows dU@[W1|W3|X1]^T (gated dx)",
                          dict(sxk=1, swk=1, sw2k=1, sw3k=1, syn=1, X_IDX=False, Y_IDX=True, PARTS=3))):
        yield name, tk._gmm_rows_kernel, dict(base, **consts), t["num_warps"], t["num_stages"]
    yield "gmm_wgrad", tk._gmm_wgrad_kernel, dict(base, sxm=1, sdn=1, swn=1), t["num_warps"], t["num_stages"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--K", type=int, nargs="+", default=[4, 8], help="experts per group (E/G)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gated", action="store_true", help="also the gated variants")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}; bf16; registers / spill stack bytes per thread / shared bytes")
    print(f"| kernel | K | r | gated | sm | BM x BN, warps | registers | spill stack | shared |\n|{'---|' * 9}")
    spills = 0
    for arch in args.arch:
        rows = [(n, k, c, w, s, "-", "-", "-") for n, k, c, w, s in gemm_kernels()]
        for K in args.K:
            for gated in ((False, True) if args.gated else (False,)):
                rows += [(n, k, c, w, s, K, args.rank, gated) for n, k, c, w, s in kernels(K, args.rank, gated)]
        for name, kernel, consts, warps, stages, K, r, gated in rows:
            res = resources(kernel, consts, arch, warps, stages)
            spills += res["stack"] > 0
            print(f"| {name} | {K} | {r} | {gated} | {arch} | {consts['BM']} x {consts['BN']}, {warps} | {res['reg']} | "
                  f"{res['stack']} | {res['shared']} |", flush=True)
    print(f"{spills} kernel(s) spill")


if __name__ == "__main__":
    main()
