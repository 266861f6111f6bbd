"""Small GPT with a pluggable FFN: dense, switch top-2, deepspeed-moe, ours (clustered) and its
variants; the same blocks as a sentence classifier (``GPTClassifier``)."""
from .ffn import (FFN_KINDS, OURS_VARIANTS, DeepSpeedMoEFFN, DenseFFN, OursFFN, SwitchTop2FFN, build_ffn,
                  load_cv, variant_config)
from .gpt import GPT
from .classifier import GPTClassifier

__all__ = ["FFN_KINDS", "OURS_VARIANTS", "DenseFFN", "SwitchTop2FFN", "DeepSpeedMoEFFN", "OursFFN", "build_ffn",
           "load_cv", "variant_config", "GPT", "GPTClassifier"]
