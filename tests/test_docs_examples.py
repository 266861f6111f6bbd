"""The documentation's code examples run as written. Each lives once, in ``examples/``: the guides
include the file (``literalinclude``) and README repeats the DeepSpeed one, checked equal here.
Each runs in a fresh process: the DeepSpeed example under the real ``deepspeed`` launcher on 2 CPU
ranks (each its own random data), the Hugging Face ones with the environment a one-rank launcher
gives."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from test_peer_matrix import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def launch_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **extra)


def test_every_example_is_included_by_a_page():
    pages = "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    for example in EXAMPLES.glob("*.py"):
        assert f"examples/{example.name}" in pages, f"{example.name} is on no documentation page"


def test_readme_deepspeed_example_is_the_file():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert (EXAMPLES / "deepspeed_minimal.py").read_text() in blocks


def test_deepspeed_example_under_the_launcher(tmp_path):
    pytest.importorskip("deepspeed")
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()),
                           str(EXAMPLES / "deepspeed_minimal.py")], cwd=tmp_path, env=launch_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # not anchored to lines: under `python -u` a rank's print writes its text and its newline
    # separately, so two ranks' lines can interleave
    lines = re.findall(r"loss (\d+\.\d+), clustered (\w+), groups (\[[\d, ]*\])", proc.stdout)
    assert len(lines) == 2, proc.stdout[-3000:]
    # burn_in=10 of 20 steps: both ranks clustered, into the same G=2 groups of K=4
    assert {c for _, c, _ in lines} == {"True"}
    groups = {g for _, _, g in lines}   # replicas apply rank 0's decision
    assert len(groups) == 1 and sorted(eval(groups.pop())) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("name", ["hf_trainer.py", "hf_initialize.py"])
def test_hf_example_runs(name, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    env = launch_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if name == "hf_trainer.py":
        assert proc.stdout.count("expert parameters") == 2 and (tmp_path / "converted" / "config.json").exists()
    else:
        assert re.search(r"^loss \d+\.\d+$", proc.stdout, re.M), proc.stdout[-2000:]
