"""Data for the small-GPT experiments.

- ``lm``: token streams for the language-model task (the generated topic corpus, WikiText,
  ``BatchSampler``, ``eval_batches``).
- ``sst2``: GLUE SST-2 sentences and labels for the classification task (``load_sst2``, the
  held-out slice of 872 whole sentences when there is no dev.tsv, ``RowSampler``, ``sentence_batches``).
- ``shift``: a distribution shift in the LM task (``--data`` / ``--shift-data`` specs, one vocabulary
  over both corpora, the ``ShiftSampler`` schedule).
"""
from .lm import (EOS, UNK, WIKITEXT_FILES, BatchSampler, SyntheticTopicCorpus, TokenCorpus, eval_batches,
                 load_wikitext, num_eval_batches, word_vocab)
from .shift import (DataSpec, ShiftSampler, check_shift_pair, on_one_vocabulary, parse_data_spec, read_lm_source,
                    rows_from_second, second_corpus_rows)
from .sst2 import (PAD, SST2_HELDOUT, RowSampler, SentenceDataset, load_sst2, read_labelled_tsv,
                   sentence_batches, stratified_holdout)

__all__ = ["EOS", "PAD", "SST2_HELDOUT", "UNK", "WIKITEXT_FILES", "BatchSampler", "DataSpec", "RowSampler",
           "SentenceDataset", "ShiftSampler", "SyntheticTopicCorpus", "TokenCorpus", "check_shift_pair",
           "eval_batches", "load_sst2", "load_wikitext", "num_eval_batches", "on_one_vocabulary", "parse_data_spec",
           "read_labelled_tsv", "read_lm_source", "rows_from_second", "second_corpus_rows", "sentence_batches",
           "stratified_holdout", "word_vocab"]
