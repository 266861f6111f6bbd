"""The clustered MoE layer, single process: route -> dispatch -> compute -> combine.

Training protocol (paper 3.5): full experts for ``burn_in`` optimizer steps, then the first
clustering and decomposition; from then on a regroup every ``recluster_interval`` steps
(skipped when the intra-group similarity gain is below ``delta``). Regroups run at the start of
the first forward of an optimizer step, so gradient accumulation never straddles one.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..config import TrilemmaMoEConfig
from . import clustering
from .compression import compression_ratio, decompose_groups
from .experts import ExpertSlots, ExpertSpec
from . import quant
from ..kernels import fused
from .metrics import coefficient_of_variation
from .offload import CPUTier, GroupStore
from .routing import HierarchicalRouter, Routing, aux_losses, slot_hits
from .state_io import TorchParamIO


class LocalSync:
    """One process: nothing to agree on. The distributed shells substitute an object with the
    same two methods over their data-parallel group (core never imports torch.distributed)."""

    def average_(self, tensor: torch.Tensor) -> None:
        pass

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class ClusteredMoE(nn.Module):
    """E experts in G groups of K = E/G; shared base + rank-r residuals per group.

    ``forward(x[..., d]) -> (y[..., d], l_aux, exp_counts[E])``; exp_counts counts
    (token, expert) assignments per expert id (all k choices, not just the first).

    ``expert_parallel``: None (one process holds every group) or a communicator from
    ``trilemma_moe.parallel`` (``size``, ``rank``, token all-to-all, reductions, row fetches);
    then this rank holds groups ``[rank * G/size, (rank+1) * G/size)`` and the router, slot table
    and centroids stay replicated (full G and E).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, config: Optional[TrilemmaMoEConfig] = None,
                 activation: str = "gelu", gated: bool = False, bias: bool = True, layer_index: int = 0,
                 spec: Optional[ExpertSpec] = None, expert_parallel=None):
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
        self.experts = ExpertSlots(self.spec, G_local, K, cfg.rank, cfg.seed, layer_index, group_offset=offset)
        self.experts.residual_bits = cfg.residual_bits
        self.offload_tier = None    # where idle groups go (integrations set NVMe/aio); CPU memory if unset
        self._store: Optional[GroupStore] = None
        self._store_key = None
        self._serving = False       # release_masters(): inference from the stored form only
        gen = torch.Generator().manual_seed(cfg.seed * 31 + layer_index + 7)
        self.router = HierarchicalRouter(hidden_size, G, K, cfg.group_top_k, cfg.top_k, generator=gen)
        # Persistent state: the slot table and everything the clustering remembers.
        self.register_buffer("expert_of_slot", torch.arange(E))
        self.register_buffer("centroids", torch.zeros(E, hidden_size))
        self.register_buffer("centroid_seen", torch.zeros(E, dtype=torch.bool))
        self.register_buffer("counters", torch.zeros(6, dtype=torch.long))  # see _COUNTERS
        # training tokens seen and those of them that were finite (the others are left out of the
        # centroids; stats()['nonfinite_tokens']); counted on the device, not checkpointed
        self.register_buffer("finite_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self._tokens_observed = 0
        self.sim_cache = clustering.ParamSimilarityCache(cfg.sim_cache_lifetime, cfg.sim_cache_eps, cfg.seed)
        self.io = TorchParamIO()
        # expert parallelism: the communicator also carries the regroup agreement (rank 0 decides)
        self.sync = LocalSync() if expert_parallel is None else expert_parallel
        self._last_counts = torch.zeros(E)
        self._last_regroup: Dict[str, float] = {}
        self._regroup_times: Dict[str, float] = {}
        self.routing_log: Optional[list] = None   # a list: training forwards append (group_idx, expert ids) (profile-comm)
        self._host_counters: Optional[list] = None  # mirror of `counters`: reading a GPU buffer syncs
        # Fused expert path (sort-based dispatch, grouped GEMMs, Triton kernels): None picks it for
        # CUDA tensors when Triton is available; True/False force it (True on the CPU runs the same
        # code on the kernels' torch twins).
        self.fused: Optional[bool] = None
        # One process: routing and its balance/z losses as one autograd node with an analytic
        # backward (routing.FusedRouterLoss); False forces the composite path (router forward
        # + aux_losses under autograd), which expert parallelism always takes.
        self.fused_router: bool = True
        # Optimizer steps the training engine skipped (fp16 loss-scale overflow): a callable that
        # returns its running count (DeepSpeed: ``engine.skipped_steps``; ``attach_engine`` sets
        # it). A skipped step does not count here either: see :meth:`_sync_skipped_steps`.
        self.skipped_steps_source: Optional[Callable[[], int]] = None
        self._skips_seen: Optional[int] = None
        self._step_start = None         # (micro_step, centroids, centroid_seen) when this step began
        self._router_frozen = False     # whether the last training forward ran with a frozen router
        # set while an engine loads a checkpoint with its optimizer state (attach_engine): a
        # checkpoint of another ep_size is then refused (its optimizer partitions do not fit)
        self.refuse_ep_size_change = False

    _COUNTERS = ("micro_step", "compressed", "reclusters", "skipped", "last_recluster_step", "frozen_until")

    def _c(self, name: str) -> int:
        if self._host_counters is None:
            self._host_counters = self.counters.tolist()
        return self._host_counters[self._COUNTERS.index(name)]

    def _set_c(self, name: str, value: int) -> None:
        self._c(name)
        self._host_counters[self._COUNTERS.index(name)] = value
        self.counters[self._COUNTERS.index(name)] = value

    # --- public state --------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken (training forwards / gradient_accumulation_steps), not counting
        steps the engine skipped (``skipped_steps_source``)."""
        self._sync_skipped_steps()
        return self._c("micro_step") // self.config.gradient_accumulation_steps

    def _sync_skipped_steps(self) -> None:
        """Uncount optimizer steps the engine skipped since the last look.

        The engine applied nothing in such a step (DeepSpeed's fp16 loss scaler on an overflow;
        every rank agrees, the overflow flag is reduced), so the layer's schedule (burn-in, regroup
        interval, temperature, router freeze) must not advance either, and the step's activation
        statistics are undone: they came from a forward whose values overflowed. A regroup that ran
        at the start of the skipped step stays applied (it changed weights outside the optimizer),
        and is not repeated: its step is the one that runs again."""
        if self.skipped_steps_source is None:
            return
        skipped = int(self.skipped_steps_source())
        if self._skips_seen is None or skipped < self._skips_seen:
            self._skips_seen = skipped   # first look, or the engine's count came from a checkpoint
            return
        new = skipped - self._skips_seen
        if new == 0:
            return
        self._skips_seen = skipped
        gas = self.config.gradient_accumulation_steps
        start = self._step_start
        if start is not None and new == 1 and self._c("micro_step") == start[0] + gas:
            self.centroids.copy_(start[1])
            self.centroid_seen.copy_(start[2])
        self._set_c("micro_step", max(0, self._c("micro_step") - new * gas))
        self._step_start = None

    def idle_parameters(self) -> List[nn.Parameter]:
        """Parameters that get no gradient in the current phase, on every rank whatever its data:
        the expert form not in use (the compressed form during burn-in, the burn-in weights after
        the first clustering) and the router while it is frozen after a regroup. Gradient
        reducers skip exactly these; every other trainable parameter has a gradient."""
        idle = self.experts.matrices(not self.compressed)
        return idle + (list(self.router.parameters()) if self._router_frozen else [])

    @property
    def compressed(self) -> bool:
        return bool(self._c("compressed"))

    def slot_of_expert(self) -> torch.Tensor:
        inv = torch.empty_like(self.expert_of_slot)
        inv[self.expert_of_slot] = torch.arange(self.num_experts, device=inv.device)
        return inv

    def group_assignment(self) -> torch.Tensor:
        """LongTensor[E]: the group of each expert id."""
        return (self.slot_of_expert() // self.experts_per_group).cpu()

    def attach_optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Let regroups rewrite this optimizer's state (see ``state_io``)."""
        self.io = TorchParamIO(optimizer)

    def set_param_io(self, io) -> None:
        self.io = io

    def expert_parameter_count(self) -> int:
        """Parameters of the expert weights in use (compressed form after the first clustering)."""
        return sum(p.numel() for p in self.experts.expert_parameters(self.compressed))

    def stats(self) -> Dict[str, float]:
        counts = self._last_counts.float().cpu()
        group_counts = counts[self.expert_of_slot.cpu()].view(self.num_groups, -1).sum(1)
        s = {
            "load_cv": coefficient_of_variation(counts),
            "group_load_cv": coefficient_of_variation(group_counts),
            "reclusters": self._c("reclusters"),
            "skipped_reclusters": self._c("skipped"),
            "compressed": self.compressed,
            "step": self.step,
            "temperature": self.config.temperature(self.step),
            "compression_ratio": self.measured_compression_ratio(),
            "nonfinite_tokens": self._tokens_observed - int(self.finite_tokens),
        }
        s.update(self._last_regroup)
        s.update(self._regroup_times)
        return s

    def comm_stats(self) -> Dict[str, float]:
        """Expert-parallel byte counters of this rank (see ``trilemma_moe.parallel.comm``); {} at ep_size 1."""
        return {} if self.ep is None else self.ep.comm_stats()

    def measured_compression_ratio(self) -> float:
        """Full expert weights (E * matrices) over the compressed ones in use (bases + factors).

        Counts the tensors actually held, biases excluded as in Eq. 8; 1.0 before the first clustering.
        """
        if not self.compressed:
            return 1.0
        ex = self.experts
        full = sum(ex.num_experts * di * do for di, do in self.spec.matrices.values())  # slots held here
        comp = sum(ex.base[n].numel() + ex.fa[n].numel() + ex.fb[n].numel() for n in self.spec.matrices)
        return full / comp

    def formula_compression_ratio(self) -> float:
        """Eq. 8 for the first matrix (the paper's single-matrix figure)."""
        di, do = self.spec.matrices["w1"]
        return compression_ratio(self.experts_per_group, di, do, self.config.rank)

    # --- checkpoint state ------------------------------------------------------------------
    def get_extra_state(self):
        """The S_param cache and last regroup report travel with ``state_dict`` (tensors and
        numbers only, so ``torch.load(weights_only=True)`` reads them)."""
        return {"sim_cache": self.sim_cache.state_dict(), "ep_size": self.config.ep_size,
                "last_regroup": {k: float(v) for k, v in self._last_regroup.items()}}

    def set_extra_state(self, state) -> None:
        saved = state.get("ep_size")
        if self.refuse_ep_size_change and saved is not None and int(saved) != self.config.ep_size:
            raise RuntimeError(
                f"layer {self.layer_index}: this checkpoint was saved at ep_size {int(saved)}, the model runs "
                f"ep_size {self.config.ep_size}; its optimizer state (partitioned per expert-parallel rank) does not "
                f"fit. Load the weights only, engine.load_checkpoint(dir, load_module_only=True) (optimizer state "
                f"starts fresh), or convert it with `trilemma-moe reshard DIR --out FILE` and load that file")
        self.sim_cache.load_state_dict(state["sim_cache"])
        self._last_regroup = dict(state.get("last_regroup", {}))
        self._host_counters = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        counters = state_dict.get(prefix + "counters")
        if counters is not None:
            incoming = bool(int(counters[self._COUNTERS.index("compressed")]))
            if incoming and not self.compressed:
                # A compressed checkpoint no longer holds the burn-in experts: release ours too.
                for p in self.experts.full.values():
                    self.io.release(p)
            elif not incoming and self.compressed:
                raise RuntimeError(f"{prefix or 'layer'}: cannot load a burn-in (uncompressed) checkpoint into a "
                                   f"layer that has already been compressed; load it into a fresh layer")
            if incoming:
                # A checkpoint written under ZeRO still carries the burn-in experts (DeepSpeed keeps their
                # storage); a layer that released them takes them as released. (state_dict is
                # load_state_dict's own copy.)
                for name, p in self.experts.full.items():
                    key = f"{prefix}experts.full.{name}"
                    t = state_dict.get(key)
                    if p.numel() == 0 and torch.is_tensor(t) and t.numel() > 0:
                        state_dict[key] = t.new_empty(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_counters = None
        self._skips_seen, self._step_start = None, None   # the engine's skip count is reloaded too
        self._store_key = None  # new weights: the stored form is rebuilt at the next inference forward

    # --- precision and memory (3.4) ------------------------------------------------------------
    def _store_views(self, group_counts, group_probs=None):
        """Inference forwards with ``offload_idle_steps`` set (or after :meth:`release_masters`)
        read the stored form through the offload store."""
        if not self._serving:
            if self.config.offload_idle_steps is None or not self.compressed:
                return None
            self._ensure_store()
        return self._store.step(group_counts, group_probs)

    def _ensure_store(self) -> None:
        """The store, rebuilt from the masters whenever they changed since it was built."""
        key = (self._c("micro_step"), self._c("reclusters"),
               sum(p._version for p in self.experts.expert_parameters(True)))
        if self._store is None:
            tier = self.offload_tier if self.offload_tier is not None else CPUTier()
            cfg = self.config
            self._store = GroupStore(self.experts, cfg.residual_bits, tier, self.layer_index,
                                     cfg.offload_idle_steps, cfg.prefetch_lookahead, cfg.prefetch_ema_rate,
                                     cfg.prefetch_router_evidence, cfg.prefetch_threshold)
        elif key != self._store_key:
            self._store.build()
        self._store_key = key

    @torch.no_grad()
    def release_masters(self) -> None:
        """Inference only: compute from the stored form from now on (INT4-packed residuals at
        ``residual_bits=4``; idle groups offloaded when ``offload_idle_steps`` is set) and free the
        expert parameters' storage. Training or checkpointing the layer afterwards raises."""
        if not self.compressed:
            raise RuntimeError("release_masters: the layer is not compressed yet (it still trains full experts)")
        if self.ep is not None:
            raise NotImplementedError("release_masters: serving from the stored form runs in one process "
                                      "(ep_size=1); consolidate the checkpoint with `trilemma-moe reshard` first")
        self._ensure_store()
        self._serving = True
        for p in self.experts.parameters():
            p.requires_grad_(False)
            p.grad = None
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_skipped_steps()   # a checkpoint after a skipped step holds the counters without it
        if self._serving:
            raise RuntimeError(f"{prefix or 'layer'}: released its master weights (release_masters) and serves "
                               f"from the stored form; checkpoints come from the training process")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def offload_stats(self) -> Dict[str, float]:
        """Hits, misses, bytes written/read, stall time, resident/offloaded bytes of the offload store."""
        if self._store is None:
            return {"accesses": 0, "hits": 0, "misses": 0, "bytes_written": 0, "bytes_read": 0, "stall_s": 0.0,
                    "steps": 0, "hit_rate": float("nan"), "resident_bytes": 0, "offloaded_bytes": 0}
        return self._store.summary()

    @torch.no_grad()
    def memory_report(self) -> Dict[str, int]:
        """Bytes per component, from the tensors held (and, for the stored residuals, from the
        packed tensors built now from the current masters).

        ``bases``, ``residual_masters`` (the optimizer's factors), ``biases``, ``router``,
        ``burn_in_full`` (full experts' storage still held): held now. ``residual_stored``: the
        residuals as stored (offload files, inference store): INT4 ``residual_packed`` +
        ``residual_scales`` (scales and zero points) at ``residual_bits=4``, else the factors as
        held. ``stored_experts`` = bases + residual_stored + biases. ``store_resident`` /
        ``store_offloaded``: the offload store's groups in memory / on the offload tier.
        """
        def nb(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        ex = self.experts
        factors = list(ex.fa.values()) + list(ex.fb.values())
        r = {"bases": nb(ex.base.values()), "residual_masters": nb(factors), "biases": nb(ex.bias.values()),
             "router": nb(self.router.parameters()), "burn_in_full": nb(ex.full.values())}
        if self._serving:   # masters freed: the stored form is what the store holds (resident + offloaded)
            r.update(self._store.resident_breakdown())
            r["stored_experts"] = r["bases"] + r["residual_stored"] + r["biases"] + self._store.offloaded_bytes()
        elif self.config.residual_bits == 4:
            qs = [quant.quantize(p) for p in factors]
            r["residual_packed"] = nb(q["packed"] for q in qs)
            r["residual_scales"] = nb(t for q in qs for t in (q["scale"], q["zero"]))
            r["residual_stored"] = r["residual_packed"] + r["residual_scales"]
        else:
            r["residual_stored"] = r["residual_masters"]
        if not self._serving:
            r["stored_experts"] = r["bases"] + r["residual_stored"] + r["biases"]
        st = self.offload_stats()
        r["store_resident"], r["store_offloaded"] = int(st["resident_bytes"]), int(st["offloaded_bytes"])
        return r

    # --- forward -------------------------------------------------------------------------
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
            self._sync_skipped_steps()
            self._maybe_recluster()
            if self.skipped_steps_source is not None and self._c("micro_step") % self.config.gradient_accumulation_steps == 0:
                # what a skipped step would have to undo
                self._step_start = (self._c("micro_step"), self.centroids.clone(), self.centroid_seen.clone())
        # An empty batch (or an all-False used_token) takes the same path with zero rows: the
        # autograd graph, hence which parameters get a gradient and in which order, depends on the
        # phase only, never on the data (data-parallel reducers such as ZeRO-2's buckets rely on it).
        fused_router = self.ep is None and self.fused_router
        if fused_router:
            routing, l_aux, hits, slot_counts = self.route_with_losses(x)
        else:
            routing = self.route(x)
        if self.routing_log is not None and self.training:
            self.routing_log.append((routing.group_idx.detach().cpu(),
                                     self.expert_of_slot[routing.slot_idx].detach().cpu()))
        if self.ep is not None:
            y = self._expert_parallel_compute(x, routing, self.dispatch(routing), self._use_fused(x, learning))
        elif self._use_fused(x, learning):
            # serving: the stored form (INT4 factors decoded per forward), all groups resident
            slots = self._store.stacked_slots(fused.ops_for(x.device).dequant_int4) if self._serving else self.experts
            y = fused.fused_expert_forward(slots, x, routing.group_idx, routing.slot_idx, routing.weights)
        else:
            plan = self.dispatch(routing)
            views = self._store_views(plan["pair_group_counts"], routing.group_probs) if not learning else None
            y_pairs = self.experts(x.index_select(0, plan["pair_token"]), plan["pair_group_counts"],
                                   plan["row_pair"], plan["row_weight"], plan["slot_counts"], self.compressed, views)
            y = self.combine(y_pairs, plan, x.shape[0])
        if not fused_router:
            with torch.no_grad():
                hits = slot_hits(routing.slot_idx, self.num_experts)
                slot_counts = hits.sum(0)
            l_aux = aux_losses(routing, self.config.aux_loss_coef, self.config.z_loss_coef,
                               reduce=None if self.ep is None else self.ep.sum_with_grad,
                               slot_counts=slot_counts)
        l_aux = l_aux.to(y.dtype)
        exp_counts = self._observe(x, hits, slot_counts, learning)
        if keep is not None:
            y = hidden_states.new_zeros(shape[:-1].numel(), self.hidden_size).index_copy(0, keep, y)
        return y.reshape(shape), l_aux, exp_counts

    def _use_fused(self, x: torch.Tensor, learning: bool = True) -> bool:
        if not self.compressed:
            return False
        if not learning and self.config.offload_idle_steps is not None:
            return False  # groups come and go: inference reads the offload store's per-group views
        if self.config.capacity_factor is not None and self.ep is None:
            return False  # the fused path is dropless; one process drops in dispatch() (ep: before the exchange)
        if self.fused is None:
            return x.is_cuda and fused.triton_available()
        return self.fused

    def _router_state(self) -> Dict[str, object]:
        """This step's temperature and whether the router is frozen (paper 3.5 (i))."""
        frozen = self.training and self.step < self._c("frozen_until")
        if self.training and torch.is_grad_enabled():
            self._router_frozen = frozen
        return dict(temperature=self.config.temperature(self.step), frozen=frozen)

    def route(self, x: torch.Tensor) -> Routing:
        return self.router(x, **self._router_state())

    def route_with_losses(self, x: torch.Tensor):
        """One process: ``route(x)`` and ``aux_losses`` of it in one autograd node. Returns
        (routing, l_aux, hits, slot_counts) (``slot_hits`` and its column sums)."""
        return self.router.route_with_losses(x, self.config.aux_loss_coef, self.config.z_loss_coef,
                                             **self._router_state())

    def dispatch(self, r: Routing) -> Dict[str, object]:
        """Sort (token, group) pairs by group and (pair, expert) rows by slot."""
        T, g1 = r.group_idx.shape
        k = r.slot_idx.shape[-1]
        pair_group = r.group_idx.reshape(-1)
        pair_order = torch.argsort(pair_group, stable=True)
        if self.config.capacity_factor is not None:
            pair_order = pair_order[self._within_capacity(pair_group[pair_order])]
        pair_token = pair_order // g1
        pair_group_counts = torch.bincount(pair_group[pair_order], minlength=self.num_groups).tolist()
        # rows: one per (pair, chosen expert), pair index in the sorted pair order
        row_slot = r.slot_idx.reshape(-1, k)[pair_order].reshape(-1)
        row_weight = r.weights.reshape(-1, k)[pair_order].reshape(-1)
        row_pair = torch.arange(pair_order.numel(), device=row_slot.device).repeat_interleave(k)
        row_order = torch.argsort(row_slot, stable=True)
        slot_counts = torch.bincount(row_slot, minlength=self.num_experts)
        return {
            "pair_token": pair_token, "pair_group_counts": pair_group_counts,
            "row_pair": row_pair[row_order], "row_weight": row_weight[row_order],
            "row_slot": row_slot[row_order], "slot_counts": slot_counts.tolist(),
            "slot_counts_tensor": slot_counts, "pair_slots": r.slot_idx.reshape(-1, k)[pair_order],
            "pair_weights": r.weights.reshape(-1, k)[pair_order], "pair_group": pair_group[pair_order],
        }

    def _within_capacity(self, sorted_groups: torch.Tensor) -> torch.Tensor:
        """Token dropping like DeepSpeed's: each group takes at most
        ``max(min_capacity, ceil(capacity_factor * pairs / G))`` (token, group) pairs of this
        rank's batch, the earliest tokens first; the rest are dropped (their output is 0)."""
        cfg = self.config
        n = sorted_groups.numel()
        cap = max(cfg.min_capacity, math.ceil(cfg.capacity_factor * n / self.num_groups))
        counts = torch.bincount(sorted_groups, minlength=self.num_groups)
        start = torch.cumsum(counts, 0) - counts
        position = torch.arange(n, device=sorted_groups.device) - start[sorted_groups]
        return position < cap

    def _expert_parallel_compute(self, x: torch.Tensor, r: Routing, plan, use_fused: bool = False) -> torch.Tensor:
        """Dispatch -> compute -> combine across ranks. Each (token, chosen group) pair crosses
        once to the group's owner with its k local slot ids and combine weights (the weights
        carry the router's gradient back); the owner runs the experts (``use_fused``: on the fused
        path, each received pair a one-group token); results come back."""
        ep, ex = self.ep, self.experts
        Gl, K, d = ex.G, ex.K, self.hidden_size
        k = plan["pair_slots"].shape[-1]
        dest = plan["pair_group"] // Gl                       # pairs are sorted by group, so by rank too
        send_counts = torch.bincount(dest, minlength=ep.size).tolist()
        recv_counts = ep.exchange_counts(send_counts)
        ep.record_flat(self.expert_of_slot[plan["pair_slots"]].reshape(-1), d * x.element_size())
        payload = torch.cat([x.index_select(0, plan["pair_token"]),
                             plan["pair_weights"].to(x.dtype)], dim=1)
        local_slot = (plan["pair_slots"] - dest.unsqueeze(1) * (Gl * K)).to(torch.int32)
        recv = ep.all_to_all(payload, send_counts, recv_counts, "tokens_out")
        recv_slot = ep.all_to_all(local_slot, send_counts, recv_counts, "routing_out").long()
        # An owner that receives no rows computes on zero rows through the same operations: its
        # backward enters the same collectives, and its expert parameters get (zero) gradients in
        # the same order as their replicas' on other ranks.
        R = recv.shape[0]
        if use_fused:
            y_recv = fused.fused_expert_forward(ex, recv[:, :d], recv_slot[:, :1] // K, recv_slot.unsqueeze(1),
                                                recv[:, d:].unsqueeze(1))
        else:
            # the owner sorts what it received by its local group and slot, as the one-process dispatch does
            order = torch.argsort(recv_slot[:, 0] // K, stable=True)
            xs, ws, slots = recv[order, :d], recv[order, d:], recv_slot[order]
            pair_group_counts = torch.bincount(slots[:, 0] // K, minlength=Gl).tolist()
            row_slot = slots.reshape(-1)
            row_order = torch.argsort(row_slot, stable=True)
            row_pair = torch.arange(R, device=x.device).repeat_interleave(k)[row_order]
            slot_counts = torch.bincount(row_slot, minlength=Gl * K).tolist()
            y_sorted = ex(xs, pair_group_counts, row_pair, ws.reshape(-1)[row_order], slot_counts, self.compressed)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(R, device=order.device)
            y_recv = y_sorted.index_select(0, inverse)
        y_back = ep.all_to_all(y_recv, recv_counts, send_counts, "tokens_back")
        return x.new_zeros(x.shape[0], d).index_add(0, plan["pair_token"], y_back.to(x.dtype))

    @staticmethod
    def combine(y_pairs: torch.Tensor, plan, num_tokens: int) -> torch.Tensor:
        return y_pairs.new_zeros(num_tokens, y_pairs.shape[1]).index_add(0, plan["pair_token"], y_pairs)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, hits: torch.Tensor, slot_counts: torch.Tensor, learning: bool) -> torch.Tensor:
        """Per-expert token counts and, in training, the EMA activation centroids (Eq. 5).

        Device-side only (no host sync): the routing's (T, E) 0/1 slot matrix gives the counts
        (``slot_counts``, its column sums) and, by one matmul with x, the per-slot activation sums;
        both go to expert order in one indexed write."""
        if not learning:
            counts = torch.empty_like(slot_counts)
            counts[self.expert_of_slot] = slot_counts
            self._last_counts = counts.long()
            return self._last_counts
        dt = torch.promote_types(x.dtype, torch.float32)
        xd = x.detach().to(dt)
        # A token with a NaN/inf feature (an fp16 overflow upstream) would make its experts'
        # centroids non-finite for good: it counts in the routing statistics, not in the centroids.
        # (A row sums to NaN/inf iff it holds one, barring overflow: one reduction, not a T x d mask.)
        finite = torch.isfinite(xd.sum(1, keepdim=True))
        self.finite_tokens.add_(finite.sum())
        self._tokens_observed += x.shape[0]
        hits_f = hits.to(dt) * finite
        stats = torch.cat([hits_f.t() @ xd.nan_to_num(0.0, 0.0, 0.0), hits_f.sum(0).unsqueeze(1),
                           slot_counts.to(dt).unsqueeze(1)], dim=1)
        by_expert = torch.empty_like(stats)
        by_expert[self.expert_of_slot] = stats
        self._last_counts = by_expert[:, -1].long()   # this rank's tokens
        if self.ep is not None:
            # centroids follow the tokens of every rank: identical everywhere, as at ep_size 1
            by_expert = self.ep.reduce_stats(by_expert)
        c, seen = clustering.update_centroids(self.centroids, self.centroid_seen, by_expert[:, :-2].to(self.centroids.dtype),
                                              by_expert[:, -2].to(self.centroids.dtype), self.config.beta)
        self.centroids.copy_(c)
        self.centroid_seen.copy_(seen)
        self._set_c("micro_step", self._c("micro_step") + 1)
        return self._last_counts

    # --- clustering protocol ---------------------------------------------------------------
    def _maybe_recluster(self) -> None:
        cfg = self.config
        if self._c("micro_step") % cfg.gradient_accumulation_steps != 0:
            return  # only at the first micro-batch of an optimizer step
        step = self.step
        if not self.compressed:
            if step >= cfg.burn_in:
                self.recluster(force=True)
        elif cfg.dynamic_regroup and step - self._c("last_recluster_step") >= cfg.recluster_interval:
            self.recluster(force=False)

    @torch.no_grad()
    def recluster(self, force: bool = False) -> bool:
        """Cluster now (first call: compress the full experts). Returns True if a regroup was applied.

        ``force=True`` applies the new grouping even when its similarity gain is below delta.
        """
        self._sync_skipped_steps()   # before reading centroids: a skipped step's are undone
        cfg = self.config
        G, K, E = self.num_groups, self.experts_per_group, self.num_experts
        io = self.io
        was_compressed = self.compressed
        dev = self.expert_of_slot.device
        t_start = time.perf_counter()
        ep, ex = self.ep, self.experts
        Gl = ex.G                                    # groups held here (G without expert parallelism)
        local = slice(ex.group_offset * K, (ex.group_offset + Gl) * K)   # their global slots
        eff = ex.effective_weights(was_compressed, read=io.read)   # local slot order
        slot_of_expert = self.slot_of_expert()
        old_assign = (slot_of_expert // K).cpu()
        self.sync.average_(self.centroids)  # replicas must cluster on the same statistics
        # identical on every rank now (averaged, or reduced every step under expert parallelism),
        # so every rank refuses together
        _refuse_nonfinite(self.centroids, f"layer {self.layer_index}: the activation centroids",
                          torch.arange(E))
        if ep is None:
            flat = torch.cat([w[slot_of_expert].reshape(E, -1) for w in eff.values()], dim=1)
        else:  # rank 0 coordinates: it alone needs every expert's weights (S_param)
            flat = ep.gather_to_coordinator(torch.cat([w.reshape(ex.num_experts, -1) for w in eff.values()], dim=1))
            flat = flat[slot_of_expert] if flat is not None else None
        # experts with non-finite weights, found where all weights are (the coordinator)
        bad = None if flat is None or bool(torch.isfinite(flat).all()) else ~torch.isfinite(flat).all(1)
        if flat is not None and bad is None:
            s_param = self.sim_cache.similarity(flat, self.step)
            s_task = clustering.task_similarity(self.centroids)
            sim = clustering.fuse_similarity(s_param, s_task.to(s_param.device), cfg.alpha)
            sim = clustering.prune_neighbors(sim, cfg.tau, cfg.neighbor_top_n)
            seed = cfg.seed + 7919 * self.layer_index + self._c("reclusters") + self._c("skipped")
            new_assign = clustering.balanced_kmeans(1.0 - sim.cpu(), G, seed=seed, iters=cfg.kmeans_iters)
            gain = (clustering.intra_group_similarity(sim.cpu(), new_assign, G)
                    - clustering.intra_group_similarity(sim.cpu(), old_assign, G))
        elif bad is not None:   # the decision tells every rank: gain NaN, the bad experts flagged
            gain, new_assign = float("nan"), bad.cpu().long()
        else:  # not the coordinator: receives the decision below
            gain, new_assign = 0.0, torch.zeros(E, dtype=torch.long)
        # Rank 0's decision is everyone's: replicas apply the same regroup or none.
        decision = self.sync.from_first(torch.cat([torch.tensor([gain], dtype=torch.float64),
                                                   new_assign.to(torch.float64)]))
        gain, new_assign = float(decision[0]), decision[1:].round().long()
        if math.isnan(gain):
            _refuse_nonfinite(None, f"layer {self.layer_index}: the expert weights", new_assign.nonzero().squeeze(1))
        self._set_c("last_recluster_step", self.step)
        t_decided = time.perf_counter()
        if was_compressed and not force and gain < cfg.delta:
            self._set_c("skipped", self._c("skipped") + 1)
            self._last_regroup["last_gain"] = float(gain)
            self._regroup_times = {"regroup_cluster_s": t_decided - t_start, "regroup_migrate_s": 0.0}
            return False
        new_assign = clustering.match_group_labels(old_assign, new_assign, G)
        new_expert_of_slot = self._place(old_assign, new_assign, slot_of_expert.cpu()).to(dev)
        new_to_old = slot_of_expert[new_expert_of_slot]          # old slot of the expert now in each slot
        # overlap[g', g] = share of new group g' that came from old group g (rows sum to 1)
        overlap = torch.zeros(G, G, dtype=torch.float32)
        overlap.index_put_((new_assign, old_assign), torch.ones(E), accumulate=True)
        overlap = (overlap / K).to(dev)

        # A group whose slots hold the same experts as before keeps its base and factors: a fresh
        # decomposition would re-truncate its trained residuals (lossy whenever rank < full).
        keep = torch.zeros(G, dtype=torch.bool, device=dev)
        if was_compressed:
            keep = (new_to_old.view(G, K) == torch.arange(E, device=dev).view(G, K)).all(dim=1)
        keep_slots = keep.repeat_interleave(K)
        # From here on, only the groups held here: under expert parallelism rows of other ranks'
        # slots are fetched from their owners (``take``), values and optimizer moments alike.
        if ep is None:
            rows, take, g_rows = new_to_old, None, overlap
            keep_l, keep_slots_l = keep, keep_slots
        else:
            rows, take = new_to_old[local], ep.take_rows
            g_rows = overlap[ex.group_offset:ex.group_offset + Gl]
            keep_l, keep_slots_l = keep[ex.group_offset:ex.group_offset + Gl], keep_slots[local]
        redo = (~keep_l).nonzero().squeeze(1)   # only these groups are decomposed (SVD is the cost)
        rel_errors, gated = [], 0
        for name, w in eff.items():
            base_v = io.read(ex.base[name]).to(w.dtype).clone()
            a_v = io.read(ex.fa[name]).to(w.dtype).view(Gl, K, *ex.fa[name].shape[1:]).clone()
            b_v = io.read(ex.fb[name]).to(w.dtype).view(Gl, K, *ex.fb[name].shape[1:]).clone()
            # weights of the experts now in the slots of the groups to decompose (under expert
            # parallelism fetched from their old owners; every rank joins, with or without rows)
            redo_rows = rows.view(Gl, K)[redo].reshape(-1)
            members = w[redo_rows] if take is None else take(w, redo_rows)
            if redo.numel():
                dec = decompose_groups(members.view(redo.numel(), K, *w.shape[1:]), cfg.rank, cfg.gamma)
                base_v[redo], a_v[redo], b_v[redo] = dec.base, dec.a, dec.b
                rel_errors.append(dec.rel_error.reshape(-1))
                gated += int(dec.gated.sum())
            mix = (lambda key, s: _mix_groups(g_rows, s, take)) if was_compressed else None
            io.write(ex.base[name], base_v, mix)
            old_rows = rows if was_compressed else None
            io.write_fresh(ex.fa[name], a_v.reshape(Gl * K, *a_v.shape[2:]), old_rows, keep_slots_l, take=take)
            io.write_fresh(ex.fb[name], b_v.reshape(Gl * K, *b_v.shape[2:]), old_rows, keep_slots_l, take=take)
        for p in ex.bias.values():
            io.permute_rows(p, rows, take=take)
        if ep is not None:
            ep.note_migration(int((new_to_old[local] // (Gl * K) != ep.rank).sum()))
        self.router.regroup(new_to_old, overlap, io)
        if not was_compressed:
            for p in ex.full.values():
                io.release(p)
        self.expert_of_slot.copy_(new_expert_of_slot)
        self._set_c("compressed", 1)
        self._set_c("reclusters", self._c("reclusters") + 1)
        self._set_c("frozen_until", self.step + cfg.router_freeze_steps)
        self._last_regroup = {
            "last_gain": float(gain),
            # over the re-decomposed groups (0.0 when every group was kept)
            "reconstruction_error": float(torch.cat(rel_errors).mean()) if rel_errors else 0.0,
            "gated_residuals": gated,
            "moved_experts": int((new_to_old != torch.arange(E, device=dev)).sum()),
        }
        # wall times (not checkpointed): similarity + k-means + agreement; decomposition + moving slots and moments
        self._regroup_times = {"regroup_cluster_s": t_decided - t_start,
                               "regroup_migrate_s": time.perf_counter() - t_decided}
        return True

    def _place(self, old_assign: torch.Tensor, new_assign: torch.Tensor, slot_of_expert: torch.Tensor) -> torch.Tensor:
        """Slot table for the new grouping: an expert that stays in its group keeps its slot."""
        G, K = self.num_groups, self.experts_per_group
        expert_of_slot = torch.full((G * K,), -1, dtype=torch.long)
        for g in range(G):
            members = (new_assign == g).nonzero().squeeze(-1).tolist()
            movers = []
            for e in members:
                s = int(slot_of_expert[e])
                if int(old_assign[e]) == g:
                    expert_of_slot[s] = e
                else:
                    movers.append(e)
            free = [g * K + j for j in range(K) if expert_of_slot[g * K + j] < 0]
            for s, e in zip(free, movers):
                expert_of_slot[s] = e
        assert (expert_of_slot >= 0).all()
        return expert_of_slot


def _refuse_nonfinite(rows: Optional[torch.Tensor], what: str, experts: torch.Tensor) -> None:
    """Clustering on NaN/inf would crash inside an SVD or regroup on garbage: one clear error.
    ``rows`` (E, ...) is checked per expert; None means ``experts`` already lists the bad ones."""
    if rows is not None:
        experts = experts[~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(1).cpu()]
    if experts.numel():
        raise FloatingPointError(f"{what} of experts {experts.tolist()} are not finite (NaN or inf): refusing to "
                                 f"cluster on them. Non-finite training tokens are left out of the centroids "
                                 f"(stats()['nonfinite_tokens']); non-finite weights mean training diverged")


def _mix_groups(coeff: torch.Tensor, s: torch.Tensor, take=None) -> torch.Tensor:
    """New groups' rows as convex combinations of old groups' rows: ``coeff[g', g] @ s[g]``.
    With ``take`` (expert parallelism) only the old groups some local new group draws on are
    fetched from their owners; ``coeff`` then has one row per local new group and G columns."""
    if take is None:
        return (coeff.to(s.dtype) @ s.reshape(s.shape[0], -1)).reshape(s.shape)
    needed = (coeff.sum(0) > 0).nonzero().squeeze(1)
    old = take(s, needed)
    return (coeff[:, needed].to(s.dtype) @ old.reshape(old.shape[0], -1)).reshape(s.shape)


def clustered_layers(model: nn.Module) -> List[ClusteredMoE]:
    """Every clustered layer of ``model`` in module order (the one way to find them)."""
    return [m for m in model.modules() if isinstance(m, ClusteredMoE)]
