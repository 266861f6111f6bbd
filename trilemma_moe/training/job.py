"""``main``: the main job from its command line to its summary (``python -m trilemma_moe.train``,
``trilemma-moe train``, one process per rank under the deepspeed launcher).

It sits above the other modules of ``training``: it reads the flags (``args``), checks the rules
between them (a number alone was checked as it was parsed), stops a bad input with one error line
and exit status 2 (``errors``), and hands the rest to the loop (``loop``).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence

import torch

from ..config import TrilemmaMoEConfig
from ..models import OURS_VARIANTS
from .args import FLAG_TO_FIELD, build_parser, check_shift_flags, load_data, moe_config, resolve_task_defaults
from .errors import input_errors, usage_error
from .loop import run


def check_flags(args: argparse.Namespace) -> None:
    """The rules between flags (each value was checked when parsed): a ``usage_error`` naming them."""
    if args.task == "sst2":
        if args.deepspeed_config:
            usage_error("--task sst2 runs without --deepspeed_config (plain torch backend only)")
        if args.max_train_tokens is not None:
            usage_error("--max-train-tokens applies to --task lm only")
        if args.test:
            usage_error("--test applies to --task lm only (GLUE's SST-2 test labels are not public)")
    for flag, given in (("--save-every", args.save_every), ("--resume", args.resume)):
        if given and not args.save_dir:
            usage_error(f"{flag} needs --save-dir")
    if args.d_model % args.heads:
        usage_error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if (not args.deepspeed_config and torch.device(args.device).type == "cuda"
            and not torch.cuda.is_available()):
        usage_error(f"--device {args.device}: torch sees no CUDA device here")


def _knob(args: argparse.Namespace, dest: str) -> str:
    """Where a structure knob came from, for an error: its flag, the config file, or the CPU default."""
    field = FLAG_TO_FIELD[dest]
    if getattr(args, dest) is not None:
        return "--" + dest.replace("_", "-")
    if args.deepspeed_config or args.config:
        which = "--deepspeed_config" if args.deepspeed_config else "--config"
        return f"{which} {args.deepspeed_config or args.config}: {field}"
    return f"{field} (the CPU default of --{dest.replace('_', '-')})"


def check_config_flags(args: argparse.Namespace, cfg: TrilemmaMoEConfig) -> None:
    """The method's knobs against the other flags."""
    if cfg.ep_size > 1 and not args.deepspeed_config:
        usage_error(f"{_knob(args, 'ep_size')} {cfg.ep_size} needs --deepspeed_config (and the deepspeed launcher)")
    if args.ffn in OURS_VARIANTS and cfg.rank > min(args.d_model, args.d_ff):
        usage_error(f"{_knob(args, 'rank')} {cfg.rank} must be <= min(--d-model {args.d_model}, --d-ff "
                    f"{args.d_ff}): the rank of each expert matrix's factors")


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
