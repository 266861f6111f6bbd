"""On-disk form of a clustered layer: per-slot keys in DeepSpeed-MoE's naming, atomic writes.

DeepSpeed's ``engine.save_checkpoint`` sends every state-dict key of an MoE module that contains
``"expert"`` to a per-expert file ``layer_{L}_expert_{global id}_mp_rank_XX_model_states.pt``
and expects ``.deepspeed_moe.experts.deepspeed_experts.<local id>.`` in the key (it rewrites
local to global ids: ``global = ep_rank * num_local_experts + local``); its loader does the
reverse for the ids a rank owns. Our experts live in stacked slot tensors, so the shell
presents them per slot:

* ``moe.experts.<kind>.<name>`` (stacked over the local slots) becomes
  ``deepspeed_moe.experts.deepspeed_experts.<local slot>.<kind>.<name>``, one row each;
* a group's base (stacked over local groups) is attached to the group's first slot
  (``<g*K>.base.<name>``);
* replicated tensors whose name contains "expert" (the slot table ``expert_of_slot``, the router's
  ``expert_vec``) are written with ``EXPERT`` in place of ``expert`` so that DeepSpeed keeps them
  in the model file (its test is case-sensitive) and every rank reads them.

A checkpoint is therefore indexed by *global* slot: the same files serve any expert-parallel
size, and DeepSpeed's loader hands each rank its own slots (resharding for free). Burn-in full
experts released after the first clustering (size-0 tensors) are not written per slot; the load
side recreates them empty.

Pure torch: nothing here imports deepspeed or torch.distributed.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Dict, Mapping, MutableMapping

import torch

SLOT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
STACKED_PREFIX = "moe.experts."
PER_GROUP_KINDS = ("base",)
_SLOT_KEY = re.compile(r"^deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)\.(\w+)$")


def to_slot_keys(state: MutableMapping[str, object], prefix: str, num_slots: int, experts_per_group: int) -> None:
    """In place: stacked expert tensors under ``prefix + 'moe.experts.'`` -> per-slot keys."""
    K = experts_per_group
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.startswith(STACKED_PREFIX):
            kind, name = rest[len(STACKED_PREFIX):].split(".", 1)
            t = state.pop(key)
            if t.numel() == 0:
                continue  # released burn-in experts
            if kind in PER_GROUP_KINDS:
                for g in range(t.shape[0]):
                    state[f"{prefix}{SLOT_PREFIX}{g * K}.{kind}.{name}"] = t[g]
            else:
                if t.shape[0] != num_slots:
                    raise ValueError(f"{key}: leading dimension {t.shape[0]} is not the {num_slots} local slots")
                for s in range(num_slots):
                    state[f"{prefix}{SLOT_PREFIX}{s}.{kind}.{name}"] = t[s]
        elif "expert" in rest:
            state[prefix + rest.replace("expert", "EXPERT")] = state.pop(key)


def from_slot_keys(state: MutableMapping[str, object], prefix: str, num_slots: int, experts_per_group: int,
                   stacked_names: Mapping[str, torch.Tensor]) -> None:
    """In place: the inverse of :func:`to_slot_keys`.

    ``stacked_names`` maps ``'<kind>.<name>'`` to the module's stacked tensor (for shapes and
    dtype). A stacked tensor none of whose slots is present is left out (the module then reports
    it missing), unless the state is compressed and the tensor is a released burn-in one.
    """
    K = experts_per_group
    G = num_slots // K
    rows: Dict[str, Dict[int, torch.Tensor]] = {}
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix):]
        m = _SLOT_KEY.match(rest)
        if m:
            slot, kind, name = int(m.group(1)), m.group(2), m.group(3)
            rows.setdefault(f"{kind}.{name}", {})[slot] = state.pop(key)
        elif "EXPERT" in rest:
            state[prefix + rest.replace("EXPERT", "expert")] = state.pop(key)
    for kn, per in rows.items():
        kind = kn.split(".", 1)[0]
        if kn not in stacked_names:
            raise KeyError(f"{prefix}{SLOT_PREFIX}<slot>.{kn}: no such expert tensor in this layer "
                           f"(has {sorted(stacked_names)})")
        if kind in PER_GROUP_KINDS:
            want = [g * K for g in range(G)]
        else:
            want = list(range(num_slots))
        missing = [s for s in want if s not in per]
        extra = sorted(set(per) - set(want))
        if missing or extra:
            raise KeyError(f"{prefix}: expert tensor {kn} has slots {sorted(per)}; this layer needs exactly "
                           f"{want} (missing {missing}, unexpected {extra}); was the checkpoint saved with "
                           f"a different number of experts per rank?")
        state[prefix + STACKED_PREFIX + kn] = torch.stack([per[s] for s in want])
    from .layer import ClusteredMoE
    counters = state.get(prefix + "moe.counters")
    compressed = counters is not None and bool(int(counters[ClusteredMoE._COUNTERS.index("compressed")]))
    for kn, t in stacked_names.items():
        key = prefix + STACKED_PREFIX + kn
        if key not in state and compressed and kn.startswith("full."):
            state[key] = torch.empty(0, dtype=t.dtype)  # released after the first clustering


# --- files ------------------------------------------------------------------------------
def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename: a reader
    sees the old file or the complete new one, never a torn write."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def _atomic_write(path: str, mode: str, write) -> None:
    """Temp file in the target directory, fsync, rename: a reader sees the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` with one error that names the file.

    torch's message for a file its weights-only unpickler refuses (garbage bytes do that too)
    advises re-running with ``weights_only=False``, i.e. executing whatever the file holds: only
    the reason is kept, and the original exception is not chained (``from None``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = _load_failure_reason(exc)
        raise RuntimeError(f"cannot read checkpoint file {path}: corrupt, truncated, or holds more than "
                           f"tensors and plain containers ({reason})") from None


def _load_failure_reason(exc: BaseException) -> str:
    """``<type>: <first sentence>`` of a torch.load error, without any advice about weights_only."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # the reason is the first line after this marker
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    text = text.split(". ", 1)[0].rstrip(".")
    if "weights_only" in text:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
