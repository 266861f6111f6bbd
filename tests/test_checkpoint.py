"""Checkpoints: per-slot keys, DeepSpeed save/load, bad files named, SIGKILL + resume. Checkpoints that
DeepSpeed saves under expert parallelism (ep 2 and 4), their resume, their load at another ep size and
`trilemma-moe reshard` of them: tests/test_peer_matrix.py."""
import json
import os
import signal
import subprocess
import sys
import time

import deepspeed
import pytest
import torch


from trilemma_moe import TrilemmaMoE
from trilemma_moe.core.checkpoint import atomic_save, safe_load
from trilemma_moe.integrations.checkpoint import (consolidate, latest_tag, load_checkpoint, reshard_main,
                                                  resolve_tag, save_checkpoint)
from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups
from trilemma_moe.integrations.deepspeed_keys import SLOT_PREFIX

from test_deepspeed import D, V, TinyLM, ffn, small_config
from test_expert_parallel import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _world(dist_world_1):  # conftest: a one-process gloo world for deepspeed.initialize
    yield


def _engine(stage, seed=0, **knobs):
    torch.manual_seed(seed)
    m = TinyLM(TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config(**knobs)))
    cfg = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": stage}}
    e, *_ = deepspeed.initialize(model=m, model_parameters=moe_param_groups(m), config=cfg)
    attach_engine(e)
    return e


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (4, 12), generator=g) for _ in range(n)]


def _train(e, batches):
    out = []
    for x in batches:
        loss = e(x)
        e.backward(loss)
        e.step()
        out.append(float(loss.detach()))
    return out


def test_state_dict_is_per_slot_in_deepspeed_naming_and_round_trips(tmp_path):
    layer = TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config())
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    for _ in range(5):  # past burn-in: compressed, regrouped
        y, l_aux, _ = layer(torch.randn(6, D, dtype=torch.float32))
        (y.square().mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    assert layer.moe.compressed
    sd = layer.state_dict()
    assert not any(k.startswith("moe.experts.") for k in sd)
    # every key DeepSpeed would route to an expert file carries a slot id; the rest has no "expert"
    for k in sd:
        if "expert" in k:
            assert k.startswith(SLOT_PREFIX), k
    K = layer.moe.experts_per_group
    for s in range(8):
        torch.testing.assert_close(sd[f"{SLOT_PREFIX}{s}.fa.w1"], layer.moe.experts.fa["w1"][s], rtol=0, atol=0)
        if s % K == 0:
            torch.testing.assert_close(sd[f"{SLOT_PREFIX}{s}.base.w2"], layer.moe.experts.base["w2"][s // K],
                                       rtol=0, atol=0)
        else:
            assert f"{SLOT_PREFIX}{s}.base.w2" not in sd
    assert not any(".full." in k for k in sd)  # released burn-in experts are not written
    path = tmp_path / "layer.pt"
    atomic_save(sd, str(path))
    fresh = TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config())
    fresh.load_state_dict(safe_load(str(path)))
    x = torch.randn(10, D)
    layer.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x)[0], layer(x)[0], rtol=0, atol=0)
    assert torch.equal(fresh.moe.expert_of_slot, layer.moe.expert_of_slot)
    assert fresh.moe.sim_cache.state_dict().keys() == layer.moe.sim_cache.state_dict().keys()
    # a slot missing from the file: one error naming the tensor and the slots
    sd.pop(f"{SLOT_PREFIX}3.fb.w2")
    with pytest.raises(KeyError, match=r"fb\.w2.*missing \[3\]"):
        TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config()).load_state_dict(sd)


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_save_load_continues_the_same_curve(tmp_path, stage):
    data = _batches(10)
    e = _engine(stage)
    _train(e, data[:4])   # burn-in 2: the checkpoint holds a compressed, regrouped layer
    save_checkpoint(e, str(tmp_path), "mid")
    assert latest_tag(str(tmp_path)) == "mid"
    files = os.listdir(tmp_path / "mid")
    assert sorted(f for f in files if f.startswith("layer_0_expert_")) == sorted(
        f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(8))
    ref = _train(e, data[4:])
    e2 = _engine(stage, seed=5)  # different init: everything must come from the checkpoint
    path, _ = e2.load_checkpoint(str(tmp_path))
    assert path is not None
    got = _train(e2, data[4:])
    assert got == ref


def test_reshard_names_missing_and_corrupt_files(tmp_path):
    e = _engine(0)
    _train(e, _batches(3))
    save_checkpoint(e, str(tmp_path), "t")
    victim = tmp_path / "t" / "layer_0_expert_5_mp_rank_00_model_states.pt"
    victim.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="layer_0_expert_5"):
        reshard_main([str(tmp_path), "--out", str(tmp_path / "o.pt")])
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=r"global slots \[5\]"):
        consolidate(str(tmp_path))
    assert not (tmp_path / "o.pt").exists()


# --- a bad 'latest' or checkpoint file: one error that names it ------------------------------
_BAD_LATEST = [(b"", "is empty"), (b" \n\t", "is empty"), (b"\xff\xfe\x00\x81step", "not a text file")]


@pytest.mark.parametrize("content,expect", _BAD_LATEST, ids=["empty", "blank", "binary"])
def test_bad_latest_file_is_named(tmp_path, content, expect):
    (tmp_path / "step3").mkdir()
    latest = tmp_path / "latest"
    latest.write_bytes(content)
    for read in (latest_tag, resolve_tag, consolidate):
        with pytest.raises(ValueError, match=expect) as info:
            read(str(tmp_path))
        assert str(latest) in str(info.value), read.__name__


def test_latest_naming_a_missing_tag_folder(tmp_path):
    (tmp_path / "step3").mkdir()
    (tmp_path / "latest").write_text("step9\n")
    for read in (resolve_tag, consolidate):
        with pytest.raises(FileNotFoundError) as info:
            read(str(tmp_path))
        msg = str(info.value)
        assert str(tmp_path / "latest") in msg and "'step9'" in msg and str(tmp_path / "step9") in msg
    assert latest_tag(str(tmp_path)) == "step9"   # the content itself is fine
    assert resolve_tag(str(tmp_path), "step3") == "step3"
    with pytest.raises(FileNotFoundError, match="tag 'nope' given, but there is no folder"):
        resolve_tag(str(tmp_path), "nope")
    (tmp_path / "latest").unlink()
    assert latest_tag(str(tmp_path)) is None       # nothing saved yet is not an error of latest_tag
    with pytest.raises(FileNotFoundError, match="no 'latest' file and no tag given"):
        resolve_tag(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        resolve_tag(str(tmp_path / "missing"))


def test_load_checkpoint_checks_latest_before_the_engine(tmp_path):
    e = _engine(0)
    _train(e, _batches(2))
    save_checkpoint(e, str(tmp_path), "t")
    latest = tmp_path / "latest"
    for content, expect in _BAD_LATEST + [(b"gone\n", "names tag 'gone', but there is no folder")]:
        latest.write_bytes(content)
        with pytest.raises((ValueError, FileNotFoundError), match=expect) as info:
            load_checkpoint(e, str(tmp_path))
        assert str(latest) in str(info.value)
    latest.write_text("t")
    path, client = load_checkpoint(e, str(tmp_path), load_optimizer_states=False)
    assert path == os.path.join(str(tmp_path), "t", "mp_rank_00_model_states.pt") and client is not None
    path, _ = load_checkpoint(e, str(tmp_path), tag="t")
    assert path is not None
    with pytest.raises(FileNotFoundError, match="tag 'u' given"):
        load_checkpoint(e, str(tmp_path), tag="u")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign_object"])
def test_safe_load_names_a_corrupt_file_and_never_suggests_unsafe_loading(tmp_path, damage):
    import fractions
    path = tmp_path / "layer_0_expert_3_mp_rank_00_model_states.pt"
    torch.save({f"{SLOT_PREFIX}3.fa.w1": torch.randn(4, 4)}, path)
    whole = path.read_bytes()
    if damage == "foreign_object":   # a sound file the weights-only unpickler refuses (not argparse.Namespace:
        # importing megatron.core, as the Megatron tests do, registers it as a torch safe global process-wide)
        torch.save({"args": fractions.Fraction(1, 3)}, path)
    else:
        path.write_bytes({"garbage": b"\x00\x01not a checkpoint" * 8, "truncated": whole[:len(whole) // 2],
                          "empty": b""}[damage])
    with pytest.raises(RuntimeError) as info:
        safe_load(str(path))
    msg = str(info.value)
    assert msg.startswith(f"cannot read checkpoint file {path}: corrupt"), msg
    # torch's own message advises re-running with weights_only=False (arbitrary code execution)
    assert "weights_only" not in msg and "trusted source" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _train_cmd(tmp_path, steps, extra=(), use_deepspeed=True):
    # dynamic_regroup: the run goes through regroup checks every 5 steps (the default clusters once)
    knobs = {"num_experts": 8, "num_groups": 2, "rank": 4, "burn_in": 6, "recluster_interval": 5, "delta": 0.0,
             "dynamic_regroup": True}
    if use_deepspeed:
        cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
               "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9, "trilemma_moe": knobs}
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(cfg))
        how = ["--deepspeed_config", str(path)]
    else:
        path = tmp_path / "knobs.yaml"
        path.write_text(json.dumps(knobs))   # JSON is YAML
        how = ["--config", str(path), "--batch-size", "8"]
    return [sys.executable, "-m", "trilemma_moe.train", *how, "--steps", str(steps),
            "--d-model", "32", "--d-ff", "64", "--layers", "1", "--seq-len", "16", "--eval-every", "0",
            "--eval-batches", "2", "--no-progress", "--threads", "1", *extra]


def _losses(path):
    out = {}
    for line in open(path):
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


@pytest.mark.parametrize("use_deepspeed", [True, False], ids=["deepspeed", "plain"])
def test_sigkill_and_resume_continues_the_same_loss_curve(tmp_path, use_deepspeed):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    # burn-in 6, regroup interval 5: killed after step 17, it resumes from the step-15 checkpoint (a
    # clustered, regrouped layer) and goes through the later regroups
    steps = 30
    ref_log, run_log = tmp_path / "ref.jsonl", tmp_path / "run.jsonl"
    subprocess.run(_train_cmd(tmp_path, steps, ["--loss-log", str(ref_log)], use_deepspeed), env=env, check=True,
                   timeout=240, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "ckpt"
    cmd = _train_cmd(tmp_path, steps, ["--loss-log", str(run_log), "--save-dir", str(ckpt), "--save-every", "5"],
                     use_deepspeed)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if run_log.exists() and max(_losses(run_log) or {0: 0}) >= 17:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    if use_deepspeed:
        resumed_from = int(latest_tag(str(ckpt))[len("step"):])
    else:
        resumed_from = int(safe_load(str(ckpt / "latest.pt"))["step"])
    assert 15 <= resumed_from < steps
    subprocess.run(cmd + ["--resume"], env=env, check=True, timeout=240,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref, got = _losses(ref_log), _losses(run_log)
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [ref[s] for s in range(1, steps + 1)]
