"""Figures for docs/RESULTS.md (matplotlib, Agg): validation perplexity / accuracy vs step, per-expert
load over time, group membership over time, parameters vs quality."""
from __future__ import annotations

import os
from typing import Any, Dict, List

ORDER = ("dense", "switch", "deepspeed", "static", "dynamic", "int4", "random-groups", "full-experts", "flat-routing")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _by(records, task, variant=None, seed=None):
    return [r for r in records if r["task"] == task and (variant is None or r["variant"] == variant)
            and (seed is None or r["seed"] == seed)]


def curves(records: List[Dict[str, Any]], task: str, key: str, ylabel: str, path: str, logy: bool = False) -> bool:
    """One line per variant: the mean over seeds of ``history[key]`` vs step, min-max shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = False
    for v in ORDER:
        runs = [r for r in _by(records, task, v) if any(key in h for h in r["history"])]
        if not runs:
            continue
        by_step: Dict[int, List[float]] = {}   # step -> the runs' values there
        for r in runs:
            for h in r["history"]:
                if key in h:
                    by_step.setdefault(h["step"], []).append(h[key])
        keep = sorted(by_step.items())
        xs = [s for s, _ in keep]
        mean = [sum(v_) / len(v_) for _, v_ in keep]
        line, = ax.plot(xs, mean, label=f"{v} (n={len(runs)})", lw=2 if v in ("static", "dynamic", "switch") else 1.2)
        if len(runs) > 1:
            ax.fill_between(xs, [min(v_) for _, v_ in keep], [max(v_) for _, v_ in keep], color=line.get_color(), alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(plt, fig, path)


def expert_load(records: List[Dict[str, Any]], task: str, variants: List[str], path: str) -> bool:
    """Heatmaps: share of layer 0's (token, expert) assignments per expert id over time."""
    plt = _plt()
    runs = [r for v in variants for r in _by(records, task, v, 0) if r["load_history"]]
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        steps = [h["step"] for h in r["load_history"]]
        counts = [h["counts"][0] for h in r["load_history"]]
        shares = [[c / max(1, sum(row)) for c in row] for row in counts]
        mat = list(map(list, zip(*shares)))      # expert x time
        im = ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                       extent=(steps[0], steps[-1], -0.5, len(mat) - 0.5))
        ax.set_title(f"{r['variant']} (seed 0), layer 0", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("expert id")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of assignments")
    return _save(plt, fig, path)


def group_membership(records: List[Dict[str, Any]], task: str, variants: List[str], path: str) -> bool:
    """Which group each expert sat in after each clustering (columns: the step it happened)."""
    plt = _plt()
    panels = []
    for v in variants:
        for r in _by(records, task, v, 0):
            for layer in sorted({g["layer"] for g in r["group_history"]}):
                events = [g for g in r["group_history"] if g["layer"] == layer]
                if events:
                    panels.append((f"{v} (seed 0), layer {layer}", events, r["num_groups"]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.2), squeeze=False)
    for ax, (title, events, G) in zip(axes[0], panels):
        mat = list(map(list, zip(*[e["group_of_expert"] for e in events])))   # expert x event
        ax.imshow(mat, aspect="auto", cmap="tab10" if G <= 10 else "tab20", vmin=0, vmax=max(G - 1, 1),
                  interpolation="nearest")
        ax.set_xticks(range(len(events)))
        ax.set_xticklabels([f"{e['step']}" + ("" if e["clustered"] else "\n(init)") for e in events], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step of the clustering / regroup")
        ax.set_ylabel("expert id (colour: group)")
    return _save(plt, fig, path)


def params_vs_quality(agg: Dict[str, Dict[str, Dict[str, Any]]], path: str) -> bool:
    plt = _plt()
    panels = [(t, k, lab) for t, k, lab in (("lm", "valid_ppl", "WikiText-2 valid PPL (lower is better)"),
                                            ("sst2", "dev_accuracy", "SST-2 held-out accuracy"))
              if t in agg]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (task, key, label) in zip(axes[0], panels):
        points = {}   # variants with the same numbers (ours and static when no regroup moved an expert) share a label
        for v in ORDER:
            a = agg[task].get(v)
            if not a or key not in a or "total_params" not in a:
                continue
            x, y = a["total_params"]["mean"], a[key]["mean"]
            err = a[key]["std"] if a[key]["n"] > 1 else None
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
            points.setdefault((round(x), round(y, 9)), []).append(v)
        for (x, y), names in points.items():
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("total parameters at the end of training (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


SHIFT_ORDER = ("static", "dynamic", "drift-trigger", "probe-free", "paper-regroup", "switch")


def shift_curves(records: List[Dict[str, Any]], task: str, path: str) -> bool:
    """Both corpora's validation perplexity vs step, one line per rule (mean over seeds), the shift
    (and the end of its ramp) marked."""
    runs = _by(records, task)
    if not runs or all(r.get("shift_step") is None for r in runs):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for ax, key, title in zip(axes[0], ("valid_ppl", "shift_valid_ppl"), ("first corpus", "second corpus")):
        for v in SHIFT_ORDER:
            by_step: Dict[int, List[float]] = {}
            for r in _by(records, task, v):
                for h in r["history"]:
                    if key in h:
                        by_step.setdefault(h["step"], []).append(h[key])
            if by_step:
                xs = sorted(by_step)
                ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], label=v,
                        lw=2 if v in ("static", "dynamic", "drift-trigger") else 1.2, ls="--" if v == "static" else "-")
        shift = next(r["shift_step"] for r in runs if r.get("shift_step") is not None)
        ramp = next((r.get("shift_ramp") or 0 for r in runs if r.get("shift_step") is not None), 0)
        ax.axvline(shift, color="k", lw=0.8)
        if ramp:
            ax.axvline(shift + ramp, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"{task}: {title} valid PPL (mean over seeds)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def make_all(records, agg, fig_dir: str) -> Dict[str, str]:
    """Every figure that has data; returns {name: path}."""
    os.makedirs(fig_dir, exist_ok=True)
    made = {}
    jobs = {
        "ppl_vs_step": lambda p: curves(records, "lm", "valid_ppl", "WikiText-2 valid PPL (subset)", p, logy=True),
        "sst2_accuracy_vs_step": lambda p: curves(records, "sst2", "dev_accuracy", "SST-2 held-out accuracy", p),
        "expert_load": lambda p: expert_load(records, "lm", ["switch", "static", "dynamic"], p),
        "group_membership": lambda p: group_membership(records, "lm", ["dynamic"], p),
        "params_vs_quality": lambda p: params_vs_quality(agg, p),
    }
    for task in sorted({r["task"] for r in records if r.get("shift_step") is not None}):   # the shift preset
        jobs[f"shift_{task}_valid_ppl"] = lambda p, t=task: shift_curves(records, t, p)
        jobs[f"shift_{task}_expert_load"] = lambda p, t=task: expert_load(records, t, ["static", "dynamic", "drift-trigger"], p)
    for name, fn in jobs.items():
        path = os.path.join(fig_dir, f"{name}.png")
        if fn(path):
            made[name] = path
    return made
