"""What ``trilemma-moe reproduce`` runs: variants x seeds x tasks, per preset.

A run is one ``python -m trilemma_moe.train`` command line; the flags below are its whole recipe
(nothing else is read), and every result in ``docs/RESULTS.md`` names the JSON it came from.

* ``cpu``: sized for a 2-core machine without a GPU (about 90 minutes with ``--jobs 2``):
  d=128, 2 blocks, E=32 experts of d_ff=512, G=8 groups (the paper's E and G), r=8.
* ``paper``: the paper's scale (d=768, 12 blocks, E=32, G=8, r=16, k=2, burn-in 1000, T=200) on
  WikiText-103 and SST-2, for a GPU cluster (``--device cuda``): documented, not run on these
  machines (they have no GPU, and WikiText-103's training split is not here).
* ``smoke``: seconds per run, for the tests of the harness itself.
* ``shift``: a distribution shift at the ``cpu`` preset's model size: (i) a topic shift and
  (ii) a gradual drift on the generated corpus, (iii) WikiText-2 then SST-2's phrases; static
  (the default), dynamic (probe rule with move cost), the probe rule without move cost (λ=0), the
  paper's rule and dynamic with the regroup check triggered by load drift
  (``regroup_trigger="drift"``), Switch beside, 5 seeds each.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class Variant:
    name: str            # key in the results (and the run's directory)
    label: str           # row label in the tables
    ffn: str             # --ffn
    seeds: int = 1       # how many seeds (0, 1, ...) the preset runs
    flags: Tuple[str, ...] = ()          # extra flags (e.g. the dense baseline's width)
    needs: str = ""      # a module that must import (``deepspeed``), else the variant is skipped


@dataclass(frozen=True)
class Preset:
    name: str
    tasks: Dict[str, Tuple[str, ...]]    # task -> its flags ("{data}" is --data-root)
    variants: Tuple[Variant, ...]
    description: str = ""
    d_ff: int = 512
    top_k: int = 2
    run_here: bool = True                # False: documented for GPU clusters, refused on the CPU
    # tasks run one at a time, one seed, after the others: the speed pass, whose tokens/s must not
    # share the machine with another run
    sequential: Tuple[str, ...] = ("speed",)

    def runs(self) -> List[Tuple[str, Variant, int]]:
        return [(task, v, seed) for task in self.tasks for v in self.variants
                for seed in range(1 if task in self.sequential else v.seeds)]


def _variants(d_ff: int, k: int, seeds: int) -> Tuple[Variant, ...]:
    """Every row of the paper's Tables 2-5 that this harness can build; ours (static, the default),
    ours with dynamic regrouping and Switch with ``seeds`` seeds (Table 5), the rest with one."""
    return (
        Variant("dense", f"Dense (d_ff={k * d_ff}: the active expert weights of top-{k})", "dense",
                flags=("--d-ff", str(k * d_ff))),
        Variant("switch", "Switch-Top2", "switch", seeds),
        Variant("deepspeed", "DeepSpeed-MoE top-2", "deepspeed", needs="deepspeed"),
        Variant("static", "Ours (the default: clustered once, static)", "static", seeds),
        # the memory leg: no full experts at any step (compressed burn-in), its quality paired with static's
        Variant("compressed-burn-in", "Ours, burn-in on the compressed form (burn_in_form=compressed)", "static",
                seeds, flags=("--burn-in-form", "compressed")),
        # the regroup rules measured against clustering once (docs/REGROUP.md)
        Variant("dynamic", "Ours, dynamic regrouping (probe similarity, move cost λ=0.25, movers-only migration)",
                "dynamic", seeds),
        Variant("probe-free", "Dynamic without the move cost (probe similarity, λ=0)", "probe-free", seeds),
        Variant("paper-regroup", "The paper's regroup rule (weights + routed centroids, re-decomposition)",
                "paper-regroup"),
        Variant("int4", "Ours + INT4 residuals", "int4"),
        Variant("random-groups", "w/o online clustering (random fixed groups)", "random-groups"),
        Variant("full-experts", "w/o low-rank compression (full experts)", "full-experts"),
        Variant("flat-routing", "w/o hierarchical routing (flat top-k)", "flat-routing"),
    )


_MOE_CPU = ("--num-experts", "32", "--num-groups", "8", "--rank", "8", "--top-k", "2")
_MODEL_CPU = ("--d-model", "128", "--d-ff", "512", "--layers", "2", "--heads", "4")

CPU = Preset(
    name="cpu",
    description="2 CPU cores: d=128, 2 blocks, E=32, G=8, r=8, k=2",
    tasks={
        # 320 steps of 8 x 64 tokens (164k tokens, 8 % of WikiText-2's train split: the 33k-word
        # output layer is ~90 % of a step's work here); valid / test perplexity over their first
        # 65,536 tokens (128 batches of 8 x 64)
        "lm": ("--data", "{data}/wikitext-2", *_MODEL_CPU, *_MOE_CPU, "--seq-len", "64",
               "--batch-size", "8", "--steps", "320", "--burn-in", "100", "--recluster-interval", "50",
               "--eval-every", "40", "--eval-batches", "8", "--final-eval-batches", "128", "--test"),
        # 800 steps of 32 phrases (the trainer's own SST-2 default is 1,500); accuracy on 872 whole
        # sentences held out of train.tsv, none of their phrases trained on (data/sst2.py; not GLUE's
        # dev set)
        "sst2": ("--task", "sst2", "--data", "{data}/sst2", *_MODEL_CPU, *_MOE_CPU, "--steps", "800",
                 "--batch-size", "32", "--lr", "1e-3", "--burn-in", "200", "--recluster-interval", "50",
                 "--eval-every", "100"),
        # tokens/s of every variant, one run at a time on an otherwise idle machine (the quality
        # runs above share it two at a time): the LM recipe for 150 steps, first clustering at
        # step 51, tokens/s over steps 76-150 (compressed, no first-step costs in it)
        "speed": ("--data", "{data}/wikitext-2", *_MODEL_CPU, *_MOE_CPU, "--seq-len", "64",
                  "--batch-size", "8", "--steps", "150", "--burn-in", "50", "--recluster-interval", "50",
                  "--eval-every", "0", "--eval-batches", "1", "--final-eval-batches", "1"),
    },
    variants=_variants(512, 2, 3),
)

_MODEL_PAPER = ("--d-model", "768", "--d-ff", "3072", "--layers", "12", "--heads", "12")
_MOE_PAPER = ("--num-experts", "32", "--num-groups", "8", "--rank", "16", "--top-k", "2", "--burn-in", "1000",
              "--recluster-interval", "200")
_GPU = ("--device", "cuda", "--dtype", "bf16")

PAPER = Preset(
    name="paper",
    description="the paper's scale (GPU cluster): d=768, 12 blocks, E=32, G=8, r=16, k=2",
    tasks={
        "lm": ("--data", "{data}/wikitext-103", *_MODEL_PAPER, *_MOE_PAPER, "--seq-len", "512", "--batch-size", "16",
               "--steps", "50000", "--lr", "3e-4", "--eval-every", "2000", "--eval-batches", "50",
               "--final-eval-batches", "0", "--test", *_GPU),
        "sst2": ("--task", "sst2", "--data", "{data}/sst2", *_MODEL_PAPER, *_MOE_PAPER, "--steps", "20000",
                 "--lr", "1e-4", "--eval-every", "1000", *_GPU),
    },
    variants=_variants(3072, 2, 3),
    d_ff=3072,
    run_here=False,
)

SMOKE = Preset(
    name="smoke",
    description="seconds per run, for the harness's own tests",
    tasks={
        "lm": ("--data", "{data}/wikitext-2", "--d-model", "16", "--d-ff", "32", "--layers", "1",
               "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--steps", "12",
               "--num-experts", "16", "--num-groups", "8", "--rank", "2", "--top-k", "2", "--burn-in", "4",
               "--recluster-interval", "4", "--eval-every", "6", "--eval-batches", "2", "--final-eval-batches",
               "2", "--test", "--max-train-tokens", "20000"),
        "sst2": ("--task", "sst2", "--data", "{data}/sst2", "--d-model", "16", "--d-ff", "32", "--layers",
                 "1", "--heads", "2", "--steps", "12", "--batch-size", "8", "--num-experts", "16",
                 "--num-groups", "8", "--rank", "2", "--top-k", "2", "--burn-in", "4", "--recluster-interval",
                 "4", "--eval-every", "6"),
        "speed": ("--data", "{data}/wikitext-2", "--d-model", "16", "--d-ff", "32", "--layers", "1",
                  "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--steps", "12", "--num-experts", "16",
                  "--num-groups", "8", "--rank", "2", "--top-k", "2", "--burn-in", "4", "--recluster-interval", "4",
                  "--eval-every", "0", "--eval-batches", "1", "--max-train-tokens", "20000"),
    },
    variants=_variants(32, 2, 2),
    d_ff=32,
)

# every shift task: the cpu preset's model; clustered at step 60, regroup checks every 40 steps, so the
# dynamic rules check three times before the shift and at least three times after it; both corpora
# evaluated every 40 steps. Sized for 2 cores (timed 2026-12-06 on a shared, loaded machine, one run at a
# time, so upper bounds): at the first sizes (burn-in 100, T 50, 600/600/480 steps) one run of each
# scenario took 158 s + 295 s + 987 s (WikiText-2 -> SST-2: its 35k-word output layer is most of a step;
# 411 s when rerun under less load), 5-12 h for the 90 runs one at a time; at these sizes 40 s + 37 s +
# 153 s, about 2 h one at a time
_SHIFT = (*_MODEL_CPU, *_MOE_CPU, "--seq-len", "64", "--batch-size", "8", "--burn-in", "60",
          "--recluster-interval", "40", "--eval-every", "40", "--eval-batches", "4", "--final-eval-batches", "32")
_TOPICS = ("--data", "synthetic:topics=0-3", "--shift-data", "synthetic:topics=4-7")
SHIFT_RULES = ("switch", "dynamic", "static", "probe-free", "paper-regroup")
# the rule built for shifts: dynamic, with a regroup check whenever the per-expert load distribution moved
# by more than the threshold since the last check (measured every 10 steps) instead of every T steps
DRIFT_RULE = Variant("drift-trigger", "Dynamic, regroup check on load drift (TV > 0.25, core/drift.py)", "dynamic", 5,
                     flags=("--regroup-trigger", "drift", "--drift-threshold", "0.25", "--drift-every", "10"))

SHIFT = Preset(
    name="shift",
    description="a distribution shift mid-training, the cpu preset's model: d=128, 2 blocks, E=32, G=8, r=8",
    tasks={
        # (i) topic shift: documents of topics 0-3, then of topics 4-7 from step 181 on
        "topic": (*_TOPICS, "--steps", "360", "--shift-step", "180", *_SHIFT),
        # (ii) gradual drift: the same bands, topics 4-7's share of every batch rising linearly
        # over steps 101-280 (a 180-step ramp)
        "drift": (*_TOPICS, "--steps", "360", "--shift-step", "100", "--shift-ramp", "180", *_SHIFT),
        # (iii) domain shift: WikiText-2, then SST-2's phrases as text from step 141 on
        "domain": ("--data", "{data}/wikitext-2", "--shift-data", "{data}/sst2", "--steps", "260",
                   "--shift-step", "140", *_SHIFT),
    },
    variants=tuple(replace(v, seeds=5) for v in _variants(512, 2, 5) if v.name in SHIFT_RULES) + (DRIFT_RULE,),
    sequential=(),
)

PRESETS: Dict[str, Preset] = {p.name: p for p in (CPU, PAPER, SMOKE, SHIFT)}
