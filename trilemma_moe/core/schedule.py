"""When a clustered layer is in which phase of training (paper 3.5): its step counters, where
optimizer-step boundaries come from, and what a skipped step undoes.

Steps come from one of two sources:

* **told** (``StepSchedule.optimizer_step``): whoever runs the optimizer says when a step ended
  and whether it was applied. ``ClusteredMoE.attach_optimizer`` registers a torch step hook;
  ``attach_engine`` wraps DeepSpeed's ``engine.step`` (``was_step_applied``). This is how the
  trainers run.
* **counted**, for a bare layer nobody tells: every ``gradient_accumulation_steps`` training
  forwards make a step. A step the engine skipped is then noticed through
  ``skipped_steps_source`` (a callable returning the engine's running skip count).

Either way a skipped step leaves no trace: the schedule (burn-in, regroup interval, temperature,
router freeze) does not advance and the activation statistics of its forwards are undone.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch


class StepSchedule:
    """The layer's persistent counters (a LongTensor buffer of the layer, so they travel with its
    ``state_dict``) and the step clock over them. ``snapshot``/``restore`` save and put back the
    activation statistics a skipped step must not keep."""

    NAMES = ("micro_step", "compressed", "reclusters", "skipped", "last_recluster_step", "frozen_until")

    def __init__(self, counters: torch.Tensor, gradient_accumulation_steps: int,
                 snapshot: Callable[[], object], restore: Callable[[object], None]):
        self.buffer = counters
        self.gas = gradient_accumulation_steps
        self._snapshot, self._restore = snapshot, restore
        self._host: Optional[List[int]] = None   # mirror of the buffer: reading a GPU buffer syncs
        self.told = False                        # optimizer_step() drives the clock
        self.skipped_steps_source: Optional[Callable[[], int]] = None
        self._skips_seen: Optional[int] = None
        self._start: Optional[tuple] = None      # (micro_step, statistics) when this step began

    # --- counters ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        if self._host is None:
            self._host = self.buffer.tolist()
        return self._host[self.NAMES.index(name)]

    def __setitem__(self, name: str, value: int) -> None:
        self[name]
        self._host[self.NAMES.index(name)] = value
        self.buffer[self.NAMES.index(name)] = value

    def reloaded(self) -> None:
        """The buffer was loaded from a checkpoint (the engine's skip count is reloaded too)."""
        self._host, self._skips_seen, self._start = None, None, None

    # --- the clock --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps applied."""
        self.sync_skipped_steps()
        return self["micro_step"] // self.gas

    def at_step_start(self) -> bool:
        """Whether the next training forward is the first of an optimizer step."""
        if self.told:
            return self._start is None
        return self["micro_step"] % self.gas == 0

    def forward_starts(self) -> None:
        """A training forward begins (after ``sync_skipped_steps`` and any regroup due at its
        step's start)."""
        if self.at_step_start():
            self._start = (self["micro_step"], self._snapshot())

    def forward_done(self) -> None:
        """A training forward has updated the activation statistics."""
        if not self.told:
            self["micro_step"] = self["micro_step"] + 1

    def expect_told(self) -> None:
        """From now on ``optimizer_step`` says where steps end (called when an optimizer or engine
        is attached, so not even the first step is counted from forwards: the config's
        ``gradient_accumulation_steps`` may differ from the engine's)."""
        if self.told:
            return
        self.told = True
        m = self["micro_step"]
        self._start = None if m % self.gas == 0 else (m - m % self.gas, None)

    def optimizer_step(self, applied: bool = True) -> None:
        """An optimizer step ended; ``applied=False``: the engine skipped it (fp16 overflow, a
        non-finite gradient norm). From the first call on the layer follows these calls and
        stops counting forwards."""
        if not self.told:   # the forwards of this step were counted so far: count from its start
            self.told = True
            if self._start is None and self["micro_step"] % self.gas:
                self._start = (self["micro_step"] - self["micro_step"] % self.gas, None)
        if self._start is not None:
            self["micro_step"] = self._start[0]
            if not applied and self._start[1] is not None:
                self._restore(self._start[1])
        if applied:
            self["micro_step"] = self["micro_step"] + self.gas
        self._start = None

    def sync_skipped_steps(self) -> None:
        """Counted steps only: uncount optimizer steps the engine skipped since the last look.

        A regroup that ran at the start of the skipped step stays applied (it changed weights
        outside the optimizer) and is not repeated: its step is the one that runs again."""
        if self.skipped_steps_source is None or self.told:
            return
        skipped = int(self.skipped_steps_source())
        if self._skips_seen is None or skipped < self._skips_seen:
            self._skips_seen = skipped   # first look, or the engine's count came from a checkpoint
            return
        new = skipped - self._skips_seen
        if new == 0:
            return
        self._skips_seen = skipped
        start = self._start
        if start is not None and new == 1 and self["micro_step"] == start[0] + self.gas:
            self._restore(start[1])
        self["micro_step"] = max(0, self["micro_step"] - new * self.gas)
        self._start = None

    # --- phases -----------------------------------------------------------------------------
    def clustering_due(self, burn_in: int, dynamic: bool, interval: int) -> Optional[str]:
        """At a step's first forward: "first" (burn-in is over), "regroup" (a regroup check is
        due) or None."""
        if not self.at_step_start():
            return None
        step = self.step
        if not self["compressed"]:
            return "first" if step >= burn_in else None
        if dynamic and step - self["last_recluster_step"] >= interval:
            return "regroup"
        return None

    def router_frozen(self) -> bool:
        return self.step < self["frozen_until"]
