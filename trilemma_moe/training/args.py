"""The main job's command line: flags (each number checked as it is parsed), the CPU defaults,
where the method's knobs come from, and reading the data they name.

Every knob of the method comes from ``--config YAML`` (or the ``"trilemma_moe"`` section of the
``--deepspeed_config`` JSON); the structure flags (``--num-experts`` ...) override it. Without a
config file the CPU defaults below apply (smaller burn-in / regroup interval than the paper's so a
default run clusters within its steps, and ``--ffn dynamic`` regroups within them); they are printed
at start.

``--task lm`` (default) trains the language model; ``--task sst2`` the same blocks as a sentence
classifier on GLUE SST-2. The optimisation flags in ``TASK_DEFAULTS`` default per task: a flag the
user leaves out takes its task's value (printed at start).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Dict, NoReturn, Optional

import torch

from ..config import TrilemmaMoEConfig
from ..config_checks import in_range
from ..data import (SentenceDataset, TokenCorpus, check_shift_pair, load_sst2, on_one_vocabulary, parse_data_spec,
                    read_lm_source)
from ..models import FFN_KINDS, OURS_VARIANTS
from .errors import input_errors, usage_error

# Defaults of the no-argument CPU run.  Structure knobs that the
# user neither passes as flags nor sets in --config fall back to these.
CPU_MOE_DEFAULTS = dict(num_experts=16, num_groups=4, rank=8, top_k=2, burn_in=200,
                        recluster_interval=100)
DEFAULT_STEPS = 800  # no-argument run (ours): about 1.5 min wall on 2 CPU cores (docs/BENCHMARKS.md)
TASKS = ("lm", "sst2")
# flag (argparse dest) -> its default per task; the flags themselves default to None
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "lm": {"steps": DEFAULT_STEPS, "lr": 3e-3, "batch_size": 16, "eval_every": 250},
    "sst2": {"steps": 1500, "lr": 1e-3, "batch_size": 32, "eval_every": 250},  # ~5 min, 1 thread
}

# flag (argparse dest) -> TrilemmaMoEConfig field it overrides
FLAG_TO_FIELD = {"num_experts": "num_experts", "num_groups": "num_groups", "rank": "rank",
                 "top_k": "top_k", "burn_in": "burn_in", "burn_in_form": "burn_in_form",
                 "recluster_interval": "recluster_interval", "residual_bits": "residual_bits",
                 "recompute_experts": "recompute_experts",
                 "offload_idle_steps": "offload_idle_steps", "prefetch_lookahead": "prefetch_lookahead",
                 "offload_dir": "offload_dir", "ep_size": "ep_size", "regroup_trigger": "regroup_trigger",
                 "drift_threshold": "drift_threshold", "drift_every": "drift_every"}

DATA_HELP = ("--task lm: a WikiText-2/-103 directory holding wiki.train.tokens, wiki.valid.tokens and "
             "wiki.test.tokens (the word-level release; download it, see docs/reference/trainer.md), a GLUE "
             "SST-2 directory "
             "(its phrases as text), or synthetic[:key=value,...] (the built-in topic corpus; keys seed= "
             "(default --seed), topics=a-b (documents only from those topics), vocab= (512), num_topics= (8)); "
             "default: synthetic. --task sst2 (required): a GLUE SST-2 directory holding "
             "train.tsv and optionally dev.tsv (else 872 whole sentences of train.tsv are held out, none of "
             "their phrases trained on: not GLUE's dev set)")


# --- argparse types: a number that can only be wrong is refused as it is parsed ------------------
# (argparse names the flag: "argument --lr: must be a finite number > 0, got 'nan'", exit status 2)
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


def finite_float(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``); NaN and inf are refused."""
    if high < math.inf:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        span = f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not in_range(value, low, high, low_open):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text!r}")
        return value
    parse.__name__ = f"float {span}"
    return parse


def torch_device(text: str) -> str:
    """A device string torch understands (cpu, cuda, cuda:1)."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda or cuda:N)") from None
    return text


POSITIVE, COUNT = int_at_least(1), int_at_least(0)
LEARNING_RATE, NON_NEGATIVE = finite_float(0.0, low_open=True), finite_float(0.0)
FRACTION, DRIFT_THRESHOLD = finite_float(0.0, 1.0), finite_float(0.0, 1.0, low_open=True)


def _task_default(dest: str) -> str:
    lm, sst2 = TASK_DEFAULTS["lm"][dest], TASK_DEFAULTS["sst2"][dest]
    return f"(default: {lm:g}) (--task sst2: {sst2:g})"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once: not where the help text already names the default, and not
    for flags without a value (``None``, ``store_true``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a value its type refuses) print the usage, then the
    line every input error prints: ``trilemma_moe.train: error: argument --lr: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        usage_error(message)


def build_parser() -> argparse.ArgumentParser:
    d = CPU_MOE_DEFAULTS
    p = ArgumentParser(
        prog="trilemma-moe train",
        description="Train a small GPT whose FFNs are dense / switch / deepspeed / ours and its variants.",
        formatter_class=HelpFormatter)
    p.add_argument("--task", choices=TASKS, default="lm",
                   help="lm: next-token language model; sst2: sentence classification (GLUE SST-2)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--ffn", choices=FFN_KINDS, default="ours", help="FFN kind of the MoE blocks")
    p.add_argument("--steps", type=POSITIVE, default=None, help=f"optimizer steps {_task_default('steps')}")
    p.add_argument("--config", default=None,
                   help="YAML of TrilemmaMoEConfig knobs (default: the CPU defaults of the structure flags)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON: train under deepspeed.initialize; its 'trilemma_moe' section "
                        "configures the method, its gradient_accumulation_steps and gradient_clipping "
                        "(DeepSpeed's defaults: 1 and 0, no clipping) the optimizer step")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by the deepspeed launcher")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=POSITIVE, default=128, help="hidden size")
    g.add_argument("--d-ff", type=POSITIVE, default=512, help="FFN (and each expert's) inner size")
    g.add_argument("--layers", type=POSITIVE, default=2, help="transformer blocks")
    g.add_argument("--heads", type=POSITIVE, default=4, help="attention heads")
    g.add_argument("--seq-len", type=POSITIVE, default=64,
                   help="tokens per training window (sst2: the longest phrase, longer ones are cut)")
    g.add_argument("--moe-every", type=POSITIVE, default=1, help="MoE FFN in every n-th block")
    g = p.add_argument_group("MoE structure (override --config; CPU defaults otherwise)")
    g.add_argument("--num-experts", type=POSITIVE, default=None, help=f"E (default: {d['num_experts']})")
    g.add_argument("--num-groups", type=POSITIVE, default=None, help=f"G (default: {d['num_groups']})")
    g.add_argument("--rank", type=POSITIVE, default=None, help=f"r (default: {d['rank']})")
    g.add_argument("--top-k", type=POSITIVE, default=None, help=f"k (default: {d['top_k']})")
    g.add_argument("--burn-in", type=COUNT, default=None,
                   help=f"T0 optimizer steps before the first clustering (default: {d['burn_in']})")
    g.add_argument("--burn-in-form", choices=("full", "compressed"), default=None,
                   help="what burn-in trains: full, E full experts compressed at the first clustering (the "
                        "paper; default); compressed, bases + factors from the start (no full experts held)")
    g.add_argument("--recluster-interval", type=POSITIVE, default=None,
                   help=f"T: steps between regroup checks (default: {d['recluster_interval']})")
    g.add_argument("--regroup-trigger", choices=("period", "drift"), default=None,
                   help="when regroup checks run after the first clustering: period, every T steps (the paper; "
                        "default); drift, when the per-expert load distribution (an EMA over every rank) moved by "
                        "more than --drift-threshold in total variation since the last check (T unused)")
    g.add_argument("--drift-threshold", type=DRIFT_THRESHOLD, default=None,
                   help="--regroup-trigger drift: total-variation distance in (0, 1] that triggers a check (default 0.25)")
    g.add_argument("--drift-every", type=POSITIVE, default=None,
                   help="--regroup-trigger drift: steps between measurements, counted from the last check (default 10)")
    g.add_argument("--ep-size", type=POSITIVE, default=None,
                   help="expert parallelism: ranks each layer's groups are spread over (needs "
                        "--deepspeed_config and a launcher with a multiple of this many ranks; default 1)")
    g = p.add_argument_group("precision and memory (override --config)")
    g.add_argument("--residual-bits", type=int, default=None, choices=(4, 16),
                   help="residual factor bits (default 16)")
    g.add_argument("--recompute-experts", action="store_true", default=None,
                   help="activation checkpointing of our expert compute: the backward recomputes it "
                        "instead of keeping its d_ff-wide activations (default: off)")
    g.add_argument("--offload-idle-steps", type=POSITIVE, default=None,
                   help="S_idle: offload groups idle this many evaluation steps (default: off)")
    g.add_argument("--prefetch-lookahead", type=COUNT, default=None, help="L: prefetch lookahead (default 2)")
    g.add_argument("--offload-dir", default=None,
                   help="NVMe directory for offloaded groups (aio; default: CPU memory)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="windows (sst2: phrases) per micro-batch and rank (DeepSpeed: "
                        f"train_micro_batch_size_per_gpu decides) {_task_default('batch_size')}")
    g.add_argument("--lr", type=LEARNING_RATE, default=None, help=f"peak learning rate {_task_default('lr')}")
    g.add_argument("--min-lr-ratio", type=FRACTION, default=0.1, help="final lr / peak lr (cosine)")
    g.add_argument("--warmup", type=COUNT, default=None, help="warmup steps (default: 5%% of steps)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.01, help="AdamW weight decay of matrices")
    g.add_argument("--seed", type=COUNT, default=0,
                   help="seeds the synthetic corpus, the data order, the model's init and every MoE "
                        "layer (expert init, k-means++): in the main job it replaces TrilemmaMoEConfig.seed")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=COUNT, default=None,
                   help=f"validate every n steps (0: only at the end) {_task_default('eval_every')}")
    g.add_argument("--eval-batches", type=COUNT, default=0, help="cap on validation batches (0: whole split)")
    g.add_argument("--final-eval-batches", type=COUNT, default=None,
                   help="cap on batches of the final validation (and --test) evaluation (0: whole split; "
                        "default: --eval-batches)")
    g.add_argument("--test", action="store_true", help="also evaluate the test split at the end (test_ppl)")
    g.add_argument("--measure-memory", action="store_true",
                   help="measure peak training memory as what the process holds: peak_memory_bytes in the "
                        "summary (the peak resident set size, ru_maxrss, up to the end of training, largest over "
                        "ranks, each rank's in peak_rss_bytes_per_rank; CUDA: the allocator's peak)")
    g.add_argument("--trace-every", type=COUNT, default=0,
                   help="record per-expert token counts every n steps (load_history; default: steps/100)")
    g.add_argument("--max-train-tokens", type=POSITIVE, default=None,
                   help="use only the first n training tokens (quick runs on real data; default: all)")
    g.add_argument("--logdir", default=None, help="TensorBoard event files go here (default: none)")
    g.add_argument("--summary-json", default=None, help="write the final metrics as JSON here (default: none)")
    g.add_argument("--device", type=torch_device, default="cpu",
                   help="cpu or cuda (without --deepspeed_config; under DeepSpeed the engine decides)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward (without --deepspeed_config; DeepSpeed "
                        "takes its \"bf16\" section)")
    g.add_argument("--threads", type=POSITIVE, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS or all cores)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (training and evaluation)")
    g.add_argument("--comm-log", default=None,
                   help="expert parallelism: write every rank's per-layer byte counters (JSON) here")
    g.add_argument("--record-routing", default=None,
                   help="save the routing of the last 20 steps (torch file) for `trilemma-moe profile-comm`")
    g = p.add_argument_group("distribution shift (--task lm)")
    # their ranges depend on --steps: check_shift_flags names it (--shift-step 0: "must lie in 1..N")
    g.add_argument("--shift-step", type=int, default=None,
                   help="train on --data up to and including optimizer step N, then on --shift-data "
                        "(1 <= N < --steps; every evaluation scores both corpora)")
    g.add_argument("--shift-data", default=None,
                   help="the corpus after the shift, in --data's forms (synthetic: the same vocab= and "
                        "num_topics= as --data); the vocabulary is built from both training splits")
    g.add_argument("--shift-ramp", type=int, default=0,
                   help="mix the corpora over K steps after --shift-step: step N+j takes round(j/K x batch) "
                        "rows of each batch (half up) from --shift-data, spread evenly (0: switch at once)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-dir", default=None,
                   help="checkpoint directory (DeepSpeed: engine.save_checkpoint layout; otherwise "
                        "latest.pt; default: no checkpoints)")
    g.add_argument("--save-every", type=COUNT, default=0, help="checkpoint every n steps (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    g.add_argument("--loss-log", default=None, help="append one JSON line per step (step, loss) to this file")
    return p


# ------------------------------------------------------------------------------------------
def moe_config(args: argparse.Namespace) -> TrilemmaMoEConfig:
    """The method's knobs: the config file (DeepSpeed's section or YAML) or the CPU defaults,
    with the structure flags on top."""
    overrides = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items()
                 if getattr(args, flag) is not None}
    # an --ffn that sets dynamic_regroup sets it in the config it validates: `--ffn dynamic
    # --regroup-trigger drift` needs no config file, and `--ffn static` with a drift trigger is refused
    forced = OURS_VARIANTS.get(args.ffn, {}).get("dynamic_regroup")
    if forced is not None:
        if not forced and args.regroup_trigger == "drift":
            raise ValueError(f"--regroup-trigger drift: --ffn {args.ffn} clusters once and never checks again; "
                             f"regroup checks need --ffn dynamic (or dynamic_regroup: true in the config)")
        overrides["dynamic_regroup"] = forced
    if args.deepspeed_config:
        return TrilemmaMoEConfig.from_deepspeed_config(args.deepspeed_config, **overrides)
    if args.config:
        return TrilemmaMoEConfig.from_yaml(args.config, **overrides)
    merged: Dict[str, Any] = dict(CPU_MOE_DEFAULTS)
    merged.update(overrides)
    return TrilemmaMoEConfig.from_dict(merged)


def resolve_task_defaults(args: argparse.Namespace) -> Dict[str, Any]:
    """Fill the per-task flags the user left out; returns those filled (printed at start)."""
    filled = {dest: value for dest, value in TASK_DEFAULTS[args.task].items() if getattr(args, dest) is None}
    for dest, value in filled.items():
        setattr(args, dest, value)
    return filled


def check_shift_flags(args: argparse.Namespace) -> None:
    """The shift flags against each other and the run (a ``ValueError`` naming the flag)."""
    if args.shift_step is None and args.shift_data is None:
        if args.shift_ramp:
            raise ValueError("--shift-ramp needs --shift-step and --shift-data")
        return
    if args.task != "lm":
        raise ValueError(f"--shift-step / --shift-data apply to --task lm only, not --task {args.task}")
    if args.shift_step is None or args.shift_data is None:
        raise ValueError("--shift-step and --shift-data go together: give both or neither")
    if not 1 <= args.shift_step < args.steps:
        raise ValueError(f"--shift-step {args.shift_step}: must lie in 1..{args.steps - 1}, inside the run's "
                         f"--steps {args.steps}")
    if args.shift_ramp < 0 or args.shift_step + args.shift_ramp > args.steps:
        raise ValueError(f"--shift-ramp {args.shift_ramp}: must be >= 0 and end by the last step "
                         f"(--shift-step {args.shift_step} + ramp <= --steps {args.steps})")


def check_corpus_length(args: argparse.Namespace, corpus: TokenCorpus, flag: str, spec: Optional[str]) -> None:
    """A training split must hold a window and its next token (``--seq-len`` + 2 tokens)."""
    n = corpus.train.numel()
    if n < args.seq_len + 2:
        cut = f" (cut by --max-train-tokens {args.max_train_tokens})" if args.max_train_tokens is not None else ""
        usage_error(f"{flag} {spec or 'synthetic'}: its training split holds {n} tokens{cut}, fewer than "
                    f"--seq-len {args.seq_len} + 2")


def load_lm_data(args: argparse.Namespace) -> tuple[TokenCorpus, Optional[TokenCorpus]]:
    """``--data`` and ``--shift-data`` on one vocabulary (the second ``None`` without a shift);
    a bad spec or directory is one error line naming its flag."""
    with input_errors("--data", args.data):
        spec = parse_data_spec(args.data, "--data")
    if args.shift_data is not None:   # both specs checked before either corpus is read
        with input_errors("--shift-data", args.shift_data):
            shift_spec = parse_data_spec(args.shift_data, "--shift-data")
            check_shift_pair(spec, shift_spec)
    with input_errors("--data", args.data):
        first = read_lm_source(spec, args.seed, test=args.test)
    second = None
    if args.shift_data is not None:
        with input_errors("--shift-data", args.shift_data):
            second = read_lm_source(shift_spec, args.seed)
    corpus, shift_corpus = on_one_vocabulary(first, second, args.max_train_tokens)
    check_corpus_length(args, corpus, "--data", args.data)
    if shift_corpus is not None:
        check_corpus_length(args, shift_corpus, "--shift-data", args.shift_data)
    return corpus, shift_corpus


def load_data(args: argparse.Namespace) -> tuple[TokenCorpus | SentenceDataset, Optional[TokenCorpus]]:
    """The task's data and, for a shift, the second corpus (else ``None``); errors name their flag."""
    if args.task == "lm":
        return load_lm_data(args)
    with input_errors("--data", args.data):
        if args.data is None:
            raise ValueError("--task sst2 needs --data DIR, a GLUE SST-2 directory holding train.tsv")
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f"--data {args.data!r}: no such directory (expected a GLUE SST-2 "
                                    f"directory with train.tsv and optionally dev.tsv)")
        return load_sst2(args.data, seq_len=args.seq_len), None
