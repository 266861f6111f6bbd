"""The checks ``TrilemmaMoEConfig.__post_init__`` runs on its knobs (``config.py``).

Each takes the config and a knob's name and raises one ``ValueError`` that names the knob, the
allowed values and the value given. ``trilemma_moe/config_doc.py`` documents the same ranges, and
``tests/test_config_reference.py`` checks that the documented range is the one these enforce.
"""
from __future__ import annotations

import math
from typing import Any


def check_int(config: Any, name: str, minimum: int) -> None:
    """An integer (not a bool) >= ``minimum``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_bool(config: Any, name: str) -> None:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(getattr(config, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")


def check_choice(config: Any, name: str, choices: tuple) -> None:
    """One of ``choices``."""
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")


def in_range(value: float, low: float, high: float, low_open: bool = False) -> bool:
    """``value`` is finite and in ``[low, high]`` (``(low, high]`` with ``low_open``). NaN would pass
    comparisons alone, and inf the open-ended ranges. The main job's number flags use it too."""
    return math.isfinite(value) and low <= value <= high and not (low_open and value == low)


def check_range(config: Any, name: str, low: float, high: float, low_open: bool = False) -> None:
    """A finite number (not a bool) in ``[low, high]``, or ``(low, high]`` with ``low_open``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not in_range(value, low, high, low_open):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
