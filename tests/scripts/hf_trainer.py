"""A converted tiny model (Mixtral unless FAMILY says otherwise) trained by transformers' Trainer (tests/test_hf_trainer.py):

    python hf_trainer.py OUT.json plain|zero2|zero3 PORT [FAMILY]

6 optimizer steps of 2 micro-batches each (gradient accumulation 2), AdamW at lr 1e-2, with
``attach_trainer``; without DeepSpeed, or with TrainingArguments(deepspeed=...) at ZeRO-2 or -3.
Writes the logged losses, the layers' step counters and the engine's type."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

out, mode, port = sys.argv[1], sys.argv[2], sys.argv[3]
family = sys.argv[4] if len(sys.argv) > 4 else "mixtral"
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_models import tiny_model  # noqa: E402
from trilemma_moe.integrations.hf import ClusteredMoEBlock, attach_trainer, convert_moe_blocks  # noqa: E402

torch.set_num_threads(1)
model = tiny_model(family)
convert_moe_blocks(model, rank=8)
ids = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": row, "labels": row} for row in ids]
ds = None
if mode != "plain":
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": int(mode[-1])}, "steps_per_print": 10 ** 9}
args = TrainingArguments(output_dir=os.path.join(os.path.dirname(out), "trainer"), max_steps=6,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, deepspeed=ds,
                         disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data)
attach_trainer(trainer)
trainer.train()
layers = [m.moe.moe for m in model.modules() if isinstance(m, ClusteredMoEBlock)]
with open(out, "w") as fh:
    json.dump({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "steps": [layer.step for layer in layers], "engine": type(trainer.model_wrapped).__name__}, fh)
