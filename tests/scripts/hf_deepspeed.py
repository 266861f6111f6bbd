"""Converted Hugging Face MoE models trained under DeepSpeed with several gloo ranks, run by
tests/test_hf_deepspeed.py as

    python hf_deepspeed.py WORLD PORT OUT_DIR CASE [CASE ...]

A case is ``FAMILY:EP:ZERO[:noaux|:autoep]``: a tiny FAMILY model (tests/hf_models.py) converted by
``trilemma_moe.integrations.hf.initialize`` from the DeepSpeed config's ``"trilemma_moe"`` section
(``convert_hf_moe``, ``ep_size`` EP: at world 4 and EP 2 every expert group has a replica), ZeRO
stage ZERO, 6 optimizer steps. Each rank trains on its own token ids (three batches in turn); in step 2 every token of
ranks 0 and 1 is the same id (routing skewed onto few experts). ``noaux``: no balance/z loss (their
expert-parallel and one-process forms differ by design), for comparing across EP sizes.
``autoep``: the same model, data and optimizer under DeepSpeed's AutoEP instead
(``"expert_parallel": {"autoep_size": EP, "preset_model": FAMILY}``), side by side with ours.

Each rank writes OUT_DIR/<case>/rank<r>.json: the world-mean loss of every step, the loss of a
rank's first batch before and after, the layers' step counters, the routed-expert parameter count and a checksum per parameter
(gathered under ZeRO-3), so the test can compare curves across stages and EP sizes and check that
replicas hold the same parameters. The ``FAMILY:2:2`` case also saves a DeepSpeed checkpoint
(OUT_DIR/ckpt_FAMILY) and the logits of rank 0's first batch, for the test to reshard to ep 1.
"""
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))                   # tests/ (hf_models)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the checkout
import peer_matrix as PM  # noqa: E402

STEPS, BATCH, SEQ = 6, 2, 12


def ds_config(ep, zero, aux):
    section = {"convert_hf_moe": True, "ep_size": ep, "rank": 8, "seed": 3, "comm_timeout_s": 120}
    if not aux:
        section.update(aux_loss_coef=0.0, z_loss_coef=0.0)
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": zero}, "trilemma_moe": section}
    if zero == 3:   # partition every parameter, however small
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return cfg


def batch(rank, step):
    """Rank ``rank``'s ids in ``step``: three batches of its own in turn (so training lowers their loss)."""
    gen = torch.Generator().manual_seed(1000 * rank + step % 3)
    ids = torch.randint(0, 96, (BATCH, SEQ), generator=gen)
    if step == 2 and rank in (0, 1):
        ids.fill_(7)
    return ids


def checksums(engine):
    import deepspeed
    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[name] = [float(p.detach().double().sum()), float(p.detach().double().square().sum())]
    return out


def autoep_config(ep, zero, family):
    """The same run under DeepSpeed's AutoEP (its expert-parallel layer in place of the block)."""
    cfg = ds_config(ep, zero, True)
    del cfg["trilemma_moe"]
    cfg["expert_parallel"] = {"enabled": True, "autoep_size": ep, "preset_model": family}
    return cfg


def expert_parameters(engine, ep):
    """Routed-expert parameters of the whole model: those DeepSpeed tags as expert parameters
    (``allreduce=False``, ours and AutoEP's alike) held here, times the ranks that split them."""
    return ep * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                    if getattr(p, "allreduce", True) is False)


def run_case(case, out_dir):
    import deepspeed
    from hf_models import tiny_model
    from trilemma_moe.integrations.hf import ClusteredMoEBlock, initialize
    family, ep, zero, *flags = case.split(":")
    autoep = "autoep" in flags
    ep, zero = int(ep), int(zero)
    model = tiny_model(family, seed=0, experts="grouped_mm" if autoep else "eager")
    if autoep:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=autoep_config(ep, zero, family))
    else:
        engine, *_ = initialize(model, ds_config(ep, zero, "noaux" not in flags))
    rank, world = dist.get_rank(), dist.get_world_size()
    probe = batch(rank, 0)

    def evaluate():
        engine.eval()
        with torch.no_grad():
            loss = engine(probe, labels=probe).loss.detach()
        engine.train()
        return float(loss)
    before = evaluate()
    curve = []
    for step in range(STEPS):
        ids = batch(rank, step)
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        curve.append(float(mean) / world)
    layers = [m.moe.moe for m in engine.module.modules() if isinstance(m, ClusteredMoEBlock)]
    resume = None
    if layers and ep > 1 and zero == 2 and "noaux" not in flags:
        # what a DeepSpeed checkpoint of this run computes, for the test to reshard it to ep 1
        engine.save_checkpoint(os.path.join(out_dir, f"ckpt_{family}"))
        probe0 = batch(0, 0)
        engine.eval()
        with torch.no_grad():
            resume = engine(probe0).logits.double().tolist()
        engine.train()
    save_refused = None
    if layers and ep > 1:   # a file of one rank's groups would be an incomplete model
        try:
            engine.module.save_pretrained(os.path.join(out_dir, f"saved_{rank}"))
            save_refused = False
        except ValueError as exc:
            save_refused = "engine.save_checkpoint" in str(exc)
    return {"curve": curve, "before": before, "after": evaluate(), "steps": [layer.step for layer in layers],
            "clustered": all(layer.clustered for layer in layers), "checksums": checksums(engine),
            "expert_parameters": expert_parameters(engine, ep), "save_refused": save_refused,
            "probe_logits": resume,
            "expert_names": [n for n, p in engine.module.named_parameters() if getattr(p, "allreduce", True) is False]}


if __name__ == "__main__":
    PM.spawn_cases(run_case)
