"""Data for the small-GPT experiments.

- ``lm``: token streams for the language-model task (the generated topic corpus, WikiText,
  ``BatchSampler``, ``eval_batches``).
- ``sst2``: GLUE SST-2 sentences and labels for the classification task (``load_sst2``, the
  fixed stratified held-out slice, ``RowSampler``, ``sentence_batches``).
"""
from .lm import (EOS, UNK, WIKITEXT_FILES, BatchSampler, SyntheticTopicCorpus, TokenCorpus, eval_batches,
                 load_wikitext, num_eval_batches)
from .sst2 import (PAD, SST2_HELDOUT, RowSampler, SentenceDataset, load_sst2, read_labelled_tsv,
                   sentence_batches, stratified_holdout)

__all__ = ["EOS", "PAD", "SST2_HELDOUT", "UNK", "WIKITEXT_FILES", "BatchSampler", "RowSampler",
           "SentenceDataset", "SyntheticTopicCorpus", "TokenCorpus", "eval_batches", "load_sst2",
           "load_wikitext", "num_eval_batches", "read_labelled_tsv", "sentence_batches", "stratified_holdout"]
