"""What converting one Hugging Face MoE block costs at Mixtral-8x7B's dimensions.

One MixtralForCausalLM layer with d=4096, d_ff=14336, E=8, top-2 and random expert weights
(std 0.02, bf16 as Mixtral ships) is converted by ``convert_moe_blocks`` at the defaults (G=2
groups of 4, r=16), once per SVD method, each in a fresh process: seconds of the conversion (the
grouping, one decomposition per group and matrix, the error report), the process's peak RSS
(``ru_maxrss``) before and after it, the mean relative reconstruction error, and the expert
parameters before and after. Random experts have flat residual spectra, the worst case for a
rank-16 truncation, so the error here is an upper end, not what a trained model shows.

    OMP_NUM_THREADS=2 python benchmarks/hf_convert_cost.py --out docs/results/hf_convert_cost.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(d: int, f: int, experts: int, dtype: torch.dtype):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=32, hidden_size=d, intermediate_size=f, num_hidden_layers=1,
                        num_attention_heads=32, num_key_value_heads=8, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=64)
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():   # in row blocks: a float32 draw of a whole expert stack would double the peak
            for block in p.view(-1, p.shape[-1]).split(4096):
                block.copy_(torch.randn(block.shape, generator=gen) * 0.02)
    return model


def worker(args) -> dict:
    from trilemma_moe.integrations.hf import convert_moe_blocks
    from trilemma_moe.training.measure import peak_rss_bytes
    torch.set_num_threads(args.threads)
    model = build(args.hidden, args.ffn, args.experts, getattr(torch, args.dtype))
    rss_built = peak_rss_bytes()
    start = time.perf_counter()
    report = convert_moe_blocks(model, svd=args.svd[0])[0]
    seconds = time.perf_counter() - start
    return {"svd": args.svd[0], "seconds": seconds, "peak_rss_built_mib": rss_built / 2 ** 20,
            "peak_rss_after_mib": peak_rss_bytes() / 2 ** 20, "relative_error": report["relative_error"],
            "expert_parameters_before": report["expert_parameters_before"],
            "expert_parameters_after": report["expert_parameters_after"],
            "groups": model.model.layers[0].mlp.moe.moe.num_groups, "rank": model.model.layers[0].mlp.moe.moe.config.rank}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--svd", nargs="+", default=["randomized", "exact"])
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import transformers
    runs = []
    for svd in args.svd:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--svd", svd, "--hidden", str(args.hidden),
               "--ffn", str(args.ffn), "--experts", str(args.experts), "--dtype", args.dtype,
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if proc.returncode:
            raise SystemExit(f"{svd}: worker failed\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{svd:>10}: {r['seconds']:8.1f} s  peak RSS {r['peak_rss_built_mib']:,.0f} -> "
              f"{r['peak_rss_after_mib']:,.0f} MiB  relative error {r['relative_error']:.4f}  expert parameters "
              f"{r['expert_parameters_before'] / 1e6:,.1f} M -> {r['expert_parameters_after'] / 1e6:,.1f} M")
    result = {"command": " ".join(["python", "benchmarks/hf_convert_cost.py", *(argv or sys.argv[1:])]),
              "date": datetime.date.today().isoformat(), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "shape": {"hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "dtype": args.dtype,
                        "threads": args.threads}, "runs": runs}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
