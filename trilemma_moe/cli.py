"""``trilemma-moe`` console script: ``trilemma-moe <command> [args]``.

Commands are looked up in ``COMMANDS`` (name -> (module, help)); each module has
``main(argv) -> Any``.  Add new entry points (bench, profile, ...) there.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, Optional, Sequence, Tuple

COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("trilemma_moe.train", "train the small GPT (dense / switch / deepspeed / ours and its variants)"),
    "profile-comm": ("trilemma_moe.parallel.profile_comm",
                     "all-to-all bytes of flat top-k vs our group placement on a simulated cluster"),
    "reproduce": ("trilemma_moe.reproduce", "the paper's tables at a scale this machine runs: docs/RESULTS.md"),
    "reshard": ("trilemma_moe.integrations.checkpoint",
                "DeepSpeed checkpoint saved at any ep_size -> one ep_size-1 state dict"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: trilemma-moe <command> [args]   (trilemma-moe <command> --help for its flags)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"trilemma_moe {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trilemma-moe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
