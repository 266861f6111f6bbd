"""Feed-forward blocks the small GPT can plug in, all with one interface.

Every block maps ``x[..., d] -> (y[..., d], l_aux)`` where ``l_aux`` is a scalar tensor (zero for
the dense block) that the trainer adds to the LM loss.  MoE blocks also expose

- ``stats() -> dict`` with at least ``load_cv`` (population std / mean of the per-expert token
  counts of the last forward),
- ``expert_parameter_count() -> int`` (parameters of the expert weights in use),
- ``is_moe = True``.

Kinds (``build_ffn``):

``dense``      one GELU FFN.
``switch``     dropless top-k softmax router over E independent experts (Switch/GShard style).
``deepspeed``  ``deepspeed.moe.layer.MoE`` (ep_size 1, top-k gating, no token dropping).
``ours``       the clustered layer ``trilemma_moe.core.layer.ClusteredMoE`` with the run's config
               (by default clustered once after burn-in: ``dynamic_regroup=False``).
``static``     the same layer, clustered once after burn-in whatever the config says.
``dynamic``    the same layer with regroup checks after the first clustering (``dynamic_regroup=True``:
               probe similarity, move cost, movers-only migration).
``int4``       ours with INT4 residual factors (``residual_bits=4``).
Regroup rules compared with clustering once (docs/REGROUP.md), all dynamic:
``probe-free``     dynamic without the move cost (``regroup_move_cost=0``);
``paper-regroup``  the paper's rule: S_param of the weights, S_task of the routed tokens'
                   centroids, changed groups decomposed afresh.
The ablations of the paper's Table 3 (``OURS_VARIANTS`` lists each one's config knobs):
``random-groups``  a fixed random balanced grouping, never regrouped (w/o online clustering);
``full-experts``   full experts, clustered and hierarchically routed (w/o low-rank compression);
``flat-routing``   top-k over all compressed experts, no group stage (w/o hierarchical routing).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import TrilemmaMoEConfig
from ..core.compression import held_numel
from ..core.experts import activation_fn as _activation
from ..core.metrics import coefficient_of_variation as load_cv, mean_over_rows

# Our layer's variants: the TrilemmaMoEConfig knobs each sets on top of the run's config.
OURS_VARIANTS = {
    "ours": {},
    "static": {"dynamic_regroup": False},
    # the regroup rules measured against clustering once (probe similarity, move cost, movers-only
    # migration; then without the move cost; then the paper's)
    "dynamic": {"dynamic_regroup": True},
    "probe-free": {"dynamic_regroup": True, "regroup_move_cost": 0.0},
    "paper-regroup": {"dynamic_regroup": True, "regroup_similarity": "weights", "regroup_move_cost": 0.0,
                      "regroup_migration": "redecompose"},
    "int4": {"residual_bits": 4},
    "random-groups": {"grouping": "random", "dynamic_regroup": False},
    "full-experts": {"low_rank": False},
    "flat-routing": {"routing": "flat"},
}
FFN_KINDS = (*OURS_VARIANTS, "switch", "dense", "deepspeed")
_DS_EXTRA_MSG = "DeepSpeed is required for ffn='deepspeed': pip install 'trilemma_moe[deepspeed]'"


def _seed_mix(seed: int, index: int) -> int:
    """A 63-bit seed derived from (seed, index) only, so expert i's init never depends on
    how many other tensors were created before it."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


def _uniform(shape, bound: float, gen: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound


# ------------------------------------------------------------------------------------------
class DenseFFN(nn.Module):
    """``Linear(d, d_ff) -> act -> Linear(d_ff, d)``; returns a zero ``l_aux``."""

    is_moe = False

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = _activation(activation)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.fc2(self.act(self.fc1(x))), x.new_zeros(())


# ------------------------------------------------------------------------------------------
class SwitchTop2FFN(nn.Module):
    """Dropless top-k softmax-routed MoE (Switch/GShard style baseline).

    Router: ``Linear(d, E, bias=False)``, softmax over E, top-k, the k gates renormalised to sum
    to 1 (as DeepSpeed's top-2).  No capacity: every token reaches its k experts.  Experts are
    stacked tensors ``w1[E,d,d_ff], b1[E,d_ff], w2[E,d_ff,d], b2[E,d]``; the (token, choice) rows
    are sorted by expert and each expert's contiguous slice is one GEMM.

    ``l_aux = aux_loss_coef * E * sum_i f_i P_i + z_loss_coef * mean(logsumexp(logits)^2)`` with
    ``f_i`` the fraction of the N*k assignments that went to expert i and ``P_i`` the mean router
    probability of expert i.
    """

    is_moe = True

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int = 2,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, seed: int = 0,
                 activation: str = "gelu", impl: str = "auto"):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k ({k}) must be in [1, num_experts={num_experts}]")
        if impl not in ("auto", "loop", "grouped"):
            raise ValueError(f"impl must be 'auto', 'loop' or 'grouped', got {impl!r}")
        # "grouped": all experts in one torch._grouped_mm per matrix (no host sync; on A100 torch
        # runs it as a per-expert loop); "loop": one GEMM per expert; "auto": grouped on CUDA.
        self.impl = impl
        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.seed = int(seed)
        self.act = _activation(activation)
        E = num_experts
        self.router = nn.Linear(d_model, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_ff))
        self.b1 = nn.Parameter(torch.empty(E, d_ff))
        self.w2 = nn.Parameter(torch.empty(E, d_ff, d_model))
        self.b2 = nn.Parameter(torch.empty(E, d_model))
        self.reset_parameters()
        self.register_buffer("last_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        # a list: training forwards append (T, 1) stand-in groups (zeros: Switch has none) and the
        # (T, 1, k) chosen experts, the clustered layer's log layout, so that `reproduce` replays
        # its flat top-k all-to-all with the same cost model
        self.routing_log: Optional[list] = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.d_model
        gen = torch.Generator().manual_seed(_seed_mix(self.seed, -1))
        self.router.weight.copy_(_uniform(self.router.weight.shape, 1.0 / math.sqrt(d), gen))
        for e in range(self.num_experts):
            self.init_expert_(e)

    @torch.no_grad()
    def init_expert_(self, e: int) -> None:
        """nn.Linear's scheme (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias) from a
        generator seeded by (seed, e) alone."""
        d, f = self.d_model, self.d_ff
        gen = torch.Generator().manual_seed(_seed_mix(self.seed, e))
        b_in, b_hid = 1.0 / math.sqrt(d), 1.0 / math.sqrt(f)
        self.w1[e].copy_(_uniform((d, f), b_in, gen))
        self.b1[e].copy_(_uniform((f,), b_in, gen))
        self.w2[e].copy_(_uniform((f, d), b_hid, gen))
        self.b2[e].copy_(_uniform((d,), b_hid, gen))

    def expert_parameter_count(self) -> int:
        return sum(p.numel() for p in (self.w1, self.b1, self.w2, self.b2))

    @property
    def num_expert_params(self) -> int:
        return self.expert_parameter_count()

    def route(self, x2: Tensor):
        """Return (probs[N,E], topk_idx[N,k], gates[N,k] renormalised, logits[N,E])."""
        logits = self.router(x2)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # route in at least fp32
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return probs, top_i, gates, logits

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        N, k, E = x2.shape[0], self.k, self.num_experts
        probs, top_i, gates, logits = self.route(x2)
        if self.routing_log is not None and self.training:
            self.routing_log.append((torch.zeros_like(top_i[:, :1]).cpu(), top_i.detach().cpu().unsqueeze(1)))
        if self.impl == "grouped" or (self.impl == "auto" and x2.is_cuda and hasattr(torch, "_grouped_mm")):
            y, counts = self._experts_grouped(x2, top_i, gates)
            return y.reshape(shape), self._aux(counts, probs, logits, N)

        flat_e = top_i.reshape(-1)                                     # [N*k]
        order = torch.argsort(flat_e, stable=True)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat_e, minlength=E)
        token_of_row = torch.div(order, k, rounding_mode="floor")
        xs = x2[token_of_row]                                          # [N*k, d] sorted by expert
        outs = []
        # unbind once: per-expert indexing of a stacked parameter makes autograd allocate a
        # full-size zero gradient per slice
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        # every expert runs, zero rows included: the same parameters get gradients in the same
        # order whatever the routing (data-parallel reducers such as ZeRO-2 rely on it)
        for e, chunk in enumerate(torch.split(xs, counts.tolist())):
            h = self.act(torch.addmm(b1[e], chunk, w1[e]))
            outs.append(torch.addmm(b2[e], h, w2[e]))
        ys = torch.cat(outs, dim=0)
        # unsort by a gather (no scatter-add), then weight the k rows of each token and sum
        y = (ys[inv].view(N, k, ys.shape[-1]) * gates.to(ys.dtype).unsqueeze(-1)).sum(dim=1)

        return y.reshape(shape), self._aux(counts, probs, logits, N)

    def _aux(self, counts: Tensor, probs: Tensor, logits: Tensor, N: int) -> Tensor:
        self.last_counts = counts.detach()
        f = counts.to(probs.dtype) / float(max(N * self.k, 1))   # an empty batch: 0, not 0 / 0
        l_aux = self.aux_loss_coef * self.num_experts * torch.sum(f * mean_over_rows(probs))
        if self.z_loss_coef > 0:
            l_aux = l_aux + self.z_loss_coef * mean_over_rows(torch.logsumexp(logits, dim=-1).pow(2))
        return l_aux

    def _experts_grouped(self, x2: Tensor, top_i: Tensor, gates: Tensor):
        """Sort-based dispatch (gathers both ways) and one grouped GEMM per matrix."""
        from ..kernels.fused import GatherRows, SumGatherRows
        k, E = self.k, self.num_experts
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.zeros(E, dtype=torch.long, device=x2.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        offs = counts.cumsum(0).to(torch.int32)
        cdt = torch.get_autocast_dtype(x2.device.type) if torch.is_autocast_enabled(x2.device.type) else x2.dtype
        e_sorted = flat_e.index_select(0, order)
        with torch.autocast(x2.device.type, enabled=False):
            xs = GatherRows.apply(x2.to(cdt), order // k, inv, k)
            h = torch._grouped_mm(xs, self.w1.to(cdt), offs=offs) + self.b1.to(cdt).index_select(0, e_sorted)
            ys = torch._grouped_mm(self.act(h), self.w2.to(cdt), offs=offs) + self.b2.to(cdt).index_select(0, e_sorted)
            g_sorted = GatherRows.apply(gates.reshape(-1, 1).to(cdt), order, inv, 1)
            y = SumGatherRows.apply(ys * g_sorted, inv, order // k, k)
        return y, counts

    def stats(self) -> Dict[str, float]:
        return {"load_cv": load_cv(self.last_counts),
                "max_load_frac": float(self.last_counts.max()) / max(1, int(self.last_counts.sum()))}


# ------------------------------------------------------------------------------------------
class DeepSpeedMoEFFN(nn.Module):
    """``deepspeed.moe.layer.MoE`` with an ``nn.Sequential(Linear, GELU, Linear)`` expert.

    ep_size 1, top-k gating (DeepSpeed supports k in {1, 2}), ``drop_tokens=False`` so it is
    dropless like the other baselines, and ``top2_2nd_expert_sampling=False`` (DeepSpeed's default
    adds Gumbel noise to the second choice; off here so the baseline routes deterministically).  DeepSpeed's own ``l_aux`` is scaled by
    ``aux_loss_coef``.  Process groups are created on the first forward if nobody
    (``deepspeed.initialize``) did it before.
    """

    is_moe = True

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int = 2,
                 aux_loss_coef: float = 0.01, seed: int = 0, drop_tokens: bool = False,
                 capacity_factor: float = 1.0, top2_2nd_expert_sampling: bool = False):
        super().__init__()
        try:
            from deepspeed.moe.layer import MoE
        except ImportError as exc:  # pragma: no cover - exercised only without deepspeed
            raise ImportError(_DS_EXTRA_MSG) from exc
        if k not in (1, 2):
            raise ValueError(f"DeepSpeed's MoE gate supports top-1 and top-2 only, got k={k}")
        self.num_experts, self.k, self.aux_loss_coef = num_experts, k, float(aux_loss_coef)
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(_seed_mix(seed, -2))
        try:
            expert = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
            self.moe = MoE(d_model, expert, num_experts=num_experts, ep_size=1, k=k,
                           capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                           drop_tokens=drop_tokens, top2_2nd_expert_sampling=top2_2nd_expert_sampling)
            # DeepSpeed deep-copies one expert E times: give each its own init
            for e, ex in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                torch.manual_seed(_seed_mix(seed, e))
                for m in ex.modules():
                    if isinstance(m, nn.Linear):
                        m.reset_parameters()
        finally:
            torch.random.set_rng_state(rng_state)
        self.last_counts = torch.zeros(num_experts, dtype=torch.long)

    def _ensure_ep_group(self) -> None:
        # Not named set_deepspeed_parallelism: deepspeed.initialize calls that on every module that
        # has it AND on the MoE inside this shell, and DeepSpeed's gate refuses a second ep_group.
        from ..integrations.deepspeed import ensure_process_group
        ensure_process_group()
        self.moe.set_deepspeed_parallelism()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.moe.deepspeed_moe.ep_group is None:   # outside deepspeed.initialize (plain torch backend)
            self._ensure_ep_group()
        y, l_aux, counts = self.moe(x)
        self.last_counts = counts.detach().cpu()
        return y, self.aux_loss_coef * l_aux

    def expert_parameter_count(self) -> int:
        return sum(p.numel() for p in self.moe.deepspeed_moe.experts.parameters())

    def stats(self) -> Dict[str, float]:
        return {"load_cv": load_cv(self.last_counts)}


# ------------------------------------------------------------------------------------------
class OursFFN(nn.Module):
    """Our layer behind the FFN interface: ``self.layer`` is the DeepSpeed-MoE-shaped shell and
    ``self.layer.moe`` the :class:`~trilemma_moe.core.layer.ClusteredMoE` (find those with
    ``trilemma_moe.core.layer.clustered_layers(model)`` and call them directly).

    When DeepSpeed is already imported (a DeepSpeed run imports it before building the model) the
    shell is ``trilemma_moe.TrilemmaMoE``, a ``deepspeed.moe.layer.MoE``, so ``deepspeed.initialize``
    treats it as an MoE layer; otherwise the same layer without that base class
    (``integrations.deepspeed_layer.DeepSpeedStyleMoE``), and DeepSpeed is not imported at all.

    ``variant`` (a key of ``OURS_VARIANTS``) sets that variant's knobs on ``config``; ``static``
    (``dynamic_regroup=False``, the default) clusters once after burn-in and never again (the
    paper's static-clustering baseline), ``dynamic`` checks for regroups after it.
    """

    is_moe = True

    def __init__(self, d_model: int, d_ff: int, config: TrilemmaMoEConfig,
                 activation: str = "gelu", gated: bool = False, variant: str = "ours",
                 layer_index: int = 0):
        super().__init__()
        if "deepspeed" in sys.modules:
            from ..integrations.deepspeed import TrilemmaMoE as shell
        else:
            from ..integrations.deepspeed_layer import DeepSpeedStyleMoE as shell

        config = variant_config(config, variant)
        self.config = config
        self.variant = variant
        self.layer = shell(d_model, ffn_hidden_size=d_ff, config=config, activation=activation,
                           gated=gated, layer_index=layer_index)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        y, l_aux, _ = self.layer(x)
        return y, l_aux

    def stats(self) -> Dict[str, float]:
        return self.layer.moe.stats()

    def expert_parameter_count(self) -> int:
        return int(self.layer.moe.expert_parameter_count())

    def stored_expert_parameter_count(self) -> int:
        """Elements of every expert tensor held (full experts during burn-in, bases + factors
        allocated ahead of the first clustering, biases)."""
        return sum(held_numel(p) for p in self.layer.moe.experts.parameters())


def variant_config(config: TrilemmaMoEConfig, variant: str) -> TrilemmaMoEConfig:
    """``config`` with the knobs of ``variant`` (a key of ``OURS_VARIANTS``) set."""
    if variant not in OURS_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(OURS_VARIANTS)}, got {variant!r}")
    knobs = {k: v for k, v in OURS_VARIANTS[variant].items() if getattr(config, k) != v}
    return config.replace(**knobs) if knobs else config


# ------------------------------------------------------------------------------------------
def _layer_seed(seed: int, layer_index: int) -> int:
    # layer 0 keeps the seed itself, so build_ffn(..., seed) == SwitchTop2FFN(..., seed=seed)
    return _seed_mix(seed, 1_000_000 + int(layer_index)) if layer_index else int(seed)


def build_ffn(kind: str, d_model: int, d_ff: int, moe_config: Optional[TrilemmaMoEConfig] = None,
              seed: int = 0, activation: str = "gelu", layer_index: int = 0) -> nn.Module:
    """Build one FFN block of ``kind`` in ``FFN_KINDS``.

    Expert initialisation depends only on ``(seed, layer_index, expert)``.
    The MoE baselines take E, k and the aux/z-loss coefficients from ``moe_config`` so every
    kind is compared at the same expert count and top-k.
    """
    cfg = moe_config if moe_config is not None else TrilemmaMoEConfig()
    if kind == "dense":
        return DenseFFN(d_model, d_ff, activation=activation)
    if kind == "switch":
        return SwitchTop2FFN(d_model, d_ff, cfg.num_experts, k=cfg.top_k,
                             aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef,
                             seed=_layer_seed(seed, layer_index), activation=activation)
    if kind == "deepspeed":
        return DeepSpeedMoEFFN(d_model, d_ff, cfg.num_experts, k=cfg.top_k,
                               aux_loss_coef=cfg.aux_loss_coef, seed=_layer_seed(seed, layer_index))
    if kind in OURS_VARIANTS:
        if cfg.seed != seed:
            cfg = cfg.replace(seed=seed)
        return OursFFN(d_model, d_ff, cfg, activation=activation, variant=kind,
                       layer_index=layer_index)
    raise ValueError(f"unknown ffn kind {kind!r}: ffn must be one of {', '.join(FFN_KINDS)}")
