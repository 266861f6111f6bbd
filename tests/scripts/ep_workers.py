"""Expert-parallel checks run as N gloo CPU processes (torch.multiprocessing), started by
tests/test_expert_parallel.py:  python ep_workers.py MODE WORLD PORT OUT_DIR

Every process also builds the one-process layer (ep_size 1, same seed) and runs it on the whole
global batch: the reference each rank compares its part against. Assertions run in the workers
(a failure is a non-zero exit with the traceback); numbers go to OUT_DIR/rank{r}.json.
"""
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from trilemma_moe import TrilemmaMoEConfig  # noqa: E402
from trilemma_moe.core.layer import ClusteredMoE  # noqa: E402
from trilemma_moe.kernels import fused as fused_mod  # noqa: E402
from trilemma_moe.parallel import ExpertParallelComm, ExpertParallelTopology, average_gradients  # noqa: E402
from trilemma_moe.parallel.cost import predicted_bytes  # noqa: E402
from trilemma_moe.parallel.topology import leave_process_group  # noqa: E402

D, F = 16, 24


def make_config(ep_size, **kw):
    # the paper's similarity by default: these checks force regroups through the centroids;
    # dynamic_regroup=True (the library's default clusters once): they follow ranks through regroups
    base = dict(num_experts=16, num_groups=4, rank=3, top_k=2, burn_in=10_000, delta=0.0, seed=5, alpha=0.3,
                router_freeze_steps=0, gamma=None, ep_size=ep_size, regroup_similarity="weights", regroup_move_cost=0.0,
                dynamic_regroup=True)
    base.update(kw)
    return TrilemmaMoEConfig(**base)


def pair(world, dtype=torch.float32, **kw):
    topo = ExpertParallelTopology.create(world)
    ep = ClusteredMoE(D, F, make_config(world, **kw), expert_parallel=ExpertParallelComm(topo, make_config(world, **kw)))
    ref = ClusteredMoE(D, F, make_config(1, **kw))
    return topo, ep.to(dtype), ref.to(dtype)


def close(a, b, what, tol):
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert a.shape == b.shape and err <= tol, f"{what}: max |diff| {err:.3g} > {tol:g} (shapes {a.shape} {b.shape})"
    return err


def local_rows(ep_layer):
    ex = ep_layer.experts
    return slice(ex.group_offset * ex.K, (ex.group_offset + ex.G) * ex.K), slice(ex.group_offset, ex.group_offset + ex.G)


def compare_params(ep, ref, tol, grads=False, opt_ep=None, opt_ref=None):
    """Every parameter (and optionally its gradient and Adam moments): router/replicated in full,
    expert slots against the reference's rows of this rank's slots/groups."""
    slots, groups = local_rows(ep)
    worst = 0.0
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        q = ref_params[name]
        if p.numel() == 0 or q.numel() == 0:
            continue
        if name.startswith("experts."):
            sl = groups if name.startswith("experts.base.") else slots
            pick = (lambda t: t[sl])
        else:
            pick = (lambda t: t)
        worst = max(worst, close(p, pick(q), name, tol))
        if grads and (p.grad is not None or q.grad is not None):
            worst = max(worst, close(p.grad, pick(q.grad), name + ".grad", tol))
        if opt_ep is not None and p in opt_ep.state:
            for key in ("exp_avg", "exp_avg_sq"):
                worst = max(worst, close(opt_ep.state[p][key], pick(opt_ref.state[q][key]), f"{name}.{key}", tol))
    return worst


def batch(world, B, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(world * B, D, generator=g).to(dtype), torch.randn(world * B, D, generator=g).to(dtype)


def step_both(ep, ref, topo, x, t, world, B):
    """Each rank: loss = mean over its B tokens of <y, t> + l_aux (a data-parallel loss); the
    reference: the mean of those per-rank losses over the global batch."""
    rank = topo.ep_rank
    xl, tl = x[rank * B:(rank + 1) * B], t[rank * B:(rank + 1) * B]
    y, l_aux, counts = ep(xl)
    (((y * tl).sum() / B) + l_aux).backward()
    average_gradients(ep, topo)
    y_ref, l_ref, counts_ref = ref(x)
    ((y_ref * t).sum() / (world * B) + l_ref).backward()
    return y, l_aux, y_ref[rank * B:(rank + 1) * B], l_ref


# ----------------------------------------------------------------------------------------------
def scramble_centroids(*layers):
    """The same random activation statistics everywhere: the next regroup moves experts."""
    with torch.no_grad():
        c = torch.randn(layers[0].centroids.shape, generator=torch.Generator().manual_seed(77))
        for layer in layers:
            layer.centroids.copy_(c)


def mode_equiv(rank, world, out):
    """float32: outputs, l_aux and gradients of ep_size = world match the one-process layer to 1e-5
    on the same weights, before the first clustering, after it, and after a regroup of compressed
    groups. float64: through AdamW steps and both regroups, parameters and Adam moments match too."""
    report = {"errors32": [], "errors64": []}
    B = 24
    topo, ep, ref = pair(world, torch.float32)
    for phase in range(3):
        if phase == 1:
            assert ep.recluster(force=True) and ref.recluster(force=True)
            report["moved_first"] = ep.stats()["moved_experts"]
        if phase == 2:
            scramble_centroids(ep, ref)
            assert ep.recluster(force=True) and ref.recluster(force=True)
            report["moved_second"] = ep.stats()["moved_experts"]
        assert torch.equal(ep.expert_of_slot, ref.expert_of_slot)
        x, t = batch(world, B, 100 + phase, torch.float32)
        y, l_aux, y_ref, l_ref = step_both(ep, ref, topo, x, t, world, B)
        report["errors32"] += [close(y, y_ref, f"output phase {phase}", 1e-5),
                               close(l_aux, l_ref, f"l_aux phase {phase}", 1e-5),
                               compare_params(ep, ref, 1e-5, grads=True)]
        ep.zero_grad()
        ref.zero_grad()
    report["migrated_here"] = ep.comm_stats()["migrated_experts"]

    topo, ep, ref = pair(world, torch.float64)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ep.attach_optimizer(opt_ep)
    ref.attach_optimizer(opt_ref)
    for step in range(7):
        if step in (2, 5):   # first clustering; then a regroup of compressed groups with trained moments
            if step == 5:
                scramble_centroids(ep, ref)
            assert ep.recluster(force=True) and ref.recluster(force=True)
            assert torch.equal(ep.expert_of_slot, ref.expert_of_slot)
            report["errors64"].append(compare_params(ep, ref, 1e-9, opt_ep=opt_ep, opt_ref=opt_ref))
        x, t = batch(world, B, 200 + step, torch.float64)
        y, l_aux, y_ref, l_ref = step_both(ep, ref, topo, x, t, world, B)
        report["errors64"] += [close(y, y_ref, f"output step {step}", 1e-9),
                               close(l_aux, l_ref, f"l_aux step {step}", 1e-9),
                               compare_params(ep, ref, 1e-9, grads=True),
                               close(ep.centroids, ref.centroids, "centroids (float32 sums)", 1e-6)]
        for o in (opt_ep, opt_ref):
            o.step()
            o.zero_grad()
    report["compressed"] = ep.compressed
    # one token in the whole batch, on rank 0: the other ranks send nothing, most receive nothing,
    # and every rank still enters the same collectives, forward and backward
    x, t = batch(1, 1, 400, torch.float64)
    xl, tl = (x, t) if rank == 0 else (x[:0], t[:0])
    y, l_aux, _ = ep(xl)
    ((y * tl).sum() + l_aux).backward()
    average_gradients(ep, topo)
    y_ref, l_ref, _ = ref(x)
    ((y_ref * t).sum() / world + l_ref).backward()
    report["errors64"] += [close(y, y_ref[:y.shape[0]], "output, one token", 1e-9),
                           close(l_aux, l_ref, "l_aux, one token", 1e-9), compare_params(ep, ref, 1e-9, grads=True)]
    json.dump(report, open(os.path.join(out, f"rank{rank}.json"), "w"))


def mode_train(rank, world, out, probe=False):
    """A training run through burn-in, the first clustering and regroups: the loss curve at
    ep_size = world equals the one-process curve (same seed, same global batches). ``probe``: the
    probe rule (regroup_similarity="probe", the default): the ranks' probe tokens are gathered, so
    the decision sees the same tokens as the one-process layer fed the whole batch."""
    kw = dict(burn_in=4, recluster_interval=3, alpha=0.0)
    if probe:
        kw.update(regroup_similarity="probe", regroup_move_cost=0.0, alpha=0.5)
    topo, ep, ref = pair(world, **kw)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=2e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=2e-2)
    ep.attach_optimizer(opt_ep)
    ref.attach_optimizer(opt_ref)
    B = 16
    proj = torch.randn(D, D, generator=torch.Generator().manual_seed(9)) / math.sqrt(D)
    curve_ep, curve_ref, moved = [], [], 0
    for step in range(14):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(world * B, D, generator=g)
        # a regression target that shifts halfway: the routing statistics change, regroups move experts
        target = torch.tanh(x @ proj) * (1.0 if step < 7 else -1.0)
        xl, tl = x[rank * B:(rank + 1) * B], target[rank * B:(rank + 1) * B]
        if step == 10 and not probe:   # the regroup at this step's first forward moves experts between ranks
            scramble_centroids(ep, ref)
        y, l_aux, _ = ep(xl)
        moved = max(moved, ep.stats().get("moved_experts", 0))
        loss = ((y - tl) ** 2).mean() + l_aux
        loss.backward()
        average_gradients(ep, topo)
        glob = loss.detach().clone()
        dist.all_reduce(glob)
        curve_ep.append(float(glob) / world)
        y_ref, l_ref, _ = ref(x)
        loss_ref = sum(((y_ref[r * B:(r + 1) * B] - target[r * B:(r + 1) * B]) ** 2).mean() for r in range(world)) / world + l_ref
        loss_ref.backward()
        curve_ref.append(float(loss_ref))
        for o in (opt_ep, opt_ref):
            o.step()
            o.zero_grad()
    st = ep.stats()
    assert st["reclusters"] == ref.stats()["reclusters"] >= 2, (st, ref.stats())
    diffs = [abs(a - b) for a, b in zip(curve_ep, curve_ref)]
    assert max(diffs) < 1e-5, f"loss curves differ: {diffs}"
    assert moved > 0 and ep.comm_stats()["bytes_regroup_migration"] > 0
    json.dump({"curve_ep": curve_ep, "curve_ref": curve_ref, "reclusters": st["reclusters"],
               "moved_experts": moved, "experts_moved": st["experts_moved"], "comm": ep.comm_stats()},
              open(os.path.join(out, f"rank{rank}.json"), "w"))


def mode_train_probe(rank, world, out):
    mode_train(rank, world, out, probe=True)


def mode_bytes(rank, world, out):
    """Measured bytes == bytes predicted from the routing; stage 1 vs flat top-2 at E=32, G=8."""
    d = 64
    cfg = TrilemmaMoEConfig(num_experts=32, num_groups=8, rank=4, top_k=2, burn_in=10_000, seed=1, ep_size=world)
    topo = ExpertParallelTopology.create(world)
    layer = ClusteredMoE(d, 32, cfg, expert_parallel=ExpertParallelComm(topo, cfg))
    T = 256
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(rank))
    routing = layer.route(x)   # the same routing the forward computes (no training step in between)
    y, _, _ = layer(x)
    y.sum().backward()
    measured = layer.comm_stats()
    # prediction from the recorded routing of every rank (the counts a rank receives depend on the others)
    groups = [torch.zeros_like(routing.group_idx) for _ in range(world)]
    dist.all_gather(groups, routing.group_idx.contiguous())
    pred = predicted_bytes(routing.group_idx, layer.expert_of_slot[routing.slot_idx], cfg.num_groups,
                           cfg.num_experts, world, rank, d, cfg.top_k, elem=4,
                           received_groups=torch.cat([g for r, g in enumerate(groups) if r != rank]))
    for key, value in pred.items():
        assert measured[f"bytes_{key}"] == value, (key, measured[f"bytes_{key}"], value)
    json.dump({"measured": measured, "predicted": pred}, open(os.path.join(out, f"rank{rank}.json"), "w"))


def mode_variants(rank, world, out):
    """Two groups per token (g1=2: a token crosses twice, to two owners), gated experts without
    biases, top-1, and the owner computing on the fused path (its kernels' torch twins here; the
    reference on the per-slot path; also with g1=2 and a capacity factor): same outputs, l_aux and
    gradients as one process, before and after a regroup."""
    errors = []
    fused_calls = []
    real = fused_mod.fused_expert_forward
    fused_mod.fused_expert_forward = lambda *a, **k: fused_calls.append(1) or real(*a, **k)
    for kw, layer_kw, on_fused in [(dict(group_top_k=2), {}, False),
                                   (dict(top_k=1), dict(gated=True, bias=False, activation="silu"), False),
                                   ({}, {}, True), (dict(group_top_k=2, capacity_factor=4.0), {}, True)]:
        topo = ExpertParallelTopology.create(world)
        cfg_ep, cfg_1 = make_config(world, **kw), make_config(1, **kw)
        ep = ClusteredMoE(D, F, cfg_ep, expert_parallel=ExpertParallelComm(topo, cfg_ep), **layer_kw).double()
        ref = ClusteredMoE(D, F, cfg_1, **layer_kw).double()
        ep.fused, ref.fused = on_fused, False
        for phase in range(3):
            if phase:
                scramble_centroids(ep, ref)
                assert ep.recluster(force=True) and ref.recluster(force=True)
            x, t = batch(world, 12, 500 + phase, torch.float64)
            y, l_aux, y_ref, l_ref = step_both(ep, ref, topo, x, t, world, 12)
            errors += [close(y, y_ref, f"{kw} output", 1e-9), close(l_aux, l_ref, f"{kw} l_aux", 1e-9),
                       compare_params(ep, ref, 1e-9, grads=True)]
            ep.zero_grad()
            ref.zero_grad()
    fused_mod.fused_expert_forward = real
    assert len(fused_calls) == 2 * 2, f"the fused path ran {len(fused_calls)} times, expected 4 (2 variants x 2 phases)"
    json.dump({"max_error": max(errors)}, open(os.path.join(out, f"rank{rank}.json"), "w"))


def mode_capacity(rank, world, out):
    """With a capacity factor, pairs are dropped per source rank's batch (as DeepSpeed drops per
    rank): the expert-parallel output equals the one-process layer run on this rank's batch."""
    topo, ep, ref = pair(world, torch.float64, capacity_factor=0.75, min_capacity=1)
    x, _ = batch(world, 32, 300, torch.float64)
    xl = x[rank * 32:(rank + 1) * 32]
    y, _, _ = ep(xl)
    y_ref, _, _ = ref(xl)
    err = close(y, y_ref, "output with capacity_factor", 1e-9)
    dropped = int((y_ref.abs().sum(1) == 0).sum())
    assert dropped > 0, "capacity_factor 0.75 dropped nothing"
    json.dump({"error": err, "dropped": dropped}, open(os.path.join(out, f"rank{rank}.json"), "w"))


def mode_comm(rank, world, out):
    """The communicator's primitives against plain indexing of data every rank can rebuild:
    all-to-all with random (some zero) splits, forward and backward; row fetches; the
    differentiable sum; byte counts of each."""
    cfg = make_config(world)
    comm = ExpertParallelComm(ExpertParallelTopology.create(world), cfg)
    gen = torch.Generator().manual_seed(11)
    splits = torch.randint(0, 4, (world, world), generator=gen)   # splits[src, dst]
    splits[0, world - 1] = 0
    rows = {(s, d): torch.randn(int(splits[s, d]), 5, generator=torch.Generator().manual_seed(100 * s + d),
                                dtype=torch.float64) for s in range(world) for d in range(world)}
    x = torch.cat([rows[rank, d] for d in range(world)]).requires_grad_(True)
    send = splits[rank].tolist()
    recv = comm.exchange_counts(send)
    assert recv == splits[:, rank].tolist()
    y = comm.all_to_all(x, send, recv, "tokens_out")
    assert torch.equal(y, torch.cat([rows[s, rank] for s in range(world)]))
    w = {(s, d): torch.randn(int(splits[s, d]), 5, generator=torch.Generator().manual_seed(7 + 100 * s + d),
                             dtype=torch.float64) for s in range(world) for d in range(world)}
    (y * torch.cat([w[s, rank] for s in range(world)])).sum().backward()
    assert torch.equal(x.grad, torch.cat([w[rank, d] for d in range(world)]))   # d(out)/d(in) routed back
    row_bytes = 5 * 8
    assert comm.bytes["tokens_out"] == row_bytes * (sum(send) - send[rank])
    assert comm.bytes["tokens_out_grad"] == row_bytes * (sum(recv) - recv[rank])
    # take_rows: rank r holds rows [3r, 3r+3) of a global table
    table = torch.randn(3 * world, 4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.randint(0, 3 * world, (7,), generator=torch.Generator().manual_seed(rank))
    assert torch.equal(comm.take_rows(table[3 * rank:3 * rank + 3], want), table[want])
    # differentiable sum: value = sum over ranks, gradient = sum of every rank's upstream gradient
    v = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    total = comm.sum_with_grad(v)
    assert torch.equal(total, torch.full((3,), world * (world + 1) / 2, dtype=torch.float64))
    (total * (rank + 1)).sum().backward()
    assert torch.equal(v.grad, torch.full((3,), world * (world + 1) / 2, dtype=torch.float64))
    json.dump({"ok": True}, open(os.path.join(out, f"rank{rank}.json"), "w"))


def mode_timeout(rank, world, out):
    """Rank 1 stops answering: the others raise a clear error within comm_timeout_s."""
    cfg = make_config(world, comm_timeout_s=3.0)
    topo = ExpertParallelTopology.create(world)
    layer = ClusteredMoE(D, F, cfg, expert_parallel=ExpertParallelComm(topo, cfg))
    if rank == 1:
        time.sleep(6)    # alive, but never joins the forward
        return
    t0 = time.time()
    try:
        layer(torch.randn(8, D))
    except RuntimeError as exc:
        json.dump({"error": str(exc), "seconds": time.time() - t0}, open(os.path.join(out, f"rank{rank}.json"), "w"))
        os._exit(0)   # skip the process-group teardown, which would wait for rank 1
    raise AssertionError("the forward returned although rank 1 never answered")


def mode_mismatch(rank, world, out):
    """Ranks built with different knobs: every rank gets one clear error at start-up."""
    cfg = make_config(world, alpha=0.3 if rank == 0 else 0.4)
    topo = ExpertParallelTopology.create(world)
    try:
        ExpertParallelComm(topo, cfg)
    except ValueError as exc:
        json.dump({"error": str(exc)}, open(os.path.join(out, f"rank{rank}.json"), "w"))
        return
    raise AssertionError("no error for different configs")


def _drift_run(rank, world, out, layer, expert_parallel=None, steps=30):
    """Train ``layer`` on this rank's own data (skewed differently per rank; rank 1's shifts at
    step 12) with regroup_trigger="drift"; record its counts, the checks after the first
    clustering, the distance at each measurement and the grouping (the test recomputes the checks
    from both ranks' counts)."""
    opt = torch.optim.AdamW(layer.parameters(), lr=2e-2)
    layer.attach_optimizer(opt)
    g = torch.Generator().manual_seed(300 + rank)
    means = torch.randn(3, D, generator=torch.Generator().manual_seed(41))
    counts, checks, distances, moved = [], [], {}, 0
    cfg = layer.config
    for step in range(steps):
        mean = means[rank] if rank == 0 or step < 12 else means[2]
        x = torch.randn(16 + 8 * rank, D, generator=g) * 0.7 + mean     # unequal batches, too
        st = layer.stats()
        n = st["reclusters"] + st["skipped_reclusters"]
        y, l_aux, c = layer(x)
        (y.square().mean() + l_aux).backward()
        if expert_parallel is not None:
            average_gradients(layer, expert_parallel)
        else:   # plain data parallelism: which gradients exist depends on the phase only
            for p in layer.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        opt.zero_grad()
        counts.append(c.tolist())
        st = layer.stats()
        if step > cfg.burn_in and st["reclusters"] + st["skipped_reclusters"] > n:
            checks.append(step)
            distances[step] = st["load_drift"]
        moved = max(moved, st["experts_moved"])
    json.dump({"counts": counts, "checks": checks, "distances": distances, "moved": moved,
               "assignment": layer.group_assignment().tolist(), "every": cfg.drift_every,
               "threshold": cfg.drift_threshold, "beta": cfg.drift_beta, "burn_in": cfg.burn_in}, open(os.path.join(out, f"rank{rank}.json"), "w"))


DRIFT = dict(burn_in=4, regroup_trigger="drift", drift_every=2, drift_threshold=0.2, drift_beta=0.3, delta=0.0,
             regroup_similarity="probe", alpha=0.5)


def mode_drift_dp(rank, world, out):
    """Replicas (ep_size 1) kept in step by DataParallelSync: each rank's own load statistics."""
    from trilemma_moe.integrations.deepspeed_engine import DataParallelSync
    layer = ClusteredMoE(D, F, make_config(1, **DRIFT))
    layer.sync = DataParallelSync()
    _drift_run(rank, world, out, layer)


def mode_drift_ep(rank, world, out):
    """Expert parallelism at ep_size = world: the counts are reduced over the ranks every forward."""
    topo, ep, _ = pair(world, **DRIFT)
    _drift_run(rank, world, out, ep, topo)


def _worker(rank, world, port, modes, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mode in modes.split(","):   # several checks per start-up: process start is the slow part
        sub = os.path.join(out, mode)
        os.makedirs(sub, exist_ok=True)
        globals()["mode_" + mode](rank, world, sub)
    if "timeout" not in modes:
        leave_process_group()


if __name__ == "__main__":
    mode, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mp.spawn(_worker, args=(world, port, mode, out), nprocs=world)
