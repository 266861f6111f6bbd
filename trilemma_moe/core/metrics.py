"""Load statistics."""
from __future__ import annotations

import torch


def coefficient_of_variation(counts: torch.Tensor) -> float:
    """I_load of the paper: population std / mean of per-expert (or per-group) token counts.

    0 for a perfectly even load; 0 as well when nothing was routed (no load to be uneven).
    """
    c = counts.detach().double().reshape(-1)
    if c.numel() == 0 or float(c.sum()) == 0.0:
        return 0.0
    return float(c.std(unbiased=False) / c.mean())
