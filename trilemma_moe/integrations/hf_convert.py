"""Converting a transformers MoE model's sparse blocks to :class:`ClusteredMoEBlock` (the math
of the seeding is ``core/seeding.py``), the blocks' Hugging Face output contract, and loading a
converted model. The user-facing module is ``integrations/hf.py``, which re-exports these."""
from __future__ import annotations

import glob
import io
import os
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..config import TrilemmaMoEConfig, dropin_structure
from ..core.experts import ExpertSlots
from ..core.seeding import seed_from_trained_experts
from .deepspeed import TrilemmaMoE

__all__ = ["convert_moe_blocks", "ClusteredMoEBlock", "moe_aux_loss", "load_converted", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3")
CONFIG_ATTR = "trilemma_moe"          # where the converted model's config keeps our knobs (config.json)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


def default_structure(num_experts: int, top_k: int, ep_size: int, hidden: int, ffn: int) -> tuple:
    """(num_groups, rank) for a converted block: the largest G <= max(8, ep_size) dividing E, a
    multiple of ep_size, whose groups hold at least 2k experts (the paper's K = 2k at E=32, k=2),
    else at least k; r as the drop-in's (16 from d, d_ff >= 64 on)."""
    G, rank = dropin_structure(num_experts, ep_size, hidden, ffn, top_k)
    roomy = [g for g in range(ep_size, max(8, ep_size) + 1, ep_size) if num_experts % g == 0
             and num_experts // g >= 2 * top_k]
    return (max(roomy) if roomy else G), rank


class _RouterLogits:
    """Mixed into the model's router class: a module that only hands on the logits it is given,
    so transformers' output recorders (``_can_record_outputs``, keyed on the router class) find it."""

    def __init__(self, num_experts: int):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        # empty stand-ins for what the model's _init_weights re-initialises on a router (no state)
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("e_score_correction_bias", torch.empty(0), persistent=False)

    def forward(self, router_logits: torch.Tensor):
        return router_logits, None, None


def _router_logits_module(router_class: type, num_experts: int) -> nn.Module:
    cls = type(f"Clustered{router_class.__name__}", (_RouterLogits, router_class), {"__module__": __name__})
    return cls(num_experts)


class ClusteredMoEBlock(nn.Module):
    """A converted sparse MoE block: ``forward(hidden [..., d]) -> [..., d]`` like the block it
    replaces. ``moe``: the TrilemmaMoE (a DeepSpeed MoE layer); ``gate``: router logits for
    Hugging Face's recorders; ``shared_experts``: DeepSeek's, unchanged."""

    def __init__(self, moe: TrilemmaMoE, router_class: type, shared_experts: Optional[nn.Module] = None,
                 routed_scaling_factor: float = 1.0):
        super().__init__()
        self.moe = moe
        self.gate = _router_logits_module(router_class, moe.num_experts)
        self.shared_experts = shared_experts
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.last_aux_loss: Optional[torch.Tensor] = None
        # The logits are computed inside the layer's own call (a forward hook on it), where ZeRO-3
        # has gathered its parameters: the layer is a ZeRO-3 leaf module, fetched whole at its call.
        self._router_logits: Optional[torch.Tensor] = None
        moe.moe.register_forward_hook(self._keep_router_logits)
        # save_pretrained writes safetensors, tensors only: our layer's extra state (regroup
        # bookkeeping, a dict) travels as the bytes of its torch.save
        self._register_state_dict_hook(_extra_state_as_bytes)
        self.register_load_state_dict_pre_hook(_extra_state_from_bytes)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log(p_g p_i) [tokens, E] in expert order: the joint routing distribution as logits."""
        layer = self.moe.moe
        G, K = layer.num_groups, layer.experts_per_group
        logits = layer.router.logits(x, flat=layer.flat_routing, **layer._router_state())
        if layer.flat_routing:   # the ablation: one softmax over every expert
            return torch.log_softmax(logits, -1)[:, layer.slot_of_expert()]
        group, expert = logits.split([G, G * K], dim=1)
        joint = torch.log_softmax(group, -1).unsqueeze(-1) + torch.log_softmax(expert.view(-1, G, K), -1)
        return joint.flatten(1)[:, layer.slot_of_expert()]

    def _keep_router_logits(self, layer, args, output) -> None:
        self._router_logits = self.router_logits(args[0].reshape(-1, layer.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The routed experts' output (DeepSeek's shared experts added), shaped as ``hidden_states``;
        the balance loss is kept in ``last_aux_loss`` for :func:`moe_aux_loss`."""
        y, l_aux, _ = self.moe(hidden_states)
        self.gate(self._router_logits)   # what transformers' output recorders read
        self._router_logits = None
        self.last_aux_loss = l_aux
        if self.routed_scaling_factor != 1.0:
            y = y * self.routed_scaling_factor
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y


def _extra_state_as_bytes(module, state, prefix, local_metadata):
    for key in [k for k in state if k.startswith(prefix) and k.endswith("_extra_state")]:
        buffer = io.BytesIO()
        torch.save(state[key], buffer)
        state[key] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _extra_state_from_bytes(module, state, prefix, *args):
    for key in [k for k in state if k.startswith(prefix) and k.endswith("_extra_state")]:
        if isinstance(state[key], torch.Tensor) and state[key].dtype == torch.uint8:
            state[key] = torch.load(io.BytesIO(state[key].numpy().tobytes()), weights_only=True)


def moe_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The sum of our layers' balance and z losses from the model's last forward (None before one).
    Already in ``outputs.loss`` when the model computed a loss; add it yourself otherwise."""
    losses = [m.last_aux_loss for m in model.modules() if isinstance(m, ClusteredMoEBlock)
              and m.last_aux_loss is not None]
    return torch.stack([a.float() for a in losses]).sum() if losses else None


def _add_aux_loss(model, args, kwargs, output):
    loss = getattr(output, "loss", None)
    aux = moe_aux_loss(model) if model.training and torch.is_grad_enabled() else None
    if loss is not None and aux is not None:
        output.loss = loss + aux.to(loss.dtype)
    return output


def _clear_aux_loss(model, args, kwargs):
    for m in model.modules():
        if isinstance(m, ClusteredMoEBlock):
            m.last_aux_loss = None


def _family(model: nn.Module):
    hf_config = getattr(model, "config", None)
    kind = getattr(hf_config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                         f"(pass the transformers model itself, e.g. MixtralForCausalLM)")
    return kind, hf_config


def _blocks(model: nn.Module) -> List[tuple]:
    """(name, block) for every sparse MoE block: a module with a ``gate`` (router, ``weight`` [E, d])
    and ``experts`` holding stacked ``gate_up_proj`` [E, 2f, d] and ``down_proj`` [E, d, f]."""
    found = []
    for name, m in model.named_modules():
        experts, gate = getattr(m, "experts", None), getattr(m, "gate", None)
        if isinstance(m, ClusteredMoEBlock) or experts is None or gate is None:
            continue
        if not all(isinstance(getattr(experts, k, None), torch.Tensor) for k in ("gate_up_proj", "down_proj")):
            raise ValueError(f"{name}.experts: expected the stacked expert weights gate_up_proj and down_proj of "
                             f"transformers >= 5; found {type(experts).__name__} without them")
        found.append((name, m))
    return found


def _check_block(name: str, block: nn.Module, hf_config) -> None:
    gate = block.gate
    if getattr(gate, "bias", None) is not None:
        raise ValueError(f"{name}.gate.bias: a router bias does not map (our router logits are x . v_i)")
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is not None and bool(bias.detach().abs().max() > 0):
        raise ValueError(f"{name}.gate.e_score_correction_bias is non-zero: DeepSeek's selection-only bias of "
                         f"auxiliary-loss-free balancing has no counterpart in our router (its balance loss does "
                         f"that job); zero it (...gate.e_score_correction_bias.zero_()) to convert without it")
    if float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0) > 0:
        raise ValueError(f"router_jitter_noise={hf_config.router_jitter_noise}: multiplicative input jitter of the "
                         f"router does not map; set the model config's router_jitter_noise to 0")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r}: expert activation not supported; supported: {sorted(_ACTIVATIONS)}")
    if getattr(block.experts, "has_bias", False):
        raise ValueError(f"{name}.experts has biases: experts with biases do not map")


def _expert_reader(block: nn.Module, dtype: torch.dtype):
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    f = down.shape[-1]

    def weights(e: int) -> Dict[str, torch.Tensor]:   # ours is (d_in, d_out): x @ W
        return {"w1": gate_up[e, :f].t().to(dtype), "w3": gate_up[e, f:].t().to(dtype), "w2": down[e].t().to(dtype)}
    return weights


def convert_moe_blocks(model: nn.Module, config: Optional[TrilemmaMoEConfig] = None, *, seed_from_block: bool = True,
                       **knobs: Any) -> List[Dict[str, float]]:
    """Replace every sparse MoE block of a transformers MoE model by a :class:`ClusteredMoEBlock`.

    ``config`` and ``knobs``: ours (``num_experts`` and ``top_k`` come from the model; ``num_groups``
    and ``rank`` default to :func:`~.hf_convert.default_structure`; the router temperature stays 1, the scale the
    router rows were trained at; a ``config``'s fields left at their dataclass defaults take these
    defaults too); ``knobs`` override single fields. ``seed_from_block=False``
    builds the structure only (:func:`load_converted` fills it from a checkpoint). Under expert
    parallelism (``ep_size`` > 1) call it on every rank after ``deepspeed.init_distributed()``:
    each rank decomposes only its own groups. Returns one report per block: its name, relative
    reconstruction error, intra-group similarity, expert parameters before and after, seconds.
    """
    kind, hf_config = _family(model)
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"no sparse MoE block found in this {kind} model (already converted?)")
    E, k = blocks[0][1].gate.weight.shape[0], int(hf_config.num_experts_per_tok)
    d, f = blocks[0][1].experts.down_proj.shape[1:]
    values = dict(router_temperature_start=1.0, router_temperature_end=1.0)
    if config is not None:   # its fields left at TrilemmaMoEConfig's defaults take the converter's
        defaults = TrilemmaMoEConfig().to_dict()
        values.update({key: v for key, v in config.to_dict().items() if v != defaults[key]})
    values.update(knobs)
    ep = int(values.get("ep_size", 1))
    G, rank = default_structure(E, k, ep, d, f)
    values.setdefault("num_groups", G)
    values.setdefault("rank", rank)
    values.update(num_experts=E, top_k=k, burn_in_form="compressed")
    cfg = TrilemmaMoEConfig.from_dict(values)
    reports = []
    for index, (name, block) in enumerate(blocks):
        _check_block(name, block, hf_config)
        start = time.perf_counter()
        ref = block.experts.down_proj
        ExpertSlots.draw_initial = False   # no random experts (nor their SVDs): the block's are loaded next
        try:
            layer = TrilemmaMoE(d, num_experts=E, config=cfg, ffn_hidden_size=f, gated=True, bias=False,
                                activation=_ACTIVATIONS[getattr(hf_config, "hidden_act", "silu")], layer_index=index)
        finally:
            ExpertSlots.draw_initial = True
        layer.to(device=ref.device, dtype=ref.dtype)
        report = {"name": name, "expert_parameters_before": block.experts.gate_up_proj.numel()
                  + block.experts.down_proj.numel()}
        if seed_from_block:
            report.update(seed_from_trained_experts(layer.moe, _expert_reader(block, ref.dtype), block.gate.weight))
        new = ClusteredMoEBlock(layer, type(block.gate), getattr(block, "shared_experts", None),
                                getattr(hf_config, "routed_scaling_factor", 1.0) if kind == "deepseek_v3" else 1.0)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.update(expert_parameters_after=layer.expert_parameter_count(), seconds=time.perf_counter() - start)
        reports.append(report)
    setattr(hf_config, CONFIG_ATTR, cfg.to_dict())   # save_pretrained writes it into config.json
    _save_keys_as_named(model)
    if not getattr(model, "_trilemma_aux_hooks", False):
        model.register_forward_pre_hook(_clear_aux_loss, with_kwargs=True)
        model.register_forward_hook(_add_aux_loss, with_kwargs=True)
        model._trilemma_aux_hooks = True
    return reports


# --- saving and loading --------------------------------------------------------------------------
def _save_keys_as_named(model: nn.Module) -> None:
    """transformers 5 saves some families under their legacy key names (Mixtral: ``mlp`` ->
    ``block_sparse_moe``, experts split back per expert), rules that mangle our layers' keys; a
    converted model's ``save_pretrained`` (also when the Trainer calls it) defaults to
    ``save_original_format=False``: the state dict as the model names it."""
    original = model.save_pretrained
    if getattr(original, "_trilemma_keys_as_named", False):
        return

    def save_pretrained(*args, **kwargs):
        split = [m.moe.ep_size for m in model.modules() if isinstance(m, ClusteredMoEBlock) and m.moe.ep_size > 1]
        if split:
            raise ValueError(f"save_pretrained: this model runs at ep_size {split[0]}, so each rank holds only its own "
                             f"expert groups and the file would hold the writer's alone; save with "
                             f"engine.save_checkpoint (every rank's groups) and `trilemma-moe reshard DIR --out FILE`")
        kwargs.setdefault("save_original_format", False)
        return original(*args, **kwargs)
    save_pretrained._trilemma_keys_as_named = True
    model.save_pretrained = save_pretrained


def load_converted(path: str, model_class=None, **knobs: Any) -> nn.Module:
    """A converted model saved by its ``save_pretrained`` (safetensors with every tensor of our
    layers: bases, factors, slot tables, regroup state; config.json with our knobs under
    ``"trilemma_moe"``; the Trainer's ``save_model`` writes the same): built from its config.json (``model_class``,
    default ``AutoModelForCausalLM``), converted (structure only, no decomposition) and loaded from
    its safetensors. ``knobs`` override our saved ones (a different ``ep_size`` is refused by the
    layers: reshard a DeepSpeed checkpoint instead)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_config = AutoConfig.from_pretrained(path)
    saved = getattr(hf_config, CONFIG_ATTR, None)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}/config.json has no {CONFIG_ATTR!r} entry: not a model converted by "
                         f"trilemma_moe.integrations.hf (load it with transformers' from_pretrained)")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (save the model with save_pretrained)")
    model = AutoModelForCausalLM.from_config(hf_config) if model_class is None else model_class(hf_config)
    convert_moe_blocks(model, seed_from_block=False, **{**saved, **knobs})
    state = {}
    for name in files:
        state.update(load_file(name))
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = dict(model.state_dict(keep_vars=True))
    # save_pretrained leaves out tied copies (lm_head = embeddings): anything else missing is an error
    untied = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in
              {p.data_ptr() for n, p in params.items() if n not in result.missing_keys}]
    if untied or result.unexpected_keys:
        raise ValueError(f"{path}: the checkpoint does not fit the converted model: missing {untied[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model
