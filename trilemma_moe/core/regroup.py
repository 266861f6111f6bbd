"""The regroup (paper 3.1 and 3.5): clustering inputs -> decision -> placement ->
re-decomposition -> optimizer-state moves.

1. *Inputs*: every expert's effective weights (S_param) and the activation centroids (S_task),
   averaged over replicas; under expert parallelism rank 0 gathers the weights and decides.
2. *Decision*: fused similarity, pruned neighbours, balanced k-means; the intra-group similarity
   gain against the current grouping; rank 0's decision is broadcast so every replica applies
   the same regroup or none. Below ``delta`` (after the first clustering) it is skipped.
3. *Placement*: group labels matched to the old ones; an expert that stays in its group keeps
   its slot (:func:`place`).
4. *Re-decomposition*: only groups whose members changed get a new base and rank-r factors
   (SVD); kept groups keep their trained residuals.
5. *State moves* through the layer's :class:`~.interfaces.ParamIO`: bases' moments mix like the
   bases, fresh factors' moments reset, rows that move with an expert carry theirs; the router
   follows (``HierarchicalRouter.regroup``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import clustering
from .compression import decompose_groups


@torch.no_grad()
def observe(layer, x: torch.Tensor, hits: torch.Tensor, slot_counts: torch.Tensor, learning: bool) -> torch.Tensor:
    """Step 1's activation statistics, gathered at every forward: per-expert token counts and,
    in training, the EMA activation centroids (Eq. 5).

    Device-side only (no host sync): the routing's (T, E) 0/1 slot matrix gives the counts
    (``slot_counts``, its column sums) and, by one matmul with x, the per-slot activation sums;
    both go to expert order in one indexed write."""
    if not learning:
        counts = torch.empty_like(slot_counts)
        counts[layer.expert_of_slot] = slot_counts
        layer._last_counts = counts.long()
        return layer._last_counts
    dt = torch.promote_types(x.dtype, torch.float32)
    xd = x.detach().to(dt)
    # A token with a NaN/inf feature (an fp16 overflow upstream) would make its experts'
    # centroids non-finite for good: it counts in the routing statistics, not in the centroids.
    # (A row sums to NaN/inf iff it holds one, barring overflow: one reduction, not a T x d mask.)
    finite = torch.isfinite(xd.sum(1, keepdim=True))
    layer.finite_tokens.add_(finite.sum())
    layer._tokens_observed += x.shape[0]
    hits_f = hits.to(dt) * finite
    stats = torch.cat([hits_f.t() @ xd.nan_to_num(0.0, 0.0, 0.0), hits_f.sum(0).unsqueeze(1),
                       slot_counts.to(dt).unsqueeze(1)], dim=1)
    by_expert = torch.empty_like(stats)
    by_expert[layer.expert_of_slot] = stats
    layer._last_counts = by_expert[:, -1].long()   # this rank's tokens
    if layer.ep is not None:
        # centroids follow the tokens of every rank: identical everywhere, as at ep_size 1
        by_expert = layer.ep.reduce_stats(by_expert)
    c, seen = clustering.update_centroids(layer.centroids, layer.centroid_seen, by_expert[:, :-2].to(layer.centroids.dtype),
                                          by_expert[:, -2].to(layer.centroids.dtype), layer.config.beta)
    layer.centroids.copy_(c)
    layer.centroid_seen.copy_(seen)
    layer.schedule.forward_done()
    return layer._last_counts


@dataclass
class Decision:
    gain: float
    slot_of_expert: torch.Tensor  # [E] slot of each expert now
    old_assign: torch.Tensor     # [E] group of each expert now
    new_assign: torch.Tensor     # [E] group of each expert after (labels not yet matched)
    seconds: float               # wall time of inputs + decision


@torch.no_grad()
def recluster(layer, force: bool = False) -> bool:
    """Cluster ``layer`` (a ``ClusteredMoE``) now; the first call compresses the full experts.
    Returns True if a regroup was applied. ``force=True`` applies it even below ``delta``."""
    layer.schedule.sync_skipped_steps()   # before reading centroids: a skipped step's are undone
    t_start = time.perf_counter()
    was_compressed = layer.compressed
    eff = layer.experts.effective_weights(was_compressed, read=layer.io.read)   # local slot order
    d = decide(layer, eff, t_start)
    sched = layer.schedule
    sched["last_recluster_step"] = layer.step
    if layer.clustered and not force and d.gain < layer.config.delta:
        sched["skipped"] = sched["skipped"] + 1
        layer.last_regroup["last_gain"] = float(d.gain)
        layer.regroup_times = {"regroup_cluster_s": d.seconds, "regroup_migrate_s": 0.0}
        layer.regroup_seconds += time.perf_counter() - t_start
        return False
    apply(layer, eff, d, was_compressed)
    layer.regroup_seconds += time.perf_counter() - t_start
    return True


def decide(layer, eff, t_start: float) -> Decision:
    """Steps 1-2: the new grouping and its gain, identical on every rank."""
    cfg, ep = layer.config, layer.ep
    G, K, E = layer.num_groups, layer.experts_per_group, layer.num_experts
    ex = layer.experts
    slot_of_expert = layer.slot_of_expert()
    old_assign = (slot_of_expert // K).cpu()
    layer.sync.average_(layer.centroids)  # replicas must cluster on the same statistics
    # identical on every rank now (averaged, or reduced every step under expert parallelism),
    # so every rank refuses together
    refuse_nonfinite(layer.centroids, f"layer {layer.layer_index}: the activation centroids", torch.arange(E))
    if cfg.grouping == "random":   # the ablation without online clustering: a fixed random balanced grouping
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * layer.layer_index)
        new_assign = torch.empty(E, dtype=torch.long)
        new_assign[torch.randperm(E, generator=gen)] = torch.arange(E) // K
        return Decision(0.0, slot_of_expert, old_assign, new_assign, time.perf_counter() - t_start)
    if ep is None:
        flat = torch.cat([w[slot_of_expert].reshape(E, -1) for w in eff.values()], dim=1)
    else:  # rank 0 coordinates: it alone needs every expert's weights (S_param)
        flat = ep.gather_to_coordinator(torch.cat([w.reshape(ex.num_experts, -1) for w in eff.values()], dim=1))
        flat = flat[slot_of_expert] if flat is not None else None
    # experts with non-finite weights, found where all weights are (the coordinator)
    bad = None if flat is None or bool(torch.isfinite(flat).all()) else ~torch.isfinite(flat).all(1)
    if flat is not None and bad is None:
        s_param = layer.sim_cache.similarity(flat, layer.step)
        s_task = clustering.task_similarity(layer.centroids)
        sim = clustering.fuse_similarity(s_param, s_task.to(s_param.device), cfg.alpha)
        sim = clustering.prune_neighbors(sim, cfg.tau, cfg.neighbor_top_n)
        sched = layer.schedule
        seed = cfg.seed + 7919 * layer.layer_index + sched["reclusters"] + sched["skipped"]
        new_assign = clustering.balanced_kmeans(1.0 - sim.cpu(), G, seed=seed, iters=cfg.kmeans_iters)
        gain = (clustering.intra_group_similarity(sim.cpu(), new_assign, G)
                - clustering.intra_group_similarity(sim.cpu(), old_assign, G))
    elif bad is not None:   # the decision tells every rank: gain NaN, the bad experts flagged
        gain, new_assign = float("nan"), bad.cpu().long()
    else:  # not the coordinator: receives the decision below
        gain, new_assign = 0.0, torch.zeros(E, dtype=torch.long)
    # Rank 0's decision is everyone's: replicas apply the same regroup or none.
    decision = layer.sync.from_first(torch.cat([torch.tensor([gain], dtype=torch.float64),
                                                new_assign.to(torch.float64)]))
    gain, new_assign = float(decision[0]), decision[1:].round().long()
    if math.isnan(gain):
        refuse_nonfinite(None, f"layer {layer.layer_index}: the expert weights", new_assign.nonzero().squeeze(1))
    return Decision(gain, slot_of_expert, old_assign, new_assign, time.perf_counter() - t_start)


def apply(layer, eff, d: Decision, was_compressed: bool) -> None:
    """Steps 3-5: move experts to their new slots, re-decompose changed groups, move state."""
    t_decided = time.perf_counter()
    cfg, ep, io, ex = layer.config, layer.ep, layer.io, layer.experts
    G, K, E = layer.num_groups, layer.experts_per_group, layer.num_experts
    dev = layer.expert_of_slot.device
    Gl = ex.G                                    # groups held here (G without expert parallelism)
    local = slice(ex.group_offset * K, (ex.group_offset + Gl) * K)   # their global slots
    slot_of_expert, old_assign = d.slot_of_expert, d.old_assign
    new_assign = clustering.match_group_labels(old_assign, d.new_assign, G)
    new_expert_of_slot = place(old_assign, new_assign, slot_of_expert.cpu(), G, K).to(dev)
    new_to_old = slot_of_expert[new_expert_of_slot]          # old slot of the expert now in each slot
    # overlap[g', g] = share of new group g' that came from old group g (rows sum to 1)
    overlap = torch.zeros(G, G, dtype=torch.float32)
    overlap.index_put_((new_assign, old_assign), torch.ones(E), accumulate=True)
    overlap = (overlap / K).to(dev)

    # A group whose slots hold the same experts as before keeps its base and factors: a fresh
    # decomposition would re-truncate its trained residuals (lossy whenever rank < full).
    keep = torch.zeros(G, dtype=torch.bool, device=dev)
    if was_compressed:
        keep = (new_to_old.view(G, K) == torch.arange(E, device=dev).view(G, K)).all(dim=1)
    keep_slots = keep.repeat_interleave(K)
    # From here on, only the groups held here: under expert parallelism rows of other ranks'
    # slots are fetched from their owners (``take``), values and optimizer moments alike.
    if ep is None:
        rows, take, g_rows = new_to_old, None, overlap
        keep_l, keep_slots_l = keep, keep_slots
    else:
        rows, take = new_to_old[local], ep.take_rows
        g_rows = overlap[ex.group_offset:ex.group_offset + Gl]
        keep_l, keep_slots_l = keep[ex.group_offset:ex.group_offset + Gl], keep_slots[local]
    redo = (~keep_l).nonzero().squeeze(1)   # only these groups are decomposed (SVD is the cost)
    rel_errors, gated = [], 0
    if not cfg.low_rank:   # the ablation without compression: full experts move with their slots
        for p in ex.full.values():
            io.permute_rows(p, rows, take=take)
    for name, w in (eff.items() if cfg.low_rank else ()):
        base_v = io.read(ex.base[name]).to(w.dtype).clone()
        a_v = io.read(ex.fa[name]).to(w.dtype).view(Gl, K, *ex.fa[name].shape[1:]).clone()
        b_v = io.read(ex.fb[name]).to(w.dtype).view(Gl, K, *ex.fb[name].shape[1:]).clone()
        # weights of the experts now in the slots of the groups to decompose (under expert
        # parallelism fetched from their old owners; every rank joins, with or without rows)
        redo_rows = rows.view(Gl, K)[redo].reshape(-1)
        members = w[redo_rows] if take is None else take(w, redo_rows)
        if redo.numel():
            dec = decompose_groups(members.view(redo.numel(), K, *w.shape[1:]), cfg.rank, cfg.gamma)
            base_v[redo], a_v[redo], b_v[redo] = dec.base, dec.a, dec.b
            rel_errors.append(dec.rel_error.reshape(-1))
            gated += int(dec.gated.sum())
        mix = (lambda key, s: mix_groups(g_rows, s, take)) if was_compressed else None
        io.write(ex.base[name], base_v, mix)
        old_rows = rows if was_compressed else None
        io.write_fresh(ex.fa[name], a_v.reshape(Gl * K, *a_v.shape[2:]), old_rows, keep_slots_l, take=take)
        io.write_fresh(ex.fb[name], b_v.reshape(Gl * K, *b_v.shape[2:]), old_rows, keep_slots_l, take=take)
    for p in ex.bias.values():
        io.permute_rows(p, rows, take=take)
    if ep is not None:
        ep.note_migration(int((new_to_old[local] // (Gl * K) != ep.rank).sum()))
    layer.router.regroup(new_to_old, overlap, io)
    if not was_compressed and cfg.low_rank:
        for p in ex.full.values():
            io.release(p)
    layer.expert_of_slot.copy_(new_expert_of_slot)
    sched = layer.schedule
    sched["compressed"] = 1
    sched["reclusters"] = sched["reclusters"] + 1
    sched["frozen_until"] = layer.step + cfg.router_freeze_steps
    layer.last_regroup = {
        "last_gain": float(d.gain),
        # over the re-decomposed groups (0.0 when every group was kept)
        "reconstruction_error": float(torch.cat(rel_errors).mean()) if rel_errors else 0.0,
        "gated_residuals": gated,
        "moved_experts": int((new_to_old != torch.arange(E, device=dev)).sum()),
    }
    # wall times (not checkpointed): similarity + k-means + agreement; decomposition + moving slots and moments
    layer.regroup_times = {"regroup_cluster_s": d.seconds, "regroup_migrate_s": time.perf_counter() - t_decided}


def place(old_assign: torch.Tensor, new_assign: torch.Tensor, slot_of_expert: torch.Tensor,
          G: int, K: int) -> torch.Tensor:
    """Slot table for the new grouping: an expert that stays in its group keeps its slot."""
    expert_of_slot = torch.full((G * K,), -1, dtype=torch.long)
    for g in range(G):
        members = (new_assign == g).nonzero().squeeze(-1).tolist()
        movers = []
        for e in members:
            s = int(slot_of_expert[e])
            if int(old_assign[e]) == g:
                expert_of_slot[s] = e
            else:
                movers.append(e)
        free = [g * K + j for j in range(K) if expert_of_slot[g * K + j] < 0]
        for s, e in zip(free, movers):
            expert_of_slot[s] = e
    assert (expert_of_slot >= 0).all()
    return expert_of_slot


def refuse_nonfinite(rows: Optional[torch.Tensor], what: str, experts: torch.Tensor) -> None:
    """Clustering on NaN/inf would crash inside an SVD or regroup on garbage: one clear error.
    ``rows`` (E, ...) is checked per expert; None means ``experts`` already lists the bad ones."""
    if rows is not None:
        experts = experts[~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(1).cpu()]
    if experts.numel():
        raise FloatingPointError(f"{what} of experts {experts.tolist()} are not finite (NaN or inf): refusing to "
                                 f"cluster on them. Non-finite training tokens are left out of the centroids "
                                 f"(stats()['nonfinite_tokens']); non-finite weights mean training diverged")


def mix_groups(coeff: torch.Tensor, s: torch.Tensor, take=None) -> torch.Tensor:
    """New groups' rows as convex combinations of old groups' rows: ``coeff[g', g] @ s[g]``.
    With ``take`` (expert parallelism) only the old groups some local new group draws on are
    fetched from their owners; ``coeff`` then has one row per local new group and G columns."""
    if take is None:
        return (coeff.to(s.dtype) @ s.reshape(s.shape[0], -1)).reshape(s.shape)
    needed = (coeff.sum(0) > 0).nonzero().squeeze(1)
    old = take(s, needed)
    return (coeff[:, needed].to(s.dtype) @ old.reshape(old.shape[0], -1)).reshape(s.shape)
