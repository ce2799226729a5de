"""Drop-in modules on the fused kernels; :func:`milkernels.swap` puts them into existing models."""

from .gated_attention import GatedAttention, GatedAttentionPool, TorchmilAttentionPool

__all__ = ["GatedAttention", "GatedAttentionPool", "TorchmilAttentionPool"]
