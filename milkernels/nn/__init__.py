"""Drop-in modules on the fused kernels; :func:`milkernels.swap` puts them into existing models."""

from .anchor import AnchoredOutput, AnchoredQueryAttention, EMAAnchor
from .cross_attention import CrossAttention
from .dilated_attention import DilatedAttention, LinMILDilatedAttention
from .gated_attention import GatedAttention, GatedAttentionPool, TorchmilAttentionPool
from .linear_attention import FusedLinMIL, LinearAttention, SoftmaxAttention, fused_lin_mil_class
from .query_attention import MultiheadAttention, QueryAttention

__all__ = ["AnchoredOutput", "AnchoredQueryAttention", "CrossAttention", "DilatedAttention", "EMAAnchor",
           "FusedLinMIL", "GatedAttention", "GatedAttentionPool", "LinMILDilatedAttention", "LinearAttention",
           "MultiheadAttention", "QueryAttention", "SoftmaxAttention", "TorchmilAttentionPool", "fused_lin_mil_class"]
