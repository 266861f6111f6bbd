"""From the runs' summary JSON files to the numbers of the tables: one record per run, then
mean and sample standard deviation over seeds per (task, variant).

All-to-all bytes come from each run's recorded routing (the last 20 training steps) replayed by
the cost model of ``trilemma-moe profile-comm`` (``parallel.cost.simulate``) on one node of 8
GPUs with expert parallelism 8, bf16 activations: ours sends each (token, chosen group) pair to
the group's owner, Switch / flat top-k one copy per (token, chosen expert) to the expert's owner.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

import torch

from ..parallel.cost import simulate
from .runner import Run

EP_SIZE, TOKENS_PER_GPU, ELEM_BYTES = 8, 4096, 2
# metrics averaged over seeds (a missing one stays missing)
METRICS = ("valid_ppl", "test_ppl", "dev_accuracy", "total_params", "expert_params", "tokens_per_s",
           "peak_memory_bytes", "load_cv", "a2a_bytes_per_token", "regroup_share", "regroups_applied",
           "experts_moved", "train_time_s",
           # a distribution shift (the shift preset): the trainer's shift summary keys
           "pre_shift_valid_ppl", "post_shift_valid_ppl", "first_corpus_valid_ppl_end", "post_shift_train_loss",
           "post_shift_load_cv")
AFTER_REGROUP_STEPS = 20   # a regroup's effect: the training loss over the next 20 steps against static's
# the shift preset's comparison: each rule minus static clustering, paired by seed
SHIFT_METRICS = ("post_shift_valid_ppl", "first_corpus_valid_ppl_end", "post_shift_train_loss", "post_shift_load_cv")
# two-sided 95 % quantiles of Student's t, t(0.975; df) (scipy.stats.t.ppf, tabulated: scipy is not a
# dependency); a df between rows takes the next smaller row's value, which is wider (conservative)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


SERIES = ("history", "load_history", "group_history", "loss_curve")   # per-step series a record carries for the figures


def cached_a2a_bytes_per_token(run: Run, flat: bool) -> Optional[float]:
    """``a2a_bytes_per_token`` of the run's routing, kept beside the run as ``<run>.a2a.json``
    (the routing files are large and stay out of the repository; the number they gave stays
    traceable)."""
    if os.path.exists(run.routing):
        value = a2a_bytes_per_token(run.routing, flat)
        with open(run.a2a + ".tmp", "w") as f:
            json.dump({"a2a_bytes_per_token": value, "ep_size": EP_SIZE, "tokens_per_gpu": TOKENS_PER_GPU,
                       "bytes_per_element": ELEM_BYTES, "model": "flat top-k" if flat else "ours (groups)",
                       "from": os.path.basename(run.routing)}, f, indent=1)
        os.replace(run.a2a + ".tmp", run.a2a)
        return value
    if os.path.exists(run.a2a):
        with open(run.a2a) as f:
            return json.load(f)["a2a_bytes_per_token"]
    return None


def a2a_bytes_per_token(routing_path: str, flat: bool) -> Optional[float]:
    """Forward dispatch + return bytes per token and MoE layer at ep_size 8 (mean over layers)."""
    rec = torch.load(routing_path, weights_only=True)
    E, G, d = int(rec["num_experts"]), int(rec["num_groups"]), int(rec["hidden_size"])
    per_layer = []
    for i, lay in enumerate(rec["layers"]):
        sim = simulate(lay["group_idx"], lay["expert_idx"], G, E, nodes=1, gpus_per_node=EP_SIZE,
                       ep_size=EP_SIZE, tokens_per_gpu=TOKENS_PER_GPU, d=d, elem=ELEM_BYTES, seed=i)
        key = "flat" if flat else "ours"
        per_layer.append((sim[f"{key}_intra_bytes"] + sim[f"{key}_inter_bytes"]) / sim["tokens"])
    return sum(per_layer) / len(per_layer) if per_layer else None


def record(run: Run) -> Dict[str, Any]:
    with open(run.summary) as f:
        s = json.load(f)
    out: Dict[str, Any] = {"task": run.task, "variant": run.variant.name, "seed": run.seed,
                           "summary": run.summary, "ffn": s["ffn"]}
    for key in METRICS:
        if key in s:
            out[key] = s[key]
    # (summaries written before 2026-11-30's regroup rules call it regroup_time_s)
    seconds = s.get("regroup_seconds", s.get("regroup_time_s", 0.0))
    out["regroup_share"] = seconds / max(s["train_time_s"], 1e-9)
    if run.task == "speed":   # after the first clustering, no first-step costs
        out["tokens_per_s"] = s["tokens_per_s_second_half"]
    if run.task == "lm":
        if s["ffn"] == "dense":
            out["a2a_bytes_per_token"] = 0.0       # no experts, no all-to-all
        elif s["ffn"] != "deepspeed":
            out["a2a_bytes_per_token"] = cached_a2a_bytes_per_token(run, flat=s["ffn"] == "switch")
    out["history"] = s.get("history", [])
    out["load_history"] = s.get("load_history", [])
    out["group_history"] = s.get("group_history", [])
    out["loss_curve"] = s.get("loss_curve", [])
    out["regroup_events"] = s.get("regroup_events", [])
    out["num_groups"] = s["config"]["num_groups"]
    if "shift_step" in s:
        out["shift_step"], out["shift_ramp"] = s["shift_step"], s.get("shift_ramp", 0)
    return out


def t975(df: int) -> float:
    """t(0.975; df): scipy's when it is installed, else the table's."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:
        return T975[max(k for k in T975 if k <= df)]


def paired_differences(records: List[Dict[str, Any]], task: str, variant: str, key: str,
                       base: str = "static") -> Optional[Dict[str, Any]]:
    """``key`` of ``variant`` minus ``base``'s, per seed both ran (same data, same first grouping),
    with the mean and its 95 % t-interval over seeds (NaN bounds below two seeds); None without a pair."""
    def by_seed(v):
        return {r["seed"]: float(r[key]) for r in records if r["task"] == task and r["variant"] == v
                and r.get(key) is not None}
    ours, theirs = by_seed(variant), by_seed(base)
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    diffs = [ours[s] - theirs[s] for s in seeds]
    m = mean_std(diffs)
    half = t975(len(diffs) - 1) * m["std"] / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"seeds": seeds, "diffs": diffs, "mean": m["mean"], "std": m["std"], "n": len(diffs),
            "low": m["mean"] - half, "high": m["mean"] + half}


def mean_std(values: List[float]) -> Dict[str, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": m, "std": sd, "n": n}


def aggregate(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """``{task: {variant: {metric: {mean, std, n}}}}``."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["task"], {}).setdefault(r["variant"], {"_runs": []})["_runs"].append(r)
    for task in out.values():
        for variant, agg in task.items():
            runs = agg.pop("_runs")
            for key in METRICS:
                vals = [r[key] for r in runs if r.get(key) is not None]
                if vals:
                    agg[key] = mean_std([float(v) for v in vals])
            agg["seeds"] = sorted(r["seed"] for r in runs)
    return out


def regroup_effects(records: List[Dict[str, Any]], base: str = "static") -> List[Dict[str, Any]]:
    """One row per regroup after the first clustering that moved experts (all layers of a run that
    regrouped at one step together): experts moved, the movers' relative reconstruction error, and
    the mean training loss over the next ``AFTER_REGROUP_STEPS`` steps minus the static run's of the
    same task and seed over the same steps. Static shares the data and, up to the first such
    regroup, every weight: for a run's first regroup this is the loss against the run without it;
    for later ones, against the run without any regroup so far."""
    statics = {(r["task"], r["seed"]): r["loss_curve"] for r in records if r["variant"] == base}
    rows = []
    for r in records:
        ref = statics.get((r["task"], r["seed"]))
        by_step: Dict[int, List[Dict[str, Any]]] = {}
        for e in r.get("regroup_events", []):
            by_step.setdefault(int(e["step"]), []).append(e)
        for i, (step, events) in enumerate(sorted(by_step.items())):
            moved = sum(e["moved"] for e in events)
            row = {"task": r["task"], "variant": r["variant"], "seed": r["seed"], "step": step, "nth": i,
                   "moved": moved, "movers_error": sum(e["movers_error"] * e["moved"] for e in events) / moved}
            # loss_curve[j] is step j + 1's loss; the regroup ran at the first forward of step + 1
            window = slice(step, step + AFTER_REGROUP_STEPS)
            if ref is not None and len(r["loss_curve"]) >= window.stop and len(ref) >= window.stop:
                ours, theirs = r["loss_curve"][window], ref[window]
                row["loss_delta"] = (sum(ours) - sum(theirs)) / AFTER_REGROUP_STEPS
            rows.append(row)
    return rows
