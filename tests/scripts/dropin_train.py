"""TrilemmaMoE built from DeepSpeed MoE's arguments alone, trained the way DeepSpeed's own MoE
tests train theirs (tests/unit/v1/moe/test_moe.py: TestSimpleMoE, TestMoE): run by
tests/test_dropin.py as

    python dropin_train.py WORLD PORT OUT_DIR CASE [CASE ...]

One spawn of WORLD gloo CPU processes runs every CASE ``E:EP:ZERO`` in sequence. The model is
DeepSpeed's SimpleMoEModel in our words: dense, MoE, dense, MoE, dense layers (dense and expert
gradients interleave in ZeRO-2's buckets), both MoE layers built from ONE expert template
``Linear(16, 16) -> Linear(16, 16)`` with ``TrilemmaMoE(hidden_size=16, expert=..., num_experts=E,
ep_size=EP)``: no config, no k, no layer_index. The engine gets no parameter groups (it makes the
MoE groups itself). Each rank reads its own data. Checked per case, in the workers:

* routing is top-1 (each layer's exp_counts sums to this rank's token count);
* after the first backward, every gradient the engine holds (``safe_get_full_grad``) equals a
  float64 reference computed in one process from ALL ranks' batches: the same weights with
  ep_size 1 (the global expert slots gathered from their owners), loss = mean of the ranks'
  losses. A dense gradient reduced over the wrong group, or an expert gradient averaged with a
  rank that holds other experts, differs from it;
* the loss over 10 steps (each rank cycling its own two batches) is finite and falls.

Each rank writes OUT_DIR/<case>/rank<r>.json with what it measured; a failed check is a non-zero
exit with the traceback.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_matrix import global_loss, spawn_cases  # noqa: E402

H, SEQ, BATCH, STEPS = 16, 8, 2, 10


class SimpleMoE(nn.Module):
    def __init__(self, num_experts, ep_size=1, **knobs):
        super().__init__()
        from trilemma_moe import TrilemmaMoE
        expert = nn.Sequential(nn.Linear(H, H), nn.Linear(H, H))   # one template for both layers
        self.linear1 = nn.Linear(H, H)
        self.moe_1 = TrilemmaMoE(hidden_size=H, expert=expert, num_experts=num_experts, ep_size=ep_size, **knobs)
        self.linear2 = nn.Linear(H, H)
        self.moe_2 = TrilemmaMoE(hidden_size=H, expert=expert, num_experts=num_experts, ep_size=ep_size, **knobs)
        self.linear3 = nn.Linear(H, H)
        self.counts = []

    def forward(self, x, y):
        h = self.linear1(x)
        out, _, c1 = self.moe_1(h)      # l_aux left out, as DeepSpeed's SimpleMoEModel does
        out, _, c2 = self.moe_2(self.linear2(out))
        self.counts = [int(c1.sum()), int(c2.sum())]
        h = h + self.linear3(out)
        return nn.functional.cross_entropy(h.mean(1), y)


def batch(case_seed, step, rank, dtype=torch.float32):
    g = torch.Generator().manual_seed(10_000 * case_seed + 100 * (step % 2) + rank)
    return torch.randn(BATCH, SEQ, H, generator=g, dtype=dtype), torch.randint(0, H, (BATCH,), generator=g)


def expert_rows(name, layer):
    """(offset, local count) of a stacked expert tensor's leading axis in the global layout."""
    slots = layer.moe.experts
    if ".base." in name:
        return slots.group_offset, slots.G
    return slots.group_offset * slots.K, slots.num_experts


def layer_of(model, name):
    return getattr(model, name.split(".")[0])


def reference_grads(model, data):
    """Gradients of mean_r loss_r(all ranks' batches) in float64, in one process, through the same
    weights at ep_size 1 (each rank's expert rows gathered to their global place)."""
    mine = {n: (expert_rows(n, layer_of(model, n)), p.detach().double())
            for n, p in model.named_parameters() if ".moe.experts." in n}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    cfg = model.moe_1.config
    ref = SimpleMoE(cfg.num_experts, num_groups=cfg.num_groups, rank=cfg.rank).double()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".moe.experts." in n:
                for (off, count), t in (part[n] for part in every):
                    p[off:off + count] = t
            else:
                p.copy_(model.get_parameter(n).detach())
    # one forward over every rank's batch (equal sizes: the mean of the ranks' mean losses); a layer
    # no optimizer tells of steps counts forwards, so a second forward would see another temperature
    loss = ref(torch.cat([x for x, _ in data]).double(), torch.cat([y for _, y in data]))
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def check_gradients(engine, model, x, y):
    """Every gradient the engine holds after backward against the float64 reference."""
    from deepspeed.utils import safe_get_full_grad
    data = [None] * dist.get_world_size()
    dist.all_gather_object(data, (x, y))
    want = reference_grads(model, data)
    worst = {}
    for n, p in model.named_parameters():
        got, ref = safe_get_full_grad(p), want[n]
        if ref is None:   # the expert form not in use (idle in this phase): nothing may arrive either
            assert got is None or not got.any(), f"{n}: a gradient where the reference has none"
            continue
        if ".moe.experts." in n:
            off, count = expert_rows(n, layer_of(model, n))
            ref = ref[off:off + count]
        assert got is not None, f"{n}: no gradient"
        err = float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        worst[n] = err
        assert err < 1e-5, f"{n}: gradient differs from the all-ranks float64 reference by {err:.2e} (relative)"
    return worst


def run_case(E, ep, zero):
    import deepspeed
    from trilemma_moe.integrations.deepspeed import attach_engine
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SimpleMoE(E, ep)
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": zero}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    attach_engine(engine)
    seed = 100 * E + 10 * ep + zero
    losses, worst = [], None
    for step in range(STEPS):
        x, y = batch(seed, step, rank)
        loss = engine(x, y)
        assert model.counts == [BATCH * SEQ] * 2, f"top-1: exp_counts sum to {model.counts}, tokens {BATCH * SEQ}"
        engine.backward(loss)
        if step == 0:
            worst = check_gradients(engine, model, x, y)
        engine.step()
        losses.append(global_loss(loss))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.9 * first, f"loss did not fall: {losses}"
    c = model.moe_1.config
    return {"losses": losses, "grad_rel_err": worst, "num_groups": c.num_groups, "residual_rank": c.rank, "top_k": c.top_k}


def run(case, out_dir):
    return run_case(*(int(v) for v in case.split(":")))


if __name__ == "__main__":
    spawn_cases(run)
