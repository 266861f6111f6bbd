"""Hugging Face ``transformers`` MoE models with our layer: each sparse MoE block (Mixtral,
Qwen3-MoE, DeepSeek-V3) becomes a :class:`ClusteredMoEBlock` around a ``TrilemmaMoE``, seeded
from the block's trained experts and router (``core/seeding.py``: the first clustering, no
burn-in).

What maps: the experts (SwiGLU, ``gate_up_proj``/``down_proj`` stacked 3-D weights of
transformers 5), the router rows (expert vectors v_i; group prototypes u_g = mean of the
members' rows), DeepSeek's shared experts (kept as they are, added to the routed output) and its
``routed_scaling_factor`` (scales the routed output). What changes: routing becomes ours, top-1
group then top-k inside it with weights p_g * p_i (paper 3.3): the block's score function
(softmax or sigmoid), its top-k renormalisation and DeepSeek's fixed expert groups are replaced.
What does not map is refused with one error naming it: a router bias, a non-zero DeepSeek
``e_score_correction_bias``, Mixtral's ``router_jitter_noise``, an activation we do not have.

Hugging Face's output contract: the block's ``gate`` child is an instance of the model's router
class, so ``output_router_logits=True`` records router logits [tokens, E] as before (our joint
log-probabilities log(p_g p_i), in expert order) and the model's own auxiliary loss reads them.
Our layer's balance and z losses are added to ``outputs.loss`` by a forward hook on the model
(:func:`moe_aux_loss` returns them for a loss computed elsewhere).
"""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from ..config import CONVERT_HF_MOE, DEEPSPEED_SECTION, TrilemmaMoEConfig
from .deepspeed import attach_engine, moe_param_groups
from .hf_convert import (SUPPORTED_MODEL_TYPES, ClusteredMoEBlock, convert_moe_blocks,  # noqa: F401
                         load_converted, moe_aux_loss)

__all__ = ["convert_moe_blocks", "ClusteredMoEBlock", "moe_aux_loss", "load_converted",
           "initialize", "attach_trainer", "attach_optimizer", "SUPPORTED_MODEL_TYPES"]


# --- DeepSpeed and the Trainer -------------------------------------------------------------------
def initialize(model: nn.Module, config, model_parameters=None, **kwargs: Any):
    """``deepspeed.initialize`` for a transformers MoE model whose DeepSpeed config asks for our
    layer: ``"trilemma_moe": {"convert_hf_moe": true, ...knobs}`` converts the MoE blocks first
    (knobs as :func:`convert_moe_blocks`), then builds DeepSpeed's MoE optimizer groups and
    attaches the engine. AutoEP's ``"expert_parallel"`` section may sit beside it only disabled:
    both would replace the same blocks. Returns what ``deepspeed.initialize`` returns."""
    import deepspeed
    if not isinstance(config, dict):
        with open(config) as fh:
            config = json.load(fh)
    section = config.get(DEEPSPEED_SECTION) or {}
    if not section.get(CONVERT_HF_MOE, False):
        raise ValueError(f"the DeepSpeed config's {DEEPSPEED_SECTION!r} section does not ask for conversion: "
                         f"set \"{CONVERT_HF_MOE}\": true")
    if (config.get("expert_parallel") or {}).get("enabled", False):
        raise ValueError("the DeepSpeed config enables AutoEP (\"expert_parallel\": {\"enabled\": true}) and asks "
                         f"for our layer (\"{CONVERT_HF_MOE}\"): both replace the same MoE blocks; disable one")
    # the section's knobs, and the accumulation and clipping DeepSpeed's own keys set
    knobs = TrilemmaMoEConfig.from_deepspeed_config(config).to_dict()
    explicit = {key: value for key, value in knobs.items()
                if key in section or key in ("gradient_accumulation_steps", "grad_clip", "offload_dir", "aio")}
    if int(explicit.get("ep_size", 1)) > 1:
        deepspeed.init_distributed()
    convert_moe_blocks(model, **explicit)
    if model_parameters is None:
        model_parameters = moe_param_groups(model)
    out = deepspeed.initialize(model=model, model_parameters=model_parameters, config=config, **kwargs)
    attach_engine(out[0])
    return out


def attach_trainer(trainer) -> None:
    """Make a ``transformers.Trainer`` train a converted model as our layers need. Its optimizer
    (``args.optim``, as the Trainer would build it) is built over DeepSpeed's MoE parameter groups
    (expert parameters apart, each with or without weight decay): ``trainer.create_optimizer`` is
    replaced on this instance. Once training starts, the DeepSpeed engine is attached
    (``attach_engine``) or, without DeepSpeed, the torch optimizer's steps become the layers' steps.
    A DeepSpeed config with its own ``"optimizer"`` section is refused: DeepSpeed would build it over
    one flat parameter list, which its MoE support does not accept."""
    from transformers import Trainer, TrainerCallback
    args = trainer.args
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is not None and "optimizer" in ds_config.config:
        raise ValueError("the DeepSpeed config given to TrainingArguments(deepspeed=...) has an \"optimizer\" section: "
                         "DeepSpeed would build it over one flat parameter list, which its MoE layers refuse; remove it "
                         "(the Trainer's optimizer, args.optim, is then built over the MoE parameter groups)")

    def create_optimizer(*_):
        if trainer.optimizer is None:
            model = trainer.model
            decay = set(trainer.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay, "name": "decay"},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0, "name": "no_decay"}]
            groups = [g for g in groups if g["params"]]
            if ds_config is not None or any(getattr(p, "allreduce", True) is False for _, p in named):
                from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
                groups = split_params_into_different_moe_groups_for_optimizer(groups)
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
            trainer.optimizer = optimizer_cls(groups, **kwargs)
        return trainer.optimizer
    trainer.create_optimizer = create_optimizer

    class _Attach(TrainerCallback):
        def on_train_begin(self, *_, **__):
            engine = trainer.model_wrapped
            if type(engine).__name__ == "DeepSpeedEngine":
                attach_engine(engine)
                return
            attach_optimizer(trainer.model, getattr(trainer.optimizer, "optimizer", trainer.optimizer))
    trainer.add_callback(_Attach())


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Your own training loop with a torch optimizer: its steps become the layers' steps (regroup
    schedule, temperature, router freeze) and regroups move its state. Without this (or
    ``attach_engine``/``attach_trainer``) a layer counts training forwards as steps."""
    for block in model.modules():
        if isinstance(block, ClusteredMoEBlock):
            block.moe.attach_optimizer(optimizer)
