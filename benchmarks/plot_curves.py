"""Validation perplexity against step from the trainer's --summary-json files.

    python benchmarks/plot_curves.py out/wt2_ours.json out/wt2_switch.json -o docs/wt2_gpu.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summaries", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in args.summaries:
        with open(path) as f:
            s = json.load(f)
        steps = [h["step"] for h in s["history"]]
        ppl = [h["valid_ppl"] for h in s["history"]]
        label = f"{s['ffn']} ({s['expert_params'] / 1e6:.0f}M expert params)"
        ax.plot(steps, ppl, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("valid perplexity")
    ax.set_yscale("log")
    ax.set_title(args.title or f"{s['data']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
