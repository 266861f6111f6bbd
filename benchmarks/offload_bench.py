"""Idle-group offload on a trained small GPT: evaluation in small (decode-like) batches with the
offload store, against the same store that never offloads.

    python benchmarks/offload_bench.py --checkpoint runs/ck4/latest.pt --run-summary runs/wt2_bits4.json \
        --data ../shared/data/wikitext-2 --offload-dir /tmp/nvme --idle-steps 4 --lookahead 2

Reports per setting: validation loss/perplexity (must be identical), peak resident bytes of the
stored expert form, prefetch hits / misses / hit rate, offloads, bytes written and read, stall
time per step, and the tier used (NVMe over DeepSpeed aio, or CPU memory).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.checkpoint import safe_load
from trilemma_moe.core.layer import clustered_layers
from trilemma_moe.data import eval_batches, load_wikitext
from trilemma_moe.integrations.aio import make_tier
from trilemma_moe.models import GPT
from trilemma_moe.train import _offload_summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="latest.pt written by trilemma_moe.train --save-dir")
    p.add_argument("--data", required=True)
    p.add_argument("--offload-dir", required=True)
    p.add_argument("--idle-steps", type=int, default=4)
    p.add_argument("--lookahead", type=int, default=2)
    p.add_argument("--ema-rate", type=float, default=0.3)
    p.add_argument("--no-router-evidence", action="store_true", help="predictor counts hard selections only")
    p.add_argument("--threshold", type=float, default=0.25, help="prefetch_threshold")
    p.add_argument("--release-masters", action="store_true",
                   help="free the expert parameters first (layer.release_masters): inference from the stored form")
    p.add_argument("--eval-seqs", type=int, default=1, help="sequences per evaluation step")
    p.add_argument("--eval-steps", type=int, default=400)
    p.add_argument("--window", type=int, default=None, help="tokens per sequence (default: the model's seq_len)")
    p.add_argument("--run-summary", required=True, help="the training run's --summary-json (model shape, knobs)")
    p.add_argument("--summary-json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = safe_load(args.checkpoint)
    with open(args.run_summary) as f:
        run = json.load(f)["config"]
    corpus = load_wikitext(args.data)
    results = {}
    for name, idle in (("no offload", 10 ** 9), ("offload", args.idle_steps)):
        torch.manual_seed(0)
        model = _model(run, corpus.vocab_size, state)
        layers = clustered_layers(model)
        for moe in layers:
            moe.config = moe.config.replace(offload_idle_steps=idle, prefetch_lookahead=args.lookahead,
                                            prefetch_ema_rate=args.ema_rate,
                                            prefetch_router_evidence=not args.no_router_evidence,
                                            prefetch_threshold=args.threshold)
            moe.offload_tier = make_tier(args.offload_dir if idle < 10 ** 9 else None, None) \
                if idle < 10 ** 9 else None
        held_before = sum(m.memory_report()["bases"] + m.memory_report()["residual_masters"]
                          + m.memory_report()["biases"] for m in layers)
        if args.release_masters:
            for moe in layers:
                moe.release_masters()
        model.eval()
        total, n = 0.0, 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for x, y in eval_batches(corpus.valid, args.window or run["seq_len"], args.eval_seqs, max_batches=args.eval_steps):
                _, loss, _ = model(x, y)
                total += float(loss) * y.numel()
                n += y.numel()
        wall = time.perf_counter() - t0
        st = _offload_summary([m.offload_stats() for m in layers])
        st["stored_mean_resident_fraction"] = st["mean_resident_bytes"] / sum(
            m.memory_report()["stored_experts"] for m in layers)
        mem = [m.memory_report() for m in layers]
        results[name] = {"valid_loss": total / n, "valid_ppl": math.exp(total / n), "tokens": n,
                         "wall_s": wall, "stored_experts_bytes": sum(m["stored_experts"] for m in mem),
                         "master_param_bytes_before": held_before,
                         "master_param_bytes_held": sum(m["bases"] + m["residual_masters"] + m["biases"] for m in mem)
                         if not args.release_masters else 0,
                         **st}
        print(name, json.dumps(results[name], indent=1))
    assert results["offload"]["valid_loss"] == results["no offload"]["valid_loss"], "offload changed results"
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


def _model(run, vocab, state):
    shape = ("d_model", "d_ff", "layers", "heads", "seq_len", "batch_size", "lr", "deepspeed")
    cfg = TrilemmaMoEConfig.from_dict({k: v for k, v in run.items() if k not in shape})
    model = GPT(vocab, d_model=run["d_model"], n_layers=run["layers"], n_heads=run["heads"], seq_len=run["seq_len"],
                d_ff=run["d_ff"], ffn_kind="ours", moe_config=cfg, seed=run["seed"])
    model.load_state_dict(state["model"])
    return model


if __name__ == "__main__":
    main()
