import deepspeed, torch, torch.nn as nn
from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups

class Model(nn.Module):   # your model: our layer goes where DeepSpeed's MoE would
    def __init__(self, d=64):
        super().__init__()
        expert = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        knobs = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=8, burn_in=10)
        self.moe = TrilemmaMoE(d, expert, num_experts=8, ep_size=1, k=2, config=knobs)
        self.head = nn.Linear(d, d)

    def forward(self, x):
        output, l_aux, exp_counts = self.moe(x)   # l_aux is already weighted
        return (self.head(output) - x).pow(2).mean() + l_aux

model = Model()
ds_config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                  model_parameters=moe_param_groups(model))
attach_engine(engine)   # every rank: regroups move Adam state with the experts
for step in range(20):
    loss = engine(torch.randn(8, 16, 64))
    engine.backward(loss)
    engine.step()
stats = model.moe.stats()
print(f"loss {loss.item():.3f}, clustered {stats['clustered']}, "
      f"groups {model.moe.group_assignment().tolist()}")
torch.distributed.barrier()                  # ranks leave together: gloo can abort a rank
torch.distributed.destroy_process_group()    # torn down while a peer is still in a collective
