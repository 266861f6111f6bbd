"""The classification task (``--task sst2``): loader, classifier forward, end-to-end run."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trilemma_moe import train
from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.data import SST2_HELDOUT, load_sst2, read_labelled_tsv
from trilemma_moe.data.sst2 import maximal_rows, sentence_holdout, sst2_splits, tokenize
from trilemma_moe.models import FFN_KINDS, GPTClassifier

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TINY = ["--d-model", "32", "--d-ff", "64", "--layers", "2", "--heads", "2", "--seq-len", "16",
        "--num-experts", "4", "--num-groups", "2", "--rank", "4", "--no-progress", "--threads", "1"]


def _write_tsv(path, rows, header="sentence\tlabel"):
    path.write_text(header + "\n" + "".join(f"{s}\t{y}\n" for s, y in rows))


def _rows(n, frac_pos=0.6, seed=0):
    rng = random.Random(seed)
    return [(f"phrase {i} w{rng.randrange(50)} w{rng.randrange(50)}", int(i < frac_pos * n)) for i in range(n)]


# --- loader ---------------------------------------------------------------------------------
def _sentences_and_phrases(rng, n_sentences):
    """Random sentences (words w0..w299, half in upper case; some with a word of their own) and
    their labels, each followed by some of its contiguous sub-phrases (same label, some repeated);
    a few repeats of whole sentences, and longer rows over a few rows (which are then no longer
    maximal); shuffled."""
    rows = []
    for k in range(n_sentences):
        words = [rng.choice([f"w{rng.randrange(300)}", f"W{rng.randrange(300)}"]) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:                                    # a word no other sentence has
            words.insert(rng.randrange(len(words)), f"u{k}")
        y = int(rng.random() < 0.55)
        rows.append((" ".join(words), y))
        for _ in range(rng.randrange(5)):
            i = rng.randrange(len(words))
            rows.append((" ".join(words[i:rng.randint(i + 1, len(words))]), y))
        if rng.random() < 0.05:
            rows.append((" ".join(words).lower(), y))            # the same sentence again, other case
    rows += [(r[0] + " w9 w9", r[1]) for r in rng.sample(rows, len(rows) // 40)]   # longer rows over old ones
    rng.shuffle(rows)
    return rows


def _padded(tokens):   # a token sequence as a string: " a b " occurs in " x a b y " iff it is a sub-phrase
    return " " + " ".join(tokens) + " "


def _reference_maximal(rows):
    """Brute force: the first row of each distinct lowercase token sequence that occurs in no other
    distinct row (plain substring tests on the padded strings)."""
    toks = [tuple(s.lower().split()) for s, _ in rows]
    distinct = {t: _padded(t) for t in toks}
    first = {}
    for r, t in enumerate(toks):
        first.setdefault(t, r)
    return sorted(first[t] for t in distinct if t and not any(_padded(t) in o for u, o in distinct.items() if u != t))


def _check_holdout(rows, train_rows, held, n):
    """The properties of a held-out slice, against plain references: n distinct maximal rows,
    stratified by label within one row, and the training rows exactly those that are neither held
    out nor a sub-phrase of a held-out row."""
    toks = [tuple(s.lower().split()) for s, _ in rows]
    maximal = _reference_maximal(rows)
    held = [int(i) for i in held]
    held_set = set(held)
    assert len(held) == n == len({toks[i] for i in held}) and set(held) <= set(maximal)
    share = sum(rows[i][1] for i in maximal) / len(maximal)
    assert abs(sum(rows[i][1] for i in held) - share * n) <= 1
    held_text = "\n".join(_padded(toks[i]) for i in held)
    want_train = [r for r in range(len(rows)) if r not in held_set and _padded(toks[r]) not in held_text]
    assert [int(i) for i in train_rows] == want_train
    return maximal


@pytest.mark.parametrize("trial", range(3))
def test_maximal_rows_and_sentence_holdout_match_brute_force(trial):
    seed = random.Random().randrange(10 ** 6)       # fresh data each run; the seed is in the failure
    rows = _sentences_and_phrases(random.Random(seed), 120)
    toks = [tuple(tokenize(s)) for s, _ in rows]
    assert maximal_rows(toks) == _reference_maximal(rows), seed
    sentences, labels = [s for s, _ in rows], [y for _, y in rows]
    train_rows, held = sentence_holdout(sentences, labels, n=30)
    maximal = _check_holdout(rows, train_rows, held, 30)
    assert len(maximal) < len(rows) / 2, seed        # the data has sub-phrases to leave out
    assert len(train_rows) < len(rows) - 30, seed    # and some of them were a held-out sentence's
    with pytest.raises(ValueError, match="too few"):
        sentence_holdout(sentences, labels, n=len(maximal) + 1)


def test_heldout_slice_is_whole_sentences_fixed_stratified_and_disjoint(tmp_path):
    seed = random.Random().randrange(10 ** 6)
    rows = _sentences_and_phrases(random.Random(seed), 1100)   # > 872 whole sentences
    _write_tsv(tmp_path / "train.tsv", rows)
    tr_s, tr_l, dev_s, dev_l, source = sst2_splits(str(tmp_path))
    train_rows, held = sentence_holdout([s for s, _ in rows], [y for _, y in rows])
    _check_holdout(rows, train_rows, held, SST2_HELDOUT)
    assert dev_s == [rows[i][0] for i in held] and dev_l == [rows[i][1] for i in held]
    assert tr_s == [rows[i][0] for i in train_rows] and tr_l == [rows[i][1] for i in train_rows]
    assert "872 whole sentences" in source and "not GLUE's dev set" in source
    d = load_sst2(str(tmp_path), seq_len=16, min_count=1)
    assert len(d.dev_y) == SST2_HELDOUT and d.dev_y.tolist() == dev_l and d.train_y.tolist() == tr_l
    # the vocabulary comes from the training rows alone: a word only held-out sentences have is <unk>
    train_words = {w for s in tr_s for w in s.lower().split()}
    assert set(d.vocab) == train_words | {"<pad>", "<unk>"}
    assert any(w not in train_words for s in dev_s for w in s.lower().split())
    assert [d.vocab[int(t)] for t in d.dev_x[0] if t] == [w if w in train_words else "<unk>" for w in
                                                         dev_s[0].lower().split()][:16]
    # --seed (the global generators the trainer seeds) plays no part: another load is the same split
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    again = load_sst2(str(tmp_path), seq_len=16, min_count=1)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert sst2_splits(str(tmp_path)) == (tr_s, tr_l, dev_s, dev_l, source)
    assert torch.equal(again.dev_x, d.dev_x) and torch.equal(again.train_x, d.train_x)


def test_too_few_whole_sentences_names_the_file(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [(f"a b c{i}", i % 2) for i in range(100)] + [("a b", 1)] * 2000)
    with pytest.raises(ValueError, match="100 whole sentences .* too few to hold out 872") as exc:
        load_sst2(str(tmp_path))
    assert str(tmp_path / "train.tsv") in str(exc.value) and "dev.tsv" in str(exc.value)


def test_dev_tsv_is_used_when_present(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [("good film", 1), ("bad film", 0)])
    _write_tsv(tmp_path / "dev.tsv", [("good", 1), ("awful film", 0), ("", 1)])
    d = load_sst2(str(tmp_path), seq_len=8, min_count=1)
    assert d.dev_source == "dev.tsv" and d.dev_y.tolist() == [1, 0, 1] and len(d.train_y) == 2
    assert d.vocab[:2] == ["<pad>", "<unk>"] and d.vocab[2] == "film"
    assert d.dev_x[1, :2].tolist() == [1, d.stoi["film"]]                # unknown word -> <unk>
    assert d.dev_x[2, 0] == 1 and (d.dev_x[2, 1:] == 0).all()           # empty phrase: one <unk>


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("", "is empty"),
    ("sentence\tlabel\n", "no rows"),
    ("text\tlabel\ngood\t1\n", "line 1"),
    ("sentence\tlabel\ngood\t1\nbad\t2\n", "line 3: label '2' is not 0 or 1"),
    ("sentence\tlabel\nno tab here\n", "is not 0 or 1"),
])
def test_loader_errors_name_the_file(tmp_path, content, match):
    if content is not None:
        (tmp_path / "train.tsv").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as exc:
        load_sst2(str(tmp_path))
    assert str(tmp_path / "train.tsv") in str(exc.value)


def test_cli_input_error_exits_2(tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\tyes\n")
    with pytest.raises(SystemExit) as exc:
        train.main(["--task", "sst2", "--data", str(tmp_path), "--steps", "1"] + TINY)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "train.tsv") in err and "not 0 or 1" in err
    with pytest.raises(SystemExit) as exc:
        train.main(["--task", "sst2", "--steps", "1"] + TINY)
    assert exc.value.code == 2 and "needs --data" in capsys.readouterr().err


@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="no GLUE SST-2 beside the checkout (../shared/data/sst2)")
def test_real_sst2_heldout():
    """GLUE's train.tsv (no dev.tsv beside it): 872 whole sentences held out, each in no other row
    (one substring count over every distinct row), no training row inside one of them."""
    assert not (SST2 / "dev.tsv").is_file()
    sentences, labels = read_labelled_tsv(str(SST2 / "train.tsv"))
    tr_s, tr_l, dev_s, dev_l, _ = sst2_splits(str(SST2))
    toks = [tuple(s.lower().split()) for s in sentences]
    everything = "\n".join(_padded(t) for t in set(toks))
    dev_toks = [tuple(s.lower().split()) for s in dev_s]
    assert len(dev_s) == SST2_HELDOUT == len(set(dev_toks))
    assert all(everything.count(_padded(t)) == 1 for t in dev_toks)          # maximal: in no other row
    held_text = "\n".join(_padded(t) for t in dev_toks)
    assert not any(_padded(s.lower().split()) in held_text for s in tr_s)    # no phrase of them trained on
    assert len(tr_s) == sum(_padded(t) not in held_text for t in toks) == 57_466   # 67,349 rows less 9,883
    maximal = maximal_rows(toks)
    assert len(maximal) == 6_885
    assert abs(sum(dev_l) - SST2_HELDOUT * sum(labels[i] for i in maximal) / len(maximal)) <= 1
    d = load_sst2(str(SST2), seq_len=64)
    assert d.vocab_size == 13_354 and len(d.train_y) == len(tr_s) and d.dev_y.tolist() == dev_l
    lens = (d.dev_x != 0).sum(1).float()
    assert float(lens.mean()) > 15 and int((d.train_x != 0).sum(1).min()) >= 1   # sentences, not phrases


# --- classifier forward -----------------------------------------------------------------------
def _model(kind, seed=0, **kw):
    cfg = TrilemmaMoEConfig.from_dict({"num_experts": 4, "num_groups": 2, "rank": 4, "top_k": 2,
                                       "burn_in": 1000})
    return GPTClassifier(50, num_classes=2, pad_id=0, d_model=16, n_layers=2, n_heads=2, seq_len=12,
                         d_ff=32, ffn_kind=kind, moe_config=cfg, seed=seed, **kw).eval()


def test_classifier_matches_reference_pooling():
    torch.manual_seed(1)
    m = _model("switch").double()
    lengths = [3, 12, 1, 7]
    idx = torch.zeros(4, 12, dtype=torch.long)
    for r, n in enumerate(lengths):
        idx[r, :n] = torch.randint(1, 50, (n,))
    captured = {}
    m.ln_f.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out))
    logits, _, _ = m(idx)
    for r, n in enumerate(lengths):   # a plain loop: the mean of the row's first n final states
        ref = m.head(captured["h"][r, :n].sum(0) / n)
        torch.testing.assert_close(logits[r], ref, rtol=1e-12, atol=1e-12)
    # attention is bidirectional: the first token's state depends on a later token
    first = captured["h"][1, 0].clone()
    other = idx.clone()
    other[1, 11] = (idx[1, 11] % 49) + 1
    m(other)
    assert not torch.allclose(captured["h"][1, 0], first)


@pytest.mark.parametrize("kind", [k for k in FFN_KINDS if k != "deepspeed"])
def test_pads_do_not_change_logits(kind):
    torch.manual_seed(2)
    m = _model(kind, seed=3)
    idx = torch.zeros(3, 12, dtype=torch.long)
    for r, n in enumerate([4, 6, 2]):
        idx[r, :n] = torch.randint(1, 50, (n,))
    short, _, _ = m(idx[:, :6])              # trimmed to the longest row
    full, _, _ = m(idx)                      # padded to 12
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    alone, _, _ = m(idx[2:3, :2])            # the row without its batch-mates' width
    torch.testing.assert_close(alone, full[2:3], rtol=1e-5, atol=1e-6)
    if kind == "switch":                     # the last forward's routers saw 2 tokens (x top-2), no pads
        m(idx[2:3])
        assert [int(f.last_counts.sum()) for f in m.moe_layers()] == [2 * 2, 2 * 2]


# --- end to end -------------------------------------------------------------------------------
def test_sst2_run_learns_separable_data(tmp_path):
    rng = random.Random(0)
    pos, neg, filler = ["great", "superb", "lovely"], ["awful", "dull", "bad"], [f"w{i}" for i in range(30)]
    rows = []
    for i in range(1200):
        y = i % 2
        words = [rng.choice(filler) for _ in range(rng.randrange(2, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(pos if y else neg))
        rows.append((" ".join(words), y))
    _write_tsv(tmp_path / "train.tsv", rows[:1000])
    _write_tsv(tmp_path / "dev.tsv", rows[1000:])
    out = tmp_path / "s.json"
    s = train.main(["--task", "sst2", "--data", str(tmp_path), "--ffn", "ours", "--steps", "60",
                    "--batch-size", "16", "--lr", "3e-3", "--burn-in", "20", "--recluster-interval", "20",
                    "--eval-every", "30", "--summary-json", str(out)] + TINY)
    assert s["task"] == "sst2" and s["dev_examples"] == 200 and s["dev_accuracy"] > 0.9
    assert "valid_ppl" not in s and s["valid_loss"] == s["dev_loss"] and s["dev_loss"] < 0.5
    assert s["first_clusterings"] == 2 and s["compressed"] is True
    assert [h["step"] for h in s["history"]] == [30, 60]
    assert all({"train_loss", "dev_loss", "dev_accuracy"} <= set(h) for h in s["history"])
    assert s["tokens_per_s"] > 0 and s["config"]["lr"] == 3e-3
    written = json.loads(out.read_text())
    assert written["dev_accuracy"] == s["dev_accuracy"] and written["task"] == "sst2"


def test_lm_summary_names_its_task():
    s = train.main(["--steps", "2", "--eval-batches", "1", "--batch-size", "2"] + TINY)
    assert s["task"] == "lm" and "valid_ppl" in s and "dev_accuracy" not in s


def test_task_defaults_resolve_per_task():
    args = train.build_parser().parse_args(["--task", "sst2", "--lr", "0.01"])
    from trilemma_moe.training.args import TASK_DEFAULTS, resolve_task_defaults
    filled = resolve_task_defaults(args)
    assert args.lr == 0.01 and "lr" not in filled and args.steps == TASK_DEFAULTS["sst2"]["steps"]
    lm = train.build_parser().parse_args([])
    resolve_task_defaults(lm)
    assert (lm.task, lm.steps, lm.lr, lm.batch_size, lm.eval_every) == ("lm", 800, 3e-3, 16, 250)
