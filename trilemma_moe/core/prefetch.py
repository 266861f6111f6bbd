"""Which idle groups to offload and which to bring back early (paper 3.4): an EMA predictor of
each group's chance of being used within the next L steps.

Per step, group g's evidence is ``max(selected, soft_g)``; its EMA ``p_g`` moves by
``ema_rate``; the predicted chance of use within L steps is ``1 - (1 - p_g)^L``. A resident group
idle for ``offload_idle_steps`` steps and below ``threshold`` leaves; an offloaded group above
it is prefetched. ``soft_g`` (:func:`router_evidence`) is the chance that some token would pick g
if tokens drew their group from the router: it keeps moving while a group is offloaded (the
router is always resident), so a group the router is warming to is prefetched before its first
selection.
"""
from __future__ import annotations

from typing import List, Optional

import torch

PREFETCH_THRESHOLD = 0.25   # default of ``prefetch_threshold``: a miss costs more than a wasted prefetch


def router_evidence(group_probs: Optional[torch.Tensor], num_groups: int, gamma: float = 1.0) -> List[float]:
    """``1 - prod_t (1 - p_tg^gamma)`` per group from the router's (tokens, G) group
    probabilities; zeros without them."""
    if group_probs is None or not group_probs.numel():
        return [0.0] * num_groups
    p = group_probs.detach().double()
    if gamma != 1.0:
        p = p ** gamma
    return (-torch.expm1(torch.log1p(-p.clamp(max=1 - 1e-12)).sum(0))).tolist()


class PrefetchPolicy:
    """The EMA predictor and the idle counters of one layer's groups."""

    def __init__(self, num_groups: int, lookahead: int = 2, ema_rate: float = 0.3,
                 threshold: float = PREFETCH_THRESHOLD):
        self.lookahead, self.ema_rate, self.threshold = lookahead, ema_rate, threshold
        self.ema = [0.0] * num_groups
        self.idle = [0] * num_groups

    def observe(self, group_counts: List[int], soft: List[float]) -> None:
        a = self.ema_rate
        for g, count in enumerate(group_counts):
            used = count > 0
            self.ema[g] = (1 - a) * self.ema[g] + a * max(float(used), soft[g])
            self.idle[g] = 0 if used else self.idle[g] + 1

    def likely(self, g: int) -> bool:
        """Predicted to be used within the next ``lookahead`` steps."""
        return 1.0 - (1.0 - self.ema[g]) ** max(1, self.lookahead) >= self.threshold
