"""Token streams for the small-GPT language-model task.

- ``SyntheticTopicCorpus``: a generated corpus with topic structure (default, no download).
- ``load_wikitext(dir)``: word-level WikiText-2/-103 (``wiki.{train,valid,test}.tokens``).
- ``BatchSampler``: random contiguous windows of ``seq_len + 1`` tokens for training.
- ``eval_batches``: non-overlapping windows over a stream for evaluation (``num_eval_batches``:
  how many batches).

WikiText is not shipped: download the word-level release (``wikitext-2-v1.zip`` of Merity et al.,
2016, with ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``), unzip it and pass
the directory to ``--data``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

EOS = "<eos>"
UNK = "<unk>"


@dataclass
class TokenCorpus:
    """Three 1-D ``torch.long`` token streams and the vocabulary (id -> string)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: List[str]
    name: str = "corpus"
    stoi: Dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokens_in(self, x: Tensor) -> int:
        """Tokens of a batch of windows (what tokens/s counts)."""
        return x.numel()

    def describe(self) -> str:
        return (f"{self.name}: vocab {self.vocab_size:,}, train {self.train.numel():,} / "
                f"valid {self.valid.numel():,} / test {self.test.numel():,} tokens")


# ------------------------------------------------------------------------------------------
def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    c = np.cumsum(w)
    return c / c[-1]


class SyntheticTopicCorpus(TokenCorpus):
    """A generated corpus in which experts have something to specialise on.

    Vocabulary (``vocab_size`` ids): id 0 is ``<eos>`` (end of document), ids ``1..F`` are
    shared "function words" (``F = vocab_size // 8``), the rest is split into ``num_topics``
    equal bands of topic words.  Each document picks a topic ``t`` and a length, then emits
    tokens from a first-order process:

    - with prob. ``p_function`` a function word (one Zipf law shared by all topics);
    - with prob. ``p_markov`` the topic's *successor* of the previous token
      (``succ_t[prev]`` plus a small Zipf offset inside band t): the Markov part, learnable
      only from context;
    - otherwise a topic word from topic t's own Zipf law over its band (topic-specific rank
      order).

    Deterministic under ``seed``.  The streams are made by running all documents in parallel,
    one position at a time, so 440k tokens take well under a second.

    ``topics=(a, b)``: documents draw their topic only from ``a..b`` (inclusive). The topic tables
    are drawn first, so they (and the vocabulary) are those of the unrestricted corpus of the same
    seed: two such corpora are topic bands of one generator (a topic shift). ``None``: all topics,
    the stream bit-identical to what it was before the option existed.
    """

    def __init__(self, vocab_size: int = 512, num_topics: int = 8, seed: int = 0,
                 train_tokens: int = 400_000, valid_tokens: int = 40_000,
                 test_tokens: Optional[int] = None, doc_len: Tuple[int, int] = (64, 512),
                 p_function: float = 0.2, p_markov: float = 0.5,
                 topics: Optional[Tuple[int, int]] = None):
        n_fn = max(1, vocab_size // 8)
        band = (vocab_size - 1 - n_fn) // num_topics
        if band < 4:
            raise ValueError(f"vocab_size {vocab_size} too small for {num_topics} topics")
        if not (0 <= p_function <= 1 and 0 <= p_markov <= 1 and p_function + p_markov <= 1):
            raise ValueError("p_function and p_markov must be probabilities with sum <= 1")
        if topics is not None and not 0 <= topics[0] <= topics[1] < num_topics:
            raise ValueError(f"topics={topics[0]}-{topics[1]} is outside the generator's topics 0-{num_topics - 1}")
        self.num_topics, self.seed, self.topics = num_topics, seed, topics
        self.n_function, self.band = n_fn, band
        rng = np.random.Generator(np.random.PCG64(seed))

        # topic tables
        self.band_start = np.array([1 + n_fn + t * band for t in range(num_topics)])
        self.unigram_perm = np.stack([rng.permutation(band) for _ in range(num_topics)])
        self.successor = rng.integers(0, band, size=(num_topics, vocab_size))
        self._fn_cdf = _zipf_cdf(n_fn, 1.1)
        self._uni_cdf = _zipf_cdf(band, 1.1)
        self._off_cdf = _zipf_cdf(min(band, 8), 2.0)
        self._p_function, self._p_markov = p_function, p_markov
        self._doc_len = doc_len

        test_tokens = valid_tokens if test_tokens is None else test_tokens
        train = self._generate(rng, train_tokens)
        valid = self._generate(rng, valid_tokens)
        test = self._generate(rng, test_tokens)
        vocab = [EOS] + [f"f{i}" for i in range(n_fn)]
        for t in range(num_topics):
            vocab += [f"t{t}_{j}" for j in range(band)]
        vocab += [f"x{j}" for j in range(vocab_size - len(vocab))]  # unused rounding leftovers
        band_text = "" if topics is None else f",only={topics[0]}-{topics[1]}"
        super().__init__(train=train, valid=valid, test=test, vocab=vocab,
                         name=f"synthetic-topics(V={vocab_size},topics={num_topics},seed={seed}{band_text})",
                         stoi={w: i for i, w in enumerate(vocab)})

    def _generate(self, rng: np.random.Generator, n_tokens: int) -> Tensor:
        lo, hi = self._doc_len
        mean_len = (lo + hi) / 2 + 1
        n_docs = int(n_tokens / mean_len * 1.15) + 8
        if self.topics is None:
            topics = rng.integers(0, self.num_topics, size=n_docs)
        else:
            lo_t, hi_t = self.topics
            topics = lo_t + rng.integers(0, hi_t - lo_t + 1, size=n_docs)
        lengths = rng.integers(lo, hi + 1, size=n_docs)
        L = int(lengths.max())
        out = np.empty((n_docs, L), dtype=np.int64)
        prev = np.zeros(n_docs, dtype=np.int64)  # documents start after <eos>
        start = self.band_start[topics]
        for pos in range(L):
            u = rng.random(n_docs)
            fn = 1 + np.searchsorted(self._fn_cdf, rng.random(n_docs))
            uni = self.unigram_perm[topics, np.searchsorted(self._uni_cdf, rng.random(n_docs))]
            off = np.searchsorted(self._off_cdf, rng.random(n_docs))
            mk = (self.successor[topics, prev] + off) % self.band
            tok = np.where(u < self._p_function, fn,
                           np.where(u < self._p_function + self._p_markov, start + mk, start + uni))
            out[:, pos] = tok
            prev = tok
        mask = np.arange(L)[None, :] < lengths[:, None]
        docs = np.concatenate([out, np.zeros((n_docs, 1), dtype=np.int64)], axis=1)
        keep = np.concatenate([mask, np.ones((n_docs, 1), dtype=bool)], axis=1)
        stream = docs[keep]  # row-major: each doc's tokens then its <eos>
        while stream.size < n_tokens:  # pragma: no cover - the 15% margin makes this rare
            stream = np.concatenate([stream, stream])
        return torch.from_numpy(stream[:n_tokens].copy())


# ------------------------------------------------------------------------------------------
WIKITEXT_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def _read_words(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                words = line.split()
                if not words:
                    continue
                yield from words
                yield EOS
        except UnicodeDecodeError as exc:  # its message does not say which file
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def _read_split(directory: str, name: str) -> List[str]:
    """All words of one split. An empty one raises: train would fail later without naming the
    file, valid / test would report loss 0 (perplexity 1) over no tokens."""
    path = os.path.join(directory, name)
    words = list(_read_words(path))
    if not words:
        raise ValueError(f"{path} is empty (no tokens): --data must point to a WikiText directory whose "
                         f"{', '.join(WIKITEXT_FILES)} hold text")
    return words


def load_wikitext(directory: str, max_train_tokens: Optional[int] = None) -> TokenCorpus:
    """Word-level WikiText: split on whitespace, ``<eos>`` after every non-empty line, the
    vocabulary from the train split (``<eos>`` is id 0, then by descending frequency, ties in
    first-seen order), unknown valid/test words mapped to ``<unk>``.

    ``max_train_tokens`` truncates the returned train stream (the vocabulary still comes from
    the whole train file).
    """
    directory = os.fspath(directory)
    for name in WIKITEXT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: --data must point to a WikiText directory holding "
                f"{', '.join(WIKITEXT_FILES)} (the word-level release, e.g. wikitext-2-v1.zip "
                f"unpacked; the -raw release's .raw files are not read), or leave --data out "
                f"to use the synthetic corpus")
    splits = [_read_split(directory, name) for name in WIKITEXT_FILES]
    return words_corpus(splits, word_vocab(splits[0]), f"wikitext({os.path.basename(os.path.normpath(directory))})",
                        max_train_tokens)


def word_vocab(train_words: List[str]) -> List[str]:
    """``<eos>`` (id 0), the training words by descending frequency (ties in first-seen order),
    ``<unk>`` last unless the text has it."""
    counts = Counter(train_words)
    vocab = [EOS] + [w for w, _ in counts.most_common() if w != EOS]
    if UNK not in counts:
        vocab.append(UNK)
    return vocab


def words_corpus(splits: List[List[str]], vocab: List[str], name: str,
                 max_train_tokens: Optional[int] = None) -> TokenCorpus:
    """The train / valid / test word lists encoded with ``vocab`` (words outside it: ``<unk>``,
    which ``vocab`` must hold); ``max_train_tokens`` truncates the train stream."""
    stoi = {w: i for i, w in enumerate(vocab)}
    unk = stoi[UNK]
    train, valid, test = (torch.tensor([stoi.get(w, unk) for w in words], dtype=torch.long) for words in splits)
    if max_train_tokens is not None:
        train = train[:max_train_tokens]
    return TokenCorpus(train=train, valid=valid, test=test, vocab=vocab, name=name, stoi=stoi)


# ------------------------------------------------------------------------------------------
class BatchSampler:
    """Random contiguous windows: ``next()`` returns ``(x[B,T], y[B,T])`` with ``y`` the
    window shifted by one.  Driven by its own ``torch.Generator`` (seeded), so runs repeat."""

    def __init__(self, data: Tensor, seq_len: int, batch_size: int, seed: int = 0):
        if data.numel() < seq_len + 2:
            raise ValueError(f"token stream of {data.numel()} tokens is shorter than "
                             f"seq_len + 2 = {seq_len + 2}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[Tensor, Tensor]:
        return self.draw(self.batch_size)

    def draw(self, n: int) -> Tuple[Tensor, Tensor]:
        """``n`` windows (a shift's ramp draws part of a batch from each corpus)."""
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (n,),
                               generator=self.generator)
        win = self.data[starts[:, None] + self._offsets[None, :]]
        return win[:, :-1], win[:, 1:]

    next = __next__


def eval_batches(data: Tensor, seq_len: int, batch_size: int,
                 max_batches: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """Non-overlapping windows ``data[i*T : i*T + T + 1]`` over the whole stream (the ragged
    end dropped), in order, ``batch_size`` windows per batch."""
    n_windows = (data.numel() - 1) // seq_len
    offsets = torch.arange(seq_len + 1)
    produced = 0
    for b0 in range(0, n_windows, batch_size):
        if max_batches is not None and produced >= max_batches:
            return
        starts = torch.arange(b0, min(b0 + batch_size, n_windows)) * seq_len
        win = data[starts[:, None] + offsets[None, :]]
        yield win[:, :-1], win[:, 1:]
        produced += 1


def num_eval_batches(data: Tensor, seq_len: int, batch_size: int, max_batches: Optional[int] = None) -> int:
    """How many batches :func:`eval_batches` yields."""
    n = -(-((data.numel() - 1) // seq_len) // batch_size)
    return n if max_batches is None else min(n, max_batches)
