"""Idle-group offload of the stored expert form (paper 3.4); the prefetch predictor is
``prefetch.PrefetchPolicy``.

What is offloaded: the layer's *stored form* per group -- the base of every matrix, the K slots'
residual factors (INT4 packed + scales + zero points when ``residual_bits=4``, else as the
parameters hold them) and biases -- the form an evaluation / inference forward reads through
:class:`GroupStore`. The training masters (stacked parameters owned by the optimizer and ZeRO's
flat buffers) are never offloaded: a stacked tensor cannot release one group's rows, and so ZeRO
gradient reduction always sees every parameter (zeros for groups without tokens) and the
optimizer state stays where DeepSpeed keeps it. The store is rebuilt from the masters whenever
the layer has trained since it was built, so it is never stale.

Per step (one forward): the groups that receive tokens are *needed* (``accesses``). Pending
prefetches are completed (time spent blocked is stall time); a needed group that is resident is a
hit (``prefetch_hits``: resident because a prefetch brought it back), one that is absent is read
synchronously and counts as a miss; ``hit_rate = hits / accesses``.
Then the predictor observes the step; resident groups idle for ``offload_idle_steps`` steps that
it finds unlikely to be used within the next L steps are written out, and offloaded groups it
finds likely are read back asynchronously.

Every file carries a header (magic, layer/group id, payload bytes, CRC32 of the payload): a
missing, truncated or corrupt file raises an error naming the group and the path. A write that
fails (full disk, I/O error) keeps the group in CPU memory with a warning; results never change.

Tiers are pluggable (``write / read / wait``); :class:`CPUTier` (pinned when CUDA is present)
lives here, the NVMe tier over DeepSpeed's async I/O in ``trilemma_moe/integrations/aio.py``.
Pure torch: no deepspeed or torch.distributed import.
"""
from __future__ import annotations

import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import quant
from .prefetch import PREFETCH_THRESHOLD, PrefetchPolicy, router_evidence
HEADER_BYTES = 64
_MAGIC = b"TMOEGRP1"
_HEADER = struct.Struct("<8sqqqQ")   # magic, layer, group, payload bytes, crc32


class OffloadIntegrityError(RuntimeError):
    pass


# --- serialisation ------------------------------------------------------------------------
def pack_group(tensors: Dict[str, torch.Tensor], layer: int, group: int, align: int = 4096):
    """One uint8 buffer: header, every tensor's bytes (sorted by name), zero padding to ``align``.
    Returns ``(buffer, meta)`` with meta = [(name, dtype, shape, offset, nbytes)]."""
    meta, parts, offset = [], [], HEADER_BYTES
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8)
        meta.append((name, t.dtype, tuple(t.shape), offset, raw.numel()))
        parts.append(raw)
        offset += raw.numel()
    payload_bytes = offset - HEADER_BYTES
    total = -(-offset // align) * align
    buf = torch.zeros(total, dtype=torch.uint8)
    if parts:
        buf[HEADER_BYTES:offset] = torch.cat(parts)
    crc = zlib.crc32(buf[HEADER_BYTES:offset].numpy())
    buf[:_HEADER.size] = torch.frombuffer(bytearray(_HEADER.pack(_MAGIC, layer, group, payload_bytes, crc)),
                                          dtype=torch.uint8)
    return buf, meta


def unpack_group(buf: torch.Tensor, meta, layer: int, group: int, where: str) -> Dict[str, torch.Tensor]:
    """Check the header and checksum, then the tensors (copies, not views of ``buf``)."""
    magic, lay, grp, n, crc = _HEADER.unpack(bytes(buf[:_HEADER.size].tolist()))
    expected = sum(m[4] for m in meta)
    if magic != _MAGIC or lay != layer or grp != group or n != expected:
        raise OffloadIntegrityError(f"offloaded group {group} of layer {layer}: bad header in {where} "
                                    f"(magic {magic!r}, layer {lay}, group {grp}, {n} bytes; expected {expected})")
    if zlib.crc32(buf[HEADER_BYTES:HEADER_BYTES + n].numpy()) != crc:
        raise OffloadIntegrityError(f"offloaded group {group} of layer {layer}: checksum mismatch in {where}")
    out = {}
    for name, dtype, shape, offset, nbytes in meta:
        out[name] = buf[offset:offset + nbytes].clone().view(dtype).reshape(shape)
    return out


# --- tiers ------------------------------------------------------------------------------------
class CPUTier:
    """Offload to host memory (pinned when CUDA is present): the fallback when aio is unavailable."""

    name = "cpu"

    def __init__(self):
        self._held: Dict[Tuple[int, int], torch.Tensor] = {}
        self._done: Dict[Tuple[int, int], torch.Tensor] = {}

    def where(self, key) -> str:
        return f"CPU memory (layer {key[0]}, group {key[1]})"

    def write(self, key, buf: torch.Tensor) -> None:
        pin = torch.cuda.is_available()
        self._held[key] = buf.pin_memory() if pin else buf

    def read(self, key, nbytes: int) -> None:
        if key not in self._held:
            raise FileNotFoundError(f"offloaded group {key[1]} of layer {key[0]}: nothing held in {self.where(key)}")
        self._done[key] = self._held[key]

    def wait(self) -> Tuple[Dict, List]:
        done, self._done = self._done, {}
        return done, []

    def remove(self, key) -> None:
        self._held.pop(key, None)

    def held_bytes(self) -> int:
        return sum(b.numel() for b in self._held.values())


# --- the store --------------------------------------------------------------------------------
@dataclass
class StoredSlots:
    """The stored form of every group, stacked like ``ExpertSlots`` (an ``interfaces.SlotView``)."""
    G: int
    K: int
    rank: int
    spec: Any
    residual_bits: int
    base: Dict[str, torch.Tensor]
    fa: Dict[str, torch.Tensor]
    fb: Dict[str, torch.Tensor]
    bias: Dict[str, torch.Tensor]


def _group_rows(t: torch.Tensor, g: int, K: int, per_slot: bool) -> torch.Tensor:
    """Group g's part of a tensor stacked over slots (its K rows) or, for bases, over groups."""
    return t[g * K:(g + 1) * K] if per_slot else t[g]


class GroupStore:
    """Stored form of a layer's compressed experts, group by group, resident or offloaded."""

    def __init__(self, experts, residual_bits: int, tier, layer_index: int = 0,
                 idle_steps: Optional[int] = None, lookahead: int = 2, ema_rate: float = 0.3,
                 router_evidence: bool = True, threshold: float = PREFETCH_THRESHOLD):
        self.experts, self.bits, self.tier, self.layer = experts, residual_bits, tier, layer_index
        self.idle_steps, self.router_evidence = idle_steps, router_evidence
        G = experts.G
        self.policy = PrefetchPolicy(G, lookahead, ema_rate, threshold)
        self.resident: Dict[int, Dict[str, torch.Tensor]] = {}
        self.meta: Dict[int, list] = {}
        self.offloaded: Dict[int, int] = {}      # group -> buffer bytes (on the tier)
        self.inflight: Dict[int, str] = {}       # group -> "read" | "write"
        self._write_bufs: Dict[int, torch.Tensor] = {}
        self._prefetched = set()
        self.stats = {"hits": 0, "misses": 0, "prefetch_hits": 0, "offloads": 0, "prefetches": 0,
                      "bytes_written": 0, "bytes_read": 0, "stall_s": 0.0, "steps": 0, "accesses": 0,
                      "peak_resident_bytes": 0, "resident_byte_steps": 0, "write_failures": 0}
        self.build()

    # the stored form from the (master) parameters: of group g, or (g None) of all groups stacked;
    # quantizing a stacked factor gives each group exactly its own codes (scales are per (slot,
    # rank column))
    @torch.no_grad()
    def _group_tensors(self, g: Optional[int] = None) -> Dict[str, torch.Tensor]:
        ex, K = self.experts, self.experts.K

        def rows(p, per_slot=True):
            return p.detach() if g is None else _group_rows(p.detach(), g, K, per_slot)
        out = {f"base.{n}": rows(p, per_slot=False).clone() for n, p in ex.base.items()}
        for kind, pd in (("fa", ex.fa), ("fb", ex.fb)):
            for n, p in pd.items():
                if self.bits == 4:
                    out.update({f"{kind}.{n}.{part}": t for part, t in quant.quantize(rows(p)).items()})
                else:
                    out[f"{kind}.{n}"] = rows(p).clone()
        out.update({f"bias.{n}": rows(p).clone() for n, p in ex.bias.items()})
        return out

    def _factor(self, tensors: Dict[str, torch.Tensor], kind: str, n: str, decode=quant.dequantize):
        """A factor's values from stored tensors (one group's, or the stacked form): as held, or
        decoded by ``decode`` (``quant.dequantize``'s signature) from its INT4 codes."""
        if self.bits != 4:
            return tensors[f"{kind}.{n}"]
        rows, dtype = self._factor_info[(kind, n)]
        return decode({k: tensors[f"{kind}.{n}.{k}"] for k in ("packed", "scale", "zero")}, rows, dtype)

    def build(self) -> None:
        """(Re)build every group from the masters, all resident; previous offloaded copies dropped."""
        self._drain(count_stall=False)
        for g in list(self.offloaded):
            self.tier.remove((self.layer, g))
        self.offloaded.clear()
        self._prefetched.clear()
        # rows and dtype of every factor, kept for decoding (the masters may be released later)
        self._factor_info = {(kind, n): (p.shape[1], p.dtype) for kind, pd in (("fa", self.experts.fa),
                                                                             ("fb", self.experts.fb))
                             for n, p in pd.items()}
        if self.idle_steps is None:
            # nothing is ever offloaded: hold the stored form stacked over groups (the layout of
            # the parameters, which the fused GPU path reads), each group's tensors views into it
            self._stacked = self._group_tensors()
            K = self.experts.K
            self.resident = {g: {k: _group_rows(t, g, K, per_slot=not k.startswith("base."))
                                 for k, t in self._stacked.items()} for g in range(self.experts.G)}
        else:
            self._stacked = None
            self.resident = {g: self._group_tensors(g) for g in range(self.experts.G)}
        self._note_peak()

    def stacked_slots(self, decode=quant.dequantize):
        """All groups' stored form stacked over groups, shaped like ``ExpertSlots`` (``G, K, rank,
        spec, base, fa, fb, bias``) for the fused path; the INT4 factors decoded now by ``decode``
        (``quant.dequantize``'s signature; small: the packed codes stay what is held). None when
        groups can be offloaded (``idle_steps`` set)."""
        if self._stacked is None:
            return None
        ex, st = self.experts, self._stacked
        return StoredSlots(G=ex.G, K=ex.K, rank=ex.rank, spec=ex.spec, residual_bits=16,
                           base={n: st[f"base.{n}"] for n in ex.base},
                           fa={n: self._factor(st, "fa", n, decode) for n in ex.fa},
                           fb={n: self._factor(st, "fb", n, decode) for n in ex.fb},
                           bias={n: st[f"bias.{n}"] for n in ex.bias})

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.resident.values() for t in d.values())

    def resident_breakdown(self) -> Dict[str, int]:
        """Bytes of the resident groups by component (names as in ``memory_report``)."""
        out = {"bases": 0, "residual_packed": 0, "residual_scales": 0, "residual_stored": 0, "biases": 0}
        for tensors in self.resident.values():
            for name, t in tensors.items():
                n = t.numel() * t.element_size()
                kind = name.split(".")[0]
                if kind == "base":
                    out["bases"] += n
                elif kind == "bias":
                    out["biases"] += n
                else:
                    out["residual_stored"] += n
                    if name.endswith(".packed"):
                        out["residual_packed"] += n
                    elif name.endswith((".scale", ".zero")):
                        out["residual_scales"] += n
        return out

    def offloaded_bytes(self) -> int:
        return sum(self.offloaded.values())

    def _note_peak(self) -> None:
        # Every group starts resident (the store is built from the masters): the peak counts from
        # the first step at which an idle group could have left.
        now = self.resident_bytes()
        self._peak_all = max(getattr(self, "_peak_all", 0), now)
        if self.idle_steps is None or self.stats["steps"] > self.idle_steps:
            self.stats["peak_resident_bytes"] = max(self.stats["peak_resident_bytes"], now)

    # --- I/O ----------------------------------------------------------------------------------
    def _evict(self, g: int) -> None:
        buf, meta = pack_group(self.resident[g], self.layer, g)
        self.meta[g] = meta
        try:
            self.tier.write((self.layer, g), buf)
        except OSError as exc:
            self._write_failed(g, exc)
            return
        self._write_bufs[g] = buf       # kept until the write completes (and as fallback)
        self.inflight[g] = "write"
        self.offloaded[g] = buf.numel()
        del self.resident[g]
        self.stats["offloads"] += 1
        self.stats["bytes_written"] += buf.numel()

    def _write_failed(self, g: int, exc: Exception) -> None:
        self.stats["write_failures"] += 1
        warnings.warn(f"offload of group {g} of layer {self.layer} to {self.tier.where((self.layer, g))} "
                      f"failed ({exc}); keeping it in CPU memory")

    def _request(self, g: int) -> None:
        self.tier.read((self.layer, g), self.offloaded[g])
        self.inflight[g] = "read"

    def _drain(self, count_stall: bool = True) -> None:
        if not self.inflight:
            return
        t0 = time.perf_counter()
        done, failed = self.tier.wait()
        for key, exc in failed:            # writes that did not reach the disk: keep the CPU copy
            g = key[1]
            buf = self._write_bufs.pop(g)
            dev = next(iter(self.experts.base.values())).device
            self.resident[g] = {k: t.to(dev) for k, t in unpack_group(buf, self.meta[g], self.layer, g, "memory").items()}
            self.offloaded.pop(g, None)
            self.inflight.pop(g, None)
            self.tier.remove(key)
            self._write_failed(g, exc)
        errors = []
        for key, buf in done.items():
            g = key[1]
            dev = next(iter(self.experts.base.values())).device
            try:
                tensors = unpack_group(buf, self.meta[g], self.layer, g, self.tier.where(key))
            except OffloadIntegrityError as exc:
                errors.append(exc)     # the file stays where it is, the group stays offloaded
                continue
            self.resident[g] = {k: t.to(dev) for k, t in tensors.items()}
            self.stats["bytes_read"] += buf.numel()
            self.offloaded.pop(g)
            self.tier.remove(key)
        for g, kind in list(self.inflight.items()):
            if kind == "write" and g not in self.resident:
                self._write_bufs.pop(g, None)
            self.inflight.pop(g)
        if count_stall:
            self.stats["stall_s"] += time.perf_counter() - t0
        self._note_peak()
        if errors:
            raise errors[0]

    # --- one forward ------------------------------------------------------------------------
    def step(self, group_counts: List[int], group_probs: Optional[torch.Tensor] = None):
        """Make the needed groups resident, update the predictor, evict and prefetch; return the
        forward's weight views (see ``ExpertSlots.param_views``). ``group_probs`` (tokens, G): the
        router's group probabilities, the predictor's soft evidence (``prefetch.router_evidence``)."""
        G = self.experts.G
        needed = [g for g in range(G) if group_counts[g] > 0]
        soft = router_evidence(group_probs if self.router_evidence else None, G)
        self._drain()
        for g in needed:
            self.stats["accesses"] += 1
            if g in self.resident:
                self.stats["hits"] += 1
                if g in self._prefetched:
                    self.stats["prefetch_hits"] += 1
            else:
                self.stats["misses"] += 1
                t0 = time.perf_counter()
                self._request(g)
                self._drain(count_stall=False)
                self.stats["stall_s"] += time.perf_counter() - t0
            self._prefetched.discard(g)
        self._note_peak()
        self.stats["resident_byte_steps"] += self.resident_bytes()
        views = self.views(needed)
        policy = self.policy
        policy.observe(group_counts, soft)
        self.stats["steps"] += 1
        if self.idle_steps is not None:
            for g in range(G):
                likely = policy.likely(g)
                if g in self.resident and not likely and policy.idle[g] >= self.idle_steps:
                    self._evict(g)
                elif policy.lookahead > 0 and g in self.offloaded and likely and g not in self.inflight:
                    self._request(g)
                    self._prefetched.add(g)
                    self.stats["prefetches"] += 1
        return views

    def views(self, groups: List[int]):
        """``(base, fa, fb, bias)`` like ``ExpertSlots.param_views``, filled for ``groups`` only."""
        ex, K, G = self.experts, self.experts.K, self.experts.G
        base = {n: [None] * G for n in ex.base}
        fa = {n: [None] * (G * K) for n in ex.fa}
        fb = {n: [None] * (G * K) for n in ex.fb}
        bias = {n: [None] * (G * K) for n in ex.bias}
        for g in groups:
            t = self.resident[g]
            for n in base:
                base[n][g] = t[f"base.{n}"]
            for kind, dst in (("fa", fa), ("fb", fb)):
                for n in dst:
                    vals = self._factor(t, kind, n)
                    for j in range(K):
                        dst[n][g * K + j] = vals[j]
            for n in bias:
                for j in range(K):
                    bias[n][g * K + j] = t[f"bias.{n}"][j]
        return base, fa, fb, bias

    def summary(self) -> Dict[str, float]:
        s = dict(self.stats)
        s["hit_rate"] = s["hits"] / s["accesses"] if s["accesses"] else float("nan")
        s["mean_resident_bytes"] = s["resident_byte_steps"] / max(1, s["steps"])
        if not s["peak_resident_bytes"]:   # still within the first idle_steps steps: nothing could leave
            s["peak_resident_bytes"] = getattr(self, "_peak_all", 0)
        s["stall_s_per_step"] = s["stall_s"] / max(1, s["steps"])
        s["resident_bytes"] = self.resident_bytes()
        s["offloaded_bytes"] = self.offloaded_bytes()
        s["resident_groups"] = len(self.resident)
        s["tier"] = self.tier.name
        return s
