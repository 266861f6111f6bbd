"""``trilemma-moe reproduce``: the plan of a preset, skip/resume, aggregation against a plain
recomputation from the runs' JSON files, and the report's numbers traceable to them."""
import json
import math
import random

import pytest
import torch

from trilemma_moe.reproduce import analyse, main
from trilemma_moe.reproduce.presets import PRESETS
from trilemma_moe.reproduce.runner import available, plan


def _tiny_wikitext(root):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    d = root / "wikitext-2"
    d.mkdir(parents=True)
    for name, lines in (("train", 600), ("valid", 60), ("test", 60)):
        with open(d / f"wiki.{name}.tokens", "w") as f:
            for _ in range(lines):
                f.write(" ".join(rng.choice(words[:50] if rng.random() < 0.5 else words) for _ in range(40)) + "\n")
    return root


def test_cpu_preset_plans_every_variant_with_three_seeds_for_static_dynamic_switch():
    runs = plan(PRESETS["cpu"], "/out", "/data")
    per = {}
    for r in runs:
        per.setdefault((r.task, r.variant.name), []).append(r.seed)
    for task in ("lm", "sst2"):
        for v in ("static", "dynamic", "switch"):   # static: our default; dynamic: the paper's "ours"
            assert per[(task, v)] == [0, 1, 2]
        for v in ("dense", "int4", "random-groups", "full-experts", "flat-routing"):
            assert per[(task, v)] == [0]
        assert ((task, "deepspeed") in per) == available(PRESETS["cpu"].variants[2])
    speed = sorted((r.variant.name, r.seed) for r in runs if r.task == "speed")
    assert speed == sorted((v.name, 0) for v in PRESETS["cpu"].variants if available(v))
    lm = next(r for r in runs if r.task == "lm" and r.variant.name == "dynamic")
    assert "/data/wikitext-2" in lm.argv and "--test" in lm.argv and "--measure-memory" in lm.argv
    dense = next(r for r in runs if r.variant.name == "dense")
    assert dense.argv[dense.argv.index("--ffn") + 1:][:3] == ["dense", "--d-ff", "1024"]   # k * d_ff


def test_mean_std_is_the_sample_statistics():
    vals = [random.Random(s).uniform(0, 10) for s in range(5)]
    m = analyse.mean_std(vals)
    ref = torch.tensor(vals, dtype=torch.float64)
    assert math.isclose(m["mean"], float(ref.mean()), rel_tol=1e-12)
    assert math.isclose(m["std"], float(ref.std(unbiased=True)), rel_tol=1e-12)
    assert math.isnan(analyse.mean_std([3.0])["std"])


def test_switch_bytes_are_one_copy_per_remote_expert(tmp_path):
    """All tokens choose experts {0, 1} (rank 0's at ep 8, E=16): a token from rank r != 0 sends
    two rows of d bf16 values out and gets two back; 7 of 8 source ranks are remote."""
    T, d = 4096, 16
    experts = torch.tensor([[0, 1]]).expand(T, 2).unsqueeze(1)
    torch.save({"num_experts": 16, "num_groups": 8, "top_k": 2, "group_top_k": 1, "hidden_size": d,
                "layers": [{"group_idx": torch.zeros(T, 1, dtype=torch.long), "expert_idx": experts}]},
               tmp_path / "r.pt")
    got = analyse.a2a_bytes_per_token(str(tmp_path / "r.pt"), flat=True)
    assert math.isclose(got, 7 / 8 * 2 * 2 * d * analyse.ELEM_BYTES, rel_tol=1e-12)


@pytest.mark.timeout(600)
def test_smoke_preset_runs_resumes_and_reports_traceable_numbers(tmp_path, capsys):
    data = _tiny_wikitext(tmp_path / "data")
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    # dynamic: the runs regroup, so the group-membership figure has something to draw
    argv = ["--preset", "smoke", "--tasks", "lm", "--variants", "dynamic", "switch", "--data-root", str(data),
            "--out", str(out), "--results", str(results), "--jobs", "2", "--no-progress"]
    res = main(argv)
    assert not res["failed"]
    summaries = sorted(p for p in out.glob("runs/lm/*/seed*.json") if p.name.count(".") == 1)
    assert len(summaries) == 4
    text = results.read_text()
    # the report's valid PPL of dynamic is the mean of the two runs' JSON values, to its printed digits
    vals = [json.load(open(out / "runs" / "lm" / "dynamic" / f"seed{s}.json"))["valid_ppl"] for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| Ours, dynamic regrouping"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[4].startswith(f"{sum(vals) / 2:,.1f} ± ")
    for fig in ("ppl_vs_step", "expert_load", "group_membership", "params_vs_quality"):
        assert (out / f"{fig}.png").stat().st_size > 5000 and f"({fig}.png)" in text.replace("out/", "")
    # resume: nothing reruns; a changed or lost run reruns alone
    mtimes = {p: p.stat().st_mtime_ns for p in summaries}
    capsys.readouterr()
    main(argv)
    assert "4 of 4 runs already done" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    lost = out / "runs" / "lm" / "switch" / "seed1.json"
    lost.unlink()
    main(argv)
    assert "3 of 4 runs already done" in capsys.readouterr().out
    assert lost.exists()
    # the routing files stay out of the repository: the report rebuilt without them keeps the bytes
    before = [line for line in results.read_text().splitlines() if line.startswith("| Ours, dynamic regrouping")]
    for p in out.glob("runs/lm/*/*.routing.pt"):
        p.unlink()
    main(argv + ["--report-only"])
    after = [line for line in results.read_text().splitlines() if line.startswith("| Ours, dynamic regrouping")]
    assert after == before and "(×0." in after[0].split("|")[10]


@pytest.mark.timeout(300)
def test_speed_pass_runs_after_the_others_one_at_a_time(tmp_path, capsys):
    data = _tiny_wikitext(tmp_path / "data")
    res = main(["--preset", "smoke", "--tasks", "speed", "lm", "--variants", "dynamic", "--data-root", str(data),
                "--out", str(tmp_path / "out"), "--results", str(tmp_path / "R.md"), "--jobs", "2", "--no-progress"])
    assert not res["failed"]
    done = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("done ")]
    assert done[-1] == "speed/dynamic/seed0" and len(done) == 3
    speed = json.load(open(tmp_path / "out" / "runs" / "speed" / "dynamic" / "seed0.json"))
    assert res["aggregate"]["speed"]["dynamic"]["tokens_per_s"]["mean"] == speed["tokens_per_s_second_half"]


def test_missing_data_names_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--data-root"):
        main(["--preset", "smoke", "--tasks", "lm", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
              "--results", str(tmp_path / "R.md"), "--no-progress"])


def test_paper_preset_refuses_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the paper preset would run")
    with pytest.raises(SystemExit, match="GPU cluster"):
        main(["--preset", "paper", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
              "--results", str(tmp_path / "R.md"), "--no-progress"])


# --- the shift preset's report --------------------------------------------------------------------
def _t975_by_integration(df):
    """t(0.975; df) from Student's density: Simpson's rule for the CDF, bisection for the quantile."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf_above_zero(x, n=4000):
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_zero(mid) < 0.475 else (lo, mid)
    return lo


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_quantile_matches_the_density(df):
    assert analyse.t975(df) == pytest.approx(_t975_by_integration(df), abs=2e-3)


def _fake_shift_run(out, run, rng):
    """A run's files as the trainer and runner write them; the numbers are test inputs."""
    s = {"ffn": run.variant.ffn, "train_time_s": 100.0, "config": {"num_groups": 8}, "shift_step": 300,
         "shift_ramp": 0, "valid_ppl": rng.uniform(20, 30),
         "history": [{"step": k * 50, "valid_ppl": rng.uniform(20, 40), "shift_valid_ppl": rng.uniform(20, 90)}
                     for k in range(1, 13)],
         "load_history": [{"step": k * 10, "counts": [[rng.randint(0, 50) for _ in range(32)]] * 2} for k in range(60)]}
    for key in analyse.SHIFT_METRICS:
        s[key] = rng.uniform(0.5, 40)
    import os
    os.makedirs(os.path.dirname(run.summary), exist_ok=True)
    json.dump(s, open(run.summary, "w"))
    json.dump({"argv": run.argv, "wall_s": 60.0}, open(run.sidecar, "w"))
    return s


def test_shift_report_pairs_seeds_against_static_with_t_intervals(tmp_path):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Main comparison\n\nkept\n\n## Distribution shift\n\nstale\n\n## Seeds\n\nkept too\n")
    out.mkdir()
    (out / "results.json").write_text('{"preset": "cpu"}')   # the cpu report's raw numbers: left alone
    runs = [r for r in plan(PRESETS["shift"], str(out), str(tmp_path)) if r.task in ("topic", "domain")]
    rng = random.Random(5)
    summaries = {(r.task, r.variant.name, r.seed): _fake_shift_run(out, r, rng) for r in runs}
    main(["--preset", "shift", "--report-only", "--out", str(out), "--results", str(results), "--data-root", str(tmp_path),
          "--no-progress"])
    text = results.read_text()
    assert (out / "results.json").read_text() == '{"preset": "cpu"}'
    assert json.loads((out / "results_shift.json").read_text())["preset"] == "shift"
    # the shift section replaces the stale one; the rest of the report stays
    assert "kept\n" in text and "kept too" in text and "stale" not in text and text.count("## Distribution shift") == 1
    section = text[text.index("## Distribution shift"):text.index("## Seeds")]
    for task in ("topic", "domain"):
        part = section[section.index(f"({'i' if task == 'topic' else 'iii'})"):]
        for v in ("dynamic", "drift-trigger", "switch"):
            label = next(x.label for x in PRESETS["shift"].variants if x.name == v)
            row = next(line for line in part.splitlines() if line.startswith(f"| {label} |"))
            cells = [c.strip() for c in row.split("|")[2:-1]]
            for cell, (key, digits) in zip(cells, ((k, d) for k, _, d in (
                    ("post_shift_valid_ppl", 0, 2), ("first_corpus_valid_ppl_end", 0, 2),
                    ("post_shift_train_loss", 0, 4), ("post_shift_load_cv", 0, 3)))):
                diffs = [summaries[(task, v, s)][key] - summaries[(task, "static", s)][key] for s in range(5)]
                ref = torch.tensor(diffs, dtype=torch.float64)
                half = 2.776 * float(ref.std(unbiased=True)) / math.sqrt(5)   # t(0.975; 4), from a printed table
                m = float(ref.mean())
                assert cell == f"{m:+.{digits}f} [{m - half:+.{digits}f}, {m + half:+.{digits}f}]", (task, v, key)
            per_seed = [summaries[(task, v, s)]["post_shift_valid_ppl"] - summaries[(task, "static", s)]["post_shift_valid_ppl"]
                        for s in range(5)]
            assert cells[4] == ", ".join(f"{d:+.2f}" for d in per_seed) and cells[5] == "5"
    for fig in ("shift_topic_valid_ppl", "shift_topic_expert_load", "shift_domain_valid_ppl"):
        assert (out / f"{fig}.png").stat().st_size > 5000 and f"{fig}.png)" in section
