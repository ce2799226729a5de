"""anchor_kl in plain PyTorch: the oracle for the kernels and the CPU path.

For rows ``online, anchor: (R, N)``, a temperature T and an optional mask ``valid: (R, N)`` bool:

    L = -(1 / M) * sum over valid (r, n) of NSF(anchor / T)[r, n] * log_softmax(online[r])[n]

where the log-softmax runs over the valid entries of the row and M counts the valid entries (at
least 1, so that no valid entry at all gives L = 0). Half-precision input is computed in float32.
"""

from __future__ import annotations

import torch

from ..nsf import reference as nsf_reference


def masked_log_softmax(online: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax`` of ``online: (R, N)`` over each row's valid entries; 0 on masked entries."""
    if valid is None:
        return torch.log_softmax(online, dim=-1)
    has_valid = valid.any(-1, keepdim=True)
    filled = online.masked_fill(~valid, float("-inf")).masked_fill(~has_valid, 0.0)
    return torch.log_softmax(filled, dim=-1).masked_fill(~valid, 0.0)


def anchor_kl(online: torch.Tensor, anchor: torch.Tensor, temperature: float, valid: torch.Tensor | None):
    """The loss as a 0-dim tensor in ``online``'s dtype; ``online, anchor, valid`` as in the module doc."""
    compute = nsf_reference.compute_dtype(online.dtype)
    p_anchor = nsf_reference.nsf(anchor.to(compute), temperature, valid)
    total = (p_anchor * masked_log_softmax(online.to(compute), valid)).sum()
    count = online.numel() if valid is None else valid.sum().clamp_min(1)
    return (-total / count).to(online.dtype)
