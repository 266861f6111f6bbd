"""Capacity: the largest MoE (more experts at a fixed d, d_ff and layer count) that trains 3
optimizer steps on this machine, found by bisection over the expert count, for DeepSpeed's MoE at
its best setting and for ours under ZeRO-Infinity.

    PYTHONPATH=. python benchmarks/capacity.py --out docs/results/capacity.json

Each trial is the main job under the ``deepspeed`` launcher, one rank (the machine is the budget,
not a rank), two MoE blocks, d=512, d_ff=2048, r=16, top-2, groups of 4 experts (G = E/4), 2,048
tokens per step, on the generated corpus. Trials run in a memory cgroup (v1 or v2) whose limit is
what the machine had available when the search started, less ``--headroom-gib``, so that an
out-of-memory kill ends the trial and not this machine's other processes. A trial fits when the
job exits 0 after its steps; it does not fit when the cgroup's OOM killer ended it or the NVMe
directory's disk filled up ("No space left on device"); any other failure stops the search with
the end of the log. The search doubles the expert count from ``--start`` until a trial fails,
then bisects until the failing count is within ``--resolution`` (a fraction) of the fitting one.

Per trial: the total parameters, the fp32 optimizer state (master weights and both Adam moments,
12 bytes per parameter) as a multiple of the machine's RAM, the peak of the cgroup's memory (the
processes' resident memory and the page cache they caused) and the rank's ``ru_maxrss``, the peak
size of the NVMe directory (sampled every second), seconds per step (training time / steps; the
first step included), and the seconds the whole trial took.

Settings (``--setting``, one or more):
- ``deepspeed-zero0`` / ``deepspeed-zero2``: DeepSpeed's MoE (ep_size 1, dropless top-2), fp32,
  torch AdamW, without ZeRO and at ZeRO-2. With one rank there is nothing to partition, and CPU
  optimizer offload moves state within the same RAM, so these are its candidates for best.
- ``ours-infinity``: ours with ``burn_in_form: compressed`` at ZeRO-Infinity, bf16 (as Infinity
  runs on these CPUs), parameters and optimizer state on NVMe (a directory on this machine's disk).
  The parameter swap buffers are sized to the largest partition (one stacked base tensor per
  weight matrix: G x d x d_ff elements) and ``--buffer-count`` of them.
The first clustering is placed after ``--burn-in`` steps (default 100: not within the 3 steps;
``--burn-in 2`` puts a regroup inside them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from tqdm import tqdm

from train_memory import _disk_bytes, ds_config, main_job_command   # benchmarks/ is on sys.path as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB, MIB = 1 << 30, 1 << 20
SETTINGS = ("deepspeed-zero0", "deepspeed-zero2", "ours-infinity")


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class MemoryCgroup:
    """A cgroup with a memory limit for one trial's processes (cgroup v2 or v1's memory
    controller); its peak usage and whether its OOM killer fired."""

    def __init__(self, limit_bytes: int, name: str):
        v2 = "/sys/fs/cgroup/cgroup.controllers"
        if os.path.exists(v2) and "memory" in open(v2).read().split():
            self.v2, self.path = True, os.path.join("/sys/fs/cgroup", name)
        elif os.path.isdir("/sys/fs/cgroup/memory"):
            self.v2, self.path = False, os.path.join("/sys/fs/cgroup/memory", name)
        else:
            raise SystemExit("capacity.py needs a memory cgroup (v2, or v1's memory controller) it can create")
        os.makedirs(self.path, exist_ok=True)
        self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit_bytes))
        if not self.v2:
            self._write("memory.max_usage_in_bytes", "0")   # reset the peak of a reused cgroup
        self.oom_before = self.oom_kills()

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int(self._read(name)) if os.path.exists(os.path.join(self.path, name)) else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        fields = dict(line.split() for line in text.splitlines() if line.strip())
        return int(fields.get("oom_kill", 0))

    def oom_killed(self) -> bool:
        return self.oom_kills() > self.oom_before

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def trial_config(args, setting: str, num_experts: int, nvme_dir: str) -> dict:
    """train_memory.py's DeepSpeed config of the setting, at this expert count."""
    shape = argparse.Namespace(**vars(args), num_experts=num_experts, num_groups=num_experts // args.group_size,
                               top_k=2)
    if setting.startswith("deepspeed-zero"):
        return ds_config(shape, int(setting[-1]), None, None)
    cfg = ds_config(shape, 3, "nvme", "compressed", "nvme", bf16=True, nvme_dir=nvme_dir)
    zero = cfg["zero_optimization"]
    zero["stage3_param_persistence_threshold"] = 0   # every parameter partitioned, so swappable
    zero["sub_group_size"] = args.sub_group_size
    # the largest partition is one stacked base tensor (G x d x d_ff); one rank holds it whole
    zero["offload_param"].update(buffer_count=args.buffer_count,
                                 buffer_size=shape.num_groups * args.d_model * args.d_ff)
    return cfg


def run_trial(args, setting: str, num_experts: int, workdir: str, limit_bytes: int) -> dict:
    name = f"{setting}-E{num_experts}"
    nvme_dir = os.path.join(args.nvme_root or workdir, f"{name}.nvme")
    os.makedirs(nvme_dir, exist_ok=True)
    path, summary, log = (os.path.join(workdir, f"{name}.{ext}") for ext in ("ds.json", "summary.json", "log"))
    with open(path, "w") as f:
        json.dump(trial_config(args, setting, num_experts, nvme_dir), f)
    ffn = "deepspeed" if setting.startswith("deepspeed") else "ours"
    cmd = main_job_command(args, ffn, args.d_ff, 1, path, summary)
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1), DS_ACCELERATOR="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cgroup = MemoryCgroup(limit_bytes, f"trilemma_capacity_{os.getpid()}")
    peak_disk, running = [0], [True]

    def watch_disk():
        while running[0]:
            peak_disk[0] = max(peak_disk[0], _disk_bytes(nvme_dir))
            time.sleep(1.0)

    t0 = time.time()
    with open(log, "w") as f:
        # the child joins the cgroup before it execs, so every process it starts is limited too
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: cgroup.add(os.getpid()), start_new_session=True)
        watcher = threading.Thread(target=watch_disk, daemon=True)
        watcher.start()
        try:
            rc = proc.wait(timeout=args.trial_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            raise RuntimeError(f"{name} ran past --trial-timeout {args.trial_timeout} s; see {log}")
        finally:
            running[0] = False
            watcher.join()
            try:   # the launcher's children, if the rank was killed under it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    seconds = time.time() - t0
    with open(log, errors="replace") as f:
        text = f.read()
    oom, no_space, peak = cgroup.oom_killed(), "No space left on device" in text, cgroup.peak()
    result = {"setting": setting, "num_experts": num_experts, "num_groups": num_experts // args.group_size,
              "exit_code": rc, "oom_killed": oom, "disk_full": no_space, "trial_seconds": round(seconds, 1),
              "cgroup_peak_mib": round(peak / MIB) if peak is not None else None,
              "nvme_peak_mib": round(peak_disk[0] / MIB), "command": " ".join(cmd[1:])}
    cgroup.remove()
    shutil.rmtree(nvme_dir, ignore_errors=True)
    if rc == 0 and os.path.exists(summary):
        with open(summary) as f:
            s = json.load(f)
        params = s["total_params"]
        result.update(fits=True, total_params=params, fp32_optimizer_state_gib=round(12 * params / GIB, 2),
                      fp32_optimizer_state_x_ram=round(12 * params / _meminfo("MemTotal"), 2),
                      peak_rss_mib=round(max(s["peak_rss_bytes_per_rank"]) / MIB),
                      seconds_per_step=round(s["train_time_s"] / args.steps, 1))
        return result
    if oom or no_space:
        result["fits"] = False
        return result
    raise RuntimeError(f"{name} failed (exit {rc}) without an OOM kill or a full disk; the end of {log}:\n"
                       + "\n".join(text.splitlines()[-30:]))


def search(args, setting: str, workdir: str, limit_bytes: int, on_trial) -> dict:
    """Doubling from --start until a trial fails, then bisection to --resolution experts;
    ``on_trial(trials)`` after every trial."""
    good, bad, trials = None, None, []
    start = args.start[0] if len(args.start) == 1 else args.start[args.setting.index(setting)]
    e = start
    bar = tqdm(desc=setting, unit="trial")
    while bad is None or (good is not None and bad - good > args.resolution * good):
        if bad is None:
            e = e if good is None else min(2 * good, args.max_experts)
        else:
            lo = good or 0
            e = (lo + bad) // 2 // args.group_size * args.group_size
            if e <= lo:
                break
        r = run_trial(args, setting, e, workdir, limit_bytes)
        trials.append(r)
        on_trial(trials)
        bar.update()
        bar.set_postfix(E=e, fits=r["fits"])
        if r["fits"]:
            good = e
            if e >= args.max_experts:
                break
        else:
            bad = e
            if good is None and e == start:
                break
    bar.close()
    best = next((t for t in trials if t["fits"] and t["num_experts"] == good), None)
    return {"largest_fitting": best, "smallest_failing": bad, "trials": trials}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4, help="experts per group (G = E / this)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--burn-in", type=int, default=100)
    p.add_argument("--start", type=int, nargs="+", default=[64],
                   help="the first expert count tried (one, or one per --setting)")
    p.add_argument("--resolution", type=float, default=0.08,
                   help="stop when the failing count is within this fraction above the fitting one")
    p.add_argument("--max-experts", type=int, default=1 << 16)
    p.add_argument("--buffer-count", type=int, default=16,
                   help="ours: parameter swap buffers (each of the largest partition's size)")
    p.add_argument("--sub-group-size", type=int, default=2 * 10 ** 7,
                   help="ours: optimizer state swapped in sub-groups of this many elements")
    p.add_argument("--headroom-gib", type=float, default=1.0,
                   help="the trials' memory limit: MemAvailable at the start less this")
    p.add_argument("--nvme-root", default=None, help="directory for the NVMe swap files (default: a temporary one)")
    p.add_argument("--trial-timeout", type=int, default=3600)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if len(args.start) not in (1, len(args.setting)):
        p.error("--start: give one expert count, or one per --setting")
    limit = _meminfo("MemAvailable") - int(args.headroom_gib * GIB)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "ram_mib": _meminfo("MemTotal") // MIB, "memory_limit_mib": limit // MIB,
            "disk_free_mib": shutil.disk_usage(args.nvme_root or tempfile.gettempdir()).free // MIB,
            "command": "python benchmarks/capacity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    results = {}

    def save():
        if args.out:   # after every trial: a failure later keeps what ran
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "args": vars(args), "results": results}, f, indent=1)
            os.replace(tmp, args.out)

    with tempfile.TemporaryDirectory() as workdir:
        for setting in args.setting:
            def on_trial(trials, setting=setting):
                results[setting] = {"trials": trials}
                save()
            results[setting] = search(args, setting, workdir, limit, on_trial)
            save()
    for setting, r in results.items():
        b = r["largest_fitting"]
        print(f"{setting}: largest E that trains {args.steps} steps: {b['num_experts']} (fails at "
              f"{r['smallest_failing']}); {b['total_params']:,} parameters" if b else f"{setting}: nothing fit")

if __name__ == "__main__":
    main()
