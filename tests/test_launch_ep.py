"""Expert parallelism under the real `deepspeed` launcher (gloo CPU ranks):

* a tiny LM under deepspeed.initialize with a forced regroup that moves experts between ranks:
  ep_size 2 on 2 ranks (ZeRO-2) and on 4 ranks (ZeRO-1, expert-data-parallel replicas) give the
  one-rank loss curve (and in bf16 on 2 ranks, up to bf16 rounding); the DeepSpeed checkpoint
  saved at ep_size 2 reloads in one process at ep_size 1 with the same loss;
* the main job (small GPT, ZeRO-2) with ep_size 2 on 2 ranks (single-node launcher) and on 4 ranks
  as two "nodes" on localhost (launch/multinode_hostfile.sh, a hostfile, one launcher per node)
  gives the loss curve of the one-process run on the same global batches.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "ep_deepspeed.py")
LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _start_ep_runs(out, world, ep, stage, dtypes, *extra):
    """One process group per world size running every dtype of ep_deepspeed.py in turn (starting
    the ranks costs more than their steps). World 1 is the reference and runs without the launcher."""
    cmd = [SCRIPT, str(ep), str(stage), str(out), dtypes, *extra]
    if world == 1:
        env = dict(ENV, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = [sys.executable, *cmd]
    else:
        env, cmd = ENV, LAUNCHER + ["--num_gpus", str(world), "--master_port", str(free_port()), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=300):
    """Wait for every {name: Popen} (killing them all if one overruns); each must exit with 0."""
    outs = {}
    try:
        for name, p in procs.items():
            outs[name] = p.communicate(timeout=timeout)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outs[name][-6000:]}"


def test_regroup_moves_experts_and_adam_state_through_zero(tmp_path):
    # world: (ep_size, ZeRO stage, dtypes[, save]). The one-rank reference and the 2-rank run go side
    # by side (both spend most of their time starting up), then the 4-rank run.
    runs = {1: (1, 2, "fp32,bf16"), 2: (2, 2, "fp32,bf16", "save"), 4: (2, 1, "fp32")}
    _finish({f"world {w}": _start_ep_runs(tmp_path / f"w{w}", w, *runs[w]) for w in (1, 2)})
    _finish({"world 4": _start_ep_runs(tmp_path / "w4", 4, *runs[4])})
    curves = {}
    for world, (ep, _, dtypes, *_) in runs.items():
        for dtype in dtypes.split(","):
            ranks = [json.loads((tmp_path / f"w{world}" / dtype / f"rank{r}.json").read_text()) for r in range(world)]
            first = ranks[0]
            assert first["reclusters"] == 2 and first["moved"] > 0 and first["dtype"] == dtype
            if ep > 1:
                assert first["local_groups"] == 1                        # G=2 over 2 ranks
                assert sum(r["migration_bytes"] for r in ranks) > 0      # experts changed rank
            curves[world, dtype] = first["curve"]
    for world in (2, 4):
        assert max(abs(a - b) for a, b in zip(curves[world, "fp32"], curves[1, "fp32"])) < 1e-5, (world, curves)
    # bf16 (DeepSpeed's bf16 optimizer, fp32 masters): the same curve up to bf16 rounding of the loss
    assert max(abs(a - b) for a, b in zip(curves[2, "bf16"], curves[1, "bf16"])) < 0.05, curves

    # the checkpoint written at ep_size 2 (expert files per global slot) loads into one process at
    # ep_size 1 and gives the same loss on the same batch
    import torch
    from test_deepspeed import TinyLM, V, ffn, small_config

    from trilemma_moe import TrilemmaMoE
    from trilemma_moe.integrations.checkpoint import consolidate
    ckpt = tmp_path / "w2" / "fp32" / "ckpt"
    eval_loss = json.loads((tmp_path / "w2" / "fp32" / "rank0.json").read_text())["eval_loss"]
    model = TinyLM(TrilemmaMoE(16, ffn(), num_experts=8, k=2,
                               config=small_config(alpha=0.0, burn_in=2, recluster_interval=100, comm_timeout_s=60)))
    model.load_state_dict(consolidate(str(ckpt)))
    model.eval()
    with torch.no_grad():
        loss = float(model(torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(999))))
    assert model.moe.stats()["compressed"] and loss == pytest.approx(eval_loss, abs=1e-5)


DS_CONFIG = {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 1000000,
             "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "torch_adam": True}},
             "zero_optimization": {"stage": 2},
             # the main job as README launches it, kept through regroups (also test_netns's): dynamic_regroup
             # asks for the checks every 2 steps (the default clusters once)
             "trilemma_moe": {"num_experts": 8, "num_groups": 4, "rank": 4, "burn_in": 3, "recluster_interval": 2,
                              "delta": 0.0, "comm_timeout_s": 120, "dynamic_regroup": True}}
TRAIN = ["--steps", "8", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2", "--seq-len", "16",
         "--eval-batches", "2", "--no-progress"]
GLOBAL_BATCH = 8


def ds_config(tmp_path, name, world, ep):
    cfg = json.loads(json.dumps(DS_CONFIG))
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // world
    cfg["trilemma_moe"]["ep_size"] = ep
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_main_job_with_expert_parallelism_matches_one_process(tmp_path):
    # the one-process reference and the 2-rank launcher side by side (mostly start-up), then 4 ranks
    one = tmp_path / "one.json"
    env1 = dict(ENV, MASTER_PORT=str(free_port()))
    one_proc = subprocess.Popen([sys.executable, "-m", "trilemma_moe.train", "--deepspeed_config",
                                 ds_config(tmp_path, "one", 1, 1), *TRAIN, "--summary-json", str(one)],
                                env=env1, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    two = tmp_path / "two.json"
    cmd = LAUNCHER + ["--num_gpus", "2", "--master_port", str(free_port()), "--module", "trilemma_moe.train",
                      "--deepspeed_config", ds_config(tmp_path, "two", 2, 2), *TRAIN, "--summary-json", str(two),
                      "--comm-log", str(tmp_path / "comm2.json"), "--logdir", str(tmp_path / "tb")]
    two_proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _finish({"one process": one_proc, "2 ranks": two_proc})

    # 4 ranks as two nodes of 2 on localhost: the multi-node example, one launcher per node
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    four = tmp_path / "four.json"
    env4 = dict(ENV, HOSTFILE=str(hosts), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                DS_CONFIG=ds_config(tmp_path, "four", 4, 2), DEEPSPEED=" ".join(LAUNCHER))
    script = os.path.join(ROOT, "launch", "multinode_hostfile.sh")
    args = [*TRAIN, "--summary-json", str(four), "--comm-log", str(tmp_path / "comm4.json")]  # rank 0 writes
    node1 = subprocess.Popen(["bash", script, *args], env=dict(env4, NODE_RANK="1"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        node0 = subprocess.run(["bash", script, *args], env=dict(env4, NODE_RANK="0"), cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
        node1_out, _ = node1.communicate(timeout=120)
    finally:
        if node1.poll() is None:
            node1.kill()
    check(node0)
    assert node1.returncode == 0, node1_out[-4000:]

    # rank 0's byte counters are TensorBoard scalars of the 2-rank run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    series = tb.Scalars("comm/layer0/bytes_tokens_out")
    assert len(series) == 8 and series[-1].value > series[0].value > 0

    ref = json.loads(one.read_text())
    assert ref["reclusters"] >= 3 and ref["compressed"] is True
    for path, world in ((two, 2), (four, 4)):
        got = json.loads(path.read_text())
        assert got["config"]["deepspeed"] is True and got["ep_size"] == 2 and got["reclusters"] == ref["reclusters"]
        assert len(got["loss_curve"]) == 8
        assert max(abs(a - b) for a, b in zip(got["loss_curve"], ref["loss_curve"])) < 1e-4, (world, got, ref)
        log = json.loads((tmp_path / f"comm{world}.json").read_text())
        assert len(log["ranks"]) == world
        assert all(r["layers"][0]["bytes_tokens_out"] > 0 and r["layers"][0]["ep_size"] == 2 for r in log["ranks"])
