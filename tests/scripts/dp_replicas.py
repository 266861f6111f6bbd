"""Run by tests/test_data_parallel.py as N gloo processes (deepspeed launcher or torchrun env).

Trains a tiny LM holding TrilemmaMoE under deepspeed.initialize (ZeRO stage from argv) on
rank-dependent data, with activation centroids that differ per rank, across regroups. Writes, per
rank, the group assignment, every parameter and the layer's buffers in full (rank<r>.pt) so the test
can check replicas agree.
"""
import json
import os
import sys

import torch

torch.set_num_threads(1)
import deepspeed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_deepspeed import TinyLM, V, ffn, small_config  # noqa: E402

from trilemma_moe import TrilemmaMoE  # noqa: E402
from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups  # noqa: E402


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stage, out_dir = int(args[0]), args[1]
    # "weights": a regroup forced through rank-specific centroids; "probe": the default rule, each
    # rank with its own probe tokens (rank 0's decide), regrouping on its own
    rule = args[2] if len(args) > 2 else "weights"
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = small_config(alpha=0.0) if rule == "weights" else small_config(alpha=0.5, regroup_similarity="probe")
    model = TinyLM(TrilemmaMoE(16, ffn(), num_experts=8, k=2, config=cfg))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds_config)
    attach_engine(engine)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    moved, at_regroup = 0, None
    for step in range(8):
        if step == 5 and rule == "weights":  # rank-specific centroids: without agreement the replicas would regroup differently
            with torch.no_grad():
                model.moe.moe.centroids.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(rank)))
            model.moe.recluster(force=True)
            moved = model.moe.stats()["moved_experts"]
            at_regroup = model.moe.moe.centroids.detach().clone()   # averaged over the replicas first
        loss = engine(torch.randint(0, V, (2, 12), generator=gen))
        engine.backward(loss)
        engine.step()
        if rule == "probe":
            moved = model.moe.stats()["experts_moved"]
    # every tensor in full: parameters and the layer's buffers (slot table, counters, centroids)
    layer = model.moe.moe
    torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "buffers": {n: getattr(layer, n).detach().clone()
                            for n in ("expert_of_slot", "counters", "centroids", "centroid_seen")},
                "centroids_at_regroup": at_regroup},
               os.path.join(out_dir, f"rank{rank}.pt"))
    result = {"rank": rank, "world": world, "assignment": model.moe.group_assignment().tolist(),
              "reclusters": model.moe.stats()["reclusters"], "moved": moved}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    from trilemma_moe.parallel.topology import leave_process_group

    main()
    leave_process_group()
