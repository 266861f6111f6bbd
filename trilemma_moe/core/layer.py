"""The clustered MoE layer, single process: route -> dispatch -> compute -> combine.

This module orchestrates; each mechanism of the paper has its own room:

* hierarchical routing (3.3): ``routing.py``; dispatch and the expert-parallel exchange:
  ``dispatch.py``;
* shared base + rank-r residual experts (3.2): ``experts.py`` and ``compression.py``;
* online clustering and the regroup (3.1, 3.5): ``clustering.py`` and ``regroup.py``;
* precision and idle-group offload (3.4): ``quant.py``, ``serving.py``, ``offload.py``,
  ``prefetch.py``;
* the training protocol (3.5: burn-in, regroup interval, router freeze; where optimizer steps
  end, skipped steps): ``schedule.py``. Regroups run at the first forward of an optimizer step.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..config import TrilemmaMoEConfig
from ..kernels import fused
from . import clustering, drift, regroup, serving, state_io
from .compression import compression_ratio, held_compression_ratio, held_numel
from .dispatch import DispatchPlan, ExpertParallelDispatcher, LocalDispatcher, owner_compute
from .experts import ExpertSlots, ExpertSpec
from .interfaces import ExpertParallelExchange, LocalSync, ParamIO, ReplicaSync
from .metrics import coefficient_of_variation
from .routing import HierarchicalRouter, Routing, aux_losses, slot_hits
from .schedule import StepSchedule
from .state_io import TorchParamIO

__all__ = ["ClusteredMoE", "LocalSync", "clustered_layers"]


class ClusteredMoE(nn.Module):
    """E experts in G groups of K = E/G; shared base + rank-r residuals per group.

    ``forward(x[..., d]) -> (y[..., d], l_aux, exp_counts[E])``; exp_counts counts
    (token, expert) assignments per expert id (all k choices, not just the first).

    ``expert_parallel``: None (one process holds every group) or an
    :class:`~.interfaces.ExpertParallelExchange` (``trilemma_moe.parallel.ExpertParallelComm``);
    then this rank holds groups ``[rank * G/size, (rank+1) * G/size)`` and the router, slot table
    and centroids stay replicated (full G and E).
    """

    _COUNTERS = StepSchedule.NAMES

    def __init__(self, hidden_size: int, ffn_hidden_size: int, config: Optional[TrilemmaMoEConfig] = None,
                 activation: str = "gelu", gated: bool = False, bias: bool = True, layer_index: int = 0,
                 spec: Optional[ExpertSpec] = None, expert_parallel: Optional[ExpertParallelExchange] = None):
        super().__init__()
        cfg = config or TrilemmaMoEConfig()
        if not isinstance(cfg, TrilemmaMoEConfig):
            raise ValueError(f"config must be a TrilemmaMoEConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.spec = spec or ExpertSpec(hidden_size, ffn_hidden_size, activation, gated, bias)
        for di, do in self.spec.matrices.values():
            cfg.check_dims(di, do)
        self.hidden_size = hidden_size
        E, G, K = cfg.num_experts, cfg.num_groups, cfg.experts_per_group
        self.num_experts, self.num_groups, self.experts_per_group = E, G, K
        self.layer_index = layer_index
        self.ep = expert_parallel
        ep_size = 1 if expert_parallel is None else expert_parallel.size
        if ep_size != cfg.ep_size:
            raise ValueError(f"ep_size: config.ep_size is {cfg.ep_size} but the expert-parallel group has "
                             f"{ep_size} rank(s)")
        G_local = G // ep_size
        offset = 0 if expert_parallel is None else expert_parallel.rank * G_local
        self.experts = ExpertSlots(self.spec, G_local, K, cfg.rank, cfg.seed, layer_index, offset, cfg.burn_in_form,
                                   cfg.gamma, cfg.svd)
        self.experts.residual_bits, self.experts.recompute = cfg.residual_bits, cfg.recompute_experts
        self.dispatcher = LocalDispatcher(G, E, cfg.capacity_factor, cfg.min_capacity)
        self.ep_dispatcher = None if expert_parallel is None else ExpertParallelDispatcher(expert_parallel, G_local, K)
        self.offload_tier = None    # where idle groups go (integrations set NVMe/aio); CPU memory if unset
        self._store = None          # serving.GroupStore, built at the first forward that reads it
        self._store_key = None
        self._serving = False       # release_masters(): inference from the stored form only
        gen = torch.Generator().manual_seed(cfg.seed * 31 + layer_index + 7)
        self.router = HierarchicalRouter(hidden_size, G, K, cfg.group_top_k, cfg.top_k, generator=gen)
        # Persistent state: the slot table and everything the clustering remembers.
        self.register_buffer("expert_of_slot", torch.arange(E))
        self.register_buffer("centroids", torch.zeros(E, hidden_size))
        self.register_buffer("centroid_seen", torch.zeros(E, dtype=torch.bool))
        self.register_buffer("counters", torch.zeros(len(StepSchedule.NAMES), dtype=torch.long))
        self.drift = drift.DriftTrigger.for_config(cfg)   # regroup_trigger="drift": what decides when checks run
        self.schedule = StepSchedule(self.counters, cfg.gradient_accumulation_steps, restore=self._restore_statistics,
                                     snapshot=lambda: (self.centroids.clone(), self.centroid_seen.clone(),
                                                       None if self.drift is None else self.drift.ema.clone()))
        # training tokens seen and those of them that were finite (the others are left out of the
        # centroids; stats()['nonfinite_tokens']); counted on the device, not checkpointed
        self.register_buffer("finite_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self._tokens_observed = 0
        self.sim_cache = clustering.ParamSimilarityCache(cfg.sim_cache_lifetime, cfg.sim_cache_eps, cfg.seed)
        self.io: ParamIO = TorchParamIO()
        self._step_hook = None
        # replicas agree before a regroup; under expert parallelism the communicator does it (rank 0 decides)
        self.sync: ReplicaSync = LocalSync() if expert_parallel is None else expert_parallel
        self._last_counts = torch.zeros(E)
        self.last_regroup: Dict[str, float] = {}    # gain, reconstruction error, moved experts (checkpointed)
        self.regroup_times: Dict[str, float] = {}
        self.regroup_seconds = 0.0   # wall time of every clustering and regroup check so far (not checkpointed)
        self.regroup_events: List[Dict[str, float]] = []   # regroups after the first that moved experts (not checkpointed)
        self.probe: Optional[torch.Tensor] = None   # recent training tokens (regroup_similarity="probe"; checkpointed)
        self.routing_log: Optional[list] = None   # a list: training forwards append (group_idx, expert ids) (profile-comm)
        # Fused expert path (sort-based dispatch, grouped GEMMs, Triton kernels): None picks it for CUDA
        # tensors when Triton is available; True/False force it (True on the CPU: the kernels' torch twins).
        self.fused: Optional[bool] = None
        # One process: routing and its balance/z losses as one autograd node with an analytic
        # backward (routing.FusedRouterLoss); False forces the composite path (router forward
        # + aux_losses under autograd), which expert parallelism always takes.
        self.fused_router: bool = True
        self._router_frozen = False     # whether the last training forward ran with a frozen router
        # set while an engine loads a checkpoint with its optimizer state (attach_engine): a
        # checkpoint of another ep_size is then refused (its optimizer partitions do not fit)
        self.refuse_ep_size_change = False

    # --- the training schedule -----------------------------------------------------------------
    def _c(self, name: str) -> int:
        return self.schedule[name]

    @property
    def step(self) -> int:
        """Optimizer steps applied (see ``schedule.py`` for where they come from)."""
        return self.schedule.step

    @property
    def skipped_steps_source(self) -> Optional[Callable[[], int]]:
        """A callable returning the engine's running count of skipped steps (``engine.skipped_steps``),
        for a layer nobody tells of optimizer steps; such a step is not counted here either."""
        return self.schedule.skipped_steps_source

    @skipped_steps_source.setter
    def skipped_steps_source(self, source: Optional[Callable[[], int]]) -> None:
        self.schedule.skipped_steps_source = source

    def on_optimizer_step(self, applied: bool = True) -> None:
        """An optimizer step just ended (``applied=False``: the engine skipped it). Called by the
        hook :meth:`attach_optimizer` registers and by ``attach_engine``'s ``engine.step``."""
        self.schedule.optimizer_step(applied)

    def attach_optimizer(self, optimizer: Optional[torch.optim.Optimizer], io: Optional[ParamIO] = None) -> None:
        """Let regroups rewrite this optimizer's state (``state_io``; ``io``: a ParamIO of an integration
        that wraps it), and take this optimizer's steps as the layer's step boundaries (a torch step hook)."""
        self.io = io if io is not None else TorchParamIO(optimizer)
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if optimizer is not None:
            self._step_hook = optimizer.register_step_post_hook(lambda *_: self.on_optimizer_step(True))
            self.follow_optimizer_steps()

    def follow_optimizer_steps(self) -> None:
        """Steps end where :meth:`on_optimizer_step` says, from now on (no counting of forwards)."""
        self.schedule.expect_told()

    def set_param_io(self, io: ParamIO) -> None:
        self.io = io

    def _restore_statistics(self, saved) -> None:
        self.centroids.copy_(saved[0])
        self.centroid_seen.copy_(saved[1])
        if saved[2] is not None:
            self.drift.ema.copy_(saved[2])

    def idle_parameters(self) -> List[nn.Parameter]:
        """Parameters that get no gradient in the current phase, on every rank whatever its data:
        the expert form not in use (the compressed form during burn-in, the burn-in weights after
        the first clustering) and the router while it is frozen after a regroup. Gradient
        reducers skip exactly these; every other trainable parameter has a gradient."""
        idle = self.experts.matrices(not self.compressed)
        if self._router_frozen:
            return idle + list(self.router.parameters())
        return idle + ([self.router.group_proto] if self.flat_routing else [])

    @property
    def clustered(self) -> bool:
        """The first clustering has run (experts sit in groups by similarity, or at random)."""
        return bool(self.schedule["compressed"])

    @property
    def compressed(self) -> bool:
        """Experts are computed from bases + factors, once clustered (unless ``low_rank=False``) or from the start."""
        return self.config.low_rank and (self.clustered or not self.experts.full_storage)

    @property
    def flat_routing(self) -> bool:
        return self.config.routing == "flat"

    @torch.no_grad()
    def recluster(self, force: bool = False, probe: Optional[torch.Tensor] = None) -> bool:
        """Cluster now (first call: compress the full experts; ``regroup.py``); True if a regroup was
        applied. ``force``: even below delta; ``probe``: tokens [n, d] (default: recent training ones)."""
        return regroup.recluster(self, force, probe)

    # --- public state --------------------------------------------------------------------
    def slot_of_expert(self) -> torch.Tensor:
        inv = torch.empty_like(self.expert_of_slot)
        inv[self.expert_of_slot] = torch.arange(self.num_experts, device=inv.device)
        return inv

    def group_assignment(self) -> torch.Tensor:
        """LongTensor[E]: the group of each expert id."""
        return (self.slot_of_expert() // self.experts_per_group).cpu()

    def expert_parameter_count(self) -> int:
        """Parameters of the expert weights in use (compressed form after the first clustering)."""
        return sum(held_numel(p) for p in self.experts.expert_parameters(self.compressed))

    def stats(self) -> Dict[str, float]:
        """``reclusters`` counts the first clustering and the regroups applied after it;
        ``skipped_reclusters`` the regroup checks skipped (gain below delta)."""
        counts = self._last_counts.float().cpu()
        group_counts = counts[self.expert_of_slot.cpu()].view(self.num_groups, -1).sum(1)
        s = {
            "load_cv": coefficient_of_variation(counts),
            "group_load_cv": coefficient_of_variation(group_counts),
            "reclusters": self._c("reclusters"),
            "skipped_reclusters": self._c("skipped"),
            "compressed": self.compressed,
            "clustered": self.clustered,
            "step": self.step,
            "temperature": self.config.temperature(self.step),
            "compression_ratio": self.measured_compression_ratio(),
            "nonfinite_tokens": self._tokens_observed - int(self.finite_tokens),
            "regroup_seconds": self.regroup_seconds,
            **({} if self.drift is None else {"load_drift": self.drift.distance}),
        }
        s.update(self.last_regroup)
        s["experts_moved"] = int(s.get("experts_moved", 0))
        s.update(self.regroup_times)
        return s

    def comm_stats(self) -> Dict[str, float]:
        """Expert-parallel byte counters of this rank (see ``trilemma_moe.parallel.comm``); {} at ep_size 1."""
        return {} if self.ep is None else self.ep.comm_stats()

    def measured_compression_ratio(self) -> float:
        """Full expert weights over the compressed ones held (bases + factors, biases excluded as
        in Eq. 8); 1.0 before the first clustering."""
        return held_compression_ratio(self.experts) if self.compressed else 1.0

    def formula_compression_ratio(self) -> float:
        """Eq. 8 for the first matrix (the paper's single-matrix figure)."""
        di, do = self.spec.matrices["w1"]
        return compression_ratio(self.experts_per_group, di, do, self.config.rank)

    # --- precision and memory (3.4, serving.py) ---------------------------------------------
    def release_masters(self) -> None:
        """Inference only: compute from the stored form from now on (INT4-packed residuals at
        ``residual_bits=4``; idle groups offloaded when ``offload_idle_steps`` is set) and free the
        expert parameters' storage. Training or checkpointing the layer afterwards raises."""
        serving.release_masters(self)

    def offload_stats(self) -> Dict[str, float]:
        """Hits, misses, bytes written/read, stall time, resident/offloaded bytes of the offload store."""
        return serving.offload_stats(self._store)

    def memory_report(self) -> Dict[str, int]:
        """Bytes per component held now and as stored (:func:`~.serving.memory_report` lists them)."""
        return serving.memory_report(self)

    # --- forward: route -> dispatch -> compute -> combine ---------------------------------------
    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has last dimension {hidden_states.shape[-1]}, "
                             f"but the layer's hidden_size is {self.hidden_size}")
        # the experts' matmuls need the activations in their dtype (the router upcasts by itself,
        # so a float32 router beside bf16 experts is fine)
        dtype = self.experts.fa["w1"].dtype
        if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise TypeError(f"hidden_states is {hidden_states.dtype} but layer {self.layer_index}'s expert parameters "
                            f"are {dtype}: cast the model to the activations' dtype (model.to({hidden_states.dtype}), "
                            f"or DeepSpeed's fp16/bf16 config) or run the forward under torch.autocast")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        keep = None
        if used_token is not None:
            if used_token.numel() != x.shape[0]:
                raise ValueError(f"used_token has {used_token.numel()} entries for {x.shape[0]} tokens")
            keep = used_token.reshape(-1).nonzero().squeeze(-1)
            x = x.index_select(0, keep)
        learning = self.training and torch.is_grad_enabled()
        if learning and self._serving:
            raise RuntimeError("this layer released its master weights (release_masters): inference only")
        if learning:
            self.schedule.sync_skipped_steps()
            drift.maybe_recluster(self)
            self.schedule.forward_starts()
        # An empty batch (or an all-False used_token) takes the same path with zero rows: the
        # autograd graph, hence which parameters get a gradient and in which order, depends on the
        # phase only, never on the data (data-parallel reducers such as ZeRO-2's buckets rely on it).
        fused_router = self.ep is None and self.fused_router and not self.flat_routing
        if fused_router:
            routing, l_aux, hits, slot_counts = self.route_with_losses(x)
        else:
            routing = self.route(x)
        if self.routing_log is not None and self.training:
            self.routing_log.append((routing.group_idx.detach().cpu(),
                                     self.expert_of_slot[routing.slot_idx].detach().cpu()))
        use_fused = self._use_fused(x, learning)
        if self.ep is not None:
            y = self.ep_dispatcher.run(x, self.dispatcher.plan(routing), self.expert_of_slot,
                                       owner_compute(self.experts, self.compressed, use_fused))
        elif use_fused:
            # serving: the stored form (INT4 factors decoded per forward), all groups resident
            slots = self._store.stacked_slots(fused.ops_for(x.device).dequant_int4) if self._serving else self.experts
            y = fused.fused_expert_forward(slots, x, routing.group_idx, routing.slot_idx, routing.weights)
        else:
            plan = self.dispatcher.plan(routing)
            views = serving.store_views(self, plan.pair_group_counts, routing.group_probs) if not learning else None

            def compute(x_pairs: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
                return self.experts(x_pairs, p.pair_group_counts, p.row_pair, p.row_weight, p.slot_counts,
                                    self.compressed, views)
            y = self.dispatcher.run(x, plan, compute)
        if not fused_router:
            with torch.no_grad():
                hits = slot_hits(routing.slot_idx, self.num_experts)
                slot_counts = hits.sum(0)
            l_aux = aux_losses(routing, self.config.aux_loss_coef, self.config.z_loss_coef,
                               reduce=None if self.ep is None else self.ep.sum_with_grad,
                               slot_counts=slot_counts)
        l_aux = l_aux.to(y.dtype)
        exp_counts = regroup.observe(self, x, hits, slot_counts, learning)
        if keep is not None:
            y = hidden_states.new_zeros(shape[:-1].numel(), self.hidden_size).index_copy(0, keep, y)
        return y.reshape(shape), l_aux, exp_counts

    def _use_fused(self, x: torch.Tensor, learning: bool = True) -> bool:
        if not self.compressed or self.flat_routing:
            return False
        if not learning and self.config.offload_idle_steps is not None:
            return False  # groups come and go: inference reads the offload store's per-group views
        if self.config.capacity_factor is not None and self.ep is None:
            return False  # the fused path is dropless; one process drops in dispatch (ep: before the exchange)
        if self.fused is None:
            return x.is_cuda and fused.triton_available()
        return self.fused

    def _router_state(self) -> Dict[str, object]:
        """This step's temperature and whether the router is frozen (paper 3.5 (i))."""
        frozen = self.training and self.schedule.router_frozen()
        if self.training and torch.is_grad_enabled():
            self._router_frozen = frozen
        return dict(temperature=self.config.temperature(self.step), frozen=frozen)

    def route(self, x: torch.Tensor) -> Routing:
        return self.router(x, flat=self.flat_routing, **self._router_state())

    def route_with_losses(self, x: torch.Tensor):
        """One process: ``route(x)`` and ``aux_losses`` of it in one autograd node. Returns
        (routing, l_aux, hits, slot_counts) (``slot_hits`` and its column sums)."""
        return self.router.route_with_losses(x, self.config.aux_loss_coef, self.config.z_loss_coef,
                                             **self._router_state())

    # --- checkpoint state ------------------------------------------------------------------
    def get_extra_state(self):
        """The S_param cache, last regroup report and probe batch (a run resumed before a regroup
        check decides on the same tokens) travel with ``state_dict``, as tensors and numbers only."""
        probe = self.probe.detach().clone() if self.probe is not None else torch.zeros(0, self.hidden_size)
        return {"sim_cache": self.sim_cache.state_dict(), "ep_size": self.config.ep_size,
                "last_regroup": {k: float(v) for k, v in self.last_regroup.items()}, "probe": probe,
                **({} if self.drift is None else {"drift": self.drift.state_dict()})}

    def set_extra_state(self, state) -> None:
        saved = state.get("ep_size")
        if self.refuse_ep_size_change and saved is not None and int(saved) != self.config.ep_size:
            raise RuntimeError(
                f"layer {self.layer_index}: this checkpoint was saved at ep_size {int(saved)}, the model runs "
                f"ep_size {self.config.ep_size}; its optimizer state (partitioned per expert-parallel rank) does not "
                f"fit. Load the weights only, engine.load_checkpoint(dir, load_module_only=True) (optimizer state "
                f"starts fresh), or convert it with `trilemma-moe reshard DIR --out FILE` and load that file")
        self.sim_cache.load_state_dict(state["sim_cache"])
        self.last_regroup = dict(state.get("last_regroup", {}))
        probe = state.get("probe")   # absent in checkpoints older than the probe rule
        self.probe = probe.to(self.centroids.device) if probe is not None and probe.numel() else None
        if self.drift is not None and "drift" in state:   # (a checkpoint of a period run starts it afresh)
            self.drift.load_state_dict(state["drift"])
        self.schedule.reloaded()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_io.adopt_checkpoint_phase(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.schedule.reloaded()
        self._store_key = None  # new weights: the stored form is rebuilt at the next inference forward

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.schedule.sync_skipped_steps()   # a checkpoint after a skipped step holds the counters without it
        if self._serving:
            raise RuntimeError(f"{prefix or 'layer'}: released its master weights (release_masters) and serves "
                               f"from the stored form; checkpoints come from the training process")
        super()._save_to_state_dict(destination, prefix, keep_vars)


def clustered_layers(model: nn.Module) -> List[ClusteredMoE]:
    """Every clustered layer of ``model`` in module order (the one way to find them)."""
    return [m for m in model.modules() if isinstance(m, ClusteredMoE)]
