"""Check what README and the getting-started page say the main job prints against a fresh run of
the main job, as written (`python -m trilemma_moe.train`, torch's default thread count). Run it by
hand on an idle machine, not in CI (a run takes minutes, and its speed depends on the machine):

    python benchmarks/check_main_job.py            # exit 1 and a list of differences if any
    python benchmarks/check_main_job.py --write    # put this run's output into both pages

Every printed line the pages quote must be printed as it is, except the timing figures (tokens/s,
train time, regroup wall time), which are compared within --tolerance, and the run's wall time,
compared with README's "about N minutes".
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
COMMAND = [sys.executable, "-m", "trilemma_moe.train", "--no-progress"]   # the bar goes to stderr only
TIMED = ("tokens/s", "train time (s)", "regroup wall time (s)")
RULE = "-" * 56
MINUTES = re.compile(r"about ([\d.]+) minutes? on 2 idle cores")
DATE = re.compile(r"2 torch threads;\s*(\d{4}-\d{2}-\d{2})\)")


def summary_table(stdout: str) -> str:
    """The summary table with its two rules, as the trainer prints it."""
    start = stdout.index(RULE)
    end = stdout.index(RULE, start + len(RULE)) + len(RULE)
    return stdout[start:end]


def text_blocks(page: str) -> list[tuple[int, int]]:
    """(start, end) of the body of every ```text block of a page that quotes the summary table."""
    spans = []
    for m in re.finditer(r"```text\n(.*?)```", page, re.S):
        if RULE in m.group(1):
            spans.append((m.start(1), m.end(1)))
    return spans


def timed_value(line: str):
    for name in TIMED:
        if line.startswith(name):
            return name, float(line[len(name):].strip().replace(",", ""))
    return None


def differences(quoted: str, fresh: str, tolerance: float) -> list[str]:
    """Quoted lines the fresh output does not print (timings within tolerance)."""
    fresh_lines = fresh.splitlines()
    fresh_timed = dict(filter(None, map(timed_value, fresh_lines)))
    out = []
    for line in quoted.splitlines():
        t = timed_value(line)
        if t is not None:
            name, value = t
            now = fresh_timed.get(name)
            if now is None or abs(now - value) > tolerance * max(value, 1e-9):
                out.append(f"{name}: the page says {value:g}, this run printed {now}")
        elif line.strip() and line not in fresh_lines:
            out.append(f"not printed: {line!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="write this run's output into README and the page")
    p.add_argument("--tolerance", type=float, default=0.3, help="relative tolerance of the timing figures")
    args = p.parse_args(argv)

    began = time.perf_counter()
    run = subprocess.run(COMMAND, cwd=ROOT, capture_output=True, text=True)
    minutes = (time.perf_counter() - began) / 60
    if run.returncode != 0:
        print(run.stdout[-2000:] + run.stderr[-4000:], file=sys.stderr)
        return 2
    stdout = run.stdout[:run.stdout.index(RULE)] + summary_table(run.stdout)
    fresh = {README: summary_table(stdout), GETTING_STARTED: stdout}
    print(f"ran {' '.join(COMMAND[1:])} in {minutes:.2f} min")

    problems = []
    for path, text in fresh.items():
        page = path.read_text()
        spans = text_blocks(page)
        if len(spans) != 1:
            problems.append(f"{path.name}: expected one ```text block quoting the summary table, found {len(spans)}")
            continue
        (a, b), = spans
        if args.write:
            page = page[:a] + text.rstrip("\n") + "\n" + page[b:]
            page = DATE.sub(lambda m: m.group(0).replace(m.group(1), datetime.date.today().isoformat()), page)
            rounded = max(1.0, round(minutes * 2) / 2)
            page = MINUTES.sub(f"about {rounded:g} minute{'' if rounded == 1 else 's'} on 2 idle cores", page)
            path.write_text(page)
            continue
        problems += [f"{path.name}: {d}" for d in differences(page[a:b], text, args.tolerance)]
        said = MINUTES.search(page)
        if path == README and (said is None or abs(float(said.group(1)) - minutes) > max(0.5, 0.3 * minutes)):
            problems.append(f"README: says {said.group(0) if said else 'no duration'}, the run took {minutes:.1f} min")
    for line in problems:
        print(line)
    print("written" if args.write else ("differences: %d" % len(problems) if problems else "all figures match"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
