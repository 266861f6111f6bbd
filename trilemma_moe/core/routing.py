"""Two-stage hierarchical router (paper section 3.3).

Stage 1: ``p_g = softmax(u_g^T x / t)`` over the G groups, keep the top-g1 groups.
Stage 2: inside each chosen group, ``p_i = softmax(v_i^T x / t)`` over that group's K experts
only, keep the top-k.

Combine weight of (token, expert i in chosen group g): ``w = p_g * p_i`` with both softmaxes
un-renormalised. This is differentiable in both u (through p_g) and v (through p_i), so the task
loss trains the prototypes and the expert vectors; renormalising p_g over the chosen groups
would cut u off from the task loss when g1 = 1.

Expert vectors ``v`` are stored in slot order (slot = group * K + position) so that the logits of
a group are a contiguous slice; a regroup permutes ``v`` with the experts.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    group_idx: torch.Tensor      # (T, g1) chosen groups
    slot_idx: torch.Tensor       # (T, g1, k) chosen expert slots (global slot ids)
    weights: torch.Tensor        # (T, g1, k) combine weights p_g * p_i
    group_probs: torch.Tensor    # (T, G)
    expert_probs: torch.Tensor   # (T, G, K) softmax over each group's experts
    group_logits: torch.Tensor   # (T, G) (temperature applied)
    expert_logits: torch.Tensor  # (T, G, K) (temperature applied)


class HierarchicalRouter(nn.Module):
    def __init__(self, hidden_size: int, num_groups: int, experts_per_group: int,
                 group_top_k: int, top_k: int, generator: torch.Generator | None = None):
        super().__init__()
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.group_top_k, self.top_k = group_top_k, top_k
        bound = 1.0 / math.sqrt(hidden_size)  # nn.Linear's init scale
        self.group_proto = nn.Parameter(
            (torch.rand(num_groups, hidden_size, generator=generator) * 2 - 1) * bound)
        self.expert_vec = nn.Parameter(
            (torch.rand(num_groups * experts_per_group, hidden_size, generator=generator) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor, temperature: float = 1.0, frozen: bool = False) -> Routing:
        u, v = self.group_proto, self.expert_vec
        if frozen:  # one step without router gradients after a regroup (paper 3.5 (i))
            u, v = u.detach(), v.detach()
        G, K = self.num_groups, self.experts_per_group
        # Logits in at least float32 (bf16/fp16 are upcast; a float64 router stays float64).
        dt = torch.promote_types(torch.promote_types(x.dtype, u.dtype), torch.float32)
        xc = x.to(dt)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run them in bf16
            logits = xc @ torch.cat([u, v]).to(dt).t()        # both stages in one product
            if temperature != 1.0:
                logits = logits / temperature
        group_logits, expert_logits = logits.split([G, G * K], dim=1)
        return hierarchical_topk(group_logits, expert_logits.view(-1, G, K), self.group_top_k, self.top_k)

    @torch.no_grad()
    def regroup(self, new_to_old_slot: torch.Tensor, overlap: torch.Tensor, io) -> None:
        """Move each v_i with its expert; warm-start u as the convex combination of the old
        prototypes weighted by where the new group's members came from (paper 3.5 (ii))."""
        io.permute_rows(self.expert_vec, new_to_old_slot)
        io.mix_rows(self.group_proto, overlap)


def hierarchical_topk(group_logits: torch.Tensor, expert_logits: torch.Tensor, group_top_k: int,
                      top_k: int) -> Routing:
    """Top-g1 groups by softmax(group_logits); inside each, top-k experts by the softmax over
    that group's experts only. group_logits (T, G), expert_logits (T, G, K)."""
    K = expert_logits.shape[-1]
    group_probs = F.softmax(group_logits, dim=-1)
    expert_probs = F.softmax(expert_logits, dim=-1)
    top_pg, group_idx = group_probs.topk(group_top_k, dim=-1)                    # (T, g1)
    chosen = expert_probs.gather(1, group_idx.unsqueeze(-1).expand(-1, -1, K))  # (T, g1, K)
    top_pi, pos = chosen.topk(top_k, dim=-1)                                     # (T, g1, k)
    slot_idx = group_idx.unsqueeze(-1) * K + pos
    weights = top_pg.unsqueeze(-1) * top_pi
    return Routing(group_idx, slot_idx, weights, group_probs, expert_probs, group_logits, expert_logits)


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    """bincount as float, without bincount's host sync on CUDA (integer-valued sums are exact)."""
    flat = idx.reshape(-1)
    return torch.zeros(n, device=flat.device).scatter_add_(0, flat, torch.ones(flat.numel(), device=flat.device))


def slot_hits(slot_idx: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(T, E) float32 0/1 matrix: token t chose slot s. A token's chosen slots are distinct (distinct
    groups, distinct experts inside a group), so its column sums are the slot counts and its
    transpose times x gives the per-slot activation sums."""
    T = slot_idx.shape[0]
    return torch.zeros(T, num_slots, device=slot_idx.device).scatter_(1, slot_idx.flatten(1), 1.0)


def aux_losses(r: Routing, aux_loss_coef: float, z_loss_coef: float, reduce=None,
               slot_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load balancing at both levels plus an ST-MoE z-loss.

    group:  G * sum_g f_g * P_g, f_g = share of (token, group) choices, P_g = mean p_g.
    expert: E * sum_i f_i * Q_i, f_i = share of (token, expert) choices,
            Q_i = mean of the joint probability p_g(i) * p_i (sums to 1 over all experts).
    Both equal 1 under perfectly uniform routing.

    ``slot_counts``: the (E,) choice counts if the caller has them (``slot_hits(...).sum(0)``).
    ``reduce``: a differentiable sum over ranks (expert parallelism). The shares and means are
    then taken over every rank's tokens, so the value equals the one-process loss on the whole
    batch; summing ranks' gradients (as data-parallel reduction does) gives its gradient.
    """
    if reduce is not None:
        return _reduced_aux_losses(r, aux_loss_coef, z_loss_coef, reduce)
    T, G, K = r.expert_probs.shape
    dev = r.group_probs.device
    if T == 0:
        return torch.zeros((), device=dev)
    loss = 0.0
    if aux_loss_coef > 0:
        E = G * K
        if slot_counts is None:
            slot_counts = _count(r.slot_idx, E)
        f_e = slot_counts.to(r.group_probs.dtype) / r.slot_idx.numel()
        # every chosen (token, group) pair holds k chosen slots, so a group's share of the pairs
        # is the sum of its slots' shares
        f_g = f_e.view(G, K).sum(1)
        joint = (r.group_probs.unsqueeze(-1) * r.expert_probs).reshape(T, E).mean(0)
        lb = G * torch.dot(f_g, r.group_probs.mean(0)) + E * torch.dot(f_e, joint)
        loss = loss + aux_loss_coef * lb
    if z_loss_coef > 0:
        z_group = torch.logsumexp(r.group_logits, dim=-1).square().mean()
        chosen = r.expert_logits.gather(1, r.group_idx.unsqueeze(-1).expand(-1, -1, K))
        z_expert = torch.logsumexp(chosen, dim=-1).square().mean()
        loss = loss + z_loss_coef * (z_group + z_expert)
    if not torch.is_tensor(loss):
        return torch.zeros((), device=dev)
    return loss


def _reduced_aux_losses(r: Routing, aux_loss_coef: float, z_loss_coef: float, reduce) -> torch.Tensor:
    """aux_losses over the tokens of every rank: sums are reduced, then divided (one collective)."""
    T, G, K = r.expert_probs.shape
    E, g1, k = G * K, r.group_idx.shape[1], r.slot_idx.shape[-1]
    dt = r.group_probs.dtype
    chosen = r.expert_logits.gather(1, r.group_idx.unsqueeze(-1).expand(-1, -1, K))
    parts = [_count(r.group_idx, G).to(dt),
             _count(r.slot_idx, E).to(dt),
             r.group_probs.sum(0),
             (r.group_probs.unsqueeze(-1) * r.expert_probs).reshape(T, E).sum(0),
             torch.logsumexp(r.group_logits, dim=-1).pow(2).sum().reshape(1),
             torch.logsumexp(chosen, dim=-1).pow(2).sum().reshape(1),
             torch.tensor([float(T)], dtype=dt, device=r.group_probs.device)]
    total = reduce(torch.cat(parts))
    cnt_g, cnt_e, psum_g, joint_sum, zg, ze, n = torch.split(total, [G, E, G, E, 1, 1, 1])
    loss = total.sum() * 0.0   # keeps the graph (and the collective's backward) on every rank
    if float(n.detach()) == 0:
        return loss
    if aux_loss_coef > 0:
        lb_group = G * ((cnt_g / (n * g1)) * (psum_g / n)).sum()
        lb_expert = E * ((cnt_e / (n * g1 * k)) * (joint_sum / n)).sum()
        loss = loss + aux_loss_coef * (lb_group + lb_expert)
    if z_loss_coef > 0:
        loss = loss + z_loss_coef * (zg / n + ze / (n * g1)).sum()
    return loss
