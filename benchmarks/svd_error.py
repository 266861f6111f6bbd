"""Exact vs randomized truncated SVD in ``decompose_groups``: error and time per group.

For each shape, G groups of K experts, both of an expert's matrices ((d, d_ff) and (d_ff, d), as
a regroup re-decomposes them) in float32, with two kinds of residuals: ``independent``
(independently initialised experts: a flat residual spectrum, the hard case for a randomized
range finder) and ``decaying`` (residuals U_i diag(s) V_i^T with s_j = (1 + j)^-1, random
orthonormal U_i, V_i: the shape of a trained residual's spectrum). Prints the mean relative
truncation error ||W_i - W~_i||_F / ||W_i||_F over experts of each method, their ratio, and
wall time per group (median of ``--repeats``, one group of K experts, both matrices).

    OMP_NUM_THREADS=1 python benchmarks/svd_error.py --json svd_error.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trilemma_moe.core.compression import POWER_ITERS, decompose_groups, oversampling

SHAPES = [(128, 512, 8), (256, 1024, 16), (768, 3072, 16)]   # (d, d_ff, r) the project uses


def experts(kind: str, G: int, K: int, d_in: int, d_out: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "independent":
        return torch.randn(G, K, d_in, d_out, generator=gen) / d_in ** 0.5
    n = min(d_in, d_out)
    u = torch.linalg.qr(torch.randn(G, K, d_in, n, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(G, K, d_out, n, generator=gen)).Q
    s = (1.0 + torch.arange(n, dtype=torch.float32)) ** -1.0
    base = torch.randn(G, 1, d_in, d_out, generator=gen) / d_in ** 0.5
    return base + (u * s) @ v.transpose(-1, -2)


def measure(ws, rank: int, svd: str, repeats: int):
    """Mean rel_error over all experts of all matrices; median seconds per group (all matrices)."""
    errs = torch.cat([decompose_groups(w, rank, None, svd=svd).rel_error.flatten() for w in ws])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in ws:
            decompose_groups(w[:1], rank, None, svd=svd)
        times.append(time.perf_counter() - t0)
    return float(errs.mean()), statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=2, help="G groups whose errors are averaged")
    p.add_argument("--experts-per-group", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", default=",".join(f"{d}x{f}r{r}" for d, f, r in SHAPES),
                   help="comma-separated DxFrR, e.g. 128x512r8")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for spec in args.shapes.split(","):
        dims, r = spec.split("r")
        d, f = map(int, dims.split("x"))
        r = int(r)
        for kind in ("independent", "decaying"):
            gen = torch.Generator().manual_seed(0)
            ws = [experts(kind, args.groups, args.experts_per_group, d, f, gen),
                  experts(kind, args.groups, args.experts_per_group, f, d, gen)]
            e_ex, t_ex = measure(ws, r, "exact", args.repeats)
            e_rn, t_rn = measure(ws, r, "randomized", args.repeats)
            rows.append({"d": d, "d_ff": f, "rank": r, "residuals": kind, "exact_rel_error": e_ex,
                         "randomized_rel_error": e_rn, "error_ratio": e_rn / e_ex, "exact_ms_per_group": 1e3 * t_ex,
                         "randomized_ms_per_group": 1e3 * t_rn, "speedup": t_ex / t_rn})
    print(f"K={args.experts_per_group}, {args.groups} groups x 2 matrices per shape, float32, 1 thread; "
          f"randomized: p = max(8, r), q = {POWER_ITERS} (p = {oversampling(8)} at r=8, {oversampling(16)} at r=16)")
    print(f"{'d':>4} {'d_ff':>5} {'r':>3} {'residuals':>11} {'exact err':>10} {'rand err':>10} {'ratio':>7} "
          f"{'exact ms':>9} {'rand ms':>8} {'speed-up':>8}")
    for x in rows:
        print(f"{x['d']:>4} {x['d_ff']:>5} {x['rank']:>3} {x['residuals']:>11} {x['exact_rel_error']:>10.5f} "
              f"{x['randomized_rel_error']:>10.5f} {x['error_ratio']:>7.4f} {x['exact_ms_per_group']:>9.1f} "
              f"{x['randomized_ms_per_group']:>8.1f} {x['speedup']:>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
