"""The main job under the real `deepspeed` launcher (launch/train_deepspeed.sh): 2 CPU ranks,
ZeRO-2, our layer through burn-in, the first clustering and regroups."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_under_deepspeed_launcher(tmp_path):
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": 2},
                 "trilemma_moe": {"num_experts": 8, "num_groups": 2, "rank": 4, "burn_in": 3,
                                  "recluster_interval": 3, "delta": 0.0}}
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(ds_config))
    summary = tmp_path / "summary.json"
    env = dict(os.environ, NPROC="2", DS_CONFIG=str(cfg), MASTER_PORT="29581", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner")
    cmd = ["bash", os.path.join(ROOT, "launch", "train_deepspeed.sh"), "--steps", "8", "--d-model", "32",
           "--d-ff", "64", "--layers", "1", "--heads", "2", "--seq-len", "16", "--eval-batches", "2",
           "--no-progress", "--summary-json", str(summary)]
    # DeepSpeed's CPU all-reduce segments of this port: earlier runs' leftovers go first, and this
    # run must leave none (attach_engine unlinks them once every rank has mapped them)
    shm = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29581_{r}" for r in range(2)]
    for path in shm:
        if os.path.exists(path):
            os.unlink(path)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not any(os.path.exists(p) for p in shm), "DeepSpeed's shared-memory segments were left in /dev/shm"
    result = json.loads(summary.read_text())
    assert result["config"]["deepspeed"] is True and result["steps"] == 8
    assert result["reclusters"] >= 2 and result["compressed"] is True
    assert result["final_train_loss"] < 10 and result["valid_ppl"] > 1
