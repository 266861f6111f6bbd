"""ZeRO-Infinity with our layer, run by tests/test_zero3.py as

    python zero3_infinity.py WORLD PORT OUT_DIR nvme

(the swap files go to OUT_DIR/nvme_files)

WORLD gloo ranks (peer_matrix.py's spawn), each with its own data, train the same bf16 model
twice under ZeRO-3: once with parameters and optimizer state on NVMe (``offload_param`` and
``offload_optimizer`` ``device: nvme``), once with both in memory (optimizer state offloaded to
the CPU, so both runs step DeepSpeed's CPU Adam). Burn-in 2 (compressed), the first clustering,
then a forced regroup *between* steps that moves experts and decomposes the changed groups afresh
(``regroup_migration="redecompose"``, so the bases change): the next forward gathers the experts
from their partitions, so a regroup write that missed the NVMe files would be read back stale.
Checked in the workers: the expert bases really live on NVMe (their partitions' final location,
the swap files), the regroup moved experts, and the two loss curves and final parameters are equal
(same arithmetic, only where the bytes rest differs).

Expert bases are G x d x d_ff = 2 x 512 x 2048: each rank's partition is 2 MiB in bf16, above
DeepSpeed's 1 MiB floor for swapping a tensor (smaller ones stay in memory).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_matrix as PM  # noqa: E402

D, F, E, G, TOKENS, STEPS, REGROUP_BEFORE = 512, 2048, 8, 2, 8, 6, 4


class Net(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.moe = moe
        self.head = nn.Linear(D, D)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        y, l_aux, _ = self.moe(h)
        return (self.head(h + y).float() - x.float().roll(1, -1)).square().mean() + l_aux


def build(zero_optimization):
    import deepspeed
    from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
    from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups
    torch.manual_seed(0)
    cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=4, top_k=2, burn_in=2, recluster_interval=100,
                            delta=0.0, alpha=0.0, seed=3, burn_in_form="compressed", regroup_similarity="weights",
                            regroup_migration="redecompose")   # the regroup rewrites the bases (those on NVMe)
    model = Net(TrilemmaMoE(D, nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D)), num_experts=E, k=2,
                            config=cfg))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
          "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
          "zero_optimization": dict(stage=3, stage3_param_persistence_threshold=0, **zero_optimization),
          "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds)
    attach_engine(engine)
    return engine, model.moe


def train(engine, layer):
    rank = dist.get_rank()
    curve = []
    for step in range(STEPS):
        if step == REGROUP_BEFORE:
            PM.scramble(layer, step)
            assert layer.recluster(force=True)
        x = torch.randn(2, TOKENS, D, generator=torch.Generator().manual_seed(100 * step + rank)).bfloat16()
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        curve.append(PM.global_loss(loss))
    return curve, PM.flat_params(engine.module), layer.stats()["moved_experts"]


def run_case(case, out_dir):
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    assert case == "nvme", case
    nvme_dir = os.path.join(out_dir, "nvme_files")
    # max_in_cpu 0: every swappable partition lives on NVMe (by default the first 1e9 elements stay in memory)
    on_nvme = {"offload_param": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False, "max_in_cpu": 0},
               "offload_optimizer": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False}}
    engine, layer = build(on_nvme)
    bases = list(layer.moe.experts.base.values())
    assert all(p.ds_tensor.final_location == OffloadDeviceEnum.nvme for p in bases), \
        [p.ds_tensor.final_location for p in bases]
    curve_nvme, params_nvme, moved = train(engine, layer)
    swap_files = sorted(os.listdir(os.path.join(nvme_dir, "zero_stage_3", "bfloat16params", f"rank{dist.get_rank()}")))
    del engine
    engine, layer = build({"offload_optimizer": {"device": "cpu"}})
    curve_mem, params_mem, moved_mem = train(engine, layer)
    assert moved == moved_mem and moved > 0, (moved, moved_mem)
    assert curve_nvme == curve_mem, (curve_nvme, curve_mem)
    differ = [n for n in params_mem if not torch.equal(params_nvme[n], params_mem[n])]
    assert not differ, f"parameters differ between NVMe and memory: {differ}"
    return {"curve_nvme": curve_nvme, "curve_memory": curve_mem, "moved": moved, "swap_files": swap_files}


if __name__ == "__main__":
    PM.spawn_cases(run_case)
