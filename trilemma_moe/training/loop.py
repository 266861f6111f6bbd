"""The training loop shared by every backend: build the model, draw the batches, schedule the
learning rate, step, evaluate, checkpoint, report (``report.py``). What differs between plain
torch and DeepSpeed lives in the backends (``backend.py``, ``deepspeed_backend.py``)."""
from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, Optional

import torch

from ..config import TrilemmaMoEConfig
from ..core.layer import clustered_layers
from ..data import (BatchSampler, RowSampler, SentenceDataset, ShiftSampler, TokenCorpus, eval_batches,
                    num_eval_batches, sentence_batches)
from ..models import GPT, GPTClassifier
from . import report
from .measure import PeakMemory, RunTrace, ShiftTrack
from ..parallel.comm import named_comm_failure, set_collective_timeout
from .errors import input_errors, usage_error
from .backend import Backend, TorchBackend, param_groups


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``min_ratio*peak``.
    ``step`` counts from 0."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _progress(**kwargs):
    """A tqdm bar, or None when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(dynamic_ncols=True, **kwargs)


def _eval_passes(model, batches, total: int, progress: bool, desc: str):
    """``model`` in eval mode over ``batches`` (a tqdm bar of ``total`` with ``progress``);
    yields ``(output, loss, y)`` per batch, and restores the training mode at the end."""
    was_training = model.training
    model.eval()
    bar = _progress(total=total, desc=desc, leave=False) if progress else None
    try:
        device = next(model.parameters()).device
        for x, y in batches:
            out, loss, _ = model(x.to(device), y.to(device))
            yield out, loss, y
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int,
             max_batches: Optional[int] = None, progress: bool = False,
             desc: str = "valid") -> Dict[str, float]:
    """Mean loss and perplexity over ``data`` (non-overlapping windows, at most ``max_batches``
    batches; 0 or None: all). ``progress``: a tqdm bar over the batches."""
    total_loss, total_tokens = 0.0, 0
    batches = eval_batches(data, seq_len, batch_size, max_batches=max_batches or None)
    total = num_eval_batches(data, seq_len, batch_size, max_batches or None)
    for _, loss, y in _eval_passes(model, batches, total, progress, desc):
        total_loss += float(loss) * y.numel()
        total_tokens += y.numel()
    mean = total_loss / max(1, total_tokens)
    return {"valid_loss": mean, "valid_ppl": math.exp(min(mean, 50.0)), "valid_tokens": total_tokens}


@torch.no_grad()
def evaluate_classifier(model, data: SentenceDataset, batch_size: int, max_batches: Optional[int] = None,
                        progress: bool = False, desc: str = "dev") -> Dict[str, float]:
    """Accuracy and mean cross-entropy over the dev rows (at most ``max_batches`` batches; 0 or
    None: all)."""
    loss_sum, correct, n = 0.0, 0, 0
    total = -(-len(data.dev_y) // batch_size)
    batches = sentence_batches(data.dev_x, data.dev_y, batch_size, data.pad_id, max_batches or None)
    for logits, loss, y in _eval_passes(model, batches, min(total, max_batches or total), progress, desc):
        loss_sum += float(loss) * len(y)
        correct += int((logits.argmax(dim=-1).cpu() == y).sum())
        n += len(y)
    return {"dev_loss": loss_sum / max(1, n), "dev_accuracy": correct / max(1, n), "dev_examples": n}


class RankShare:
    """Rows ``[rank*B, (rank+1)*B)`` of every global batch."""

    def __init__(self, sampler: BatchSampler, rank: int, batch_size: int):
        self.sampler, self.lo, self.hi = sampler, rank * batch_size, (rank + 1) * batch_size

    @property
    def generator(self) -> torch.Generator:   # checkpoints save and restore the data position
        return self.sampler.generator

    def set_step(self, step: int) -> None:   # a shift's schedule (ShiftSampler) follows the step
        if isinstance(self.sampler, ShiftSampler):
            self.sampler.set_step(step)

    def __next__(self):
        x, y = next(self.sampler)
        return x[self.lo:self.hi], y[self.lo:self.hi]


def global_mean(value: torch.Tensor, world: int) -> float:
    """The loss of the global batch (mean over ranks of equal-sized shares) for reporting."""
    v = value.detach().float().reshape(1).cpu().clone()
    if world > 1:
        torch.distributed.all_reduce(v)
        v /= world
    return float(v)


def build_model(args, corpus: TokenCorpus | SentenceDataset, cfg: TrilemmaMoEConfig) -> GPT:
    torch.manual_seed(args.seed)
    kwargs = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "seq_len": args.seq_len,
              "d_ff": args.d_ff, "ffn_kind": args.ffn, "moe_config": cfg, "seed": args.seed,
              "moe_every": args.moe_every}
    if isinstance(corpus, SentenceDataset):
        return GPTClassifier(corpus.vocab_size, num_classes=corpus.num_classes, pad_id=corpus.pad_id, **kwargs)
    return GPT(corpus.vocab_size, **kwargs)


def make_sampler(args, corpus: TokenCorpus | SentenceDataset, global_batch: int,
                 shift_corpus: Optional[TokenCorpus] = None):
    if isinstance(corpus, SentenceDataset):
        return RowSampler(corpus.train_x, corpus.train_y, global_batch, seed=args.seed + 1, pad_id=corpus.pad_id)
    first = BatchSampler(corpus.train, args.seq_len, global_batch, seed=args.seed + 1)
    if shift_corpus is None:
        return first
    return ShiftSampler(first, BatchSampler(shift_corpus.train, args.seq_len, global_batch, seed=args.seed + 2),
                        args.shift_step, args.shift_ramp)


def make_backend(args, cfg: TrilemmaMoEConfig) -> Backend:
    if args.deepspeed_config is not None:
        from .deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(args.deepspeed_config, cfg, args.lr, args.batch_size)
    return TorchBackend(cfg, args.device, args.dtype, args.lr, args.batch_size)


def check_world(cfg: TrilemmaMoEConfig) -> None:
    """Expert parallelism spreads each layer's groups over ``ep_size`` ranks: the world, known once
    the backend started its process group, must be a multiple of it."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world % cfg.ep_size:
        usage_error(f"--ep-size {cfg.ep_size} (or the config's ep_size) must divide the number of ranks, {world}: "
                    f"start the run with the deepspeed launcher on a multiple of {cfg.ep_size} ranks")


def run(args, cfg: TrilemmaMoEConfig, corpus: TokenCorpus | SentenceDataset,
        task_defaults: Optional[Dict[str, Any]] = None, shift_corpus: Optional[TokenCorpus] = None) -> Dict[str, Any]:
    """``shift_corpus``: trained on after ``args.shift_step`` (``args.shift_ramp``), scored at every
    evaluation beside ``corpus`` (keys ``shift_valid_*``)."""
    backend = make_backend(args, cfg)
    backend.prepare()
    check_world(cfg)
    memory = PeakMemory() if args.measure_memory else None   # before the model exists
    model = build_model(args, corpus, cfg)
    backend.setup(model, param_groups(model, args.weight_decay))
    if memory is not None:
        memory.watch(backend.device)
    ga, batch = backend.grad_accum, backend.micro_batch_size
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:   # DeepSpeed's own collectives (gradient reduction) wait comm_timeout_s too, not 30 min
        set_collective_timeout(cfg.comm_timeout_s)
    # One global batch of batch x world windows per micro-step, rank r takes its share: the same
    # data as a one-process run with --batch-size batch x world (identical at world 1).
    sampler = RankShare(make_sampler(args, corpus, batch * world, shift_corpus), rank, batch)
    shift = ShiftTrack(args.shift_step) if shift_corpus is not None else None
    is_main = rank == 0
    show_progress = is_main and not args.no_progress
    logger = report.Logger(args.logdir if is_main else None)
    start_step = 0
    if args.resume:
        with input_errors("--resume", args.save_dir):
            client = backend.load(args.save_dir)
            sampler.generator.set_state(client["sampler_state"])
            start_step = int(client["step"])
            if shift is not None:   # the second corpus's data position and the shift's running sums
                if "shift" not in client:
                    raise ValueError("the checkpoint has no shift state (saved by a run without --shift-step)")
                sampler.sampler.second.generator.set_state(client["shift"]["sampler_state"])
                shift.load_state(client["shift"]["track"])
        if is_main:
            print(f"resumed from {args.save_dir} at step {start_step}")

    pc_start = model.param_counts()
    if is_main:
        print("\n".join(report.start_lines(args, cfg, corpus, pc_start, backend, warmup, task_defaults or {})))
        if shift_corpus is not None:   # both corpora share the vocabulary built from both training splits
            print(f"shift after step {args.shift_step} (ramp {args.shift_ramp} steps) to {shift_corpus.describe()}")
    bar = _progress(total=args.steps, desc=f"train[{args.ffn}]") if show_progress else None

    def say(msg: str) -> None:
        if not is_main:
            return
        if bar is not None:
            bar.write(msg)
        else:
            print(msg)

    def validate(desc: str, cap: Optional[int] = args.eval_batches) -> Dict[str, float]:
        if isinstance(corpus, SentenceDataset):
            return evaluate_classifier(model, corpus, batch, cap, progress=show_progress,
                                       desc=desc.replace("valid", "dev"))
        out = evaluate(model, corpus.valid, args.seq_len, batch, cap, progress=show_progress, desc=desc)
        if shift_corpus is not None:
            second = evaluate(model, shift_corpus.valid, args.seq_len, batch, cap, progress=show_progress,
                              desc=desc.replace("valid", "shift valid"))
            out.update({f"shift_{k}": v for k, v in second.items()})
        return out

    model.train()
    rec = report.Record()
    num_layers = len(clustered_layers(model))
    events = report.ClusteringEvents(report.moe_stats(report.layer_stats(model)), num_layers, cfg.delta,
                                     cfg.burn_in_form)
    routing_logs = report.start_routing_log(model) if args.record_routing else None
    trace = RunTrace(model, every=args.trace_every or max(1, args.steps // 100))
    if bar is not None and start_step:
        bar.update(start_step)
    loss_log = open(args.loss_log, "a") if args.loss_log and is_main else None
    final_cap = args.eval_batches if args.final_eval_batches is None else args.final_eval_batches
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args.steps, args.lr, warmup, args.min_lr_ratio)
        backend.set_lr(lr)
        step_loss, step_aux, tokens = 0.0, 0.0, 0
        sampler.set_step(step + 1)
        for _ in range(ga):
            x, y = next(sampler)
            loss, l_aux = backend.forward_backward(x, y, step + 1)
            with named_comm_failure(f"step {step + 1}: loss all-reduce", cfg.comm_timeout_s):
                step_loss += global_mean(loss, world) / ga
                step_aux += global_mean(l_aux, world) / ga
            tokens += corpus.tokens_in(x)   # lm: every window position; sst2: the non-pad tokens
        grad_norm = backend.optimizer_step()
        seconds = time.perf_counter() - t0

        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss became {step_loss} at step {step + 1}")
        if loss_log is not None:
            loss_log.write(json.dumps({"step": step + 1, "loss": step_loss}) + "\n")
            loss_log.flush()
        stats = report.layer_stats(model)
        st = report.moe_stats(stats)
        rec.add(step_loss, seconds, tokens, st["load_cv"])
        if shift is not None:
            shift.after_step(step + 1, step_loss, st["load_cv"])
        trace.after_step(step + 1)
        for line in events.lines(step + 1, st, stats, lambda: model.param_counts()["expert"]):
            say(line)
        logger.scalars(step + 1, {"loss": step_loss, "l_aux": step_aux, "lr": lr,
                                  "grad_norm": grad_norm, **{k: v for k, v in st.items()
                                                             if not isinstance(v, bool)}}, "train")
        for i, cs in enumerate(report.comm_stats(model)):   # expert parallelism: rank 0's byte counters
            logger.scalars(step + 1, cs, f"comm/layer{i}")
        if routing_logs is not None:
            for log in routing_logs:
                del log[:-20 * ga]
        if bar is not None:
            bar.set_postfix(report.bar_postfix(rec.ema_loss, st, num_layers), refresh=False)
            bar.update(1)
        at_shift = shift is not None and step + 1 == args.shift_step   # pre_shift_valid_ppl
        if (at_shift or args.eval_every and (step + 1) % args.eval_every == 0) and step + 1 < args.steps:
            # at the shift, as many batches as at the end: pre- and post-shift perplexities compare
            last_eval = validate(f"valid[step {step + 1}]", final_cap if at_shift else args.eval_batches)
            if at_shift:
                shift.pre_shift(last_eval)
            logger.scalars(step + 1, last_eval, "valid")
            rec.history.append({"step": step + 1, "train_loss": rec.ema_loss, **last_eval})
            say(f"[step {step + 1}] train loss {rec.ema_loss:.4f} | {report.eval_text(last_eval)} "
                f"| load cv {st['load_cv']:.3f}")
        # last: the state saved holds this step's loss and evaluation (a shift's running sums)
        if args.save_dir and ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps):
            with named_comm_failure(f"step {step + 1}: checkpoint save", cfg.comm_timeout_s):
                client = {"step": step + 1, "sampler_state": sampler.generator.get_state()}
                if shift is not None:
                    client["shift"] = {"sampler_state": sampler.sampler.second.generator.get_state(),
                                       "track": shift.state()}
                backend.save(args.save_dir, step + 1, client)
    if bar is not None:
        bar.close()
    if memory is not None:   # training's peak, before the final evaluation
        memory.training_done()
    if loss_log is not None:
        loss_log.close()

    last_eval = validate("valid" if final_cap else "valid (whole split)", final_cap)
    logger.scalars(args.steps, last_eval, "valid")
    rec.history.append({"step": args.steps, "train_loss": rec.ema_loss, **last_eval})
    st = report.moe_stats(report.layer_stats(model))
    summary = report.summary(args, cfg, corpus, rec, last_eval, st, pc_start, model.param_counts(), batch,
                             deepspeed=args.deepspeed_config is not None)
    summary.update(report.memory_and_offload(model, cfg))
    summary.update(trace.summary())
    if memory is not None:
        summary.update(memory.result())
    if shift is not None:
        summary.update(shift.summary(last_eval, shift_corpus.name, args.shift_ramp))
    if args.test:
        test = evaluate(model, corpus.test, args.seq_len, batch, final_cap,
                        progress=show_progress, desc="test")
        summary.update(test_loss=test["valid_loss"], test_ppl=test["valid_ppl"], test_tokens=test["valid_tokens"])
    comm = report.comm_stats(model)
    if comm:
        summary["comm"] = comm
        summary["ep_size"] = cfg.ep_size
        if args.comm_log:
            report.write_comm_log(args.comm_log, comm, rank, world)
    if args.record_routing and is_main:
        report.save_routing(args.record_routing, model, cfg, args.d_model)
    logger.scalars(args.steps, {"tokens_per_s": summary["tokens_per_s"]}, "final")
    logger.close()

    if is_main:
        print(report.table(summary, num_layers))
        if args.summary_json:
            report.write_summary_json(args.summary_json, summary)
            print(f"summary written to {args.summary_json}")
    return summary
