"""The classification task (``--task sst2``): loader, classifier forward, end-to-end run."""
import json
import random
from pathlib import Path

import pytest
import torch

from trilemma_moe import train
from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.data import SST2_HELDOUT, load_sst2, read_labelled_tsv
from trilemma_moe.data.sst2 import stratified_holdout
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
def test_heldout_slice_is_fixed_stratified_and_disjoint(tmp_path):
    rows = _rows(2000, frac_pos=0.6)
    _write_tsv(tmp_path / "train.tsv", rows)
    d = load_sst2(str(tmp_path), seq_len=16, min_count=1)   # every phrase's number in the vocabulary
    assert len(d.dev_y) == SST2_HELDOUT and len(d.train_y) == 2000 - SST2_HELDOUT
    assert abs(int(d.dev_y.sum()) - 0.6 * SST2_HELDOUT) <= 1           # label balance of train
    _, labels = read_labelled_tsv(str(tmp_path / "train.tsv"))
    tr, held = stratified_holdout(labels)
    assert len(set(tr.tolist()) & set(held.tolist())) == 0 and len(tr) + len(held) == 2000
    assert (held == stratified_holdout(labels)[1]).all()                # deterministic
    # the rows themselves: no held-out phrase among the training rows (phrase i has word i)
    train_words = {d.vocab[int(t)] for t in d.train_x[:, 1]}
    assert train_words == {str(i) for i in tr.tolist()}
    assert (d.dev_x[:, 1] == 1).all()        # the held-out phrases' own numbers are unknown words
    assert d.dev_y.tolist() == [rows[i][1] for i in held.tolist()]
    # --seed plays no part: a second load is the same split
    again = load_sst2(str(tmp_path), seq_len=16, min_count=1)
    assert torch.equal(again.dev_x, d.dev_x) and torch.equal(again.train_y, d.train_y)


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
    d = load_sst2(str(SST2), seq_len=64)
    if d.dev_source == "dev.tsv":
        pytest.skip("the shared copy has a dev.tsv")
    sentences, labels = read_labelled_tsv(str(SST2 / "train.tsv"))
    frac = sum(labels) / len(labels)
    assert len(d.dev_y) == SST2_HELDOUT and abs(int(d.dev_y.sum()) - frac * SST2_HELDOUT) <= 1
    tr, held = stratified_holdout(labels)
    held_text = {sentences[i] for i in held}
    # training rows: the rest, less those repeating a held-out phrase (GLUE's train has repeats)
    assert len(d.train_y) == sum(sentences[i] not in held_text for i in tr) > len(labels) - 2 * SST2_HELDOUT
    assert int((d.train_x != 0).sum(1).max()) <= 64 and int((d.train_x != 0).sum(1).min()) >= 1


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
