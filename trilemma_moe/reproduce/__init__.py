"""``trilemma-moe reproduce``: the paper's tables at a scale a machine runs (presets in
``presets.py``), every variant in the trainer's one harness, three seeds where the paper
reports spread; writes ``docs/RESULTS.md``, the raw JSON and the figures.

    trilemma-moe reproduce --preset cpu --data-root ../shared/data --jobs 2

Finished runs are skipped, so an interrupted preset picks up where it stopped
(``--report-only`` rebuilds the report from the runs on disk)."""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.shift import SYNTHETIC
from . import analyse, plots, tables
from .presets import PRESETS
from .runner import plan, run_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trilemma-moe reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="what to run (see presets.py)")
    p.add_argument("--data-root", default=os.path.join("..", "shared", "data"),
                   help="directory holding wikitext-2/ (wiki.*.tokens; paper preset: wikitext-103/) and sst2/ "
                        "(train.tsv)")
    p.add_argument("--out", default=os.path.join("docs", "results", "reproduce"),
                   help="runs, raw JSON and figures go here")
    p.add_argument("--results", default=os.path.join("docs", "RESULTS.md"), help="the report")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks (lm, sst2, speed; --preset shift: topic, drift, domain)")
    p.add_argument("--variants", nargs="*", default=None, help="only these variants")
    p.add_argument("--report-only", action="store_true", help="no training: rebuild the report from runs on disk")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _check_data(runs) -> None:
    """Every run's --data and --shift-data directory exists (one error naming --data-root and what
    is missing); the generated corpus (``synthetic[:...]``) needs none."""
    named = {r.argv[r.argv.index(flag) + 1] for r in runs for flag in ("--data", "--shift-data") if flag in r.argv}
    missing = sorted(d for d in named if not os.path.isdir(d) and d.split(":")[0] != SYNTHETIC)
    if missing:
        raise SystemExit(f"trilemma-moe reproduce: --data-root: missing {', '.join(missing)} (the preset reads "
                         f"WikiText (wiki.*.tokens, the word-level release) and GLUE SST-2 (train.tsv) from there)")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    tasks = args.tasks or list(preset.tasks)
    unknown = sorted(set(tasks) - set(preset.tasks))
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; preset {preset.name} has {sorted(preset.tasks)}")
    names = {v.name for v in preset.variants}
    if args.variants and set(args.variants) - names:
        raise SystemExit(f"--variants: unknown {sorted(set(args.variants) - names)}; known: {sorted(names)}")
    runs = plan(preset, args.out, args.data_root, tasks, args.variants)
    failed: List[str] = []
    if not args.report_only:
        if not preset.run_here and not torch.cuda.is_available():
            raise SystemExit(f"--preset {preset.name} is sized for a GPU cluster ({preset.description}); "
                             f"this machine has no CUDA device (use --preset cpu)")
        _check_data(runs)
        failed = run_all(runs, args.jobs, progress=not args.no_progress, sequential=preset.sequential)
    done = [r for r in runs if r.done()]
    if not done:
        raise SystemExit(f"no finished runs under {args.out}: nothing to report")
    records = [analyse.record(r) for r in done]
    agg = analyse.aggregate(records)
    figures = plots.make_all(records, agg, args.out)
    wall = sum(r.wall_s() for r in done)
    # the shift preset keeps its own raw file: the cpu report beside it links results.json
    raw = os.path.join(args.out, "results_shift.json" if preset.name == SHIFT_PRESET else "results.json")
    with open(raw + ".tmp", "w") as f:
        # per run: its numbers; the curves and histories stay in the run's own summary JSON
        slim = [{k: v for k, v in r.items() if k not in analyse.SERIES} for r in records]
        json.dump({"preset": preset.name, "aggregate": agg, "runs": slim}, f, indent=1)
    os.replace(raw + ".tmp", raw)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    previous = ""
    if os.path.exists(args.results):
        with open(args.results) as f:
            previous = f.read()
    if preset.name == SHIFT_PRESET:   # its own section of the report; the rest stays
        text = splice_section(previous, shift_section(preset, runs, done, failed, records, figures, raw, args, wall))
    else:   # the whole report, keeping a shift section already there
        text = report(preset, runs, done, failed, records, agg, figures, raw, args, wall)
        kept = section_of(previous, SHIFT_HEADING)
        text = splice_section(text, kept) if kept else text
    with open(args.results + ".tmp", "w") as f:
        f.write(text)
    os.replace(args.results + ".tmp", args.results)
    print(f"{len(done)} of {len(runs)} runs reported in {args.results} (raw: {raw})"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return {"aggregate": agg, "failed": failed, "results": args.results}


def report(preset, runs, done, failed, records, agg, figures, raw, args, wall) -> str:
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.results)))   # noqa: E731
    labels = {v.name: v.label for v in preset.variants}
    cmd = "trilemma-moe reproduce " + " ".join(shlex.quote(a) for a in (argv_of(args)))
    lines = [f"# Results: the paper's tables at the scale of the `{preset.name}` preset", "",
             f"Generated by `{cmd}` on {datetime.date.today().isoformat()} ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}); "
             f"{len(done)} of {len(runs)} runs, {wall / 60:.0f} minutes of run time summed over the runs, each "
             f"on one thread, {args.jobs} at a time (the speed pass one at a time). Every number comes from a summary JSON under `{rel(args.out)}/runs/<task>/<variant>/seed<k>.json` "
             f"(the trainer's command line beside it in `.cmd.json`, its output in `.log`); all of them in "
             f"[`{rel(raw)}`]({rel(raw)}).", ""]
    if failed:
        lines += [f"**Failed runs** (left out below): {', '.join(failed)}.", ""]
    lines += ["Recipes (the trainer's flags; `{data}` is `--data-root`):", ""]
    lines += [f"- `{task}`: `{' '.join(flags)}`" for task, flags in preset.tasks.items()]
    lines += ["", "Values are mean ± sample standard deviation over seeds where a variant has several; "
              "(×r) is the ratio to Switch-Top2 in this same preset. The paper's numbers are at another scale "
              "(WikiText-103, d=768, 12 layers, GPUs): compare the ratios, not the values.", "",
              f"**{tables.SST2_SLICE}.** GLUE's dev.tsv is not in `{{data}}/sst2`, so `trilemma_moe/data/sst2.py` "
              "holds out 872 rows of train.tsv that are no other row's contiguous sub-phrase (the whole sentences; "
              "the rest of the file is mostly their sub-phrases), stratified by label and drawn by a fixed generator "
              "(the same for every run and seed), and drops from training every row inside one of them. The "
              "paper's SST-2 column is GLUE dev-set accuracy; these are not comparable with it, nor with earlier "
              "versions of this report, whose slice was 872 random rows (mostly short phrases whose sentences "
              "were trained on; 0.897 there for the trainer's default SST-2 recipe, about 0.80 on GLUE's dev set).",
              ""]
    shift_runs = glob.glob(os.path.join(args.out, "runs", "*", "*", "seed*[0-9].json"))
    if any(OLD_SST2_SLICE in s for s in _sst2_text_sources(shift_runs)):   # the kept shift section's
        lines += ["The distribution-shift section at the end is not rerun since then: its WikiText-2 → SST-2 "
                  "scenario trained on SST-2's rows less the earlier 872 random rows, and its SST-2 perplexity is "
                  "on those rows.", ""]
    lines += ["## Main comparison (the paper's Table 2)", ""]
    lines += tables.main_table(agg, labels)
    lines += ["", "I_load is the coefficient of variation of the per-expert token counts (mean of the last 50 "
              "steps and the two layers). Peak training memory: what the training process held, its peak resident "
              "set size (`ru_maxrss`) up to the end of training, from the `speed` task when the preset has one "
              "(each variant alone on the machine; the process's interpreter, torch and the data are in it too: "
              "`rss_before_model_bytes_per_rank` in each run's JSON). All-to-all bytes: each run's recorded routing "
              "replayed at expert parallelism 8 on one node, bf16 activations (`trilemma-moe profile-comm`'s "
              "cost model). Regroup time: the share of training wall time spent clustering and in regroup checks. "
              "tokens/s: from the `speed` task when the preset has one (each variant alone on the machine, one "
              "thread, timed after its first clustering); the quality runs share the machine, so their own "
              "tokens/s (in their JSON) are not compared.",
              "", "### Beside the paper", "",
              "Our default clusters once after burn-in (static): no regroup rule beat it, here or after a "
              "distribution shift ([results at a glance](results.md#dynamic-regrouping-what-we-measured)). The paper's \"ours\" is its "
              "dynamic method; its row stands beside our default.", ""]
    lines += tables.beside_paper(agg)
    lines += ["", "### Paired with the default", "",
              "Each variant with several seeds minus the default (clustered once) on the same seed (same data, "
              "same initial experts), the mean over seeds and its 95 % t-interval; an interval that excludes 0 "
              "is a difference larger than seed-to-seed noise. Negative is better for perplexity.", ""]
    lines += tables.paired_table(records, labels)
    lines += ["", "## Ablations (the paper's Table 3)", "",
              "Each ablation removes one part from our default (clustered once); the paper's removes it from its "
              "dynamic method.", ""]
    lines += tables.rows_with_paper(agg, labels, tables.ABLATION_ROWS, tables.PAPER_ABLATION)
    lines += ["", "## Dynamic vs static clustering (the paper's Table 4)", ""]
    lines += tables.rows_with_paper(agg, labels, ("dynamic", "static"), tables.PAPER_DYNAMIC)
    lines += ["", "### Regroup rules against static clustering (docs/REGROUP.md)", "",
              "Ratios are to static clustering. Every rule shares static's first clustering; they differ in "
              "what a regroup check after it looks at (`regroup_similarity`) and what moving costs "
              "(`regroup_move_cost`).", ""]
    lines += tables.dynamic_table(agg, labels)
    lines += ["", "Each regroup that moved experts: the movers' relative reconstruction error after re-expression on "
              "their new group's base, and the mean training loss over the next 20 steps minus the static run's of "
              "the same seed over the same steps (negative: better). Up to a run's first regroup both runs are "
              "identical, so for it the static run *is* the run without that regroup.", ""]
    lines += tables.regroup_effects_table(analyse.regroup_effects(records), labels)
    lines += ["", "## Seeds (the paper's Table 5: three runs, ±0.2)", ""]
    lines += tables.seeds_table(records, agg)
    lines += ["", "## Checks against the acceptance targets", ""]
    lines += tables.checks(agg)
    if figures:
        lines += ["", "## Figures", ""]
        captions = {"ppl_vs_step": "WikiText-2 validation perplexity vs step (the first --eval-batches batches of the split per point; "
                                   "mean over seeds, min-max shaded)",
                    "sst2_accuracy_vs_step": "SST-2 accuracy vs step on the held-out slice (872 whole sentences of "
                                             "GLUE's training file, none of their phrases trained on; not GLUE's "
                                             "dev set)",
                    "expert_load": "Per-expert load over time (layer 0, seed 0)",
                    "group_membership": "Group membership over time: which expert sat in which group after "
                                        "each clustering (dynamic regrouping, seed 0)",
                    "params_vs_quality": "Total parameters vs quality (error bars: standard deviation over seeds)"}
        for name, path in figures.items():
            lines += [f"**{captions.get(name, name)}**", "", f"![{name}]({rel(path)})", ""]
    return "\n".join(lines).rstrip() + "\n"


SHIFT_PRESET, SHIFT_HEADING = "shift", "## Distribution shift"
SHIFT_SCENARIOS = {"topic": "(i) topic shift on the generated corpus", "drift": "(ii) gradual drift on the generated corpus",
                   "domain": "(iii) WikiText-2 → SST-2 phrases"}


def shift_section(preset, runs, done, failed, records, figures, raw, args, wall) -> str:
    """The shift preset's section of the report: per scenario, each rule's paired per-seed
    differences to static clustering with 95 % t-intervals, then the figures."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.results)))   # noqa: E731
    labels = {v.name: v.label for v in preset.variants}
    cmd = "trilemma-moe reproduce " + " ".join(shlex.quote(a) for a in argv_of(args))
    lines = [SHIFT_HEADING, "", f"Generated by `{cmd}` on {datetime.date.today().isoformat()} ({os.cpu_count()} CPU "
             f"cores, torch {torch.__version__}); {len(done)} of {len(runs)} runs, {wall / 60:.0f} minutes of run time "
             f"summed over the runs. Summaries under `{rel(args.out)}/runs/<scenario>/<rule>/seed<k>.json`, all numbers "
             f"in [`{rel(raw)}`]({rel(raw)}).", ""]
    if failed:
        lines += [f"**Failed runs** (left out below): {', '.join(failed)}.", ""]
    lines += ["Each cell is a rule's value minus static clustering's on the same seed (same data, same first "
              "grouping), the mean over seeds and its 95 % t-interval (Student's t over the paired differences); "
              "an interval that excludes 0 is a difference larger than seed-to-seed noise. Negative is better for "
              "perplexity and loss. Second corpus: the one trained on after the shift, at the end; first corpus: "
              "what is left of the first one at the end (forgetting); train loss: mean over the steps after the "
              "shift; load CV: per-expert load CV after the shift.", ""]
    for task, flags in preset.tasks.items():
        if not any(r["task"] == task for r in records):
            continue
        lines += [f"### {SHIFT_SCENARIOS.get(task, task)}", "", f"Recipe: `{' '.join(flags)}`", ""]
        lines += sst2_text_note([r.summary for r in done if r.task == task])
        lines += tables.shift_table(records, labels, task)
        for kind, caption in (("valid_ppl", "Validation perplexity of both corpora vs step (solid vertical: the shift; "
                                            "dotted: the end of the ramp)"),
                              ("expert_load", "Per-expert load over time, layer 0, seed 0: static beside the dynamic rules")):
            name = f"shift_{task}_{kind}"
            if name in figures:
                lines += ["", f"**{caption}**", "", f"![{name}]({rel(figures[name])})"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


OLD_SST2_SLICE = "fixed stratified 872-row slice"   # how runs before the whole-sentence slice name their SST-2 text


def _sst2_text_sources(summaries) -> set:
    """The runs' SST-2 text (``shift_data`` of their summaries, those that are SST-2's)."""
    sources = set()
    for path in summaries:
        with open(path) as f:
            sources.add(str(json.load(f).get("shift_data", "")))
    return {s for s in sources if s.startswith("sst2-text")}


def sst2_text_note(summaries) -> List[str]:
    """For a scenario whose second corpus is SST-2's text: which held-out slice its runs used,
    since its training text and its validation perplexity both depend on it."""
    sources = _sst2_text_sources(summaries)
    if not sources:
        return []
    if any(OLD_SST2_SLICE in s for s in sources):
        return ["**Not rerun since SST-2's held-out slice became whole sentences:** these runs trained on SST-2's "
                "rows as text less 872 random rows (mostly short phrases) and their repeats, and the second corpus's "
                "validation perplexity is on those 872 rows, not on the 872 whole sentences of the SST-2 columns "
                "above. Delete its runs and rerun `--preset shift --tasks domain` to update it.", ""]
    return ["Second corpus: SST-2's training rows as text, less 872 held-out whole sentences and every row inside one "
            "of them; its validation perplexity is on those 872 sentences (GLUE's training file, not its dev set).", ""]


def section_of(text: str, heading: str) -> Optional[str]:
    """The ``heading`` section of ``text`` (to the next heading of that level), None if absent."""
    start = text.find(heading + "\n")
    if start < 0:
        return None
    end = text.find("\n" + heading.split(" ")[0] + " ", start + len(heading))
    return text[start:] if end < 0 else text[start:end + 1]


def splice_section(text: str, section: str) -> str:
    """``text`` (a report) with its section of ``section``'s heading replaced by ``section``, or
    ``section`` appended when it has none."""
    old = section_of(text, section.split("\n", 1)[0])
    body = section.rstrip() + "\n"
    if old is None:
        return (text.rstrip() + "\n\n" if text.strip() else "") + body
    return text.replace(old, body + ("\n" if old.endswith("\n\n") else ""), 1)


def argv_of(args) -> List[str]:
    out = ["--preset", args.preset, "--data-root", args.data_root, "--jobs", str(args.jobs)]
    if args.tasks:
        out += ["--tasks", *args.tasks]
    if args.variants:
        out += ["--variants", *args.variants]
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
