"""Measurements a run can take beside its loss, for the paper's tables (``trilemma-moe reproduce``):

- :class:`PeakMemory`: peak training memory, measured as what the process holds: the peak resident
  set size (``ru_maxrss``) up to the end of training, per rank, and on CUDA the caching allocator's
  peak (``torch.cuda.max_memory_allocated``). Nothing estimated; tensors a step does not touch (idle
  experts, their optimizer moments) count too.
- :class:`RunTrace`: per-expert token counts every ``every`` steps, the group of every expert
  at the start and after each clustering (group membership over time), and every regroup after
  the first clustering that moved experts (``regroup_events``).
- :class:`ShiftTrack`: the summary keys of a distribution shift (``--shift-step``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from ..core.layer import ClusteredMoE, clustered_layers


class PeakMemory:
    """Peak training memory, measured as what the process holds. Built when the run starts (before
    the model is), ``watch(device)`` once the model is on its device, ``training_done()`` after the
    last optimizer step (before the final evaluation), ``result()`` after that, on every rank
    together under ``torch.distributed`` (it gathers one number per rank)."""

    def __init__(self):
        self.rss_start = current_rss_bytes()
        self.rss_peak: Optional[int] = None
        self.cuda_peak: Optional[int] = None
        self.device, self.cuda = None, False

    def watch(self, device: torch.device) -> None:
        """The training device, once the model sits on it (CUDA: the allocator's peak from here on)."""
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def training_done(self) -> None:
        self.rss_peak = peak_rss_bytes()
        self.cuda_peak = int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None

    def result(self) -> Dict[str, Any]:
        import torch.distributed as dist
        mine = [self.rss_peak if self.rss_peak is not None else peak_rss_bytes(), self.rss_start]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        out = {"peak_rss_bytes": max(e[0] for e in everyone),
               "peak_rss_bytes_per_rank": [int(e[0]) for e in everyone],
               "rss_before_model_bytes_per_rank": [int(e[1]) for e in everyone]}
        if self.cuda:
            out.update(peak_memory_bytes=self.cuda_peak,
                       peak_memory_method="torch.cuda.max_memory_allocated over the training steps (this rank)")
        else:
            out.update(peak_memory_bytes=out["peak_rss_bytes"],
                       peak_memory_method="ru_maxrss: the process's peak resident set size up to the end of "
                                          "training (the largest over ranks)")
        return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage``; Linux reports KiB)."""
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


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
