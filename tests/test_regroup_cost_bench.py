"""benchmarks/regroup_cost.py's memory probe against allocations whose peak is known by construction.

The probe sums the profiler's signed allocation events; the reference is the running maximum of
the same sizes, allocated and freed in a random order on fresh seeded inputs.
"""
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peak_extra_bytes_matches_running_max(seed):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import regroup_cost
    rnd = random.Random(seed)
    sizes = [rnd.randrange(1, 64) * 65536 for _ in range(12)]   # float32 elements, whole 256 KiB blocks
    frees = [rnd.random() < 0.5 for _ in sizes]                 # free the previous tensor before allocating?
    held = [torch.zeros(1 << 20)]                               # present before: must not count

    def pattern():
        live, level, peak = [], 0, 0
        for n, free in zip(sizes, frees):
            if free and live:
                level -= live.pop().numel() * 4
            live.append(torch.empty(n))
            level += n * 4
            peak = max(peak, level)
        return peak

    reference, measured = regroup_cost.peak_extra_bytes(pattern)
    assert any(frees[1:])                                       # frees happen, so peak < total allocated
    assert reference < 4 * sum(sizes)
    assert measured == reference
    assert held[0].numel() == 1 << 20
