"""Train the small GPT with a chosen FFN kind and report quality, size, speed and load balance.

    python -m trilemma_moe.train                       # synthetic corpus, ours, CPU-sized model
    python -m trilemma_moe.train --ffn switch --steps 300 --summary-json out.json
    python -m trilemma_moe.train --data /path/to/wikitext-2 --logdir runs/wt2
    deepspeed --num_gpus 1 -m trilemma_moe.train --deepspeed_config ds.json

The entry point; the trainer lives in :mod:`trilemma_moe.training` (``main`` in ``training.job``,
the flags in ``training.args``, the loop in ``training.loop``, one backend per engine, the summary
in ``training.report``, input errors in ``training.errors``).
"""
from __future__ import annotations

from .training import CPU_MOE_DEFAULTS, DEFAULT_STEPS, build_parser, evaluate, lr_at, main
from .training.report import offload_summary as _offload_summary  # noqa: F401  (tests import it from here)

__all__ = ["CPU_MOE_DEFAULTS", "DEFAULT_STEPS", "build_parser", "evaluate", "lr_at", "main"]

if __name__ == "__main__":
    from trilemma_moe.parallel.topology import leave_process_group

    main()
    leave_process_group()
