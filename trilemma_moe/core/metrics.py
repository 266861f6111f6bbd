"""Load statistics."""
from __future__ import annotations

import torch


def mean_over_rows(t: torch.Tensor) -> torch.Tensor:
    """``t.mean(0)``, but 0 (a sum over no rows) instead of 0 / 0 when ``t`` has no rows, through
    the same kind of operation: a loss over an empty batch is 0 and its backward takes the path
    a full batch takes (data-parallel reducers see the same gradients on every rank)."""
    return t.mean(0) if t.shape[0] else t.sum(0)


def coefficient_of_variation(counts: torch.Tensor) -> float:
    """I_load of the paper: population std / mean of per-expert (or per-group) token counts.

    0 for a perfectly even load; 0 as well when nothing was routed (no load to be uneven).
    """
    c = counts.detach().double().reshape(-1)
    if c.numel() == 0 or float(c.sum()) == 0.0:
        return 0.0
    return float(c.std(unbiased=False) / c.mean())
