"""A small GPT (pre-LN, causal SDPA attention, learned positions, tied embeddings) whose FFN
blocks come from ``build_ffn`` so dense / switch / deepspeed / ours are compared in one model."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.compression import held_numel
from ..config import TrilemmaMoEConfig
from .ffn import build_ffn


class CausalSelfAttention(nn.Module):
    """Causal self-attention; ``key_mask[B,T]`` (bool) instead attends bidirectionally to the keys
    where it is True (the classifier's pads are masked out)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        hd = C // self.n_heads
        q, k, v = (t.view(B, T, self.n_heads, hd).transpose(1, 2) for t in (q, k, v))
        if key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``mask[B,T]`` (bool, True = a token, False = padding): attention is bidirectional over
        the tokens and the FFN sees the tokens alone (pads never reach a router, so they count in
        no load statistic or auxiliary loss, and a pad's hidden state is only its residual)."""
        x = x + self.attn(self.ln1(x), key_mask=mask)
        if mask is None:
            y, l_aux = self.ffn(self.ln2(x))
            return x + y, l_aux
        C = x.shape[-1]
        keep = mask.reshape(-1).nonzero().squeeze(-1)
        y, l_aux = self.ffn(self.ln2(x).reshape(-1, C).index_select(0, keep))
        return x.reshape(-1, C).index_add(0, keep, y.to(x.dtype)).view_as(x), l_aux


class GPT(nn.Module):
    """``forward(idx[B,T], targets=None) -> (logits[B,T,V], loss or None, l_aux)``.

    ``loss`` is the LM cross-entropy alone; ``l_aux`` is the sum of the FFN blocks' auxiliary
    losses (the trainer adds the two).  ``moe_every=n`` puts the chosen FFN kind in every n-th
    block (blocks n-1, 2n-1, ...) and a dense FFN elsewhere; ``moe_every=1`` makes every block
    use ``ffn_kind``.
    """

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 seq_len: int = 64, d_ff: int = 512, ffn_kind: str = "switch",
                 moe_config: Optional[TrilemmaMoEConfig] = None, seed: int = 0, moe_every: int = 1):
        super().__init__()
        if moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {moe_every}")
        self.vocab_size, self.seq_len, self.ffn_kind = vocab_size, seq_len, ffn_kind
        self.moe_config = moe_config if moe_config is not None else TrilemmaMoEConfig()
        with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG untouched
            torch.manual_seed(seed)
            self._build(vocab_size, d_model, n_layers, n_heads, seq_len, d_ff, ffn_kind, seed,
                        moe_every)

    def _build(self, vocab_size, d_model, n_layers, n_heads, seq_len, d_ff, ffn_kind, seed,
               moe_every) -> None:
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        blocks = []
        for i in range(n_layers):
            kind = ffn_kind if (i + 1) % moe_every == 0 else "dense"
            ffn = build_ffn(kind, d_model, d_ff, self.moe_config, seed=seed, layer_index=i)
            blocks.append(Block(d_model, n_heads, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def hidden_states(self, idx: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Embeddings through every block and the final layer norm: ``(h[B,T,d], l_aux)``.
        ``mask``: see :meth:`Block.forward` (None: causal, every position a token)."""
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        l_aux = x.new_zeros(())
        for blk in self.blocks:
            x, la = blk(x, mask=mask)
            l_aux = l_aux + la
        return self.ln_f(x), l_aux

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None):
        h, l_aux = self.hidden_states(idx)
        logits = self.head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss, l_aux

    def moe_layers(self) -> List[nn.Module]:
        return [blk.ffn for blk in self.blocks if getattr(blk.ffn, "is_moe", False)]

    def param_counts(self) -> Dict[str, int]:
        """``total``: unique parameters actually used (tied weights once; for ours the expert
        part is the in-use form, i.e. bases + factors after clustering); ``expert``: expert
        weights only."""
        expert_in_use = sum(int(m.expert_parameter_count()) for m in self.moe_layers())
        expert_stored = 0
        for m in self.moe_layers():
            expert_stored += _stored_expert_params(m)
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += held_numel(p)   # a ZeRO-3 partitioned parameter's full size
        # replace the stored expert tensors by the in-use count (equal except for ours after
        # clustering, where unused full-expert slots may still be allocated)
        total = total - expert_stored + expert_in_use
        return {"total": int(total), "expert": int(expert_in_use),
                "non_expert": int(total - expert_in_use)}


def _stored_expert_params(m: nn.Module) -> int:
    fn = getattr(m, "stored_expert_parameter_count", None)
    return int(fn()) if callable(fn) else int(m.expert_parameter_count())
