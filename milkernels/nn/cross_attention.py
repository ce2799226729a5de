"""CMA-MIL's cross-magnification attention block on :func:`milkernels.ops.cross_attention`.

:class:`CrossAttention` is CMA-MIL's ``CrossAttention`` (rashikabagri/CMAMIL, ``Model/cma-mil.py``): the
instances ``x1`` of one magnification attend to the instances ``x2`` of another, with one head at the scale
``dim ** -0.5``, then the residual and a LayerNorm::

    out = norm(x1 + softmax(query(x1) key(x2)^T / sqrt(dim)) value(x2))

Same constructor, children (``query``, ``key``, ``value = Linear(dim, dim)``, ``softmax = Softmax(-1)``,
``norm = LayerNorm(dim)``), so the same ``state_dict`` keys, and the same ``forward(x1, x2)`` on one bag.
The op computes the softmax, the residual and the LayerNorm in one pass without forming the ``N_q x N_k``
matrix (``softmax`` is kept for the structure, not called; ``norm``'s parameters are read raw).

What differs: ``dropout=`` is accepted and ignored (CMA-MIL's model passes it, its ``CrossAttention`` takes
no such argument and has no dropout, so upstream's model fails to build); ``local=`` restricts each query
to the keys near it (a :class:`milkernels.ops.cross_attention.local.LocalNeighbourhood`), which upstream
does not have (it runs the op's PyTorch reference, O(N x neighbourhood): no block-sparse kernel yet). Bags without instances give upstream's results: ``N_q = 0`` an empty output, ``N_k = 0``
``norm(x1)``.

Shapes: ``N_q`` query instances, ``N_k`` key instances, ``dim`` features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.cross_attention import cross_attention
from .query_attention import share_state


class CrossAttentionLayers(nn.Module):
    """CMA-MIL's ``CrossAttention`` without a forward: its constructor and children, in its order.

    Args: dim: the features of both magnifications; dropout: accepted for CMA-MIL's model, which passes
    it, and ignored (the block has no dropout).
    """

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.norm = nn.LayerNorm(dim)


class CrossAttention(CrossAttentionLayers):
    """CMA-MIL's ``CrossAttention`` with its attention on :func:`milkernels.ops.cross_attention`
    (:class:`CrossAttentionLayers`' constructor and children)."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "CrossAttention":
        """One holding ``module``'s very children (so its parameters and ``state_dict`` keys), attributes and
        training flag. :func:`milkernels.swap` checks the structure and the behavior first."""
        return share_state(cls, module)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, local=None) -> torch.Tensor:
        """``x1: (N_q, dim)``, ``x2: (N_k, dim)`` -> ``(N_q, dim)``: ``norm(x1 + softmax(Q K^T / sqrt(dim)) V)``.

        ``local``: a ``LocalNeighbourhood`` of the ``N_q`` and ``N_k`` instances' coordinates; each query then
        attends only to the keys of its neighbourhood. ValueError for inputs that are not one bag ``(N, dim)``.
        """
        if x1.dim() != 2 or x2.dim() != 2:
            raise ValueError(f"x1 and x2 must be one bag each, (N, dim); got {tuple(x1.shape)} and {tuple(x2.shape)}")
        dim = self.query.in_features
        if x1.shape[1] != dim or x2.shape[1] != dim:
            raise ValueError(f"x1 and x2 must both have dim={dim} features, got {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)}")
        return cross_attention(x1, self.query(x1), self.key(x2), self.value(x2), self.norm.weight, self.norm.bias,
                               heads=1, softmax_scale=x1.shape[-1] ** -0.5, eps=self.norm.eps, local=local)
