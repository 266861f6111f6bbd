"""The first clustering from experts that were trained elsewhere (a Hugging Face MoE block, say):
no burn-in, the trained weights and router rows are the evidence.

The grouping is the paper's (3.1) with what a trained block offers in place of a burn-in's
statistics: S_param of the experts' weights (CountSketches, as in a regroup) fused with S_task
as the cosine of the experts' router rows (a router row is the direction of the tokens its expert
is given, the quantity the activation centroids estimate). Each group is then decomposed (base =
mean, rank-r residual factors, Eq. 6-7); the router rows become the expert vectors v_i in slot
order, and each group prototype u_g the mean of its members' rows, so the group logit is the mean
of its experts' logits.

Every rank computes the same grouping from the same full weights (no collective), then
decomposes only the groups it holds: under expert parallelism a rank pays the SVDs of its own
groups only.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from . import clustering


@torch.no_grad()
def group_trained_experts(sketches: torch.Tensor, router_rows: torch.Tensor, num_groups: int, alpha: float,
                          seed: int, iters: int, tau=None, neighbor_top_n=None):
    """``(labels [E], fused [E, E])``: balanced group labels (E/G each) from the experts' weight
    sketches [E, s] and their router rows [E, d], by balanced k-means on 1 - S (S the fused
    similarity alpha S_param + (1 - alpha) S_task, pruned), and that fused similarity unpruned."""
    s_param = clustering.param_similarity(sketches.to(torch.float64))
    s_task = clustering.task_similarity(router_rows.to(torch.float64))
    fused = clustering.fuse_similarity(s_param, s_task, alpha)
    sim = clustering.prune_neighbors(fused, tau, neighbor_top_n)
    return clustering.balanced_kmeans(1.0 - sim, num_groups, seed=seed, iters=iters), fused


@torch.no_grad()
def seed_from_trained_experts(layer, expert_weights: Callable[[int], Dict[str, torch.Tensor]],
                              router_rows: torch.Tensor) -> Dict[str, float]:
    """Cluster and compress ``layer`` (a ``ClusteredMoE`` built with ``burn_in_form="compressed"``)
    from trained experts, as its first clustering.

    ``expert_weights(e)``: expert e's matrices in our ``(d_in, d_out)`` layout (``w1``, ``w2`` [,
    ``w3``], biases if the spec has them), read on demand so that at most one group's experts are
    materialised at a time. ``router_rows``: [E, d], the trained router's row per expert (logit =
    x . row). Returns the grouping's fused intra-group similarity and the decomposition's mean
    relative error ``||W - W_hat|| / ||W||`` over the experts held here."""
    cfg, ex = layer.config, layer.experts
    E, G, K = layer.num_experts, layer.num_groups, layer.experts_per_group
    if ex.full_storage:
        raise ValueError("seed_from_trained_experts needs a layer built with burn_in_form='compressed' "
                         "(the trained experts are decomposed directly, never held as burn-in weights)")
    if layer.clustered:
        raise ValueError(f"layer {layer.layer_index} is already clustered; seed a freshly built layer")
    if tuple(router_rows.shape) != (E, layer.hidden_size):
        raise ValueError(f"router_rows has shape {tuple(router_rows.shape)}, expected ({E}, {layer.hidden_size})")
    seed = cfg.seed + 7919 * layer.layer_index
    sketch = clustering.CountSketch(cfg.param_sketch_size, seed)
    sketches = torch.zeros(E, cfg.param_sketch_size, dtype=torch.float64)
    offset = 0   # every expert's matrices flattened in spec order, cut in runs of rows (as a regroup's sketches)
    for name, (di, do) in ex.spec.matrices.items():
        rows = max(1, (1 << 20) // (E * do))
        for r0 in range(0, di, rows):   # all experts per run: the hashes of a coordinate are computed once
            run = torch.stack([expert_weights(e)[name].detach()[r0:r0 + rows] for e in range(E)])
            sketch.add(sketches, run.reshape(E, -1).to("cpu", torch.float64), offset + r0 * do)
        offset += di * do
    assign, fused = group_trained_experts(sketches, router_rows.detach().cpu(), G, cfg.alpha, seed, cfg.kmeans_iters,
                                   cfg.tau, cfg.neighbor_top_n)
    expert_of_slot = torch.argsort(assign * E + torch.arange(E))     # group-major, expert ids ascending inside
    errors = []
    for g in range(ex.G):   # the groups held here
        members = expert_of_slot[(ex.group_offset + g) * K:(ex.group_offset + g + 1) * K].tolist()
        weights = [expert_weights(e) for e in members]
        ex.load_group(g, weights)
        slots = torch.arange(g * K, (g + 1) * K)
        for name in ex.spec.matrices:
            approx = ex.slot_weights(name, slots, True)   # float32 (float64 stays): a group's worth
            target = torch.stack([w[name] for w in weights]).to(approx.dtype)
            errors.append(((target - approx).flatten(1).norm(dim=1)
                           / target.flatten(1).norm(dim=1).clamp_min(torch.finfo(approx.dtype).tiny)).mean().double())
    dev = layer.expert_of_slot.device
    layer.expert_of_slot.copy_(expert_of_slot.to(dev))
    rows = router_rows.detach().to(layer.router.expert_vec.device, layer.router.expert_vec.dtype)[expert_of_slot]
    layer.router.expert_vec.copy_(rows)
    layer.router.group_proto.copy_(rows.view(G, K, -1).mean(1))
    sched = layer.schedule
    sched["compressed"], sched["reclusters"] = 1, sched["reclusters"] + 1
    error = float(torch.stack(errors).mean()) if errors else 0.0
    layer.last_regroup = {"decomposition_error": error, "reconstruction_error": error}
    return {"intra_group_similarity": clustering.intra_group_similarity(fused, assign, G),
            "relative_error": error}
