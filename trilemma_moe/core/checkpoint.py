"""Checkpoint files written atomically and read back safely (tensors and plain containers only).

The per-slot key naming of a clustered layer's state dict (DeepSpeed-MoE's) lives with the
DeepSpeed integration: ``trilemma_moe/integrations/deepspeed_keys.py``.
"""
from __future__ import annotations

import os
import tempfile

import torch


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
