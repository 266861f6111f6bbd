"""Data-parallel replicas of TrilemmaMoE stay identical across regroups: the real `deepspeed`
launcher starts 2 and 4 CPU ranks (gloo) that see different data and hold different activation
centroids when a regroup is forced; all ranks must apply rank 0's regroup, and every parameter
must agree afterwards."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dp_replicas.py")


@pytest.mark.parametrize("world, stage, port, rule", [(2, 2, 29571, "weights"), (4, 1, 29572, "weights"),
                                                     (2, 2, 29573, "probe"), (4, 1, 29574, "probe")])
def test_replicas_agree_after_regroups(tmp_path, world, stage, port, rule):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    # the `deepspeed` command's own entry point, wherever the package is importable
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port", str(port), SCRIPT, str(stage), str(tmp_path), rule]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    first = results[0]
    assert first["world"] == world and first["reclusters"] >= 2
    assert first["moved"] > 0  # the forced regroup really moved experts
    for other in results[1:]:
        assert other["assignment"] == first["assignment"]
        assert other["reclusters"] == first["reclusters"]
        for name, value in first["sums"].items():
            assert other["sums"][name] == pytest.approx(value, rel=0, abs=1e-9), name
