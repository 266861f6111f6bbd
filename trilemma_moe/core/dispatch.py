"""Token dispatch: from a routing decision to rows the experts run on, and back.

Two dispatchers behind one interface (``run(x, routing, plan, compute) -> y[T, d]``):

* :class:`LocalDispatcher` -- one process holds every group. Sorts (token, group) pairs by group
  and (pair, expert) rows by slot; with ``capacity_factor`` set it drops pairs over capacity as
  DeepSpeed does.
* :class:`ExpertParallelDispatcher` -- groups live on the ranks of an expert-parallel group: each
  (token, chosen group) pair crosses once to the group's owner with its k local slot ids and
  combine weights, the owner runs its experts, results come back. The second routing stage never
  crosses the network (paper 3.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..kernels import fused
from .interfaces import ExpertParallelExchange
from .routing import Routing


@dataclass
class DispatchPlan:
    """Pairs (token, chosen group) sorted by group, rows (pair, chosen expert) sorted by slot."""
    pair_token: torch.Tensor          # [P] token of each pair
    pair_group: torch.Tensor          # [P] group of each pair (sorted)
    pair_group_counts: List[int]      # [G] pairs per group
    pair_slots: torch.Tensor          # [P, k] the pair's chosen slots
    pair_weights: torch.Tensor        # [P, k] their combine weights
    row_pair: torch.Tensor            # [P*k] pair of each row, rows sorted by slot
    row_weight: torch.Tensor          # [P*k]
    row_slot: torch.Tensor            # [P*k]
    slot_counts: List[int]            # [E] rows per slot
    slot_counts_tensor: torch.Tensor  # the same on the device


def sort_rows(pair_slots: torch.Tensor, num_slots: int):
    """Rows (pair, chosen slot) sorted by slot: (row_pair, row order, row_slot sorted, slot counts)."""
    k = pair_slots.shape[-1]
    row_slot = pair_slots.reshape(-1)
    row_order = torch.argsort(row_slot, stable=True)
    row_pair = torch.arange(pair_slots.shape[0], device=row_slot.device).repeat_interleave(k)
    return row_pair[row_order], row_order, row_slot[row_order], torch.bincount(row_slot, minlength=num_slots)


class LocalDispatcher:
    """One process: plan pairs and rows; optional DeepSpeed-style capacity dropping."""

    def __init__(self, num_groups: int, num_slots: int, capacity_factor: Optional[float] = None,
                 min_capacity: int = 0):
        self.num_groups, self.num_slots = num_groups, num_slots
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity

    def plan(self, r: Routing) -> DispatchPlan:
        """Sort (token, group) pairs by group and (pair, expert) rows by slot."""
        T, g1 = r.group_idx.shape
        k = r.slot_idx.shape[-1]
        pair_group = r.group_idx.reshape(-1)
        pair_order = torch.argsort(pair_group, stable=True)
        if self.capacity_factor is not None:
            pair_order = pair_order[self._within_capacity(pair_group[pair_order])]
        pair_slots = r.slot_idx.reshape(-1, k)[pair_order]
        row_weight = r.weights.reshape(-1, k)[pair_order].reshape(-1)
        row_pair, row_order, row_slot, slot_counts = sort_rows(pair_slots, self.num_slots)
        return DispatchPlan(
            pair_token=pair_order // g1, pair_group=pair_group[pair_order],
            pair_group_counts=torch.bincount(pair_group[pair_order], minlength=self.num_groups).tolist(),
            pair_slots=pair_slots, pair_weights=r.weights.reshape(-1, k)[pair_order],
            row_pair=row_pair, row_weight=row_weight[row_order], row_slot=row_slot,
            slot_counts=slot_counts.tolist(), slot_counts_tensor=slot_counts)

    def _within_capacity(self, sorted_groups: torch.Tensor) -> torch.Tensor:
        """Token dropping like DeepSpeed's: each group takes at most
        ``max(min_capacity, ceil(capacity_factor * pairs / G))`` (token, group) pairs of this
        rank's batch, the earliest tokens first; the rest are dropped (their output is 0)."""
        n = sorted_groups.numel()
        cap = max(self.min_capacity, math.ceil(self.capacity_factor * n / self.num_groups))
        counts = torch.bincount(sorted_groups, minlength=self.num_groups)
        start = torch.cumsum(counts, 0) - counts
        position = torch.arange(n, device=sorted_groups.device) - start[sorted_groups]
        return position < cap

    @staticmethod
    def combine(y_pairs: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        return y_pairs.new_zeros(num_tokens, y_pairs.shape[1]).index_add(0, plan.pair_token, y_pairs)

    def run(self, x: torch.Tensor, plan: DispatchPlan,
            compute: Callable[[torch.Tensor, DispatchPlan], torch.Tensor]) -> torch.Tensor:
        """``compute(pair rows of x, plan) -> y_pairs``, combined per token."""
        return self.combine(compute(x.index_select(0, plan.pair_token), plan), plan, x.shape[0])


class ExpertParallelDispatcher:
    """Across ranks: dispatch -> compute on the owner -> combine."""

    def __init__(self, comm: ExpertParallelExchange, local_groups: int, experts_per_group: int):
        self.comm, self.Gl, self.K = comm, local_groups, experts_per_group

    def run(self, x: torch.Tensor, plan: DispatchPlan, expert_of_slot: torch.Tensor,
            compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(xs[R, d], ws[R, k], local slots[R, k]) -> y[R, d]`` runs on the rows this
        rank received (any order); the results go back to their tokens."""
        ep, Gl, K, d = self.comm, self.Gl, self.K, x.shape[1]
        dest = plan.pair_group // Gl                       # pairs are sorted by group, so by rank too
        send_counts = torch.bincount(dest, minlength=ep.size).tolist()
        recv_counts = ep.exchange_counts(send_counts)
        ep.record_flat(expert_of_slot[plan.pair_slots].reshape(-1), d * x.element_size())
        payload = torch.cat([x.index_select(0, plan.pair_token), plan.pair_weights.to(x.dtype)], dim=1)
        local_slot = (plan.pair_slots - dest.unsqueeze(1) * (Gl * K)).to(torch.int32)
        recv = ep.all_to_all(payload, send_counts, recv_counts, "tokens_out")
        recv_slot = ep.all_to_all(local_slot, send_counts, recv_counts, "routing_out").long()
        # An owner that receives no rows computes on zero rows through the same operations: its
        # backward enters the same collectives, and its expert parameters get (zero) gradients in
        # the same order as their replicas' on other ranks.
        y_recv = compute(recv[:, :d], recv[:, d:], recv_slot)
        y_back = ep.all_to_all(y_recv, recv_counts, send_counts, "tokens_back")
        return x.new_zeros(x.shape[0], d).index_add(0, plan.pair_token, y_back.to(x.dtype))


def owner_compute(experts, compressed: bool, use_fused: bool):
    """Expert parallelism: what the owner of a group runs on the pairs it received (each row a
    token's pair with its k local slots and weights), in the order received."""
    ex, K = experts, experts.K

    def compute(xs: torch.Tensor, ws: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if use_fused:   # each received pair a one-group token
            return fused.fused_expert_forward(ex, xs, slots[:, :1] // K, slots.unsqueeze(1), ws.unsqueeze(1))
        # sorted by local group and slot, as the one-process dispatch does
        order = torch.argsort(slots[:, 0] // K, stable=True)
        xs, ws, slots = xs[order], ws[order], slots[order]
        pair_group_counts = torch.bincount(slots[:, 0] // K, minlength=ex.G).tolist()
        row_pair, row_order, _, slot_counts = sort_rows(slots, ex.G * K)
        y_sorted = ex(xs, pair_group_counts, row_pair, ws.reshape(-1)[row_order], slot_counts.tolist(), compressed)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y_sorted.index_select(0, inverse)
    return compute
