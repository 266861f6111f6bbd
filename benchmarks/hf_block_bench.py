"""One MoE block forward+backward on the CPU: Hugging Face Mixtral's block, the same block after
DeepSpeed AutoEP swapped it in, and ours before and after its first clustering.

    PYTHONPATH=. python benchmarks/hf_block_bench.py --out /tmp/hf_block_bench.json

Layers (``--layers`` picks some), all fp32, same input [1, tokens, d], SwiGLU experts, top-2:
  hf             transformers' MixtralSparseMoeBlock built on its own from a MixtralConfig (its
                 experts then run transformers' "eager" per-expert loop);
  hf_grouped_mm  the same block with ``experts_implementation="grouped_mm"`` (what
                 MixtralForCausalLM picks by default);
  autoep         the block DeepSpeed AutoEP puts in its place (``expert_parallel`` with
                 ``preset_model: mixtral``, ``autoep_size: 1``, one gloo process), taken out of a
                 1-layer MixtralForCausalLM after ``deepspeed.initialize`` and called on its own,
                 with the weights of ``hf`` (its output is checked against ``hf``'s);
  ours_before    ClusteredMoE (E full experts, burn_in_form="full") before its first clustering;
  ours_after     the same after ``recluster(force=True)`` (the compressed form it trains in);
  ours_converted ``hf``'s block converted by ``trilemma_moe.integrations.hf.convert_moe_blocks``
                 (G, r as ours) inside a 1-layer MixtralForCausalLM: the ClusteredMoEBlock a
                 converted model runs, router logits for transformers' recorders included.
Backward of ``y.sum()`` (ours: ``y.sum() + l_aux``, the aux loss its forward returns; the HF
blocks return none). Warm-up, then the median of ``--repeats`` timed runs; ratios are to
``autoep`` measured in the same run (to ``hf`` when AutoEP is unavailable, which the output says).

AutoEP in DeepSpeed 0.19.8 works with transformers 5.0-5.22.x (5.22.2 is pinned); from 5.23
transformers' ``_CAN_RECORD_REGISTRY`` is a ``_CanRecordRegistry`` whose ``get`` takes a model,
which AutoEP's ``auto_ep_presets/base.py`` calls as ``get(str_key, default)`` (TypeError in
``deepspeed.initialize``): the ``autoep`` row is then skipped, with the reason in the output.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

from trilemma_moe.config import TrilemmaMoEConfig  # noqa: E402
from trilemma_moe.core.layer import ClusteredMoE  # noqa: E402

LAYERS = ("hf", "hf_grouped_mm", "autoep", "ours_before", "ours_after", "ours_converted")


def mixtral_config(d, f, E, k, **kw):
    from transformers import MixtralConfig
    cfg = MixtralConfig(vocab_size=128, hidden_size=d, intermediate_size=f, num_local_experts=E,
                        num_experts_per_tok=k, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=128, router_jitter_noise=0.0, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def hf_block(d, f, E, k, experts_impl=None):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = mixtral_config(d, f, E, k)
    if experts_impl is not None:
        cfg._experts_implementation = experts_impl
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():        # standalone modules are left uninitialised (torch.empty): use the HF init
        for p in block.parameters():
            p.normal_(0.0, cfg.initializer_range)
    return block


def autoep_block(reference, d, f, E, k):
    """The AutoEP replacement of a 1-layer MixtralForCausalLM's MoE block that holds ``reference``'s weights."""
    import deepspeed
    from transformers import MixtralForCausalLM
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:   # a free port for the one-process gloo group
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, val in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, val)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    model = MixtralForCausalLM(mixtral_config(d, f, E, k))
    model.model.layers[0].mlp.load_state_dict(reference.state_dict())
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
                 "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": "mixtral"}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    block = engine.module.model.layers[0].mlp
    info = {"class": f"{type(block).__module__}.{type(block).__qualname__}"}
    experts = getattr(block, "experts", None)
    for attr in ("use_grouped_mm", "use_triton_grouped_mm"):
        if hasattr(experts, attr):
            info[attr] = bool(getattr(experts, attr))
    return block, info


def converted_block(reference, d, f, E, k, G, r):
    from transformers import MixtralForCausalLM

    from trilemma_moe.integrations.hf import convert_moe_blocks
    model = MixtralForCausalLM(mixtral_config(d, f, E, k))
    model.model.layers[0].mlp.load_state_dict(reference.state_dict())
    convert_moe_blocks(model, num_groups=G, rank=r)
    return model.model.layers[0].mlp


def ours(d, f, E, G, r, k, after: bool):
    cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=r, top_k=k, burn_in_form="full",
                            burn_in=10 ** 9)   # no clustering inside the timed loop
    torch.manual_seed(0)
    layer = ClusteredMoE(d, f, cfg, activation="silu", gated=True, bias=False)
    if after:
        layer.recluster(force=True)
    return layer


def _once(layer, x):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    if isinstance(out, tuple):
        y = out[0]
        loss = y.sum() + (out[1] if len(out) > 1 and torch.is_tensor(out[1]) and out[1].dim() == 0 else 0)
    else:
        loss = out.sum()
    loss.backward()


def time_fwd_bwd(layer, x, repeats: int, warmup: int) -> list:
    layer.train()
    for _ in range(warmup):
        _once(layer, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _once(layer, x)
        times.append(time.perf_counter() - t0)
    return times


def n_params(layer) -> int:
    if isinstance(layer, ClusteredMoE):
        return layer.expert_parameter_count()
    if hasattr(layer, "moe") and hasattr(layer.moe, "expert_parameter_count"):   # a ClusteredMoEBlock
        return layer.moe.expert_parameter_count()
    return sum(p.numel() for n, p in layer.named_parameters() if "expert" in n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated: " + ", ".join(LAYERS))
    ap.add_argument("--out", default=None, help="write the results (JSON) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.layers.split(",") if n]
    for n in names:
        if n not in LAYERS:
            ap.error(f"unknown layer {n!r}")
    T, d, f, E, G, r, k = args.tokens, args.d, args.d_ff, args.experts, args.groups, args.rank, args.top_k

    import transformers
    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{platform.system()} {platform.release()}",
            "command": "PYTHONPATH=. python benchmarks/hf_block_bench.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": ds_version,
            "threads": args.threads, "dtype": "fp32",
            "timing": f"forward+backward of one block, median of {args.repeats} after {args.warmup} warm-up runs"}
    x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(0)).requires_grad_()
    results, skipped, notes = {}, {}, {}

    hf_ref = None
    if {"hf", "autoep", "ours_converted"} & set(names):
        hf_ref = hf_block(d, f, E, k)
    for name in names:
        try:
            if name == "hf":
                layer = hf_ref
            elif name == "hf_grouped_mm":
                layer = hf_block(d, f, E, k, experts_impl="grouped_mm")
                if hf_ref is not None:
                    layer.load_state_dict(hf_ref.state_dict())
            elif name == "autoep":
                if ds_version is None:
                    raise ImportError("deepspeed is not installed")
                layer, info = autoep_block(hf_ref, d, f, E, k)
                with torch.no_grad():
                    diff = (layer(x) - hf_ref(x)).abs().max().item()
                notes["autoep"] = {**info, "max_abs_diff_vs_hf_output": diff}
                print(f"autoep: {info}; max |autoep(x) - hf(x)| = {diff:.3g}", flush=True)
            elif name == "ours_converted":
                layer = converted_block(hf_ref, d, f, E, k, G, r)
            else:
                layer = ours(d, f, E, G, r, k, after=name == "ours_after")
        except Exception as exc:  # noqa: BLE001 -- a baseline that cannot be built is reported, not fatal
            reason = f"{type(exc).__name__}: {exc}"
            if name == "autoep" and "_CanRecordRegistry" in reason:
                reason += (f" (transformers {transformers.__version__} >= 5.23 changed _CAN_RECORD_REGISTRY; "
                           "AutoEP needs transformers<=5.22.2, the version pinned in setup.py's hf extra)")
            skipped[name] = reason
            print(f"skipping {name}: {reason}", flush=True)
            traceback.print_exc()
            continue
        times = time_fwd_bwd(layer, x, args.repeats, args.warmup)
        ms = statistics.median(times) * 1e3
        results[name] = {"ms": ms, "tokens_per_s": T / (ms / 1e3), "expert_params": n_params(layer),
                         "all_ms": [t * 1e3 for t in times]}
        print(f"T={T} d={d} d_ff={f} E={E} k={k} {name:>13}: {ms:9.2f} ms  {T / (ms / 1e3):10,.0f} tok/s", flush=True)
        del layer
    baseline = "autoep" if "autoep" in results else ("hf" if "hf" in results else None)
    for v in results.values():
        v["ratio"] = v["ms"] / results[baseline]["ms"] if baseline else None

    lines = [f"## One MoE block, CPU fp32 ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"deepspeed {meta['deepspeed']}, {args.threads} thread(s); {meta['timing']}.",
             f"T={T}, d={d}, d_ff={f}, E={E}, top-{k}; ours G={G}, r={r}.",
             f"Command: `{meta['command']}`", "",
             f"| layer | ms | tokens/s | expert params | time / {baseline} |", "|---|---|---|---|---|"]
    for name, v in results.items():
        ratio = f"{v['ratio']:.2f}" if v["ratio"] is not None else "-"
        lines.append(f"| {name} | {v['ms']:.1f} | {v['tokens_per_s']:,.0f} | {v['expert_params']:,} | {ratio} |")
    for name, reason in skipped.items():
        lines.append(f"| {name} | skipped: {reason} | | | |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "args": vars(args), "baseline": baseline, "results": results,
                       "skipped": skipped, "notes": notes}, fh, indent=1)


if __name__ == "__main__":
    main()
