"""Every knob of the method in one validated dataclass.

Defaults follow the paper (arXiv 2510.02345, section 3) where it gives one; where it is silent
the default is ours and says so.  Load from YAML (``from_yaml``), from a plain dict
(``from_dict``), or from the ``"trilemma_moe"`` section of a DeepSpeed JSON config
(``from_deepspeed_config``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .config_checks import check_bool, check_choice, check_int, check_range

DEEPSPEED_SECTION, CONVERT_HF_MOE = "trilemma_moe", "convert_hf_moe"   # the section; integrations/hf.initialize's switch

_COMBINE = ("product",)
_GROUPINGS = ("similarity", "random")
_ROUTINGS = ("hierarchical", "flat")
_REGROUP_SIMILARITIES = ("weights", "probe")
SVD_METHODS = ("exact", "randomized")
_MIGRATIONS = ("movers", "redecompose")
_TRIGGERS = ("period", "drift")
BURN_IN_FORMS = ("full", "compressed")
AIO_KEYS = ("block_size", "queue_depth", "intra_op_parallelism", "single_submit", "overlap_events", "use_gds",
            "thread_count")   # what DeepSpeed's "aio" section may hold


def check_placement(num_groups: int, ep_size: int) -> None:
    """Each expert-parallel rank owns num_groups / ep_size whole groups."""
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if num_groups % ep_size != 0:
        raise ValueError(f"num_groups ({num_groups}) must be divisible by ep_size ({ep_size}): "
                         f"each expert-parallel rank owns num_groups/ep_size whole groups")


DROPIN_MAX_GROUPS, DROPIN_MAX_RANK = 8, 16   # the paper's G and r


def dropin_structure(num_experts: int, ep_size: int, hidden_size: int, ffn_hidden_size: int,
                     top_k: int = 1) -> tuple:
    """``(num_groups, rank)`` for a layer built from DeepSpeed MoE's arguments alone (no
    TrilemmaMoEConfig, no num_groups/rank knob), so that the shapes MoE accepts are served:

    * G = the largest G <= max(8, ep_size) that divides E, is a multiple of ep_size (each
      expert-parallel rank holds whole groups) and leaves K = E/G >= top_k experts per group (a
      token's k experts sit in its group), preferring K >= 2 when some G gives it (a group of one
      expert shares no base and its second routing stage has no choice). E=32 gets the paper's 8.
    * r = min(16, max(1, min(d, d_ff) // 4)): the paper's 16 from d, d_ff >= 64 on, and always
      below both sides of every expert matrix.

    Raises one ValueError naming ``ep_size`` when it does not divide num_experts, or ``k`` when
    top_k exceeds num_experts / ep_size (no G can serve either).
    """
    E, ep, k = num_experts, ep_size, top_k
    if E % ep:
        raise ValueError(f"ep_size ({ep}) must divide num_experts ({E}): each expert-parallel rank holds "
                         f"whole groups of experts")
    if k > E // ep:
        raise ValueError(f"k ({k}) must be <= num_experts / ep_size = {E // ep}: a token's k experts sit in one "
                         f"group, and a group holds at most num_experts / ep_size experts")
    fits = [G for G in range(ep, max(DROPIN_MAX_GROUPS, ep) + 1, ep) if E % G == 0 and E // G >= k]
    shared = [G for G in fits if E // G >= 2]
    G = max(shared or fits)
    rank = min(DROPIN_MAX_RANK, max(1, min(hidden_size, ffn_hidden_size) // 4))
    return G, rank


@dataclass
class TrilemmaMoEConfig:
    """Every knob of the method, validated on construction: a value out of range is one ValueError
    naming the knob. Each field's comment below says what it changes; the documentation's
    configuration reference (docs/reference/config.md) lists them with their ranges."""

    # --- structure -------------------------------------------------------------------------
    num_experts: int = 32          # E, experts in the layer
    num_groups: int = 8            # G; K = E / G experts per group
    rank: int = 16                 # r, rank of each expert's residual factors
    top_k: int = 2                 # k, experts per token inside the chosen group
    group_top_k: int = 1           # g1, groups per token
    # --- online dual-similarity clustering (3.1) -------------------------------------------
    alpha: float = 0.7             # weight of S_param in S = a*S_param + (1-a)*S_task
    beta: float = 0.05             # EMA rate of activation centroids (Eq. 5)
    tau: Optional[float] = None    # neighbour pruning: drop pairs with S < tau (paper: 0.1); None = off
    neighbor_top_n: Optional[int] = None  # keep only each expert's top-n neighbours (paper: 32); None = off
    delta: float = 0.01            # skip a regroup whose mean intra-group similarity gain < delta
    recluster_interval: Optional[int] = None  # T, steps between regroup checks; None -> 100 when E <= 256,
    #   else 200 (Eq. 11)
    burn_in: int = 200             # T0: steps with full experts before the first clustering
    burn_in_form: str = "full"     # "full": burn-in trains E full experts, compressed at the first clustering (the
    #   paper); "compressed": the layer never holds full experts: each group starts as its initial experts'
    #   decomposition (slot order), burn-in trains bases + factors, and the first clustering regroups them
    #   (memory: no full weights, gradients or optimizer moments at any step)
    dynamic_regroup: bool = False  # True: regroup checks after the first clustering (every recluster_interval steps,
    #   or on load drift). Off by default: no regroup rule beat clustering once, on stationary data or after a
    #   distribution shift (docs/results.md, "Dynamic regrouping: what we measured")
    # --- when a regroup check runs after the first clustering (ours; built for distribution shifts) ------
    regroup_trigger: str = "period"  # "period": every recluster_interval steps (the paper); "drift": when the
    #   per-expert load distribution (an EMA, reduced over every replica) has moved by more than drift_threshold
    #   in total variation from the one measured at the last check (core/drift.py); recluster_interval is unused
    drift_threshold: float = 0.25  # total-variation distance in (0, 1] that triggers a check (regroup_trigger="drift");
    #   measured (shift preset, topic scenario, E=32, beta 0.03): 0.13-0.22 while the data stay put, 0.29-0.51 after a shift
    drift_beta: float = 0.03       # EMA rate of the per-expert load counts, per training forward (0.1: too noisy there)
    drift_every: int = 10          # steps between drift measurements, counted from the last check (its shortest interval)
    # --- ablations (paper Table 3); the defaults are the method -------------------------------
    grouping: str = "similarity"   # "random": a fixed random balanced grouping instead of clustering (w/o online clustering)
    low_rank: bool = True          # False: experts stay full after clustering (w/o low-rank compression)
    routing: str = "hierarchical"  # "flat": top-k over all E experts, no group stage (w/o hierarchical routing)
    sim_cache_lifetime: int = 500  # m: S_param cache lifetime in steps (ours; paper gives no value)
    sim_cache_eps: float = 0.02    # epsilon: recompute S_param rows whose sketch changed by more than eps, relative (ours)
    kmeans_iters: int = 30         # Lloyd-style refinement rounds after k-means++ seeding (ours)
    # --- what a regroup after the first clustering looks at (ours; docs/REGROUP.md) ----------
    regroup_similarity: str = "probe"  # "weights": the paper's S_param of the experts' weights and S_task of
    #   the centroids of the tokens each expert was routed; "probe": S_param of what distinguishes experts (their
    #   residuals) and S_task of every expert's router logit on a shared probe batch (routing cannot bias either)
    regroup_move_cost: float = 0.25  # lambda: pairs now in one group gain lambda * (measured re-truncation error
    #   of the last decomposition) in S, so a regroup moves an expert only when S says more than moving costs
    regroup_migration: str = "movers"  # "movers": bases and staying experts' factors kept, only movers
    #   re-expressed on their new group's base; "redecompose" (the paper): changed groups decomposed afresh
    probe_tokens: int = 256        # recent training tokens kept as the probe batch (regroup_similarity="probe")
    param_sketch_size: int = 4096  # s: S_param from CountSketches of s floats per expert, gathered instead of weights
    svd: str = "exact"             # "randomized": seeded randomized truncated SVD (HMT) for the residual factors;
    #   under expert parallelism each rank draws one test matrix for its own groups (not bit-equal to ep_size 1)
    # --- compression (3.2) ----------------------------------------------------------------
    gamma: Optional[float] = 0.05  # residual gate: zero residuals with |dW| <= gamma*|W_base| (see docs); None = off
    # --- routing (3.3) and training protocol (3.5) -----------------------------------------
    router_temperature_start: float = 1.0  # router softmax temperature at step 0 (the paper's 1.0)
    router_temperature_end: float = 0.7    # temperature from router_temperature_steps on (the paper's 0.7)
    router_temperature_steps: int = 1000   # linear decay horizon (ours; paper gives the end points)
    router_freeze_steps: int = 1   # router gets no gradient for this many steps after a regroup
    aux_loss_coef: float = 0.01    # Switch-style load-balancing loss at group and expert level
    z_loss_coef: float = 0.001     # router z-loss (ST-MoE)
    combine: str = "product"       # combine weight of expert i: p_g * p_i (both softmaxes, no renorm)
    grad_clip: float = 1.0         # gradient-norm clip used by our trainer / DeepSpeed "gradient_clipping"
    gradient_accumulation_steps: int = 1  # forwards per optimizer step (regroups happen on step boundaries)
    seed: int = 1234               # expert init, k-means++ and cache sketches derive from it
    # --- precision and memory (3.4) ---------------------------------------------------------
    residual_bits: int = 16        # 4: INT4 residual factors (packed, per (slot, rank column) scale/zero); 16: as the params
    recompute_experts: bool = False  # activation checkpointing of the expert compute: backward recomputes it
    offload_idle_steps: Optional[int] = None  # S_idle: evict a group idle this many steps (inference store); None = off
    prefetch_lookahead: int = 2    # L: prefetch groups the EMA predictor expects within the next L steps
    prefetch_ema_rate: float = 0.3  # EMA rate of the predictor's per-group selection frequency (ours)
    prefetch_router_evidence: bool = True  # predictor also counts the router's soft group probabilities (ours)
    prefetch_threshold: float = 0.25  # "likely within L steps" above this: kept / prefetched (ours)
    offload_dir: Optional[str] = None  # NVMe directory; from_deepspeed_config defaults it to the ZeRO offload nvme_path
    aio: Optional[dict] = None     # DeepSpeed "aio" section (block_size, queue_depth, ...); from_deepspeed_config copies it
    # --- expert parallelism (trilemma_moe.parallel) -----------------------------------------
    ep_size: int = 1               # ranks one layer's groups are spread over; num_groups % ep_size == 0
    capacity_factor: Optional[float] = None  # None = dropless; else a rank sends each group at most
    #   max(min_capacity, ceil(capacity_factor * pairs / G)) of its (token, group) pairs, the rest dropped
    min_capacity: int = 4          # floor of the capacity_factor cap: a rank may always send a group this many pairs
    comm_timeout_s: float = 600.0  # an expert-parallel collective waiting longer raises (a rank stopped answering)

    def __post_init__(self) -> None:
        check_int(self, "num_experts", 1)
        check_int(self, "num_groups", 1)
        check_int(self, "rank", 1)
        check_int(self, "top_k", 1)
        check_int(self, "group_top_k", 1)
        check_int(self, "burn_in", 0)
        check_int(self, "sim_cache_lifetime", 1)
        check_int(self, "kmeans_iters", 0)
        check_int(self, "router_temperature_steps", 0)
        check_int(self, "router_freeze_steps", 0)
        check_int(self, "gradient_accumulation_steps", 1)
        check_int(self, "seed", 0)
        E, G = self.num_experts, self.num_groups
        if G > E:
            raise ValueError(f"num_groups ({G}) must not exceed num_experts ({E})")
        if E % G != 0:
            raise ValueError(f"num_experts ({E}) must be divisible by num_groups ({G}): "
                             f"groups hold exactly K = E/G experts")
        K = E // G
        if self.top_k > K:
            raise ValueError(f"top_k ({self.top_k}) must be <= experts per group K = num_experts/num_groups = {K}")
        if self.group_top_k > G:
            raise ValueError(f"group_top_k ({self.group_top_k}) must be <= num_groups ({G})")
        check_range(self, "alpha", 0.0, 1.0)
        check_range(self, "beta", 0.0, 1.0, low_open=True)
        if self.tau is not None:
            check_range(self, "tau", -1.0, 1.0)
        if self.neighbor_top_n is not None:
            check_int(self, "neighbor_top_n", 1)
        check_range(self, "delta", 0.0, float("inf"))
        check_range(self, "sim_cache_eps", 0.0, float("inf"))
        if self.gamma is not None:
            check_range(self, "gamma", 0.0, float("inf"))
        for name in ("router_temperature_start", "router_temperature_end"):
            check_range(self, name, 0.0, float("inf"), low_open=True)
        check_range(self, "aux_loss_coef", 0.0, float("inf"))
        check_range(self, "z_loss_coef", 0.0, float("inf"))
        check_range(self, "grad_clip", 0.0, float("inf"))
        check_choice(self, "combine", _COMBINE)
        if self.recluster_interval is None:
            self.recluster_interval = 100 if E <= 256 else 200
        check_int(self, "recluster_interval", 1)
        self._check_memory_knobs()
        self._check_ep()
        self._check_ablations()

    def _check_ablations(self) -> None:
        check_choice(self, "grouping", _GROUPINGS)
        check_choice(self, "routing", _ROUTINGS)
        check_choice(self, "regroup_similarity", _REGROUP_SIMILARITIES)
        check_choice(self, "regroup_migration", _MIGRATIONS)
        check_choice(self, "svd", SVD_METHODS)
        check_range(self, "regroup_move_cost", 0.0, float("inf"))
        check_int(self, "probe_tokens", 1)
        check_int(self, "param_sketch_size", 1)
        for name in ("low_rank", "dynamic_regroup"):
            check_bool(self, name)
        check_choice(self, "burn_in_form", BURN_IN_FORMS)
        if self.burn_in_form == "compressed" and not self.low_rank:
            raise ValueError("burn_in_form='compressed' trains the compressed form from the start: it needs "
                             "low_rank=True (low_rank=False keeps full experts)")
        check_choice(self, "regroup_trigger", _TRIGGERS)
        check_range(self, "drift_threshold", 0.0, 1.0, low_open=True)
        check_range(self, "drift_beta", 0.0, 1.0, low_open=True)
        check_int(self, "drift_every", 1)
        if self.regroup_trigger == "drift" and not self.dynamic_regroup:
            raise ValueError("regroup_trigger='drift' decides when regroup checks run: it needs dynamic_regroup=True "
                             "(static clustering never checks; in the main job: --ffn dynamic)")
        if self.grouping == "random" and self.dynamic_regroup:
            raise ValueError("grouping='random' is a fixed grouping drawn once after burn-in: set "
                             "dynamic_regroup=False with it (regroups need the similarity clustering)")
        if self.routing == "flat" and self.ep_size > 1:
            raise ValueError(f"routing='flat' (the ablation without the group stage) runs in one process; "
                             f"ep_size is {self.ep_size}: a token's k experts may then sit on k ranks")

    def _check_ep(self) -> None:
        check_int(self, "ep_size", 1)
        check_placement(self.num_groups, self.ep_size)
        if self.capacity_factor is not None:
            check_range(self, "capacity_factor", 0.0, float("inf"), low_open=True)
        check_int(self, "min_capacity", 0)
        check_range(self, "comm_timeout_s", 0.0, float("inf"), low_open=True)

    def _check_memory_knobs(self) -> None:
        if isinstance(self.residual_bits, bool) or self.residual_bits not in (4, 16):
            raise ValueError(f"residual_bits must be 4 or 16, got {self.residual_bits!r}")
        if self.offload_idle_steps is not None:
            check_int(self, "offload_idle_steps", 1)
        check_int(self, "prefetch_lookahead", 0)
        check_range(self, "prefetch_ema_rate", 0.0, 1.0, low_open=True)
        check_range(self, "prefetch_threshold", 0.0, 1.0, low_open=True)
        for name in ("prefetch_router_evidence", "recompute_experts"):
            check_bool(self, name)
        if self.offload_dir is not None and (not isinstance(self.offload_dir, str) or not self.offload_dir):
            raise ValueError(f"offload_dir must be a non-empty path string or None, got {self.offload_dir!r}")
        if self.aio is not None:
            if not isinstance(self.aio, Mapping) or set(self.aio) - set(AIO_KEYS):
                raise ValueError(f"aio must be a DeepSpeed 'aio' section with keys among {sorted(AIO_KEYS)}, "
                                 f"got {self.aio!r}")
            self.aio = dict(self.aio)

    # --- derived ---------------------------------------------------------------------------
    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    def check_dims(self, d_in: int, d_out: int) -> None:
        """Rank must fit inside every expert matrix (d_model x d_ff and back)."""
        if self.rank > min(d_in, d_out):
            raise ValueError(f"rank ({self.rank}) must be <= min(d_in, d_out) = {min(d_in, d_out)} "
                             f"of the expert matrices ({d_in} x {d_out})")

    def temperature(self, step: int) -> float:
        """Router temperature at an optimizer step: linear from start to end, then flat."""
        if self.router_temperature_steps == 0 or step >= self.router_temperature_steps:
            return self.router_temperature_end
        frac = step / self.router_temperature_steps
        return self.router_temperature_start + frac * (self.router_temperature_end - self.router_temperature_start)

    # --- loading ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every knob by name (``from_dict`` of it gives an equal config)."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "TrilemmaMoEConfig":
        """A copy with ``overrides`` (``dataclasses.replace``, so ``__post_init__`` validates it
        again); an unknown key raises naming it, as in :meth:`from_dict`."""
        _check_known(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> "TrilemmaMoEConfig":
        """A config from a mapping of knobs, ``overrides`` on top; an unknown key raises naming it."""
        merged = dict(values or {})
        merged.update(overrides)
        _check_known(merged)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], **overrides: Any) -> "TrilemmaMoEConfig":
        """A config from a YAML file: a mapping of knobs, or one whose ``trilemma_moe`` key holds them
        (the file's other keys are then ignored); ``overrides`` on top, as in :meth:`from_dict`."""
        import yaml

        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as exc:  # yaml's message is several lines
                raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of trilemma_moe knobs, got {type(data).__name__}")
        section = _section(data, path)
        return cls.from_dict(data if section is None else section, **overrides)

    @classmethod
    def from_deepspeed_config(cls, config: Union[str, os.PathLike, Mapping[str, Any]],
                              **overrides: Any) -> "TrilemmaMoEConfig":
        """Read the ``"trilemma_moe"`` section of a DeepSpeed config (path or dict).

        ``gradient_accumulation_steps`` and ``gradient_clipping`` are taken from the DeepSpeed
        config itself unless the section sets them, so regroups land on optimizer-step boundaries.
        """
        source = None
        if not isinstance(config, Mapping):
            source = config
            with open(config) as f:
                try:
                    config = json.load(f)
                except ValueError as exc:  # JSON or UTF-8 decoding: their messages lack the file
                    raise ValueError(f"{source}: not valid JSON: {exc}") from None
            if not isinstance(config, Mapping):
                raise ValueError(f"{source}: a DeepSpeed config must be a JSON object, got {type(config).__name__}")
        section = dict(_section(config, source) or {})
        section.pop(CONVERT_HF_MOE, None)   # not a layer knob: integrations/hf.initialize reads it
        # "auto" (Hugging Face's convention) leaves our default in place.
        gas, clip = config.get("gradient_accumulation_steps"), config.get("gradient_clipping")
        if "gradient_accumulation_steps" not in section and gas not in (None, "auto"):
            section["gradient_accumulation_steps"] = gas
        if "grad_clip" not in section and clip not in (None, "auto"):
            section["grad_clip"] = clip
        # Idle groups go where the user already sends ZeRO's NVMe traffic, with the same aio settings.
        if "offload_dir" not in section:
            zero = config.get("zero_optimization") or {}
            for key in ("offload_param", "offload_optimizer"):
                path = (zero.get(key) or {}).get("nvme_path")
                if path:
                    section["offload_dir"] = str(path)
                    break
        if "aio" not in section and isinstance(config.get("aio"), Mapping):
            section["aio"] = dict(config["aio"])
        return cls.from_dict(section, **overrides)


def _section(config: Mapping[str, Any], source: Optional[Union[str, os.PathLike]] = None) -> Optional[Mapping]:
    """The ``"trilemma_moe"`` section of ``config``, None when there is none.

    A null / non-mapping section or a near-miss spelling of its name would otherwise run with every
    default and say nothing, so both raise.
    """
    where = f"{os.fspath(source)}: " if source is not None else ""
    want = _normalise_key(DEEPSPEED_SECTION)
    for key in config:
        if key != DEEPSPEED_SECTION and isinstance(key, str) and _normalise_key(key) == want:
            raise ValueError(f"{where}section {key!r} is misspelt: it must be called {DEEPSPEED_SECTION!r}")
    if DEEPSPEED_SECTION not in config:
        return None
    section = config[DEEPSPEED_SECTION]
    if not isinstance(section, Mapping):
        got = "null" if section is None else f"{type(section).__name__} {section!r}"
        raise ValueError(f"{where}section {DEEPSPEED_SECTION!r} must be a mapping of knobs, got {got}")
    return section


def _check_known(keys: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(TrilemmaMoEConfig)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown trilemma_moe config key(s): {', '.join(unknown)}; "
                         f"known keys: {', '.join(sorted(known))}")


def _normalise_key(key: str) -> str:
    return re.sub(r"[\s_-]", "", key.lower())
