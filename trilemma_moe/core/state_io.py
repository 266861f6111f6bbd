"""Reading and rewriting parameters *with their optimizer state* during a regroup.

A regroup rewrites slot contents in place (the module structure never changes), so every
write says what happens to the optimizer moments of that parameter:

* rows that move with an expert (router vectors, biases): moments move with them;
* bases, whose elements keep their meaning: moments become the same convex combination as the
  values (a new group's base mixes the old bases its members came from);
* fresh SVD factors, whose coordinates have no relation to the old ones: first moments are
  reset to zero and second moments to the mean of the expert's old second moment, which keeps
  Adam's step size at its pre-regroup scale (zero second moments would make the first step
  after a regroup ~3x larger than usual: a loss spike).

``TorchParamIO`` handles a plain ``torch.optim`` optimizer (or none). The DeepSpeed integration
supplies one that goes through ZeRO's fp32 master partitions.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Optimizer state keys holding squared-gradient statistics (Adam/AdamW/AMSGrad, DeepSpeed Adam).
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")

StateRule = Callable[[str, torch.Tensor], torch.Tensor]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a rewrite: at least float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class TorchParamIO:
    """Parameters live in ``p.data``; state in ``optimizer.state[p]`` (if an optimizer is attached)."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None):
        self.optimizer = optimizer

    def read(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach()

    def _states(self, p):
        if self.optimizer is None:
            return {}
        return self.optimizer.state.get(p, {})

    def write(self, p: torch.Tensor, value: torch.Tensor, rule: Optional[StateRule]) -> None:
        p.data.copy_(value.to(p.dtype))
        if rule is None:
            return
        st = self._states(p)
        for key, t in list(st.items()):
            if torch.is_tensor(t) and t.shape == p.shape:
                t.copy_(rule(key, t.to(_work_dtype(t.dtype))).to(t.dtype))

    def release(self, p: torch.Tensor) -> None:
        """A parameter no longer used (burn-in full experts): drop its state and storage."""
        if self.optimizer is not None:
            self.optimizer.state.pop(p, None)
        p.requires_grad_(False)
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    # --- the three rules a regroup needs ---------------------------------------------------
    # ``take(t, rows)`` reads rows of a slot-stacked tensor; the default indexes locally, expert
    # parallelism passes one that fetches rows held by other ranks (a collective: every rank
    # calls it for the same tensors in the same order).
    def permute_rows(self, p: torch.Tensor, new_to_old: torch.Tensor, take=None) -> None:
        take = take or _take_local
        self.write(p, take(self.read(p), new_to_old), lambda key, s: take(s, new_to_old))

    def mix_rows(self, p: torch.Tensor, coeff: torch.Tensor) -> None:
        """Rows become convex combinations ``coeff @ rows`` (coeff rows sum to 1)."""
        def mix(t):
            return (coeff.to(t.dtype) @ t.reshape(t.shape[0], -1)).reshape(t.shape)
        self.write(p, mix(self.read(p).to(_work_dtype(p.dtype))), lambda key, s: mix(s))

    def write_fresh(self, p: torch.Tensor, value: torch.Tensor, new_to_old: Optional[torch.Tensor],
                    keep_rows: Optional[torch.Tensor] = None, take=None) -> None:
        """New factor values; moments: first reset, second set to the old row's mean.

        Rows flagged in ``keep_rows`` (factors of groups the regroup left untouched) keep their
        moments as they are.
        """
        def rule(key, s):
            if key in SECOND_MOMENT_KEYS and new_to_old is not None:
                per_row = (take or _take_local)(s.reshape(s.shape[0], -1).mean(dim=1), new_to_old)
                out = per_row.view(-1, *([1] * (s.dim() - 1))).expand_as(s).clone()
            else:
                out = torch.zeros_like(s)
            if keep_rows is not None and new_to_old is not None:
                # a kept row holds the same expert as before; with ``take`` new_to_old is global,
                # and a kept row's old row is the same local row
                out[keep_rows] = (s[new_to_old] if take is None else s)[keep_rows]
            return out
        self.write(p, value, rule)


def _take_local(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t[rows]


def adopt_checkpoint_phase(layer, state_dict, prefix: str) -> None:
    """Before ``layer`` (a ClusteredMoE) loads ``state_dict``: take the checkpoint's phase. A
    clustered checkpoint (compressed, unless ``low_rank=False``) no longer holds the burn-in
    experts, so the layer releases its own; a burn-in checkpoint cannot go into a clustered layer,
    nor into a layer whose burn-in trains the other form (``burn_in_form``)."""
    counters = state_dict.get(prefix + "counters")
    if counters is None:
        return
    incoming = bool(int(counters[layer._COUNTERS.index("compressed")]))
    compresses = layer.config.low_rank   # low_rank=False keeps the full experts after clustering
    if incoming and not layer.clustered and compresses:
        for p in layer.experts.full.values():
            layer.io.release(p)
    elif not incoming and layer.clustered:
        raise RuntimeError(f"{prefix or 'layer'}: cannot load a burn-in (uncompressed) checkpoint into a "
                           f"layer that has already been clustered; load it into a fresh layer")
    full_keys = [k for k in state_dict if k.startswith(prefix + "experts.full.")]
    if not incoming:   # a burn-in checkpoint holds the form its burn-in trains: it must be the layer's
        saved_full = any(torch.is_tensor(state_dict[k]) and state_dict[k].numel() > 0 for k in full_keys)
        if saved_full != layer.experts.full_storage:
            saved = "full" if saved_full else "compressed"
            raise RuntimeError(f"{prefix or 'layer'}: this checkpoint was saved during a burn_in_form={saved!r} "
                               f"burn-in; the layer has burn_in_form={layer.config.burn_in_form!r}. Build it with "
                               f"burn_in_form={saved!r} to resume")
    if not layer.experts.full:
        # a layer without burn-in experts (burn_in_form="compressed") takes none: a clustered
        # checkpoint written under ZeRO-1/2 still carries them, older ones carry empty placeholders
        for k in full_keys:
            del state_dict[k]
    elif incoming and compresses:
        # A checkpoint written under ZeRO still carries the burn-in experts (DeepSpeed keeps their
        # storage); a layer that released them takes them as released. (state_dict is
        # load_state_dict's own copy.)
        for name, p in layer.experts.full.items():
            key = f"{prefix}experts.full.{name}"
            t = state_dict.get(key)
            if p.numel() == 0 and torch.is_tensor(t) and t.numel() > 0:
                state_dict[key] = t.new_empty(0)
