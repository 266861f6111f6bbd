"""The main job's command line: flags, the CPU defaults, where the method's knobs come from, and
reading the data they name.

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
import os
from typing import Any, Dict, Optional

from ..config import TrilemmaMoEConfig
from ..data import (SentenceDataset, TokenCorpus, check_shift_pair, load_sst2, on_one_vocabulary, parse_data_spec,
                    read_lm_source)
from ..models import FFN_KINDS, OURS_VARIANTS
from .errors import input_errors

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
             "wiki.test.tokens (the word-level release; download it, see README), a GLUE SST-2 directory "
             "(its phrases as text), or synthetic[:key=value,...] (the built-in topic corpus; keys seed= "
             "(default --seed), topics=a-b (documents only from those topics), vocab= (512), num_topics= (8)); "
             "default: synthetic. --task sst2 (required): a GLUE SST-2 directory holding "
             "train.tsv and optionally dev.tsv (else a fixed stratified 872-row slice of train is held out)")


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


def build_parser() -> argparse.ArgumentParser:
    d = CPU_MOE_DEFAULTS
    p = argparse.ArgumentParser(
        prog="trilemma-moe train",
        description="Train a small GPT whose FFNs are dense / switch / deepspeed / ours and its variants.",
        formatter_class=HelpFormatter)
    p.add_argument("--task", choices=TASKS, default="lm",
                   help="lm: next-token language model; sst2: sentence classification (GLUE SST-2)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--ffn", choices=FFN_KINDS, default="ours", help="FFN kind of the MoE blocks")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps {_task_default('steps')}")
    p.add_argument("--config", default=None,
                   help="YAML of TrilemmaMoEConfig knobs (default: the CPU defaults of the structure flags)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON: train under deepspeed.initialize; its 'trilemma_moe' section "
                        "configures the method, its gradient_accumulation_steps and gradient_clipping "
                        "(DeepSpeed's defaults: 1 and 0, no clipping) the optimizer step")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by the deepspeed launcher")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=128, help="hidden size")
    g.add_argument("--d-ff", type=int, default=512, help="FFN (and each expert's) inner size")
    g.add_argument("--layers", type=int, default=2, help="transformer blocks")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--seq-len", type=int, default=64,
                   help="tokens per training window (sst2: the longest phrase, longer ones are cut)")
    g.add_argument("--moe-every", type=int, default=1, help="MoE FFN in every n-th block")
    g = p.add_argument_group("MoE structure (override --config; CPU defaults otherwise)")
    g.add_argument("--num-experts", type=int, default=None, help=f"E (default: {d['num_experts']})")
    g.add_argument("--num-groups", type=int, default=None, help=f"G (default: {d['num_groups']})")
    g.add_argument("--rank", type=int, default=None, help=f"r (default: {d['rank']})")
    g.add_argument("--top-k", type=int, default=None, help=f"k (default: {d['top_k']})")
    g.add_argument("--burn-in", type=int, default=None,
                   help=f"T0 optimizer steps before the first clustering (default: {d['burn_in']})")
    g.add_argument("--burn-in-form", choices=("full", "compressed"), default=None,
                   help="what burn-in trains: full, E full experts compressed at the first clustering (the "
                        "paper; default); compressed, bases + factors from the start (no full experts held)")
    g.add_argument("--recluster-interval", type=int, default=None,
                   help=f"T: steps between regroup checks (default: {d['recluster_interval']})")
    g.add_argument("--regroup-trigger", choices=("period", "drift"), default=None,
                   help="when regroup checks run after the first clustering: period, every T steps (the paper; "
                        "default); drift, when the per-expert load distribution (an EMA over every rank) moved by "
                        "more than --drift-threshold in total variation since the last check (T unused)")
    g.add_argument("--drift-threshold", type=float, default=None,
                   help="--regroup-trigger drift: total-variation distance in (0, 1] that triggers a check (default 0.25)")
    g.add_argument("--drift-every", type=int, default=None,
                   help="--regroup-trigger drift: steps between measurements, counted from the last check (default 10)")
    g.add_argument("--ep-size", type=int, default=None,
                   help="expert parallelism: ranks each layer's groups are spread over (needs "
                        "--deepspeed_config and a launcher with a multiple of this many ranks; default 1)")
    g = p.add_argument_group("precision and memory (override --config)")
    g.add_argument("--residual-bits", type=int, default=None, choices=(4, 16),
                   help="residual factor bits (default 16)")
    g.add_argument("--recompute-experts", action="store_true", default=None,
                   help="activation checkpointing of our expert compute: the backward recomputes it "
                        "instead of keeping its d_ff-wide activations (default: off)")
    g.add_argument("--offload-idle-steps", type=int, default=None,
                   help="S_idle: offload groups idle this many evaluation steps (default: off)")
    g.add_argument("--prefetch-lookahead", type=int, default=None, help="L: prefetch lookahead (default 2)")
    g.add_argument("--offload-dir", default=None,
                   help="NVMe directory for offloaded groups (aio; default: CPU memory)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None,
                   help="windows (sst2: phrases) per micro-batch and rank (DeepSpeed: "
                        f"train_micro_batch_size_per_gpu decides) {_task_default('batch_size')}")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate {_task_default('lr')}")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (cosine)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of steps)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of matrices")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the synthetic corpus, the data order, the model's init and every MoE "
                        "layer (expert init, k-means++): in the main job it replaces TrilemmaMoEConfig.seed")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"validate every n steps (0: only at the end) {_task_default('eval_every')}")
    g.add_argument("--eval-batches", type=int, default=0, help="cap on validation batches (0: whole split)")
    g.add_argument("--final-eval-batches", type=int, default=None,
                   help="cap on batches of the final validation (and --test) evaluation (0: whole split; "
                        "default: --eval-batches)")
    g.add_argument("--test", action="store_true", help="also evaluate the test split at the end (test_ppl)")
    g.add_argument("--measure-memory", action="store_true",
                   help="measure peak training memory as what the process holds: peak_memory_bytes in the "
                        "summary (the peak resident set size, ru_maxrss, up to the end of training, largest over "
                        "ranks, each rank's in peak_rss_bytes_per_rank; CUDA: the allocator's peak)")
    g.add_argument("--trace-every", type=int, default=0,
                   help="record per-expert token counts every n steps (load_history; default: steps/100)")
    g.add_argument("--max-train-tokens", type=int, default=None,
                   help="use only the first n training tokens (quick runs on real data; default: all)")
    g.add_argument("--logdir", default=None, help="TensorBoard event files go here (default: none)")
    g.add_argument("--summary-json", default=None, help="write the final metrics as JSON here (default: none)")
    g.add_argument("--device", default="cpu",
                   help="cpu or cuda (without --deepspeed_config; under DeepSpeed the engine decides)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward (without --deepspeed_config; DeepSpeed "
                        "takes its \"bf16\" section)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS or all cores)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (training and evaluation)")
    g.add_argument("--comm-log", default=None,
                   help="expert parallelism: write every rank's per-layer byte counters (JSON) here")
    g.add_argument("--record-routing", default=None,
                   help="save the routing of the last 20 steps (torch file) for `trilemma-moe profile-comm`")
    g = p.add_argument_group("distribution shift (--task lm)")
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
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (0: only at the end)")
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
    return on_one_vocabulary(first, second, args.max_train_tokens)


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
