"""The main job's trainer (``python -m trilemma_moe.train``, ``trilemma-moe train``).

- ``args``: the flags, the CPU defaults, where the method's knobs come from, input errors, ``main``.
- ``loop``: the training loop every backend shares, ``evaluate``, the learning-rate schedule.
- ``backend``: the ``Backend`` protocol the loop drives, and the plain-torch backend.
- ``deepspeed_backend``: ``deepspeed.initialize`` with the user's JSON.
- ``report``: TensorBoard, per-step statistics, event lines, the summary dict and table.
"""
from .args import CPU_MOE_DEFAULTS, DEFAULT_STEPS, build_parser, main
from .backend import Backend, TorchBackend
from .loop import evaluate, lr_at
from .report import offload_summary

__all__ = ["Backend", "CPU_MOE_DEFAULTS", "DEFAULT_STEPS", "TorchBackend", "build_parser", "evaluate",
           "lr_at", "main", "offload_summary"]
