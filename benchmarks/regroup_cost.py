"""Regroup cost (clustering + migration) as a share of training time at T=100.

One ClusteredMoE layer trains (forward, backward, gradient averaging, AdamW) on ``--ep-size``
gloo CPU processes with a fixed global batch; then regroups of the compressed layer are forced
with scrambled activation statistics and alpha=0 so experts really move (between ranks when
ep_size > 1); the clustering itself costs the same at any alpha.
A regroup check runs every T steps, so its share of training time is
``regroup / (T * step + regroup)``. Times are the slowest rank's.

    OMP_NUM_THREADS=1 python benchmarks/regroup_cost.py --ep-size 1 2 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trilemma_moe import TrilemmaMoEConfig  # noqa: E402
from trilemma_moe.core.layer import ClusteredMoE  # noqa: E402
from trilemma_moe.parallel import ExpertParallelComm, ExpertParallelTopology, average_gradients  # noqa: E402


def worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrilemmaMoEConfig(num_experts=args.experts, num_groups=args.groups, rank=args.rank, top_k=2,
                            burn_in=10 ** 9, recluster_interval=args.interval, delta=0.0, ep_size=world, seed=0,
                            alpha=args.alpha)
    topo = ExpertParallelTopology.create(world)
    comm = ExpertParallelComm(topo, cfg) if world > 1 else None
    layer = ClusteredMoE(args.d, args.f, cfg, expert_parallel=comm)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    layer.attach_optimizer(opt)
    tokens = args.tokens // world
    gen = torch.Generator().manual_seed(rank)

    def step():
        x = torch.randn(tokens, args.d, generator=gen)
        y, l_aux, _ = layer(x)
        (y.pow(2).mean() + l_aux).backward()
        if world > 1:
            average_gradients(layer, topo)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def slowest(seconds):
        t = torch.tensor([seconds], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    layer.recluster(force=True)                       # first clustering: compress the full experts
    first = slowest(time.perf_counter() - t0)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(slowest(time.perf_counter() - t0))
    regroups, cluster, migrate, moved = [], [], [], []
    for i in range(args.regroups):
        with torch.no_grad():
            layer.centroids.copy_(torch.randn(layer.centroids.shape, generator=torch.Generator().manual_seed(i)))
        dist.barrier()
        t0 = time.perf_counter()
        assert layer.recluster(force=True)
        regroups.append(slowest(time.perf_counter() - t0))
        s = layer.stats()
        cluster.append(slowest(s["regroup_cluster_s"]))
        migrate.append(slowest(s["regroup_migrate_s"]))
        moved.append(s["moved_experts"])
        step()
    if rank == 0:
        st, rg = statistics.median(times), statistics.median(regroups)
        res = {"ep_size": world, "step_s": st, "regroup_s": rg, "regroup_cluster_s": statistics.median(cluster),
               "regroup_migrate_s": statistics.median(migrate), "first_clustering_s": first,
               "moved_experts": moved, "share_at_T": rg / (args.interval * st + rg), "T": args.interval,
               "migration_bytes_rank0": (layer.comm_stats().get("bytes_regroup_migration", 0) if comm else 0)}
        json.dump(res, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep-size", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048, help="global batch (tokens per step, all ranks)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="S_param weight; 0 so the scrambled activation statistics decide and experts move "
                        "(with alpha 0.7 compressed groups share a base and stay put: migration would be ~0)")
    p.add_argument("--interval", type=int, default=100, help="T: steps between regroup checks")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--regroups", type=int, default=3)
    p.add_argument("--port", type=int, default=29751)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for i, world in enumerate(args.ep_size):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            mp.spawn(worker, args=(world, args.port + i, args, f.name), nprocs=world)
            rows.append(json.load(open(f.name)))
    print(f"E={args.experts} G={args.groups} r={args.rank} d={args.d} f={args.f} k=2, "
          f"{args.tokens} tokens/step (global), T={args.interval}")
    print(f"{'ep':>3} {'step ms':>9} {'regroup ms':>11} {'cluster ms':>11} {'migrate ms':>11} {'share@T':>8}")
    for r in rows:
        print(f"{r['ep_size']:>3} {1e3 * r['step_s']:>9.1f} {1e3 * r['regroup_s']:>11.1f} "
              f"{1e3 * r['regroup_cluster_s']:>11.1f} {1e3 * r['regroup_migrate_s']:>11.1f} {100 * r['share_at_T']:>7.2f}%")
    if args.json:
        json.dump({"args": vars(args), "results": rows}, open(args.json, "w"), indent=1)
    return rows


if __name__ == "__main__":
    main()
