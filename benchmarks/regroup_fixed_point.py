"""Why the paper's regroup rule never moves an expert after the first clustering: the mean
similarity of expert pairs in the same group vs in different groups, for the paper's S_param /
S_task and for the probe rule's (docs/REGROUP.md).

    OMP_NUM_THREADS=1 python benchmarks/regroup_fixed_point.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trilemma_moe import TrilemmaMoEConfig  # noqa: E402
from trilemma_moe.core import clustering, regroup  # noqa: E402
from trilemma_moe.core.layer import ClusteredMoE  # noqa: E402


def main():
    torch.manual_seed(0)
    for sim in ("weights", "probe"):
        # 30 burn-in steps, the first clustering, 30 compressed steps, no regroup after it
        cfg = TrilemmaMoEConfig(num_experts=32, num_groups=8, rank=8, burn_in=30, recluster_interval=10 ** 6,
                                regroup_similarity=sim, regroup_move_cost=0.0)
        m = ClusteredMoE(128, 512, cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m.attach_optimizer(opt)
        gen = torch.Generator().manual_seed(0)
        proj = torch.randn(128, 128, generator=gen) / 128 ** 0.5
        for _ in range(60):
            x = torch.randn(512, 128, generator=gen)
            y, l_aux, _ = m(x)
            ((y - torch.tanh(x @ proj)).pow(2).mean() + l_aux).backward()
            opt.step()
            opt.zero_grad()
        slot, g = m.slot_of_expert(), m.group_assignment()
        s_param = clustering.cosine_similarity_matrix(regroup.param_sketches(m, slot))
        if sim == "weights":
            s_task = clustering.task_similarity(m.centroids)
        else:
            s_task = clustering.probe_logit_similarity((m.probe @ m.router.expert_vec.detach().t())[:, slot])
        same = (g[:, None] == g[None, :]) & ~torch.eye(32, dtype=torch.bool)
        other = g[:, None] != g[None, :]
        for name, S in (("S_param", s_param), ("S_task", s_task)):
            print(f"{sim:8s} {name}: mean within current groups {S[same].mean():+.3f}, across {S[other].mean():+.3f}")


if __name__ == "__main__":
    main()
