"""Stored expert bytes of one layer, measured from the tensors held: ours (bases BF16, residuals
INT4 or BF16, biases BF16) vs Switch top-2 (E full experts in BF16).

    python benchmarks/memory_bench.py --d-model 768 --d-ff 3072 --num-experts 32 --num-groups 8 --rank 16

Our layer is built in BF16 and compressed once (first clustering: bases + rank-r SVD factors),
then ``layer.memory_report()`` is read; Switch's expert tensors are counted as allocated.
"""
from __future__ import annotations

import argparse
import json

import torch

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE
from trilemma_moe.models.ffn import SwitchTop2FFN


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--num-groups", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--summary-json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for bits in (16, 4):
        cfg = TrilemmaMoEConfig(num_experts=args.num_experts, num_groups=args.num_groups, rank=args.rank,
                                burn_in=0, residual_bits=bits)
        layer = ClusteredMoE(args.d_model, args.d_ff, cfg)
        layer.recluster(force=True)          # compress (fp32 SVD), then hold everything in BF16
        layer.to(torch.bfloat16)
        out[f"ours_int{bits}" if bits == 4 else "ours_bf16"] = layer.memory_report()
        del layer
    sw = SwitchTop2FFN(args.d_model, args.d_ff, args.num_experts).to(torch.bfloat16)
    sw_bytes = sum(t.numel() * t.element_size() for t in (sw.w1, sw.b1, sw.w2, sw.b2))
    out["switch_top2_experts"] = sw_bytes
    r4, r16 = out["ours_int4"], out["ours_bf16"]
    out["int4_over_bf16_residuals"] = r4["residual_stored"] / r16["residual_stored"]
    out["ours_int4_over_switch"] = r4["stored_experts"] / sw_bytes
    out["ours_bf16_over_switch"] = r16["stored_experts"] / sw_bytes
    out["args"] = vars(args)
    print(json.dumps(out, indent=1))
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
