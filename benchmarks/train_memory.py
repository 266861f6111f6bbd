"""Peak training memory per rank, measured as what each process holds (``ru_maxrss`` up to the end
of training), with tokens/s beside it: the main job on 2 ranks under the ``deepspeed`` launcher,
one configuration after another, each in fresh processes.

    PYTHONPATH=. python benchmarks/train_memory.py --out docs/results/train_memory.json

Configurations (``--only`` picks some): DeepSpeed's own MoE at ZeRO-2 and at ZeRO-2 with CPU
optimizer offload; ours at ZeRO-2 with a full burn-in (the paper's: E full experts until the first
clustering) and with a burn-in on the compressed form (``burn_in_form: compressed``), each also
with CPU optimizer offload; ours (compressed burn-in) at ZeRO-3, ZeRO-3 with CPU optimizer offload
and ZeRO-Infinity (``-recompute``: also with ``recompute_experts``, at ZeRO-2 and ZeRO-Infinity) (parameters and optimizer state on NVMe, ``max_in_cpu: 0`` so that every
swappable partition goes there; bf16, as Infinity runs on these CPUs); a dense FFN of the same
active weights (width k x d_ff) at ZeRO-2, ZeRO-3, and at ZeRO-2 and ZeRO-Infinity in bf16.
Every run trains ``--steps`` optimizer steps with the first clustering after ``--burn-in``, fp32
unless named bf16, a torch AdamW from the DeepSpeed config (DeepSpeed's CPU Adam where state is
offloaded), on the generated corpus (vocabulary 512, so the MoE blocks are most of the model).
The NVMe directory is a temporary one on this machine's disk; its size after training is reported.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20

# name -> (--ffn, ZeRO stage, optimizer offload device or None, burn_in_form or None,
#          parameter offload device or None, bf16)
CONFIGS = {
    "deepspeed-zero2": ("deepspeed", 2, None, None, None, False),
    "deepspeed-zero2-cpu-offload": ("deepspeed", 2, "cpu", None, None, False),
    "ours-full-burn-in-zero2": ("ours", 2, None, "full", None, False),
    "ours-full-burn-in-zero2-cpu-offload": ("ours", 2, "cpu", "full", None, False),
    "ours-compressed-burn-in-zero2": ("ours", 2, None, "compressed", None, False),
    "ours-compressed-burn-in-zero2-cpu-offload": ("ours", 2, "cpu", "compressed", None, False),
    "ours-compressed-burn-in-zero3": ("ours", 3, None, "compressed", None, False),
    "ours-compressed-burn-in-zero3-cpu-offload": ("ours", 3, "cpu", "compressed", None, False),
    "ours-compressed-burn-in-zero-infinity-nvme-bf16": ("ours", 3, "nvme", "compressed", "nvme", True),
    "ours-compressed-burn-in-zero2-recompute": ("ours", 2, None, "compressed", None, False),
    "ours-compressed-burn-in-zero-infinity-nvme-bf16-recompute": ("ours", 3, "nvme", "compressed", "nvme", True),
    "dense-zero2": ("dense", 2, None, None, None, False),
    "dense-zero3": ("dense", 3, None, None, None, False),
    "dense-zero2-bf16": ("dense", 2, None, None, None, True),
    "dense-zero-infinity-nvme-bf16": ("dense", 3, "nvme", None, "nvme", True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(args, stage: int, offload, burn_in_form, offload_param=None, bf16=False, nvme_dir=None) -> dict:
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": offload}
        if offload == "nvme":
            zero["offload_optimizer"].update(nvme_path=nvme_dir, pin_memory=False)
    if offload_param:
        zero["offload_param"] = {"device": offload_param}
        if offload_param == "nvme":
            # a ZeRO-3 leaf module gathers a whole MoE layer and the next one is prefetched: room for
            # every swappable tensor of two layers (ds_configs/README.md)
            zero["offload_param"].update(nvme_path=nvme_dir, pin_memory=False, max_in_cpu=0,
                                         buffer_count=16, buffer_size=5 * 10 ** 6)
            zero["stage3_prefetch_bucket_size"] = 0   # DeepSpeed's NVMe prefetch fails on leaf modules
            # optimizer state swaps in sub-groups of this many elements (the default, 1e9, would
            # bring a rank's whole fp32 state back into memory at every step)
            zero["sub_group_size"] = 2 * 10 ** 6
    cfg = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "trilemma_moe": {"num_experts": args.num_experts, "num_groups": args.num_groups, "rank": args.rank,
                            "top_k": args.top_k, "burn_in": args.burn_in}}
    if offload:   # DeepSpeed's CPU optimizer for offloaded state (a torch optimizer is refused there)
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
        cfg["zero_force_ds_cpu_optimizer"] = True
    if burn_in_form:
        cfg["trilemma_moe"]["burn_in_form"] = burn_in_form
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if "nvme" in (offload, offload_param):
        cfg["aio"] = {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True}
    return cfg


def _disk_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:   # a swap file removed while walking (capacity.py samples during a run)
                pass
    return total


def main_job_command(args, ffn: str, d_ff: int, ranks: int, ds_config_path: str, summary: str) -> list:
    """The main job under the deepspeed launcher, training ``args.steps`` steps of the model that
    ``args`` shapes, with its memory measured and its summary written to ``summary``."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(_free_port()), "--module", "trilemma_moe.train", "--deepspeed_config", ds_config_path,
            "--ffn", ffn, "--d-model", str(args.d_model), "--d-ff", str(d_ff), "--layers", str(args.layers),
            "--heads", str(args.heads), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--eval-every", "0", "--eval-batches", "1", "--final-eval-batches", "1",
            "--no-progress", "--measure-memory", "--summary-json", summary]


def run_one(args, name: str, workdir: str) -> dict:
    ffn, stage, offload, form, offload_param, bf16 = CONFIGS[name]
    path = os.path.join(workdir, f"{name}.ds.json")
    nvme_dir = os.path.join(workdir, f"{name}.nvme")
    cfg = ds_config(args, stage, offload, form, offload_param, bf16, nvme_dir)
    if name.endswith("-recompute"):   # activation checkpointing of our expert compute
        cfg["trilemma_moe"]["recompute_experts"] = True
    with open(path, "w") as f:
        json.dump(cfg, f)
    summary = os.path.join(workdir, f"{name}.summary.json")
    d_ff = args.d_ff * args.top_k if ffn == "dense" else args.d_ff
    cmd = main_job_command(args, ffn, d_ff, args.ranks, path, summary)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.malloc_mmap_threshold is not None:
        # glibc: allocations at least this large are mmapped and go back to the system when freed
        # (by default the threshold rises after large frees, and freed heap memory stays resident)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    log = os.path.join(workdir, f"{name}.log")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"{name} failed (exit {rc}); the end of {log}:\n{tail}")
    with open(summary) as f:
        s = json.load(f)
    return {"ffn": ffn, "zero_stage": stage, "offload_optimizer": offload, "burn_in_form": form,
            "offload_param": offload_param, "bf16": bf16,
            "nvme_bytes_after_training": _disk_bytes(nvme_dir) if os.path.isdir(nvme_dir) else 0,
            "peak_rss_mib_per_rank": [round(b / MIB, 1) for b in s["peak_rss_bytes_per_rank"]],
            "rss_before_model_mib_per_rank": [round(b / MIB, 1) for b in s["rss_before_model_bytes_per_rank"]],
            "total_params_at_start": s["total_params_start"], "total_params_at_end": s["total_params"],
            "tokens_per_s": s["tokens_per_s"], "tokens_per_s_second_half": s["tokens_per_s_second_half"],
            "final_train_loss": s["final_train_loss"],
            "command": " ".join(cmd[1:])}


def table(results: dict, base: str = "deepspeed-zero2") -> str:
    """Peak RSS and tokens/s against DeepSpeed-MoE at ZeRO-2 and against the dense FFN at ZeRO-2
    of the same precision (``dense-zero2`` / ``dense-zero2-bf16``), where they ran."""
    def peak(name):
        return max(results[name]["peak_rss_mib_per_rank"]) if name in results else None
    ref, ref_tps = peak(base), results[base]["tokens_per_s"] if base in results else None
    lines = ["| configuration | params at start / end | peak RSS per rank (MiB) | × DeepSpeed-MoE ZeRO-2 "
             "| × dense ZeRO-2 (same precision) | NVMe after training (MiB) | RSS before the model (MiB) "
             "| tokens/s | × |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        top, tps = max(r["peak_rss_mib_per_rank"]), r["tokens_per_s"]
        dense = peak("dense-zero2-bf16" if r.get("bf16") else "dense-zero2")
        lines.append(f"| {name} | {r['total_params_at_start']:,} / {r['total_params_at_end']:,} "
                     f"| {' / '.join(f'{m:,.0f}' for m in r['peak_rss_mib_per_rank'])} "
                     f"| {f'×{top / ref:.2f}' if ref else '–'} | {f'×{top / dense:.2f}' if dense else '–'} "
                     f"| {r.get('nvme_bytes_after_training', 0) / MIB:,.0f} "
                     f"| {' / '.join(f'{m:,.0f}' for m in r['rss_before_model_mib_per_rank'])} "
                     f"| {tps:,.0f} | {f'×{tps / ref_tps:.2f}' if ref_tps else '–'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--num-groups", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per rank (32 x 64 = 2,048 tokens)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--burn-in", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=None)
    p.add_argument("--malloc-mmap-threshold", type=int, default=None,
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for the runs (default: glibc's dynamic one)")
    p.add_argument("--out", default=None, help="write the results (JSON) here")
    args = p.parse_args(argv)
    names = args.only or list(CONFIGS)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "command": "python benchmarks/train_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "memory": "ru_maxrss of each rank's process up to the end of training (the trainer's --measure-memory)"}
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in tqdm(names, desc="train_memory", unit="config"):
            results[name] = run_one(args, name, workdir)
            if args.out:   # after every configuration: a failure later keeps what ran
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                tmp = args.out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"meta": meta, "args": vars(args), "results": results}, f, indent=1)
                os.replace(tmp, args.out)
    print(table(results))


if __name__ == "__main__":
    main()
