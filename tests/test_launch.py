"""The main job under the real `deepspeed` launcher (launch/train_deepspeed.sh): 2 CPU ranks,
ZeRO-2, our layer through burn-in, the first clustering and regroups. Its loss curve must be the
one-process run's on the same global batches (the trainer gives rank r its share of each global
batch of batch x world windows, training.loop.RankShare)."""
import json
import os
import subprocess
import sys

import pytest

from test_expert_parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS, MICRO = 2, 4
DS_CONFIG = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "steps_per_print": 10 ** 9,
             "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
             "zero_optimization": {"stage": 2},
             # the main job as README launches it, kept through regroups: dynamic_regroup asks for the
             # checks every 3 steps (the default clusters once)
             "trilemma_moe": {"num_experts": 8, "num_groups": 2, "rank": 4, "burn_in": 3,
                              "recluster_interval": 3, "delta": 0.0, "dynamic_regroup": True}}
TRAIN = ["--steps", "8", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2", "--seq-len", "16",
         "--eval-batches", "2", "--no-progress"]
# |launcher - one process| per step, relative: the two runs see the same data but reduce in another
# order, and each rank's balance loss sees its own half of the batch (measured up to 5e-5)
CURVE_RTOL = 2e-4


def test_main_job_under_deepspeed_launcher_matches_one_process(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(DS_CONFIG))
    summary = tmp_path / "summary.json"
    port = free_port()
    env = dict(os.environ, NPROC=str(RANKS), DS_CONFIG=str(cfg), MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner")
    cmd = ["bash", os.path.join(ROOT, "launch", "train_deepspeed.sh"), *TRAIN, "--summary-json", str(summary)]
    # DeepSpeed's CPU all-reduce segments of this port: earlier runs' leftovers go first, and this
    # run must leave none (attach_engine unlinks them once every rank has mapped them)
    shm = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(RANKS)]
    for path in shm:
        if os.path.exists(path):
            os.unlink(path)
    launcher = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the reference, alongside: one process, the same config with the whole global batch
    one_cfg = tmp_path / "ds1.json"
    one_cfg.write_text(json.dumps(dict(DS_CONFIG, train_micro_batch_size_per_gpu=MICRO * RANKS)))
    one = tmp_path / "one.json"
    ref = subprocess.run([sys.executable, "-m", "trilemma_moe.train", "--deepspeed_config", str(one_cfg), *TRAIN,
                          "--summary-json", str(one)], env=dict(env, MASTER_PORT=str(free_port())), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-6000:]
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    assert not any(os.path.exists(p) for p in shm), "DeepSpeed's shared-memory segments were left in /dev/shm"
    a, b = json.loads(summary.read_text()), json.loads(one.read_text())
    assert a["config"]["deepspeed"] is True and a["steps"] == 8
    assert a["reclusters"] == b["reclusters"] >= 2 and a["compressed"] is True
    assert len(a["loss_curve"]) == 8
    print("launcher - one process:", [x - y for x, y in zip(a["loss_curve"], b["loss_curve"])])
    assert a["loss_curve"] == pytest.approx(b["loss_curve"], rel=CURVE_RTOL)
