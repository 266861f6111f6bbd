"""Where the time of one forward+backward of our layer goes, per CUDA kernel (torch.profiler).

    python benchmarks/profile_layer.py --tokens 16384 --d 768 --d-ff 3072 -E 32 -G 8 -r 16
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("-E", type=int, default=32)
    ap.add_argument("-G", type=int, default=8)
    ap.add_argument("-r", type=int, default=16)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    cfg = TrilemmaMoEConfig(num_experts=args.E, num_groups=args.G, rank=args.r, top_k=2, burn_in=10 ** 9)
    layer = ClusteredMoE(args.d, args.d_ff, cfg).cuda()
    layer.recluster(force=True)
    layer.config.dynamic_regroup = False
    x = torch.randn(args.tokens, args.d, device="cuda", requires_grad=True)

    def once():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, l_aux, _ = layer(x)
        (y.float().pow(2).mean() + l_aux).backward()
    for _ in range(5):
        once()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            once()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
