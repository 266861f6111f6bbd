"""Measurements a run can take beside its loss, for the paper's tables (``trilemma-moe reproduce``):

- :class:`PeakMemory`: peak training memory, measured. On CUDA the caching allocator's peak over
  the whole run (``torch.cuda.max_memory_allocated``); on the CPU, where torch keeps no allocator
  statistics, the peak of the profiler's memory timeline over one whole optimizer step
  (parameters, gradients, optimizer state, activations and temporaries: every tensor torch
  allocated, nothing estimated).
- :class:`RunTrace`: per-expert token counts every ``every`` steps, the group of every expert
  at the start and after each clustering (group membership over time), and every regroup after
  the first clustering that moved experts (``regroup_events``).
- :class:`ShiftTrack`: the summary keys of a distribution shift (``--shift-step``, issue 24).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from typing import Any, Dict, List, Optional

import torch

from ..core.layer import ClusteredMoE, clustered_layers


class PeakMemory:
    """``with probe.step(active):`` around one training step; ``result()`` after the run."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bytes: Optional[int] = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    @contextlib.contextmanager
    def step(self, active: bool):
        if not active or self.cuda:
            yield
            return
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            yield
        self.bytes = _timeline_peak(prof)

    def result(self) -> Dict[str, Any]:
        if self.cuda:
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "peak_memory_method": "torch.cuda.max_memory_allocated over the run"}
        if self.bytes is None:
            return {}
        return {"peak_memory_bytes": int(self.bytes),
                "peak_memory_method": "torch.profiler memory timeline of the last optimizer step (CPU)"}


def _timeline_peak(prof) -> int:
    """The largest total of live tensor bytes (all categories) in the profiler's CPU timeline."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # export_memory_timeline is marked deprecated for CUDA users
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return int(max((sum(s) for s in sizes), default=0))


def expert_counts(layers) -> List[List[int]]:
    """Tokens per expert id in the last training forward, per MoE layer (``layers``: the clustered
    layers, else the baseline MoE blocks)."""
    return [(m._last_counts if isinstance(m, ClusteredMoE) else m.last_counts).tolist() for m in layers]


class RunTrace:
    """Load and group membership over time, regroups that moved experts (see the module doc)."""

    def __init__(self, model, every: int = 10):
        self.every = every
        # found once: the module tree does not change during training
        self.clustered = clustered_layers(model)
        self.moe = self.clustered or [m for m in model.moe_layers() if hasattr(m, "last_counts")]
        self.load: List[Dict[str, Any]] = []
        self.groups: List[Dict[str, Any]] = []
        self._seen = [-1] * len(self.clustered)
        self.record_groups(0)

    def record_groups(self, step: int) -> None:
        for i, m in enumerate(self.clustered):
            n = m.schedule["reclusters"]
            if n != self._seen[i]:
                self._seen[i] = n
                self.groups.append({"step": step, "layer": i, "clustered": m.clustered,
                                    "group_of_expert": m.group_assignment().tolist()})

    def after_step(self, step: int) -> None:
        self.record_groups(step)
        if step % self.every == 0:
            self.load.append({"step": step, "counts": expert_counts(self.moe)})

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"load_history": self.load}
        if self.clustered:
            out["group_history"] = self.groups
            # per layer: each regroup after the first clustering that moved experts
            out["regroup_events"] = [dict(e, layer=i) for i, m in enumerate(self.clustered) for e in m.regroup_events]
        return out


class ShiftTrack:
    """What a run with ``--shift-step N`` adds to its summary. "After the shift" is steps N+1 on
    (the ramp included); the load CV is the one the summary's ``load_cv`` averages (the mean over
    MoE layers of each step's per-expert load CV, ``report.moe_stats``). ``state()`` travels with
    the checkpoint, so a run resumed after the shift reports the same numbers."""

    def __init__(self, shift_step: int):
        self.shift_step = shift_step
        self.pre_eval: Optional[Dict[str, float]] = None
        self.loss_sum, self.cv_sum, self.steps = 0.0, 0.0, 0

    def pre_shift(self, evaluation: Dict[str, float]) -> None:
        self.pre_eval = dict(evaluation)

    def after_step(self, step: int, loss: float, load_cv: float) -> None:
        if step > self.shift_step:
            self.loss_sum += loss
            self.cv_sum += load_cv
            self.steps += 1

    def state(self) -> Dict[str, Any]:
        return {"pre_eval": self.pre_eval, "loss_sum": self.loss_sum, "cv_sum": self.cv_sum, "steps": self.steps}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.pre_eval, self.loss_sum = state["pre_eval"], state["loss_sum"]
        self.cv_sum, self.steps = state["cv_sum"], state["steps"]

    def summary(self, final_eval: Dict[str, float], shift_data: str, ramp: int) -> Dict[str, Any]:
        n = max(1, self.steps)
        return {"shift_step": self.shift_step, "shift_ramp": ramp, "shift_data": shift_data,
                "pre_shift_valid_ppl": (self.pre_eval or {}).get("valid_ppl"),   # the first corpus at step N
                "post_shift_valid_ppl": final_eval["shift_valid_ppl"],            # the second corpus at the end
                "first_corpus_valid_ppl_end": final_eval["valid_ppl"],            # what was forgotten
                "post_shift_valid_loss": final_eval["shift_valid_loss"],
                "post_shift_train_loss": self.loss_sum / n,
                "post_shift_load_cv": self.cv_sum / n}
