"""The main job's input errors: one line ``trilemma_moe.train: error: ...`` on stderr and exit
status 2, as argparse does for a bad flag, instead of a traceback.

``usage_error`` is a rule between flags (or a flag and the machine) that does not hold;
``input_errors`` wraps a phase that reads the user's inputs (a file, a directory, the config's
knobs) and turns its ``ValueError`` / ``OSError`` into that line. Only those phases are wrapped:
an error in training itself keeps its traceback.

This module imports nothing from ``training``: every other module of it may import this one.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, NoReturn, Optional

PROG = "trilemma_moe.train"


def usage_error(message: str) -> NoReturn:
    """Print ``trilemma_moe.train: error: <message>`` (the message names the flag) and exit 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None   # no chained traceback of what caused it


@contextlib.contextmanager
def input_errors(flag: Optional[str], value: Any = None):
    """A bad file or directory given with ``flag`` (or a bad knob) ends in ``usage_error``; the
    message gets ``flag`` (and ``value``) in front unless it names the flag already."""
    try:
        yield
    except (ValueError, OSError) as exc:
        msg = str(exc)
        if flag is not None and flag not in msg:
            msg = f"{flag}: {msg}" if str(value) in msg else f"{flag} {value}: {msg}"
        usage_error(msg)
