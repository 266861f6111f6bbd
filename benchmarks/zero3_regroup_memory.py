"""What a regroup costs in memory under ZeRO-3: rank 0's resident memory above its level before the
regroup, sampled every millisecond while ``layer.recluster(force=True)`` runs between steps (the
layer is gathered, changed groups are decomposed afresh, the fp32 masters and Adam moments are
rewritten), next to what one layer's experts take in full and compressed.

    PYTHONPATH=. python benchmarks/zero3_regroup_memory.py --out docs/results/zero3_regroup_memory.json

One block at the paper's layer dims (d=768, d_ff=3072, E=32, G=8, r=16, top-2), fp32, 2 gloo
ranks, ZeRO-3 at ep_size 1 (experts partitioned over both ranks) and ep_size 2 (each rank its own
4 groups), compressed burn-in, with the default ``regroup_migration="movers"`` (movers re-expressed
on their new group's base) and with ``"redecompose"`` (every changed group decomposed afresh: the
most a regroup writes). Memory: the resident set size (VmRSS, read by the trainer's
``training.measure.current_rss_bytes``), sampled by a thread; peak minus the level just before
the regroup.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from trilemma_moe.training.measure import current_rss_bytes as rss_bytes

MIB = 1 << 20
D, F, E, G, R = 768, 3072, 32, 8, 16


class Sampler:
    """The highest resident set size seen while the block runs, one sample per millisecond."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.pre = nn.Linear(D, D)   # a ZeRO-3 leaf module's input must require grad (its backward hook)
        self.moe = moe

    def forward(self, x):
        y, l_aux, _ = self.moe(self.pre(x))
        return y.square().mean() + l_aux


def worker(rank, world, port, ep, migration, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger
    from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
    from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups
    logger.setLevel("WARNING")
    deepspeed.init_distributed("gloo")
    cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=R, top_k=2, burn_in=2, recluster_interval=10 ** 6,
                            delta=0.0, alpha=0.0, burn_in_form="compressed", regroup_similarity="weights",
                            regroup_migration=migration, ep_size=ep)
    torch.manual_seed(0)
    moe = TrilemmaMoE(D, nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D)), num_experts=E, k=2,
                      ep_size=ep, config=cfg)
    model = Block(moe)
    ds = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10 ** 9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds)
    attach_engine(engine)
    for step in range(3):   # the first clustering at step 2, Adam moments exist
        x = torch.randn(256, D, generator=torch.Generator().manual_seed(10 * step + rank))
        engine.backward(engine(x))
        engine.step()
    with torch.no_grad():   # new activation statistics: the regroup moves experts
        moe.moe.centroids.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(7)))
    dist.barrier()
    before = rss_bytes()
    with Sampler() as s:
        t0 = time.perf_counter()
        assert moe.recluster(force=True)
        seconds = time.perf_counter() - t0
    local = E // ep
    full_fp32 = local * 2 * D * F * 4
    held = sum(p.ds_numel for p in moe.moe.experts.parameters()) * 4
    result = {"ep_size": ep, "regroup_migration": migration, "rank": rank, "rss_before_mib": before / MIB, "regroup_peak_above_mib": (s.peak - before) / MIB,
              "moved_experts": moe.stats()["moved_experts"], "regroup_seconds": seconds,
              "layer_experts_full_fp32_mib": full_fp32 / MIB, "layer_experts_compressed_fp32_mib": held / MIB}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for migration in ("movers", "redecompose"):
        for ep in (1, 2):
            tmp = f"/tmp/zero3_regroup_memory_{os.getpid()}_{ep}.json"
            mp.start_processes(worker, args=(2, _free_port(), ep, migration, tmp), nprocs=2, start_method="spawn")
            with open(tmp) as f:
                rows.append(json.load(f))
            os.unlink(tmp)
    for r in rows:
        print(f"{r['regroup_migration']}, ep_size {r['ep_size']}: rank 0 held {r['regroup_peak_above_mib']:.0f} MiB more during the regroup "
              f"({r['moved_experts']} experts moved, {r['regroup_seconds']:.1f} s); its experts of the layer: "
              f"{r['layer_experts_full_fp32_mib']:.0f} MiB full, {r['layer_experts_compressed_fp32_mib']:.0f} MiB compressed (fp32)")
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                "command": "python benchmarks/zero3_regroup_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "memory": "resident set size (VmRSS) sampled every ms during the regroup, minus VmRSS just before it (rank 0)"}
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
