"""NVMe tier for idle-group offload over DeepSpeed's async I/O (``AsyncIOBuilder().load()``).

One file per (layer, group) in ``offload_dir``; reads and writes are submitted with
``async_pread`` / ``async_pwrite`` on one ``aio_handle`` built from the user's DeepSpeed ``aio``
section, and completed together by ``wait()`` (the store calls it at the start of the next
forward, so I/O overlaps the current step's compute). Buffers are page-locked tensors from the
handle, padded to 4 KiB (O_DIRECT). Before a read the file's presence and size are checked (the
op asserts -- aborts the process -- on a short file); after a write its size is checked, and a
write that did not land (full disk, I/O error) is reported back so the store keeps the group in
CPU memory.

``make_tier(config)`` returns this tier, or :class:`~trilemma_moe.core.offload.CPUTier` with a
warning when aio cannot be built or no ``offload_dir`` is set.
"""
from __future__ import annotations

import atexit
import os
import shutil
import warnings
from typing import List, Optional, Tuple

import torch

from ..core.offload import CPUTier

_AIO_DEFAULTS = {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True,
                 "intra_op_parallelism": 1}


def load_aio():
    """The async_io op module, or None (with the reason) when it cannot be built here."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as exc:
        return None, f"deepspeed is not installed ({exc})"
    builder = AsyncIOBuilder()
    try:
        if not builder.is_compatible(verbose=False):
            return None, "DeepSpeed's async_io op is not compatible here (Debian/Ubuntu: apt-get install libaio-dev)"
        return builder.load(verbose=False), None
    except Exception as exc:  # a failed build: fall back, loudly
        return None, f"building DeepSpeed's async_io op failed: {exc}"


class AioTier:
    name = "nvme-aio"

    def __init__(self, directory: str, aio_config: Optional[dict] = None, module=None):
        if module is None:
            module, why = load_aio()
            if module is None:
                raise RuntimeError(why)
        cfg = dict(_AIO_DEFAULTS)
        cfg.update({k: v for k, v in (aio_config or {}).items() if k in _AIO_DEFAULTS})
        if "thread_count" in (aio_config or {}):
            cfg["intra_op_parallelism"] = aio_config["thread_count"]
        self.handle = module.aio_handle(cfg["block_size"], cfg["queue_depth"], cfg["single_submit"],
                                        cfg["overlap_events"], cfg["intra_op_parallelism"])
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._pending: List[Tuple[str, tuple, torch.Tensor, int]] = []
        # The op aborts the process if a handle is destroyed with operations in flight.
        atexit.register(self.flush)

    def flush(self) -> None:
        """Complete every operation in flight (writes land; reads are discarded)."""
        if self._pending:
            self.handle.wait()
            for _, _, staged, _ in self._pending:
                self.handle.free_cpu_locked_tensor(staged)
            self._pending = []

    def path(self, key) -> str:
        return os.path.join(self.directory, f"layer{key[0]}_group{key[1]}.bin")

    def where(self, key) -> str:
        return self.path(key)

    def _locked(self, nbytes: int) -> torch.Tensor:
        return self.handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))

    def write(self, key, buf: torch.Tensor) -> None:
        path = self.path(key)
        free = shutil.disk_usage(self.directory).free
        if free < buf.numel():
            raise OSError(28, f"no space left for {buf.numel()} bytes ({free} free)", path)
        staged = self._locked(buf.numel())
        staged.copy_(buf)
        if self.handle.async_pwrite(staged, path) != 0:
            self.handle.free_cpu_locked_tensor(staged)
            raise OSError(f"async_pwrite refused {path}")
        self._pending.append(("write", key, staged, buf.numel()))

    def read(self, key, nbytes: int) -> None:
        path = self.path(key)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"offloaded group {key[1]} of layer {key[0]}: file {path} is missing")
        size = os.path.getsize(path)
        if size < nbytes:
            raise RuntimeError(f"offloaded group {key[1]} of layer {key[0]}: file {path} is truncated "
                               f"({size} of {nbytes} bytes)")
        staged = self._locked(nbytes)
        if self.handle.async_pread(staged, path) != 0:
            self.handle.free_cpu_locked_tensor(staged)
            raise OSError(f"async_pread refused {path}")
        self._pending.append(("read", key, staged, nbytes))

    def wait(self):
        if not self._pending:
            return {}, []
        self.handle.wait()
        done, failed = {}, []
        for kind, key, staged, nbytes in self._pending:
            if kind == "read":
                done[key] = staged.clone()
            else:
                path = self.path(key)
                size = os.path.getsize(path) if os.path.isfile(path) else -1
                if size != nbytes:
                    failed.append((key, OSError(f"{path} holds {size} of {nbytes} bytes after the write")))
            self.handle.free_cpu_locked_tensor(staged)
        self._pending = []
        return done, failed

    def remove(self, key) -> None:
        path = self.path(key)
        if os.path.isfile(path):
            os.unlink(path)


def make_tier(offload_dir: Optional[str], aio_config: Optional[dict] = None):
    """NVMe over aio when possible, else pinned CPU memory (with a warning saying why)."""
    if offload_dir is None:
        warnings.warn("offload_idle_steps is set but offload_dir is not: idle groups go to CPU memory")
        return CPUTier()
    module, why = load_aio()
    if module is None:
        warnings.warn(f"idle-group offload falls back to CPU memory: {why}")
        return CPUTier()
    return AioTier(offload_dir, aio_config, module)
