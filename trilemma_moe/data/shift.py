"""A distribution shift in the language-model task: ``--data`` until optimizer step N,
then ``--shift-data``, optionally mixed in over a ramp of K steps.

- :func:`parse_data_spec`: what ``--data`` / ``--shift-data`` name: a directory (WikiText-format,
  or GLUE SST-2, whose phrases are then the text) or ``synthetic[:key=value,...]``, the generated
  topic corpus with ``seed=``, ``topics=a-b`` (documents only from those topics), ``vocab=`` and
  ``num_topics=``.
- :func:`read_lm_source`, :func:`on_one_vocabulary`: both corpora encoded with one vocabulary,
  built at the start from both training splits: the first corpus's own vocabulary (its ids are
  those of a run without a shift), then the second's words it lacks, in the second's own order.
- :func:`second_corpus_rows`, :class:`ShiftSampler`: which rows of a batch the second corpus
  supplies at each step.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .lm import WIKITEXT_FILES, BatchSampler, SyntheticTopicCorpus, TokenCorpus, _read_split, word_vocab, words_corpus
from .sst2 import sst2_lm_words

SYNTHETIC = "synthetic"
SYNTHETIC_KEYS = ("seed", "topics", "vocab", "num_topics")
SPEC_HELP = ("a WikiText-format directory (wiki.{train,valid,test}.tokens), a GLUE SST-2 directory (train.tsv: "
             "its phrases as text), or synthetic[:key=value,...] with keys seed=, topics=a-b, vocab=, num_topics=")


@dataclass(frozen=True)
class DataSpec:
    kind: str                                # "synthetic", "wikitext" or "sst2"
    path: str = ""
    seed: Optional[int] = None               # None: --seed
    topics: Optional[Tuple[int, int]] = None  # None: every topic
    vocab_size: int = 512                    # SyntheticTopicCorpus's defaults
    num_topics: int = 8


def parse_data_spec(spec: Optional[str], flag: str) -> DataSpec:
    """``None``: the default synthetic corpus. An existing directory keeps its meaning even if it
    is called ``synthetic``; every problem is a ``ValueError`` / ``FileNotFoundError`` naming ``flag``."""
    if spec is None:
        return DataSpec(SYNTHETIC)
    if not os.path.isdir(spec) and (spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":")):
        return _parse_synthetic(spec, flag)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{flag} {spec!r}: no such directory (expected {SPEC_HELP})")
    if os.path.isfile(os.path.join(spec, WIKITEXT_FILES[0])):
        return DataSpec("wikitext", spec)
    if os.path.isfile(os.path.join(spec, "train.tsv")):
        return DataSpec("sst2", spec)
    raise FileNotFoundError(f"{flag} {spec!r}: {os.path.join(spec, WIKITEXT_FILES[0])} not found, nor train.tsv "
                            f"(expected {SPEC_HELP})")


def _parse_synthetic(spec: str, flag: str) -> DataSpec:
    out = DataSpec(SYNTHETIC)
    for item in filter(None, spec[len(SYNTHETIC) + 1:].split(",")):
        key, sep, value = item.partition("=")
        if key not in SYNTHETIC_KEYS or not sep:
            raise ValueError(f"{flag} {spec!r}: {item!r} is not one of "
                             f"{', '.join(k + '=' for k in SYNTHETIC_KEYS)} (synthetic[:key=value,...])")
        if key == "topics":
            m = re.fullmatch(r"(\d+)-(\d+)", value)
            if not m or int(m.group(1)) > int(m.group(2)):
                raise ValueError(f"{flag} {spec!r}: topics={value!r} is not a range a-b of topic numbers with a <= b")
            out = replace(out, topics=(int(m.group(1)), int(m.group(2))))
            continue
        if not re.fullmatch(r"\d+", value):
            raise ValueError(f"{flag} {spec!r}: {key}={value!r} is not a non-negative integer")
        out = replace(out, **{{"vocab": "vocab_size"}.get(key, key): int(value)})
    return out   # topics beyond num_topics: SyntheticTopicCorpus refuses them


@dataclass
class LMSource:
    """One corpus before the shared vocabulary: generated ids over its vocabulary (synthetic), or
    the train / valid / test words (a directory)."""

    spec: DataSpec
    name: str
    vocab: List[str]
    corpus: Optional[TokenCorpus] = None
    words: Optional[List[List[str]]] = None


def read_lm_source(spec: DataSpec, seed: int, test: bool = False) -> LMSource:
    """``seed``: the synthetic corpus's when the spec names none (``--seed``). ``test``: the run
    evaluates the test split, which SST-2 does not give (its test phrases are unlabelled and not read)."""
    if spec.kind == SYNTHETIC:
        c = SyntheticTopicCorpus(vocab_size=spec.vocab_size, num_topics=spec.num_topics,
                                 seed=seed if spec.seed is None else spec.seed, topics=spec.topics)
        return LMSource(spec, c.name, c.vocab, corpus=c)
    base = os.path.basename(os.path.normpath(spec.path))
    if spec.kind == "wikitext":
        words = [_read_split(spec.path, name) for name in WIKITEXT_FILES]
        return LMSource(spec, f"wikitext({base})", word_vocab(words[0]), words=words)
    if test:
        raise ValueError(f"{spec.path} is GLUE SST-2: it has no test split for --test (use WikiText or synthetic)")
    train, valid, source = sst2_lm_words(spec.path)
    # no test split: the valid words stand in so the corpus has three streams; --test is refused above
    return LMSource(spec, f"sst2-text({base}; valid: {source})", word_vocab(train), words=[train, valid, valid])


def check_shift_pair(first: DataSpec, second: DataSpec) -> None:
    """Two synthetic corpora must be topic bands of one generator family (same V and number of
    topics): otherwise one token id would name different words in the two."""
    if first.kind == second.kind == SYNTHETIC and (first.vocab_size, first.num_topics) != (second.vocab_size,
                                                                                           second.num_topics):
        raise ValueError(f"vocab={second.vocab_size}, num_topics={second.num_topics} differ from --data's "
                         f"vocab={first.vocab_size}, num_topics={first.num_topics}: a synthetic shift must keep "
                         f"the generator's vocabulary and number of topics (change seed= or topics= instead)")


def on_one_vocabulary(first: LMSource, second: Optional[LMSource],
                      max_train_tokens: Optional[int] = None) -> Tuple[TokenCorpus, Optional[TokenCorpus]]:
    """Both corpora encoded with the union vocabulary (see the module doc); ``max_train_tokens``
    truncates each train stream. Without ``second`` the first corpus is what it always was."""
    vocab = list(first.vocab)
    if second is not None:
        seen = set(vocab)
        vocab += [w for w in second.vocab if w not in seen]
    out = [_encode(src, vocab, max_train_tokens) for src in (first, second) if src is not None]
    return out[0], (out[1] if second is not None else None)


def _encode(src: LMSource, vocab: List[str], max_train_tokens: Optional[int]) -> TokenCorpus:
    if src.words is not None:
        return words_corpus(src.words, vocab, src.name, max_train_tokens)
    c = src.corpus
    if vocab[:len(c.vocab)] != c.vocab:   # its ids are not the union's: map them through the words
        stoi = {w: i for i, w in enumerate(vocab)}
        table = torch.tensor([stoi[w] for w in c.vocab], dtype=torch.long)
        c.train, c.valid, c.test = table[c.train], table[c.valid], table[c.test]
    c.vocab, c.stoi = vocab, {w: i for i, w in enumerate(vocab)}
    if max_train_tokens is not None:
        c.train = c.train[:max_train_tokens]
    return c


# ------------------------------------------------------------------------------------------
def second_corpus_rows(step: int, shift_step: int, ramp: int, rows: int) -> int:
    """How many of a batch's ``rows`` optimizer step ``step`` (1-based) takes from the second
    corpus: none up to ``shift_step``, all after ``shift_step + ramp``, and in the ramp the linear
    fraction ``(step - shift_step) / ramp`` of ``rows`` rounded half up (so within half a row of it)."""
    if step <= shift_step:
        return 0
    if step >= shift_step + ramp:
        return rows
    return (2 * rows * (step - shift_step) + ramp) // (2 * ramp)


def rows_from_second(rows: int, n: int) -> Tensor:
    """Which ``n`` of ``rows`` come from the second corpus: spread evenly (row i when
    ``floor((i+1)n/rows) > floor(i n/rows)``), so every rank's share of a global batch mixes too."""
    i = torch.arange(rows)
    return (i + 1) * n // rows > i * n // rows


class ShiftSampler:
    """``first`` up to the shift, then a mix, then ``second``: the loop calls ``set_step(s)``
    before drawing step ``s``'s micro-batches. Before the shift the batches are ``first``'s, draw
    for draw (a run with a shift equals one without it up to the shift)."""

    def __init__(self, first: BatchSampler, second: BatchSampler, shift_step: int, ramp: int = 0):
        if first.batch_size != second.batch_size or first.seq_len != second.seq_len:
            raise ValueError("both corpora's samplers must draw batches of one shape")
        self.first, self.second, self.shift_step, self.ramp = first, second, shift_step, ramp
        self.step = 1

    @property
    def generator(self) -> torch.Generator:   # the first corpus's data position (as without a shift)
        return self.first.generator

    def set_step(self, step: int) -> None:
        self.step = step

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[Tensor, Tensor]:
        rows = self.first.batch_size
        n = second_corpus_rows(self.step, self.shift_step, self.ramp, rows)
        if n == 0:
            return next(self.first)
        if n == rows:
            return next(self.second)
        mask = rows_from_second(rows, n)
        (x1, y1), (x2, y2) = self.first.draw(rows - n), self.second.draw(n)
        x = torch.empty(rows, x1.shape[1], dtype=x1.dtype)
        y = torch.empty_like(x)
        x[~mask], y[~mask], x[mask], y[mask] = x1, y1, x2, y2
        return x, y
