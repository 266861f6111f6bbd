"""GLUE SST-2 (binary sentiment of movie-review phrases) for the classification task.

``load_sst2(DIR)`` reads ``DIR/train.tsv`` (a ``sentence<TAB>label`` header, then one phrase and
its 0/1 label a line, the GLUE release's format). ``DIR/dev.tsv``, when present, is the evaluation
set. Otherwise :func:`sentence_holdout` sets aside ``SST2_HELDOUT`` (872, the size of GLUE's dev
set) whole sentences of the training file:

* GLUE's train split is mostly short phrases, the sub-phrases of its ~6.9k sentences, so a slice
  of random rows is mostly short, easy phrases (on such a slice the default recipe scored 0.897,
  on GLUE's dev set about 0.80). Only *maximal* rows are held out: rows whose token
  sequence is not a contiguous sub-sequence of any other row's (6,885 in GLUE's file, the whole
  sentences, near enough); among them, one row per distinct token sequence.
* 872 of those, stratified by label (each class within one row of its share among the maximal
  rows), drawn by a generator of the fixed ``HOLDOUT_SEED`` (not ``--seed``), so every run and
  every FFN kind evaluates on the same sentences.
* No phrase of a held-out sentence is trained on: every row whose token sequence is a contiguous
  sub-sequence of a held-out sentence (the sentence itself and its repeats included) is dropped
  from training.

Accuracy on this slice is **not** GLUE dev-set accuracy: it is measured on 872 whole sentences of
GLUE's *training* file, and the model has seen fewer phrases than GLUE's full train split.

Tokens: lowercase whitespace words (the same tokens decide the sub-phrase relation above); the
vocabulary is ``<pad>`` (id 0), ``<unk>`` (id 1), then the training rows' words seen at least
``min_count`` times, by descending count (ties in first-seen order): held-out sentences add no
words. A phrase is cut to ``seq_len`` tokens and right-padded; batches are trimmed to their
longest row.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .lm import EOS, UNK

PAD = "<pad>"
SST2_HELDOUT = 872             # GLUE SST-2's dev set size
HOLDOUT_SEED = 20251002        # fixed: the held-out slice never depends on --seed
SST2_HEADER = ("sentence", "label")


def read_labelled_tsv(path: str) -> tuple[list[str], list[int]]:
    """Phrases and 0/1 labels of a GLUE-style TSV; every problem is a ``ValueError`` (or
    ``FileNotFoundError``) naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --data must point to a GLUE SST-2 directory holding "
                                f"train.tsv (and optionally dev.tsv) with a 'sentence<TAB>label' header")
    sentences: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        try:
            header = f.readline()
            if not header.strip():
                raise ValueError(f"{path} is empty: expected a 'sentence<TAB>label' header and rows")
            if tuple(c.strip().lower() for c in header.rstrip("\n").split("\t")) != SST2_HEADER:
                raise ValueError(f"{path}: line 1 is {header.strip()[:60]!r}, expected the header "
                                 f"'sentence<TAB>label' (GLUE SST-2 format)")
            for lineno, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                text, sep, label = line.rstrip("\r\n").rpartition("\t")
                if not sep or label.strip() not in ("0", "1"):
                    raise ValueError(f"{path}: line {lineno}: label {label.strip()[:20]!r} is not 0 or 1 "
                                     f"(expected 'sentence<TAB>label')")
                sentences.append(text.strip())
                labels.append(int(label))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    if not sentences:
        raise ValueError(f"{path} is empty: a header but no rows")
    return sentences, labels


def stratified_holdout(labels: list[int], n: int = SST2_HELDOUT,
                       seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, heldout_rows)``, both sorted: ``n`` rows whose label counts are the train
    proportion rounded (each class within one row of it), drawn by a generator of ``seed``."""
    y = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    classes = np.unique(y)
    want = {int(c): round(n * float((y == c).sum()) / len(y)) for c in classes}
    want[int(classes[-1])] += n - sum(want.values())           # exactly n in all
    picked = [rng.permutation(np.flatnonzero(y == c))[:want[int(c)]] for c in classes]
    held = np.sort(np.concatenate(picked))
    return np.setdiff1d(np.arange(len(y)), held), held


def tokenize(sentence: str) -> list[str]:
    return sentence.lower().split()


def maximal_rows(token_rows: list[tuple[str, ...]]) -> list[int]:
    """Indices of the rows whose tokens are no contiguous sub-sequence of another row's, one per
    distinct token sequence (its first row), in row order; an empty row is never maximal. Every
    proper contiguous sub-sequence of every distinct row is looked up in the set of rows."""
    rows = set(token_rows)
    contained = set()
    for toks in rows:
        n = len(toks)
        for i in range(n):
            for j in range(i + 1, n + 1 if i else n):        # proper: never the whole row
                if toks[i:j] in rows:
                    contained.add(toks[i:j])
    seen, out = set(), []
    for r, toks in enumerate(token_rows):
        if toks and toks not in contained and toks not in seen:
            seen.add(toks)
            out.append(r)
    return out


def ngrams(token_rows: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Every contiguous token sub-sequence (whole rows included) of the rows."""
    return {toks[i:j] for toks in token_rows for i in range(len(toks)) for j in range(i + 1, len(toks) + 1)}


def sentence_holdout(sentences: list[str], labels: list[int], n: int = SST2_HELDOUT,
                     seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, heldout_rows)``, both sorted: ``n`` maximal rows (:func:`maximal_rows`)
    drawn by :func:`stratified_holdout` among them, and the rows that are neither held out nor a
    contiguous sub-sequence of a held-out row. ``ValueError`` when fewer than ``n`` rows are maximal."""
    toks = [tuple(tokenize(s)) for s in sentences]
    pool = np.asarray(maximal_rows(toks), dtype=np.int64)
    if len(pool) < n:
        raise ValueError(f"{len(pool)} whole sentences (rows that are no other row's sub-phrase) are too few to "
                         f"hold out {n}")
    _, picked = stratified_holdout([labels[i] for i in pool], n, seed)
    held = pool[picked]                                         # sorted: pool and picked are
    phrases = ngrams([toks[i] for i in held])
    train = np.asarray([r for r, t in enumerate(toks) if t not in phrases], dtype=np.int64)
    return train, held


@dataclass
class SentenceDataset:
    """Padded token rows ``[N, seq_len]`` (``pad_id`` 0) and labels ``[N]`` for train and dev."""

    train_x: Tensor
    train_y: Tensor
    dev_x: Tensor
    dev_y: Tensor
    vocab: list[str]
    name: str = "sst2"
    dev_source: str = "dev.tsv"
    stoi: dict[str, int] = field(default_factory=dict, repr=False)
    pad_id: int = 0
    num_classes: int = 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokens_in(self, x: Tensor) -> int:
        """Non-pad tokens of a batch (what tokens/s counts for this task)."""
        return int((x != self.pad_id).sum())

    def describe(self) -> str:
        lens = (self.train_x != self.pad_id).sum(1).float()
        return (f"{self.name}: vocab {self.vocab_size:,}, train {len(self.train_y):,} phrases "
                f"({float(self.train_y.float().mean()):.1%} label 1, mean {float(lens.mean()):.1f} tokens) / "
                f"dev {len(self.dev_y):,} phrases ({self.dev_source}), seq_len {self.train_x.shape[1]}")


def sst2_splits(directory: str) -> tuple[list[str], list[int], list[str], list[int], str]:
    """Train phrases and labels, evaluation phrases and labels, and where the latter came from
    (``dev.tsv``, else :func:`sentence_holdout`'s whole sentences of train)."""
    directory = os.fspath(directory)
    train_path = os.path.join(directory, "train.tsv")
    sentences, labels = read_labelled_tsv(train_path)
    dev_path = os.path.join(directory, "dev.tsv")
    if os.path.isfile(dev_path):
        dev_s, dev_l = read_labelled_tsv(dev_path)
        tr_s, tr_l, source = sentences, labels, "dev.tsv"
    else:
        try:
            train_rows, held = sentence_holdout(sentences, labels)
        except ValueError as exc:
            raise ValueError(f"{train_path}: {exc}; add a dev.tsv") from None
        dev_s, dev_l = [sentences[i] for i in held], [labels[i] for i in held]
        tr_s, tr_l = [sentences[i] for i in train_rows], [labels[i] for i in train_rows]
        source = (f"{SST2_HELDOUT} whole sentences of train.tsv held out, stratified, none of their phrases "
                  f"trained on; not GLUE's dev set")
    return tr_s, tr_l, dev_s, dev_l, source


def sst2_lm_words(directory: str) -> tuple[list[str], list[str], str]:
    """SST-2's phrases as language-model text: the train and evaluation phrases' words (the
    tokens of :func:`tokenize`), an ``<eos>`` after each phrase, as WikiText ends its lines;
    and where the evaluation phrases came from."""
    tr_s, _, dev_s, _, source = sst2_splits(directory)
    return [w for s in tr_s for w in tokenize(s) + [EOS]], [w for s in dev_s for w in tokenize(s) + [EOS]], source


def load_sst2(directory: str, seq_len: int = 64, min_count: int = 2) -> SentenceDataset:
    tr_s, tr_l, dev_s, dev_l, source = sst2_splits(directory)
    tr_tok = [tokenize(s) for s in tr_s]
    counts = Counter(w for toks in tr_tok for w in toks)
    vocab = [PAD, UNK] + [w for w, c in counts.most_common() if c >= min_count and w not in (PAD, UNK)]
    stoi = {w: i for i, w in enumerate(vocab)}

    def encode(token_lists: list[list[str]]) -> Tensor:
        out = torch.zeros(len(token_lists), seq_len, dtype=torch.long)
        for r, toks in enumerate(token_lists):
            ids = [stoi.get(w, 1) for w in toks[:seq_len]] or [1]   # an empty phrase: one <unk>
            out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    return SentenceDataset(train_x=encode(tr_tok), train_y=torch.tensor(tr_l, dtype=torch.long),
                           dev_x=encode([tokenize(s) for s in dev_s]), dev_y=torch.tensor(dev_l, dtype=torch.long),
                           vocab=vocab, name=f"sst2({os.path.basename(os.path.normpath(directory))})",
                           dev_source=source, stoi=stoi)


def _trim(x: Tensor, pad_id: int) -> Tensor:
    """Drop the trailing columns that are padding in every row."""
    used = (x != pad_id).any(dim=0).nonzero()
    return x[:, :int(used.max()) + 1] if used.numel() else x[:, :1]


class RowSampler:
    """Random rows (with replacement): ``next()`` returns ``(x[B,T'], y[B])``, ``T'`` the
    batch's longest row. Driven by its own seeded ``torch.Generator`` so runs repeat."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0, pad_id: int = 0):
        if len(y) == 0:
            raise ValueError("no training rows")
        self.x, self.y, self.batch_size, self.pad_id = x, y, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        rows = torch.randint(0, len(self.y), (self.batch_size,), generator=self.generator)
        return _trim(self.x[rows], self.pad_id), self.y[rows]


def sentence_batches(x: Tensor, y: Tensor, batch_size: int, pad_id: int = 0,
                     max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Every row once, in order, ``batch_size`` a batch (at most ``max_batches``)."""
    for b, r0 in enumerate(range(0, len(y), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _trim(x[r0:r0 + batch_size], pad_id), y[r0:r0 + batch_size]
