"""What the main job reports: TensorBoard scalars, the MoE statistics of every step, the start
lines, the clustering event lines, the summary dict and table, and the expert-parallel / routing /
offload extras.

Clustering is reported in three counts, derived from each clustered layer's ``stats()``
(``reclusters`` = its first clustering + the regroups applied after it, ``skipped_reclusters`` =
regroup checks skipped because the similarity gain was below delta, ``compressed``):
``first_clusterings`` (layers that ran their first clustering and compression),
``regroups_applied`` and ``skipped_reclusters``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..config import TrilemmaMoEConfig
from ..core.layer import clustered_layers
from ..models import OURS_VARIANTS, variant_config


class Logger:
    """TensorBoard event files under ``logdir`` (nothing without one)."""

    def __init__(self, logdir: Optional[str]):
        self.writer = None
        if logdir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover
                raise ImportError("--logdir needs tensorboard: pip install tensorboard") from exc
            self.writer = SummaryWriter(log_dir=logdir)

    def scalars(self, step: int, values: Dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


# --- MoE statistics ------------------------------------------------------------------------
def layer_stats(model) -> List[Dict[str, Any]]:
    """``stats()`` of every MoE layer: the clustered layers' own, else the baseline MoE blocks'."""
    layers = clustered_layers(model)
    return [m.stats() for m in (layers or model.moe_layers())]


def moe_stats(stats: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One step's statistics over the layers: mean load CV, clustering counts summed."""
    if not stats:
        return {"load_cv": 0.0, "reclusters": 0}
    out: Dict[str, Any] = {"load_cv": sum(float(s.get("load_cv", 0.0)) for s in stats) / len(stats),
                           "reclusters": int(sum(int(s.get("reclusters", 0)) for s in stats))}
    for key in ("group_load_cv", "compression_ratio", "skipped_reclusters"):
        vals = [float(s[key]) for s in stats if key in s]
        if vals:
            out[key] = sum(vals) / len(vals) if key != "skipped_reclusters" else int(sum(vals))
    for key in ("experts_moved", "regroup_seconds"):   # over the layers: summed
        if any(key in s for s in stats):
            out[key] = sum(s.get(key, 0) for s in stats)
    clustered = [s for s in stats if "compressed" in s]
    out["compressed"] = all(bool(s["compressed"]) for s in stats) if clustered else False
    if clustered:
        out["first_clusterings"] = sum(1 for s in clustered if s.get("clustered", s["compressed"]))
        out["regroups_applied"] = out["reclusters"] - out["first_clusterings"]
    return out


def _mean_of(stats: List[Dict[str, Any]], key: str) -> Optional[float]:
    vals = [s[key] for s in stats if key in s]
    return sum(vals) / len(vals) if vals else None


class ClusteringEvents:
    """Lines for the first clustering, applied regroups and skipped regroup checks of a step."""

    def __init__(self, st: Dict[str, Any], num_layers: int, delta: float, burn_in_form: str = "full"):
        self.num_layers, self.delta = num_layers, delta
        self.compresses = burn_in_form == "full"   # else the layers were compressed from the start
        self.first = st.get("first_clusterings", 0)
        self.regroups = st.get("regroups_applied", 0)
        self.skipped = st.get("skipped_reclusters", 0)

    def lines(self, step: int, st: Dict[str, Any], stats: List[Dict[str, Any]],
              expert_params: Callable[[], int]) -> List[str]:
        """``expert_params()`` is called only when a clustering happened."""
        out = []
        extra = ""
        gain, err = _mean_of(stats, "last_gain"), _mean_of(stats, "reconstruction_error")
        if gain is not None:
            extra += f" gain={gain:.4f}"
        if err is not None:
            extra += f" recon_err={err:.3f}"
        if "compression_ratio" in st:
            extra += f" compression={st['compression_ratio']:.2f}x"
        first, regroups = st.get("first_clusterings", 0), st.get("regroups_applied", 0)
        if first != self.first:
            out.append(f"[step {step}] first clustering{' + compression' if st.get('compressed') and self.compresses else ''} in {first - self.first} layer(s) "
                       f"({first} of {self.num_layers} clustered):{extra} | expert params now {expert_params():,}")
        if regroups != self.regroups:
            out.append(f"[step {step}] regroup applied in {regroups - self.regroups} layer(s) "
                       f"({regroups} so far):{extra} | expert params now {expert_params():,}")
        skipped = st.get("skipped_reclusters", 0)
        if skipped != self.skipped:
            gains = ", ".join(f"{s['last_gain']:.4f}" for s in stats if s.get("last_gain") is not None)
            out.append(f"[step {step}] regroup check skipped in {skipped - self.skipped} layer(s): similarity "
                       f"gain < delta={self.delta} (last gain per layer: {gains})")
        self.first, self.regroups, self.skipped = first, regroups, skipped
        return out


def bar_postfix(ema_loss: float, st: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    post: Dict[str, Any] = {"loss": f"{ema_loss:.3f}", "cv": f"{st['load_cv']:.2f}"}
    if "first_clusterings" in st:
        post.update(clustered=f"{st['first_clusterings']}/{num_layers}", regroups=st["regroups_applied"],
                    skipped=st.get("skipped_reclusters", 0))
    return post


# --- per-step record -----------------------------------------------------------------------
@dataclass
class Record:
    """Every optimizer step's loss and timing, and the windows the summary averages over."""

    loss_curve: List[float] = field(default_factory=list)   # global batch, every step
    loss_window: List[float] = field(default_factory=list)  # last 20 steps
    cv_window: List[float] = field(default_factory=list)    # last 50 steps
    step_times: List[float] = field(default_factory=list)
    history: List[Dict[str, float]] = field(default_factory=list)
    train_time: float = 0.0
    tokens_seen: int = 0
    ema_loss: Optional[float] = None
    last_loss: float = float("nan")

    def add(self, loss: float, seconds: float, tokens: int, load_cv: float) -> None:
        self.step_times.append(seconds)
        self.train_time += seconds
        self.tokens_seen += tokens
        self.last_loss = loss
        self.loss_curve.append(loss)
        self.loss_window = (self.loss_window + [loss])[-20:]
        self.ema_loss = loss if self.ema_loss is None else 0.95 * self.ema_loss + 0.05 * loss
        self.cv_window = (self.cv_window + [load_cv])[-50:]


# --- start lines, summary, table ------------------------------------------------------------
def start_lines(args, cfg: TrilemmaMoEConfig, corpus, param_counts: Dict[str, int], backend,
                warmup: int, task_defaults: Optional[Dict[str, Any]] = None) -> List[str]:
    pc = param_counts
    clustered = args.ffn in OURS_VARIANTS
    lines = [f"task: {args.task}" + (" (sentence classification: bidirectional attention, mean-pooled "
                                      "non-pad tokens, pads kept out of the FFNs)" if args.task == "sst2" else "")
             + (" | task defaults: " + " ".join(f"{k.replace('_', '-')}={v:g}" for k, v in task_defaults.items())
                if task_defaults else ""),
             corpus.describe(),
             f"model: d_model={args.d_model} d_ff={args.d_ff} layers={args.layers} heads={args.heads} "
             f"seq_len={args.seq_len} ffn={args.ffn} | params {pc['total']:,} (experts {pc['expert']:,})"
             + ((" before compression: full experts until the first clustering" if cfg.burn_in_form == "full"
                 else " (burn-in on the compressed form: no full experts)") if clustered else "")]
    if clustered:
        run_cfg = variant_config(cfg, args.ffn)   # what the layers run: the variant's knobs set
        lines.append(f"moe: E={cfg.num_experts} G={cfg.num_groups} r={cfg.rank} k={cfg.top_k} "
                     f"burn_in={cfg.burn_in} ({cfg.burn_in_form}) recluster_interval={cfg.recluster_interval} "
                     f"dynamic_regroup={run_cfg.dynamic_regroup}"
                     + (f" regroup_trigger=drift (threshold {run_cfg.drift_threshold:g}, every {run_cfg.drift_every} "
                        f"steps)" if run_cfg.regroup_trigger == "drift" else "")
                     + "".join(f" {k}={getattr(run_cfg, k)}" for k in OURS_VARIANTS[args.ffn] if k != "dynamic_regroup"))
        if args.steps <= cfg.burn_in:
            lines.append(f"note: the run ends at step {args.steps}, before the burn-in ({cfg.burn_in} steps) "
                         f"does: no clustering, no compression (compression ratio stays 1); use --steps "
                         f"> {cfg.burn_in} or --burn-in < {args.steps}")
        default_seed = TrilemmaMoEConfig.__dataclass_fields__["seed"].default
        if cfg.seed not in (default_seed, args.seed):
            lines.append(f"note: the MoE layers take --seed {args.seed}, not seed {cfg.seed} of the config")
    elif args.ffn != "dense":
        lines.append(f"moe: E={cfg.num_experts} k={cfg.top_k} aux_loss_coef={cfg.aux_loss_coef} "
                     f"z_loss_coef={cfg.z_loss_coef} (dropless)")
    shape = "x" + str(args.seq_len) if args.task == "lm" else f" phrases (<= {args.seq_len} tokens)"
    lines.append(f"train: steps={args.steps} batch={backend.micro_batch_size}{shape} "
                 f"ga={backend.grad_accum} lr={args.lr:g} warmup={warmup} grad_clip={backend.grad_clip} "
                 f"seed={args.seed} threads={torch.get_num_threads()}")
    return lines


def summary(args, cfg: TrilemmaMoEConfig, corpus, rec: Record, last_eval: Dict[str, float],
            st: Dict[str, Any], pc_start: Dict[str, int], pc: Dict[str, int], batch_size: int,
            deepspeed: bool) -> Dict[str, Any]:
    steps = args.steps
    out: Dict[str, Any] = {
        "task": args.task,
        "ffn": args.ffn,
        "steps": steps,
        "data": corpus.name,
        "final_train_loss": sum(rec.loss_window) / len(rec.loss_window),  # mean of the last 20 steps
        "last_step_train_loss": float(rec.last_loss),
        # lm: validation perplexity; sst2: valid_loss is the dev cross-entropy (no perplexity)
        **({"valid_loss": last_eval["valid_loss"], "valid_ppl": last_eval["valid_ppl"]} if "valid_ppl" in last_eval
           else {"valid_loss": last_eval["dev_loss"], "dev_loss": last_eval["dev_loss"],
                 "dev_accuracy": last_eval["dev_accuracy"], "dev_examples": last_eval["dev_examples"]}),
        "total_params": pc["total"],          # at the end: after compression when it ran
        "expert_params": pc["expert"],
        "total_params_start": pc_start["total"],   # at the start: full experts
        "expert_params_start": pc_start["expert"],
        "tokens_per_s": rec.tokens_seen / max(rec.train_time, 1e-9),   # sst2: non-pad tokens
        "train_time_s": rec.train_time,
        # the second half of the run: no compilation, autotuning or first clustering in it
        "tokens_per_s_second_half": (rec.tokens_seen / steps) * (steps - steps // 2)
        / max(sum(rec.step_times[steps // 2:]), 1e-9),
        "load_cv": sum(rec.cv_window) / max(1, len(rec.cv_window)),
        "load_cv_last": st["load_cv"],
        "reclusters": st["reclusters"],   # per layer: its first clustering + regroups applied, summed
        "config": {**cfg.to_dict(), "d_model": args.d_model, "d_ff": args.d_ff, "layers": args.layers,
                   "heads": args.heads, "seq_len": args.seq_len, "batch_size": batch_size,
                   # --seed drives the data, the model's init and the MoE layers (cfg.seed replaced)
                   "lr": args.lr, "seed": args.seed, "deepspeed": deepspeed},
        "history": rec.history,
        "loss_curve": rec.loss_curve,   # every optimizer step's training loss (global batch)
    }
    for key in ("first_clusterings", "regroups_applied", "group_load_cv", "compression_ratio",
                "skipped_reclusters", "experts_moved", "regroup_seconds", "compressed"):
        if key in st:
            out[key] = st[key]
    return out


def format_table(rows: Sequence[tuple]) -> str:
    w = max(len(str(k)) for k, _ in rows)
    lines = ["-" * (w + 24)]
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        lines.append(f"{str(k):<{w}}  {v}")
    lines.append("-" * (w + 24))
    return "\n".join(lines)


def eval_text(ev: Dict[str, float]) -> str:
    """One evaluation in a progress line."""
    if "dev_accuracy" in ev:
        return f"dev loss {ev['dev_loss']:.4f} acc {ev['dev_accuracy']:.4f}"
    text = f"valid loss {ev['valid_loss']:.4f} ppl {ev['valid_ppl']:.2f}"
    if "shift_valid_loss" in ev:   # a shift run scores both corpora
        text += f" | shift data: valid loss {ev['shift_valid_loss']:.4f} ppl {ev['shift_valid_ppl']:.2f}"
    return text


def table(s: Dict[str, Any], num_layers: int) -> str:
    clustered = "first_clusterings" in s
    rows: List[tuple] = [("ffn", s["ffn"]), ("data", s["data"]), ("steps", s["steps"]),
                         ("train loss (last 20 steps)", s["final_train_loss"])]
    if "dev_accuracy" in s:
        rows += [("dev loss", s["dev_loss"]), ("dev accuracy", s["dev_accuracy"]),
                 ("dev examples", s["dev_examples"])]
    else:
        rows += [("valid loss", s["valid_loss"]), ("valid ppl", s["valid_ppl"])]
    if "shift_step" in s:
        rows += [(f"shift at step {s['shift_step']} to", s["shift_data"]),
                 ("pre-shift valid ppl", s["pre_shift_valid_ppl"]), ("post-shift valid ppl", s["post_shift_valid_ppl"]),
                 ("post-shift train loss", s["post_shift_train_loss"]), ("post-shift load CV", s["post_shift_load_cv"])]
    if clustered:
        rows += [("total params at start", s["total_params_start"]),
                 ("total params at end" + (" (compressed)" if s["compressed"] else " (not compressed)"),
                  s["total_params"]),
                 ("expert params at start", s["expert_params_start"]),
                 ("expert params at end", s["expert_params"])]
    else:
        rows += [("total params", s["total_params"]), ("expert params", s["expert_params"])]
    rows += [("tokens/s" + (" (non-pad)" if "dev_accuracy" in s else ""), s["tokens_per_s"]), ("train time (s)", s["train_time_s"]),
             ("load CV (last 50 steps)", s["load_cv"])]
    if clustered:
        first = s["first_clusterings"]
        rows += [("first clustering", f"{first} of {num_layers} layers" if first else
                  "none (the run ended in the burn-in)"),
                 ("regroups applied", s["regroups_applied"]),
                 ("regroup checks skipped", s.get("skipped_reclusters", 0)),
                 ("experts moved by regroups", s.get("experts_moved", 0)),
                 ("regroup wall time (s)", s.get("regroup_seconds", 0.0))]
        for key in ("compression_ratio", "group_load_cv"):
            if key in s:
                rows.append((key.replace("_", " "), s[key]))
    return format_table(rows)


def write_summary_json(path: str, s: Dict[str, Any]) -> None:
    """Atomic: a run killed while writing leaves no half-written summary (``reproduce`` reruns it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(s, f, indent=2)
    os.replace(tmp, path)


# --- expert parallelism, routing, offload ---------------------------------------------------
def comm_stats(model) -> List[Dict[str, float]]:
    return [s for s in (m.comm_stats() for m in clustered_layers(model)) if s]


def write_comm_log(path: str, comm: List[Dict[str, float]], rank: int, world: int) -> None:
    """Every rank's counters in one JSON file (gathered to rank 0)."""
    everyone: List[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, comm)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"ranks": [{"rank": r, "layers": c} for r, c in enumerate(everyone)]}, f, indent=1)


def _routing_layers(model) -> list:
    """The layers whose routing can be recorded: the clustered layers, else Switch baselines."""
    return clustered_layers(model) or [m for m in model.moe_layers() if hasattr(m, "routing_log")]


def start_routing_log(model) -> List[list]:
    """Training forwards of every clustered (or Switch) layer append their routing to these lists."""
    logs = []
    for layer in _routing_layers(model):
        layer.routing_log = []
        logs.append(layer.routing_log)
    return logs


def save_routing(path: str, model, cfg: TrilemmaMoEConfig, d_model: int) -> None:
    layers = []
    for m in _routing_layers(model):
        if m.routing_log:
            layers.append({"group_idx": torch.cat([g for g, _ in m.routing_log]),
                           "expert_idx": torch.cat([e for _, e in m.routing_log])})
        m.routing_log = None
    torch.save({"num_experts": cfg.num_experts, "num_groups": cfg.num_groups, "top_k": cfg.top_k,
                "group_top_k": cfg.group_top_k, "hidden_size": d_model, "layers": layers}, path)
    print(f"routing of {len(layers)} layer(s) written to {path} (trilemma-moe profile-comm --routing {path})")


def memory_and_offload(model, cfg: TrilemmaMoEConfig) -> Dict[str, Any]:
    """``memory_bytes`` (and ``offload`` with offloading on) summed over the clustered layers."""
    layers = clustered_layers(model)
    if not layers:
        return {}
    reports = [m.memory_report() for m in layers]
    out: Dict[str, Any] = {"memory_bytes": {k: sum(r[k] for r in reports) for k in reports[0]}}
    if cfg.offload_idle_steps is not None:
        out["offload"] = offload_summary([m.offload_stats() for m in layers])
    return out


def offload_summary(stats: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Offload counters summed over layers; peak resident bytes is the sum of per-layer peaks."""
    out = {k: sum(s.get(k, 0) for s in stats) for k in ("accesses", "hits", "misses", "prefetch_hits", "offloads",
                                                         "prefetches", "bytes_written", "bytes_read", "stall_s",
                                                         "peak_resident_bytes", "mean_resident_bytes",
                                                         "write_failures")}
    out["steps"] = max(s.get("steps", 0) for s in stats)
    out["hit_rate"] = out["hits"] / out["accesses"] if out["accesses"] else None
    out["stall_s_per_step"] = out["stall_s"] / max(1, out["steps"])
    out["tier"] = stats[0].get("tier")
    return out
