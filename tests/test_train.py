"""Data pipeline, trainer and CLI (trilemma_moe.data / train / cli)."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from test_expert_parallel import free_port
from trilemma_moe import cli, train
from trilemma_moe.data import (EOS, UNK, BatchSampler, SyntheticTopicCorpus, eval_batches,
                               load_wikitext)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT2 = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")   # beside the checkout, as in test_sst2
TINY = ["--d-model", "32", "--d-ff", "64", "--layers", "2", "--heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--num-experts", "4", "--num-groups", "2", "--rank", "4",
        "--burn-in", "3", "--recluster-interval", "2", "--eval-every", "4", "--eval-batches", "2",
        "--no-progress", "--threads", "1"]
REQUIRED = ("final_train_loss", "valid_ppl", "total_params", "expert_params", "tokens_per_s",
            "load_cv", "reclusters", "ffn", "steps", "data")


# --- data ----------------------------------------------------------------------------------
def test_synthetic_corpus_deterministic_and_structured():
    a = SyntheticTopicCorpus(seed=0)
    b = SyntheticTopicCorpus(seed=0)
    c = SyntheticTopicCorpus(seed=1)
    assert a.train.numel() == 400_000 and a.valid.numel() == 40_000
    assert a.train.dtype == torch.long and a.vocab_size == 512 == len(a.vocab)
    assert torch.equal(a.train, b.train) and torch.equal(a.valid, b.valid)
    assert not torch.equal(a.train[:1000], c.train[:1000])
    assert int(a.train.min()) >= 0 and int(a.train.max()) < 512
    assert not torch.equal(a.train[:40_000], a.valid)
    # documents end with <eos>; there is structure beyond unigrams: bigram entropy well below
    # unigram entropy
    tr = a.train
    assert 0 < int((tr == 0).sum()) < tr.numel() // 30
    uni = torch.bincount(tr, minlength=512).double()
    pu = uni / uni.sum()
    h1 = float(-(pu[pu > 0] * pu[pu > 0].log()).sum())
    pairs = torch.bincount(tr[:-1] * 512 + tr[1:], minlength=512 * 512).double().view(512, 512)
    cond = pairs / pairs.sum(1, keepdim=True).clamp_min(1)
    joint = pairs / pairs.sum()
    m = joint > 0
    h2 = float(-(joint[m] * cond[m].log()).sum())
    assert h2 < h1 - 1.0


def _write_wikitext(tmp_path, train, valid, test):
    for name, text in (("wiki.train.tokens", train), ("wiki.valid.tokens", valid),
                       ("wiki.test.tokens", test)):
        (tmp_path / name).write_text(text)


def test_load_wikitext_recipe(tmp_path):
    _write_wikitext(tmp_path, " \n = A = \n \n the cat sat \n the dog \n", " the bird \n\n", "cat\n")
    c = load_wikitext(str(tmp_path))
    assert c.vocab[0] == EOS and UNK in c.vocab
    words = [c.vocab[i] for i in c.train.tolist()]
    assert words == ["=", "A", "=", EOS, "the", "cat", "sat", EOS, "the", "dog", EOS]
    assert [c.vocab[i] for i in c.valid.tolist()] == ["the", UNK, EOS]
    assert [c.vocab[i] for i in c.test.tolist()] == ["cat", EOS]
    assert c.vocab[1:3] == ["=", "the"]  # by frequency, ties in first-seen order
    short = load_wikitext(str(tmp_path), max_train_tokens=5)
    assert short.train.numel() == 5 and short.vocab == c.vocab


def test_load_wikitext_missing_file(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text("a b\n")
    with pytest.raises(FileNotFoundError, match="wiki.valid.tokens") as exc:
        load_wikitext(str(tmp_path))
    assert "--data" in str(exc.value)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("text", ["", " \n\n\t \n"], ids=["empty", "whitespace"])
def test_load_wikitext_empty_split_named(tmp_path, split, text):
    files = {"train": "the cat sat\n", "valid": "the cat\n", "test": "cat\n"}
    files[split] = text
    _write_wikitext(tmp_path, files["train"], files["valid"], files["test"])
    with pytest.raises(ValueError) as exc:
        load_wikitext(str(tmp_path))
    assert str(exc.value).startswith(f"{tmp_path / f'wiki.{split}.tokens'} is empty"), str(exc.value)


def test_load_wikitext_not_utf8_named(tmp_path):
    _write_wikitext(tmp_path, "a b\n", "a\n", "a\n")
    (tmp_path / "wiki.valid.tokens").write_bytes(b"a \xff\xfe b\n")
    with pytest.raises(ValueError, match="not UTF-8") as exc:
        load_wikitext(str(tmp_path))
    assert str(tmp_path / "wiki.valid.tokens") in str(exc.value)


def test_batch_sampler_and_eval_batches():
    data = torch.arange(1000)
    s = BatchSampler(data, seq_len=10, batch_size=6, seed=3)
    x, y = next(s)
    assert x.shape == y.shape == (6, 10)
    assert torch.equal(y, x + 1)  # contiguous windows, shifted by one
    x2, _ = next(BatchSampler(data, seq_len=10, batch_size=6, seed=3))
    assert torch.equal(x, x2)
    batches = list(eval_batches(data, seq_len=10, batch_size=7))
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert xs.shape == (99, 10)  # (1000 - 1) // 10 non-overlapping windows
    assert torch.equal(xs.reshape(-1), data[:990]) and torch.equal(ys.reshape(-1), data[1:991])
    assert len(list(eval_batches(data, 10, 7, max_batches=2))) == 2
    with pytest.raises(ValueError):
        BatchSampler(torch.arange(5), seq_len=10, batch_size=2)


def test_lr_schedule():
    assert train.lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert train.lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert train.lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert train.lr_at(99, 100, 1.0, 10, 0.1) == pytest.approx(0.1, abs=1e-3)
    vals = [train.lr_at(s, 100, 1.0, 10, 0.1) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# --- trainer -------------------------------------------------------------------------------
def _check_summary(summary, path, kind, steps):
    on_disk = json.loads(open(path).read())
    for key in REQUIRED:
        assert key in summary and key in on_disk, key
    assert on_disk["ffn"] == kind and on_disk["steps"] == steps
    for key in ("final_train_loss", "valid_ppl", "tokens_per_s", "load_cv"):
        assert math.isfinite(on_disk[key]), key
    assert on_disk["valid_ppl"] > 1 and on_disk["tokens_per_s"] > 0
    assert on_disk["total_params"] >= on_disk["expert_params"] >= 0


# 30 steps at lr 1e-2 on the synthetic corpus (ln 512 = 6.24 at init): the final train loss was
# 5.89 to 6.00 for dense, switch and deepspeed over seeds 0-2; a model that does not learn stays at 6.2
LEARNS = ["--steps", "30", "--lr", "1e-2"]
LEARNED_LOSS = math.log(512) - 0.15


@pytest.mark.parametrize("kind", ["dense", "switch"])
def test_train_baselines(tmp_path, kind):
    out = tmp_path / "s.json"
    summary = train.main(["--ffn", kind, *LEARNS, "--summary-json", str(out),
                          "--logdir", str(tmp_path / "tb")] + TINY)
    _check_summary(summary, out, kind, 30)
    assert summary["final_train_loss"] < LEARNED_LOSS, summary["loss_curve"]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    if kind == "dense":
        assert summary["expert_params"] == 0 and summary["reclusters"] == 0
    else:
        assert summary["expert_params"] > 0


@pytest.mark.parametrize("kind", ["ours", "static", "dynamic"])   # ours: the config's (static by default)
def test_train_ours(tmp_path, kind):
    out = tmp_path / "s.json"
    summary = train.main(["--ffn", kind, "--steps", "8", "--summary-json", str(out)] + TINY)
    _check_summary(summary, out, kind, 8)
    assert summary["reclusters"] >= 2  # first clustering in both layers after burn-in 3
    assert summary.get("compressed") is True
    # regroup checks (every 2 steps after it) only where asked for: ours takes the default, clusters once
    checks = summary["reclusters"] - summary["first_clusterings"] + summary.get("skipped_reclusters", 0)
    assert (checks > 0) is (kind == "dynamic"), (kind, summary)


@pytest.mark.parametrize("kind", ["switch", "ours"])
def test_train_loss_decreases_on_synthetic(tmp_path, kind):
    summary = train.main(["--ffn", kind, "--steps", "100", "--lr", "1e-2"] + TINY
                         + ["--eval-every", "0", "--eval-batches", "4", "--batch-size", "8"])
    assert summary["final_train_loss"] < math.log(512) - 0.6  # ln 512 = 6.24 at init
    assert summary["valid_loss"] < math.log(512) - 0.6


def _one_line_error(capsys, argv):
    """train.main(argv) must stop with exit status 2 and one stderr line: the error."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trilemma_moe.train: error: "), err
    return err


def test_train_missing_data_dir(tmp_path, capsys):
    err = _one_line_error(capsys, ["--data", str(tmp_path / "nope"), "--steps", "1"] + TINY)
    assert f"--data {str(tmp_path / 'nope')!r}: no such directory" in err
    err = _one_line_error(capsys, ["--data", str(tmp_path), "--steps", "1"] + TINY)
    assert str(tmp_path / "wiki.train.tokens") in err and "--data" in err


def test_train_empty_data_file(tmp_path, capsys):
    _write_wikitext(tmp_path, "the cat\n", "", "cat\n")
    err = _one_line_error(capsys, ["--data", str(tmp_path), "--steps", "1"] + TINY)
    assert f"{tmp_path / 'wiki.valid.tokens'} is empty" in err and "--data" in err


@pytest.mark.parametrize("text,expect", [
    ("trilemma-moe:\n  rank: 2\n", "section 'trilemma-moe' is misspelt: it must be called 'trilemma_moe'"),
    ("trilemma_moe:\n", "section 'trilemma_moe' must be a mapping of knobs, got null"),
    ("delta: .nan\n", "delta must be a finite number, got nan"),
], ids=["misspelt_section", "null_section", "nan_knob"])
def test_train_bad_config_file(tmp_path, capsys, text, expect):
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(text)
    err = _one_line_error(capsys, ["--config", str(cfg), "--steps", "1"] + TINY)
    assert err.startswith("trilemma_moe.train: error: --config") and str(cfg) in err and expect in err, err


def test_train_bad_deepspeed_config_file(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"Trilemma_MoE": {"rank": 2}}')
    err = _one_line_error(capsys, ["--deepspeed_config", str(ds), "--steps", "1"] + TINY)
    assert f"--deepspeed_config: {ds}: section 'Trilemma_MoE' is misspelt" in err
    ds.write_text('{"train_batch_size": 8,}')
    err = _one_line_error(capsys, ["--deepspeed_config", str(ds), "--steps", "1"] + TINY)
    assert f"{ds}: not valid JSON" in err


def _run_cli(module_args, port):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(port))
    return subprocess.run([sys.executable, "-m", *module_args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("entry", [["trilemma_moe.train"], ["trilemma_moe.cli", "train"]],
                         ids=["python-m", "trilemma-moe"])
def test_cli_missing_data_dir_is_one_line(tmp_path, entry):
    missing = str(tmp_path / "no_such_dir")
    proc = _run_cli(entry + ["--data", missing, "--steps", "1", "--no-progress"], free_port())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"trilemma_moe.train: error: --data {missing!r}: no such directory")


def test_cli_resume_from_bad_latest_is_one_line(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                              "trilemma_moe": {"num_experts": 4, "num_groups": 2, "rank": 4}}))
    ckpt = tmp_path / "ckpt"
    (ckpt / "step2").mkdir(parents=True)
    (ckpt / "latest").write_bytes(b"")   # DeepSpeed's own loader: a bare AssertionError
    proc = _run_cli(["trilemma_moe.train", "--deepspeed_config", str(ds), "--save-dir", str(ckpt), "--resume",
                     "--steps", "4", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2",
                     "--seq-len", "16", "--no-progress", "--threads", "1"], free_port())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"trilemma_moe.train: error: --resume: {ckpt / 'latest'} is empty: expected the tag of " \
                   f"a checkpoint folder in {ckpt}", proc.stderr


# Every input error of the main job, a number that can only be wrong (refused as it is parsed, by
# argparse) or a rule between flags: exit status 2 and one line `trilemma_moe.train: error: ...`
# naming the flag.
BAD_INPUTS = {
    "lr_nan": ["--lr", "nan"], "lr_inf": ["--lr", "inf"], "lr_negative": ["--lr", "-1"], "lr_zero": ["--lr", "0"],
    "steps_negative": ["--steps", "-5"], "steps_zero": ["--steps", "0"], "steps_not_int": ["--steps", "2.5"],
    "batch_size_zero": ["--batch-size", "0"], "seq_len_zero": ["--seq-len", "0"], "layers_zero": ["--layers", "0"],
    "d_model_negative": ["--d-model", "-8"], "moe_every_zero": ["--moe-every", "0"], "warmup_negative": ["--warmup", "-1"],
    "weight_decay_nan": ["--weight-decay", "nan"], "min_lr_ratio_above_1": ["--min-lr-ratio", "1.5"],
    "seed_negative": ["--seed", "-1"], "eval_every_negative": ["--eval-every", "-1"],
    "threads_zero": ["--threads", "0"], "save_every_negative": ["--save-every", "-1"],
    "num_experts_zero": ["--num-experts", "0"], "drift_threshold_inf": ["--drift-threshold", "inf"],
    "device_bogus": ["--device", "bogus"], "unknown_flag": ["--no-such-flag"],
    # rules between flags
    "sst2_deepspeed_config": ["--task", "sst2", "--deepspeed_config", "ds.json"],
    "sst2_max_train_tokens": ["--task", "sst2", "--max-train-tokens", "100"],
    "sst2_test": ["--task", "sst2", "--test"],
    "save_every_without_save_dir": ["--save-every", "2"], "resume_without_save_dir": ["--resume"],
    "heads_do_not_divide_d_model": ["--d-model", "30", "--heads", "4"],
    "rank_above_d_model": ["--rank", "40"], "ep_size_without_deepspeed": ["--ep-size", "2"],
    "max_train_tokens_below_seq_len": ["--max-train-tokens", "5"],
}
FLAG_NAMED = {"sst2_deepspeed_config": "--deepspeed_config", "sst2_max_train_tokens": "--max-train-tokens",
              "sst2_test": "--test", "heads_do_not_divide_d_model": "--heads"}   # else the last flag given


def _assert_one_error_line(code, err, flag):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]   # argparse's usage may come before it
    assert len(lines) == 1 and lines[0].startswith("trilemma_moe.train: error: ") and flag in lines[0], err


@pytest.mark.parametrize("case", list(BAD_INPUTS) + [pytest.param("device_cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is here"))])
def test_bad_input_is_one_error_line_and_exit_2(capsys, case):
    bad = BAD_INPUTS.get(case, ["--device", "cuda"])
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--steps", "2"] + bad)
    flag = FLAG_NAMED.get(case, [a for a in bad if a.startswith("--")][-1])
    _assert_one_error_line(exc.value.code, capsys.readouterr().err, flag)


@pytest.mark.parametrize("entry", [["trilemma_moe.train"], ["trilemma_moe.cli", "train"]],
                         ids=["python-m", "trilemma-moe"])
def test_cli_bad_number_is_one_error_line(entry):
    proc = _run_cli(entry + ["--lr", "nan"], free_port())
    _assert_one_error_line(proc.returncode, proc.stderr, "--lr")


def test_deepspeed_ep_size_the_world_does_not_hold_is_one_error_line(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                              "trilemma_moe": {"num_experts": 4, "num_groups": 2, "rank": 4}}))
    proc = _run_cli(["trilemma_moe.train", "--deepspeed_config", str(ds), "--ep-size", "2", "--steps", "2",
                     "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2", "--seq-len", "16",
                     "--no-progress", "--threads", "1"], free_port())
    _assert_one_error_line(proc.returncode, proc.stderr, "--ep-size")
    assert "must divide the number of ranks, 1" in proc.stderr, proc.stderr


def test_train_config_yaml(tmp_path):
    cfg = tmp_path / "moe.yaml"
    cfg.write_text("num_experts: 4\nnum_groups: 2\nrank: 2\nburn_in: 100\naux_loss_coef: 0.02\n")
    summary = train.main(["--ffn", "switch", "--steps", "2", "--config", str(cfg),
                          "--no-progress", "--d-model", "16", "--d-ff", "32", "--layers", "1",
                          "--heads", "2", "--seq-len", "8", "--batch-size", "2",
                          "--eval-batches", "1"])
    assert summary["config"]["aux_loss_coef"] == 0.02 and summary["config"]["rank"] == 2
    assert summary["config"]["burn_in"] == 100


@pytest.mark.skipif(not os.path.isdir(WIKITEXT2), reason="no WikiText-2 beside the checkout (../shared/data/wikitext-2)")
def test_train_wikitext2_short(tmp_path):
    out = tmp_path / "s.json"
    summary = train.main(["--data", WIKITEXT2, "--ffn", "switch", *LEARNS,
                          "--max-train-tokens", "20000", "--summary-json", str(out)] + TINY)
    _check_summary(summary, out, "switch", 30)
    assert "wikitext" in summary["data"]
    # uniform over WikiText-2's 33,278 words is ln V = 10.41 (the first step's loss); 30 steps
    # reach a valid loss of 7.72-7.76 (ppl ~2,300) over seeds 0-2
    assert summary["loss_curve"][0] == pytest.approx(math.log(33278), abs=0.1)
    assert summary["valid_loss"] < math.log(33278) - 2.0 and summary["valid_ppl"] == pytest.approx(
        math.exp(summary["valid_loss"]), rel=1e-6)


def test_train_deepspeed_ffn(tmp_path):
    out = tmp_path / "s.json"
    summary = train.main(["--ffn", "deepspeed", *LEARNS, "--summary-json", str(out)] + TINY)
    _check_summary(summary, out, "deepspeed", 30)
    assert summary["final_train_loss"] < LEARNED_LOSS, summary["loss_curve"]


# --- CLI -----------------------------------------------------------------------------------
def test_cli(tmp_path, capsys):
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    out = tmp_path / "s.json"
    assert cli.main(["train", "--ffn", "dense", "--steps", "2", "--summary-json", str(out)]
                    + TINY) == 0
    assert json.loads(out.read_text())["ffn"] == "dense"
