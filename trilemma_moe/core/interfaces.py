"""The collaborators a clustered layer is given, as declared interfaces.

Core never imports torch.distributed, DeepSpeed or an I/O library: the integrations hand the
layer objects with these shapes (``typing.Protocol``: any class with the members fits, no
inheritance needed). One-process defaults live next to them.

==================================  ===========================================  ===================================
interface                           what it does                                 implementations
==================================  ===========================================  ===================================
:class:`ReplicaSync`                replicas of a layer agree before a regroup   :class:`LocalSync`,
                                                                                 ``integrations.DataParallelSync``,
                                                                                 ``parallel.ExpertParallelComm``
:class:`ExpertParallelExchange`     token all-to-all, reductions, the regroup    ``parallel.ExpertParallelComm``
                                    coordinator's gathers and row fetches
:class:`ParamIO`                    regroup writes with their optimizer state    ``state_io.TorchParamIO``,
                                                                                 ``integrations.DeepSpeedParamIO``,
                                                                                 ``integrations.MegatronParamIO``
:class:`OffloadTier`                where idle groups' stored form goes          ``offload.CPUTier``,
                                                                                 ``integrations.aio.AioTier``
:class:`SlotView`                   the compressed experts the fused path reads  ``experts.ExpertSlots``,
                                                                                 ``offload.StoredSlots``
==================================  ===========================================  ===================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from .state_io import StateRule



@dataclass(frozen=True)
class SlotRows:
    """A slot-stacked tensor of ``num_rows`` rows that is never built whole: ``rows(index)``
    computes only the rows asked for (local indices), e.g. the effective weights of the experts a
    regroup moves (``ExpertSlots.slot_weights``), so serving them costs what moves, not all E."""
    num_rows: int
    rows: Callable[[torch.Tensor], torch.Tensor]


RowFetch = Callable[[Union[torch.Tensor, SlotRows], torch.Tensor], torch.Tensor]


@runtime_checkable
class ReplicaSync(Protocol):
    """Keeps the replicas of a layer (data-parallel ranks holding the same experts) in step."""

    def average_(self, tensor: torch.Tensor) -> None:
        """Average ``tensor`` over the replicas, in place."""

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first replica's ``tensor`` (its decision becomes everyone's)."""

    def gather_rows(self, rows: Optional[torch.Tensor], limit: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The probe batch of every rank holding other tokens, about ``limit`` rows in rank order
        (``like``: dtype, device and width), so a decision sees the global batch however it is split."""


class LocalSync:
    """One process: nothing to agree on."""

    def average_(self, tensor: torch.Tensor) -> None:
        pass

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_rows(self, rows: Optional[torch.Tensor], limit: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        return rows


@runtime_checkable
class ExpertParallelExchange(ReplicaSync, Protocol):
    """The expert-parallel group of a layer: this rank holds groups ``[rank * G/size, ...)``.
    Every method is collective over the group (all ranks call it, in the same order)."""

    size: int
    rank: int

    def exchange_counts(self, send_counts: List[int]) -> List[int]:
        """Rows this rank sends to each rank -> rows it receives from each."""

    def all_to_all(self, x: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                   stage: str) -> torch.Tensor:
        """Differentiable variable-size all-to-all of rows (``stage`` names it in errors/counters)."""

    def record_flat(self, expert_ids: torch.Tensor, row_bytes: int) -> None:
        """Count what a flat top-k dispatch of the same routing would have sent (profiling)."""

    def sum_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over the group."""

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of routing statistics over the group (no gradient)."""

    def gather_to_coordinator(self, local: torch.Tensor) -> Optional[torch.Tensor]:
        """Every rank's rows concatenated in rank order on the coordinator (rank 0); None elsewhere."""

    def take_rows(self, local: Union[torch.Tensor, SlotRows], rows: torch.Tensor) -> torch.Tensor:
        """Rows of a slot-stacked tensor by global index, fetched from whichever rank holds them;
        a :class:`SlotRows` ``local`` is asked only for the rows some rank requests from it."""

    def note_migration(self, moved_here: int) -> None:
        """Experts that arrived on this rank in a regroup (counters)."""

    def comm_stats(self) -> Dict[str, float]:
        """Byte and time counters per stage."""


@runtime_checkable
class ParamIO(Protocol):
    """How a regroup reads and rewrites parameters together with their optimizer state
    (``state_io`` explains the rules)."""

    def read(self, p: torch.Tensor) -> torch.Tensor:
        """The full value of ``p`` (under ZeRO: from the fp32 master partitions)."""

    def write(self, p: torch.Tensor, value: torch.Tensor, rule: Optional[StateRule]) -> None:
        """Set ``p``; ``rule(key, old_state) -> new_state`` rewrites each optimizer moment."""

    def release(self, p: torch.Tensor) -> None:
        """``p`` is no longer used (the burn-in experts after the first clustering)."""

    def permute_rows(self, p: torch.Tensor, new_to_old: torch.Tensor, take: Optional[RowFetch] = None) -> None:
        """Rows (and their moments) move with their expert."""

    def write_fresh(self, p: torch.Tensor, value: torch.Tensor, new_to_old: Optional[torch.Tensor],
                    keep_rows: Optional[torch.Tensor] = None, take: Optional[RowFetch] = None) -> None:
        """Fresh factors: moments reset (second moments to the expert's old mean) except kept rows."""


@runtime_checkable
class OffloadTier(Protocol):
    """Storage for packed groups (``offload.pack_group`` buffers), asynchronous where it can be."""

    name: str

    def where(self, key) -> str:
        """A human-readable location of ``key`` (for error messages)."""

    def write(self, key, buf: torch.Tensor) -> None:
        """Start writing ``buf``; OSError if it cannot start."""

    def read(self, key, nbytes: int) -> None:
        """Start reading ``key`` back."""

    def wait(self) -> Tuple[Dict, List]:
        """Finish pending I/O: ({key: buffer read}, [(key, exception) of failed writes])."""

    def remove(self, key) -> None:
        """Forget ``key`` (delete its file)."""


@runtime_checkable
class SlotView(Protocol):
    """The compressed experts of the groups held here, stacked: what the fused path reads."""

    spec: Any               # experts.ExpertSpec: activation, gated, matrices
    G: int                  # groups
    K: int                  # experts per group
    rank: int               # residual rank r
    residual_bits: int      # 4: the forward sees INT4 factors
    base: Mapping[str, torch.Tensor]   # name -> (G, d_in, d_out)
    fa: Mapping[str, torch.Tensor]     # name -> (G*K, d_in, r)
    fb: Mapping[str, torch.Tensor]     # name -> (G*K, d_out, r)
    bias: Mapping[str, torch.Tensor]   # name -> (G*K, n)
