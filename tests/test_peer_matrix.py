"""The distributed matrix of tests/scripts/peer_matrix.py, one spawn of 4 gloo CPU processes
(each rank with its own data): ep_size x ZeRO stage through skewed routing, empty micro-batches, a
skipped step, the first clustering and a regroup that moves experts; expert gradient parity across
ep sizes; checkpoints at ep_size 2 and 4 (ZeRO 0, 1, 2) resumed by DeepSpeed and read back by
`trilemma-moe reshard`. See the script's docstring. (World 4 holds ep_size 1, 2 and the whole
world, so a world-2 spawn would only repeat its cases.)"""
import json
import os
import pathlib
import subprocess
import sys

import deepspeed
import pytest
import torch
import torch.nn as nn

from trilemma_moe import TrilemmaMoE
from trilemma_moe.core.checkpoint import safe_load

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "peer_matrix.py"
sys.path.insert(0, str(SCRIPT.parent))
import peer_matrix as PM  # noqa: E402
from test_expert_parallel import free_port  # noqa: E402

WORLD = 4
CASES = ["train:1:0", "train:1:1", "train:1:2", "train:2:0", "train:2:1", "train:2:2:ckpt", "train:4:0:ckpt",
         "train:4:1:ckpt", "train:4:2", "train:2:2:bf16", "train:1:1:bf16", "train:2:1:client", "train:4:2:client",
         "parity:0", "parity:1", "parity:2",
         "train:1:3", "train:2:3:ckpt", "train:4:3:ckpt", "train:2:3:client", "parity:3",
         "z3pair:1", "z3pair:2", "z3pair:4", "z3pair:2:int4", "z3pair:1:recompute"]
# README: "expert gradients agree across ep sizes to ..." (the worst relative difference measured
# over the parity cases, with margin for other CPUs' summation order)
PARITY_README = 1e-5


def _case_dir(out, case):
    return out / case.replace(":", "_")


def run_spawned(script, world, cases, out, timeout=900):
    """``script WORLD PORT OUT CASE...`` (one spawn of WORLD gloo ranks runs every case, see
    scripts/peer_matrix.py's spawn_cases): {case: [rank 0's result, rank 1's, ...]}, each result
    keyed by the rank written inside it (not by the file's name)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), str(world), str(free_port()), str(out), *cases],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    results = {}
    for case in cases:
        per_rank = {}
        for path in sorted(_case_dir(out, case).glob("rank*.json")):
            rec = json.loads(path.read_text())
            assert path.name == f"rank{rec['rank']}.json" and rec["rank"] not in per_rank, path
            per_rank[rec["rank"]] = rec
        results[case] = [per_rank[r] for r in sorted(per_rank)]
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp(f"matrix{WORLD}")
    return WORLD, run_spawned(SCRIPT, WORLD, CASES, out), out


def test_every_case_ran_on_every_rank(matrix):
    world, results, out = matrix
    records = [json.loads(p.read_text()) for p in sorted((out / "ran").glob("rank*.json"))]
    assert sorted(r["rank"] for r in records) == list(range(world)), records
    assert len({r["pid"] for r in records}) == world            # one process per rank
    for rec in records:
        assert rec["world"] == world and rec["cases"] == CASES, rec   # all of them, in order
    for case, ranks in results.items():
        assert [r["rank"] for r in ranks] == list(range(world)), case


def test_training_survives_skew_empty_batches_and_a_skipped_step(matrix):
    world, results, _ = matrix
    for case, ranks in results.items():
        if not case.startswith("train"):
            continue
        r = ranks[0]
        start, end = r["eval"]
        assert end < 0.8 * start, case
        assert r["moved"] > 0, case                         # the regroup moved experts
        zero = r["zero"]
        assert r["skipped_steps"] == (1 if zero in PM.NAN_STAGES else 0), case
        assert r["layer_step"] == 12 - r["skipped_steps"], case
        for other in ranks[1:]:
            assert other["curve"] == pytest.approx(r["curve"], nan_ok=True), case


def test_checkpoints_continue_the_curve_and_refuse_another_ep_size(matrix):
    world, results, _ = matrix
    assert {ranks[0]["zero"] for case, ranks in results.items() if "ckpt" in case} == {0, 1, 2, 3}
    for case, ranks in results.items():
        if "ckpt" not in case:
            continue
        r = ranks[0]
        assert r["resumed"] == pytest.approx(r["curve"][6:], rel=1e-5, nan_ok=True), case
        assert "ep_size" in r["other_ep_error"], case
        # the advice fits the stage: reshard at 0-2, the saved placement at 3
        assert ("ZeRO stage 3" if r["zero"] == 3 else "trilemma-moe reshard") in r["other_ep_error"], case


def test_zero3_trains_as_zero2_does(matrix):
    """The same training (compressed burn-in, skewed and empty steps, the first clustering, a
    regroup that moves experts) under ZeRO-2 and ZeRO-3 at ep 1 (experts partitioned over 4
    ranks), 2 and 4, with INT4 residuals at ep 2 and with recompute_experts at ep 1: the same loss
    curve and parameters to float tolerance."""
    world, results, _ = matrix
    for case in ("z3pair:1", "z3pair:2", "z3pair:4", "z3pair:2:int4", "z3pair:1:recompute"):
        r = results[case][0]
        assert r["moved"] > 0
        assert r["max_rel_loss_diff"] <= 1e-5 and r["max_rel_param_diff"] <= 1e-4, r


def test_expert_gradients_agree_across_ep_sizes(matrix):
    world, results, _ = matrix
    for case, ranks in results.items():
        if case.startswith("parity"):
            diffs = ranks[0]["max_rel_diff"]
            assert set(diffs) == {str(e) for e in {1, 2, world}}
            assert max(diffs.values()) < PARITY_README, (case, diffs)


def test_reshard_refuses_a_zero3_checkpoint_with_one_clear_error(matrix, tmp_path):
    from trilemma_moe.cli import main as cli_main
    world, results, out = matrix
    with pytest.raises(RuntimeError, match="ZeRO stage 3.*cannot be resharded"):
        cli_main(["reshard", str(_case_dir(out, "train:2:3:ckpt") / "ckpt"), "--out", str(tmp_path / "x.pt")])


@pytest.mark.parametrize("case", [c for c in CASES if "ckpt" in c and ":3:" not in c])
def test_reshard_reads_the_checkpoint_deepspeed_saved_under_expert_parallelism(matrix, tmp_path, case, dist_world_1):
    """`trilemma-moe reshard` turns the checkpoint the world-4 engine saved (expert files written by
    DeepSpeed's own _save_moe_checkpoint, one per global slot) into one ep-size-1 state dict: loaded
    into a fresh module it holds exactly the saved engine's weights and layer state, and computes the
    saved engine's evaluation loss. DeepSpeed's own loader at ep_size 1 reads the same."""
    from trilemma_moe.cli import main as cli_main
    world, results, out = matrix
    r = results[case][0]
    ckpt = _case_dir(out, case) / "ckpt"
    # the burn-in experts are dead after the first clustering: ZeRO keeps their storage, a plain
    # module releases it; neither's content matters
    saved = {name: t for name, t in torch.load(_case_dir(out, case) / "saved_weights.pt", weights_only=True).items()
             if ".experts.full." not in name}
    assert any(name.startswith("moe.moe.experts.") for name in saved)
    resharded = tmp_path / "ep1.pt"
    assert cli_main(["reshard", str(ckpt), "--out", str(resharded)]) == 0

    def check(module, what):
        params = {n: p for n, p in module.named_parameters() if p.numel() and ".experts.full." not in n}
        assert set(params) == {n for n in saved if n in dict(module.named_parameters())}, what
        tensors = dict(params, **dict(module.named_buffers()))
        for name, want in saved.items():
            assert torch.equal(tensors[name].detach(), want), f"{what}: {name} differs from the saved engine's"

    torch.manual_seed(11)   # another init than the saved run's: everything must come from the file
    model = PM.Net(TrilemmaMoE(PM.D, nn.Sequential(nn.Linear(PM.D, 24), nn.GELU(), nn.Linear(24, PM.D)),
                               num_experts=PM.E, k=2, config=PM.make_config()))
    model.load_state_dict(safe_load(str(resharded)))
    check(model, "reshard")
    model.eval()
    x = torch.randn(4, PM.TOKENS, PM.D, generator=torch.Generator().manual_seed(4242))   # peer_matrix.eval_loss's batch
    with torch.no_grad():
        loss = float(model(x, PM.teacher(x), torch.ones(4, PM.TOKENS, dtype=torch.bool), torch.zeros(PM.D)))
    assert loss == pytest.approx(r["saved_eval"], rel=1e-5), case

    engine, _ = PM.build(1, r["zero"])
    with torch.no_grad():   # nothing of this engine's own init may survive the load
        for p in engine.module.parameters():
            p.add_(1.0)
    path, _ = engine.load_checkpoint(str(ckpt), tag="after5", load_module_only=True)
    assert path is not None
    check(engine.module, "DeepSpeed's loader at ep_size 1")


def test_fp16_dynamic_loss_scaling_skips_are_not_counted(dist_world_1, monkeypatch):
    """A loss scale of 2^24 overflows the first steps: DeepSpeed skips them and halves the scale
    until steps apply. The layer counts applied steps only, so its first clustering comes after
    burn_in applied steps, whatever was skipped before."""
    import torch.nn as nn
    from deepspeed.accelerator import get_accelerator
    from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
    from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups

    # DeepSpeed's CPU accelerator reports fp16 only where oneDNN has native fp16 kernels
    # (torch.ops.mkldnn._is_mkldnn_fp16_supported()); torch computes fp16 on any CPU, so the test
    # runs everywhere instead of skipping on CPUs without them.
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(16, 16)
            self.moe = TrilemmaMoE(16, nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
                                   num_experts=8, k=2,
                                   config=TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=4, burn_in=2, seed=3))

        def forward(self, x):
            y, l_aux, _ = self.moe(self.pre(x))
            return y.float().square().mean() + l_aux

    torch.manual_seed(0)
    model = Net()
    cfg = {"train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True, "initial_scale_power": 24,
                                                         "loss_scale_window": 1000, "hysteresis": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=cfg)
    attach_engine(engine)
    device = get_accelerator().device_name()
    clustered_at = None
    for _ in range(20):
        loss = engine(torch.randn(4, 6, 16, device=device, dtype=torch.float16))
        if clustered_at is None and model.moe.moe.compressed:
            clustered_at = engine.global_steps - engine.skipped_steps   # applied steps before this one
        engine.backward(loss)
        engine.step()
    print(f"fp16: {engine.global_steps} steps, {engine.skipped_steps} skipped, layer step {model.moe.moe.step}, "
          f"clustered after {clustered_at} applied steps")
    # README: "9 of 20 steps skipped": the halvings from 2^24 until this seed's gradients fit in fp16;
    # every skip halved the scale once (hysteresis 1, no growth within loss_scale_window)
    assert engine.skipped_steps == 9
    assert engine.optimizer.cur_scale == 2.0 ** (24 - engine.skipped_steps)
    assert model.moe.moe.step == engine.global_steps - engine.skipped_steps
    assert clustered_at == 2
