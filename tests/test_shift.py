"""A distribution shift in the LM task (issue 24): --data / --shift-data specs, the vocabulary over
both corpora, the switch and the ramp, evaluation on both corpora, input errors, resume after the
shift. Every check compares with a plain computation done here."""
import math
import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from trilemma_moe import train
from trilemma_moe.data import EOS, UNK, SyntheticTopicCorpus, load_wikitext
from trilemma_moe.training.args import build_parser, load_lm_data, moe_config
from trilemma_moe.training.backend import TorchBackend
from trilemma_moe.training.loop import build_model

TINY = ["--d-model", "16", "--d-ff", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
        "--batch-size", "8", "--num-experts", "4", "--num-groups", "2", "--rank", "2", "--burn-in", "3",
        "--recluster-interval", "2", "--eval-every", "0", "--eval-batches", "2", "--no-progress", "--threads", "1"]
TOPIC_SHIFT = ["--data", "synthetic:topics=0-3", "--shift-data", "synthetic:topics=4-7"]
# SyntheticTopicCorpus(V=512, 8 topics): ids 1..64 function words, then 8 bands of 55 topic words
N_FN, BAND = 64, 55


def _band_of(token: int) -> int:
    return (token - 1 - N_FN) // BAND if 1 + N_FN <= token < 1 + N_FN + 8 * BAND else -1


# --- vocabulary -------------------------------------------------------------------------------
def _random_lines(rng, pools, n_lines):
    return "".join(" ".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 12))) + "\n"
                   if rng.random() > 0.1 else "\n" for _ in range(n_lines))


def _plain_words(text):
    """WikiText's reading, done plainly: whitespace words, <eos> after every non-empty line."""
    return [w for line in text.splitlines() if line.split() for w in line.split() + [EOS]]


def _write_wikitext(d, train_text, valid_text, test_text):
    d.mkdir()
    for name, text in zip(("train", "valid", "test"), (train_text, valid_text, test_text)):
        (d / f"wiki.{name}.tokens").write_text(text)
    return d


@pytest.mark.parametrize("second_kind", ["wikitext", "sst2"])
def test_vocabulary_is_the_union_of_both_training_splits(tmp_path, second_kind):
    rng = random.Random(1234 + len(second_kind))
    only_a, only_b, shared = ([f"{p}{i}" for i in range(rng.randint(20, 60))] for p in ("a", "b", "s"))
    a_train = _random_lines(rng, [only_a, shared], 120)
    a_valid = _random_lines(rng, [only_a, only_b, ["zz"]], 20)
    a_dir = _write_wikitext(tmp_path / "a", a_train, a_valid, _random_lines(rng, [only_a], 10))
    b_valid_text = _random_lines(rng, [only_b, only_a, shared, ["qq"]], 20)
    if second_kind == "wikitext":
        b_train = _random_lines(rng, [only_b, shared], 120)
        b_dir = _write_wikitext(tmp_path / "b", b_train, b_valid_text, _random_lines(rng, [only_b], 10))
        b_train_words, b_valid_words = _plain_words(b_train), _plain_words(b_valid_text)
    else:   # GLUE SST-2: a phrase per row; as LM text, its lowercase words and an <eos> per phrase
        b_dir = tmp_path / "b"
        b_dir.mkdir()
        rows = [line.upper() for line in _random_lines(rng, [only_b, shared], 120).splitlines() if line]
        dev = [line for line in b_valid_text.splitlines() if line]
        (b_dir / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
        (b_dir / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t1\n" for r in dev))
        b_train_words = [w for r in rows for w in r.lower().split() + [EOS]]
        b_valid_words = [w for r in dev for w in r.split() + [EOS]]
    args = build_parser().parse_args(["--data", str(a_dir), "--shift-data", str(b_dir), "--shift-step", "1"])
    first, second = load_lm_data(args)

    union = set(_plain_words(a_train)) | set(b_train_words)
    assert first.vocab is second.vocab or first.vocab == second.vocab
    vocab = first.vocab
    assert len(vocab) == len(set(vocab)) and set(vocab) == union | {UNK}

    def decode(ids):
        return [vocab[i] for i in ids.tolist()]

    assert decode(first.train) == _plain_words(a_train)          # every training word encodes as itself
    assert decode(second.train) == b_train_words
    # valid words of either training split encode as themselves, in both corpora; others: <unk>
    assert decode(first.valid) == [w if w in union else UNK for w in _plain_words(a_valid)]
    assert decode(second.valid) == [w if w in union else UNK for w in b_valid_words]
    alone = load_wikitext(str(a_dir))                            # ids stable: the first corpus's own ids
    assert vocab[:alone.vocab_size] == alone.vocab and torch.equal(first.train, alone.train)


# --- topics=a-b -------------------------------------------------------------------------------
def test_topics_range_draws_only_from_those_bands():
    seed = random.Random().randrange(10 ** 6)   # any seed: the property holds for all
    lo = random.Random(seed).randrange(0, 7)
    hi = random.Random(seed + 1).randrange(lo, 8)
    args = build_parser().parse_args(["--data", f"synthetic:seed={seed},topics={lo}-{hi}"])
    got, _ = load_lm_data(args)
    full = SyntheticTopicCorpus(seed=seed, train_tokens=20_000, valid_tokens=2_000)
    assert got.vocab == full.vocab   # one generator: the same vocabulary and topic tables
    assert torch.equal(torch.as_tensor(got.successor), torch.as_tensor(full.successor))
    for stream in (got.train, got.valid, got.test):
        bands = {_band_of(t) for t in stream.tolist()} - {-1}
        assert bands == set(range(lo, hi + 1)), (seed, lo, hi, sorted(bands))
    assert {_band_of(t) for t in full.train.tolist()} - {-1} == set(range(8))


# --- the switch and the ramp ------------------------------------------------------------------
def _spy_batches(monkeypatch):
    """Records every training batch on its way into the real backend."""
    seen = []
    real = TorchBackend.forward_backward

    def spy(self, x, y, step=0):
        seen.append((step, x.clone()))
        return real(self, x, y, step)

    monkeypatch.setattr(TorchBackend, "forward_backward", spy)
    return seen


def _rows_from_second(x):
    """Per row: True when its topic words are all in bands 4-7 (the second corpus), False when all
    in 0-3; a row with neither kind (only function words, p ~ 0.2^16) or both fails the test."""
    out = []
    for row in x.tolist():
        bands = {_band_of(t) for t in row} - {-1}
        assert bands and (max(bands) < 4 or min(bands) >= 4), bands
        out.append(min(bands) >= 4)
    return out


def _plain_second_rows(step, n, k, rows):
    """The schedule as stated: none up to step n, all after n + k, else round-half-up of the
    linear fraction (step - n) / k of the rows."""
    if step <= n:
        return 0
    if k == 0 or step >= n + k:
        return rows
    return math.floor(Fraction(rows * (step - n), k) + Fraction(1, 2))


@pytest.mark.parametrize("n,k", [(5, 0), (3, 7)], ids=["switch", "ramp"])
def test_corpus_switch_at_step_n_and_linear_ramp(monkeypatch, n, k):
    steps = 12
    seen = _spy_batches(monkeypatch)
    s = train.main(["--ffn", "dense", "--steps", str(steps), *TOPIC_SHIFT, "--shift-step", str(n),
                    "--shift-ramp", str(k)] + TINY)
    assert [st for st, _ in seen] == list(range(1, steps + 1))
    from_second = [sum(_rows_from_second(x)) for _, x in seen]
    assert from_second == [_plain_second_rows(st, n, k, 8) for st in range(1, steps + 1)]
    # the ramp's rows are spread over the batch: with 2..6 of 8 rows from the second corpus, each
    # half (a rank's share at world 2) holds rows of both corpora
    spread = [st for st in range(1, steps + 1) if 2 <= _plain_second_rows(st, n, k, 8) <= 6]
    assert len(spread) == (4 if k else 0)
    for st in spread:
        rows = _rows_from_second(seen[st - 1][1])
        assert all(any(half) and not all(half) for half in (rows[:4], rows[4:])), (st, rows)
    # before the shift the run is the run on --data alone, batch for batch
    monkeypatch.undo()
    seen_alone = _spy_batches(monkeypatch)
    alone = train.main(["--ffn", "dense", "--steps", str(steps), "--data", "synthetic:topics=0-3"] + TINY)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen[:n], seen_alone[:n]))
    assert s["loss_curve"][:n] == alone["loss_curve"][:n]
    assert not torch.equal(seen[n][1], seen_alone[n][1])


# --- evaluation on both corpora ---------------------------------------------------------------
def _plain_eval(model, stream, seq_len, batch, max_batches):
    """Mean next-token cross-entropy (float64) over the first max_batches x batch non-overlapping
    windows of the stream."""
    n = min((stream.numel() - 1) // seq_len, batch * max_batches)
    win = torch.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
    model.eval()
    with torch.no_grad():
        logits = model(win[:, :-1], win[:, 1:])[0].double()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1)))


def test_every_evaluation_scores_both_corpora(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    argv = TINY + ["--ffn", "switch", "--steps", "8", *TOPIC_SHIFT, "--shift-step", "4", "--eval-every", "3",
                   "--eval-batches", "1", "--final-eval-batches", "2",
                   "--save-dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "tb")]
    s = train.main(argv)
    assert [h["step"] for h in s["history"]] == [3, 4, 6, 8]   # every 3 steps, the shift step, the end
    for h in s["history"]:
        assert {"valid_ppl", "shift_valid_ppl", "valid_loss", "shift_valid_loss"} <= set(h)
        assert h["valid_loss"] != h["shift_valid_loss"]
    # the final evaluation, redone plainly on the saved final model
    args = build_parser().parse_args(argv)
    args.batch_size = 8
    first, second = load_lm_data(args)
    model = build_model(args, first, moe_config(args))
    model.load_state_dict(torch.load(tmp_path / "ck" / "latest.pt", weights_only=True)["model"])
    want_first = _plain_eval(model, first.valid, 16, 8, 2)
    want_second = _plain_eval(model, second.valid, 16, 8, 2)
    assert s["valid_loss"] == pytest.approx(want_first, rel=1e-5)
    assert s["history"][-1]["shift_valid_loss"] == pytest.approx(want_second, rel=1e-5)
    assert s["first_corpus_valid_ppl_end"] == s["valid_ppl"] == pytest.approx(math.exp(want_first), rel=1e-5)
    assert s["post_shift_valid_ppl"] == pytest.approx(math.exp(want_second), rel=1e-5)
    assert s["pre_shift_valid_ppl"] == s["history"][1]["valid_ppl"]    # the first corpus at step 4
    assert s["history"][1]["valid_tokens"] == s["history"][-1]["valid_tokens"] == 2 * 8 * 16   # the final cap
    assert s["history"][0]["valid_tokens"] == 1 * 8 * 16                                     # --eval-batches
    assert s["post_shift_train_loss"] == pytest.approx(sum(s["loss_curve"][4:]) / 4, rel=1e-12)
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"valid/valid_ppl", "valid/shift_valid_ppl"} <= set(tags)
    assert [e.step for e in ea.Scalars("valid/shift_valid_ppl")] == [3, 4, 6, 8]


# --- input errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("extra,expect", [
    (["--shift-data", "synthetic:sed=3", "--shift-step", "4"], ["--shift-data", "'sed=3'", "seed="]),
    (["--shift-data", "synthetic:topics=5-2", "--shift-step", "4"], ["--shift-data", "topics='5-2'"]),
    (["--shift-data", "synthetic:topics=x", "--shift-step", "4"], ["--shift-data", "topics='x'"]),
    (["--shift-data", "synthetic:topics=6-8", "--shift-step", "4"], ["--shift-data", "outside", "0-7"]),
    (["--data", "synthetic:topics=0-3,num_topics=2"], ["--data", "outside", "0-1"]),
    (["--shift-data", "synthetic:vocab=256", "--shift-step", "4"], ["--shift-data", "vocab=256"]),
    (["--shift-data", "{tmp}/nope", "--shift-step", "4"], ["--shift-data", "nope", "no such directory"]),
    (["--shift-data", "synthetic", "--shift-step", "0"], ["--shift-step 0", "1..9"]),
    (["--shift-data", "synthetic", "--shift-step", "10"], ["--shift-step 10", "1..9"]),
    (["--shift-data", "synthetic"], ["--shift-step and --shift-data"]),
    (["--shift-data", "synthetic", "--shift-step", "6", "--shift-ramp", "5"], ["--shift-ramp 5"]),
    (["--shift-ramp", "3"], ["--shift-ramp needs"]),
    (["--task", "sst2", "--shift-data", "synthetic", "--shift-step", "4"], ["--task lm only"]),
    (["--shift-data", "{tmp}", "--shift-step", "4"], ["--shift-data", "wiki.train.tokens", "train.tsv"]),
    (["--data", "{tmp}/sst2", "--test"], ["--data", "SST-2", "--test"]),
], ids=["unknown_key", "reversed_range", "not_a_range", "topics_outside", "data_topics_outside",
        "other_vocab", "missing_dir", "step_0", "step_at_end", "step_missing", "ramp_past_end", "ramp_alone",
        "sst2_task", "neither_format", "sst2_text_has_no_test"])
def test_bad_spec_or_shift_step_is_one_error_line(tmp_path, capsys, extra, expect):
    (tmp_path / "sst2").mkdir()   # a GLUE SST-2 directory: its phrases are text, but it has no test split
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\na good film\t1\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\na bad film\t0\n")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit) as exc:
        train.main(["--steps", "10"] + extra + TINY)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trilemma_moe.train: error: "), err
    for word in expect:
        assert word in err, (word, err)


# --- resume after the shift -------------------------------------------------------------------
class Crash(Exception):
    pass


def test_resume_after_the_shift_continues_on_the_second_corpus(tmp_path, monkeypatch):
    argv = TINY + ["--ffn", "switch", "--steps", "16", *TOPIC_SHIFT, "--shift-step", "5", "--shift-ramp", "4",
                   "--eval-every", "4"]
    seen = _spy_batches(monkeypatch)
    ref = train.main(argv + ["--loss-log", str(tmp_path / "ref.jsonl")])
    ref_batches = list(seen)
    monkeypatch.undo()
    real = TorchBackend.forward_backward

    def crash_at_11(self, x, y, step=0):   # the run dies in step 11; its last checkpoint is step 8
        if step == 11:
            raise Crash
        return real(self, x, y, step)

    monkeypatch.setattr(TorchBackend, "forward_backward", crash_at_11)
    ck = ["--save-dir", str(tmp_path / "ck"), "--save-every", "8"]
    with pytest.raises(Crash):
        train.main(argv + ck)
    monkeypatch.undo()
    seen = _spy_batches(monkeypatch)
    resumed = train.main(argv + ck + ["--resume"])
    assert [st for st, _ in seen] == list(range(9, 17))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, ref_batches[8:]))   # same mixed batches
    assert resumed["loss_curve"] == ref["loss_curve"][8:]
    assert sum(_rows_from_second(seen[-1][1])) == 8   # the second corpus after the ramp
    for key in ("pre_shift_valid_ppl", "post_shift_valid_ppl", "first_corpus_valid_ppl_end",
                "post_shift_train_loss", "post_shift_load_cv"):
        assert resumed[key] == ref[key], key


# --- the reproduce harness's shift preset (planned, not run) ------------------------------------
def test_shift_preset_expands_to_the_scenarios_rules_and_seeds(tmp_path):
    from trilemma_moe.reproduce import _check_data
    from trilemma_moe.reproduce.presets import PRESETS
    from trilemma_moe.reproduce.runner import plan
    from trilemma_moe.training.args import check_shift_flags, resolve_task_defaults

    root = tmp_path / "data"
    runs = plan(PRESETS["shift"], str(tmp_path / "out"), str(root))
    want_scenarios = {   # task -> (--data, --shift-data, --steps, --shift-step, --shift-ramp)
        "topic": ("synthetic:topics=0-3", "synthetic:topics=4-7", 360, 180, 0),
        "drift": ("synthetic:topics=0-3", "synthetic:topics=4-7", 360, 100, 180),
        "domain": (f"{root}/wikitext-2", f"{root}/sst2", 260, 140, 0),
    }
    got = sorted((r.task, r.variant.name, r.seed) for r in runs)
    assert got == sorted((t, v, s) for t in want_scenarios
                         for v in ("static", "dynamic", "paper-regroup", "probe-free", "switch", "drift-trigger")
                         for s in range(5))
    for r in runs:
        args = build_parser().parse_args(r.argv)
        resolve_task_defaults(args)
        check_shift_flags(args)   # the shift lies inside the run, the ramp ends by its last step
        assert (args.data, args.shift_data, args.steps, args.shift_step, args.shift_ramp) == want_scenarios[r.task]
        # each rule is an --ffn kind of that name, but the rule built for shifts: dynamic with its trigger
        assert (args.ffn, args.seed) == ("dynamic" if r.variant.name == "drift-trigger" else r.variant.name, r.seed)
        assert (args.regroup_trigger == "drift") == (r.variant.name == "drift-trigger")
        assert args.summary_json == r.summary and args.num_experts == 32 and args.num_groups == 8
    # the generated corpus needs no directory; the domain shift needs both of its directories
    with pytest.raises(SystemExit, match="sst2") as exc:
        _check_data(runs)
    assert "synthetic" not in str(exc.value)
    (root / "sst2").mkdir(parents=True)
    with pytest.raises(SystemExit, match="wikitext-2"):
        _check_data(runs)
    (root / "wikitext-2").mkdir()
    _check_data(runs)
    _check_data([r for r in runs if r.task != "domain"])
