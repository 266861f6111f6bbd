"""Communication volume of one MoE layer's dispatch, from routing alone.

Ours (two-stage): one row per (token, chosen group) to the group's owner: the hidden vector and
k combine weights (``elem`` bytes each) plus k int32 slot ids; the output (d values) comes back.
Flat top-k (DeepSpeed-MoE): one row per (token, chosen expert) to the expert's owner
(expert e on rank e // (E/ep_size)), d values out and d back. Rows whose destination is the
sending rank itself never cross the network and are not counted.

``predicted_bytes`` is what ``ExpertParallelComm`` must measure for one forward+backward (tested);
``simulate`` replays routing on a simulated cluster and splits the bytes into intra-node and
inter-node traffic (``trilemma-moe profile-comm``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .topology import check_divides_world, check_placement


def predicted_bytes(group_idx: torch.Tensor, expert_idx: torch.Tensor, num_groups: int, num_experts: int,
                    ep_size: int, rank: int, d: int, k: int, elem: int = 4,
                    received_groups: Optional[torch.Tensor] = None) -> Dict[str, int]:
    """Bytes rank ``rank`` sends in one dropless forward+backward.

    group_idx (T, g1) and expert_idx (T, g1, k): this rank's routing (global group / expert ids);
    received_groups: the chosen groups of the other ranks' tokens (to count what this rank returns).
    """
    owner = group_idx.reshape(-1) // (num_groups // ep_size)
    n_out = int((owner != rank).sum())
    out = {"counts": 8 * (ep_size - 1),
           "tokens_out": n_out * (d + k) * elem, "routing_out": n_out * k * 4,
           "tokens_back_grad": n_out * d * elem}
    if received_groups is not None:
        n_in = int((received_groups.reshape(-1) // (num_groups // ep_size) == rank).sum())
        out["tokens_back"] = n_in * d * elem
        out["tokens_out_grad"] = n_in * (d + k) * elem
    flat_owner = expert_idx.reshape(-1) // (num_experts // ep_size)
    n_flat = int((flat_owner != rank).sum())
    out["flat_tokens_out"] = out["flat_tokens_back"] = n_flat * d * elem
    return out


def ep_group_of_rank(ranks: torch.Tensor, world: int, ep_size: int, layout: str) -> tuple:
    """(expert-parallel group id, rank within it) as DeepSpeed lays ranks out: ``consecutive``
    (default: blocks [i*ep, (i+1)*ep)) or ``strided`` (use_data_before_expert_parallel)."""
    if layout == "consecutive":
        return ranks // ep_size, ranks % ep_size
    if layout == "strided":
        stride = world // ep_size
        return ranks % stride, ranks // stride
    raise ValueError(f"layout must be 'consecutive' or 'strided', got {layout!r}")


def simulate(group_idx: torch.Tensor, expert_idx: torch.Tensor, num_groups: int, num_experts: int,
             nodes: int, gpus_per_node: int, ep_size: int, tokens_per_gpu: int, d: int,
             elem: int = 2, layout: str = "consecutive", seed: int = 0) -> Dict[str, float]:
    """Replay recorded routing (rows of group_idx (N, g1) / expert_idx (N, g1, k), sampled with
    replacement, ``tokens_per_gpu`` per GPU) on ``nodes x gpus_per_node`` GPUs with expert-parallel
    groups of ``ep_size``; forward dispatch + return bytes, split intra-/inter-node."""
    world = nodes * gpus_per_node
    if world < 1 or world > 1024:
        raise ValueError(f"nodes x gpus_per_node must be in [1, 1024], got {world}")
    check_divides_world(ep_size, world, "the number of GPUs")
    check_placement(num_groups, ep_size)
    if num_experts % ep_size != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
    g1, k = group_idx.shape[1], expert_idx.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, group_idx.shape[0], (world, tokens_per_gpu), generator=gen)
    src = torch.arange(world).unsqueeze(1).expand(world, tokens_per_gpu)
    ep_id, _ = ep_group_of_rank(src, world, ep_size, layout)
    members = torch.arange(world)
    mem_group, mem_pos = ep_group_of_rank(members, world, ep_size, layout)
    global_of = torch.empty(world // ep_size, ep_size, dtype=torch.long)
    global_of[mem_group, mem_pos] = members                  # (ep group, position) -> global rank

    def tally(dest_pos: torch.Tensor, src_rank: torch.Tensor, ep_grp: torch.Tensor, row_bytes: int,
              back_bytes: int) -> Dict[str, float]:
        dest = global_of[ep_grp, dest_pos]
        remote = dest != src_rank
        inter = remote & (dest // gpus_per_node != src_rank // gpus_per_node)
        intra = remote & ~inter
        rows = row_bytes + back_bytes
        return {"intra": float(intra.sum()) * rows, "inter": float(inter.sum()) * rows}

    groups = group_idx[pick]                                  # (world, T, g1)
    experts = expert_idx[pick].reshape(world, tokens_per_gpu, g1 * k)
    ours = tally(groups // (num_groups // ep_size), src.unsqueeze(-1), ep_id.unsqueeze(-1),
                 (d + k) * elem + 4 * k, d * elem)
    flat = tally(experts // (num_experts // ep_size), src.unsqueeze(-1), ep_id.unsqueeze(-1), d * elem, d * elem)
    total_ours, total_flat = ours["intra"] + ours["inter"], flat["intra"] + flat["inter"]
    return {"gpus": world, "nodes": nodes, "gpus_per_node": gpus_per_node, "ep_size": ep_size,
            "tokens": world * tokens_per_gpu, "ours_intra_bytes": ours["intra"], "ours_inter_bytes": ours["inter"],
            "flat_intra_bytes": flat["intra"], "flat_inter_bytes": flat["inter"],
            "ratio_total": total_ours / total_flat if total_flat else float("nan"),
            "ratio_inter": ours["inter"] / flat["inter"] if flat["inter"] else float("nan")}


def synthetic_routing(num_tokens: int, num_groups: int, experts_per_group: int, g1: int, k: int,
                      seed: int = 0) -> tuple:
    """Uniformly random hierarchical routing (for profile-comm without a recorded run)."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.rand(num_tokens, num_groups, generator=gen).argsort(dim=1)[:, :g1]
    pos = torch.rand(num_tokens, g1, experts_per_group, generator=gen).argsort(dim=-1)[..., :k]
    return groups, groups.unsqueeze(-1) * experts_per_group + pos
