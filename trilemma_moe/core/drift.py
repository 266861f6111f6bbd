"""When a regroup check runs (paper 3.5, and a rule of ours built for distribution shifts).

* ``regroup_trigger="period"`` (the paper): every ``recluster_interval`` steps after the last check.
* ``regroup_trigger="drift"``: when the routing has measurably changed. Every training forward folds
  the per-expert token counts into an EMA (rate ``drift_beta``); every ``drift_every`` steps after
  the last check (or the first clustering) the EMA is averaged over the replicas, normalised to a
  distribution p, and its total-variation distance ``0.5 * sum |p - p_ref|`` from the distribution
  ``p_ref`` measured at the last check is compared with ``drift_threshold``; above it, a regroup check
  runs at that step (still subject to delta and the move cost). ``p_ref`` is then the new p.

Every rank takes the same decision at the same step: measurements fall on steps that depend on the
phase only (the step and the last check's step, identical everywhere), every rank joins the same
two collectives there whatever its data (``ReplicaSync.average_`` of the EMA, then rank 0's copy
through ``from_first``), and the decision is computed from that one shared distribution. Under
expert parallelism the counts fed in are already summed over every rank (``regroup.observe``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


class DriftTrigger:
    """The load EMA and the distribution of the last check (float64, kept off the module's buffers
    so ``module.to(bf16)`` leaves them exact; checkpointed through the layer's extra state)."""

    def __init__(self, num_experts: int, threshold: float, beta: float, every: int):
        self.threshold, self.beta, self.every = threshold, beta, every
        self.ema = torch.zeros(num_experts, dtype=torch.float64)
        self.ref = torch.zeros(num_experts, dtype=torch.float64)
        self.distance = 0.0          # at the latest measurement
        self.measured: Optional[torch.Tensor] = None   # that measurement's distribution

    @classmethod
    def for_config(cls, cfg) -> Optional["DriftTrigger"]:
        """The trigger of a layer built with ``cfg``; None for ``regroup_trigger="period"``."""
        if cfg.regroup_trigger != "drift":
            return None
        return cls(cfg.num_experts, cfg.drift_threshold, cfg.drift_beta, cfg.drift_every)

    def observe(self, counts: torch.Tensor) -> None:
        """One training forward's per-expert counts (expert order); device-side, no host sync."""
        if self.ema.device != counts.device:
            self.ema, self.ref = self.ema.to(counts.device), self.ref.to(counts.device)
        self.ema.mul_(1.0 - self.beta).add_(counts.detach().to(torch.float64), alpha=self.beta)

    def measure(self, sync) -> torch.Tensor:
        """The replicas' mean EMA as a distribution, identical on every rank (collective)."""
        avg = self.ema.clone()
        sync.average_(avg)
        avg = sync.from_first(avg).to(self.ema.device)
        return avg / avg.sum().clamp_min(1e-12)

    def due(self, schedule, sync) -> bool:
        """At a step's first forward after the first clustering: measure when one is due, and say
        whether the load moved by more than the threshold since the last check."""
        since = schedule.step - schedule["last_recluster_step"]
        if since <= 0 or since % self.every:
            return False
        p = self.measure(sync)
        self.distance = total_variation(p, self.ref)
        self.measured = p if self.distance > self.threshold else None
        return self.measured is not None

    def checked(self, sync) -> None:
        """A check (or the first clustering) ran at this step: its distribution is the reference."""
        self.ref = self.measured if self.measured is not None else self.measure(sync)
        self.measured = None

    def state_dict(self) -> Dict[str, object]:
        return {"ema": self.ema.cpu().clone(), "ref": self.ref.cpu().clone(), "distance": self.distance}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        dev = self.ema.device
        self.ema, self.ref = state["ema"].to(dev, torch.float64), state["ref"].to(dev, torch.float64)
        self.distance = float(state["distance"])


def maybe_recluster(layer) -> None:
    """At a step's first training forward: the first clustering once burn-in is over, then the
    regroup checks of the layer's ``regroup_trigger``."""
    cfg, sched, drift = layer.config, layer.schedule, layer.drift
    due = sched.clustering_due(cfg.burn_in, cfg.dynamic_regroup and drift is None, cfg.recluster_interval)
    if due is None and drift is not None and sched.at_step_start() and layer.clustered:
        due = "regroup" if drift.due(sched, layer.sync) else None
    if due is None:
        return
    layer.recluster(force=due == "first")
    if drift is not None:
        drift.checked(layer.sync)
