"""``trilemma-moe profile-comm``: replay routing on a simulated cluster and print the all-to-all
bytes of flat top-k (DeepSpeed-MoE) vs our group placement, split into intra-node and
inter-node traffic.

    trilemma-moe profile-comm --nodes 8 --gpus-per-node 8 --ep-size 8          # synthetic routing
    python -m trilemma_moe.train --record-routing routing.pt ...                # record a run, then
    trilemma-moe profile-comm --routing routing.pt --nodes 16 --gpus-per-node 4 --ep-size 8

Each simulated GPU gets ``--tokens-per-gpu`` tokens drawn from the recorded (or synthetic) routing;
expert-parallel groups are laid out as DeepSpeed lays them out (``--layout``). Bytes are one
forward's dispatch plus return (the backward moves the same amounts again).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence

import torch

from .cost import simulate, synthetic_routing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trilemma-moe profile-comm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--routing", default=None, help="file from `trilemma_moe.train --record-routing` "
                                                   "(default: uniformly random routing)")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ep-size", type=int, default=8)
    p.add_argument("--tokens-per-gpu", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=None, help="d (default: the recording's, else 768)")
    p.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16/fp16 activations, 4 for fp32")
    p.add_argument("--layout", choices=("consecutive", "strided"), default="consecutive",
                   help="expert-parallel groups as blocks of consecutive ranks (DeepSpeed's default) or "
                        "strided across nodes (use_data_before_expert_parallel)")
    g = p.add_argument_group("synthetic routing (without --routing)")
    g.add_argument("--num-experts", type=int, default=32)
    g.add_argument("--num-groups", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--group-top-k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def _gib(b: float) -> str:
    return f"{b / 2 ** 30:,.3f}"


def run(args) -> List[Dict[str, Any]]:
    if args.routing:
        rec = torch.load(args.routing, weights_only=True)
        E, G = int(rec["num_experts"]), int(rec["num_groups"])
        d = args.hidden_size or int(rec["hidden_size"])
        layers = [(lay["group_idx"], lay["expert_idx"]) for lay in rec["layers"]]
        if not layers:
            raise SystemExit(f"{args.routing}: no routing recorded")
        source = args.routing
    else:
        E, G = args.num_experts, args.num_groups
        if E % G:
            raise SystemExit(f"--num-experts ({E}) must be divisible by --num-groups ({G})")
        d = args.hidden_size or 768
        layers = [synthetic_routing(65536, G, E // G, args.group_top_k, args.top_k, seed=args.seed)]
        source = f"synthetic (uniform), E={E} G={G} k={args.top_k} g1={args.group_top_k}"
    try:
        results = [dict(layer=i, **simulate(g, e, G, E, args.nodes, args.gpus_per_node, args.ep_size,
                                             args.tokens_per_gpu, d, args.bytes_per_element, args.layout,
                                             seed=args.seed + i))
                   for i, (g, e) in enumerate(layers)]
    except ValueError as exc:
        raise SystemExit(f"profile-comm: {exc}")
    r0 = results[0]
    print(f"routing: {source}")
    print(f"cluster: {args.nodes} nodes x {args.gpus_per_node} GPUs = {r0['gpus']} GPUs, ep_size {args.ep_size} "
          f"({args.layout}), {args.tokens_per_gpu} tokens/GPU, d={d}, {args.bytes_per_element} B/element")
    print(f"{'layer':>5}  {'flat intra GiB':>14}  {'flat inter GiB':>14}  {'ours intra GiB':>14}  "
          f"{'ours inter GiB':>14}  {'ours/flat':>9}")
    for r in results:
        print(f"{r['layer']:>5}  {_gib(r['flat_intra_bytes']):>14}  {_gib(r['flat_inter_bytes']):>14}  "
              f"{_gib(r['ours_intra_bytes']):>14}  {_gib(r['ours_inter_bytes']):>14}  {r['ratio_total']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
