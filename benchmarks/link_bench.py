"""Communication-bound timing: our layer (TrilemmaMoE) vs DeepSpeed-MoE top-2 across two test
hosts whose link is limited with tc (tbf rate; netem delay where the kernel has it), expert parallelism over the hosts.

    sudo OMP_NUM_THREADS=1 python benchmarks/link_bench.py --rate 1gbit --json docs/results/link_bench_1gbit.json
    ... --rate 1gbit --delay 0.2ms      # where the kernel has sch_netem (this machine's has not)

Needs root (network namespaces: tests/netns_hosts.py). Two hosts, one rank each (ep_size 2 =
world), each rank on its own data. Both layers are built in the same processes, same d, d_ff, E
and k=2 (ours: G groups of E/G experts, rank-r residuals, clustered before timing; DeepSpeed:
``deepspeed.moe.layer.MoE(ep_size=2, k=2, drop_tokens=False)``), and timed in alternating blocks
of forward+backward steps ("step" = one forward+backward of the layer on the rank's tokens, all
ranks started together by a barrier; the slower rank's time counts). All-to-all time = wall time
of every ``torch.distributed.all_to_all_single`` of the step, from the call to its completion.

Bytes: one extra (untimed) pass per layer in which every all-to-all is fenced by barriers and the
link's counters are read around it (TCP payload per socket from ``ss -ti``, the veth's
``tx_bytes``/``tx_packets``), so each all-to-all's bytes on the link are known by stage. The
stage-1 ratio (our dispatch: hidden vector + k weights + k slot ids per remote (token, group) pair)
is compared with the cost model's prediction (``trilemma_moe.parallel.cost.predicted_bytes``
on the same routing) against a flat dropless top-2 dispatch of the same routing, which the
benchmark also sends over the link (one row per remote (token, expert): what DeepSpeed-MoE would
send without capacity padding). DeepSpeed-MoE's real dispatch is padded to the largest expert
load (``drop_tokens=False``), reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


# ------------------------------------------------------------------------------------------
# worker: one rank, on one host
def _link(ifname):
    base = f"/sys/class/net/{ifname}/statistics/"
    return {k: int(open(base + k).read()) for k in ("tx_bytes", "tx_packets", "rx_bytes")}


def _tcp_sent(addr):
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True).stdout
    total, segs, mine = 0, 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            parts = line.split()
            mine = len(parts) >= 2 and parts[-2].startswith(addr + ":")
            continue
        if mine:
            m = re.search(r"\bbytes_sent:(\d+)", line)
            total += int(m.group(1)) if m else 0
            m = re.search(r"\bsegs_out:(\d+)", line)
            segs += int(m.group(1)) if m else 0
    return total, segs


def worker(args):
    import torch
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    import torch.nn as nn
    from deepspeed.moe.layer import MoE

    from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
    from trilemma_moe.parallel.cost import predicted_bytes

    ifname = os.environ["GLOO_SOCKET_IFNAME"]
    addr = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", ifname], capture_output=True, text=True,
                          check=True).stdout.split()[3].split("/")[0]
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    d, f, E, k = args.d, args.d_ff, args.experts, 2

    def expert():
        return nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))

    torch.manual_seed(0)
    cfg = TrilemmaMoEConfig(num_groups=args.groups, rank=args.rank, burn_in=10 ** 9, recluster_interval=10 ** 9,
                            comm_timeout_s=300, seed=0)
    ours = TrilemmaMoE(d, expert(), num_experts=E, ep_size=world, k=k, config=cfg)
    theirs = MoE(d, expert(), num_experts=E, ep_size=world, k=k, capacity_factor=1.0, eval_capacity_factor=1.0,
                 drop_tokens=False, top2_2nd_expert_sampling=False)
    theirs.set_deepspeed_parallelism()
    gen = torch.Generator().manual_seed(1000 + rank)          # each rank its own tokens
    batches = [torch.randn(args.tokens, d, generator=gen) for _ in range(4)]

    # ---- instrumentation: every all_to_all_single, timed from the call to its completion ------
    orig = dist.all_to_all_single
    log = {"time": 0.0, "calls": 0, "fence": False, "label": None, "records": []}

    def timed_a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if log["fence"]:
            dist.barrier()
            l0, (t0, s0) = _link(ifname), _tcp_sent(addr)
        start = time.perf_counter()
        work = orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True)
        work.wait()
        log["time"] += time.perf_counter() - start
        log["calls"] += 1
        if log["fence"]:
            dist.barrier()
            l1, (t1, s1) = _link(ifname), _tcp_sent(addr)
            log["records"].append({"label": log["label"], "payload": t1 - t0, "segs": s1 - s0,
                                   "tx_bytes": l1["tx_bytes"] - l0["tx_bytes"],
                                   "tx_packets": l1["tx_packets"] - l0["tx_packets"],
                                   "elements": input.numel(), "element_size": input.element_size()})
        return work if async_op else None

    dist.all_to_all_single = timed_a2a
    comm = ours.moe.ep                                        # label our stages by the communicator's name
    orig_stage_a2a = type(comm)._a2a

    def labelled(self, x, send_counts, recv_counts, stage):
        log["label"] = stage
        return orig_stage_a2a(self, x, send_counts, recv_counts, stage)

    type(comm)._a2a = labelled

    def step(layer, x):
        x = x.detach().requires_grad_(True)     # as inside a model: the input's gradient goes back too
        y, l_aux, _ = layer(x)
        (y.pow(2).mean() + l_aux).backward()
        layer.zero_grad(set_to_none=True)

    # warm-up, then our first clustering (the layer's steady state: compressed groups)
    for x in batches[:2]:
        step(ours, x)
        step(theirs, x)
    ours.recluster(force=True)
    assert ours.moe.compressed
    for x in batches[:2]:
        step(ours, x)
        step(theirs, x)

    # ---- timing: alternating blocks ---------------------------------------------------------------
    times = {"ours": [], "deepspeed": []}
    a2a = {"ours": [], "deepspeed": []}
    layers = {"ours": ours, "deepspeed": theirs}
    for rep in range(args.steps):
        for name in (("ours", "deepspeed") if rep % 2 == 0 else ("deepspeed", "ours")):
            x = batches[rep % len(batches)]
            log["time"] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            step(layers[name], x)
            el = torch.tensor([time.perf_counter() - t0, log["time"]])
            dist.all_reduce(el, op=dist.ReduceOp.MAX)          # the slower rank sets the pace
            times[name].append(float(el[0]))
            a2a[name].append(float(el[1]))

    # ---- bytes: one fenced pass per layer, then a flat dropless top-2 dispatch of our routing ----
    x = batches[0]
    log["fence"], log["records"] = True, []
    ours.moe.routing_log = []
    comm.reset_stats()
    step(ours, x)
    ours_records = log["records"]
    group_idx, expert_idx = ours.moe.routing_log[-1]
    ours.moe.routing_log = None
    counters = comm.comm_stats()
    log["records"] = []
    seq = iter(("dispatch", "combine", "combine_grad", "dispatch_grad"))

    def ds_label(*a, **kw):
        log["label"] = next(seq, "other")
        return timed_a2a(*a, **kw)

    dist.all_to_all_single = ds_label
    step(theirs, x)
    ds_records = log["records"]
    dist.all_to_all_single = timed_a2a
    # flat dropless top-2 of the same routing: one row of d values per (token, chosen expert) to the
    # expert's owner (expert e on rank e // (E / ep_size)), as the cost model counts it
    log["records"], log["label"] = [], "flat_dispatch"
    owner = (expert_idx.reshape(-1) // (E // world))
    order = torch.argsort(owner, stable=True)
    rows = x.repeat_interleave(expert_idx.shape[1] * expert_idx.shape[2], dim=0)[order]
    send = torch.bincount(owner, minlength=world).tolist()
    recv_t = torch.empty(world, dtype=torch.int64)
    orig(recv_t, torch.tensor(send, dtype=torch.int64))
    out = rows.new_empty((int(recv_t.sum()), d))
    timed_a2a(out, rows.contiguous(), recv_t.tolist(), send)
    flat_records = log["records"]
    log["fence"] = False
    # one fence alone (barrier + counters), to subtract
    dist.barrier()
    l0, (t0, s0) = _link(ifname), _tcp_sent(addr)
    dist.barrier()
    l1, (t1, s1) = _link(ifname), _tcp_sent(addr)
    fence = {"payload": t1 - t0, "tx_bytes": l1["tx_bytes"] - l0["tx_bytes"], "segs": s1 - s0,
             "tx_packets": l1["tx_packets"] - l0["tx_packets"]}
    pred = predicted_bytes(group_idx, expert_idx, args.groups, E, world, ours.moe.ep.rank, d, k, elem=4)
    result = {"rank": rank, "times": times, "a2a": a2a, "ours_records": ours_records, "ds_records": ds_records,
              "flat_records": flat_records, "fence": fence, "counters": counters, "predicted": pred,
              "ours_expert_params": ours.expert_parameter_count(),
              "ds_expert_params": sum(p.numel() for p in theirs.deepspeed_moe.experts.parameters())}
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(everyone, fh)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# driver: two hosts, the link shaped, one worker per host, the report
def summarise(ranks, args):
    def med(xs):
        return statistics.median(xs)

    step_o, step_d = med(ranks[0]["times"]["ours"]), med(ranks[0]["times"]["deepspeed"])
    a2a_o, a2a_d = med(ranks[0]["a2a"]["ours"]), med(ranks[0]["a2a"]["deepspeed"])

    def total(records, labels, key):
        """Summed over both ranks; each fenced call's window also held one barrier, subtracted."""
        return sum(r[key] - (rk["fence"][key] if key in rk["fence"] else 0)
                   for rk in ranks for r in rk[records] if r["label"] in labels)

    def wire(records, labels):        # payload + one Ethernet/IP/TCP header per 1500-byte segment
        return total(records, labels, "payload") + 66 * total(records, labels, "segs")

    nfence = {name: sum(len(rk[name]) for rk in ranks) for name in ("ours_records", "ds_records", "flat_records")}
    fence_payload = sum(rk["fence"]["payload"] for rk in ranks) / 2   # one barrier, mean over ranks
    s1 = ("tokens_out", "routing_out")
    link = {
        "ours_stage1_payload": total("ours_records", s1, "payload"),
        "ours_all_payload": total("ours_records", {r["label"] for rk in ranks for r in rk["ours_records"]}, "payload"),
        "flat_dispatch_payload": total("flat_records", ("flat_dispatch",), "payload"),
        "ds_dispatch_payload": total("ds_records", ("dispatch",), "payload"),
        "ds_all_payload": total("ds_records", ("dispatch", "combine", "combine_grad", "dispatch_grad"), "payload"),
        "ours_stage1_wire_1500": wire("ours_records", s1),
        "flat_dispatch_wire_1500": wire("flat_records", ("flat_dispatch",)),
        "ds_dispatch_wire_1500": wire("ds_records", ("dispatch",)),
        "ours_stage1_veth": total("ours_records", s1, "tx_bytes"),
        "flat_dispatch_veth": total("flat_records", ("flat_dispatch",), "tx_bytes"),
        "ds_dispatch_veth": total("ds_records", ("dispatch",), "tx_bytes"),
        "fence_payload_per_call": fence_payload,
    }
    pred = {k: sum(rk["predicted"][k] for rk in ranks) for k in ("tokens_out", "routing_out", "flat_tokens_out")}
    counted = {k: sum(rk["counters"].get(f"bytes_{k}", 0) for rk in ranks)
               for k in ("tokens_out", "routing_out", "flat_tokens_out")}
    predicted_ratio = (pred["tokens_out"] + pred["routing_out"]) / pred["flat_tokens_out"]
    link_ratio = link["ours_stage1_payload"] / link["flat_dispatch_payload"]
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "step_s": {"ours": step_o, "deepspeed": step_d, "ratio": step_o / step_d},
        "a2a_s": {"ours": a2a_o, "deepspeed": a2a_d, "ratio": a2a_o / a2a_d},
        "a2a_share_of_step": {"ours": a2a_o / step_o, "deepspeed": a2a_d / step_d},
        "bytes_link": link, "bytes_predicted": pred, "bytes_counted_by_layer": counted,
        "stage1_ratio_predicted": predicted_ratio,
        "stage1_ratio_link_payload": link_ratio,
        "stage1_ratio_link_wire_1500": link["ours_stage1_wire_1500"] / link["flat_dispatch_wire_1500"],
        "stage1_ratio_link_veth": link["ours_stage1_veth"] / link["flat_dispatch_veth"],
        "stage1_vs_deepspeed_dispatch_payload": link["ours_stage1_payload"] / link["ds_dispatch_payload"],
        "all_a2a_vs_deepspeed_payload": link["ours_all_payload"] / link["ds_all_payload"],
        "agreement": abs(link_ratio / predicted_ratio - 1),
        "fenced_calls": nfence,
        "expert_params": {"ours": sum(rk["ours_expert_params"] for rk in ranks),
                          "deepspeed": sum(rk["ds_expert_params"] for rk in ranks)},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="1gbit", help="tc rate limit on each host's egress ('none': unlimited)")
    p.add_argument("--delay", default="none", help="tc netem one-way delay, e.g. 0.2ms (needs sch_netem)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per layer")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import tempfile

    import netns_hosts
    reason = netns_hosts.available()
    if reason:
        raise SystemExit(f"link_bench: {reason}")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    with netns_hosts.NetnsHosts(2) as hosts, tempfile.TemporaryDirectory() as tmp:
        qdiscs = []
        for i in range(2):
            rate = None if args.rate == "none" else args.rate
            delay = None if args.delay == "none" else args.delay
            if rate or delay:
                try:
                    qdiscs.append(hosts.shape(i, rate=rate, delay=delay))
                except RuntimeError as exc:
                    raise SystemExit(f"link_bench: {exc}")
        out = os.path.join(tmp, "ranks.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("worker", "out", "json") and v is not None]
        procs = []
        for i in range(2):
            e = hosts.env(i, dict(env, MASTER_ADDR=hosts.address(0), MASTER_PORT="29611", RANK=str(i),
                                  LOCAL_RANK="0", WORLD_SIZE="2"))
            procs.append(subprocess.Popen(hosts.cmd(i, cmd), env=e))
        codes = [pr.wait() for pr in procs]
        if codes != [0, 0]:
            raise SystemExit(f"link_bench: workers exited with {codes}")
        ranks = json.load(open(out))
    s = summarise(ranks, args)
    s["qdiscs"] = qdiscs
    s["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    s["date"] = time.strftime("%Y-%m-%d")
    import deepspeed
    import torch
    s["versions"] = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    print(json.dumps(s, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(s, fh, indent=1)
    return s


if __name__ == "__main__":
    main()
