"""Regroup cost (clustering + migration) as a share of training time at T=100.

One ClusteredMoE layer trains (forward, backward, gradient averaging, AdamW) on ``--ep-size``
gloo CPU processes with a fixed global batch; then regroups of the compressed layer are forced
with scrambled activation statistics and alpha=0 so experts really move (between ranks when
ep_size > 1); the clustering itself costs the same at any alpha.
A regroup check runs every T steps, so its share of training time is
``regroup / (T * step + regroup)``; a check skipped by delta (inputs + decision only) is timed in
the same run. Times are the slowest rank's.

``--memory``: rank 0's extra memory during a regroup check (skipped by delta) and a forced
regroup, measured as the peak of torch's CPU allocator above its level at the start (the
profiler's allocation events; allocations outside torch, e.g. inside gloo, are not seen), for
d in ``--memory-d`` (d_ff = 4d), so the table shows whether it grows with d x d_ff.
``--scaling``: check / clustering time and rank 0's extra memory for E in ``--scaling-experts``
(G = E/4) at reduced d, written to ``--scaling-json`` and plotted (``--figure``; earlier JSONs
given to ``--compare`` are drawn dashed, e.g. a before/after).

    OMP_NUM_THREADS=1 python benchmarks/regroup_cost.py --ep-size 1 2 4 --json out.json
    OMP_NUM_THREADS=1 python benchmarks/regroup_cost.py --ep-size 1 4 --memory --scaling \
        --scaling-json docs/results/regroup_cost_before.json --figure docs/figures/regroup_scaling.png
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trilemma_moe import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE
from trilemma_moe.parallel import (
    ExpertParallelComm,
    ExpertParallelTopology,
    average_gradients,
)


def make_config(args, experts, groups, world):
    # the paper's similarity with no move cost, so scrambled centroids force regroups that move
    # most experts (the worst case); the default probe rule's checks cost the same
    return TrilemmaMoEConfig(num_experts=experts, num_groups=groups, rank=args.rank, top_k=2, burn_in=10 ** 9,
                             recluster_interval=args.interval, delta=0.0, ep_size=world, seed=0, alpha=args.alpha,
                             svd=args.svd, regroup_migration=args.migration, regroup_similarity="weights",
                             regroup_move_cost=0.0)


def scramble(layer, seed):
    """Fresh random activation centroids: with alpha=0 they decide the grouping, so experts move."""
    with torch.no_grad():
        layer.centroids.copy_(torch.randn(layer.centroids.shape, generator=torch.Generator().manual_seed(seed)))


def skipped_checks(layer, seeds, slowest, after=None):
    """Wall time of regroup checks that decide and are skipped (delta = inf), slowest rank,
    each on fresh centroids; ``after`` runs after each (a training step)."""
    layer.config.delta = float("inf")
    times, cluster = [], []
    for seed in seeds:
        scramble(layer, seed)
        dist.barrier()
        t0 = time.perf_counter()
        assert not layer.recluster()
        times.append(slowest(time.perf_counter() - t0))
        cluster.append(slowest(layer.stats()["regroup_cluster_s"]))
        if after is not None:
            after()
    return times, cluster


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def peak_extra_bytes(fn):
    """``(fn(), peak)``: the peak of torch's CPU allocator above its level when fn starts, from the
    profiler's allocation events (each carries its signed size; their running sum is the level)."""
    from torch._C._profiler import _EventType
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    allocs = sorted((e.start_time_ns, e.extra_fields.alloc_size)
                    for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
                    if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu")
    level = peak = 0
    for _, n in allocs:
        level += n
        peak = max(peak, level)
    return out, peak


def probe_worker(rank, world, port, args, cases, out):
    """Per case (E, G, d, f): a fresh layer compressed once, then a timed check skipped by delta,
    the same check under the memory profiler (rank 0), and a forced regroup under it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    topo = ExpertParallelTopology.create(world)

    def slowest(seconds):
        t = torch.tensor([seconds], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def measured(fn):   # only rank 0 is profiled: the others run as in training
        return peak_extra_bytes(fn) if rank == 0 else (fn(), 0)

    rows = []
    for E, G, d, f in cases:
        cfg = make_config(args, E, G, world)
        layer = ClusteredMoE(d, f, cfg, expert_parallel=ExpertParallelComm(topo, cfg) if world > 1 else None)
        scramble(layer, 0)
        layer.recluster(force=True)                   # compress the full experts
        times, cluster = skipped_checks(layer, range(1, 1 + args.regroups), slowest)
        scramble(layer, 100)
        dist.barrier()
        applied, check_peak = measured(layer.recluster)
        assert not applied
        scramble(layer, 101)
        dist.barrier()
        applied, regroup_peak = measured(functools.partial(layer.recluster, force=True))
        assert applied
        held = sum(t.numel() * t.element_size() for t in layer.experts.expert_parameters(True))
        rows.append({"ep_size": world, "experts": E, "groups": G, "d": d, "f": f, "check_s": statistics.median(times),
                     "check_cluster_s": statistics.median(cluster), "check_peak_bytes_rank0": check_peak,
                     "regroup_peak_bytes_rank0": regroup_peak, "expert_bytes_rank0": held,
                     "full_weights_bytes_all_experts": E * sum(di * do * 4 for di, do in layer.spec.matrices.values())})
        del layer
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = make_config(args, args.experts, args.groups, world)
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
        scramble(layer, i)
        dist.barrier()
        t0 = time.perf_counter()
        assert layer.recluster(force=True)
        regroups.append(slowest(time.perf_counter() - t0))
        s = layer.stats()
        cluster.append(slowest(s["regroup_cluster_s"]))
        migrate.append(slowest(s["regroup_migrate_s"]))
        moved.append(s["moved_experts"])
        step()
    # checks that decide and are skipped (gain below delta), as most later checks are
    checks, _ = skipped_checks(layer, range(1000, 1000 + args.regroups), slowest, after=step)
    if rank == 0:
        st, rg, ck = statistics.median(times), statistics.median(regroups), statistics.median(checks)
        res = {"ep_size": world, "step_s": st, "regroup_s": rg, "regroup_cluster_s": statistics.median(cluster),
               "regroup_migrate_s": statistics.median(migrate), "first_clustering_s": first,
               "moved_experts": moved, "share_at_T": rg / (args.interval * st + rg), "T": args.interval,
               "check_s": ck, "check_share_at_T": ck / (args.interval * st + ck), "svd": args.svd, "migration": args.migration,
               "migration_bytes_rank0": (layer.comm_stats().get("bytes_regroup_migration", 0) if comm else 0)}
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world, port, *extra):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(fn, args=(world, port, *extra, f.name), nprocs=world)
        return json.load(f)


def load_compare(paths):
    """(label, scaling rows) of earlier --json outputs; the label they were run with, else the file name."""
    out = []
    for c in paths:
        with open(c) as f:
            saved = json.load(f)
        out.append((saved["args"].get("label") or os.path.splitext(os.path.basename(c))[0], saved["scaling"]))
    return out


def plot(scaling, compare, label, path):
    """Check time and rank 0's extra memory against E, log-log, one line per ep_size and run."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, rows), style in zip([(label, scaling)] + compare, ["-o", "--s", ":^", "-.v"]):
        for ep in sorted({r["ep_size"] for r in rows}):   # one colour per ep_size, one line style per run
            rs = sorted((r for r in rows if r["ep_size"] == ep), key=lambda r: r["experts"])
            xs, kw = [r["experts"] for r in rs], {"label": f"ep {ep}, {name}", "color": f"C{ep.bit_length() - 1}"}
            ax_t.plot(xs, [1e3 * r["check_s"] for r in rs], style, **kw)
            ax_m.plot(xs, [max(r["check_peak_bytes_rank0"], 1) / 2 ** 20 for r in rs], style, **kw)
    r0 = scaling[0]
    for ax, ylabel in ((ax_t, "regroup check wall time (ms, slowest rank)"),
                       (ax_m, "rank 0 extra memory in a check (MiB, peak)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_yscale("log")
        ax.set_xlabel("experts E (G = E/4)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Regroup check vs E (d={r0['d']}, d_ff={r0['f']}, CPU gloo, 1 thread per rank)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


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
    p.add_argument("--svd", choices=("exact", "randomized"), default="exact",
                   help="the residual factors' SVD (TrilemmaMoEConfig.svd)")
    p.add_argument("--migration", choices=("movers", "redecompose"), default="movers",
                   help="regroup_migration: only movers re-expressed (default) or changed groups decomposed afresh")
    p.add_argument("--no-share", action="store_true", help="skip the share-of-training part")
    p.add_argument("--memory", action="store_true", help="rank 0's extra memory at each d in --memory-d")
    p.add_argument("--memory-d", type=int, nargs="+", default=[128, 256, 512], help="d; d_ff = 4d")
    p.add_argument("--scaling", action="store_true", help="check time and memory for E in --scaling-experts")
    p.add_argument("--scaling-experts", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--scaling-d", type=int, default=64)
    p.add_argument("--scaling-f", type=int, default=256)
    p.add_argument("--figure", default=None, help="PNG of the scaling part (log-log)")
    p.add_argument("--compare", nargs="*", default=[], help="earlier --json outputs drawn dashed in --figure")
    p.add_argument("--label", default="this run", help="this run's name in the figure's legend")
    p.add_argument("--plot-from", default=None, help="only redraw --figure from this earlier --json (and --compare)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            saved = json.load(f)
        plot(saved["scaling"], load_compare(args.compare), saved["args"].get("label", args.label), args.figure)
        return saved["results"]
    make_config(args, args.experts, args.groups, 1)   # a bad knob fails here, before spawning
    out = {"args": vars(args), "results": []}
    port = args.port
    if not args.no_share:
        for world in args.ep_size:
            out["results"].append(spawn(worker, world, port, args))
            port += 1
        print(f"E={args.experts} G={args.groups} r={args.rank} d={args.d} f={args.f} k=2, "
              f"{args.tokens} tokens/step (global), T={args.interval}, svd={args.svd}, migration={args.migration}")
        print(f"{'ep':>3} {'step ms':>9} {'regroup ms':>11} {'cluster ms':>11} {'migrate ms':>11} {'share@T':>8} "
              f"{'check ms':>9} {'check@T':>8}")
        for r in out["results"]:
            print(f"{r['ep_size']:>3} {1e3 * r['step_s']:>9.1f} {1e3 * r['regroup_s']:>11.1f} "
                  f"{1e3 * r['regroup_cluster_s']:>11.1f} {1e3 * r['regroup_migrate_s']:>11.1f} "
                  f"{100 * r['share_at_T']:>7.2f}% {1e3 * r['check_s']:>9.1f} {100 * r['check_share_at_T']:>7.2f}%")
    for part, cases in (("memory", [(args.experts, args.groups, d, 4 * d) for d in args.memory_d] if args.memory else []),
                        ("scaling", [(e, e // 4, args.scaling_d, args.scaling_f) for e in args.scaling_experts]
                         if args.scaling else [])):
        if not cases:
            continue
        out[part] = []
        for world in args.ep_size:
            out[part] += spawn(probe_worker, world, port, args, cases)
            port += 1
        print(f"{part}: r={args.rank}, svd={args.svd}; rank 0's peak extra torch CPU memory (MiB) in a skipped "
              f"check and a forced regroup; full weights = E experts' dense matrices in fp32")
        print(f"{'ep':>3} {'E':>4} {'d':>4} {'d_ff':>5} {'check ms':>9} {'cluster ms':>10} {'check MiB':>10} "
              f"{'regroup MiB':>11} {'full MiB':>9}")
        for r in out[part]:
            print(f"{r['ep_size']:>3} {r['experts']:>4} {r['d']:>4} {r['f']:>5} {1e3 * r['check_s']:>9.1f} "
                  f"{1e3 * r['check_cluster_s']:>10.1f} {r['check_peak_bytes_rank0'] / 2 ** 20:>10.2f} "
                  f"{r['regroup_peak_bytes_rank0'] / 2 ** 20:>11.2f} {r['full_weights_bytes_all_experts'] / 2 ** 20:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.figure and "scaling" in out:
        plot(out["scaling"], load_compare(args.compare), args.label, args.figure)
    return out["results"]


if __name__ == "__main__":
    main()
