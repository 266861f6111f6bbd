"""The main job's trainer (``python -m trilemma_moe.train``, ``trilemma-moe train``).

Modules, each importing only those below it (no circle, lazy imports included; test_architecture
checks it):

- ``job``: ``main``, from the command line to the summary, and the rules between flags.
- ``loop``: the training loop every backend shares, ``evaluate``, the learning-rate schedule.
- ``deepspeed_backend``: ``deepspeed.initialize`` with the user's JSON.
- ``args``: the flags (numbers checked as they are parsed), the CPU defaults, where the method's
  knobs come from, reading the data.
- ``backend``: the ``Backend`` protocol the loop drives, and the plain-torch backend.
- ``report``: TensorBoard, per-step statistics, event lines, the summary dict and table.
- ``measure``: peak memory, per-expert load traces, a distribution shift's numbers.
- ``errors``: an input error is one line ``trilemma_moe.train: error: ...`` and exit status 2.
"""
from .args import CPU_MOE_DEFAULTS, DEFAULT_STEPS, build_parser
from .backend import Backend, TorchBackend
from .job import main
from .loop import evaluate, lr_at
from .report import offload_summary

__all__ = ["Backend", "CPU_MOE_DEFAULTS", "DEFAULT_STEPS", "TorchBackend", "build_parser", "evaluate",
           "lr_at", "main", "offload_summary"]
