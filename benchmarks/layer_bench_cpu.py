"""CPU benchmark: one FFN layer forward+backward, ours vs dropless Switch top-2 vs a dense FFN.

Same inputs for every layer; warm-up, then the median of ``--repeats`` timed runs. Ours is
measured in its compressed phase (after the first clustering), which is where it spends training.

    python benchmarks/layer_bench_cpu.py --out docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE
from trilemma_moe.models.ffn import DenseFFN, SwitchTop2FFN

CONFIGS = [  # (tokens, d_model, d_ff, E, G, r)
    (2048, 128, 512, 32, 8, 16),
    (2048, 256, 1024, 32, 8, 16),
    (2048, 512, 2048, 32, 8, 16),
]


def time_fwd_bwd(layer, x, repeats: int, warmup: int = 2) -> float:
    def once():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        y, l_aux = out[0], out[1]
        (y.float().pow(2).mean() + l_aux).backward()
    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_params(layer) -> int:
    if isinstance(layer, DenseFFN):
        return sum(p.numel() for p in layer.parameters())
    return layer.expert_parameter_count()


def run(repeats: int, threads: int):
    torch.set_num_threads(threads)
    rows = []
    for tokens, d, f, E, G, r in CONFIGS:
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0), requires_grad=True)
        cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=r, top_k=2, burn_in=10 ** 9)
        ours = ClusteredMoE(d, f, cfg)
        ours.recluster(force=True)          # compressed phase
        ours.config.burn_in = 10 ** 9        # no regroup inside the timed loop
        ours.config.dynamic_regroup = False
        switch = SwitchTop2FFN(d, f, E, k=2)
        dense = DenseFFN(d, f)
        t = {name: time_fwd_bwd(m, x, repeats) for name, m in
             (("dense", dense), ("switch", switch), ("ours", ours))}
        p = {"dense": expert_params(dense), "switch": expert_params(switch), "ours": expert_params(ours)}
        rows.append((tokens, d, f, E, G, r, t, p))
        print(f"T={tokens} d={d} d_ff={f} E={E} G={G} r={r}: dense {t['dense']*1e3:.1f} ms, "
              f"switch {t['switch']*1e3:.1f} ms, ours {t['ours']*1e3:.1f} ms "
              f"(ours/switch {t['ours']/t['switch']:.2f}x time, {p['ours']/p['switch']:.2f}x expert params)",
              flush=True)
    return rows


def markdown(rows, repeats: int, threads: int, command: str) -> str:
    lines = [
        f"## CPU layer benchmark ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {threads} thread(s), float32, forward+backward, median of {repeats}.",
        f"Command: `{command}`",
        "",
        "| tokens | d | d_ff | E | G | r | dense ms | switch top-2 ms | ours ms | ours / switch time "
        "| switch expert params | ours expert params | ours / switch params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens, d, f, E, G, r, t, p in rows:
        lines.append(f"| {tokens} | {d} | {f} | {E} | {G} | {r} | {t['dense']*1e3:.1f} | {t['switch']*1e3:.1f} | "
                     f"{t['ours']*1e3:.1f} | {t['ours']/t['switch']:.2f} | {p['switch']:,} | {p['ours']:,} | "
                     f"{p['ours']/p['switch']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    rows = run(args.repeats, args.threads)
    text = markdown(rows, args.repeats, args.threads, "python " + " ".join(sys.argv))
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
