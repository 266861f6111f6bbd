"""The distributed test matrix, modelled on DeepSpeed's MoE unit tests (tests/unit/moe/test_moe.py,
tests/unit/checkpoint/test_moe_checkpoint.py): run by tests/test_peer_matrix.py as

    python peer_matrix.py WORLD PORT OUT_DIR CASE [CASE ...]

One spawn of WORLD gloo CPU processes runs every CASE in sequence (process start-up, gloo and
DeepSpeed's op build are paid once). Each rank reads its own data. A case is
``train:EP:ZERO[:bf16][:ckpt][:client]``, ``parity:ZERO`` or ``z3pair:EP[:int4][:recompute]``. ZERO 3 runs
with ``burn_in_form="compressed"`` (stage 3 requires it), the activation similarity (so that
scramble() decides the regroups, as the probe rule would not), every parameter partitioned
(``stage3_param_persistence_threshold: 0``) and no NaN step (ZeRO-3 skips non-finite steps in fp16
only, see NAN_STAGES); its ``train`` cases also check that expert parameters are partitioned over
their expert-data-parallel group and the rest over the whole world, and its ``ckpt`` cases that a
module-only load at another ep size is refused (DeepSpeed restores stage-3 weights for the saved
placement only).

train   A small net holding TrilemmaMoE (E=8, G=4, r=4, k=2, burn-in 3) under deepspeed.initialize
        at ZERO, expert parallel over EP ranks, 12 optimizer steps through the first clustering
        (step 3) and a forced regroup that moves experts (step 7). Routing is forced skewed in some
        steps (every token of ranks 0 and 1 to group 3: at world 4 and EP 2, rank 0 then receives nothing
        while its replica rank 2 does; at world 2 only rank 0 is skewed), some steps give one rank an all-False used_token or a batch of
        zero rows, and at ZeRO 1/2 one rank's batch holds a NaN token in step 6: the gradient norm
        is non-finite, the engine skips the step (what fp16 loss scaling does on an overflow) and
        the layer must not count it. Checked: the gradient hook order is the same on every rank
        in every step; the loss of a fixed evaluation batch falls; the skipped step changed no
        parameter and the layer's step equals the engine's applied steps; centroids stay finite;
        after training every parameter and layer buffer is identical across its replicas.
        ``client``: the optimizer is the user's torch AdamW over DeepSpeed's
        split_params_into_different_moe_groups_for_optimizer groups, not one from the config.
        ``ckpt``: engine.save_checkpoint after step 5, a fresh model and engine load it (optimizer
        state included) and continue: the loss curve must be the same; then loading the same
        checkpoint at another ep_size with its optimizer state must stop with one clear error naming
        `trilemma-moe reshard`, and loading the weights alone there must compute the same.
z3pair  The same training under ZeRO-2 and ZeRO-3 (compressed burn-in both times, no NaN step):
        loss curves within 1e-5 and final parameters within 1e-4 relative (summation order;
        each slot's factors compared as A B^T, which is free of the SVD's sign choice).
parity  The same net without balance/z losses (their per-rank and expert-parallel forms differ by
        design) and at learning rate 0, at EP 1, 2 and the world size, through the same skewed and
        empty steps, the first clustering and a regroup: expert gradients (``safe_get_full_grad``, in
        global slot order), router gradients and losses of every step must agree across EP sizes.

Assertions run in the workers (a failure is a non-zero exit with the traceback); each rank writes
OUT_DIR/<case>/rank<r>.json with what it measured, and keeps its own record of the cases it finished
in OUT_DIR/ran/rank<r>.json. A ``ckpt`` case's rank 0 also writes <case>/saved_weights.pt: the
saved engine's parameters and layer buffers in the ep-size-1 layout (expert slots gathered over the
expert-parallel group in global slot order), for tests/test_peer_matrix.py to check
``trilemma-moe reshard`` against.
"""
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

D, E, G, STEPS, TOKENS = 16, 8, 4, 12, 12
# ranks are taken modulo the world size; at world 2 only rank 0 is skewed
SKEW_STEPS, SKEW_GROUP = (1, 3, 5, 8), 3
EMPTY_MASK = {2: 3, 5: 3, 9: 0}    # step -> rank whose used_token is all False
ZERO_ROWS = {4: 1}                 # step -> rank whose micro-batch has no rows
NAN_STEP, NAN_RANK = 6, 3
# stages whose fp32 engine skips a step on a non-finite gradient norm: ZeRO-3 checks for overflow in
# fp16 only, so a NaN token would be applied there (to any model): its cases leave it out
NAN_STAGES = (1, 2)
CLUSTER_STEP, REGROUP_STEP, SAVE_AFTER = 3, 7, 5
# expert gradients, max |g_ep - g_ep1| / max |g_ep1| per tensor and step (README quotes this bound)
PARITY_TOL = 1e-5


class Net(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.moe = moe
        self.head = nn.Linear(D, D)

    def forward(self, x, target, used_token, shift):
        h = torch.tanh(self.pre(x)) + shift
        y, l_aux, _ = self.moe(h, used_token)
        out = self.head(h + y)
        return (out - target).square().sum() / max(out.numel(), 1) + l_aux


def teacher(x):
    g = torch.Generator().manual_seed(99)
    w1, w2 = torch.randn(D, 32, generator=g) / 4, torch.randn(32, D, generator=g) / 6
    return torch.tanh(x @ w1) @ w2


def batch(step, rank, nan=False):
    """This rank's micro-batch of ``step`` (its own data): x [2, TOKENS, D], target, used_token."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    world = dist.get_world_size()
    rows = 0 if step in ZERO_ROWS and ZERO_ROWS[step] % world == rank else 2
    x = torch.randn(rows, TOKENS, D, generator=g)
    used = torch.ones(rows, TOKENS, dtype=torch.bool)
    if step in EMPTY_MASK and EMPTY_MASK[step] % world == rank:
        used[:] = False
    if nan and rows:
        x[0, 1, 2] = float("nan")
    return x, teacher(x), used


def skew_shift(layer, step, rank):
    """A shift of the hidden states that sends every token of this rank to SKEW_GROUP: the
    least-norm vector with logit +10 for that group and 0 for the others."""
    if step not in SKEW_STEPS:
        return torch.zeros(D)
    with gathered(layer.moe.router):   # on every rank: under ZeRO-3 a collective
        u = layer.moe.router.group_proto.detach().float().clone()
    if rank not in ((0, 1) if dist.get_world_size() > 2 else (0,)):
        return torch.zeros(D)
    want = torch.zeros(G)
    want[SKEW_GROUP] = 10.0
    return torch.linalg.pinv(u) @ want


def make_config(aux=True, **kw):
    from trilemma_moe import TrilemmaMoEConfig
    base = dict(num_experts=E, num_groups=G, rank=4, top_k=2, burn_in=CLUSTER_STEP, recluster_interval=100,
                delta=0.0, alpha=0.0, seed=3, router_freeze_steps=1, comm_timeout_s=120)
    if not aux:
        base.update(aux_loss_coef=0.0, z_loss_coef=0.0)
    base.update(kw)
    return TrilemmaMoEConfig(**base)


def build(ep, zero, bf16=False, aux=True, frozen=False, client=False, compressed=None, **knobs):
    import deepspeed
    from trilemma_moe import TrilemmaMoE
    from trilemma_moe.integrations.deepspeed import attach_engine, moe_param_groups
    torch.manual_seed(0)
    # ZeRO-3 needs the compressed burn-in (it cannot free burn-in experts from its partitions);
    # the activation similarity then lets scramble() decide the regroups, as at the other stages
    compressed = zero == 3 if compressed is None else compressed
    form = {"burn_in_form": "compressed", "regroup_similarity": "weights"} if compressed else {}
    layer = TrilemmaMoE(D, nn.Sequential(nn.Linear(D, 24), nn.GELU(), nn.Linear(24, D)), num_experts=E, k=2,
                        ep_size=ep, config=make_config(aux, ep_size=ep, **form, **knobs))
    model = Net(layer)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": zero}}
    if zero == 3:   # partition every parameter, however small (the default keeps those < 1e5 whole)
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if frozen:   # lr 0: the same parameters at every ep size in every step, so each step compares
        # the gradient reductions alone (trajectories would drift apart from float noise that
        # Adam's first steps and routing's discrete choices amplify)
        cfg["optimizer"]["params"]["lr"] = 0.0
    if client:   # the user's own torch AdamW over DeepSpeed's MoE parameter groups
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        del cfg["optimizer"]
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=cfg)
    attach_engine(engine)
    return engine, layer


def scramble(layer, step):
    """The same activation statistics on every rank and at every ep size: the clustering at this
    step is decided identically everywhere and moves experts."""
    layer.moe.step   # first catch up on a skipped step: that restores the step's centroids
    with torch.no_grad():
        shape = layer.moe.centroids.shape   # (E, D) here; zero3_infinity.py's layer has its own
        layer.moe.centroids.copy_(torch.randn(*shape, generator=torch.Generator().manual_seed(77 + step)))
        layer.moe.centroid_seen.fill_(True)


class HookOrder:
    """Names of the parameters in the order their gradients are accumulated (ZeRO-2's bucket order)."""

    def __init__(self, model):
        self.names = []
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: self.names.append(n))
                      for n, p in model.named_parameters() if p.requires_grad]

    def take(self):
        out, self.names = self.names, []
        return out

    def remove(self):
        for h in self.hooks:
            h.remove()


def all_same(obj, what, group=None):
    """Every rank of ``group`` holds an equal ``obj`` (a JSON-able value)."""
    got = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, obj, group=group)
    for r, o in enumerate(got):
        assert o == got[0], f"{what}: rank {r} has {o}, rank 0 of the group has {got[0]}"


def gathered(module):
    """ZeRO-3 partitions parameters: read them whole (a collective over each one's partition group)."""
    import deepspeed
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params, enabled=bool(params))


def flat_params(module):
    with gathered(module):
        return {n: p.detach().float().clone() for n, p in module.named_parameters() if p.numel()}


def step_once(engine, layer, step, rank, nan=False, hooks=None):
    x, t, used = batch(step, rank, nan)
    dtype = next(engine.module.parameters()).dtype
    loss = engine(x.to(dtype), t.to(dtype), used, skew_shift(layer, step, rank).to(dtype))
    engine.backward(loss)
    order = hooks.take() if hooks is not None else None
    return loss, order


def global_loss(loss):
    g = loss.detach().float().reshape(1).clone()
    dist.all_reduce(g)
    return float(g) / dist.get_world_size()


def eval_loss(engine, layer):
    """The loss of one fixed batch, the same on every rank."""
    engine.eval()
    g = torch.Generator().manual_seed(4242)
    x = torch.randn(4, TOKENS, D, generator=g)
    dtype = next(engine.module.parameters()).dtype
    with torch.no_grad():
        loss = engine(x.to(dtype), teacher(x).to(dtype), torch.ones(4, TOKENS, dtype=torch.bool),
                      torch.zeros(D, dtype=dtype))
    engine.train()
    return global_loss(loss)


def check_replicas(engine, layer, ep):
    """Every parameter and layer buffer equals its replicas': replicated tensors across the
    world, expert slots across the ranks that hold the same groups (expert-data-parallel)."""
    from deepspeed.utils import groups
    edp = groups._get_expert_data_parallel_group(f"ep_size_{ep}")
    for name, p in flat_params(engine.module).items():
        group = edp if name.startswith("moe.moe.experts.") else None
        all_same(p.double().flatten().tolist(), f"parameter {name} after training", group)
    for name in ("expert_of_slot", "counters", "centroid_seen"):
        all_same(getattr(layer.moe, name).tolist(), f"layer buffer {name}")
    if ep > 1:   # reduced every step under expert parallelism
        all_same(layer.moe.centroids.double().flatten().tolist(), "centroids")


def ep1_layout(layer, module, ep):
    """``module``'s parameters and ``layer``'s buffers as an ep-size-1 module holds them: each
    expert tensor is the concatenation of the expert-parallel ranks' slots in ep-rank order (a
    collective over the layer's ep group)."""
    out = {}
    for name, t in flat_params(module).items():   # without the burn-in experts released at the first clustering
        if name.startswith("moe.moe.experts.") and ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=layer.ep_group)
            t = torch.cat(parts)
        out[name] = t
    for name in ("expert_of_slot", "counters", "centroids", "centroid_seen"):
        out[f"moe.moe.{name}"] = getattr(layer.moe, name).detach().clone()
    return out


def check_zero3_placement(engine, ep):
    """Expert parameters are partitioned over their expert-data-parallel group (world / ep ranks,
    the replicas of the same groups), everything else over the whole data-parallel group."""
    world = dist.get_world_size()
    for name, p in engine.module.named_parameters():
        want = world // ep if name.startswith("moe.moe.experts.") else world
        got = dist.get_world_size(group=p.ds_process_group)
        assert got == want, f"{name} is partitioned over {got} ranks, not {want}"


def run_train(ep, zero, bf16, ckpt, out_dir, client=False):
    rank = dist.get_rank()
    engine, layer = build(ep, zero, bf16, client=client)
    if zero == 3:
        check_zero3_placement(engine, ep)
    hooks = HookOrder(engine.module)
    start_eval = eval_loss(engine, layer)
    curve, moved, orders = [], 0, {}
    skip_checked = False
    for step in range(STEPS):
        if step == CLUSTER_STEP:
            scramble(layer, step)
        if step == REGROUP_STEP:
            scramble(layer, step)
            assert layer.recluster(force=True)
            moved = layer.stats()["moved_experts"]
        nan = zero in NAN_STAGES and step == NAN_STEP and rank == NAN_RANK % dist.get_world_size()
        loss, order = step_once(engine, layer, step, rank, nan, hooks)
        orders[step] = order
        all_same(order, f"gradient order in step {step}")
        before = flat_params(engine.module) if zero in NAN_STAGES and step == NAN_STEP else None
        engine.step()
        if before is not None:
            # the NaN token made the global gradient norm non-finite: every rank skipped the step
            assert not engine.was_step_applied() and engine.skipped_steps == 1, "the NaN step was applied"
            after = flat_params(engine.module)
            assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed parameters"
            assert layer.moe.step == engine.global_steps - engine.skipped_steps
            skip_checked = True
        curve.append(global_loss(loss) if not (zero in NAN_STAGES and step == NAN_STEP) else float("nan"))
        if ckpt and step == SAVE_AFTER:
            from trilemma_moe.integrations.checkpoint import save_checkpoint
            save_checkpoint(engine, os.path.join(out_dir, "ckpt"), tag="after5")
            saved_eval = eval_loss(engine, layer)
            weights = ep1_layout(layer, engine.module, ep)
            if rank == 0:
                torch.save(weights, os.path.join(out_dir, "saved_weights.pt"))
    hooks.remove()
    end_eval = eval_loss(engine, layer)
    st = layer.stats()
    assert st["reclusters"] == 2 and moved > 0, (st["reclusters"], moved)
    assert layer.moe.step == engine.global_steps - engine.skipped_steps, (layer.moe.step, engine.global_steps)
    assert torch.isfinite(layer.moe.centroids).all(), "non-finite centroids"
    if zero in NAN_STAGES:
        assert skip_checked
        tokens = torch.tensor([st["nonfinite_tokens"]])
        dist.all_reduce(tokens)
        assert int(tokens) == 1, int(tokens)
    assert end_eval < 0.8 * start_eval, f"evaluation loss did not fall: {start_eval:.4f} -> {end_eval:.4f}"
    check_replicas(engine, layer, ep)
    result = {"ep": ep, "zero": zero, "bf16": bf16, "curve": curve, "eval": [start_eval, end_eval],
              "moved": moved, "skipped_steps": engine.skipped_steps, "layer_step": layer.moe.step,
              "orders": {str(k): v for k, v in orders.items()}, "stats": {k: v for k, v in st.items()
                                                                       if isinstance(v, (int, float))}}
    if ckpt:
        result.update(resume_and_compare(ep, zero, bf16, out_dir, curve, saved_eval))
    return result


def resume_and_compare(ep, zero, bf16, out_dir, curve, saved_eval):
    """A fresh model and engine load the checkpoint written after step SAVE_AFTER (optimizer state
    included) and train the remaining steps with the same data: the same loss curve."""
    rank = dist.get_rank()
    engine, layer = build(ep, zero, bf16)
    path, _ = engine.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="after5")
    assert path is not None, "load_checkpoint found nothing"
    assert layer.moe.compressed and layer.moe.step == SAVE_AFTER + 1, layer.moe.step
    resumed = []
    for step in range(SAVE_AFTER + 1, STEPS):
        if step == REGROUP_STEP:
            scramble(layer, step)
            assert layer.recluster(force=True)
        nan = zero in NAN_STAGES and step == NAN_STEP and rank == NAN_RANK % dist.get_world_size()
        loss, _ = step_once(engine, layer, step, rank, nan)
        engine.step()
        resumed.append(global_loss(loss) if not (zero in NAN_STAGES and step == NAN_STEP) else float("nan"))
    tail = curve[SAVE_AFTER + 1:]
    for a, b in zip(resumed, tail):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (resumed, tail)
    # another ep_size through the engine: with optimizer state refused, naming the way to
    # convert; the weights alone load (expert files are per global slot) and compute the same
    other = max(e for e in (1, 2, 4) if e != ep and dist.get_world_size() % e == 0)
    other_engine, other_layer = build(other, zero, bf16)
    try:
        other_engine.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="after5")
    except Exception as exc:   # noqa: BLE001 - the message is what is checked
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = None
    assert message is not None and ("trilemma-moe reshard" in message if zero < 3 else "ZeRO stage 3" in message), message
    if zero == 3:
        # ZeRO-3 keeps dense weights in its partition files only, and DeepSpeed 0.19 restores
        # them for the placement they were saved with: a module-only load at another ep size is
        # refused by DeepSpeed itself (README says so)
        try:
            other_engine.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="after5", load_module_only=True)
        except RuntimeError as exc:
            assert "same parameter placement" in str(exc), exc
        else:
            raise AssertionError("a ZeRO-3 module-only load at another ep size was not refused")
        return {"resumed": resumed, "other_ep_error": message.splitlines()[0], "saved_eval": saved_eval}
    path, _ = other_engine.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="after5", load_module_only=True)
    assert path is not None
    other_eval = eval_loss(other_engine, other_layer)
    assert abs(other_eval - saved_eval) <= 1e-5 * max(1.0, saved_eval), (other_eval, saved_eval)
    return {"resumed": resumed, "other_ep_error": message.splitlines()[0], "other_ep_module_only_eval": other_eval,
            "saved_eval": saved_eval}


def run_parity(zero, out_dir):
    """Expert and router gradients and losses per step at every ep size, compared on rank 0."""
    from deepspeed.utils import safe_get_full_grad
    world, rank = dist.get_world_size(), dist.get_rank()
    per_ep = {}
    for ep in sorted({1, 2, world}):
        engine, layer = build(ep, zero, aux=False, frozen=True)
        grads, losses = [], []
        for step in range(9):
            if step == CLUSTER_STEP:
                scramble(layer, step)
            if step == REGROUP_STEP:
                scramble(layer, step)
                assert layer.recluster(force=True)
            loss, _ = step_once(engine, layer, step, rank)
            mine = {}
            for name, p in layer.named_parameters():
                g = safe_get_full_grad(p)
                if g is not None and getattr(p, "ds_numel", p.numel()):
                    mine[name] = g.detach().double().cpu()
            engine.step()
            losses.append(global_loss(loss))
            # expert tensors: concatenate the expert-parallel ranks' slots in ep-rank order
            ep_group = layer.ep_group if ep > 1 else None
            if ep > 1:
                got = [None] * ep
                dist.all_gather_object(got, {k: v for k, v in mine.items() if k.startswith("moe.experts.")},
                                       group=ep_group)
                for k in list(mine):
                    if k.startswith("moe.experts."):
                        mine[k] = torch.cat([g[k] for g in got])
            grads.append(mine)
        per_ep[ep] = (grads, losses)
    report = {"zero": zero, "max_rel_diff": {}, "losses": {str(k): v[1] for k, v in per_ep.items()}}
    ref_grads, ref_losses = per_ep[1]
    for ep, (grads, losses) in per_ep.items():
        worst = 0.0
        for step, (a, b) in enumerate(zip(grads, ref_grads)):
            assert set(a) == set(b), f"ep {ep} step {step}: gradients for {sorted(set(a) ^ set(b))} on one side only"
            for k in a:
                scale = max(float(b[k].abs().max()), 1e-8)
                err = float((a[k] - b[k]).abs().max()) / scale
                worst = max(worst, err)
                assert err < PARITY_TOL, f"ZeRO {zero} step {step}: {k} at ep_size {ep} differs from ep_size 1 by {err:.2e}"
        for step, (a, b) in enumerate(zip(losses, ref_losses)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"ZeRO {zero} step {step}: loss {a} at ep {ep} vs {b}"
        report["max_rel_diff"][str(ep)] = worst
    return report


def _rel_diff(a, b):
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-8)


def _gauge_free(params):
    """Parameters with each slot's factors A, B replaced by A B^T: an SVD may return a singular
    pair with either sign, and inputs that differ in the last bit (two reduction orders) can
    pick different signs; A B^T, what the layer computes, does not depend on it."""
    out = {n: t for n, t in params.items() if ".experts.fa." not in n and ".experts.fb." not in n}
    for n, a in params.items():
        if ".experts.fa." in n:
            out[n.replace(".fa.", ".fa@fb.")] = a @ params[n.replace(".fa.", ".fb.")].transpose(-1, -2)
    return dict(sorted(out.items()))


def run_stage3_pair(ep, out_dir, int4=False, recompute=False):
    """The same training (compressed burn-in, each rank its own data, skewed and empty steps, the
    first clustering, a forced regroup that moves experts; no NaN step, see NAN_STAGES) under ZeRO-2
    and ZeRO-3: the loss curves and the final parameters agree to float tolerance. ``int4``: with
    INT4 residuals (the forward's quantize-dequantize of the master factors); ``recompute``: with
    ``recompute_experts`` (the backward recomputes the expert compute of the gathered layer)."""
    rank = dist.get_rank()
    runs = {}
    for zero in (2, 3):
        knobs = dict({"residual_bits": 4} if int4 else {}, **({"recompute_experts": True} if recompute else {}))
        engine, layer = build(ep, zero, compressed=True, **knobs)
        curve = []
        for step in range(STEPS):
            if step in (CLUSTER_STEP, REGROUP_STEP):
                scramble(layer, step)
            if step == REGROUP_STEP:
                assert layer.recluster(force=True)
            loss, _ = step_once(engine, layer, step, rank)
            engine.step()
            curve.append(global_loss(loss))
        runs[zero] = (curve, flat_params(engine.module), layer.stats()["moved_experts"])
    (c2, p2, m2), (c3, p3, m3) = runs[2], runs[3]
    assert m2 == m3 and m3 > 0, (m2, m3)
    worst_loss = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(c2, c3))
    assert worst_loss <= 1e-5, (c2, c3)
    assert set(p2) == set(p3), sorted(set(p2) ^ set(p3))
    worst_param = max(_rel_diff(a, b) for a, b in zip(_gauge_free(p2).values(), _gauge_free(p3).values()))
    assert worst_param <= 1e-4, worst_param   # 12 Adam steps amplify summation-order noise
    return {"ep": ep, "int4": int4, "recompute": recompute, "curve2": c2, "curve3": c3, "moved": m3, "max_rel_loss_diff": worst_loss,
            "max_rel_param_diff": worst_param}


def run_case(case, out_dir):
    parts = case.split(":")
    if parts[0] == "z3pair":
        return run_stage3_pair(int(parts[1]), out_dir, int4="int4" in parts, recompute="recompute" in parts)
    if parts[0] == "train":
        return run_train(int(parts[1]), int(parts[2]), "bf16" in parts, "ckpt" in parts,
                         os.path.join(out_dir, case.replace(":", "_")), client="client" in parts)
    if parts[0] == "parity":
        return run_parity(int(parts[1]), out_dir)
    raise ValueError(f"unknown case {case!r}")


def record_ran(out_dir, rank, world, done):
    """This rank's own record of the cases it finished, rewritten after each one."""
    os.makedirs(os.path.join(out_dir, "ran"), exist_ok=True)
    path = os.path.join(out_dir, "ran", f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "world": world, "pid": os.getpid(), "cases": done}, f)
    os.replace(path + ".tmp", path)


def serve_cases(rank, world, port, out_dir, cases, run):
    """One gloo rank (DeepSpeed's CPU backend): ``run(case, out_dir) -> dict`` for every case in
    turn, each result (with its seconds and the rank that wrote it) written to
    OUT_DIR/<case>/rank<r>.json, and this rank's own record of the cases it finished to OUT_DIR/ran/."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger
    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
    done = []
    for case in cases:
        t0 = time.time()
        result = run(case, out_dir)
        result["seconds"] = time.time() - t0
        result["rank"] = dist.get_rank()
        case_dir = os.path.join(out_dir, case.replace(":", "_"))
        os.makedirs(case_dir, exist_ok=True)
        with open(os.path.join(case_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        done.append(case)
        record_ran(out_dir, rank, world, done)
        dist.barrier()
    from trilemma_moe.parallel.topology import leave_process_group
    leave_process_group()


def _entry(rank, run, world, port, out_dir, cases):
    try:
        serve_cases(rank, world, port, out_dir, cases, run)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)   # no waiting on peers that are still inside a collective


def spawn_cases(run):
    """``python SCRIPT WORLD PORT OUT_DIR CASE [CASE ...]``: WORLD spawned ranks run every CASE
    through ``run`` (a module-level function of SCRIPT, so that the spawned ranks find it)."""
    world, port, out_dir, cases = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_entry, args=(run, world, port, out_dir, cases), nprocs=world, start_method="spawn")


if __name__ == "__main__":
    spawn_cases(run_case)
