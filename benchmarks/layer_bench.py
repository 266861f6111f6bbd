"""One FFN layer forward+backward, same inputs for every layer: ours vs the MoE baselines.

Layers: a dense FFN of the same d_ff; dropless Switch top-2 on torch._grouped_mm ("switch",
sort-based dispatch) and as a per-expert GEMM loop ("switch_loop"); DeepSpeed-MoE (k=2,
capacity factor 1.0, when deepspeed imports); ours in its compressed phase (after the first
clustering, where it spends training): "ours" picks the fused path on CUDA (Triton kernels),
"ours_torch" forces the per-slot torch path; "ours_int4" is "ours" with INT4 residuals (the
forward dequantizes them in torch ahead of the kernels). Warm-up, then the median of ``--repeats`` timed runs
(CUDA events on a GPU), peak memory of one forward+backward, tokens/s.

    python benchmarks/layer_bench.py --out docs/BENCHMARKS.md                            # CPU, small dims
    python benchmarks/layer_bench.py --device cuda --dtype bf16 --configs paper --repeats 20
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
    "paper1": [(16384, 768, 3072, 32, 8, 16)],
    "paper": [(16384, 768, 3072, 32, 8, 16), (16384, 768, 3072, 128, 16, 16), (16384, 2048, 8192, 32, 8, 16)],
}
# name -> (parameter dtype, autocast dtype or None). "bf16" is autocast over float32 weights (every
# layer casts its weights each step); "bf16-weights" is how DeepSpeed's bf16 mode runs a module:
# parameters and activations in bf16, float32 masters in the optimizer (not timed here).
DTYPES = {"fp32": (torch.float32, None), "bf16": (torch.float32, torch.bfloat16),
          "bf16-weights": (torch.bfloat16, None)}


def _once(layer, x, dtype):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = layer(x)
    y, l_aux = out[0], out[1]
    (y.float().pow(2).mean() + l_aux).backward()


def time_fwd_bwd(layer, x, repeats: int, dtype, warmup: int = 5) -> float:
    for _ in range(warmup):
        _once(layer, x, dtype)
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            _once(layer, x, dtype)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            _once(layer, x, dtype)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(layer, x, dtype) -> float:
    """Peak memory of one forward+backward above what was allocated before it (CUDA only)."""
    if not x.is_cuda:
        return float("nan")
    _once(layer, x, dtype)            # gradients exist, as in training
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _once(layer, x, dtype)
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def expert_params(layer) -> int:
    if isinstance(layer, DenseFFN):
        return sum(p.numel() for p in layer.parameters())
    return layer.expert_parameter_count()


def build_layers(names, d, f, E, G, r, device, switch_impl=None):
    layers = {}
    for name in names:
        if name == "dense":
            layers[name] = DenseFFN(d, f)
        elif name in ("switch", "switch_loop"):
            impl = "loop" if name == "switch_loop" or device == "cpu" else "grouped"
            impl = switch_impl if name == "switch" and switch_impl else impl
            layers[name] = SwitchTop2FFN(d, f, E, k=2, impl=impl)
        elif name == "deepspeed":
            try:
                from trilemma_moe.models.ffn import DeepSpeedMoEFFN
                layers[name] = DeepSpeedMoEFFN(d, f, E, k=2, drop_tokens=True, capacity_factor=1.0)
            except ImportError as exc:
                print(f"skipping deepspeed: {exc}", flush=True)
                continue
        elif name in ("ours", "ours_torch", "ours_int4"):
            cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=r, top_k=2, burn_in=10 ** 9,
                                    residual_bits=4 if name == "ours_int4" else 16)
            layer = ClusteredMoE(d, f, cfg)
            layer.recluster(force=True)          # compressed phase
            layer.config.dynamic_regroup = False  # no regroup inside the timed loop
            layer.fused = False if name == "ours_torch" else None
            layers[name] = layer
        else:
            raise ValueError(f"unknown layer {name!r}")
        layers[name].to(device)
    return layers


def run(repeats: int, threads: int, device: str, dtypes, configs, names):
    torch.set_num_threads(threads)
    param_dtype, dtype = dtypes
    rows = []
    for tokens, d, f, E, G, r in configs:
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0)).to(device, param_dtype).requires_grad_()
        layers = build_layers(names, d, f, E, G, r, device)
        for m in layers.values():
            m.to(param_dtype)
        res = {}
        for name, m in layers.items():
            t = time_fwd_bwd(m, x, repeats, dtype)
            res[name] = {"ms": t * 1e3, "tokens_per_s": tokens / t, "peak_mb": peak_bytes(m, x, dtype) / 2 ** 20,
                         "expert_params": expert_params(m)}
            print(f"T={tokens} d={d} d_ff={f} E={E} G={G} r={r} {name:>11}: {t * 1e3:8.2f} ms  "
                  f"peak {res[name]['peak_mb']:9.1f} MiB  {tokens / t:12,.0f} tok/s", flush=True)
            del m
        layers.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(((tokens, d, f, E, G, r), res))
    return rows


def markdown(rows, repeats: int, threads: int, command: str, device: str, dtype_name: str) -> str:
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        try:
            import triton
            machine += f", triton {triton.__version__}"
        except ImportError:
            pass
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"
    lines = [
        f"## Layer benchmark on {device} ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {machine}; {dtype_name}, one FFN layer forward+backward, median of {repeats}.",
        f"Command: `{command}`",
        "",
        "| tokens | d | d_ff | E | G | r | layer | ms | tokens/s | peak MiB | expert params | time / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (tokens, d, f, E, G, r), res in rows:
        ours = res.get("ours", {}).get("ms")
        for name, v in res.items():
            ratio = f"{v['ms'] / ours:.2f}" if ours else "-"
            lines.append(f"| {tokens} | {d} | {f} | {E} | {G} | {r} | {name} | {v['ms']:.2f} | "
                         f"{v['tokens_per_s']:,.0f} | {v['peak_mb']:.0f} | {v['expert_params']:,} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="fp32; bf16 (autocast over float32 weights); bf16-weights (bf16 parameters, DeepSpeed's bf16 mode)")
    ap.add_argument("--configs", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--layers", default="dense,switch,switch_loop,deepspeed,ours_torch,ours",
                    help="comma-separated: dense, switch, switch_loop, deepspeed, ours_torch, ours, ours_int4")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    rows = run(args.repeats, args.threads, args.device, DTYPES[args.dtype], CONFIGS[args.configs],
               args.layers.split(","))
    text = markdown(rows, args.repeats, args.threads, "python " + " ".join(sys.argv), args.device, args.dtype)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
