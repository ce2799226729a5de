"""Drop-in modules on the fused kernels; :func:`milkernels.swap` puts them into existing models."""

from .anchor import AnchoredOutput, AnchoredQueryAttention, EMAAnchor
from .gated_attention import GatedAttention, GatedAttentionPool, TorchmilAttentionPool
from .linear_attention import FusedLinMIL, LinearAttention, SoftmaxAttention, fused_lin_mil_class
from .query_attention import MultiheadAttention, QueryAttention

__all__ = ["AnchoredOutput", "AnchoredQueryAttention", "EMAAnchor", "FusedLinMIL", "GatedAttention",
           "GatedAttentionPool", "LinearAttention", "MultiheadAttention", "QueryAttention", "SoftmaxAttention",
           "TorchmilAttentionPool", "fused_lin_mil_class"]
