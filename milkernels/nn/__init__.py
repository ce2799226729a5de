"""Drop-in modules on the fused kernels; :func:`milkernels.swap` puts them into existing models."""

from .gated_attention import GatedAttention, GatedAttentionPool, TorchmilAttentionPool
from .linear_attention import FusedLinMIL, LinearAttention, SoftmaxAttention, fused_lin_mil_class

__all__ = ["FusedLinMIL", "GatedAttention", "GatedAttentionPool", "LinearAttention", "SoftmaxAttention",
           "TorchmilAttentionPool", "fused_lin_mil_class"]
