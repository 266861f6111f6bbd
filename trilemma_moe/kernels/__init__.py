"""GPU kernels of the clustered-expert layer and their plain-torch twins (see ``fused``)."""
from .fused import fused_expert_forward, ops_for, triton_available

__all__ = ["fused_expert_forward", "ops_for", "triton_available"]
