"""benchmarks/capacity.py: the search finds the largest expert count that fits, within its
resolution, against a threshold drawn at random (the trials themselves take a machine's memory and
minutes each: they run in the benchmark, not here); and the trial configs carry what the search
varies."""
import os
import random
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import capacity  # noqa: E402


def _args(**kw):
    base = dict(setting=["ours-infinity"], start=[64], resolution=0.08, group_size=4, max_experts=1 << 16,
                d_model=512, d_ff=2048, rank=16, batch_size=32, burn_in=100, buffer_count=16,
                sub_group_size=2 * 10 ** 7)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("seed", range(6))
def test_search_brackets_the_threshold(monkeypatch, seed):
    threshold = random.Random(seed).randrange(64, 5000)   # the largest count that fits
    tried = []

    def trial(args, setting, e, workdir, limit):
        tried.append(e)
        return {"num_experts": e, "fits": e <= threshold}

    monkeypatch.setattr(capacity, "run_trial", trial)
    args = _args()
    r = capacity.search(args, "ours-infinity", "/nonexistent", 0, lambda trials: None)
    good, bad = r["largest_fitting"]["num_experts"], r["smallest_failing"]
    assert good <= threshold < bad
    assert bad - good <= max(args.resolution * good, args.group_size)
    assert all(e % args.group_size == 0 for e in tried) and len(set(tried)) == len(tried)


def test_search_stops_when_the_start_fails(monkeypatch):
    monkeypatch.setattr(capacity, "run_trial", lambda a, s, e, w, l: {"num_experts": e, "fits": False})
    r = capacity.search(_args(), "ours-infinity", "/nonexistent", 0, lambda trials: None)
    assert r["largest_fitting"] is None and r["smallest_failing"] == 64 and len(r["trials"]) == 1


def test_trial_config_sizes_the_swap_buffers_to_the_largest_partition():
    args = _args()
    cfg = capacity.trial_config(args, "ours-infinity", 1024, "/nvme")
    zero = cfg["zero_optimization"]
    assert cfg["trilemma_moe"]["num_groups"] == 256 and cfg["trilemma_moe"]["burn_in_form"] == "compressed"
    assert zero["stage"] == 3 and zero["offload_param"]["buffer_size"] == 256 * 512 * 2048
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "nvme"
    ds = capacity.trial_config(args, "deepspeed-zero2", 1024, "/nvme")
    assert ds["zero_optimization"] == {"stage": 2} and ds["trilemma_moe"]["num_experts"] == 1024
