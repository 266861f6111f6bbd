import deepspeed, torch, torch.nn as nn
from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups

class Model(nn.Module):   # any model whose FFN is a DeepSpeed-MoE layer: ours takes MoE's arguments
    def __init__(self, d=64):
        super().__init__()
        expert = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.moe = TrilemmaMoE(d, expert, num_experts=8, ep_size=1, k=2,
                               config=TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=8, burn_in=10))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        output, l_aux, exp_counts = self.moe(x)        # l_aux is already weighted: add it as it is
        return (self.head(output) - x).pow(2).mean() + l_aux

model = Model()
ds_config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds_config)
attach_engine(engine)   # on every rank: regroups move Adam state through DeepSpeed's optimizer
for step in range(20):
    loss = engine(torch.randn(8, 16, 64))
    engine.backward(loss)
    engine.step()
print(f"loss {loss.item():.3f}, clustered {model.moe.stats()['clustered']}, groups {model.moe.group_assignment().tolist()}")
