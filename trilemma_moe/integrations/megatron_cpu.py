"""CPU stand-ins for CUDA-only calls in MEGATRON'S OWN CODE (not ours), so that a Megatron-core
``GPTModel`` trains and checkpoints on a machine without CUDA (tests, the CPU run of
``launch/train_megatron.py``). Our layer needs none of them; do not use them on a GPU.

:func:`cpu_attention_substitutes`, for Megatron's attention:

* ``megatron.core.utils.GlobalMemoryBuffer.get_tensor`` allocates its buffer on
  ``torch.cuda.current_device()``: the stand-in allocates a fresh CPU tensor;
* ``tensor_parallel.random.CudaRNGStatesTracker.fork`` swaps CUDA RNG states (attention dropout
  under tensor parallelism): the stand-in forks nothing (run with attention_dropout=0).

:func:`cpu_checkpoint_substitutes`, for Megatron's ``dist_checkpointing`` (its ``torch_dist``
saver waits with ``torch.cuda.synchronize()`` after copying to host memory and puts its failure
flag on ``torch.cuda.current_device()``): no-op synchronisation, device "cpu".

Megatron's attention also builds a causal mask on CUDA when none is passed: pass an explicit
``attention_mask`` (:func:`causal_mask`).
"""
from __future__ import annotations

import contextlib

import torch


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    return torch.empty(tuple(tensor_shape), dtype=dtype)


def _no_fork(self, name=None):
    return contextlib.nullcontext()


@contextlib.contextmanager
def cpu_attention_substitutes():
    """Install the two stand-ins for the duration of the block (restored afterwards)."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from megatron.core.utils import GlobalMemoryBuffer
    saved = (GlobalMemoryBuffer.get_tensor, CudaRNGStatesTracker.fork)
    GlobalMemoryBuffer.get_tensor, CudaRNGStatesTracker.fork = _cpu_get_tensor, _no_fork
    try:
        yield
    finally:
        GlobalMemoryBuffer.get_tensor, CudaRNGStatesTracker.fork = saved


def causal_mask(seq_len: int) -> torch.Tensor:
    """Megatron's attention mask for a causal LM: [1, 1, s, s], True where attention is masked."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1).view(1, 1, seq_len, seq_len)


@contextlib.contextmanager
def cpu_checkpoint_substitutes():
    """``torch.cuda.synchronize`` as a no-op and ``torch.cuda.current_device()`` as "cpu" for the
    duration of the block (a dist_checkpointing save or load), when CUDA is unavailable."""
    if torch.cuda.is_available():
        yield
        return
    saved = (torch.cuda.synchronize, torch.cuda.current_device)
    torch.cuda.synchronize, torch.cuda.current_device = (lambda device=None: None), (lambda: "cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved
