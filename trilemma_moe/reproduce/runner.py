"""Run a preset's training runs, each a ``python -m trilemma_moe.train`` subprocess on one thread,
``jobs`` at a time, and skip the ones already done, so an interrupted preset picks up where it
stopped.

A run is done when its summary JSON exists, parses, and its ``.cmd.json`` sidecar holds the same
command line (a changed recipe reruns). The trainer writes the summary last and atomically, so a
run killed midway leaves none and is rerun. Each run's output goes to ``<run>.log``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, List, Optional

from .presets import Preset, Variant


@dataclass
class Run:
    task: str
    variant: Variant
    seed: int
    argv: List[str]      # the trainer's flags
    base: str            # every file of the run is this path plus a suffix

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant.name}/seed{self.seed}"

    @property
    def summary(self) -> str:   # the trainer's summary JSON
        return self.base + ".json"

    @property
    def sidecar(self) -> str:   # the command line it ran, and its wall time
        return self.base + ".cmd.json"

    @property
    def routing(self) -> str:   # its recorded routing (torch file, not in git)
        return self.base + ".routing.pt"

    @property
    def a2a(self) -> str:       # the all-to-all bytes that routing gives
        return self.base + ".a2a.json"

    @property
    def log(self) -> str:
        return self.base + ".log"

    def wall_s(self) -> float:
        with open(self.sidecar) as f:
            return float(json.load(f).get("wall_s", 0.0))

    def command(self) -> List[str]:
        return [sys.executable, "-m", "trilemma_moe.train", *self.argv]

    def done(self) -> bool:
        try:
            with open(self.summary) as f:
                json.load(f)
            with open(self.sidecar) as f:
                return json.load(f)["argv"] == self.argv
        except (OSError, ValueError, KeyError):
            return False


def available(v: Variant) -> bool:
    return not v.needs or importlib.util.find_spec(v.needs) is not None


def plan(preset: Preset, out_dir: str, data_root: str, tasks: Optional[List[str]] = None,
         variants: Optional[List[str]] = None) -> List[Run]:
    runs = []
    for task, v, seed in preset.runs():
        if (tasks and task not in tasks) or (variants and v.name not in variants) or not available(v):
            continue
        run = Run(task, v, seed, [], os.path.join(out_dir, "runs", task, v.name, f"seed{seed}"))
        run.argv = [a.replace("{data}", data_root) for a in preset.tasks[task]]
        run.argv += ["--ffn", v.ffn, *v.flags, "--seed", str(seed), "--threads", "1", "--no-progress",
                     "--measure-memory", "--summary-json", run.summary, "--record-routing", run.routing]
        runs.append(run)
    return runs


def execute(run: Run) -> Dict[str, object]:
    """One run; raises with the log's tail when the trainer fails."""
    os.makedirs(os.path.dirname(run.summary), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    t0 = time.perf_counter()
    with open(run.log, "w") as log:
        rc = subprocess.run(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        with open(run.log) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"run {run.name} failed (exit {rc}); the end of {run.log}:\n{tail}")
    tmp = run.sidecar + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"argv": run.argv, "wall_s": seconds}, f, indent=1)
    os.replace(tmp, run.sidecar)
    return {"run": run.name, "wall_s": seconds}


def run_all(runs: List[Run], jobs: int = 1, progress: bool = True, sequential=()) -> List[str]:
    """Runs the runs not yet done, ``jobs`` at a time, then those of the ``sequential`` tasks one
    at a time; returns the names of those that failed (the others finish)."""
    todo = [r for r in runs if not r.done()]
    if len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already done (skipped)")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="reproduce", unit="run", dynamic_ncols=True)
    failed: List[str] = []
    for batch, width in (([r for r in todo if r.task not in sequential], jobs),
                         ([r for r in todo if r.task in sequential], 1)):
        with ThreadPoolExecutor(max_workers=max(1, width)) as pool:
            futures = {pool.submit(execute, r): r for r in batch}
            for fut in as_completed(futures):
                r = futures[fut]
                try:
                    res = fut.result()
                    msg = f"done {r.name} in {res['wall_s']:.0f} s"
                except RuntimeError as exc:
                    failed.append(r.name)
                    msg = str(exc)
                if bar is not None:
                    bar.write(msg)
                    bar.update(1)
                else:
                    print(msg)
    if bar is not None:
        bar.close()
    return failed
