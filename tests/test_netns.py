"""Expert parallelism across test hosts with their own addresses (network namespaces joined by a
veth link, tests/netns_hosts.py; gloo binds each host's veth through GLOO_SOCKET_IFNAME):

* the layer alone (ep_size = world = 4, two ranks per host, each on its own data): the bytes the
  layers' counters say they sent equal the TCP payload (per-socket kernel counters) up to gloo's
  per-message headers, the veth's byte counter is the inter-host payload plus one 66-byte
  Ethernet/IP/TCP header per packet it carried, and `trilemma-moe profile-comm`'s inter-node
  (veth) and intra-node (loopback) bytes for the recorded routing match what was measured;
* the main job (small GPT, ZeRO-2, ep_size 2), one `deepspeed --no_ssh --node_rank N` launcher per
  host (launch/multinode_hostfile.sh, hostfile of the hosts' addresses): the loss curve of the
  one-process run on the same global batches; host 1 loses its link mid-run: both ranks stop
  within comm_timeout_s with one error naming the stage (no hang, no further steps), and a
  restart of both hosts from the last checkpoint continues the one-process curve to the end;
* a peer silent inside DeepSpeed's gradient-reduction group: the named error after comm_timeout_s;
* benchmarks/link_bench.py at toy sizes on a rate-limited link (smoke).

Skip (with the reason) where network namespaces cannot be made (not root, no iproute2).
"""
import datetime
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_hosts  # noqa: E402
from test_launch_ep import ENV, LAUNCHER, ROOT, ds_config, free_port  # noqa: E402

REASON = netns_hosts.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}")

A2A = os.path.join(ROOT, "tests", "scripts", "netns_a2a.py")
MULTINODE = os.path.join(ROOT, "launch", "multinode_hostfile.sh")
HEADER = 14 + 20 + 32        # Ethernet + IPv4 + TCP with timestamps, per packet the veth counts
COMM_TIMEOUT_S = 5
# burn_in 3 and a regroup check every 2 steps (test_launch_ep's DS_CONFIG): regroups at 3, 5, 7, ...
# A checkpoint every 4 steps and the link cut once step 5 is logged: the restart from step 4 runs
# regroup checks of its own on the way to the end.
STEPS = 12
CUT_AFTER = 5
TRAIN = ["--steps", str(STEPS), "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2",
         "--seq-len", "16", "--eval-batches", "2", "--eval-every", "0", "--no-progress"]


@pytest.fixture
def hosts():
    h = netns_hosts.NetnsHosts(2)
    try:
        yield h
    finally:
        h.close()


def _config(tmp_path, name, world, ep):
    path = ds_config(tmp_path, name, world, ep)
    cfg = json.loads(open(path).read())
    cfg["trilemma_moe"]["comm_timeout_s"] = COMM_TIMEOUT_S
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def one_process_curve(tmp_path_factory):
    """The main job in one process on the global batch: the curve every multi-host run must give."""
    tmp = tmp_path_factory.mktemp("one")
    out = tmp / "one.json"
    r = subprocess.run([sys.executable, "-m", "trilemma_moe.train", "--deepspeed_config", _config(tmp, "one", 1, 1),
                        *TRAIN, "--summary-json", str(out)], env=dict(ENV, MASTER_PORT=str(free_port())), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["reclusters"] >= 3 and len(summary["loss_curve"]) == STEPS
    return summary["loss_curve"]


def _launch(hosts, tmp_path, args, port, tag):
    """One launcher per host, as a scheduler's per-node step would start them."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{hosts.address(i)} slots=1\n" for i in range(2)))
    cfg = _config(tmp_path, "two", 2, 2)
    procs = []
    for i in range(2):
        env = hosts.env(i, dict(ENV, HOSTFILE=str(hostfile), MASTER_ADDR=hosts.address(0), MASTER_PORT=str(port),
                                NODE_RANK=str(i), DS_CONFIG=cfg, DEEPSPEED=" ".join(LAUNCHER)))
        log = open(tmp_path / f"{tag}_host{i}.log", "w")
        procs.append(subprocess.Popen(hosts.cmd(i, ["bash", MULTINODE, *args]), env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs]


def test_layer_bytes_match_what_crossed_the_link(hosts, tmp_path):
    """2 hosts x 2 ranks, ep_size 4 = world: between the hosts the veth, between the ranks of a host
    the loopback; `profile-comm`'s inter- and intra-node bytes are both on a wire we can read."""
    procs = []
    port = free_port()
    for rank in range(4):
        h = rank // 2
        env = hosts.env(h, dict(ENV, MASTER_ADDR=hosts.address(0), MASTER_PORT=str(port), RANK=str(rank),
                                LOCAL_RANK=str(rank % 2), WORLD_SIZE="4"))
        procs.append(subprocess.Popen(hosts.cmd(h, [sys.executable, A2A, str(tmp_path)]), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-3000:] for o in outs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]

    reductions = ("bytes_aux", "bytes_aux_grad", "bytes_stats")

    def counted(r, window):
        """What the layer says it sent: all-to-all stages as counted, its all-reduces (counted as
        payload size) as a ring all-reduce sends them, 2(n-1)/n of the buffer per rank."""
        L = r[window]["layer"]
        a2a = sum(v for k, v in L.items() if k.startswith("bytes_") and "flat" not in k
                  and k != "bytes_dispatch_total" and k not in reductions)
        return a2a + sum(L.get(k, 0) for k in reductions) * 2 * (4 - 1) / 4

    hosts_seen = [ranks[0], ranks[2]]          # each host's counters as its first rank read them
    for h, r in enumerate(hosts_seen):
        fence = r["fences"]["tcp_inter"]["bytes_sent"] + r["fences"]["tcp_intra"]["bytes_sent"]
        for window in ("fwd", "train"):
            w = r[window]
            layer = counted(ranks[2 * h], window) + counted(ranks[2 * h + 1], window)
            payload = w["tcp_inter"]["bytes_sent"] + w["tcp_intra"]["bytes_sent"]
            # the layers' counters are the payload gloo hands to TCP; gloo adds a small header per
            # message (and the window's closing barrier, subtracted): at most 1.5% here (measured 0.9%)
            assert layer <= payload - fence <= layer * 1.015, (h, window, layer, payload, fence)
            # the veth carries exactly the inter-host payload plus one Ethernet+IP+TCP header per packet
            # (segmentation-offload super-packets: fewer headers than 1500-byte frames would need)
            link = w["link"]
            # (the two counters are read one after the other: a barrier message may fall between them)
            assert abs(link["tx_bytes"] - (w["tcp_inter"]["bytes_sent"] + HEADER * link["tx_packets"])) \
                <= 2 * HEADER + fence, (h, window, w)
            assert w["tcp_intra"]["bytes_sent"] > 0 and link["lo_tx_bytes"] >= w["tcp_intra"]["bytes_sent"]
        # (each host reads its counters after the same barrier; a late ACK may fall on either side)
        other = hosts_seen[1 - h]
        assert abs(r["train"]["link"]["tx_bytes"] - other["train"]["link"]["rx_bytes"]) <= 4 * HEADER + fence
    # the layer's own stage counters: tokens out are (d + k) values per remote pair, slot ids k int32
    d, k = ranks[0]["d"], ranks[0]["top_k"]
    for r in ranks:
        L = r["train"]["layer"]
        assert L["bytes_routing_out"] * (d + k) == L["bytes_tokens_out"] * k  # same pairs, (d+k)*4 vs 4k bytes

    # `trilemma-moe profile-comm` on the recorded routing, 2 nodes x 2 ranks, ep_size 4: its inter- and
    # intra-node bytes of one forward (dispatch + return) against the fwd window's payload on the veth
    # and on lo. It samples tokens from the recording: run on 32x the tokens and scale (noise ~0.3%).
    rec = [torch.load(tmp_path / f"routing{r}.pt", weights_only=True) for r in range(4)]
    merged = dict(rec[0], layers=[{key: torch.cat([x["layers"][0][key] for x in rec])
                                   for key in ("group_idx", "expert_idx")}])
    torch.save(merged, tmp_path / "routing.pt")
    tokens = ranks[0]["tokens"] * ranks[0]["iters"]
    out = subprocess.run([sys.executable, "-m", "trilemma_moe.cli", "profile-comm", "--routing", str(tmp_path / "routing.pt"),
                          "--nodes", "2", "--gpus-per-node", "2", "--ep-size", "4", "--tokens-per-gpu",
                          str(32 * tokens), "--bytes-per-element", "4", "--json", str(tmp_path / "prof.json")],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    prof = json.loads((tmp_path / "prof.json").read_text())[0]
    measured = {side: sum(r["fwd"][f"tcp_{side}"]["bytes_sent"] for r in hosts_seen) for side in ("inter", "intra")}
    for side in ("inter", "intra"):
        assert prof[f"ours_{side}_bytes"] / 32 == pytest.approx(measured[side], rel=0.03), (side, prof, measured)
    fwd_layer = sum(r["fwd"]["layer"][s] for r in ranks for s in ("bytes_tokens_out", "bytes_routing_out",
                                                                   "bytes_tokens_back"))
    assert (prof["ours_inter_bytes"] + prof["ours_intra_bytes"]) / 32 == pytest.approx(fwd_layer, rel=0.02)
    flat = sum(r["fwd"]["layer"]["bytes_flat_tokens_out"] + r["fwd"]["layer"]["bytes_flat_tokens_back"] for r in ranks)
    assert (prof["flat_inter_bytes"] + prof["flat_intra_bytes"]) / 32 == pytest.approx(flat, rel=0.02)


def test_main_job_across_hosts_loses_a_host_and_resumes(hosts, tmp_path, one_process_curve):
    """The main job, one launcher per host: its loss curve is the one-process curve; host 1 loses its
    link mid-run and both ranks stop with one named error within comm_timeout_s; both hosts restart
    from the last checkpoint and continue the one-process curve to the end."""
    ck = tmp_path / "ck"
    losses = tmp_path / "loss.jsonl"
    args = [*TRAIN, "--save-dir", str(ck), "--save-every", "4", "--loss-log", str(losses)]
    procs = _launch(hosts, tmp_path, args, free_port(), "cut")
    try:
        deadline = time.monotonic() + 300
        while not (losses.exists() and len(losses.read_text().splitlines()) >= CUT_AFTER):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "run ended before the cut"
            time.sleep(0.02)
        hosts.set_link(1, up=False)             # host 1 falls off the network; nobody is told
        cut, cut_wall = time.monotonic(), datetime.datetime.now()
        codes = _wait_all(procs, 120)
        elapsed = time.monotonic() - cut
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"cut_host{i}.log").read_text() for i in range(2)]
    assert codes[0] != 0 and codes[1] != 0, logs
    # no hang: each rank's first stalled collective gives up after comm_timeout_s (the launcher
    # then tears down); torch's own default would have waited 30 minutes
    assert elapsed < COMM_TIMEOUT_S + 60, elapsed
    for log in logs:
        errors = [line for line in log.splitlines() if "RuntimeError: trilemma_moe" in line]
        assert errors, log[-4000:]
        assert "stage '" in errors[-1] and f"comm_timeout_s={COMM_TIMEOUT_S}" in errors[-1], errors
        # the launcher logs (with a timestamp) when its rank failed: comm_timeout_s after the cut, plus
        # the exception's way out (a few seconds on a loaded 2-core machine)
        stamp = re.search(r"^\[(\S+ \S+)\] \[INFO\] \[launch.py:\d+:sigkill_handler\] Killing subprocess", log, re.M)
        assert stamp, log[-3000:]
        stopped = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        assert (stopped - cut_wall).total_seconds() < COMM_TIMEOUT_S + 10, (stopped, cut_wall)
        with open(tmp_path / "stopped_after_cut_s.txt", "a") as f:    # for the record
            f.write(f"{(stopped - cut_wall).total_seconds():.2f} {errors[-1][:200]}\n")
    before_cut = [json.loads(line)["loss"] for line in losses.read_text().splitlines()]
    assert len(before_cut) < STEPS              # nothing went on after the cut
    # up to the cut: ranks on two hosts (ep_size 2 across the link) give the one-process curve
    assert max(abs(a - b) for a, b in zip(before_cut, one_process_curve)) < 1e-4, before_cut
    saved = int((ck / "latest").read_text().strip().removeprefix("step"))
    assert 4 <= saved <= len(before_cut) and saved % 4 == 0

    # the link comes back, both hosts restart from the last checkpoint
    hosts.set_link(1, up=True)
    out = tmp_path / "resumed.json"
    link_before = [hosts.link_stats(i) for i in range(2)]
    procs = _launch(hosts, tmp_path, [*args, "--resume", "--summary-json", str(out), "--comm-log",
                                      str(tmp_path / "comm.json")], free_port(), "resume")
    codes = _wait_all(procs, 300)
    logs = [(tmp_path / f"resume_host{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert f"resumed from {ck} at step {saved}" in logs[0]
    got = json.loads(out.read_text())
    assert got["ep_size"] == 2 and len(got["loss_curve"]) == STEPS - saved
    assert max(abs(a - b) for a, b in zip(got["loss_curve"], one_process_curve[saved:])) < 1e-4, (saved, got)
    # the ranks really talked over the link, and sent at least what their counters say
    comm = json.loads((tmp_path / "comm.json").read_text())
    for i in range(2):
        layer = comm["ranks"][i]["layers"][0]
        sent = hosts.link_stats(i)["tx_bytes"] - link_before[i]["tx_bytes"]
        assert layer["bytes_tokens_out"] > 0 and sent > layer["bytes_dispatch_total"]


def test_silent_peer_in_a_deepspeed_collective_is_a_named_error(hosts, tmp_path):
    """DeepSpeed's gradient reduction runs on groups made by new_group (torch's 30-minute default
    whatever the default group has): trilemma_moe.train gives every group comm_timeout_s and names
    the stage. Here the peer goes silent in exactly that collective (deterministic, unlike a cut at
    a random moment of a training step)."""
    script = os.path.join(ROOT, "tests", "scripts", "netns_silent_peer.py")
    port = free_port()
    procs = []
    for i in range(2):
        env = hosts.env(i, dict(ENV, MASTER_ADDR=hosts.address(0), MASTER_PORT=str(port), RANK=str(i),
                                LOCAL_RANK="0", WORLD_SIZE="2"))
        procs.append(subprocess.Popen(hosts.cmd(i, [sys.executable, script, "2", str(tmp_path / "out.json")]),
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["error"] is not None and got["error"].startswith("trilemma_moe: rank 0 (stage 'step 1: backward "
                                                                "(DeepSpeed gradient reduction)')"), got
    assert "comm_timeout_s=2" in got["error"]
    assert 1.5 < got["waited_s"] < 2 + 5, got


def test_link_bench_smoke(tmp_path):
    """benchmarks/link_bench.py at toy sizes on a 1 Gbit/s tbf-limited link: it runs, both layers are
    timed, and the stage-1 byte ratio on the link agrees with the cost model's (the issue's 5%)."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "link_bench.py"), "--rate", "1gbit",
                        "--d", "64", "--d-ff", "32", "--experts", "8", "--groups", "4", "--rank", "4",
                        "--tokens", "256", "--steps", "2", "--json", str(out)],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert all("tbf" in q and "rate 1Gbit" in q for q in s["qdiscs"]) and len(s["qdiscs"]) == 2
    assert s["bytes_counted_by_layer"] == s["bytes_predicted"]          # the layer's counters = the cost model
    assert s["agreement"] < 0.05, s                                      # predicted vs link stage-1 ratio
    assert s["fenced_calls"] == {"ours_records": 12, "ds_records": 8, "flat_records": 2}
    assert s["step_s"]["ours"] > 0 and s["step_s"]["deepspeed"] > 0 and s["a2a_s"]["deepspeed"] > 0
