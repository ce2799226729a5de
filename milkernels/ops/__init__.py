"""The fused ops, one folder each: ``reference.py`` (the oracle), ``triton.py``, ``cuda.py`` and the dispatch."""

from .gated_attention import gated_attention_pool, gated_attention_scores
from .linear_attention import lin_mil_attention, linear_attention

__all__ = ["gated_attention_pool", "gated_attention_scores", "lin_mil_attention", "linear_attention"]
