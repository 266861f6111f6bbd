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

from .metrics import mean_over_rows


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

    def forward(self, x: torch.Tensor, temperature: float = 1.0, frozen: bool = False,
                flat: bool = False) -> Routing:
        """``flat=True``: the ablation without the group stage (``flat_topk``); the group
        prototypes are not used and get no gradient."""
        G, K = self.num_groups, self.experts_per_group
        logits = self.logits(x, temperature, frozen, flat)
        if flat:
            return flat_topk(logits, G, self.top_k)
        group_logits, expert_logits = logits.split([G, G * K], dim=1)
        return hierarchical_topk(group_logits, expert_logits.view(-1, G, K), self.group_top_k, self.top_k)

    def logits(self, x: torch.Tensor, temperature: float = 1.0, frozen: bool = False, flat: bool = False):
        """(T, G + E): the group logits u_g.x then the expert logits v_i.x (slot order), over the
        temperature; (T, E) expert logits alone when ``flat``."""
        u, v = self.group_proto, self.expert_vec
        if frozen:  # one step without router gradients after a regroup (paper 3.5 (i))
            u, v = u.detach(), v.detach()
        # Logits in at least float32 (bf16/fp16 are upcast; a float64 router stays float64).
        dt = torch.promote_types(torch.promote_types(x.dtype, u.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run them in bf16
            w = v if flat else torch.cat([u, v])               # both stages in one product
            logits = x.to(dt) @ w.to(dt).t()
            return logits / temperature if temperature != 1.0 else logits

    def route_with_losses(self, x: torch.Tensor, aux_loss_coef: float, z_loss_coef: float,
                          temperature: float = 1.0, frozen: bool = False):
        """One-process routing and its balance/z losses in one autograd node (``FusedRouterLoss``).

        Returns ``(routing, loss, hits, slot_counts)``: the same values as ``forward`` followed by
        ``aux_losses(routing, ...)`` (only ``routing.weights`` and ``loss`` carry gradients), plus the
        (T, E) 0/1 slot matrix and its column sums (``slot_hits``), in the logits' dtype."""
        u, v = self.group_proto, self.expert_vec
        if frozen:
            u, v = u.detach(), v.detach()
        G, K = self.num_groups, self.experts_per_group
        (weights, loss, group_idx, slot_idx, group_probs, expert_probs, logits, hits,
         counts) = FusedRouterLoss.apply(x, u, v, float(temperature), G, K, self.group_top_k, self.top_k,
                                         float(aux_loss_coef), float(z_loss_coef))
        group_logits, expert_logits = logits.split([G, G * K], dim=1)
        r = Routing(group_idx, slot_idx, weights, group_probs, expert_probs, group_logits,
                    expert_logits.view(-1, G, K))
        return r, loss, hits, counts

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
    slot_idx = pos.add(group_idx.unsqueeze(-1), alpha=K)                        # group * K + pos
    weights = top_pg.unsqueeze(-1) * top_pi
    return Routing(group_idx, slot_idx, weights, group_probs, expert_probs, group_logits, expert_logits)


def flat_topk(expert_logits: torch.Tensor, num_groups: int, top_k: int) -> Routing:
    """Top-k over all E experts by one softmax (paper Table 3, "w/o hierarchical routing").

    Each chosen expert is its own (token, group) pair holding one slot, so dispatch, statistics
    and the balance losses read it as g1 = k pairs of one expert (two choices may share a group).
    Combine weights are the flat probabilities, un-renormalised like ``p_g * p_i``. The group view
    is exact: ``group_logits`` are the log-sum-exp of each group's expert logits, so
    ``group_probs * expert_probs`` is the flat softmax."""
    T, E = expert_logits.shape
    K = E // num_groups
    probs = F.softmax(expert_logits, dim=-1)
    top_p, slot = probs.topk(top_k, dim=-1)                          # (T, k)
    el = expert_logits.view(T, num_groups, K)
    group_logits = torch.logsumexp(el, dim=-1)
    return Routing(torch.div(slot, K, rounding_mode="floor"), slot.unsqueeze(-1), top_p.unsqueeze(-1),
                   F.softmax(group_logits, dim=-1), F.softmax(el, dim=-1), group_logits, el)


class FusedRouterLoss(torch.autograd.Function):
    """``HierarchicalRouter.forward`` + ``aux_losses`` (one process, ``reduce=None``) as one
    autograd node with an analytic backward, to cut the number of dispatched operations.

    forward(x, u, v, t, G, K, g1, k, aux_coef, z_coef) ->
        weights (T, g1, k), loss (), group_idx, slot_idx, group_probs, expert_probs,
        logits (T, G + E), hits (T, E), slot_counts (E,)
    Only ``weights`` and ``loss`` are differentiable. The loss is linear in the group probabilities
    p_g and the expert probabilities p_i given the (gradient-free) shares f:
        aux * lb = sum_{t,g} p_g[t,g] H[t,g],  H[t,g] = aux/T * (G f_g + E sum_j p_i[t,g,j] f_e[g,j]),
    so d(aux * lb)/dp_g = H and d(aux * lb)/dp_i[t,g,j] = aux E / T * p_g[t,g] f_e[g,j]. The z-loss
    adds 2 z lse / count * softmax to the logits' gradient. The loss's gradient w.r.t. the logits
    does not depend on the upstream gradients, so the forward computes it once; the backward adds
    the combine weights' part (softmax Jacobians) and ends in two matmuls.
    """

    @staticmethod
    def forward(ctx, x, u, v, t, G, K, g1, k, aux_coef, z_coef):
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):   # all of it in dt (autocast would run matmuls in bf16)
            return FusedRouterLoss._forward(ctx, x, u, v, t, G, K, g1, k, aux_coef, z_coef)

    @staticmethod
    def _forward(ctx, x, u, v, t, G, K, g1, k, aux_coef, z_coef):
        T = x.shape[0]
        E = G * K
        dt = torch.promote_types(torch.promote_types(x.dtype, u.dtype), torch.float32)
        dev = x.device
        w_cat = torch.cat([u, v]).to(dt)
        xc = x.to(dt)
        if t != 1.0:   # logits = x w^T / t in one product (beta = 0: the empty input is not read)
            logits = torch.empty(T, G + E, dtype=dt, device=dev).addmm_(xc, w_cat.t(), beta=0, alpha=1.0 / t)
        else:
            logits = xc @ w_cat.t()
        gl, el = logits[:, :G], logits[:, G:].view(T, G, K)
        r = hierarchical_topk(gl, el, g1, k)
        pg, pe, group_idx, slot_idx, weights = r.group_probs, r.expert_probs, r.group_idx, r.slot_idx, r.weights
        hits = slot_hits(slot_idx, E, dt)
        counts = hits.sum(0)
        use_aux, use_z = aux_coef > 0 and T > 0, z_coef > 0 and T > 0
        loss = dlogits_loss = None
        if use_aux or use_z:
            # d(loss)/d(logits), (T, G + E): group part dg, expert part de (T, G, K)
            dlogits_loss = torch.empty(T, G + E, dtype=dt, device=dev)
            dg_out, de_out = dlogits_loss[:, :G], dlogits_loss[:, G:].view(T, G, K)
        if use_aux:
            # aux * lb = sum_{t,g} p_g H with H[t, g] = sum_j (p_i[t, g, j] + G / E) F[g, j],
            # F = aux E / T * f_e, f_e = counts / (T g1 k)  (G f_g[g] = G / E * sum_j E f_e[g, j])
            F_ = counts.view(G, K) * (aux_coef * E / (T * T * g1 * k))
            H = torch.bmm((pe + G / E).transpose(0, 1), F_.unsqueeze(-1)).squeeze(-1).t()   # (T, G)
            per_tg = pg * H                                     # the loss is its sum (plus the z part)
            dg = torch._softmax_backward_data(H, pg, -1, dt)
            de = torch._softmax_backward_data(pg.unsqueeze(-1) * F_, pe, -1, dt)
        if use_z:
            lse_g = torch.logsumexp(gl, dim=-1)                                    # (T,)
            lse_e = torch.logsumexp(el, dim=-1)                                    # (T, G)
            # z (mean_t lse_g^2 + mean over chosen (t, g) lse_e^2); d/d(logits) = 2 z lse / count * softmax
            half_ce = torch.zeros(T, G, dtype=dt, device=dev).scatter_(1, group_idx, z_coef / (T * g1)).mul_(lse_e)
            per_tg = half_ce * lse_e if not use_aux else per_tg.addcmul_(half_ce, lse_e)
            loss = torch.add(per_tg.sum(), torch.dot(lse_g, lse_g), alpha=z_coef / T)
            if use_aux:
                torch.addcmul(dg, pg, lse_g.unsqueeze(-1), value=2.0 * z_coef / T, out=dg_out)
                torch.addcmul(de, pe, half_ce.unsqueeze(-1), value=2.0, out=de_out)
            else:
                torch.mul(pg, lse_g.unsqueeze(-1), out=dg_out).mul_(2.0 * z_coef / T)
                torch.mul(pe, half_ce.unsqueeze(-1), out=de_out).mul_(2.0)
        elif use_aux:
            loss = per_tg.sum()
            dg_out.copy_(dg)
            de_out.copy_(de)
        if loss is None:
            loss = torch.zeros((), dtype=dt, device=dev)
        ctx.save_for_backward(xc, w_cat, pg, pe, slot_idx, dlogits_loss)
        ctx.meta = (t, G, K, x.dtype, u.dtype, v.dtype)
        ctx.mark_non_differentiable(group_idx, slot_idx, pg, pe, logits, hits, counts)
        return weights, loss, group_idx, slot_idx, pg, pe, logits, hits, counts

    @staticmethod
    def backward(ctx, d_weights, d_loss, *_):
        xc, w_cat, pg, pe, slot_idx, dlogits_loss = ctx.saved_tensors
        t, G, K, x_dtype, u_dtype, v_dtype = ctx.meta
        need_x, need_u, need_v = ctx.needs_input_grad[:3]
        T, E = xc.shape[0], G * K
        dt, dev = xc.dtype, xc.device
        use_loss = d_loss is not None and dlogits_loss is not None
        if d_weights is None and not use_loss:
            # nothing flows back (e.g. no tokens): still a gradient for every input that wants one,
            # so the router's parameters are reduced whatever the batch held
            d_weights = torch.zeros(T, *slot_idx.shape[1:], dtype=dt, device=dev)
        if d_weights is None:
            dlogits = dlogits_loss * d_loss
        else:
            # weights[t, a, b] = p_g[t, g_a] p_i[t, g_a, j_b]: with S the (T, G, K) scatter of
            # d(weights) (a token's slots are distinct), d p_i = S p_g and d p_g = sum_j S p_i
            n = math.prod(slot_idx.shape[1:])   # chosen slots per token (g1 * k; T may be 0)
            S = torch.zeros(T, E, dtype=dt, device=dev).scatter_(1, slot_idx.reshape(T, n),
                                                                 d_weights.reshape(T, n)).view(T, G, K)
            dg = torch._softmax_backward_data((S * pe).sum(-1), pg, -1, dt)
            de = torch._softmax_backward_data(S * pg.unsqueeze(-1), pe, -1, dt)
            if use_loss:
                dlogits = torch.empty(T, G + E, dtype=dt, device=dev)
                torch.addcmul(dg, dlogits_loss[:, :G], d_loss, out=dlogits[:, :G])
                torch.addcmul(de.view(T, E), dlogits_loss[:, G:], d_loss, out=dlogits[:, G:])
            else:
                dlogits = torch.cat([dg, de.view(T, E)], dim=1)
        dx = du = dv = None
        a = 1.0 / t    # logits = x w^T / t
        with torch.autocast(dev.type, enabled=False):
            if need_x:
                dx = torch.empty_like(xc).addmm_(dlogits, w_cat, beta=0, alpha=a) if t != 1.0 else dlogits @ w_cat
                dx = dx.to(x_dtype)
            if need_u or need_v:
                dw = (torch.empty_like(w_cat).addmm_(dlogits.t(), xc, beta=0, alpha=a) if t != 1.0
                      else dlogits.t() @ xc)
                if need_u and need_v and u_dtype == v_dtype:
                    dw = dw.to(u_dtype)
                du = dw[:G].to(u_dtype) if need_u else None
                dv = dw[G:].to(v_dtype) if need_v else None
        return dx, du, dv, None, None, None, None, None, None, None


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    """bincount as float, without bincount's host sync on CUDA (integer-valued sums are exact)."""
    flat = idx.reshape(-1)
    return torch.zeros(n, device=flat.device).scatter_add_(0, flat, torch.ones(flat.numel(), device=flat.device))


def slot_hits(slot_idx: torch.Tensor, num_slots: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T, E) 0/1 matrix: token t chose slot s. A token's chosen slots are distinct (distinct
    groups, distinct experts inside a group), so its column sums are the slot counts and its
    transpose times x gives the per-slot activation sums."""
    T = slot_idx.shape[0]
    return torch.zeros(T, num_slots, dtype=dtype, device=slot_idx.device).scatter_(1, slot_idx.flatten(1), 1.0)


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
    # No early exit for T = 0: the same operations run on zero rows (mean_over_rows), so an empty
    # batch gives a zero loss whose backward reaches the router the same way.
    loss = 0.0
    if aux_loss_coef > 0:
        E = G * K
        if slot_counts is None:
            slot_counts = _count(r.slot_idx, E)
        f_e = slot_counts.to(r.group_probs.dtype) / max(r.slot_idx.numel(), 1)
        # every chosen (token, group) pair holds k chosen slots, so a group's share of the pairs
        # is the sum of its slots' shares
        f_g = f_e.view(G, K).sum(1)
        joint = mean_over_rows((r.group_probs.unsqueeze(-1) * r.expert_probs).reshape(T, E))
        lb = G * torch.dot(f_g, mean_over_rows(r.group_probs)) + E * torch.dot(f_e, joint)
        loss = loss + aux_loss_coef * lb
    if z_loss_coef > 0:
        z_group = mean_over_rows(torch.logsumexp(r.group_logits, dim=-1).square())
        chosen = r.expert_logits.gather(1, r.group_idx.unsqueeze(-1).expand(-1, -1, K))
        z_expert = mean_over_rows(torch.logsumexp(chosen, dim=-1).square().reshape(-1))
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
