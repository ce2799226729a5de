"""NSF (normalized sigmoid) in plain PyTorch: the oracle for the kernels and the CPU path.

For rows ``s: (R, N)``, a temperature T and an optional validity mask ``valid: (R, N)`` bool:

    w[r, n] = sigmoid(s[r, n] / T) * valid[r, n]
    p[r, n] = w[r, n] / (sum_m w[r, m] + EPS)

A row with no valid entry is all zeros. Half-precision input is computed in float32.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float64 for float64 input, else float32."""
    return torch.promote_types(dtype, torch.float32)


def nsf(scores: torch.Tensor, temperature: float, valid: torch.Tensor | None) -> torch.Tensor:
    """``p: (R, N)`` in the dtype of ``scores: (R, N)``; ``valid: (R, N)`` bool or None (all valid)."""
    weights = torch.sigmoid(scores.to(compute_dtype(scores.dtype)) / temperature)
    if valid is not None:
        weights = weights * valid
    return (weights / (weights.sum(-1, keepdim=True) + EPS)).to(scores.dtype)
