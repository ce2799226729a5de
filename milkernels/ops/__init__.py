"""The fused ops, one folder each: ``reference.py`` (the oracle), ``triton.py``, ``cuda.py`` and the dispatch.

The functions ``nsf``, ``anchor_kl`` and ``cross_attention`` share their names with their folders; import a
folder's modules with ``from milkernels.ops.nsf import reference``.
"""

from .anchor_kl import anchor_kl
from .cross_attention import cross_attention
from .dilated_attention import dilated_attention
from .gated_attention import gated_attention_pool, gated_attention_scores
from .linear_attention import (lin_mil_attention, lin_mil_projected_attention, linear_attention,
                               projected_linear_attention)
from .nsf import nsf
from .query_attention import folded_attention, query_attention

__all__ = ["anchor_kl", "cross_attention", "dilated_attention", "folded_attention", "gated_attention_pool",
           "gated_attention_scores", "lin_mil_attention", "lin_mil_projected_attention", "linear_attention", "nsf",
           "projected_linear_attention", "query_attention"]
