"""``main``: the main job from its command line to its summary (``python -m trilemma_moe.train``,
``trilemma-moe train``, one process per rank under the deepspeed launcher).

It sits above the other modules of ``training``: it reads the flags (``args``), stops a bad input
with one error line and exit status 2 (``errors``), and hands the rest to the loop (``loop``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch

from .args import (build_parser, check_config_flags, check_flags, check_shift_flags, load_data, moe_config,
                   resolve_task_defaults)
from .errors import input_errors
from .loop import run


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, print the summary table and return the
    summary dict (also written to ``--summary-json``). Every input error, from a bad number to a
    missing file, is one line ``trilemma_moe.train: error: ...`` naming the flag and exit status 2."""
    args = build_parser().parse_args(argv)
    task_defaults = resolve_task_defaults(args)
    check_flags(args)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or (os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        config_flag = "--deepspeed_config" if args.deepspeed_config else "--config" if args.config else None
        with input_errors(config_flag, args.deepspeed_config or args.config):  # None: knobs from flags only
            cfg = moe_config(args)
        check_config_flags(args, cfg)
        with input_errors(None):   # its messages name the flag
            check_shift_flags(args)
        corpus, shift_corpus = load_data(args)
        return run(args, cfg, corpus, task_defaults, shift_corpus)
    finally:
        torch.set_num_threads(previous_threads)  # main() is also called in-process (tests, notebooks)
