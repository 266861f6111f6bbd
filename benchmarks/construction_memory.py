"""What building our layer costs in host memory, before any training: the process's peak
(``ru_maxrss``) and current (VmRSS) resident memory after constructing ``--layers`` ClusteredMoE
layers with a compressed burn-in (each group starts as the decomposition of its K initial experts),
against the bytes of the tensors they hold, and VmRSS after glibc's ``malloc_trim(0)`` (what the
allocator kept of freed construction scratch).

    python benchmarks/construction_memory.py      # d=512, d_ff=2048, E=32, G=8, r=16, 2 layers

One process, one thread. The train_memory.py rows build two such layers (per rank) before
``deepspeed.initialize``, so this is part of every row's peak.
"""
from __future__ import annotations

import argparse
import ctypes

import torch

from trilemma_moe.training.measure import current_rss_bytes, peak_rss_bytes

MIB = 1 << 20


def rss_mib() -> float:
    return current_rss_bytes() / MIB


def peak_mib() -> float:
    return peak_rss_bytes() / MIB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--svd", default="exact", choices=["exact", "randomized"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from trilemma_moe import TrilemmaMoEConfig
    from trilemma_moe.core.layer import ClusteredMoE
    start_rss, start_peak = rss_mib(), peak_mib()
    cfg = TrilemmaMoEConfig(num_experts=32, num_groups=8, rank=16, top_k=2, burn_in_form="compressed", svd=args.svd)
    layers = [ClusteredMoE(args.d_model, args.d_ff, cfg, layer_index=i) for i in range(args.layers)]
    tensors = sum(t.numel() * t.element_size() for m in layers for t in [*m.parameters(), *m.buffers()]) / MIB
    built_rss, built_peak = rss_mib(), peak_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_mib()
    print(f"{args.layers} layers (d={args.d_model}, d_ff={args.d_ff}, E=32, G=8, r=16, svd={args.svd}): "
          f"tensors held {tensors:.0f} MiB; peak RSS +{built_peak - start_peak:.0f} MiB, current RSS "
          f"+{built_rss - start_rss:.0f} MiB, after malloc_trim +{trimmed - start_rss:.0f} MiB (above the "
          f"{start_rss:.0f} MiB of an interpreter with torch and the package imported)")


if __name__ == "__main__":
    main()
