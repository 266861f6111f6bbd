"""The main job under the real `deepspeed` launcher (launch/train_deepspeed.sh): 2 CPU ranks,
ZeRO-2, our layer through burn-in, the first clustering and regroups. Its loss curve must be the
one-process run's on the same global batches (the trainer gives rank r its share of each global
batch of batch x world windows, training.loop.RankShare). With ds_configs/zero3.json the same
job under ZeRO-3 must follow the ZeRO-2 run of that config."""
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


def _launch(cfg_dict, tmp_path, name, extra=()):
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(cfg_dict))
    summary = tmp_path / f"{name}-summary.json"
    env = dict(os.environ, NPROC=str(RANKS), DS_CONFIG=str(cfg), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner")
    cmd = ["bash", os.path.join(ROOT, "launch", "train_deepspeed.sh"), *TRAIN, *extra, "--summary-json", str(summary)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return json.loads(summary.read_text())


def test_main_job_under_zero3_follows_zero2(tmp_path):
    """ds_configs/zero3.json as shipped (its zero_optimization and burn_in_form), on the small
    model above: the loss curve and validation perplexity of the ZeRO-2 run of the same config,
    through the first clustering and regroups."""
    with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as f:
        z3 = json.load(f)
    assert z3["zero_optimization"]["stage"] == 3 and z3["trilemma_moe"]["burn_in_form"] == "compressed"
    z3 = dict(z3, train_micro_batch_size_per_gpu=MICRO, steps_per_print=10 ** 9)
    z3["trilemma_moe"] = dict(z3["trilemma_moe"], **{k: v for k, v in DS_CONFIG["trilemma_moe"].items()})
    z2 = dict(z3, zero_optimization={"stage": 2})
    a, b = _launch(z3, tmp_path, "zero3"), _launch(z2, tmp_path, "zero2")
    assert a["reclusters"] == b["reclusters"] >= 2 and a["compressed"] is True
    print("zero3 - zero2:", [x - y for x, y in zip(a["loss_curve"], b["loss_curve"])])
    assert a["loss_curve"] == pytest.approx(b["loss_curve"], rel=1e-5)
    assert a["valid_ppl"] == pytest.approx(b["valid_ppl"], rel=1e-5)


def test_main_job_under_zero_infinity_follows_bf16_zero2(tmp_path):
    """ds_configs/zero3_nvme.json as shipped, its nvme_path moved to a temporary directory, on a
    model whose expert bases are large enough to be swapped (2 x 512 x 2048 per layer: 2 MiB per
    rank's partition in bf16, DeepSpeed swaps nothing under 1 MiB): through the first clustering and
    regroups, the loss curve follows the bf16 ZeRO-2 run of the same config within bf16 tolerance
    (the two runs step different Adam implementations: DeepSpeed's CPU Adam for offloaded state,
    torch's at ZeRO-2), and the parameters really went to NVMe."""
    with open(os.path.join(ROOT, "ds_configs", "zero3_nvme.json")) as f:
        inf = json.load(f)
    nvme = tmp_path / "nvme"
    zero = inf["zero_optimization"]
    assert zero["stage"] == 3 and inf["bf16"]["enabled"]
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "nvme"
    for key in ("offload_param", "offload_optimizer"):
        zero[key]["nvme_path"] = str(nvme)
    inf = dict(inf, train_micro_batch_size_per_gpu=MICRO, steps_per_print=10 ** 9)
    inf["trilemma_moe"] = dict(inf["trilemma_moe"], **DS_CONFIG["trilemma_moe"])
    z2 = dict(inf, zero_optimization={"stage": 2})
    z2["optimizer"] = {"type": "AdamW", "params": dict(inf["optimizer"]["params"], torch_adam=True)}
    wide = ["--d-model", "512", "--d-ff", "2048"]
    a, b = _launch(inf, tmp_path, "infinity", wide), _launch(z2, tmp_path, "zero2-bf16", wide)
    swapped = list((nvme / "zero_stage_3" / "bfloat16params").glob("rank*/*.swp"))
    assert swapped, "no parameter partition was written to NVMe"
    assert a["reclusters"] == b["reclusters"] >= 2 and a["compressed"] is True
    print("infinity - zero2 (bf16):", [x - y for x, y in zip(a["loss_curve"], b["loss_curve"])])
    assert a["loss_curve"] == pytest.approx(b["loss_curve"], rel=1e-2)
