"""The main job submitted to a real Slurm (tests/slurm_cluster.py starts munged, slurmctld and
slurmd on this machine): `sbatch --wait launch/slurm_multinode.sbatch` unchanged, 1 node × 2 CPU
ranks (--gpus-per-node 0 overrides the script's GPU default, RANKS_PER_NODE=2), srun starting one
`deepspeed --no_ssh --node_rank $SLURM_NODEID` launcher per node. Checks: the job COMPLETED with
exit code 0 (`scontrol show job` and the jobcomp/filetxt record; `sacct` would need slurmdbd and a
database), its log, and that its loss curve equals the same run under the plain `deepspeed`
launcher (same seed, same global batches, ZeRO-2, ep_size 2).

    python -m pytest -q tests/test_slurm.py      # as root, with slurm-wlm and munge installed
"""
import json
import os
import subprocess
import sys

import pytest

from slurm_cluster import SlurmCluster  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm_multinode.sbatch")
BIN = os.path.dirname(sys.executable)        # this venv's python and `deepspeed` come first on PATH
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PATH=BIN + os.pathsep + os.environ["PATH"])
RANKS = 2

DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "steps_per_print": 1000000,
             "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "torch_adam": True}},
             "zero_optimization": {"stage": 2},
             # the main job as README submits it, kept through regroups: dynamic_regroup asks for the
             # checks every 4 steps (the default clusters once)
             "trilemma_moe": {"num_experts": 8, "num_groups": 4, "rank": 4, "burn_in": 4, "recluster_interval": 4,
                              "delta": 0.0, "ep_size": 2, "comm_timeout_s": 120, "dynamic_regroup": True}}
TRAIN = ["--steps", "12", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2", "--seq-len", "16",
         "--eval-batches", "2", "--seed", "3", "--no-progress"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = SlurmCluster.skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=RANKS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_sbatch_job_matches_the_deepspeed_launcher(slurm, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(DS_CONFIG))

    # the reference: the same job under the plain launcher on this machine, started alongside the
    # Slurm job (both spend most of their time importing DeepSpeed, not on the two cores)
    ref, ref_log = tmp_path / "launcher.json", open(tmp_path / "launcher.out", "w+")
    launcher = subprocess.Popen(["deepspeed", "--num_gpus", str(RANKS), "--master_port", str(_free_port()),
                                 "--module", "trilemma_moe.train", "--deepspeed_config", str(cfg), *TRAIN,
                                 "--summary-json", str(ref)], env=ENV, cwd=ROOT, stdout=ref_log,
                                stderr=subprocess.STDOUT)
    try:
        got = tmp_path / "slurm.json"
        log = tmp_path / "job.out"
        cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={RANKS}",
               f"--output={log}", "--time=10",
               f"--export=ALL,RANKS_PER_NODE={RANKS},MASTER_PORT={_free_port()},DS_CONFIG={cfg}",
               SBATCH, *TRAIN, "--summary-json", str(got)]
        r = slurm.run(cmd, check=False, timeout=300, cwd=ROOT, env=dict(ENV, SLURM_CONF=str(slurm.conf)))
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        ref_log.close()
    assert launcher.returncode == 0, (tmp_path / "launcher.out").read_text()[-6000:]
    out = log.read_text() if log.exists() else "(no job log)"
    assert r.returncode == 0, f"sbatch: {r.returncode}\n{r.stdout}{r.stderr}\n--- job log\n{out[-6000:]}\n{slurm.logs()}"
    job_id = r.stdout.strip().split(";")[0]

    job = slurm.job_fields(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    assert job["NodeList"] == slurm.node and job["NumNodes"] == "1", job
    record = slurm.jobcomp_record(job_id)
    assert record.get("JobState") == "COMPLETED" and record.get("ExitCode") == "0:0", record

    assert f"trilemma-moe: job {job_id}, 1 node(s) x {RANKS} ranks, master {slurm.node}:" in out, out[-4000:]
    assert f"summary written to {got}" in out, out[-4000:]

    a, b = json.loads(got.read_text()), json.loads(ref.read_text())
    assert a["config"]["deepspeed"] is True and a["ep_size"] == 2 and a["reclusters"] == b["reclusters"] >= 2
    assert len(a["loss_curve"]) == 12
    assert a["loss_curve"] == b["loss_curve"], (a["loss_curve"], b["loss_curve"])


def test_sbatch_without_gpus_or_ranks_per_node_is_one_clear_error(slurm, tmp_path):
    log = tmp_path / "job.out"
    env = {k: v for k, v in ENV.items() if k != "RANKS_PER_NODE"}
    r = slurm.run(["sbatch", "--wait", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                   f"--output={log}", SBATCH], check=False, timeout=60, cwd=ROOT,
                  env=dict(env, SLURM_CONF=str(slurm.conf)))
    assert r.returncode != 0
    job = slurm.job_fields(r.stdout.strip().split(";")[0])
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", job
    assert "error: no GPUs in this allocation" in log.read_text()
