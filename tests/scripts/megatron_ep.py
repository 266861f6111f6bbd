"""A Megatron-core GPTModel whose MLPs are our layer, trained on gloo CPU ranks; run by
tests/test_megatron_ep.py as

    python megatron_ep.py WORLD EP PORT OUT_DIR MODE [CKPT_DIR]

MODE ``train``: STEPS optimizer steps (first clustering after step 3, regroup checks every 3
steps, and after step FORCE_AFTER a regroup forced onto a different partition, so experts move
between slots and, at ep 2, between ranks, with their Adam moments), saving a dist checkpoint (model + Adam state) after
step SAVE_AFTER into CKPT_DIR when given. MODE ``resume``: load CKPT_DIR, run the remaining steps.

Data: every step has one global batch of GLOBAL_BATCH sequences; rank r of a world of W reads
rows [r*GLOBAL_BATCH/W, (r+1)*GLOBAL_BATCH/W) (each rank its own data). Gradients are reduced
as Megatron's DistributedDataParallel does (``megatron_train.reduce_gradients``; its CUDA grad
buffers cannot run here): a parameter with ``allreduce = False`` over the expert-data-parallel
group, any other over the data-parallel group, both divided by the data-parallel size. So W ranks match one rank fed the whole batch: the
main loss is a mean per rank, averaged; our balance loss is computed over the expert-parallel
group's tokens, whose gradients sum over the ranks. Each rank writes OUT_DIR/rank<r>.json with
the global loss of every step (the mean of the ranks' losses).

The functions are imported by tests/test_megatron.py for its one-process checks.
"""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: layer_reference
from trilemma_moe.integrations.megatron_train import (
    load_checkpoint,
    reduce_gradients,
    save_checkpoint,
)

SEQ, VOCAB, GLOBAL_BATCH, STEPS, SAVE_AFTER, FORCE_AFTER = 16, 64, 8, 9, 5, 7
# the paper's similarity without move cost: force_regroup steers groupings through the centroids;
# dynamic_regroup: the regroup checks every 3 steps above (the library's default clusters once)
KNOBS = {"rank": 4, "burn_in": 3, "recluster_interval": 3, "delta": 0.0, "seed": 7, "alpha": 0.0,
         "regroup_similarity": "weights", "regroup_move_cost": 0.0, "dynamic_regroup": True}


def init_parallel(world: int, rank: int, port: int, ep: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)


def transformer_config(ep: int = 1, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig
    values = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
                  "use_cpu_initialization": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "num_moe_experts": 8, "moe_router_topk": 2, "moe_router_num_groups": 4, "moe_router_group_topk": 1,
                  "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 0.001, "expert_model_parallel_size": ep}
    values.update(overrides)
    return TransformerConfig(**values)


def build_gpt(ep: int = 1, knobs=None, **overrides):
    """The same initial weights at every world and ep size (dense: torch's CPU generator seeded
    here; experts and router: our seeds, independent of placement)."""
    from megatron.core.models.gpt import GPTModel

    from trilemma_moe.integrations.megatron import gpt_layer_spec
    config = transformer_config(ep, **overrides)
    torch.manual_seed(0)
    return GPTModel(config, transformer_layer_spec=gpt_layer_spec(config, dict(KNOBS, **(knobs or {}))),
                    vocab_size=VOCAB, max_sequence_length=SEQ)


def batch(step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Token rows with structure (each sequence counts up by a stride from a random start), the
    same global batch at every world size."""
    g = torch.Generator().manual_seed(1000 + step % 4)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    rows = (start + stride * torch.arange(SEQ)) % VOCAB
    per = GLOBAL_BATCH // world
    return rows[rank * per:(rank + 1) * per]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    from trilemma_moe.integrations.megatron_cpu import causal_mask
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, pos, causal_mask(ids.shape[1]), labels=ids).mean()


def train_steps(model, opt, steps, rank: int = 0, world: int = 1, on_step=None):
    curve = []
    for step in steps:
        loss = lm_loss(model, batch(step, rank, world))
        opt.zero_grad()
        loss.backward()
        reduce_gradients(model)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        curve.append(float(total) / world)
        if on_step is not None:
            on_step(step)
    return curve


def make_optimizer(model):
    from trilemma_moe.integrations.megatron import attach_megatron_optimizer
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    attach_megatron_optimizer(model, opt)
    return opt


def force_regroup(model) -> None:
    """Centroids set (the same on every rank) so that clustering must change the partition, then
    a regroup now (collective: every rank calls it at the same step)."""
    from layer_reference import _force_new_grouping
    for layer in megatron_layers(model):
        _force_new_grouping(layer.moe, seed=layer.moe.layer_index)
        assert layer.recluster(force=True)


def megatron_layers(model):
    from trilemma_moe.integrations.megatron import TrilemmaMegatronMoE
    return [m for m in model.modules() if isinstance(m, TrilemmaMegatronMoE)]


def layer_report(model):
    layers = megatron_layers(model)
    return [{"reclusters": lay.stats()["reclusters"], "step": lay.stats()["step"],
             "moved": lay.stats().get("moved_experts", 0),
             "groups": lay.group_assignment().tolist()} for lay in layers]


def worker(rank: int, world: int, ep: int, port: int, out_dir: str, mode: str, ckpt) -> None:
    from trilemma_moe.integrations.megatron_cpu import cpu_attention_substitutes
    torch.set_num_threads(1)
    init_parallel(world, rank, port, ep)
    with cpu_attention_substitutes():    # for MEGATRON's attention only (see megatron_cpu.py)
        model = build_gpt(ep)
        opt = make_optimizer(model)
        out = {}

        def between_steps(step, save_to):
            if save_to and step == SAVE_AFTER - 1:
                save_checkpoint(model, opt, save_to)
            if step == FORCE_AFTER - 1:
                force_regroup(model)
        if mode == "train":
            out["curve"] = train_steps(model, opt, range(STEPS), rank, world, lambda step: between_steps(step, ckpt))
        else:
            load_checkpoint(model, opt, ckpt)
            out["curve"] = train_steps(model, opt, range(SAVE_AFTER, STEPS), rank, world,
                                       lambda step: between_steps(step, None))
        out["layers"] = layer_report(model)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _entry(rank, *args):
    try:
        worker(rank, *args)
    except BaseException:  # noqa: BLE001  (any failure: print it, leave without waiting on peers)
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)   # no waiting on peers that are still inside a collective


if __name__ == "__main__":
    world, ep, port, out_dir, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ckpt = sys.argv[6] if len(sys.argv) > 6 else None
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_entry, args=(world, ep, port, out_dir, mode, ckpt), nprocs=world, start_method="spawn")
