"""What the main job tells its user (trilemma_moe.training): help text, start notes, the clustering
counts in event lines, summary and table, the evaluation bar, DeepSpeed's own optimizer-step keys."""
import json
import re

import pytest
import torch

from trilemma_moe import train
from trilemma_moe.data import eval_batches, num_eval_batches
from trilemma_moe.models import GPT

TINY = ["--d-model", "32", "--d-ff", "64", "--layers", "2", "--heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--num-experts", "4", "--num-groups", "2", "--rank", "4",
        "--burn-in", "3", "--recluster-interval", "2", "--eval-every", "4", "--eval-batches", "2",
        "--no-progress", "--threads", "1"]


def _help_of(text, flag):
    """The help text of ``flag`` in ``--help`` output with whitespace collapsed."""
    m = re.search(rf"(?:^| ){re.escape(flag)} [A-Z_]+ (.*?)(?= --[a-z]| [a-z][a-z ]*:|$)", text)
    assert m, flag
    return m.group(1)


def test_help_shows_each_default_once():
    text = " ".join(train.build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for flag, value in [("--d-model", "128"), ("--d-ff", "512"), ("--layers", "2"), ("--heads", "4"),
                        ("--seq-len", "64"), ("--batch-size", "16"), ("--weight-decay", "0.01"),
                        ("--seed", "0"), ("--num-experts", "16"), ("--burn-in", "200"), ("--steps", "800")]:
        h = _help_of(text, flag)
        assert h.count("default") == 1 and f"(default: {value})" in h, (flag, h)
    # every flag with a help text names its default at most once
    for action in train.build_parser()._actions:
        if action.option_strings and action.help:
            shown = train.build_parser().formatter_class("x")._get_help_string(action) % vars(action)
            assert shown.count("(default") <= 1, (action.option_strings, shown)
            assert action.help.strip(), action.option_strings


def test_run_that_ends_in_burn_in_says_so(tmp_path, capsys):
    out = tmp_path / "s.json"
    summary = train.main(["--steps", "3", "--summary-json", str(out)] + TINY)   # burn-in 3
    stdout = capsys.readouterr().out
    assert "note: the run ends at step 3, before the burn-in (3 steps) does: no clustering, no compression" \
        in stdout
    assert summary["compression_ratio"] == 1.0 and summary["compressed"] is False
    assert summary["first_clusterings"] == 0 and summary["regroups_applied"] == 0
    assert summary["total_params"] == summary["total_params_start"]
    assert "none (the run ended in the burn-in)" in stdout and "total params at end (not compressed)" in stdout
    train.main(["--steps", "4"] + TINY)
    assert "before the burn-in" not in capsys.readouterr().out


def test_first_clustering_regroups_and_skipped_checks_are_named_apart(tmp_path, capsys):
    # the main job as a user runs it, with regroup checks asked for (--ffn dynamic): the default
    # clusters once, and this report must name first clusterings, regroups and skipped checks apart
    summary = train.main(["--ffn", "dynamic", "--steps", "8"] + TINY)   # burn-in 3, checks at steps 6 and 8
    stdout = capsys.readouterr().out
    assert summary["first_clusterings"] == 2 and summary["compressed"] is True
    assert summary["reclusters"] == summary["first_clusterings"] + summary["regroups_applied"]
    assert summary["regroups_applied"] + summary["skipped_reclusters"] == 2 * 2   # 2 checks x 2 layers
    assert "[step 4] first clustering + compression in 2 layer(s) (2 of 2 clustered): gain=" in stdout
    assert re.search(rf"^regroups applied +{summary['regroups_applied']}$", stdout, re.M)
    assert re.search(rf"^regroup checks skipped +{summary['skipped_reclusters']}$", stdout, re.M)
    assert "first clustering" in stdout and "2 of 2 layers" in stdout and "reclusters" not in stdout
    # the start line's parameter count is before compression, the summary's after
    assert "before compression: full experts until the first clustering" in stdout
    assert summary["total_params_start"] > summary["total_params"]
    assert summary["expert_params_start"] > summary["expert_params"]

    cfg = tmp_path / "moe.yaml"   # delta 0: every check regroups (the flags set the rest)
    cfg.write_text("delta: 0.0\n")
    summary = train.main(["--ffn", "dynamic", "--steps", "8", "--config", str(cfg)] + TINY)
    stdout = capsys.readouterr().out
    assert summary["regroups_applied"] == 4 and summary.get("skipped_reclusters", 0) == 0
    assert "[step 6] regroup applied in 2 layer(s) (2 so far):" in stdout
    assert "[step 8] regroup applied in 2 layer(s) (4 so far):" in stdout
    # experts moved by those regroups: the summary's count is its events' sum, and both are printed
    assert summary["experts_moved"] == sum(e["moved"] for e in summary["regroup_events"])
    assert all(e["step"] in (5, 7) and 0 <= e["layer"] < 2 and e["moved"] > 0 for e in summary["regroup_events"])
    assert re.search(rf"^experts moved by regroups +{summary['experts_moved']}$", stdout, re.M)
    assert summary["regroup_seconds"] > 0 and "regroup wall time (s)" in stdout


def test_baselines_report_no_clustering(capsys):
    summary = train.main(["--ffn", "switch", "--steps", "2"] + TINY)
    stdout = capsys.readouterr().out
    assert "first_clusterings" not in summary and "before compression" not in stdout
    assert "regroups applied" not in stdout and "total params " in stdout


def test_summary_seed_is_the_seed_that_ran(tmp_path, capsys):
    """--seed seeds the data, the model and the MoE layers; TrilemmaMoEConfig.seed does not
    reach the main job's layers (the summary says which one ran, a config's seed gets a note)."""
    cfg = tmp_path / "moe.yaml"
    cfg.write_text("num_experts: 4\nnum_groups: 2\nrank: 4\nburn_in: 3\nseed: 99\n")
    short = ["--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2", "--seq-len", "16",
             "--batch-size", "4", "--eval-batches", "1", "--no-progress", "--threads", "1", "--steps", "4"]
    a = train.main(["--config", str(cfg), "--seed", "5"] + short)
    assert "note: the MoE layers take --seed 5, not seed 99 of the config" in capsys.readouterr().out
    assert a["config"]["seed"] == 5
    cfg.write_text("num_experts: 4\nnum_groups: 2\nrank: 4\nburn_in: 3\nseed: 7\n")
    b = train.main(["--config", str(cfg), "--seed", "5"] + short)
    assert b["loss_curve"] == a["loss_curve"]   # the config's seed changed nothing


def test_evaluation_shows_a_bar_unless_asked_not_to(capsys):
    torch.manual_seed(0)
    model = GPT(50, d_model=16, n_layers=1, n_heads=2, seq_len=8, d_ff=32, ffn_kind="dense")
    data = torch.randint(0, 50, (1000,))
    assert num_eval_batches(data, 8, 5) == len(list(eval_batches(data, 8, 5))) == 25
    assert num_eval_batches(data, 8, 5, max_batches=3) == 3
    quiet = train.evaluate(model, data, 8, 5)
    assert capsys.readouterr().err == ""
    shown = train.evaluate(model, data, 8, 5, progress=True, desc="valid (whole split)")
    err = capsys.readouterr().err
    assert "valid (whole split)" in err and "/25" in err
    assert shown == quiet


def test_deepspeed_section_must_agree_with_deepspeeds_own_keys(tmp_path, capsys, dist_world_1):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                              "trilemma_moe": {"num_experts": 4, "num_groups": 2, "rank": 4,
                                               "gradient_accumulation_steps": 2}}))
    with pytest.raises(SystemExit) as exc:
        train.main(["--deepspeed_config", str(ds), "--steps", "1", "--d-model", "32", "--d-ff", "64",
                    "--layers", "1", "--heads", "2", "--seq-len", "16", "--no-progress", "--threads", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"trilemma_moe.train: error: --deepspeed_config: {ds}: the 'trilemma_moe' section sets "
                   f"gradient_accumulation_steps=2 but DeepSpeed runs with gradient_accumulation_steps=1: "
                   f"set DeepSpeed's own 'gradient_accumulation_steps'"), err


def test_backends_fit_the_protocol():
    """Both backends have every method the loop calls, with the protocol's parameters."""
    import inspect

    from trilemma_moe.training.backend import Backend, TorchBackend
    from trilemma_moe.training.deepspeed_backend import DeepSpeedBackend
    declared = {n: m for n, m in vars(Backend).items() if not n.startswith("_") and inspect.isfunction(m)}
    assert {"prepare", "setup", "set_lr", "forward_backward", "optimizer_step", "save", "load"} <= set(declared)
    for cls in (TorchBackend, DeepSpeedBackend):
        assert isinstance(getattr(cls, "device"), property), cls
        for name, member in declared.items():
            wanted = list(inspect.signature(member).parameters)[1:]
            assert list(inspect.signature(getattr(cls, name)).parameters)[1:] == wanted, (cls, name)
