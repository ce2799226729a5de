"""Bags without instances: the fused ops refuse them (``ValueError: empty bag``), the modules do not.

A module given such a bag computes what the layer it replaces returns, with plain torch ops: the
empty reductions give zero sums (a pooled bag of zeros) and NaN means, and every parameter stays in
the autograd graph (its gradient is zero), as upstream.
"""

from __future__ import annotations

import math

import torch


def no_instances(x: torch.Tensor) -> bool:
    """Whether ``x: (..., N, features)`` holds no instance at all: N = 0 or a batch dim of 0 (a shape
    check, so ``torch.compile`` friendly)."""
    return math.prod(x.shape[:-1]) == 0


def softmax_pool(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``pooled[k] = sum_n softmax_n(scores[:, k]) x[n]`` in plain torch: ``scores: (..., N, K)``, ``x: (..., N, L)``
    -> ``(..., K, L)``; zeros for N = 0."""
    return torch.softmax(scores.transpose(-1, -2), dim=-1) @ x
