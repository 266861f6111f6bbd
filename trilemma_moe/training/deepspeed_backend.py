"""The DeepSpeed backend: ``deepspeed.initialize`` with the user's JSON (``--deepspeed_config``).

DeepSpeed's own keys decide the optimizer step: ``gradient_accumulation_steps`` and
``gradient_clipping`` are read by the engine with DeepSpeed's defaults (1, and 0: no clipping);
our config does not write them. ``train_micro_batch_size_per_gpu`` defaults to ``--batch-size``.
The optimizer is the JSON's ``"optimizer"`` or, without one, the main job's AdamW over
DeepSpeed's MoE parameter groups. ``attach_engine`` tells every clustered layer about the
engine's steps (applied or skipped) and lets regroups move optimizer state through DeepSpeed.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..config import TrilemmaMoEConfig
from ..parallel.comm import named_comm_failure
from .errors import input_errors
from .backend import adamw

_NEEDS_DS = "--deepspeed_config needs DeepSpeed: pip install 'trilemma_moe[deepspeed]'"
# keys of the 'trilemma_moe' section that DeepSpeed's own keys must agree with
_SAME_AS_DEEPSPEED = {"gradient_accumulation_steps": "gradient_accumulation_steps",
                      "grad_clip": "gradient_clipping"}


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, config_path: str, cfg: TrilemmaMoEConfig, lr: float, batch_size: int):
        self.config_path, self.cfg, self._lr = config_path, cfg, lr
        self.micro_batch_size = batch_size     # until the engine says otherwise
        self.grad_accum, self.grad_clip = 1, 0.0
        self.engine = None
        self.optimizer = None

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def prepare(self) -> None:
        """Expert-parallel layers place their groups on ranks when built: the process group first
        (a world-1 group when not started by the deepspeed launcher)."""
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise ImportError(_NEEDS_DS) from exc
        from ..integrations.deepspeed import ensure_process_group
        ensure_process_group()

    def _deepspeed_config(self) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(DeepSpeed's part of the JSON, the 'trilemma_moe' section)."""
        with open(self.config_path) as f:
            raw = json.load(f)
        ds_config = {k: v for k, v in raw.items() if k != "trilemma_moe"}  # ours, not DeepSpeed's
        ds_config.setdefault("train_micro_batch_size_per_gpu", self.micro_batch_size)
        return ds_config, dict(raw.get("trilemma_moe") or {})

    def setup(self, model: nn.Module, param_groups: List[Dict[str, Any]]) -> None:
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        from ..integrations.deepspeed import attach_engine

        ds_config, section = self._deepspeed_config()
        groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
        optimizer = None if "optimizer" in ds_config else adamw(groups, self._lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, config=ds_config)
        self.grad_accum = int(self.engine.gradient_accumulation_steps())
        self.grad_clip = float(self.engine.gradient_clipping() or 0.0)
        self.micro_batch_size = int(self.engine.train_micro_batch_size_per_gpu())
        ours = {"gradient_accumulation_steps": self.grad_accum, "grad_clip": self.grad_clip}
        with input_errors("--deepspeed_config", self.config_path):
            for knob, ds_key in _SAME_AS_DEEPSPEED.items():
                if knob in section and section[knob] != ours[knob]:
                    raise ValueError(f"{self.config_path}: the 'trilemma_moe' section sets {knob}="
                                     f"{section[knob]} but DeepSpeed runs with {ds_key}={ours[knob]}: "
                                     f"set DeepSpeed's own {ds_key!r}")
        # Regroups rewrite parameters and Adam state through DeepSpeed (ZeRO partitions / masters);
        # the layers follow the engine's applied and skipped steps.
        attach_engine(self.engine)

    def set_lr(self, lr: float) -> None:
        if self.engine.lr_scheduler is None:   # a scheduler from the JSON keeps its own
            for g in self.optimizer.param_groups:
                g["lr"] = lr

    def forward_backward(self, x: Tensor, y: Tensor, step: int = 0) -> Tuple[Tensor, Tensor]:
        """One micro-batch; ``engine.step()`` after every backward, as DeepSpeed asks (it applies
        the optimizer at the accumulation boundary, clipping included). A collective of DeepSpeed's
        that fails (a lost host) is one error naming the step and stage."""
        x, y = x.to(self.engine.device), y.to(self.engine.device)
        timeout = self.cfg.comm_timeout_s
        with named_comm_failure(f"step {step}: forward", timeout):
            _, loss, l_aux = self.engine(x, y)
        with named_comm_failure(f"step {step}: backward (DeepSpeed gradient reduction)", timeout):
            self.engine.backward(loss + l_aux)
        with named_comm_failure(f"step {step}: optimizer step", timeout):
            self.engine.step()
        return loss, l_aux

    def optimizer_step(self) -> float:
        return float("nan")   # done by the last micro-batch's engine.step()

    def save(self, save_dir: str, step: int, client: Dict[str, Any]) -> None:
        from ..integrations.checkpoint import save_checkpoint
        save_checkpoint(self.engine, save_dir, tag=f"step{step}", client_state=client)

    def load(self, save_dir: str) -> Dict[str, Any]:
        # Ours checks 'latest' (empty, binary, naming a missing folder) and names it; DeepSpeed's does not.
        from ..integrations.checkpoint import load_checkpoint
        path, client = load_checkpoint(self.engine, save_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {save_dir}")
        return client
