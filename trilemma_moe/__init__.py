"""trilemma_moe: clustered experts with shared bases and low-rank residuals (arXiv 2510.02345)."""
from .config import TrilemmaMoEConfig

__version__ = "0.1.0"
__all__ = ["TrilemmaMoEConfig", "TrilemmaMoE", "ClusteredMoE"]


def __getattr__(name):
    # Lazy: importing deepspeed costs seconds, and the pure-torch core must work without it.
    if name == "TrilemmaMoE":
        from .integrations.deepspeed import TrilemmaMoE
        return TrilemmaMoE
    if name == "ClusteredMoE":
        from .core.layer import ClusteredMoE
        return ClusteredMoE
    raise AttributeError(f"module 'trilemma_moe' has no attribute {name!r}")
