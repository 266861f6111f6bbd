"""Expert-parallel process groups (made once) and group-to-rank placement.

Placement: with ``ep_size`` ranks in an expert-parallel group, rank p owns the global groups
``[p * G/ep_size, (p+1) * G/ep_size)``, every expert of a group included, so the second routing
stage never leaves the group's rank. G must be divisible by ep_size (``placement`` raises one
ValueError naming both otherwise); G < ep_size is the special case where that fails.

Ranks are laid out as DeepSpeed lays them out (``deepspeed.utils.groups``): expert-parallel
groups are blocks of consecutive ranks ``[i*ep, (i+1)*ep)``; expert-data-parallel groups (the
replicas of the same experts when the world is larger than ep_size) are strided.
"""
from __future__ import annotations

import hashlib
import json
from typing import List, Optional

import torch
import torch.distributed as dist

from ..config import check_placement  # noqa: F401  (one check: the config runs it too; re-exported)


def check_divides_world(ep_size: int, world: int, what: str = "the world size") -> None:
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"ep_size ({ep_size}) must divide {what} ({world})")


def owned_groups(num_groups: int, ep_size: int, ep_rank: int) -> range:
    """Global groups held by expert-parallel rank ``ep_rank``."""
    check_placement(num_groups, ep_size)
    per = num_groups // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


def owner_of_group(group: torch.Tensor, num_groups: int, ep_size: int) -> torch.Tensor:
    """Expert-parallel rank holding each global group id."""
    check_placement(num_groups, ep_size)
    return group // (num_groups // ep_size)


class ExpertParallelTopology:
    """The process groups one expert-parallel layer talks over.

    - ``ep_group``: ranks that split the layer's groups between them (the all-to-all runs here);
    - ``world_group``: every rank training the layer (router gradients, centroid statistics and
      the coordinator's broadcast); None = the default group;
    - ``edp_group``: replicas of this rank's experts (None when the world is one expert-parallel group).
    """

    def __init__(self, ep_group, world_group=None, edp_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("expert parallelism needs torch.distributed initialised first "
                               "(deepspeed.init_distributed() or torch.distributed.init_process_group())")
        self.ep_group, self.world_group, self.edp_group = ep_group, world_group, edp_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.ep_ranks: List[int] = dist.get_process_group_ranks(ep_group)
        self.world_size = dist.get_world_size(world_group)
        world_ranks = dist.get_process_group_ranks(world_group) if world_group is not None else \
            list(range(self.world_size))
        self.coordinator = world_ranks[0]            # global rank that clusters and broadcasts
        self.holds_coordinator = self.coordinator in self.ep_ranks

    @classmethod
    def create(cls, ep_size: int) -> "ExpertParallelTopology":
        """Groups laid out as DeepSpeed does, with plain torch.distributed. Every rank must call
        this (``new_group`` is collective); call once and share the result between layers."""
        world = dist.get_world_size()
        check_divides_world(ep_size, world)
        me = dist.get_rank()
        ep_group = edp_group = None
        for i in range(world // ep_size):
            ranks = list(range(i * ep_size, (i + 1) * ep_size))
            g = dist.new_group(ranks)
            if me in ranks:
                ep_group = g
        for j in range(ep_size):
            ranks = list(range(j, world, ep_size))
            g = dist.new_group(ranks)
            if me in ranks:
                edp_group = g
        return cls(ep_group, None, edp_group if world > ep_size else None)

    @classmethod
    def from_deepspeed(cls, ep_size: int, use_data_before_expert_parallel_: bool = False) -> "ExpertParallelTopology":
        """DeepSpeed's expert groups (``deepspeed.utils.groups``), created there once if needed, so
        the engine reduces our expert gradients over the same expert-data-parallel group."""
        from deepspeed.utils import groups
        if not dist.is_initialized():
            raise RuntimeError("ep_size > 1 needs torch.distributed initialised before the layer is built: "
                               "call deepspeed.init_distributed() first (the launcher sets RANK/WORLD_SIZE)")
        check_divides_world(ep_size, dist.get_world_size())
        name = f"ep_size_{ep_size}"
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        edp = groups._get_expert_data_parallel_group(name)
        return cls(groups._get_expert_parallel_group(name), groups._get_data_parallel_group(),
                   edp if dist.get_world_size(edp) > 1 else None)


def config_fingerprint(values: dict) -> int:
    """A 63-bit hash of a JSON-able dict (the layer config), the same on every machine."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & ((1 << 63) - 1)


def check_same_config(values: dict, group=None, what: str = "trilemma_moe config",
                      device: Optional[torch.device] = None) -> None:
    """All ranks of ``group`` must hold the same ``values``: hashes are gathered and compared;
    on a mismatch every rank raises a ValueError naming the ranks that differ from rank 0."""
    mine = config_fingerprint(values)
    size = dist.get_world_size(group)
    t = torch.tensor([mine], dtype=torch.int64, device=device)
    got = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(got, t, group=group)
    hashes = [int(h) for h in got]
    if len(set(hashes)) > 1:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
        differ = [r for r, h in zip(ranks, hashes) if h != hashes[0]]
        raise ValueError(f"{what} differs between ranks: ranks {differ} disagree with rank {ranks[0]} "
                         f"(every rank must build the layer with the same knobs; this rank has "
                         f"{json.dumps(values, sort_keys=True, default=str)})")


def leave_process_group() -> None:
    """End of a multi-process run: leave together. Tearing gloo down at interpreter exit while a
    peer is still finishing its last collective can abort a rank ("terminate called without an
    active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
