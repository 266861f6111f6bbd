"""``python -m trilemma_moe.reproduce``: the same as ``trilemma-moe reproduce``."""
import sys

from . import main

main(sys.argv[1:])
