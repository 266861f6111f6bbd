"""What config.py cannot say about each knob of ``TrilemmaMoEConfig``: the paper's symbol and the
values it accepts, in one table beside the config.

The configuration reference (``docs/reference/config.md``, rendered by
``docs/_ext/config_reference.py``) takes each knob's name, type, default, section and description
from config.py itself (the dataclass fields and their source comments) and these two columns from
:data:`KNOB_DOC`. ``tests/test_config_reference.py`` fails when a field has no entry here or an
entry names no field, and checks every range written here against the config's validation: a
value just outside it must raise a ValueError naming the knob, values inside it must pass.

A range is an :class:`Interval` (numbers), a :class:`OneOf` (choices, booleans included) or a
:class:`Described` one (stated in words, with example values outside and inside it). Choices come
from the tuples config.py validates against, so the two cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .config import (_COMBINE, _GROUPINGS, _MIGRATIONS, _REGROUP_SIMILARITIES, _ROUTINGS, _TRIGGERS, AIO_KEYS,
                     BURN_IN_FORMS, SVD_METHODS)

_TINY = 1e-6   # how far "just outside" (and "just inside" an open bound) a float range is probed


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Interval:
    """Numbers from ``low`` to ``high`` (None: unbounded on that side; ``low_open``: ``low``
    itself excluded). ``integer``: whole numbers only. ``optional``: None is accepted too.
    ``note``: what else holds (relations to other knobs, what None or 0 means), shown beside it."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    integer: bool = False
    optional: bool = False
    note: str = ""

    def describe(self) -> str:
        kind = "integer " if self.integer else ""
        if self.low is not None and self.high is not None:
            text = f"{kind}in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"
        elif self.low is not None:
            text = f"{kind}{'>' if self.low_open else '≥'} {_number(self.low)}"
        else:
            text = kind.strip() or "any number"
        return _with(text, self.optional, self.note)

    def outside(self) -> Tuple[Any, ...]:
        step = 1 if self.integer else _TINY
        bad = ["1"]                                       # a string is no number
        if self.integer:
            bad.append((self.low if self.low is not None else 0) + 0.5)
        if self.low is not None:
            bad.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            bad.append(self.high + step)
        if not self.optional:
            bad.append(None)
        return tuple(bad)

    def inside(self) -> Tuple[Any, ...]:
        good = []
        if self.low is not None:
            good.append(self.low + _TINY if self.low_open else self.low)
        if self.high is not None:
            good.append(self.high)
        if self.low is not None and self.high is None:
            good.append(self.low + (1 if self.integer else 10))
        if self.integer:
            good = [int(math.ceil(v)) for v in good]
        return tuple(good) + ((None,) if self.optional else ())


@dataclass(frozen=True)
class OneOf:
    """One of ``choices`` (strings, numbers or ``(True, False)``); ``optional``: None too."""
    choices: Tuple[Any, ...]
    optional: bool = False
    note: str = ""

    def describe(self) -> str:
        if set(self.choices) == {True, False} and all(isinstance(c, bool) for c in self.choices):
            text = "`True` or `False`"
        else:
            names = [f'`"{c}"`' if isinstance(c, str) else f"`{c}`" for c in self.choices]
            text = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            text = ("only " if len(names) == 1 else "") + text
        return _with(text, self.optional, self.note)

    def outside(self) -> Tuple[Any, ...]:
        if all(isinstance(c, bool) for c in self.choices):
            return ("true", 1, None)                      # YAML/JSON slips: a string, a number
        if all(isinstance(c, str) for c in self.choices):
            bad = [self.choices[0].upper() + "_", ""]
        else:
            bad = [max(self.choices) + 1, True, str(self.choices[0])]
        return tuple(bad) + (() if self.optional else (None,))

    def inside(self) -> Tuple[Any, ...]:
        return tuple(self.choices) + ((None,) if self.optional else ())


@dataclass(frozen=True)
class Described:
    """A range said in words, with example values outside and inside it for the test."""
    text: str
    bad: Tuple[Any, ...] = ()
    good: Tuple[Any, ...] = ()

    def describe(self) -> str:
        return self.text

    def outside(self) -> Tuple[Any, ...]:
        return self.bad

    def inside(self) -> Tuple[Any, ...]:
        return self.good


Range = Union[Interval, OneOf, Described]


def _with(text: str, optional: bool, note: str) -> str:
    if optional:
        text += ", or `None`"
    return f"{text}; {note}" if note else text


class KnobDoc(NamedTuple):
    symbol: str      # the paper's symbol; "—" where it has none; "x (ours)" for our own notation
    allowed: Range


BOOL = OneOf((True, False))
NON_NEGATIVE = Interval(0)
POSITIVE = Interval(0, low_open=True)
RATE = Interval(0, 1, low_open=True)

KNOB_DOC: Dict[str, KnobDoc] = {
    # --- structure
    "num_experts": KnobDoc("E", Interval(1, integer=True, note="a multiple of `num_groups`")),
    "num_groups": KnobDoc("G", Interval(1, integer=True, note="divides `num_experts`; a multiple of `ep_size`")),
    "rank": KnobDoc("r", Interval(1, integer=True, note="≤ min(d, d_ff) of the experts, checked when the "
                                                        "layer is built")),
    "top_k": KnobDoc("k", Interval(1, integer=True, note="≤ K = `num_experts` / `num_groups`")),
    "group_top_k": KnobDoc("g1", Interval(1, integer=True, note="≤ `num_groups`")),
    # --- online dual-similarity clustering
    "alpha": KnobDoc("α", Interval(0, 1)),
    "beta": KnobDoc("β", RATE),
    "tau": KnobDoc("τ", Interval(-1, 1, optional=True, note="`None`: no pruning")),
    "neighbor_top_n": KnobDoc("—", Interval(1, integer=True, optional=True, note="`None`: no pruning")),
    "delta": KnobDoc("δ", NON_NEGATIVE),
    "recluster_interval": KnobDoc("T", Interval(1, integer=True, optional=True,
                                                note="`None`: 100 when `num_experts` ≤ 256, else 200")),
    "burn_in": KnobDoc("T0", Interval(0, integer=True)),
    "burn_in_form": KnobDoc("—", OneOf(BURN_IN_FORMS, note='`"compressed"` needs `low_rank=True`')),
    "dynamic_regroup": KnobDoc("—", BOOL),
    # --- when a regroup check runs
    "regroup_trigger": KnobDoc("—", OneOf(_TRIGGERS, note='`"drift"` needs `dynamic_regroup=True`')),
    "drift_threshold": KnobDoc("—", RATE),
    "drift_beta": KnobDoc("—", RATE),
    "drift_every": KnobDoc("—", Interval(1, integer=True)),
    # --- ablations
    "grouping": KnobDoc("—", OneOf(_GROUPINGS, note='`"random"` needs `dynamic_regroup=False`')),
    "low_rank": KnobDoc("—", BOOL),
    "routing": KnobDoc("—", OneOf(_ROUTINGS, note='`"flat"` needs `ep_size=1`')),
    "sim_cache_lifetime": KnobDoc("m", Interval(1, integer=True)),
    "sim_cache_eps": KnobDoc("ε", NON_NEGATIVE),
    "kmeans_iters": KnobDoc("—", Interval(0, integer=True)),
    # --- what a regroup looks at
    "regroup_similarity": KnobDoc("—", OneOf(_REGROUP_SIMILARITIES)),
    "regroup_move_cost": KnobDoc("λ (ours)", Interval(0, note="0: moving costs nothing")),
    "regroup_migration": KnobDoc("—", OneOf(_MIGRATIONS)),
    "probe_tokens": KnobDoc("—", Interval(1, integer=True)),
    "param_sketch_size": KnobDoc("s (ours)", Interval(1, integer=True)),
    "svd": KnobDoc("—", OneOf(SVD_METHODS)),
    # --- compression
    "gamma": KnobDoc("γ", Interval(0, optional=True, note="`None`: no gate")),
    # --- routing and training protocol
    "router_temperature_start": KnobDoc("—", POSITIVE),
    "router_temperature_end": KnobDoc("—", POSITIVE),
    "router_temperature_steps": KnobDoc("—", Interval(0, integer=True, note="0: the end temperature from the "
                                                                         "first step")),
    "router_freeze_steps": KnobDoc("—", Interval(0, integer=True)),
    "aux_loss_coef": KnobDoc("—", NON_NEGATIVE),
    "z_loss_coef": KnobDoc("—", NON_NEGATIVE),
    "combine": KnobDoc("—", OneOf(_COMBINE)),
    "grad_clip": KnobDoc("—", Interval(0, note="0: no clipping")),
    "gradient_accumulation_steps": KnobDoc("—", Interval(1, integer=True)),
    "seed": KnobDoc("—", Interval(0, integer=True)),
    # --- precision and memory
    "residual_bits": KnobDoc("—", OneOf((4, 16))),
    "recompute_experts": KnobDoc("—", BOOL),
    "offload_idle_steps": KnobDoc("S_idle", Interval(1, integer=True, optional=True, note="`None`: no offload")),
    "prefetch_lookahead": KnobDoc("L", Interval(0, integer=True)),
    "prefetch_ema_rate": KnobDoc("—", RATE),
    "prefetch_router_evidence": KnobDoc("—", BOOL),
    "prefetch_threshold": KnobDoc("θ (ours)", RATE),
    "offload_dir": KnobDoc("—", Described("a non-empty directory path, or `None`", bad=("", 3), good=("/nvme/x", None))),
    "aio": KnobDoc("—", Described("`None`, or a mapping with keys among " + ", ".join(f"`{k}`" for k in AIO_KEYS),
                                  bad=({"no_such_key": 1}, "aio"), good=({"queue_depth": 8}, {}, None))),
    # --- expert parallelism
    "ep_size": KnobDoc("—", Interval(1, integer=True, note='divides `num_groups`; 1 with `routing="flat"`')),
    "capacity_factor": KnobDoc("—", Interval(0, low_open=True, optional=True, note="`None`: dropless")),
    "min_capacity": KnobDoc("—", Interval(0, integer=True)),
    "comm_timeout_s": KnobDoc("—", POSITIVE),
}
