"""One FFN layer forward+backward: ours vs dropless Switch top-2 vs a dense FFN of the same d_ff.

Same inputs for every layer; warm-up, then the median of ``--repeats`` timed runs. Ours is
measured in its compressed phase (after the first clustering), which is where it spends training.
Plain torch ops on either device (the fused GPU path is future work).

    python benchmarks/layer_bench.py --out docs/BENCHMARKS.md                  # CPU, small dims
    python benchmarks/layer_bench.py --device cuda --dtype bf16 --configs paper  # GPU, paper dims
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

CONFIGS = {  # (tokens, d_model, d_ff, E, G, r)
    "small": [(2048, 128, 512, 32, 8, 16), (2048, 256, 1024, 32, 8, 16), (2048, 512, 2048, 32, 8, 16)],
    "paper": [(16384, 768, 3072, 32, 8, 16), (16384, 768, 3072, 128, 16, 16), (16384, 2048, 8192, 32, 8, 16)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_fwd_bwd(layer, x, repeats: int, dtype, warmup: int = 3) -> float:
    cuda = x.is_cuda

    def once():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x)
        y, l_aux = out[0], out[1]
        (y.float().pow(2).mean() + l_aux).backward()
    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_params(layer) -> int:
    if isinstance(layer, DenseFFN):
        return sum(p.numel() for p in layer.parameters())
    return layer.expert_parameter_count()


def run(repeats: int, threads: int, device: str, dtype, configs):
    torch.set_num_threads(threads)
    rows = []
    for tokens, d, f, E, G, r in configs:
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
        cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=r, top_k=2, burn_in=10 ** 9)
        ours = ClusteredMoE(d, f, cfg).to(device)
        ours.recluster(force=True)          # compressed phase
        ours.config.burn_in = 10 ** 9        # no regroup inside the timed loop
        ours.config.dynamic_regroup = False
        switch = SwitchTop2FFN(d, f, E, k=2)
        dense = DenseFFN(d, f)
        layers = {"dense": dense.to(device), "switch": switch.to(device), "ours": ours.to(device)}
        t = {name: time_fwd_bwd(m, x, repeats, dtype) for name, m in layers.items()}
        p = {"dense": expert_params(dense), "switch": expert_params(switch), "ours": expert_params(ours)}
        rows.append((tokens, d, f, E, G, r, t, p))
        print(f"T={tokens} d={d} d_ff={f} E={E} G={G} r={r}: dense {t['dense']*1e3:.1f} ms, "
              f"switch {t['switch']*1e3:.1f} ms, ours {t['ours']*1e3:.1f} ms "
              f"(ours/switch {t['ours']/t['switch']:.2f}x time, {p['ours']/p['switch']:.2f}x expert params)",
              flush=True)
    return rows


def markdown(rows, repeats: int, threads: int, command: str, device: str, dtype_name: str) -> str:
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"
    lines = [
        f"## Layer benchmark on {device} ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {machine}; {dtype_name}, forward+backward, median of {repeats}; plain torch ops.",
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--configs", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    rows = run(args.repeats, args.threads, args.device, DTYPES[args.dtype], CONFIGS[args.configs])
    text = markdown(rows, args.repeats, args.threads, "python " + " ".join(sys.argv), args.device, args.dtype)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
