"""Sweep of the idle-group offload policy on recorded routing traces (offline simulation).

    PYTHONPATH=. python benchmarks/offload_policy_sweep.py --checkpoint runs/ck4/latest.pt \
        --run-summary docs/results/wt2_cpu_bits4.json --data ../shared/data/wikitext-2 --window 16

Records, for every MoE layer, each step's per-group token counts and router group probabilities
on the first ``--steps`` windows of the *training* split, then replays them through the policy of
``core/prefetch.py`` (EMA predictor with evidence ``max(selected, 1 - prod_t (1 - p_tg^gamma))``,
gamma = None for selections only; eviction after S idle steps, either only when the predictor
says "unlikely within L" (``cond``, what GroupStore does) or always (``always``); prefetch when
``1 - (1 - ema)^L >= threshold``) and prints, per evidence variant, the setting with the fewest
resident bytes among those with a hit rate >= ``--min-hit``.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from trilemma_moe.core.checkpoint import safe_load
from trilemma_moe.core.prefetch import PrefetchPolicy, router_evidence
from trilemma_moe.data import eval_batches, load_wikitext

from offload_bench import _model


def record(model, data, window, steps):
    traces = {i: [] for i in range(len(model.moe_layers()))}
    for i, ffn in enumerate(model.moe_layers()):
        moe = ffn.layer.moe
        orig = moe.route

        def route(x, orig=orig, i=i, G=moe.num_groups):
            r = orig(x)
            traces[i].append((torch.bincount(r.group_idx.reshape(-1), minlength=G).tolist(), r.group_probs.double()))
            return r
        moe.route = route
    model.eval()
    with torch.no_grad():
        for x, y in eval_batches(data, window, 1, max_batches=steps):
            model(x, y)
    return traces


def simulate(trace, S, L, a, th, gamma, rule):
    """The store's predictor (``PrefetchPolicy``) on a recorded trace, without the I/O."""
    G = len(trace[0][0])
    res, pending = set(range(G)), set()
    policy = PrefetchPolicy(G, L, a, th)
    acc = miss = resident = 0
    for counts, probs in trace:
        res |= pending
        pending = set()
        for g in range(G):
            if counts[g] > 0:
                acc += 1
                if g not in res:
                    miss += 1
                    res.add(g)
        policy.observe(counts, router_evidence(None if gamma is None else probs, G, gamma or 1.0))
        for g in range(G):
            likely = policy.likely(g)
            if g in res and policy.idle[g] >= S and (rule == "always" or not likely):
                res.discard(g)
            elif g not in res and likely:
                pending.add(g)
        resident += len(res)
    return 1 - miss / max(1, acc), resident / (len(trace) * G)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--run-summary", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--min-hit", type=float, default=0.9)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.run_summary) as f:
        run = json.load(f)["config"]
    corpus = load_wikitext(args.data)
    model = _model(run, corpus.vocab_size, safe_load(args.checkpoint))
    traces = record(model, corpus.train, args.window, args.steps)
    best = {}
    grid = itertools.product((None, 1, 2, 3, 4), ("cond", "always"), (1, 2, 3, 4), (1, 2, 3), (0.1, 0.3, 0.5),
                             (0.25, 0.5, 0.75, 0.9))
    for gamma, rule, S, L, a, th in grid:
        results = [simulate(t, S, L, a, th, gamma, rule) for t in traces.values()]
        hit = sum(r[0] for r in results) / len(results)
        resident = sum(r[1] for r in results) / len(results)
        if hit >= args.min_hit and (gamma not in best or resident < best[gamma]["resident"]):
            best[gamma] = {"hit": hit, "resident": resident, "rule": rule, "S": S, "L": L, "ema_rate": a, "threshold": th}
    for gamma, b in best.items():
        print(f"evidence {'selections' if gamma is None else f'router^{gamma}'}: {json.dumps(b)}")
    return best


if __name__ == "__main__":
    main()
