"""Checkpoints through DeepSpeed, and reading them back without an engine (any ep size).

``save_checkpoint(engine, dir, tag, client_state)`` calls ``engine.save_checkpoint`` with
``save_latest=False`` and, once every rank has written its files, points ``latest`` at the tag
with an atomic rename: a run killed mid-save leaves ``latest`` on the previous complete
checkpoint (DeepSpeed's own files are plain ``torch.save`` writes, so a torn tag directory is
never the one resumed from). ``load_checkpoint(engine, dir, tag=None, **kwargs)`` checks ``latest``
(:func:`resolve_tag`: not empty, text, naming an existing folder) before ``engine.load_checkpoint``.

Expert tensors are written by DeepSpeed one file per *global* slot (see
``deepspeed_keys.py``), so the model part of a checkpoint does not depend on the
expert-parallel size it was saved with: ``engine.load_checkpoint(dir, load_module_only=True)``
at another ep size reads the slots each rank owns, and :func:`consolidate` assembles the
ep-size-1 state dict (``trilemma-moe reshard``). Optimizer state (ZeRO partitions, per-rank
optimizer files) is tied to the saving topology and is not carried across a change of size.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
from typing import Any, Dict, Optional, Sequence

import torch

from ..core.checkpoint import atomic_save, atomic_write_text, safe_load
from .deepspeed_keys import SLOT_PREFIX

_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def save_checkpoint(engine, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[Dict[str, Any]] = None) -> str:
    """``engine.save_checkpoint`` then an atomic ``latest``; returns the tag. All ranks call it."""
    import torch.distributed as dist

    tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
    engine.save_checkpoint(save_dir, tag=tag, client_state=dict(client_state or {}), save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(tag, os.path.join(save_dir, "latest"))
    if dist.is_initialized():
        dist.barrier()
    return tag


def latest_tag(ckpt_dir: str, latest: str = "latest") -> Optional[str]:
    """The tag in ``ckpt_dir/latest``; None when there is no such file (nothing saved yet).

    An empty or non-UTF-8 ``latest`` raises naming the file: DeepSpeed would fail on it with a
    bare assertion / UnicodeDecodeError.
    """
    path = os.path.join(ckpt_dir, latest)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected the tag of a checkpoint folder, "
                         f"got {len(raw)} bytes that are not UTF-8)") from None
    if not tag:
        raise ValueError(f"{path} is empty: expected the tag of a checkpoint folder in {ckpt_dir}")
    return tag


def resolve_tag(ckpt_dir: str, tag: Optional[str] = None, latest: str = "latest") -> str:
    """``tag``, or the one in ``ckpt_dir/latest``, checked to name an existing folder of ``ckpt_dir``."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    if tag is None:
        tag = latest_tag(ckpt_dir, latest)
        if tag is None:
            raise FileNotFoundError(f"{ckpt_dir}: no '{latest}' file and no tag given (nothing saved there yet?)")
        named_by = f"{os.path.join(ckpt_dir, latest)} names tag {tag!r}"
    else:
        tag = str(tag)
        if not tag.strip():
            raise ValueError(f"{ckpt_dir}: empty checkpoint tag given")
        named_by = f"tag {tag!r} given"
    folder = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{named_by}, but there is no folder {folder}")
    return tag


def load_checkpoint(engine, ckpt_dir: str, tag: Optional[str] = None, **kwargs):
    """``engine.load_checkpoint(ckpt_dir, tag=...)`` after :func:`resolve_tag`: a bad ``latest`` or
    tag raises naming the file and tag instead of DeepSpeed's bare errors (or its warning and
    ``(None, None)`` when there is no ``latest``). Returns what the engine returns."""
    universal = getattr(engine, "load_universal_checkpoint", None)
    latest = "latest_universal" if callable(universal) and universal() else "latest"  # as DeepSpeed reads it
    tag = resolve_tag(ckpt_dir, tag, latest)
    return engine.load_checkpoint(ckpt_dir, tag=tag, **kwargs)


def consolidate(ckpt_dir: str, tag: Optional[str] = None, mp_rank: int = 0) -> Dict[str, torch.Tensor]:
    """The model state dict of a DeepSpeed checkpoint as one process (ep_size 1) holds it.

    Reads the model file and every ``layer_*_expert_*`` file with ``weights_only=True``. Works
    for a checkpoint saved at any expert-parallel size: expert files are named and keyed by
    global slot. Raises naming the file on a missing or unreadable one.
    """
    tag = resolve_tag(ckpt_dir, tag)
    root = os.path.join(ckpt_dir, tag)
    model_file = os.path.join(root, f"mp_rank_{mp_rank:02d}_model_states.pt")
    if not os.path.exists(model_file) and glob.glob(os.path.join(root, f"zero_pp_rank_*_mp_rank_{mp_rank:02d}_model_states.pt")):
        raise RuntimeError(f"{root}: saved under ZeRO stage 3, whose dense weights live only in ZeRO's partition "
                           f"files: it cannot be resharded; resume it at the world size and ep_size it was saved with")
    state = safe_load(model_file)
    if "module" not in state:
        raise RuntimeError(f"{model_file}: not a DeepSpeed model-states file (no 'module' entry)")
    module = dict(state["module"])
    layers: Dict[int, Dict[int, str]] = {}
    for path in glob.glob(os.path.join(root, "layer_*_expert_*_model_states.pt")):
        m = _EXPERT_FILE.match(os.path.basename(path))
        if m and int(m.group(3)) == mp_rank:
            layers.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    for layer_id, files in sorted(layers.items()):
        ids = sorted(files)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise FileNotFoundError(f"{root}: MoE layer {layer_id} lacks expert files for global slots {missing}")
        for gid in ids:
            part = safe_load(files[gid])
            for key in part:
                if f".{SLOT_PREFIX}{gid}." not in f".{key}":
                    raise RuntimeError(f"{files[gid]}: key {key!r} is not for global slot {gid}")
            module.update(part)
    return module


def reshard_main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(
        prog="trilemma-moe reshard",
        description="Turn a DeepSpeed checkpoint saved at any expert-parallel size into the model state "
                    "dict of ep_size 1 (one file, loadable with torch.load(weights_only=True) and "
                    "model.load_state_dict). For ep_size N under DeepSpeed no conversion is needed: "
                    "engine.load_checkpoint(dir, load_module_only=True) reads each rank's global slots.")
    p.add_argument("checkpoint", help="DeepSpeed checkpoint directory (holds 'latest' and tag folders)")
    p.add_argument("--tag", default=None, help="tag to read (default: the one in 'latest')")
    p.add_argument("--out", required=True, help="output file (.pt), written atomically")
    args = p.parse_args(argv)
    state = consolidate(args.checkpoint, args.tag)
    atomic_save(state, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")
    return args.out


main = reshard_main
