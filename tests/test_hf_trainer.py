"""A converted model under transformers' Trainer (tests/scripts/hf_trainer.py, one process each):
Mixtral without DeepSpeed, and with TrainingArguments(deepspeed=...) at ZeRO-2 and ZeRO-3, the same
loss curve; Qwen3-MoE and DeepSeek-V3 at ZeRO-2; our layers count the optimizer steps, not the
micro-batches."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from test_peer_matrix import free_port

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "hf_trainer.py"


def _train(mode, tmp_path, family="mixtral"):
    out = tmp_path / f"{family}_{mode}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), mode, str(free_port()), family], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_trainer_with_and_without_deepspeed(tmp_path):
    runs = {mode: _train(mode, tmp_path) for mode in ("plain", "zero2", "zero3")}
    assert runs["zero2"]["engine"] == runs["zero3"]["engine"] == "DeepSpeedEngine"
    for mode, run in runs.items():
        assert run["steps"] == [6, 6], (mode, run)
        assert len(run["losses"]) == 6 and run["losses"][-1] < run["losses"][0] - 0.3, (mode, run)
        for a, b in zip(run["losses"], runs["plain"]["losses"]):
            assert abs(a - b) <= 1e-4 * abs(b), (mode, run["losses"], runs["plain"]["losses"])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_trainer_trains_the_other_families_under_deepspeed(tmp_path, family):
    run = _train("zero2", tmp_path, family)
    assert run["engine"] == "DeepSpeedEngine" and run["steps"] == [6, 6], run
    assert len(run["losses"]) == 6 and run["losses"][-1] < run["losses"][0] - 0.3, run


def test_trainer_refuses_a_deepspeed_optimizer_section(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_models import tiny_model
    from trilemma_moe.integrations.hf import attach_trainer, convert_moe_blocks
    model = tiny_model("mixtral")
    convert_moe_blocks(model)
    ds = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, deepspeed=ds, report_to=[])
    with pytest.raises(ValueError, match="\"optimizer\" section"):
        attach_trainer(Trainer(model=model, args=args, train_dataset=[]))
