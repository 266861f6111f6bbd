"""Train the small GPT with a chosen FFN kind and report quality, size, speed and load balance.

    python -m trilemma_moe.train                       # synthetic corpus, ours, CPU-sized model
    python -m trilemma_moe.train --ffn switch --steps 300 --summary-json out.json
    python -m trilemma_moe.train --data /path/to/wikitext-2 --logdir runs/wt2
    deepspeed --num_gpus 1 -m trilemma_moe.train --deepspeed_config ds.json

Every knob of the method comes from ``--config YAML`` (or the ``"trilemma_moe"`` section of the
``--deepspeed_config`` JSON); the structure flags (``--num-experts`` ...) override it.  Without a
config file the CPU defaults below apply (smaller burn-in / regroup interval than the paper's so a
default run clusters and regroups within its steps); they are printed at start.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import TrilemmaMoEConfig
from .data import BatchSampler, SyntheticTopicCorpus, TokenCorpus, eval_batches, load_wikitext
from .models import FFN_KINDS, GPT

# Defaults of the no-argument CPU run.  Structure knobs that the
# user neither passes as flags nor sets in --config fall back to these.
CPU_MOE_DEFAULTS = dict(num_experts=16, num_groups=4, rank=8, top_k=2, burn_in=200,
                        recluster_interval=100)
DEFAULT_STEPS = 800  # no-argument run (ours): about 1.5 min wall on 2 CPU cores (docs/BENCHMARKS.md)

_FLAG_TO_FIELD = {"num_experts": "num_experts", "num_groups": "num_groups", "rank": "rank",
                  "top_k": "top_k", "burn_in": "burn_in",
                  "recluster_interval": "recluster_interval", "residual_bits": "residual_bits",
                  "offload_idle_steps": "offload_idle_steps", "prefetch_lookahead": "prefetch_lookahead",
                  "offload_dir": "offload_dir", "ep_size": "ep_size"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trilemma-moe train",
        description="Train a small GPT whose FFNs are dense / switch / deepspeed / ours / static.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="WikiText directory (wiki.{train,valid,test}.tokens); default: the "
                        "built-in synthetic topic corpus")
    p.add_argument("--ffn", choices=FFN_KINDS, default="ours", help="FFN kind of the MoE blocks")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    p.add_argument("--config", default=None, help="YAML of TrilemmaMoEConfig knobs")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON: train under deepspeed.initialize; its 'trilemma_moe' "
                        "section configures the method")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by the deepspeed launcher")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--d-ff", type=int, default=512)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--moe-every", type=int, default=1, help="MoE FFN in every n-th block")
    g = p.add_argument_group("MoE structure (override --config; CPU defaults otherwise)")
    g.add_argument("--num-experts", type=int, default=None,
                   help=f"E (default {CPU_MOE_DEFAULTS['num_experts']})")
    g.add_argument("--num-groups", type=int, default=None,
                   help=f"G (default {CPU_MOE_DEFAULTS['num_groups']})")
    g.add_argument("--rank", type=int, default=None, help=f"r (default {CPU_MOE_DEFAULTS['rank']})")
    g.add_argument("--top-k", type=int, default=None, help=f"k (default {CPU_MOE_DEFAULTS['top_k']})")
    g.add_argument("--burn-in", type=int, default=None,
                   help=f"T0 steps before the first clustering (default {CPU_MOE_DEFAULTS['burn_in']})")
    g.add_argument("--recluster-interval", type=int, default=None,
                   help=f"T (default {CPU_MOE_DEFAULTS['recluster_interval']})")
    g.add_argument("--ep-size", type=int, default=None,
                   help="expert parallelism: ranks each layer's groups are spread over (needs "
                        "--deepspeed_config and a launcher with a multiple of this many ranks; default 1)")
    g = p.add_argument_group("precision and memory (override --config)")
    g.add_argument("--residual-bits", type=int, default=None, choices=(4, 16), help="residual factor bits")
    g.add_argument("--offload-idle-steps", type=int, default=None,
                   help="S_idle: offload groups idle this many evaluation steps (default: off)")
    g.add_argument("--prefetch-lookahead", type=int, default=None, help="L: prefetch lookahead (default 2)")
    g.add_argument("--offload-dir", default=None, help="NVMe directory for offloaded groups (aio)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (cosine)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of steps)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=250, help="validate every n steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=0, help="cap on validation batches (0: whole split)")
    g.add_argument("--max-train-tokens", type=int, default=None,
                   help="use only the first n training tokens (quick runs on real data)")
    g.add_argument("--logdir", default=None, help="TensorBoard event files go here")
    g.add_argument("--summary-json", default=None, help="write the final metrics as JSON here")
    g.add_argument("--device", default="cpu",
                   help="cpu or cuda (without --deepspeed_config; under DeepSpeed the engine decides)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the training forward (without --deepspeed_config; DeepSpeed "
                        "takes its \"bf16\" section)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS or all cores)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--comm-log", default=None,
                   help="expert parallelism: write every rank's per-layer byte counters (JSON) here")
    g.add_argument("--record-routing", default=None,
                   help="save the routing of the last 20 steps (torch file) for `trilemma-moe profile-comm`")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-dir", default=None,
                   help="checkpoint directory (DeepSpeed: engine.save_checkpoint layout; otherwise latest.pt)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    g.add_argument("--loss-log", default=None, help="append one JSON line per step (step, loss) to this file")
    return p


# ------------------------------------------------------------------------------------------
def _moe_config(args) -> TrilemmaMoEConfig:
    overrides = {field: getattr(args, flag) for flag, field in _FLAG_TO_FIELD.items()
                 if getattr(args, flag) is not None}
    if args.deepspeed_config:
        return TrilemmaMoEConfig.from_deepspeed_config(args.deepspeed_config, **overrides)
    if args.config:
        return TrilemmaMoEConfig.from_yaml(args.config, **overrides)
    merged = dict(CPU_MOE_DEFAULTS)
    merged.update(overrides)
    return TrilemmaMoEConfig.from_dict(merged)


def _load_data(args) -> TokenCorpus:
    if args.data is None:
        corpus = SyntheticTopicCorpus(seed=args.seed)
        if args.max_train_tokens is not None:
            corpus.train = corpus.train[:args.max_train_tokens]
        return corpus
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r}: no such directory (expected a WikiText "
                                f"directory with wiki.train.tokens, wiki.valid.tokens, "
                                f"wiki.test.tokens; leave --data out for the synthetic corpus)")
    return load_wikitext(args.data, max_train_tokens=args.max_train_tokens)


@contextlib.contextmanager
def _input_errors(flag: Optional[str], value: Any = None):
    """A bad file or directory given with ``flag`` (or a bad knob): one line on stderr and exit
    status 2, as argparse does for a bad flag, instead of a traceback. Only the phases that read
    the user's inputs are wrapped: an error in training itself keeps its traceback."""
    try:
        yield
    except (ValueError, OSError) as exc:
        msg = str(exc)
        if flag is not None and flag not in msg:
            msg = f"{flag}: {msg}" if str(value) in msg else f"{flag} {value}: {msg}"
        print(f"trilemma_moe.train: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``min_ratio*peak``.
    ``step`` counts from 0."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay matrices, not biases / norms / embeddings' positions; tied weights once."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "pos_emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int,
             max_batches: Optional[int] = None) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        device = next(model.parameters()).device
        for x, y in eval_batches(data, seq_len, batch_size, max_batches=max_batches or None):
            _, loss, _ = model(x.to(device), y.to(device))
            total_loss += float(loss) * y.numel()
            total_tokens += y.numel()
    finally:
        model.train(was_training)
    mean = total_loss / max(1, total_tokens)
    return {"valid_loss": mean, "valid_ppl": math.exp(min(mean, 50.0)), "valid_tokens": total_tokens}


def _moe_stats(model) -> Dict[str, float]:
    layers = model.moe_layers()
    if not layers:
        return {"load_cv": 0.0, "reclusters": 0}
    stats = [m.stats() for m in layers]
    out = {"load_cv": sum(float(s.get("load_cv", 0.0)) for s in stats) / len(stats),
           "reclusters": int(sum(int(s.get("reclusters", 0)) for s in stats))}
    for key in ("group_load_cv", "compression_ratio", "skipped_reclusters"):
        vals = [float(s[key]) for s in stats if key in s]
        if vals:
            out[key] = sum(vals) / len(vals) if key != "skipped_reclusters" else int(sum(vals))
    out["compressed"] = all(bool(s.get("compressed", False)) for s in stats) if any(
        "compressed" in s for s in stats) else False
    return out


class _Logger:
    def __init__(self, logdir: Optional[str]):
        self.writer = None
        if logdir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover
                raise ImportError("--logdir needs tensorboard: pip install tensorboard") from exc
            self.writer = SummaryWriter(log_dir=logdir)

    def scalars(self, step: int, values: Dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _format_table(rows: Sequence[tuple]) -> str:
    w = max(len(str(k)) for k, _ in rows)
    lines = ["-" * (w + 24)]
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        lines.append(f"{str(k):<{w}}  {v}")
    lines.append("-" * (w + 24))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, print the summary table and return the
    summary dict (also written to ``--summary-json``)."""
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.save_every < 0:
        raise SystemExit("--save-every must be >= 0")
    if (args.save_every or args.resume) and not args.save_dir:
        raise SystemExit("--save-every and --resume need --save-dir")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or (os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)  # main() is also called in-process (tests, notebooks)


def _run(args) -> Dict[str, Any]:
    config_flag = "--deepspeed_config" if args.deepspeed_config else "--config" if args.config else None
    with _input_errors(config_flag, args.deepspeed_config or args.config):  # None: knobs from flags only
        cfg = _moe_config(args)
    with _input_errors("--data", args.data):
        corpus = _load_data(args)
    use_ds = args.deepspeed_config is not None
    if cfg.ep_size > 1 and not use_ds:
        raise SystemExit(f"--ep-size {cfg.ep_size} needs --deepspeed_config (and the deepspeed launcher)")
    if use_ds:
        # Expert-parallel layers place their groups on ranks when built: the process group first.
        from .models.ffn import _ensure_single_process_dist
        _ensure_single_process_dist()
    model = _build_model(args, corpus, cfg)
    if not use_ds:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device is available")
        model.to(args.device)
    ga = cfg.gradient_accumulation_steps
    groups = _param_groups(model, args.weight_decay)
    engine = None
    if use_ds:
        engine, optimizer = _deepspeed_engine(args, model, groups, cfg)
        ga = engine.gradient_accumulation_steps()
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if use_ds:
        # Regroups rewrite parameters and Adam state through DeepSpeed (ZeRO partitions / masters).
        from .integrations.deepspeed import attach_engine
        attach_engine(engine)
    else:
        for m in model.moe_layers():
            if hasattr(m, "attach_optimizer"):
                m.attach_optimizer(optimizer)

    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    from .parallel.comm import named_comm_failure, set_collective_timeout
    if world > 1:   # DeepSpeed's own collectives (gradient reduction) wait comm_timeout_s too, not 30 min
        set_collective_timeout(cfg.comm_timeout_s)
    if use_ds:
        args.batch_size = engine.train_micro_batch_size_per_gpu()  # the DeepSpeed config decides
    # One global batch of batch_size x world windows per micro-step, rank r takes its share: the same
    # data as a one-process run with --batch-size batch_size x world (identical at world 1).
    sampler = _RankShare(BatchSampler(corpus.train, args.seq_len, args.batch_size * world, seed=args.seed + 1),
                         rank, args.batch_size)
    is_main = rank == 0
    logger = _Logger(args.logdir if is_main else None)
    start_step = 0
    if args.resume:
        with _input_errors("--resume", args.save_dir):
            start_step = _load_training_checkpoint(args, model, optimizer, engine, sampler)
        if is_main:
            print(f"resumed from {args.save_dir} at step {start_step}")

    if is_main:
        print(corpus.describe())
        pc = model.param_counts()
        print(f"model: d_model={args.d_model} d_ff={args.d_ff} layers={args.layers} "
              f"heads={args.heads} seq_len={args.seq_len} ffn={args.ffn} | params {pc['total']:,} "
              f"(experts {pc['expert']:,})")
        if args.ffn in ("ours", "static"):
            print(f"moe: E={cfg.num_experts} G={cfg.num_groups} r={cfg.rank} k={cfg.top_k} "
                  f"burn_in={cfg.burn_in} recluster_interval={cfg.recluster_interval} "
                  f"dynamic_regroup={cfg.dynamic_regroup and args.ffn != 'static'}")
        elif args.ffn != "dense":
            print(f"moe: E={cfg.num_experts} k={cfg.top_k} aux_loss_coef={cfg.aux_loss_coef} "
                  f"z_loss_coef={cfg.z_loss_coef} (dropless)")
        print(f"train: steps={args.steps} batch={args.batch_size}x{args.seq_len} ga={ga} "
              f"lr={args.lr:g} warmup={warmup} grad_clip={cfg.grad_clip} threads={torch.get_num_threads()}")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = None
    if tqdm is not None and is_main and not args.no_progress:
        bar = tqdm(total=args.steps, desc=f"train[{args.ffn}]", dynamic_ncols=True)

    def say(msg: str) -> None:
        if not is_main:
            return
        if bar is not None:
            bar.write(msg)
        else:
            print(msg)

    model.train()
    ema_loss, last_loss, last_eval = None, float("nan"), None
    cv_window: List[float] = []
    loss_window: List[float] = []
    st = _moe_stats(model)
    prev_reclusters, prev_skipped = st["reclusters"], st.get("skipped_reclusters", 0)
    train_time, tokens_seen = 0.0, 0
    step_times: List[float] = []
    history: List[Dict[str, float]] = []
    loss_curve: List[float] = []
    routing_logs = None
    if args.record_routing:
        routing_logs = []
        for layer in _clustered(model):
            layer.routing_log = []
            routing_logs.append(layer.routing_log)
    if bar is not None and start_step:
        bar.update(start_step)
    loss_log = open(args.loss_log, "a") if args.loss_log and is_main else None
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args.steps, args.lr, warmup, args.min_lr_ratio)
        if not (use_ds and engine.lr_scheduler is not None):
            for g in optimizer.param_groups:
                g["lr"] = lr
        step_loss, step_aux = 0.0, 0.0
        for _ in range(ga):
            x, y = next(sampler)
            if use_ds:
                x, y = x.to(engine.device), y.to(engine.device)
                with named_comm_failure(f"step {step + 1}: forward", cfg.comm_timeout_s):
                    _, loss, l_aux = engine(x, y)
                with named_comm_failure(f"step {step + 1}: backward (DeepSpeed gradient reduction)",
                                        cfg.comm_timeout_s):
                    engine.backward(loss + l_aux)
                with named_comm_failure(f"step {step + 1}: optimizer step", cfg.comm_timeout_s):
                    engine.step()
            else:
                x, y = x.to(args.device), y.to(args.device)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                    _, loss, l_aux = model(x, y)
                ((loss + l_aux) / ga).backward()
            with named_comm_failure(f"step {step + 1}: loss all-reduce", cfg.comm_timeout_s):
                step_loss += _global_mean(loss, world) / ga
                step_aux += _global_mean(l_aux, world) / ga
            tokens_seen += y.numel()
        grad_norm = float("nan")
        if not use_ds:
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        train_time += step_times[-1]

        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss became {step_loss} at step {step + 1}")
        last_loss = step_loss
        loss_curve.append(step_loss)
        if loss_log is not None:
            loss_log.write(json.dumps({"step": step + 1, "loss": step_loss}) + "\n")
            loss_log.flush()
        if args.save_dir and ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps):
            with named_comm_failure(f"step {step + 1}: checkpoint save", cfg.comm_timeout_s):
                _save_training_checkpoint(args, model, optimizer, engine, sampler, step + 1)
        loss_window = (loss_window + [step_loss])[-20:]
        ema_loss = step_loss if ema_loss is None else 0.95 * ema_loss + 0.05 * step_loss
        st = _moe_stats(model)
        cv_window = (cv_window + [st["load_cv"]])[-50:]
        if st["reclusters"] != prev_reclusters:
            extra = ""
            layers_stats = [m.stats() for m in model.moe_layers()]
            gains = [s.get("last_gain") for s in layers_stats if "last_gain" in s]
            errs = [s.get("reconstruction_error") for s in layers_stats if "reconstruction_error" in s]
            if gains:
                extra += f" gain={sum(gains) / len(gains):.4f}"
            if errs:
                extra += f" recon_err={sum(errs) / len(errs):.3f}"
            if "compression_ratio" in st:
                extra += f" compression={st['compression_ratio']:.2f}x"
            kind = "first clustering + compression" if prev_reclusters == 0 else "regroup"
            say(f"[step {step + 1}] {kind}: reclusters {prev_reclusters} -> {st['reclusters']}{extra} "
                f"| expert params now {model.param_counts()['expert']:,}")
            prev_reclusters = st["reclusters"]
        if st.get("skipped_reclusters", 0) != prev_skipped:
            gains = [m.stats().get("last_gain") for m in model.moe_layers()]
            gains = ", ".join(f"{g:.4f}" for g in gains if g is not None)
            say(f"[step {step + 1}] regroup skipped in {st['skipped_reclusters'] - prev_skipped} "
                f"layer(s): similarity gain < delta={cfg.delta} (last gain per layer: {gains})")
            prev_skipped = st.get("skipped_reclusters", 0)
        logger.scalars(step + 1, {"loss": step_loss, "l_aux": step_aux, "lr": lr,
                                  "grad_norm": grad_norm, **{k: v for k, v in st.items()
                                                             if not isinstance(v, bool)}}, "train")
        for i, cs in enumerate(_comm_stats(model)):   # expert parallelism: rank 0's byte counters
            logger.scalars(step + 1, cs, f"comm/layer{i}")
        if routing_logs is not None:
            for log in routing_logs:
                del log[:-20 * ga]
        if bar is not None:
            bar.set_postfix(loss=f"{ema_loss:.3f}", cv=f"{st['load_cv']:.2f}",
                            regroups=st["reclusters"], refresh=False)
            bar.update(1)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            last_eval = evaluate(model, corpus.valid, args.seq_len, args.batch_size, args.eval_batches)
            logger.scalars(step + 1, last_eval, "valid")
            history.append({"step": step + 1, "train_loss": ema_loss, **last_eval})
            say(f"[step {step + 1}] train loss {ema_loss:.4f} | valid loss {last_eval['valid_loss']:.4f} "
                f"ppl {last_eval['valid_ppl']:.2f} | load cv {st['load_cv']:.3f}")
    if bar is not None:
        bar.close()
    if loss_log is not None:
        loss_log.close()

    last_eval = evaluate(model, corpus.valid, args.seq_len, args.batch_size, args.eval_batches)
    logger.scalars(args.steps, last_eval, "valid")
    history.append({"step": args.steps, "train_loss": ema_loss, **last_eval})
    st = _moe_stats(model)
    pc = model.param_counts()
    summary: Dict[str, Any] = {
        "ffn": args.ffn,
        "steps": args.steps,
        "data": corpus.name,
        "final_train_loss": sum(loss_window) / len(loss_window),  # mean of the last 20 steps
        "last_step_train_loss": float(last_loss),
        "valid_loss": last_eval["valid_loss"],
        "valid_ppl": last_eval["valid_ppl"],
        "total_params": pc["total"],
        "expert_params": pc["expert"],
        "tokens_per_s": tokens_seen / max(train_time, 1e-9),
        "train_time_s": train_time,
        # the second half of the run: no compilation, autotuning or first clustering in it
        "tokens_per_s_second_half": (tokens_seen / args.steps) * (args.steps - args.steps // 2)
        / max(sum(step_times[args.steps // 2:]), 1e-9),
        "load_cv": sum(cv_window) / max(1, len(cv_window)),
        "load_cv_last": st["load_cv"],
        "reclusters": st["reclusters"],
        "config": {**cfg.to_dict(), "d_model": args.d_model, "d_ff": args.d_ff, "layers": args.layers,
                   "heads": args.heads, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "lr": args.lr, "seed": args.seed, "deepspeed": use_ds},
        "history": history,
        "loss_curve": loss_curve,   # every optimizer step's training loss (global batch)
    }
    for key in ("group_load_cv", "compression_ratio", "skipped_reclusters", "compressed"):
        if key in st:
            summary[key] = st[key]
    mem_layers = [m for m in model.moe_layers() if hasattr(m, "memory_report")]
    if mem_layers:
        reports = [m.memory_report() for m in mem_layers]
        summary["memory_bytes"] = {k: sum(r[k] for r in reports) for k in reports[0]}
        if cfg.offload_idle_steps is not None:
            summary["offload"] = _offload_summary([m.offload_stats() for m in mem_layers])
    comm = _comm_stats(model)
    if comm:
        summary["comm"] = comm
        summary["ep_size"] = cfg.ep_size
        if args.comm_log:
            _write_comm_log(args.comm_log, comm, rank, world)
    if args.record_routing and is_main:
        _save_routing(args.record_routing, model, cfg, args.d_model)
    logger.scalars(args.steps, {"tokens_per_s": summary["tokens_per_s"]}, "final")
    logger.close()

    if is_main:
        rows = [("ffn", args.ffn), ("data", corpus.name), ("steps", args.steps),
                ("train loss (last 20 steps)", summary["final_train_loss"]),
                ("valid loss", summary["valid_loss"]), ("valid ppl", summary["valid_ppl"]),
                ("total params", summary["total_params"]), ("expert params", summary["expert_params"]),
                ("tokens/s", summary["tokens_per_s"]), ("train time (s)", summary["train_time_s"]),
                ("load CV (last 50 steps)", summary["load_cv"]), ("reclusters", summary["reclusters"])]
        for key in ("compression_ratio", "group_load_cv", "skipped_reclusters"):
            if key in summary:
                rows.append((key.replace("_", " "), summary[key]))
        print(_format_table(rows))
        if args.summary_json:
            d = os.path.dirname(os.path.abspath(args.summary_json))
            os.makedirs(d, exist_ok=True)
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
            print(f"summary written to {args.summary_json}")
    return summary


def _build_model(args, corpus, cfg: TrilemmaMoEConfig) -> GPT:
    torch.manual_seed(args.seed)
    return GPT(corpus.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
               seq_len=args.seq_len, d_ff=args.d_ff, ffn_kind=args.ffn, moe_config=cfg,
               seed=args.seed, moe_every=args.moe_every)


class _RankShare:
    """Rows ``[rank*B, (rank+1)*B)`` of every global batch."""

    def __init__(self, sampler: BatchSampler, rank: int, batch_size: int):
        self.sampler, self.lo, self.hi = sampler, rank * batch_size, (rank + 1) * batch_size

    @property
    def generator(self) -> torch.Generator:   # checkpoints save and restore the data position
        return self.sampler.generator

    def __next__(self):
        x, y = next(self.sampler)
        return x[self.lo:self.hi], y[self.lo:self.hi]


def _global_mean(value: torch.Tensor, world: int) -> float:
    """The loss of the global batch (mean over ranks of equal-sized shares) for reporting."""
    v = value.detach().float().reshape(1).cpu().clone()
    if world > 1:
        torch.distributed.all_reduce(v)
        v /= world
    return float(v)


def _clustered(model) -> List[Any]:
    from .core.layer import ClusteredMoE
    return [m for m in model.modules() if isinstance(m, ClusteredMoE)]


def _comm_stats(model) -> List[Dict[str, float]]:
    return [s for s in (m.comm_stats() for m in _clustered(model)) if s]


def _write_comm_log(path: str, comm: List[Dict[str, float]], rank: int, world: int) -> None:
    """Every rank's counters in one JSON file (gathered to rank 0)."""
    everyone: List[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, comm)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"ranks": [{"rank": r, "layers": c} for r, c in enumerate(everyone)]}, f, indent=1)


def _save_routing(path: str, model, cfg: TrilemmaMoEConfig, d_model: int) -> None:
    layers = []
    for m in _clustered(model):
        if m.routing_log:
            layers.append({"group_idx": torch.cat([g for g, _ in m.routing_log]),
                           "expert_idx": torch.cat([e for _, e in m.routing_log])})
        m.routing_log = None
    torch.save({"num_experts": cfg.num_experts, "num_groups": cfg.num_groups, "top_k": cfg.top_k,
                "group_top_k": cfg.group_top_k, "hidden_size": d_model, "layers": layers}, path)
    print(f"routing of {len(layers)} layer(s) written to {path} (trilemma-moe profile-comm --routing {path})")


def _offload_summary(stats: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Offload counters summed over layers; peak resident bytes is the sum of per-layer peaks."""
    out = {k: sum(s.get(k, 0) for s in stats) for k in ("accesses", "hits", "misses", "prefetch_hits", "offloads",
                                                         "prefetches", "bytes_written", "bytes_read", "stall_s",
                                                         "peak_resident_bytes", "mean_resident_bytes",
                                                         "write_failures")}
    out["steps"] = max(s.get("steps", 0) for s in stats)
    out["hit_rate"] = out["hits"] / out["accesses"] if out["accesses"] else None
    out["stall_s_per_step"] = out["stall_s"] / max(1, out["steps"])
    out["tier"] = stats[0].get("tier")
    return out


def _save_training_checkpoint(args, model, optimizer, engine, sampler, step: int) -> None:
    """Everything a resume needs: weights (layer state included), optimizer, step, data position.
    Writes are atomic (a kill mid-save leaves the previous checkpoint in place)."""
    client = {"step": step, "sampler_state": sampler.generator.get_state()}
    if engine is not None:
        from .integrations.checkpoint import save_checkpoint
        save_checkpoint(engine, args.save_dir, tag=f"step{step}", client_state=client)
        return
    from .core.checkpoint import atomic_save
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **client},
                os.path.join(args.save_dir, "latest.pt"))


def _load_training_checkpoint(args, model, optimizer, engine, sampler) -> int:
    if engine is not None:
        # Ours checks 'latest' (empty, binary, naming a missing folder) and names it; DeepSpeed's does not.
        from .integrations.checkpoint import load_checkpoint
        path, client = load_checkpoint(engine, args.save_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {args.save_dir}")
    else:
        from .core.checkpoint import safe_load
        client = safe_load(os.path.join(args.save_dir, "latest.pt"))
        model.load_state_dict(client["model"])
        optimizer.load_state_dict(client["optimizer"])
    sampler.generator.set_state(client["sampler_state"])
    return int(client["step"])


def _deepspeed_engine(args, model, groups, cfg: TrilemmaMoEConfig):
    try:
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    except ImportError as exc:
        raise ImportError("--deepspeed_config needs DeepSpeed: pip install 'trilemma_moe[deepspeed]'") from exc
    with open(args.deepspeed_config) as f:
        ds_config = json.load(f)
    ds_config = {k: v for k, v in ds_config.items() if k != "trilemma_moe"}  # ours, not DeepSpeed's
    ds_config.setdefault("train_micro_batch_size_per_gpu", args.batch_size)
    ds_config.setdefault("gradient_accumulation_steps", cfg.gradient_accumulation_steps)
    ds_config.setdefault("gradient_clipping", cfg.grad_clip)
    from .models.ffn import _ensure_single_process_dist

    _ensure_single_process_dist()  # world-1 defaults when not started by the deepspeed launcher
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                   optimizer=optimizer, config=ds_config)
    return engine, optimizer


if __name__ == "__main__":
    from trilemma_moe.parallel.topology import leave_process_group

    main()
    leave_process_group()
