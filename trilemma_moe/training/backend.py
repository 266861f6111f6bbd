"""What the training loop asks of a backend, and the plain-torch backend.

The loop (``loop.py``) is the same for every backend: it draws the batches, sets the learning
rate, runs ``gradient_accumulation_steps`` micro-batches through :meth:`Backend.forward_backward`,
then :meth:`Backend.optimizer_step`, and reports. A backend owns the optimizer, where the model
runs, the optimizer-step boundary the clustered layers are told about, and checkpoints.

- :class:`TorchBackend`: ``torch.optim.AdamW`` on one device (``--device``, ``--dtype bf16``
  autocast), gradient clipping and accumulation from ``TrilemmaMoEConfig``; the clustered layers
  see each step through ``ClusteredMoE.attach_optimizer`` (the optimizer's step hook).
- :class:`~trilemma_moe.training.deepspeed_backend.DeepSpeedBackend`: ``deepspeed.initialize``
  with the user's JSON; see that module.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

from ..config import TrilemmaMoEConfig
from ..core.layer import clustered_layers


class Backend(Protocol):
    """One way to train the model. ``prepare`` runs before the model is built, ``setup`` after."""

    name: str
    grad_accum: int            # micro-batches per optimizer step
    grad_clip: float           # max gradient norm (0: none)
    micro_batch_size: int      # windows per micro-batch on this rank

    @property
    def device(self) -> torch.device: ...

    def prepare(self) -> None: ...

    def setup(self, model: nn.Module, param_groups: List[Dict[str, Any]]) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def forward_backward(self, x: Tensor, y: Tensor, step: int = 0) -> Tuple[Tensor, Tensor]:
        """One micro-batch: forward, backward of ``loss + l_aux``; returns ``(loss, l_aux)``.
        ``step`` (1-based) names the step in a failed collective's error."""

    def optimizer_step(self) -> float:
        """After the last micro-batch of a step: apply it; returns the gradient norm (NaN when
        the backend does not report one)."""

    def save(self, save_dir: str, step: int, client: Dict[str, Any]) -> None: ...

    def load(self, save_dir: str) -> Dict[str, Any]:
        """Restore model and optimizer from ``save_dir``; returns the ``client`` dict saved."""


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay matrices, not biases / norms / embeddings' positions; tied weights once; frozen
    parameters (a compressed burn-in's empty full experts) not at all."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "pos_emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def adamw(groups: List[Dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """The main job's optimizer (both backends, unless the DeepSpeed JSON names one)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


class TorchBackend:
    """Plain torch on one device."""

    name = "torch"

    def __init__(self, cfg: TrilemmaMoEConfig, device: str, dtype: str, lr: float, batch_size: int):
        self.grad_accum = cfg.gradient_accumulation_steps
        self.grad_clip = cfg.grad_clip
        self.micro_batch_size = batch_size
        self._device, self._bf16, self._lr = device, dtype == "bf16", lr
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    def prepare(self) -> None:
        if self._device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {self._device}: no CUDA device is available")

    def setup(self, model: nn.Module, param_groups: List[Dict[str, Any]]) -> None:
        self.model = model.to(self._device)
        self.optimizer = adamw(param_groups, self._lr)
        for layer in clustered_layers(model):   # regroups move Adam state; steps reach the layer
            layer.attach_optimizer(self.optimizer)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def forward_backward(self, x: Tensor, y: Tensor, step: int = 0) -> Tuple[Tensor, Tensor]:
        x, y = x.to(self._device), y.to(self._device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            _, loss, l_aux = self.model(x, y)
        ((loss + l_aux) / self.grad_accum).backward()
        return loss, l_aux

    def optimizer_step(self) -> float:
        grad_norm = float("nan")
        if self.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, save_dir: str, step: int, client: Dict[str, Any]) -> None:
        """Weights (layer state included), optimizer and ``client``; atomic (a kill mid-save
        leaves the previous checkpoint in place)."""
        from ..core.checkpoint import atomic_save
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **client},
                    os.path.join(save_dir, "latest.pt"))

    def load(self, save_dir: str) -> Dict[str, Any]:
        from ..core.checkpoint import safe_load
        client = safe_load(os.path.join(save_dir, "latest.pt"))
        self.model.load_state_dict(client["model"])
        self.optimizer.load_state_dict(client["optimizer"])
        return client
