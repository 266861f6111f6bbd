"""The regroup (paper 3.1 and 3.5): clustering inputs -> decision -> placement ->
re-decomposition -> optimizer-state moves.

1. *Inputs*: a CountSketch of every expert's weights (S_param), computed where the experts live
   and gathered to rank 0 (E x s floats), and the activation statistics (S_task): the paper's
   routed-token centroids, or, with ``regroup_similarity="probe"`` after the first clustering,
   the experts' residuals and their router logits on a shared probe batch (docs/REGROUP.md: after
   compression the paper's two similarities can only confirm the grouping in place).
2. *Decision*: fused similarity, pruned neighbours, pairs now together credited with the cost of
   moving (``regroup_move_cost``), balanced k-means; the intra-group similarity gain against the
   current grouping; rank 0's decision is broadcast so every replica applies the same regroup or
   none. Below ``delta`` (after the first clustering) it is skipped.
3. *Placement*: group labels matched to the old ones; an expert that stays in its group keeps
   its slot (:func:`place`).
4. *Re-decomposition*: ``regroup_migration="movers"``: only a moved expert gets new factors (the
   truncated SVD of its weights minus its new group's base); ``"redecompose"`` (the paper): every
   changed group gets a new base and rank-r factors; kept groups keep their trained residuals.
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
from .compression import decompose_groups, residual_factors
from .interfaces import SlotRows


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
    if layer.config.regroup_similarity == "probe" and x.shape[0]:
        # the probe batch: up to probe_tokens of the latest tokens, spread over the micro-batch
        n = layer.config.probe_tokens
        rows = torch.linspace(0, x.shape[0] - 1, min(n, x.shape[0]), device=x.device).long()
        layer.probe = xd.index_select(0, rows).nan_to_num(0.0, 0.0, 0.0)
    if layer.ep is not None:
        # centroids follow the tokens of every rank: identical everywhere, as at ep_size 1
        by_expert = layer.ep.reduce_stats(by_expert)
    if layer.drift is not None:   # every rank's counts under expert parallelism; averaged over replicas when measured
        layer.drift.observe(by_expert[:, -1])
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
def recluster(layer, force: bool = False, probe: Optional[torch.Tensor] = None) -> bool:
    """Cluster ``layer`` (a ``ClusteredMoE``) now; the first call compresses the full experts.
    Returns True if a regroup was applied. ``force=True`` applies it even below ``delta``.
    ``probe``: recent tokens [n, d] for ``regroup_similarity="probe"`` (default: the layer's own)."""
    layer.schedule.sync_skipped_steps()   # before reading centroids: a skipped step's are undone
    t_start = time.perf_counter()
    was_compressed = layer.compressed
    d = decide(layer, t_start, layer.probe if probe is None else probe)
    sched = layer.schedule
    sched["last_recluster_step"] = layer.step
    if layer.clustered and not force and d.gain < layer.config.delta:
        sched["skipped"] = sched["skipped"] + 1
        layer.last_regroup["last_gain"] = float(d.gain)
        layer.regroup_times = {"regroup_cluster_s": d.seconds, "regroup_migrate_s": 0.0}
        layer.regroup_seconds += time.perf_counter() - t_start
        return False
    apply(layer, d, was_compressed)
    layer.regroup_seconds += time.perf_counter() - t_start
    return True


def decide(layer, t_start: float, probe: Optional[torch.Tensor] = None) -> Decision:
    """Steps 1-2: the new grouping and its gain, identical on every rank."""
    cfg = layer.config
    G, K, E = layer.num_groups, layer.experts_per_group, layer.num_experts
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
    if probing(layer):   # (phase and config, never data: every rank joins)
        probe = layer.sync.gather_rows(probe, cfg.probe_tokens, layer.centroids)
    flat = param_sketches(layer, slot_of_expert)   # the coordinator's [E, s] (expert order); None elsewhere
    # experts with non-finite weights (a non-finite weight makes its sketch row non-finite)
    bad = None if flat is None or bool(torch.isfinite(flat).all()) else ~torch.isfinite(flat).all(1)
    gain, new_assign = 0.0, torch.zeros(E, dtype=torch.long)   # not the coordinator: receives the decision
    if flat is not None and bad is None:
        sim = similarity_for_regroup(layer, flat, slot_of_expert, old_assign, probe)
        if sim is not None:
            sched = layer.schedule
            seed = cfg.seed + 7919 * layer.layer_index + sched["reclusters"] + sched["skipped"]
            new_assign = clustering.balanced_kmeans(1.0 - sim, G, seed=seed, iters=cfg.kmeans_iters)
            gain = (clustering.intra_group_similarity(sim, new_assign, G)
                    - clustering.intra_group_similarity(sim, old_assign, G))
        else:   # no probe tokens on the coordinator yet: this check sees nothing, so nothing moves
            new_assign = old_assign
    elif bad is not None:   # the decision tells every rank: gain NaN, the bad experts flagged
        gain, new_assign = float("nan"), bad.cpu().long()
    # Rank 0's decision is everyone's: replicas apply the same regroup or none.
    decision = layer.sync.from_first(torch.cat([torch.tensor([gain], dtype=torch.float64),
                                                new_assign.to(torch.float64)]))
    gain, new_assign = float(decision[0]), decision[1:].round().long()
    if math.isnan(gain):
        refuse_nonfinite(None, f"layer {layer.layer_index}: the expert weights", new_assign.nonzero().squeeze(1))
    return Decision(gain, slot_of_expert, old_assign, new_assign, time.perf_counter() - t_start)


def param_sketches(layer, slot_of_expert: torch.Tensor) -> Optional[torch.Tensor]:
    """S_param's input: a CountSketch of ``param_sketch_size`` floats per expert, computed where the
    experts live and gathered to the coordinator (E x s floats, not E x d x d_ff weights), in expert
    order; None on other ranks. With ``regroup_similarity="probe"``, after the first clustering, it
    sketches what distinguishes the experts: their residuals A B^T (full experts, ``low_rank=False``:
    each minus the mean expert, taken on the sketches since they are linear)."""
    cfg, ex, ep = layer.config, layer.experts, layer.ep
    distinguish = probing(layer)
    sketch = clustering.CountSketch(cfg.param_sketch_size, cfg.seed + 7919 * layer.layer_index)
    local = torch.zeros(ex.num_experts, cfg.param_sketch_size, dtype=torch.float64,
                        device=layer.expert_of_slot.device)
    for offset, chunk in ex.weight_chunks(layer.compressed, read=layer.io.read,
                                          with_base=not (distinguish and layer.compressed)):
        sketch.add(local, chunk, offset)
    flat = local if ep is None else ep.gather_to_coordinator(local)
    if flat is None:
        return None
    flat = flat[slot_of_expert].cpu()
    if distinguish and not layer.compressed:
        flat = flat - flat.mean(0, keepdim=True)
    return flat


def probing(layer) -> bool:
    """The probe similarity is for experts already in groups: after the first clustering, or from
    the start with ``burn_in_form="compressed"`` (experts that share a base and see their group's
    tokens look alike to the paper's similarities). Before a full burn-in's first clustering no
    grouping exists to bias them, and dynamic and static runs then share their first grouping (a
    regroup's effect is measured against the static run)."""
    return layer.config.regroup_similarity == "probe" and (layer.clustered or layer.compressed)


def similarity_for_regroup(layer, flat: torch.Tensor, slot_of_expert: torch.Tensor, old_assign: torch.Tensor,
                           probe: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The fused, pruned similarity the k-means sees (float64 [E, E], CPU); None when the probe
    similarity has no tokens to look at."""
    cfg = layer.config
    s_param = layer.sim_cache.similarity(flat, layer.step)
    if probing(layer):
        if probe is None or probe.shape[0] < 2:
            return None
        # every expert's router logit on the same tokens: no routing decides who sees what
        logits = probe.to(layer.router.expert_vec.dtype) @ layer.router.expert_vec.detach().t()
        s_task = clustering.probe_logit_similarity(logits[:, slot_of_expert.to(logits.device)])
    else:
        s_task = clustering.task_similarity(layer.centroids)
    sim = clustering.fuse_similarity(s_param, s_task.cpu(), cfg.alpha)
    sim = clustering.prune_neighbors(sim, cfg.tau, cfg.neighbor_top_n)
    if layer.clustered and cfg.regroup_move_cost > 0:
        # Separating two experts of one group re-truncates both: pairs now together are credited
        # lambda x the relative error the last decomposition measured, so the k-means (and the gain
        # against delta) moves an expert only when the similarity says more than moving costs.
        together = (old_assign[:, None] == old_assign[None, :]) & ~torch.eye(len(old_assign), dtype=torch.bool)
        sim = sim + together * (cfg.regroup_move_cost * layer.last_regroup.get("decomposition_error", 0.0))
    return sim


def apply(layer, d: Decision, was_compressed: bool) -> None:
    """Steps 3-5: move experts to their new slots, re-decompose changed groups, move state.
    Only the effective weights of the slots that get new factors are built (the movers', after the
    first clustering with ``regroup_migration="movers"``), each by the rank that holds it."""
    t_decided = time.perf_counter()
    was_clustered = layer.clustered
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

    changed = (new_to_old // K) != torch.arange(G, device=dev).repeat_interleave(K)   # global slots
    # Which slots get new factors. "movers" (after the first clustering): every group keeps its base
    # and every expert that stayed keeps its factors; only a mover is re-expressed on its new
    # group's base. "redecompose" (the paper): a group whose members changed gets a new base and
    # all its members new factors; a group whose slots hold the same experts keeps both (a fresh
    # decomposition would re-truncate trained residuals: lossy whenever rank < full).
    movers_only = was_compressed and cfg.regroup_migration == "movers"
    if movers_only:
        keep_slots = ~changed
        keep = torch.ones(G, dtype=torch.bool, device=dev)
    else:
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
    redo = (~keep_l).nonzero().squeeze(1)   # groups to decompose (SVD is the cost)
    fresh = (~keep_slots_l).nonzero().squeeze(1)   # local slots that get new factors
    rel_errors, gated = [], 0
    if not cfg.low_rank:   # the ablation without compression: full experts move with their slots
        for p in ex.full.values():
            io.permute_rows(p, rows, take=take)
    # randomized SVD: one seed per regroup and layer, the same on every replica (``svd``)
    svd = dict(svd=cfg.svd, seed=cfg.seed + 7919 * layer.layer_index + layer.schedule["reclusters"])
    for name in (ex.spec.matrices if cfg.low_rank else ()):
        # weights of the experts now in the slots that get new factors, built for those slots only
        # (under expert parallelism by their old owners, on request; every rank joins, with or
        # without rows). Read before this matrix is written: its old values.
        def weights(slots, name=name):
            return ex.slot_weights(name, slots, was_compressed, read=io.read)
        members = weights(rows[fresh]) if take is None else take(SlotRows(ex.num_experts, weights), rows[fresh])
        base_v = io.read(ex.base[name]).to(members.dtype).clone()
        a_v = io.read(ex.fa[name]).to(members.dtype).view(Gl * K, *ex.fa[name].shape[1:]).clone()
        b_v = io.read(ex.fb[name]).to(members.dtype).view(Gl * K, *ex.fb[name].shape[1:]).clone()
        if movers_only:
            a_v[fresh], b_v[fresh], err = residual_factors(members - base_v[fresh // K], cfg.rank, members, **svd)
            rel_errors.append(err)
        elif redo.numel():
            dec = decompose_groups(members.view(redo.numel(), K, *members.shape[1:]), cfg.rank, cfg.gamma, **svd)
            base_v[redo], a_v.view(Gl, K, *a_v.shape[1:])[redo], b_v.view(Gl, K, *b_v.shape[1:])[redo] = \
                dec.base, dec.a, dec.b
            rel_errors.append(dec.rel_error.reshape(-1))
            gated += int(dec.gated.sum())
        if not movers_only:   # (movers: every base stays, with its moments)
            mix = (lambda key, s: mix_groups(g_rows, s, take)) if was_compressed else None
            io.write(ex.base[name], base_v, mix)
        old_rows = rows if was_compressed else None
        io.write_fresh(ex.fa[name], a_v, old_rows, keep_slots_l, take=take)
        io.write_fresh(ex.fb[name], b_v, old_rows, keep_slots_l, take=take)
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
    # experts that changed group, and the relative error of their new form (the re-truncation
    # they paid); summed over the expert-parallel ranks so every rank reports the same numbers
    mover_err = torch.zeros(4, dtype=torch.float64)   # sum/count over movers, then over all new factors
    if rel_errors:
        err = torch.stack(rel_errors).to(torch.float64).mean(0).cpu()    # mean over matrices, per fresh slot
        movers = (changed[local] if ep is not None else changed)[fresh].cpu()
        mover_err = torch.stack([err[movers].sum(), movers.sum().to(torch.float64),
                                 err.sum(), torch.tensor(float(err.numel()), dtype=torch.float64)])
    if ep is not None:   # replicas of a rank's groups add the same sums: the ratios stay right
        mover_err = ep.reduce_stats(mover_err.to(dev)).cpu()
    moved = int(changed.sum()) if was_clustered else 0
    previous = layer.last_regroup
    layer.last_regroup = {
        "last_gain": float(d.gain),
        # over the re-decomposed groups (0.0 when every group was kept)
        "reconstruction_error": float(mover_err[2] / mover_err[3]) if mover_err[3] > 0 else 0.0,
        # of the latest decomposition that ran (the move cost's yardstick)
        "decomposition_error": (float(mover_err[2] / mover_err[3]) if mover_err[3] > 0
                                else float(previous.get("decomposition_error", 0.0))),
        "gated_residuals": gated,
        "moved_experts": int((new_to_old != torch.arange(E, device=dev)).sum()),
        # experts that changed group in regroups after the first clustering, over the run
        "experts_moved": float(previous.get("experts_moved", 0.0)) + moved,
        "movers_error": float(mover_err[0] / mover_err[1]) if mover_err[1] > 0 else 0.0,
    }
    if moved:
        layer.regroup_events.append({"step": layer.step, "moved": moved, "gain": float(d.gain),
                                     "movers_error": layer.last_regroup["movers_error"]})
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
