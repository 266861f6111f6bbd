"""Run by tests/test_launch_ep.py under the real `deepspeed` launcher (or alone as one rank, with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set):
    ep_deepspeed.py EP_SIZE ZERO_STAGE OUT_DIR DTYPES [save]

DTYPES is fp32, bf16 or both (fp32,bf16): one run per dtype, one after the other in this process,
since starting the ranks costs more than their steps. In each run a tiny LM holding
TrilemmaMoE(ep_size=EP_SIZE) trains under deepspeed.initialize at ZeRO stage ZERO_STAGE on one
global batch per step split across the ranks, through the first clustering and a forced regroup
(activation statistics scrambled the same way on every rank) that moves experts between groups,
so between ranks: slot contents and Adam moments go through DeepSpeed's fp32 partitions
(safe_get/set_full_*). Each rank writes OUT_DIR/<dtype>/rank<r>.json; rank 0's holds the global
loss curve, which the test compares with the one-rank run. With ``save``, the fp32 run writes a
DeepSpeed checkpoint to OUT_DIR/fp32/ckpt and the loss of a fixed batch to its JSON (the test
reloads the checkpoint at ep_size 1).
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

GLOBAL_BATCH = 4


def run(ep_size, stage, out_dir, dtype, save):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    layer = TrilemmaMoE(16, ffn(), num_experts=8, k=2, ep_size=ep_size,
                        config=small_config(alpha=0.0, burn_in=2, recluster_interval=100, comm_timeout_s=60))
    model = TinyLM(layer)
    micro = GLOBAL_BATCH // world
    ds_config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": stage}}
    if dtype == "bf16":
        ds_config["bf16"] = {"enabled": True}   # fp32 masters in DeepSpeed's bf16 optimizer
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds_config)
    attach_engine(engine)
    gen = torch.Generator().manual_seed(100)   # the same global batches whatever the world size
    curve, moved = [], 0
    for step in range(8):
        if step == 5:
            with torch.no_grad():
                c = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
                layer.moe.centroids.copy_(c)
            assert layer.recluster(force=True)
            moved = layer.stats()["moved_experts"]
        idx = torch.randint(0, V, (GLOBAL_BATCH, 12), generator=gen)[rank * micro:(rank + 1) * micro]
        loss = engine(idx)
        engine.backward(loss)
        engine.step()
        g = loss.detach().clone()
        torch.distributed.all_reduce(g)
        curve.append(float(g) / world)
    eval_loss = None
    if save:
        # a DeepSpeed checkpoint written under expert parallelism (files per global slot), and the
        # loss of a fixed batch the test recomputes from it in one process at ep_size 1
        from trilemma_moe.integrations.checkpoint import save_checkpoint
        save_checkpoint(engine, os.path.join(out_dir, "ckpt"))
        engine.eval()
        with torch.no_grad():
            idx = torch.randint(0, V, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(999))
            e = engine(idx[rank * micro:(rank + 1) * micro]).detach().clone()
        torch.distributed.all_reduce(e)
        eval_loss = float(e) / world
    comm = layer.comm_stats()
    result = {"world": world, "ep_size": ep_size, "dtype": dtype, "curve": curve, "moved": moved,
              "reclusters": layer.stats()["reclusters"], "local_groups": layer.moe.experts.G,
              "migration_bytes": comm.get("bytes_regroup_migration", 0), "eval_loss": eval_loss}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ep_size, stage, out_dir, dtypes = int(args[0]), int(args[1]), args[2], args[3].split(",")
    if not set(dtypes) <= {"fp32", "bf16"}:
        raise SystemExit(f"ep_deepspeed.py: DTYPES is fp32, bf16 or fp32,bf16, not {args[3]!r}")
    deepspeed.init_distributed(dist_backend="gloo")
    for dtype in dtypes:
        os.makedirs(os.path.join(out_dir, dtype), exist_ok=True)
        run(ep_size, stage, os.path.join(out_dir, dtype), dtype, save="save" in args[4:] and dtype == "fp32")


if __name__ == "__main__":
    from trilemma_moe.parallel.topology import leave_process_group

    main()
    leave_process_group()
