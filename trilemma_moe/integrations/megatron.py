"""Our layer as the MoE of Megatron-core GPT models.

``gpt_layer_spec(config, trilemma)`` is a transformer-layer ``ModuleSpec`` for
``GPTModel(config, transformer_layer_spec=...)`` whose MLP is :class:`TrilemmaMegatronMoE`, a thin
shell over the same ``core.layer.ClusteredMoE`` the DeepSpeed layer wraps:

* MoE settings come from Megatron's ``TransformerConfig`` (``megatron_config.py`` maps them);
* process groups come from ``megatron.core.parallel_state``: the expert-model-parallel group
  splits the groups, the expert-data-parallel group holds replicas, the data-parallel group (with
  context parallel) is every rank training the layer. (``TransformerLayer`` hands a
  ``pg_collection`` only to Megatron's own MoE classes, so the shell reads parallel_state.)
* expert parameters carry ``allreduce = False``: Megatron's DDP reduces them over the
  expert-data-parallel group and its optimizer puts them in its expert parameter groups;
* the balance and z losses reach the backward through ``MoEAuxLossAutoScaler`` and Megatron's
  tracker through ``save_to_aux_losses_tracker`` (``load_balancing_loss``, ``z_loss``, per layer);
* ``sharded_state_dict`` for ``dist_checkpointing``: expert slot tensors sharded along the global
  slot axis over the expert-parallel ranks (replica id = expert-data-parallel rank), the rest
  replicated, so a checkpoint loads at another expert-parallel size;
* ``attach_megatron_optimizer`` (``megatron_optim.py``) lets regroups move fp32 masters and Adam
  moments through Megatron's optimizer.

Nothing here calls CUDA: Megatron's router, token dispatcher and metrics are not used.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from ..config import TrilemmaMoEConfig, _section
from ..core.layer import ClusteredMoE
from ..core.routing import aux_losses
from .deepspeed_engine import DataParallelSync
from .megatron_config import expert_shape, layer_index, trilemma_config
from .megatron_optim import MegatronParamIO, attach_megatron_optimizer

__all__ = [
    "TrilemmaMegatronMoE",
    "attach_megatron_optimizer",
    "gpt_layer_spec",
    "megatron_topology",
    "spec_for_megatron_lm",
]

EXPERT_PREFIX = "experts."   # ClusteredMoE state: slot-stacked expert tensors (sharded over ep ranks)


def megatron_topology():
    """Our ``ExpertParallelTopology`` over Megatron's groups: the expert-model-parallel group,
    the data-parallel group with context parallel (every rank training a layer) and the
    expert-data-parallel group (None when it is one rank)."""
    from ..parallel import ExpertParallelTopology
    _require_parallel_state()
    edp = parallel_state.get_expert_data_parallel_group()
    return ExpertParallelTopology(parallel_state.get_expert_model_parallel_group(),
                                  parallel_state.get_data_parallel_group(with_context_parallel=True),
                                  edp if torch.distributed.get_world_size(edp) > 1 else None)


def _require_parallel_state() -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("the trilemma_moe Megatron layer reads its process groups from megatron.core.parallel_state: "
                           "call parallel_state.initialize_model_parallel(...) (Megatron-LM's initialize_megatron "
                           "does) before building the model")


class TrilemmaMegatronMoE(MegatronModule):
    """The MLP of a Megatron ``TransformerLayer``: ``forward(hidden_states [s, b, h],
    padding_mask [b, s] (True = padding) = None) -> (output [s, b, h], None)``.

    ``trilemma``: our knobs beyond Megatron's config (a TrilemmaMoEConfig or dict). Megatron builds
    the MLP without its layer number and calls ``set_layer_number`` right after; the experts are
    seeded by (seed, layer, expert), so they are built then (or at once when ``layer_number`` is
    given)."""

    def __init__(self, config, submodules=None, layer_number: int | None = None,
                 trilemma: None | TrilemmaMoEConfig | Mapping[str, Any] = None, **unused: Any):
        super().__init__(config)
        self.trilemma_config = trilemma_config(config, trilemma)
        self.layer_number = None
        self.moe: ClusteredMoE | None = None
        if layer_number is not None:
            self.set_layer_number(layer_number)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number
        if self.moe is None:
            self._build(layer_index(layer_number))

    def _build(self, index: int) -> None:
        _require_parallel_state()
        cfg = self.trilemma_config
        hidden, ffn, activation, gated, bias = expert_shape(self.config)
        comm = None
        if cfg.ep_size > 1:
            from ..parallel import ExpertParallelComm
            comm = ExpertParallelComm(megatron_topology(), cfg, index,
                                      extra={"hidden_size": hidden, "ffn": ffn, "activation": activation,
                                             "gated": gated, "bias": bias})
        elif parallel_state.get_expert_model_parallel_world_size() != 1:
            raise ValueError(f"expert_model_parallel_size: parallel_state has "
                             f"{parallel_state.get_expert_model_parallel_world_size()} expert-parallel ranks but "
                             f"TransformerConfig.expert_model_parallel_size is 1")
        moe = ClusteredMoE(hidden, ffn, cfg, activation=activation, gated=gated, bias=bias, layer_index=index,
                           expert_parallel=comm)
        if self.config.params_dtype != torch.float32:
            moe.to(self.config.params_dtype)
        for p in moe.experts.parameters():
            p.allreduce = False     # Megatron's DDP: reduce over the expert-data-parallel group
        moe.set_param_io(MegatronParamIO())    # keeps burn-in storage; attach_megatron_optimizer adds the optimizer
        if comm is None:
            dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
            if torch.distributed.get_world_size(dp) > 1:
                moe.sync = DataParallelSync(dp)    # replicas agree before each regroup
        self.moe = moe

    # --- forward ----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None, **unused: Any):
        """``(output [s, b, h], None)``; padding tokens (``padding_mask`` True) get no expert output and
        stay out of the statistics. In training, the balance and z losses go to the backward and to
        Megatron's tracker."""
        if self.moe is None:
            raise RuntimeError("TrilemmaMegatronMoE was built without a layer number: call set_layer_number(n) "
                               "(Megatron's TransformerLayer does)")
        used = None if padding_mask is None else ~padding_mask.transpose(0, 1).bool()
        output, l_aux, _ = self.moe(hidden_states, used)
        if self.training and torch.is_grad_enabled():
            self._track_losses(hidden_states, used, l_aux)
            if self.config.calculate_per_token_loss:
                # Megatron then divides gradients by the number of tokens: scale the loss up (as its router does)
                l_aux = l_aux * (hidden_states.shape[0] * hidden_states.shape[1] if used is None else used.sum())
            output = MoEAuxLossAutoScaler.apply(output, l_aux)
        return output, None

    @torch.no_grad()
    def _track_losses(self, hidden_states: torch.Tensor, used: torch.Tensor | None, l_aux: torch.Tensor) -> None:
        """Unweighted balance and z losses into Megatron's tracker (as its router logs them: loss /
        coefficient). Ours is one weighted sum; with both coefficients set, the z part is
        recomputed from the routing (no gradient) to split it."""
        aux_c, z_c = self.moe.config.aux_loss_coef, self.moe.config.z_loss_coef
        total = l_aux.detach().float()
        parts = {}
        if aux_c > 0 and z_c > 0:
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            if used is not None:
                x = x[used.reshape(-1)]
            reduce = None if self.moe.ep is None else self.moe.ep.sum_with_grad
            z = aux_losses(self.moe.route(x), 0.0, 1.0, reduce=reduce).float()
            parts = {"load_balancing_loss": (total - z_c * z) / aux_c, "z_loss": z}
        elif aux_c > 0:
            parts = {"load_balancing_loss": total / aux_c}
        elif z_c > 0:
            parts = {"z_loss": total / z_c}
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        for name, value in parts.items():
            save_to_aux_losses_tracker(name, value, self.layer_number, num_layers,
                                       avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))

    # --- distributed checkpoints --------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: dict | None = None):
        """Expert slot tensors (``moe.experts.*``: burn-in experts, bases, factors, biases) are one
        global tensor each along the slot (or group) axis, this rank's block at
        ``ep_rank * local``; replicas over expert data parallelism share the block (replica id =
        expert-data-parallel rank). The router, slot table, centroids, counters and extra state
        are replicated over data parallelism. Loads at any expert-parallel size dividing G."""
        state = self.moe.state_dict(prefix="", keep_vars=True)
        experts = {k: v for k, v in state.items() if k.startswith(EXPERT_PREFIX)}
        rest = {k: v for k, v in state.items() if k not in experts}
        # replica id over tensor parallelism and data parallelism with context parallel (parallel_state's)
        out = make_sharded_tensors_for_checkpoint(rest, f"{prefix}moe.", sharded_offsets=sharded_offsets)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        replica = (0, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_data_parallel_rank())
        axis = len(sharded_offsets)
        for name, t in experts.items():
            key = f"{prefix}moe.{name}"
            out[key] = ShardedTensor.from_rank_offsets(key, t, *sharded_offsets, (axis, ep_rank, ep_size),
                                                       replica_id=replica, prepend_axis_num=axis)
        return out

    # --- delegation -------------------------------------------------------------------------
    def recluster(self, force: bool = False) -> bool:
        return self.moe.recluster(force=force)

    def group_assignment(self) -> torch.Tensor:
        return self.moe.group_assignment()

    def stats(self):
        return self.moe.stats()


def gpt_layer_spec(config, trilemma: None | TrilemmaMoEConfig | Mapping[str, Any] = None,
                   backend: str = "local") -> ModuleSpec:
    """A transformer-layer spec for ``GPTModel(config, transformer_layer_spec=...)``: Megatron's
    own GPT layer (``backend="local"``: Megatron-core modules only; ``"transformer_engine"``: TE
    attention and norms) with :class:`TrilemmaMegatronMoE` as its MLP. ``config`` is Megatron's
    ``TransformerConfig``; ``trilemma`` our other knobs. The mapping is checked here, so a
    conflict fails before any model is built."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    resolved = trilemma_config(config, trilemma)
    kwargs = {"num_experts": config.num_moe_experts, "qk_layernorm": config.qk_layernorm}
    if backend == "local":
        base = specs.get_gpt_layer_local_spec(normalization=config.normalization, **kwargs)
    elif backend == "transformer_engine":
        base = specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    else:
        raise ValueError(f"backend must be 'local' or 'transformer_engine', got {backend!r}")
    mlp = ModuleSpec(module=TrilemmaMegatronMoE, params={"trilemma": resolved.to_dict()})
    return dataclasses.replace(base, submodules=dataclasses.replace(base.submodules, mlp=mlp))


def spec_for_megatron_lm(args, config) -> ModuleSpec:
    """What ``--spec trilemma_moe.integrations.megatron_spec layer_spec`` builds inside Megatron-LM
    (``megatron_spec.py`` calls this with ``get_args()`` and the run's TransformerConfig): the
    backend from ``args.transformer_impl``; our knobs from the YAML file named by the environment
    variable ``TRILEMMA_MOE_CONFIG`` (a mapping of knobs, or one with a ``trilemma_moe`` section);
    ``gradient_accumulation_steps`` from Megatron's micro-batches per step, so the layers count
    steps right even before ``attach_megatron_optimizer``."""
    knobs = {}
    path = os.environ.get("TRILEMMA_MOE_CONFIG")
    if path:
        import yaml
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"TRILEMMA_MOE_CONFIG={path}: expected a mapping of trilemma_moe knobs")
        knobs = dict(_section(data, path) or data)
    global_batch, micro = getattr(args, "global_batch_size", None), getattr(args, "micro_batch_size", None)
    dp = getattr(args, "data_parallel_size", None)
    if global_batch and micro and dp and "gradient_accumulation_steps" not in knobs:
        knobs["gradient_accumulation_steps"] = max(1, global_batch // (micro * dp))
    impl = getattr(args, "transformer_impl", "local")
    return gpt_layer_spec(config, knobs, backend="transformer_engine" if impl == "transformer_engine" else "local")
