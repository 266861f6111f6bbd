"""A clustered layer's state dict in DeepSpeed-MoE's key naming: one key per expert slot.

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

``TrilemmaMoE`` registers the hooks (:func:`register_slot_key_hooks`), so a plain ``state_dict``
has the same keys as ``engine.save_checkpoint``. The key functions themselves are pure torch.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, MutableMapping

import torch
from torch import nn

from ..core.layer import ClusteredMoE
from .deepspeed_zero3 import saved_values, take_loaded

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
        if kind == "full" and not any(k.startswith("full.") for k in stacked_names):
            continue   # burn_in_form="compressed": the layer has no burn-in experts to take them
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
    counters = state.get(prefix + "moe.counters")
    compressed = counters is not None and bool(int(counters[ClusteredMoE._COUNTERS.index("compressed")]))
    for kn, t in stacked_names.items():
        key = prefix + STACKED_PREFIX + kn
        if key not in state and compressed and kn.startswith("full."):
            state[key] = torch.empty(0, dtype=t.dtype)  # released after the first clustering


def register_slot_key_hooks(module: nn.Module) -> None:
    """``module`` (a ``TrilemmaMoE``: ``.moe`` is the ClusteredMoE) saves and loads its experts
    by slot in DeepSpeed-MoE's key naming."""
    module._register_state_dict_hook(_slot_keys_out)
    module.register_load_state_dict_pre_hook(_slot_keys_in)


def _slot_keys_out(module, state, prefix, local_metadata):
    ex = module.moe.experts
    saved_values(module, state, prefix)   # ZeRO-3: the gathered copies, not the empty partitions
    if module.ep_size > 1 and module.ep_group is not None:
        # DeepSpeed names expert files by ep_rank * num_local_experts + local slot: that must be
        # the global slot, i.e. ranks hold contiguous groups in rank order.
        import torch.distributed as dist
        first = getattr(ex, "group_offset", 0) * ex.K
        expected = dist.get_rank(group=module.ep_group) * ex.num_experts
        if first != expected:
            raise RuntimeError(f"{prefix}: local slots start at global slot {first}, but DeepSpeed will name "
                               f"them from {expected} (ep rank x local slots); checkpoint files would be "
                               f"mislabelled")
    to_slot_keys(state, prefix, ex.num_experts, ex.K)


def _slot_keys_in(module, state, prefix, *args):
    ex = module.moe.experts
    stacked = dict(ex.state_dict(keep_vars=True))
    from_slot_keys(state, prefix, ex.num_experts, ex.K, stacked)
    take_loaded(module, state, prefix)    # ZeRO-3: into the partitions after DeepSpeed's load
