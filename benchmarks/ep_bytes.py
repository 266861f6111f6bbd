"""Measured all-to-all bytes of one forward+backward at ep_size N (gloo CPU processes) against the
bytes a flat top-k all-to-all would send for the same routing (the layer's own counters).

    OMP_NUM_THREADS=1 python benchmarks/ep_bytes.py --ep-size 4 --d 768 --tokens 1024
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trilemma_moe import TrilemmaMoEConfig  # noqa: E402
from trilemma_moe.core.layer import ClusteredMoE  # noqa: E402
from trilemma_moe.parallel import ExpertParallelComm, ExpertParallelTopology  # noqa: E402


def worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrilemmaMoEConfig(num_experts=args.experts, num_groups=args.groups, rank=16, top_k=args.top_k,
                            burn_in=10 ** 9, ep_size=world, seed=0)
    layer = ClusteredMoE(args.d, args.f, cfg,
                         expert_parallel=ExpertParallelComm(ExpertParallelTopology.create(world), cfg))
    y, l_aux, _ = layer(torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(rank)))
    (y.pow(2).mean() + l_aux).backward()
    got = [None] * world
    dist.all_gather_object(got, layer.comm_stats())
    if rank == 0:
        json.dump(got, open(out, "w"))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep-size", type=int, default=4)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--f", type=int, default=256, help="d_ff (does not change the bytes)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--port", type=int, default=29761)
    args = p.parse_args(argv)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(worker, args=(args.ep_size, args.port, args, f.name), nprocs=args.ep_size)
        ranks = json.load(open(f.name))
    tot = {k: sum(r[k] for r in ranks) for k in ranks[0] if k.startswith("bytes_")}
    stage1 = tot["bytes_tokens_out"] + tot["bytes_routing_out"]
    print(f"E={args.experts} G={args.groups} top-{args.top_k} d={args.d} ep_size={args.ep_size} "
          f"{args.tokens} tokens/rank, fp32; bytes sent to other ranks, all ranks, one forward+backward")
    for k, v in sorted(tot.items()):
        print(f"  {k:<32} {v:>14,}")
    print(f"stage 1 (tokens out + slot ids) / flat top-{args.top_k} tokens out: {stage1 / tot['bytes_flat_tokens_out']:.4f}")
    print(f"forward dispatch + return / flat: "
          f"{(stage1 + tot['bytes_tokens_back'] + tot['bytes_counts']) / (2 * tot['bytes_flat_tokens_out']):.4f}")


if __name__ == "__main__":
    main()
