"""The small GPT's blocks as a sentence classifier (the trainer's ``--task sst2``).

Same embeddings, blocks and FFN kinds as :class:`~trilemma_moe.models.gpt.GPT`; what differs:

- attention is bidirectional over the sentence's tokens (pads are masked out as keys), and the
  FFN of every block sees the non-pad tokens only (``Block.forward(x, mask)``), so pads count in
  no MoE load statistic and no auxiliary loss;
- the head is ``Linear(d, num_classes)`` on the mean of the final (layer-normed) hidden states
  over the non-pad tokens.

A sentence's logits do not depend on how many pads follow it (pads sit after the tokens, so the
tokens keep their positions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gpt import GPT


class GPTClassifier(GPT):
    """``forward(idx[B,T], targets[B]=None) -> (logits[B,C], loss or None, l_aux)``; ``pad_id``
    marks padding. ``loss`` is the cross-entropy alone, ``l_aux`` the FFN blocks' sum."""

    def __init__(self, vocab_size: int, num_classes: int = 2, pad_id: int = 0, **gpt_kwargs):
        super().__init__(vocab_size, **gpt_kwargs)
        self.num_classes, self.pad_id = num_classes, pad_id
        d_model = self.tok_emb.embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gpt_kwargs.get("seed", 0) + 1)
            self.head = nn.Linear(d_model, num_classes)   # replaces the tied LM head

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        mask = idx != self.pad_id
        # a row of pads alone attends to all its positions (no NaN) and pools to zeros
        h, l_aux = self.hidden_states(idx, mask | ~mask.any(dim=1, keepdim=True))
        w = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        logits = self.head(pooled)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float(), targets)
        return logits, loss, l_aux
