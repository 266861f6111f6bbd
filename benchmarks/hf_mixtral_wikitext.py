"""A Hugging Face Mixtral trained from scratch on WikiText-2, then converted to our layer
(``trilemma_moe.integrations.hf.convert_moe_blocks``) and fine-tuned, beside the same model
fine-tuned unconverted (plain transformers) and under DeepSpeed AutoEP.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/hf_mixtral_wikitext.py \
        --data /work/shared/data/wikitext-2 --out docs/results/hf_mixtral_wikitext.json

What runs (every arm in a fresh process, one after the other, one torch thread each):

1. ``pretrain``: MixtralForCausalLM (shape: --layers/--hidden/--ffn/--experts/--top-k/--heads) from
   its own init, plain torch AdamW, Mixtral's load-balancing loss (``router_aux_loss_coef``),
   ``--pretrain-steps`` steps of ``--batch`` x ``--seq-len`` random train windows. Cached under
   ``--cache`` (keyed on everything that shapes it): a rerun skips it.
2. ``evals``: valid perplexity of the pretrained model, of the model right after conversion at
   ``--rank`` (compression + our routing) and at full rank (min(hidden, ffn): exact experts, so
   the change is our routing alone), each conversion on a fresh copy of the pretrained weights.
3. fine-tuning, ``--ft-steps`` steps at the same lr schedule, batch and data order per seed
   (``BatchSampler`` seeded 1000 + seed) for every arm: ``hf`` (unconverted, Mixtral's aux
   loss), ``ours`` (converted at --rank, our balance + z losses through the model's output hook,
   Mixtral's aux loss off), ``autoep`` (``deepspeed.initialize`` with ``expert_parallel``
   enabled, autoep_size 1; DeepSpeed 0.19's AutoEP needs transformers <= 5.22, the version pinned).
   Gradient clipping 1.0 in all arms. Then valid perplexity.

Valid perplexity: the whole valid split in non-overlapping ``--seq-len`` windows
(``eval_batches``), cross-entropy from the logits only (no auxiliary loss). Vocabulary: the
loader's word vocabulary (``<eos>`` 0, then by train frequency) capped at ``--vocab`` ids, the
rarer words mapped to ``<unk>`` (perplexities are over this capped vocabulary: not comparable to
published WikiText-2 numbers). Memory: ``PeakMemory`` of ``trilemma_moe.training.measure``
(``ru_maxrss`` of the arm's own process up to the last optimizer step, everything the process
holds: interpreter, torch, the corpus) and, beside it, the bytes of the parameter, gradient and
optimizer-state tensors counted after the last step.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from trilemma_moe.data import BatchSampler, eval_batches, load_wikitext, num_eval_batches  # noqa: E402
from trilemma_moe.training.measure import PeakMemory, current_rss_bytes  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# --- shared pieces ---------------------------------------------------------------------------------
def mixtral_config(args):
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_local_experts=args.experts,
                         num_experts_per_tok=args.top_k, max_position_embeddings=args.seq_len,
                         router_jitter_noise=0.0, router_aux_loss_coef=args.router_aux_coef,
                         output_router_logits=False, tie_word_embeddings=False)


def build_model(args, seed: int):
    from transformers import MixtralForCausalLM
    torch.manual_seed(seed)
    return MixtralForCausalLM(mixtral_config(args))


def load_corpus(args):
    """The loader's word-level WikiText, ids >= --vocab mapped to <unk> (the vocabulary is sorted by
    train frequency, so this keeps the --vocab most frequent words, <eos> and <unk> among them)."""
    corpus = load_wikitext(args.data)
    unk = corpus.stoi["<unk>"]
    if unk >= args.vocab:
        raise ValueError(f"<unk> has id {unk} >= --vocab {args.vocab}")
    cap = lambda t: torch.where(t < args.vocab, t, torch.full_like(t, unk))  # noqa: E731
    info = {"loader_vocab": len(corpus.vocab), "vocab": args.vocab, "unk_id": unk,
            "train_tokens": corpus.train.numel(), "valid_tokens": corpus.valid.numel(),
            "train_oov_fraction_mapped_to_unk": float((corpus.train >= args.vocab).float().mean()),
            "valid_unk_fraction_after_cap": float((cap(corpus.valid) == unk).float().mean())}
    return cap(corpus.train), cap(corpus.valid), info


def cache_path(args) -> str:
    keys = ("vocab", "hidden", "ffn", "layers", "heads", "experts", "top_k", "seq_len", "batch", "pretrain_steps",
            "pretrain_lr", "router_aux_coef", "pretrain_seed")
    tag = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return os.path.join(args.cache, f"mixtral_pretrain_{hashlib.sha1(tag.encode()).hexdigest()[:12]}.pt")


def lr_at(step: int, peak: float, warmup: int, total: Optional[int], floor: float = 0.1) -> float:
    """Linear warmup, then cosine to floor * peak over ``total`` steps (None: constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, valid: torch.Tensor, args, desc: str = "valid") -> Dict[str, float]:
    from tqdm import tqdm
    was = model.training
    model.eval()
    total, count, start = 0.0, 0, time.perf_counter()
    n = num_eval_batches(valid, args.seq_len, args.eval_batch, args.eval_batches or None)
    for x, y in tqdm(eval_batches(valid, args.seq_len, args.eval_batch, args.eval_batches or None), total=n,
                     desc=desc, mininterval=10):
        logits = model(input_ids=x).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was)
    mean = total / count
    return {"valid_loss": mean, "valid_ppl": math.exp(mean), "valid_tokens": count,
            "eval_seconds": time.perf_counter() - start}


def expert_parameters(model) -> int:
    from trilemma_moe.integrations.hf import ClusteredMoEBlock
    n = 0
    for m in model.modules():
        if isinstance(m, ClusteredMoEBlock):
            n += m.moe.expert_parameter_count()
        elif type(m).__name__ in ("MixtralExperts", "GroupedExperts"):
            n += sum(p.numel() for p in m.parameters())
    return n


def state_bytes(model, optimizer) -> Dict[str, int]:
    params = list(model.parameters())
    out = {"parameter_bytes": sum(p.numel() * p.element_size() for p in params),
           "gradient_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)}
    opt = getattr(optimizer, "optimizer", optimizer)
    out["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                       if torch.is_tensor(v))
    return out


def expert_diversity(model, init_state: Optional[Dict[str, torch.Tensor]] = None) -> List[Dict[str, float]]:
    """Per layer: mean pairwise cosine of the experts' flattened weights, and (given the init) the
    relative change from init and the mean pairwise cosine of the experts' updates W_T - W_0."""
    out = []
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        w = torch.cat([ex.gate_up_proj.detach().flatten(1), ex.down_proj.detach().flatten(1)], 1).double()
        E = w.shape[0]
        off = ~torch.eye(E, dtype=torch.bool)
        cos = lambda a: (F.normalize(a, dim=1) @ F.normalize(a, dim=1).t())[off].mean().item()  # noqa: E731
        row = {"layer": i, "mean_pairwise_cosine_weights": cos(w)}
        if init_state is not None:
            p = f"model.layers.{i}.mlp.experts."
            w0 = torch.cat([init_state[p + "gate_up_proj"].flatten(1), init_state[p + "down_proj"].flatten(1)], 1).double()
            row["relative_change_from_init"] = ((w - w0).norm() / w0.norm()).item()
            row["mean_pairwise_cosine_updates"] = cos(w - w0)
        out.append(row)
    return out


@torch.no_grad()
def routing_load(model, valid: torch.Tensor, args, batches: int = 8) -> List[List[float]]:
    """Fraction of top-k assignments per expert, per layer, over the first valid windows (HF router)."""
    model.eval()
    counts = None
    for x, _ in eval_batches(valid, args.seq_len, args.eval_batch, batches):
        logits = model(input_ids=x, output_router_logits=True).router_logits
        c = torch.stack([torch.bincount(l.topk(args.top_k, -1).indices.flatten(), minlength=args.experts)
                         for l in logits]).double()
        counts = c if counts is None else counts + c
    return (counts / counts.sum(1, keepdim=True)).tolist()


# --- workers (each in its own process) -------------------------------------------------------------
def worker_pretrain(args) -> Dict[str, Any]:
    from tqdm import tqdm
    train, valid, info = load_corpus(args)
    memory = PeakMemory()
    model = build_model(args, args.pretrain_seed)
    init = {k: v.detach().clone() for k, v in model.state_dict().items() if ".experts." in k}
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)
    sampler = BatchSampler(train, args.seq_len, args.batch, seed=args.pretrain_seed)
    model.train()
    log, start = [], time.perf_counter()
    bar = tqdm(range(args.pretrain_steps), desc="pretrain", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.pretrain_lr, args.warmup, args.pretrain_steps)
        x, y = (t.contiguous() for t in sampler.next())
        out = model(input_ids=x, labels=y, shift_labels=y, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.pretrain_steps - 1:
            log.append({"step": step, "loss": float(out.loss.detach()), "aux_loss": float(out.aux_loss.detach())})
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}")
    seconds = time.perf_counter() - start
    memory.training_done()
    meta = {"steps": args.pretrain_steps, "seconds": seconds,
            "tokens_per_s": args.pretrain_steps * args.batch * args.seq_len / seconds,
            "train_log": log, "memory": memory.result(), "expert_diversity": expert_diversity(model, init),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "corpus": info}
    os.makedirs(args.cache, exist_ok=True)
    path = cache_path(args)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return meta


def load_pretrained(args):
    blob = torch.load(cache_path(args), map_location="cpu", weights_only=False)
    model = build_model(args, args.pretrain_seed)
    model.load_state_dict(blob["state_dict"])
    return model


def worker_evals(args) -> Dict[str, Any]:
    from trilemma_moe.integrations.hf import convert_moe_blocks
    _, valid, info = load_corpus(args)
    out: Dict[str, Any] = {"corpus": info}
    model = load_pretrained(args)
    out["pretrained"] = {**evaluate(model, valid, args, "valid pretrained"), "expert_parameters": expert_parameters(model),
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "routing_load_first_batches": routing_load(model, valid, args),
                         "expert_diversity": expert_diversity(model)}
    del model
    full = min(args.hidden, args.ffn)
    for name, rank in ((f"converted_rank{args.rank}", args.rank), (f"converted_full_rank{full}", full)):
        model = load_pretrained(args)
        start = time.perf_counter()
        reports = convert_moe_blocks(model, num_groups=args.num_groups, rank=rank)
        seconds = time.perf_counter() - start
        out[name] = {**evaluate(model, valid, args, f"valid {name}"), "rank": rank, "num_groups": args.num_groups,
                     "conversion_seconds": seconds, "reports": reports, "expert_parameters": expert_parameters(model),
                     "parameters": sum(p.numel() for p in model.parameters())}
        del model
    return out


def worker_finetune(args) -> Dict[str, Any]:
    from tqdm import tqdm
    arm, seed = args.arm, args.seed
    train, valid, info = load_corpus(args)
    memory = PeakMemory()
    model = load_pretrained(args)
    result: Dict[str, Any] = {"arm": arm, "seed": seed}
    if arm == "ours":
        from trilemma_moe.integrations.hf import ClusteredMoEBlock, attach_optimizer, convert_moe_blocks
        result["conversion_reports"] = convert_moe_blocks(model, num_groups=args.num_groups, rank=args.rank)
        result.update(rank=args.rank, num_groups=args.num_groups)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    engine = None
    if arm == "ours":
        attach_optimizer(model, opt)   # the optimizer's steps are the layers' steps
    elif arm == "autoep":
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(29600 + seed))):
            os.environ.setdefault(k, v)
        import deepspeed
        ds_config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                     "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
                     "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": "mixtral"}}
        result["deepspeed_config"] = ds_config
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        result["replaced_block"] = type(engine.module.model.layers[0].mlp).__name__
    result.update(expert_parameters=expert_parameters(model), parameters=sum(p.numel() for p in model.parameters()))
    sampler = BatchSampler(train, args.seq_len, args.batch, seed=1000 + seed)
    runner = engine if engine is not None else model
    runner.train()
    log, timed_start, warm = [], None, min(5, args.ft_steps - 1)
    start = time.perf_counter()
    bar = tqdm(range(args.ft_steps), desc=f"finetune {arm} seed {seed}", mininterval=10)
    for step in bar:
        if step == warm:
            timed_start = time.perf_counter()
        lr = lr_at(step, args.ft_lr, args.ft_warmup, None)
        for g in (opt.param_groups if engine is None else engine.optimizer.param_groups):
            g["lr"] = lr
        x, y = (t.contiguous() for t in sampler.next())
        out = runner(input_ids=x, labels=y, shift_labels=y, output_router_logits=(arm != "ours"))
        if engine is None:
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)   # grads kept for state_bytes; zeroed in place
        else:
            engine.backward(out.loss)
            engine.step()
        if step % 10 == 0 or step == args.ft_steps - 1:
            log.append({"step": step, "loss": float(out.loss.detach())})
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}")
    end = time.perf_counter()
    memory.training_done()
    timed_steps = args.ft_steps - warm
    result.update(train_seconds=end - start, tokens_per_s=timed_steps * args.batch * args.seq_len / (end - timed_start),
                  tokens_per_s_steps=f"steps {warm}..{args.ft_steps - 1} (the first {warm} untimed)",
                  train_log=log, memory=memory.result(), tensor_bytes=state_bytes(model, opt),
                  rss_after_training_bytes=current_rss_bytes())
    if arm == "ours":
        result["layer_stats"] = [b.moe.stats() for b in model.modules() if isinstance(b, ClusteredMoEBlock)]
    result.update(evaluate(engine.module if engine is not None else model, valid, args, f"valid {arm} seed {seed}"))
    return result


# --- the driver ------------------------------------------------------------------------------------
SHARED = ("data", "cache", "vocab", "hidden", "ffn", "layers", "heads", "experts", "top_k", "seq_len", "batch",
          "eval_batch", "eval_batches", "pretrain_steps", "pretrain_lr", "pretrain_seed", "warmup", "router_aux_coef",
          "ft_steps", "ft_lr", "ft_warmup", "rank", "num_groups")


def run_worker(args, worker: str, extra: List[str], tmp: str) -> Dict[str, Any]:
    result = os.path.join(tmp, f"{worker}{'_'.join([''] + extra[1::2])}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--result", result] + extra
    for k in SHARED:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    print(f"\n=== {worker} {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    lines: List[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:   # tqdm's \r updates arrive as lines of their own here
            lines.append(line.rstrip())
            if "Warning" not in line:
                print(line.rstrip(), flush=True)
    wall = time.perf_counter() - start
    tail = "\n".join(l for l in lines if "Warning" not in l)[-3000:]
    if proc.returncode != 0 or not os.path.exists(result):
        err = [l for l in lines if l.strip()]
        return {"failed": (err[-1] if err else f"exit {proc.returncode}"), "returncode": proc.returncode,
                "process_wall_seconds": wall, "log_tail": tail[-1500:]}
    with open(result) as f:
        out = json.load(f)
    out["process_wall_seconds"] = wall
    return out


def spread(values: List[float]) -> Dict[str, Any]:
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else None
    half = T_975[n - 1] * sd / math.sqrt(n) if n > 1 and n - 1 in T_975 else None
    return {"n": n, "values": values, "mean": mean, "sd": sd, "min": min(values), "max": max(values),
            "ci95_t": [mean - half, mean + half] if half is not None else None}


def summarize(results: Dict[str, Any], seeds: List[int]) -> Dict[str, Any]:
    ft = results["finetune"]
    ok = lambda arm: [r for r in ft.get(arm, []) if "failed" not in r]  # noqa: E731
    summary: Dict[str, Any] = {}
    for arm in ft:
        rows = ok(arm)
        if not rows:
            summary[arm] = {"failed": ft[arm][0].get("failed") if ft[arm] else "not run"}
            continue
        summary[arm] = {"valid_ppl": spread([r["valid_ppl"] for r in rows]),
                        "tokens_per_s": spread([r["tokens_per_s"] for r in rows]),
                        "peak_rss_mib": spread([r["memory"]["peak_rss_bytes"] / 2 ** 20 for r in rows]),
                        "rss_before_model_mib": spread([r["memory"]["rss_before_model_bytes_per_rank"][0] / 2 ** 20
                                                        for r in rows]),
                        "param_grad_optimizer_mib": rows[0]["tensor_bytes"] and
                        sum(rows[0]["tensor_bytes"].values()) / 2 ** 20,
                        "expert_parameters": rows[0]["expert_parameters"], "parameters": rows[0]["parameters"]}
    base = summary.get("hf", {})
    if "valid_ppl" in base:
        for arm, s in summary.items():
            if "valid_ppl" not in s:
                continue
            s["x_hf"] = {"expert_parameters": s["expert_parameters"] / base["expert_parameters"],
                         "parameters": s["parameters"] / base["parameters"],
                         "peak_rss": s["peak_rss_mib"]["mean"] / base["peak_rss_mib"]["mean"],
                         "param_grad_optimizer_bytes": s["param_grad_optimizer_mib"] / base["param_grad_optimizer_mib"],
                         "tokens_per_s": s["tokens_per_s"]["mean"] / base["tokens_per_s"]["mean"]}
            hf_by_seed = {r["seed"]: r["valid_ppl"] for r in ok("hf")}
            diffs = [r["valid_ppl"] - hf_by_seed[r["seed"]] for r in ok(arm) if r["seed"] in hf_by_seed]
            if arm != "hf" and diffs:
                s["paired_valid_ppl_minus_hf"] = {**spread(diffs), "seeds": [r["seed"] for r in ok(arm)
                                                                             if r["seed"] in hf_by_seed]}
                ratios = [r["valid_ppl"] / hf_by_seed[r["seed"]] for r in ok(arm) if r["seed"] in hf_by_seed]
                s["paired_valid_ppl_ratio_to_hf"] = spread(ratios)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/hf_mixtral_wikitext.json")
    p.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2"),
                   help="WikiText-2 (wiki.{train,valid}.tokens); default: ../shared/data/wikitext-2 beside the checkout")
    p.add_argument("--cache", default="/tmp/trilemma_hf_mixtral_cache")
    p.add_argument("--vocab", type=int, default=8192, help="the most frequent words kept (<eos>, <unk> included)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="intermediate size per expert")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=0, help="0: the whole valid split")
    p.add_argument("--pretrain-steps", type=int, default=700)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--router-aux-coef", type=float, default=0.01, help="Mixtral's load-balancing loss weight")
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--ft-warmup", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-groups", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--autoep-seeds", type=int, default=3, help="how many of --seeds the AutoEP arm runs (0: skip)")
    p.add_argument("--arms", nargs="+", default=["hf", "ours", "autoep"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    if args.worker:
        out = {"pretrain": worker_pretrain, "evals": worker_evals, "finetune": worker_finetune}[args.worker](args)
        with open(args.result + ".tmp", "w") as f:
            json.dump(out, f, indent=1, default=float)
        os.replace(args.result + ".tmp", args.result)
        return out

    import deepspeed
    import transformers
    started = time.perf_counter()
    tmp = os.path.join(args.cache, f"run_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results: Dict[str, Any] = {
        "command": " ".join(["OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONPATH=. python"] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "ram_gib": round(mem_total / 2 ** 30, 1),
                    "platform": platform.platform(), "processor": platform.processor(), "torch_threads": 1,
                    "load_average_at_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in SHARED + ("seeds", "autoep_seeds", "arms")},
        "model": {"class": "transformers MixtralForCausalLM", "layers": args.layers, "hidden": args.hidden,
                  "intermediate_per_expert": args.ffn, "experts": args.experts, "top_k": args.top_k,
                  "heads": args.heads, "kv_heads": args.heads, "seq_len": args.seq_len, "vocab": args.vocab,
                  "tie_word_embeddings": False, "router_jitter_noise": 0.0},
        "protocol": __doc__,
    }
    path = cache_path(args)
    cached = os.path.exists(path)
    if not cached:
        pre = run_worker(args, "pretrain", [], tmp)
        if "failed" in pre:
            raise SystemExit(f"pretraining failed: {pre['failed']}")
    meta = torch.load(path, map_location="cpu", weights_only=False)["meta"]
    results["pretrain"] = {**meta, "cache": path, "from_cache": cached}
    results["evals"] = run_worker(args, "evals", [], tmp)
    results["finetune"] = {}
    for arm in args.arms:
        seeds = args.seeds[:args.autoep_seeds] if arm == "autoep" else args.seeds
        results["finetune"][arm] = [run_worker(args, "finetune", ["--arm", arm, "--seed", str(s)], tmp) for s in seeds]
        for r, s in zip(results["finetune"][arm], seeds):
            r.setdefault("arm", arm)
            r.setdefault("seed", s)
    results["summary"] = summarize(results, args.seeds)
    results["wall_seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print_table(results)
    return results


def print_table(results: Dict[str, Any]) -> None:
    ev = results["evals"]
    if "failed" not in ev:
        for name in [k for k in ev if k.startswith(("pretrained", "converted"))]:
            e = ev[name]
            err = ""
            if "reports" in e:
                err = f"  rel.err {statistics.fmean(r['relative_error'] for r in e['reports']):.3f}"
            print(f"{name:28s} valid ppl {e['valid_ppl']:9.2f}  expert params {e['expert_parameters']:,}{err}")
    for arm, s in results["summary"].items():
        if "failed" in s:
            print(f"finetune {arm}: failed: {s['failed']}")
            continue
        v = s["valid_ppl"]
        line = (f"finetune {arm:7s} ppl {v['mean']:8.2f} (sd {v['sd'] or 0:.2f}, {v['min']:.2f}-{v['max']:.2f})  "
                f"peak RSS {s['peak_rss_mib']['mean']:.0f} MiB  tok/s {s['tokens_per_s']['mean']:.0f}  "
                f"expert params {s['expert_parameters']:,}")
        if "paired_valid_ppl_minus_hf" in s:
            d = s["paired_valid_ppl_minus_hf"]
            line += f"  paired - hf {d['mean']:+.2f} (sd {d['sd'] or 0:.2f}, ci95 {d['ci95_t']})"
        print(line)


if __name__ == "__main__":
    main()
