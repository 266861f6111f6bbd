"""Validation perplexity of one trained checkpoint with its residual factors as trained and in INT4
(post-training quantization of the same weights).

    python benchmarks/quant_eval.py --checkpoint runs/ck16/latest.pt --run-summary runs/wt2_bits16.json \
        --data ../shared/data/wikitext-2 --eval-batches 100
"""
from __future__ import annotations

import argparse
import json

import torch

from trilemma_moe.core.checkpoint import safe_load
from trilemma_moe.data import load_wikitext
from trilemma_moe.train import evaluate

from offload_bench import _model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--run-summary", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--eval-batches", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.run_summary) as f:
        run = json.load(f)["config"]
    corpus = load_wikitext(args.data)
    state = safe_load(args.checkpoint)
    out = {}
    for bits in (16, 4):
        model = _model(run, corpus.vocab_size, state)
        for ffn in model.moe_layers():
            ffn.layer.moe.experts.residual_bits = bits
        out[bits] = evaluate(model, corpus.valid, run["seq_len"], run["batch_size"], args.eval_batches)
        print(bits, out[bits])
    print("ppl ratio int4 / as trained:", out[4]["valid_ppl"] / out[16]["valid_ppl"])
    return out


if __name__ == "__main__":
    main()
