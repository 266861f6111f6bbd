import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from trilemma_moe.integrations.hf import initialize

model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=1000, hidden_size=128, moe_intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_experts=8, num_experts_per_tok=2))
ds_config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
             "trilemma_moe": {"convert_hf_moe": True, "rank": 16}}   # and "ep_size": 2 across 2 ranks
engine, optimizer, _, _ = initialize(model, ds_config)   # converts, MoE parameter groups, attach_engine
for step in range(10):
    ids = torch.randint(0, 1000, (8, 32))
    loss = engine(ids, labels=ids).loss                  # includes our layers' balance loss
    engine.backward(loss)
    engine.step()
print(f"loss {loss.item():.3f}")
