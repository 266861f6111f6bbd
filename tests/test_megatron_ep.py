"""Megatron-core GPTModel with our MoE on 2 gloo ranks at expert parallelism 2 against 1 rank fed
the whole batch, and distributed checkpoints loaded at another expert-parallel size (the runs
are tests/scripts/megatron_ep.py; its docstring says why the curves must agree)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import megatron.core  # noqa: F401  (the megatron extra is installed for the tests: missing, it is an error)
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "megatron_ep.py"
sys.path.insert(0, str(SCRIPT.parent))
from megatron_ep import SAVE_AFTER, STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, ep, out, mode, ckpt):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(world), str(ep), str(free_port()), str(out), mode,
                           str(ckpt)], check=False, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron_ep")
    return {
        "one": run(1, 1, d / "one", "train", d / "ck_ep1"),
        "two": run(2, 2, d / "two", "train", d / "ck_ep2"),
        "ep2_to_ep1": run(1, 1, d / "r1", "resume", d / "ck_ep2"),
        "ep1_to_ep2": run(2, 2, d / "r2", "resume", d / "ck_ep1"),
    }


@pytest.mark.timeout(600)
def test_two_ranks_at_ep2_match_one_rank_fed_the_whole_batch(runs):
    one, two = runs["one"][0], runs["two"]
    print("\n1 rank :", [round(v, 5) for v in one["curve"]], "\n2 ranks:", [round(v, 5) for v in two[0]["curve"]])
    assert len(one["curve"]) == STEPS
    assert two[0]["curve"] == two[1]["curve"]           # both ranks report the same global loss
    assert two[0]["curve"] == pytest.approx(one["curve"], rel=2e-6, abs=2e-6)
    assert one["curve"][-1] < one["curve"][0] - 0.2     # it learns, through the clustering and regroups
    for a, b in zip(one["layers"], two[0]["layers"]):
        assert a["reclusters"] == b["reclusters"] == 3  # first clustering, a regroup check, the forced regroup
        assert a["moved"] == b["moved"] > 0             # experts changed slots (at ep 2: ranks)
        assert a["groups"] == b["groups"] == two[1]["layers"][one["layers"].index(a)]["groups"]


@pytest.mark.timeout(600)
def test_checkpoints_load_at_another_expert_parallel_size(runs):
    tail = slice(SAVE_AFTER, STEPS)
    # saved at ep 2 by 2 ranks, resumed by 1 rank at ep 1 (model and Adam state); and back
    assert runs["ep2_to_ep1"][0]["curve"] == pytest.approx(runs["two"][0]["curve"][tail], rel=2e-6, abs=2e-6)
    assert runs["ep1_to_ep2"][0]["curve"] == pytest.approx(runs["one"][0]["curve"][tail], rel=2e-6, abs=2e-6)
    assert runs["ep1_to_ep2"][0]["layers"] == runs["one"][0]["layers"]
