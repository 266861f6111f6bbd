"""One rank of an expert-parallel layer whose ranks sit on different test hosts (network
namespaces, tests/netns_hosts.py); run by tests/test_netns.py, one process per host:

    RANK=r WORLD_SIZE=n MASTER_ADDR=.. MASTER_PORT=.. GLOO_SOCKET_IFNAME=<veth> \
        python netns_a2a.py OUT_DIR [--iters N] [--tokens T] [--d D]

ep_size = world and nothing else in the process: inside the measured windows only the layer's
collectives run (its all-to-alls, the l_aux and centroid-statistics all-reduces), each rank on
its own data. Two windows, each between barriers, read from the link's counters
(/sys/class/net/<veth>/statistics, this host's namespace) and from the kernel's per-socket TCP
counters (``ss -ti``: payload bytes and segments of every connection to another host):

Several ranks per host: ranks 2h, 2h+1 on host h (consecutive, as DeepSpeed places them), so
`profile-comm`'s intra-node bytes (lo) and inter-node bytes (the veth) are both measured.

* ``fwd``: N forwards without autograd (the dispatch and return all-to-alls + the l_aux
  all-reduce); what `trilemma-moe profile-comm` predicts for one forward;
* ``train``: N forward+backward passes in training mode (the gradient all-to-alls and the
  centroid statistics added).

Writes OUT_DIR/rank<r>.json (the layer's byte counters per window, link and TCP deltas) and
OUT_DIR/routing<r>.pt (the fwd window's routing, in the format of --record-routing).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from trilemma_moe import TrilemmaMoEConfig  # noqa: E402
from trilemma_moe.core.layer import ClusteredMoE  # noqa: E402
from trilemma_moe.parallel import ExpertParallelComm, ExpertParallelTopology  # noqa: E402

SS_FIELDS = ("bytes_sent", "bytes_received", "segs_out", "segs_in", "data_segs_out")


def link_counters(ifname: str) -> dict:
    out = {}
    for dev, tag in ((ifname, ""), ("lo", "lo_")):
        base = f"/sys/class/net/{dev}/statistics/"
        out.update({tag + k: int(open(base + k).read()) for k in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")})
    return out


def tcp_counters(local_addr: str) -> dict:
    """Per established connection of this host's address (every rank on the host: ``ss`` sees the
    namespace's sockets): the kernel's payload bytes and segments."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True).stdout
    conns, key = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            parts = line.split()
            key = " ".join(parts[-2:]) if len(parts) >= 2 and parts[-2].startswith(local_addr + ":") else None
            if key is not None:
                conns[key] = dict.fromkeys(SS_FIELDS, 0)
            continue
        if key is not None:
            for f in SS_FIELDS:
                m = re.search(rf"\b{f}:(\d+)", line)
                if m:
                    conns[key][f] = int(m.group(1))
    return conns


def snapshot(ifname, addr):
    """Counters read between two barriers: no rank sends layer traffic while any rank reads."""
    dist.barrier()
    got = link_counters(ifname), tcp_counters(addr), time.perf_counter()
    dist.barrier()
    return got


def delta(a, b, ifname, addr):
    """Link counters (veth: between hosts; lo: between ranks of this host) and TCP payload split by
    peer: ``tcp_inter`` to other hosts, ``tcp_intra`` to ranks of this host (gloo binds the veth's
    address, so those connections are addr -> addr and the kernel carries them on lo)."""
    (l0, t0, s0), (l1, t1, s1) = a, b
    tcp = {"tcp_inter": dict.fromkeys(SS_FIELDS, 0), "tcp_intra": dict.fromkeys(SS_FIELDS, 0)}
    for k, v in t1.items():
        before = t0.get(k, dict.fromkeys(SS_FIELDS, 0))
        side = "tcp_intra" if k.split()[1].rsplit(":", 1)[0] == addr else "tcp_inter"
        for f in SS_FIELDS:
            tcp[side][f] += v[f] - before[f]
    return {"link": {k: l1[k] - l0[k] for k in l0}, **tcp, "seconds": s1 - s0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank per iteration")
    p.add_argument("--d", type=int, default=128)
    args = p.parse_args()
    ifname = os.environ["GLOO_SOCKET_IFNAME"]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    addr = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", ifname], capture_output=True, text=True,
                          check=True).stdout.split()[3].split("/")[0]
    cfg = TrilemmaMoEConfig(num_experts=16, num_groups=4, rank=4, top_k=2, burn_in=10 ** 9, ep_size=world,
                            seed=0, comm_timeout_s=60)
    layer = ClusteredMoE(args.d, 2 * args.d, cfg,
                         expert_parallel=ExpertParallelComm(ExpertParallelTopology.create(world), cfg))
    gen = torch.Generator().manual_seed(1000 + rank)   # each rank its own data
    batches = [torch.randn(args.tokens, args.d, generator=gen) for _ in range(args.iters)]
    y, l_aux, _ = layer(batches[0])                    # warm-up (every connection in use once)
    (y.pow(2).mean() + l_aux).backward()
    result = {"rank": rank, "world": world, "ifname": ifname, "d": args.d, "tokens": args.tokens,
              "iters": args.iters, "num_experts": cfg.num_experts, "num_groups": cfg.num_groups,
              "top_k": cfg.top_k}

    layer.ep.reset_stats()
    layer.routing_log = []
    a = snapshot(ifname, addr)
    with torch.no_grad():
        for x in batches:
            layer(x)
    b = snapshot(ifname, addr)
    result["fwd"] = dict(delta(a, b, ifname, addr), layer=layer.comm_stats())
    torch.save({"num_experts": cfg.num_experts, "num_groups": cfg.num_groups, "top_k": cfg.top_k,
                "group_top_k": cfg.group_top_k, "hidden_size": args.d,
                "layers": [{"group_idx": torch.cat([g for g, _ in layer.routing_log]),
                            "expert_idx": torch.cat([e for _, e in layer.routing_log])}]},
               os.path.join(args.out, f"routing{rank}.pt"))
    layer.routing_log = None

    layer.ep.reset_stats()
    a = snapshot(ifname, addr)
    for x in batches:
        y, l_aux, _ = layer(x)
        (y.pow(2).mean() + l_aux).backward()
    b = snapshot(ifname, addr)
    result["train"] = dict(delta(a, b, ifname, addr), layer=layer.comm_stats())

    # the cost of a window's own fences: two barriers and nothing else
    a = snapshot(ifname, addr)
    b = snapshot(ifname, addr)
    result["fences"] = delta(a, b, ifname, addr)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
