import torch
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments
from trilemma_moe.integrations.hf import attach_trainer, convert_moe_blocks, load_converted

# a small Mixtral; a trained one comes from MixtralForCausalLM.from_pretrained(path)
model = MixtralForCausalLM(MixtralConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8))
for report in convert_moe_blocks(model, rank=16):   # E=8, top-2: G=2 groups of 4 by default
    print(report["name"], f"error {report['relative_error']:.3f}",
          f"expert parameters {report['expert_parameters_before']:,} -> {report['expert_parameters_after']:,}")

data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 1000, (64, 32))]
ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 2}}   # no "optimizer" section: the Trainer's is used
args = TrainingArguments("out", max_steps=10, per_device_train_batch_size=8, learning_rate=1e-3,
                         deepspeed=ds_config, use_cpu=True, report_to=[])   # use_cpu: for a CPU machine
trainer = Trainer(model=model, args=args, train_dataset=data)
attach_trainer(trainer)     # optimizer over DeepSpeed's MoE parameter groups; attach_engine at train start
trainer.train()
model.save_pretrained("converted")   # safetensors with our layers' state, our knobs in config.json
model = load_converted("converted")
