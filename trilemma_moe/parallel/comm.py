"""The communicator an expert-parallel ``ClusteredMoE`` is given (core never imports
torch.distributed): token all-to-all with variable splits (autograd-aware), reductions, row
fetches for regroup migration, the coordinator's gather/broadcast, byte counters, and a timeout
on every collective so a rank that stops answering gives a clear error instead of a hang.

Byte counters count what this rank SENDS to other ranks (its own chunk of an all-to-all never
leaves it), per stage:

* ``counts``: split sizes exchanged before each all-to-all of tokens (int64 per peer);
* ``tokens_out``: (token, group) pairs to the group's owner, hidden vector + k combine weights;
* ``routing_out``: the k local slot ids of each pair (int32);
* ``tokens_back``: expert outputs returned to the token's rank;
* ``*_grad``: the same exchanges in the backward pass;
* ``aux`` / ``stats``: payload of the l_aux and centroid-statistics all-reduces (payload size,
  not the algorithm's wire bytes);
* ``regroup_gather`` / ``regroup_migration`` / ``regroup_decision``: expert weights gathered to
  the coordinator, slot contents and optimizer moments moved to new owners, the broadcast.

``flat_tokens_out`` / ``flat_tokens_back`` are the bytes a flat top-k all-to-all
(DeepSpeed-MoE: one copy of the token per chosen expert, expert e on rank e // (E/ep_size))
would have sent for the same routing.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from datetime import timedelta
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist

from ..core.interfaces import SlotRows
from .topology import ExpertParallelTopology, check_same_config

FORWARD_STAGES = ("counts", "tokens_out", "routing_out", "tokens_back")


def comm_device(group, fallback: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL moves only CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


class ExpertParallelComm:
    """The layer's ``core.interfaces.ExpertParallelExchange`` over torch.distributed (gloo/NCCL),
    every collective bounded by ``comm_timeout_s`` and named by layer and stage when it fails.

    One per layer (its counters are the layer's); the process groups come from a shared
    ``ExpertParallelTopology``. ``config`` is the layer's TrilemmaMoEConfig: its hash is checked
    across all ranks here, at construction (a collective)."""

    def __init__(self, topology: ExpertParallelTopology, config, layer_index: int = 0,
                 check_config: bool = True, extra: Optional[dict] = None):
        # config.ep_size against this group's size: the layer checks it (where both meet)
        self.topo = topology
        self.size, self.rank = topology.ep_size, topology.ep_rank
        self.group = topology.ep_group
        self.layer_index = layer_index
        self.num_experts = config.num_experts
        self.timeout = timedelta(seconds=float(config.comm_timeout_s))
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        self.migrated_experts = 0
        if check_config:
            values = dict(config.to_dict(), layer_index=layer_index, **(extra or {}))
            check_same_config(values, topology.world_group, what=f"trilemma_moe config of layer {layer_index}",
                              device=comm_device(topology.world_group, torch.device("cpu")))

    # --- waiting with a deadline ------------------------------------------------------------
    def _wait(self, work, stage: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as exc:
            raise RuntimeError(
                f"trilemma_moe expert parallelism: rank {dist.get_rank()} (layer {self.layer_index}, stage "
                f"'{stage}') failed or got no answer within comm_timeout_s={self.timeout.total_seconds():g} s: "
                f"another rank stopped answering (crashed, hung, or is not running the same step); see its "
                f"log. Cause: {exc}") from exc

    def _count(self, stage: str, nbytes: int) -> None:
        self.bytes[stage] += int(nbytes)
        self.calls[stage] += 1

    # --- all-to-all ------------------------------------------------------------------------
    def exchange_counts(self, send_counts: List[int]) -> List[int]:
        dev = comm_device(self.group, torch.device("cpu"))
        send = torch.tensor(send_counts, dtype=torch.int64, device=dev)
        recv = torch.empty_like(send)
        self._wait(dist.all_to_all_single(recv, send, group=self.group, async_op=True), "counts")
        self._count("counts", 8 * (self.size - 1))
        return recv.tolist()

    def _a2a(self, x: torch.Tensor, send_counts: List[int], recv_counts: List[int], stage: str) -> torch.Tensor:
        dev = x.device
        work_x = x.contiguous().to(comm_device(self.group, dev))
        out = work_x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
        w = dist.all_to_all_single(out, work_x, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                                   group=self.group, async_op=True)
        self._wait(w, stage)
        row = math.prod(x.shape[1:]) * x.element_size()
        self._count(stage, row * (sum(send_counts) - send_counts[self.rank]))
        return out.to(dev)

    def all_to_all(self, x: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                   stage: str) -> torch.Tensor:
        """Rows ``x`` split by destination rank (``send_counts``); returns the rows received, by
        source rank. Differentiable: the backward sends gradients back the same way."""
        if x.requires_grad:
            return _AllToAll.apply(self, stage, send_counts, recv_counts, x)
        return self._a2a(x, send_counts, recv_counts, stage)

    def record_flat(self, expert_ids: torch.Tensor, row_bytes: int) -> None:
        """Bytes a flat top-k all-to-all would send for these (token, expert) rows of this rank."""
        owner = expert_ids // (self.num_experts // self.size)
        remote = int((owner != self.rank).sum())
        self.bytes["flat_tokens_out"] += remote * row_bytes
        self.bytes["flat_tokens_back"] += remote * row_bytes

    # --- reductions ------------------------------------------------------------------------
    def sum_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank of the layer (l_aux statistics: the loss of the whole global batch,
        as one process would compute it); the backward sums the gradients likewise."""
        return _AllReduceSum.apply(self, t)

    def _all_reduce(self, t: torch.Tensor, group, stage: str) -> torch.Tensor:
        work = t.detach().clone().to(comm_device(group, t.device))
        self._wait(dist.all_reduce(work, group=group, async_op=True), stage)
        self._count(stage, work.numel() * work.element_size())
        return work.to(t.device)

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank statistics over every rank of the layer (centroid sums and counts)."""
        return self._all_reduce(t, self.topo.world_group, "stats")

    # --- the ReplicaSync interface (regroup agreement) --------------------------------------------
    def average_(self, tensor: torch.Tensor) -> None:
        """Centroids are already identical everywhere (statistics are reduced every step)."""

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        work = tensor.clone().to(comm_device(self.topo.world_group, tensor.device))
        self._wait(dist.broadcast(work, src=self.topo.coordinator, group=self.topo.world_group, async_op=True),
                   "regroup_decision")
        if dist.get_rank() == self.topo.coordinator:
            self._count("regroup_decision", work.numel() * work.element_size() * (self.topo.world_size - 1))
        return work.to(tensor.device)

    def gather_rows(self, rows: Optional[torch.Tensor], limit: int, like: torch.Tensor) -> torch.Tensor:
        """Every rank's probe tokens (``probe_rows_block``), in rank order, on every rank."""
        out, sent = all_gather_probe_rows(rows, limit, like, self.topo.world_group,
                                          lambda work: self._wait(work, "regroup_probe"))
        self._count("regroup_probe", sent)
        return out

    # --- regroup: coordinator gather and migration -----------------------------------------
    def gather_to_coordinator(self, local: torch.Tensor) -> Optional[torch.Tensor]:
        """Concatenation over expert-parallel ranks (global slot order) on the coordinator; None
        elsewhere. Only the coordinator's expert-parallel group takes part."""
        if not self.topo.holds_coordinator:
            return None
        work = local.contiguous().to(comm_device(self.group, local.device))
        me = dist.get_rank()
        parts = [torch.empty_like(work) for _ in range(self.size)] if me == self.topo.coordinator else None
        self._wait(dist.gather(work, gather_list=parts, dst=self.topo.coordinator, group=self.group, async_op=True),
                   "regroup_gather")
        if me != self.topo.coordinator:
            self._count("regroup_gather", work.numel() * work.element_size())
            return None
        return torch.cat(parts).to(local.device)

    def take_rows(self, local: Union[torch.Tensor, SlotRows], rows: torch.Tensor) -> torch.Tensor:
        """``full[rows]`` where ``full`` is ``local`` concatenated over the expert-parallel ranks
        (each holds ``n`` rows: ``local.shape[0]``, or ``local.num_rows`` for a ``SlotRows``, which
        computes only the rows requested from this rank). A collective: every rank calls it in the
        same order."""
        if isinstance(local, SlotRows):
            n, serve = local.num_rows, local.rows
        else:
            n, serve = local.shape[0], (lambda index: local.detach().index_select(0, index.to(local.device)))
        rows = rows.to(torch.int64).cpu()
        owner = rows // n
        order = torch.argsort(owner, stable=True)
        want = torch.bincount(owner, minlength=self.size).tolist()
        asked = self.exchange_counts(want)
        requests = self._a2a((rows[order] - owner[order] * n), want, asked, "regroup_migration_requests")
        served = serve(requests)
        got = self._a2a(served, asked, want, "regroup_migration")
        out = torch.empty_like(got)
        out[order.to(got.device)] = got
        return out

    def note_migration(self, moved_here: int) -> None:
        self.migrated_experts += int(moved_here)

    # --- reporting --------------------------------------------------------------------------
    def comm_stats(self) -> Dict[str, float]:
        """Bytes this rank sent to other ranks, per stage, since construction (or ``reset_stats``)."""
        s: Dict[str, float] = {f"bytes_{k}": int(v) for k, v in sorted(self.bytes.items())}
        ours = sum(self.bytes.get(k, 0) for k in FORWARD_STAGES)
        flat = self.bytes.get("flat_tokens_out", 0) + self.bytes.get("flat_tokens_back", 0)
        s.update(ep_size=self.size, ep_rank=self.rank, layer=self.layer_index,
                 bytes_dispatch_total=ours, bytes_flat_topk_total=flat,
                 ratio_to_flat_topk=(ours / flat) if flat else float("nan"),
                 stage1_ratio_to_flat_topk=(self.bytes.get("tokens_out", 0) + self.bytes.get("routing_out", 0))
                 / self.bytes["flat_tokens_out"] if self.bytes.get("flat_tokens_out") else float("nan"),
                 migrated_experts=self.migrated_experts)
        return s

    def reset_stats(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.migrated_experts = 0


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, stage, send_counts, recv_counts, x):
        ctx.comm, ctx.stage, ctx.send_counts, ctx.recv_counts = comm, stage, send_counts, recv_counts
        return comm._a2a(x, send_counts, recv_counts, stage)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.comm._a2a(grad.contiguous(), ctx.recv_counts, ctx.send_counts, ctx.stage + "_grad")
        return None, None, None, None, g


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, t):
        ctx.comm = comm
        return comm._all_reduce(t, comm.topo.world_group, "aux")

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.comm._all_reduce(grad, ctx.comm.topo.world_group, "aux_grad")


def all_gather_probe_rows(rows: Optional[torch.Tensor], limit: int, like: torch.Tensor, group,
                          wait=lambda work: work.wait()):
    """Every rank's probe tokens of ``group`` (``probe_rows_block``), in rank order, on every rank;
    and the bytes this rank sent."""
    world = dist.get_world_size(group)
    block = probe_rows_block(rows, limit, world, like).to(comm_device(group, like.device))
    parts = [torch.empty_like(block) for _ in range(world)]
    wait(dist.all_gather(parts, block, group=group, async_op=True))
    return probe_rows_from_blocks(parts, like.device), block.numel() * block.element_size()


def probe_rows_block(rows: Optional[torch.Tensor], limit: int, world: int, like: torch.Tensor) -> torch.Tensor:
    """This rank's share of a probe batch of about ``limit`` tokens over ``world`` ranks: at most
    ceil(limit / world) of its rows (spread over them), in a block of that many rows plus one
    holding the count, in ``like``'s dtype. Every rank sends the same shape, whatever its data."""
    share = -(-int(limit) // world)
    block = torch.zeros(share + 1, like.shape[-1], dtype=like.dtype, device=like.device)
    n = 0 if rows is None else min(share, rows.shape[0])
    if n:
        pick = torch.linspace(0, rows.shape[0] - 1, n, device=rows.device).long()
        block[:n] = rows.index_select(0, pick).to(block)
    block[share, 0] = n
    return block


def probe_rows_from_blocks(parts: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The valid rows of the gathered blocks, in rank order."""
    return torch.cat([b[:int(b[-1, 0])] for b in parts]).to(device)


def set_collective_timeout(seconds: float) -> None:
    """Every process group of this rank (the default one and those made since, DeepSpeed's
    data-parallel clone of the world included) waits at most ``seconds`` per collective. Groups
    made by ``new_group`` get torch's 30-minute default whatever the default group has, so a
    gradient all-reduce whose peer lost its link would otherwise hang for half an hour."""
    from torch.distributed import distributed_c10d as c10d
    timeout = timedelta(seconds=float(seconds))
    for pg in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(pg):
            c10d._set_pg_timeout(timeout, pg)


COMM_FAILURE_MARKERS = ("timed out", "Timed out", "Connection closed", "Connection reset", "Broken pipe",
                        "Connection refused", "gloo")


@contextlib.contextmanager
def named_comm_failure(stage: str, timeout_s: float):
    """A collective of a stage outside our layers (DeepSpeed's gradient reduction, the loss
    all-reduce, a checkpoint's barriers) that fails or times out raises one error naming the
    stage, as the layers' own collectives do; errors of the layers pass unchanged."""
    try:
        yield
    except RuntimeError as exc:
        msg = str(exc)
        if msg.startswith("trilemma_moe") or not any(m in msg for m in COMM_FAILURE_MARKERS):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise RuntimeError(
            f"trilemma_moe: rank {rank} (stage '{stage}') failed or got no answer within comm_timeout_s="
            f"{timeout_s:g} s: another rank stopped answering (crashed, hung, lost its link, or is not "
            f"running the same step); see its log. Cause: {msg.splitlines()[0] if msg else exc!r}") from exc


def average_gradients(module: torch.nn.Module, topology: ExpertParallelTopology) -> None:
    """Gradient reduction without DeepSpeed, with DeepSpeed's convention: every gradient is a
    sum over its replicas divided by the world size. Replicated parameters (router, the rest of
    the model) sum over the world; expert slots over their expert-data-parallel replicas (the
    all-to-all backward already summed the expert-parallel ranks' contributions).

    Which tensors are reduced depends on the phase, never on the data: every trainable
    parameter except those a clustered layer declares idle in this phase (``idle_parameters``)
    takes part on every rank, in module order; one without a gradient here contributes zeros
    (as DeepSpeed's engine does), so the ranks' collectives always match."""
    from ..core.layer import ClusteredMoE
    layers = [m for m in module.modules() if isinstance(m, ClusteredMoE)]
    expert_ids = {id(p) for m in layers for p in m.experts.parameters()}
    idle = {id(p) for m in layers for p in m.idle_parameters()}
    world = topology.world_size
    for p in module.parameters():
        if not p.requires_grad or id(p) in idle:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if id(p) in expert_ids:
            if topology.edp_group is not None:
                dist.all_reduce(p.grad, group=topology.edp_group)
        else:
            dist.all_reduce(p.grad, group=topology.world_group)
        p.grad.div_(world)
