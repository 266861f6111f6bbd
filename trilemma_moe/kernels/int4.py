"""The INT4 storage format of residual factors: two 4-bit codes per byte, a float16 scale and a
uint8 zero point per (slot, rank column). The format itself -- pack (:func:`quantize`), unpack
(:func:`dequantize`) and the values it decodes to (:func:`fake_quant`) -- so that the kernels and
their torch twins (``reference.py``) decode exactly what ``trilemma_moe/core/quant.py`` (the
training design: master factors, straight-through gradient) stores.

Quantization groups: a factor tensor ``(slots, rows, r)`` (A is ``(E, d_in, r)``, B is
``(E, d_out, r)``) has one group per ``(slot, rank column)``: the ``rows`` values of one rank-one
component of one expert share a float16 scale and a uint8 zero point (asymmetric, the range
always contains 0 so an all-zero -- gated -- residual is exact). Codes ``q = clamp(round(w / s) + z,
0, 15)``, value ``(q - z) * s``; two consecutive rows are packed into one byte (low nibble first).
Overhead: 3 bytes per ``rows`` values, so stored bytes are ``0.25 + 1.5 / rows`` of BF16's.
"""
from __future__ import annotations

from typing import Dict

import torch

QMAX = 15


def scale_zero(w: torch.Tensor):
    """Per (slot, column) scale (float16, as stored) and zero point (uint8) of ``w (..., rows, cols)``."""
    wf = w.detach().float()
    lo = wf.amin(dim=-2, keepdim=True).clamp(max=0.0)
    hi = wf.amax(dim=-2, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / QMAX).to(torch.float16)
    # all-zero column (or a range below float16's resolution): any positive scale codes it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, QMAX)
    return scale, zero.to(torch.uint8)


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (torch.round(w.detach().float() / scale.float()) + zero.float()).clamp(0, QMAX).to(torch.uint8)


def quantize(w: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Packed INT4 form of ``w (..., rows, cols)``: ``packed`` uint8 ``(..., ceil(rows/2), cols)``,
    ``scale`` float16 and ``zero`` uint8 ``(..., 1, cols)``."""
    if w.dim() < 2:
        raise ValueError(f"quantize expects a (..., rows, cols) tensor, got shape {tuple(w.shape)}")
    scale, zero = scale_zero(w)
    q = codes(w, scale, zero)
    if q.shape[-2] % 2:
        q = torch.cat([q, torch.zeros_like(q[..., :1, :])], dim=-2)
    packed = q[..., 0::2, :] | (q[..., 1::2, :] << 4)
    return {"packed": packed.contiguous(), "scale": scale, "zero": zero}


def dequantize(qt: Dict[str, torch.Tensor], rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of a :func:`quantize` result as ``dtype`` ``(..., rows, cols)``."""
    p = qt["packed"]
    q = torch.stack([p & 0x0F, p >> 4], dim=-2)             # (..., rows/2, 2, cols)
    q = q.reshape(*p.shape[:-2], p.shape[-2] * 2, p.shape[-1])[..., :rows, :]
    return ((q.float() - qt["zero"].float()) * qt["scale"].float()).to(dtype)


class _FakeQuant(torch.autograd.Function):
    # Not ``w + (deq - w).detach()``: that sum rounds, and the forward must see exactly the values
    # the packed form decodes to.
    @staticmethod
    def forward(ctx, w):
        scale, zero = scale_zero(w)
        return ((codes(w, scale, zero).float() - zero.float()) * scale.float()).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad  # straight-through


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype, with a straight-through gradient."""
    return _FakeQuant.apply(w)


def nbytes(qt: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in qt.values())
