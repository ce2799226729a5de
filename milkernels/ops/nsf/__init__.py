"""NSF, the normalized sigmoid of ASMIL, and the input layer that anchor_kl shares.

``nsf(s, T)[n] = sigmoid(s[n] / T) / (sum_m sigmoid(s[m] / T) + 1e-8)`` over the last dim. The math
is in :mod:`.reference`, the kernels in :mod:`.triton` and :mod:`.cuda`.
"""

from __future__ import annotations

import importlib

import torch

from ... import _backends
from .._bags import check_float, check_same_device, check_temperature, check_tensor, fp32_under_autocast
from . import reference

OP_NAME = "nsf"


def as_rows(name: str, scores, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check ``scores: (..., N)`` and ``mask`` (broadcastable to it, nonzero = real entry, or None).

    Returns contiguous rows ``(R, N)`` of ``scores`` and the bool mask ``(R, N)`` (or None); raises
    ValueError naming the problem.
    """
    check_float(name, scores)
    if scores.dim() == 0 or scores.numel() == 0:
        raise ValueError(f"{name} must have at least one dim and no empty dim, got shape {tuple(scores.shape)}")
    rows = scores.reshape(-1, scores.shape[-1]).contiguous()
    if mask is None:
        return rows, None
    check_tensor("mask", mask)
    check_same_device(**{name: scores, "mask": mask})
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != scores.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {name}'s shape {tuple(scores.shape)}")
    return rows, (mask != 0).expand(scores.shape).reshape(rows.shape).contiguous()


def kernels_for(package: str, rows: torch.Tensor, op_name: str):
    """The kernel module (``package``'s ``triton`` or ``cuda``) that runs on ``rows``, or None for the reference.

    Follows :func:`milkernels.use_backend`; a forced backend that cannot run raises BackendUnavailable.
    """
    backend = _backends.choose(op_name, rows.device, lambda name: _reasons(name, rows))
    return None if backend == "reference" else importlib.import_module(f"{package}.{backend}")


def _reasons(backend: str, rows: torch.Tensor) -> list[str]:
    if backend == "reference":
        return []
    reasons = _backends.kernel_reasons(backend, rows)
    if backend == "cuda" and not reasons:
        from . import cuda

        reasons = cuda.not_supported_reasons(rows)
    return reasons


class _NSFFn(torch.autograd.Function):
    """Fused forward and backward on the kernels of ``kernels`` (the triton or cuda module)."""

    @staticmethod
    def forward(ctx, rows, valid, inv_t, kernels):
        out, row_sum = kernels.forward(rows, valid, inv_t)
        ctx.save_for_backward(rows, valid, row_sum)
        ctx.config = (inv_t, kernels)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, valid, row_sum = ctx.saved_tensors
        inv_t, kernels = ctx.config
        return kernels.backward(rows, valid, row_sum, grad.contiguous(), inv_t), None, None, None


def nsf(scores, temperature=1.0, *, mask=None):
    """Normalized sigmoid over the last dim: ``sigmoid(s / T) / (sum of sigmoid(s / T) + 1e-8)``.

    Args:
        scores: ``(..., N)`` float32, float16 or bfloat16 (float64 on the reference backend); the
            leading dims are independent rows. Under ``torch.autocast``, half precision runs in float32.
        temperature: T, a finite number > 0.
        mask: optional, broadcastable to ``scores.shape``; nonzero or True marks a real entry. Masked
            entries get weight 0 and are left out of the sum; a row with no real entry is all zeros.

    Returns:
        ``(..., N)`` in scores' dtype (computed in float32 at least); each row sums to
        ``S / (S + 1e-8)``, just under one, where S is the row's sum of sigmoids.
    """
    (scores,) = fp32_under_autocast(scores)
    rows, valid = as_rows("scores", scores, mask)
    temperature = check_temperature(temperature)
    kernels = kernels_for(__name__, rows, OP_NAME)
    if kernels is None:
        out = reference.nsf(rows, temperature, valid)
    else:
        out = _NSFFn.apply(rows, valid, 1.0 / temperature, kernels)
    return out.reshape(scores.shape)
