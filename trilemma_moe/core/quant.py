"""INT4 residual factors (paper 3.4): two 4-bit values per byte, a scale and a zero point per group.

The format (pack, unpack, quantization groups, overhead) is ``trilemma_moe/kernels/int4.py``, next
to the kernels that decode it; this module is what the layer uses of it.

Training design: the optimizer keeps full-precision *master* factors (the parameters); the forward
uses ``fake_quant(master)`` = the exact values the packed form decodes to, with a straight-through
gradient (d fake_quant / d master = identity). The packed form is what is *stored*: what the
offload tier and the inference store hold and what ``memory_report`` counts as stored residual
bytes. ``dequantize(quantize(w))`` equals ``fake_quant(w)`` bit for bit, so a model served from the
packed form computes exactly what the trained model computed.
"""
from ..kernels.int4 import QMAX, dequantize, fake_quant, nbytes, quantize

__all__ = ["QMAX", "quantize", "dequantize", "fake_quant", "nbytes"]
