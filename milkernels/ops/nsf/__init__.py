"""NSF, the normalized sigmoid of ASMIL, and the input layer that anchor_kl shares.

``nsf(s, T)[n] = sigmoid(s[n] / T) / (sum_m sigmoid(s[m] / T) + 1e-8)`` over the last dim. The math
is in :mod:`.reference`, the kernels in :mod:`.triton` and :mod:`.cuda`.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from ... import _backends
from .. import _library
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


def backend_for(rows: torch.Tensor, op_name: str) -> str:
    """The backend (``"reference"``, ``"triton"`` or ``"cuda"``) that runs ``op_name`` on ``rows``.

    Follows :func:`milkernels.use_backend`; a forced backend that cannot run raises BackendUnavailable.
    """
    return _backends.choose(op_name, rows.device, lambda name: _reasons(name, rows))


def kernel_module(package: str, backend: str):
    """``package``'s kernel module for ``backend`` (``"triton"`` or ``"cuda"``), imported inside the ops."""
    return importlib.import_module(f"{package}.{backend}")


def _reasons(backend: str, rows: torch.Tensor) -> list[str]:
    if backend == "reference":
        return []
    reasons = _backends.kernel_reasons(backend, rows)
    if backend == "cuda" and not reasons:
        from . import cuda

        reasons = cuda.not_supported_reasons(rows)
    return reasons


@_library.custom_op("nsf_forward")
def _forward_op(rows: Tensor, valid: Optional[Tensor], inv_t: float, backend: str) -> tuple[Tensor, Tensor]:
    """NSF of contiguous ``rows: (R, N)`` on ``backend``'s kernels (``valid: (R, N)`` bool or None).

    Returns ``p: (R, N)`` in rows' dtype and the row sums of the sigmoids ``row_sum: (R,)`` float32.
    """
    return kernel_module(__name__, backend).forward(rows, valid, inv_t)


@_forward_op.register_fake
def _(rows, valid, inv_t, backend):
    return rows.new_empty(rows.shape), rows.new_empty(rows.shape[0], dtype=torch.float32)


@_library.custom_op("nsf_backward")
def _backward_op(rows: Tensor, valid: Optional[Tensor], row_sum: Tensor, grad: Tensor, inv_t: float,
                 backend: str) -> Tensor:
    """``d_rows: (R, N)`` in rows' dtype from the output gradient ``grad: (R, N)``."""
    return kernel_module(__name__, backend).backward(rows, valid, row_sum, grad.contiguous(), inv_t)


@_backward_op.register_fake
def _(rows, valid, row_sum, grad, inv_t, backend):
    return rows.new_empty(rows.shape)


def _setup_context(ctx, inputs, output):
    rows, valid, inv_t, backend = inputs
    _, row_sum = output
    ctx.save_for_backward(rows, valid, row_sum)
    ctx.options = (inv_t, backend)
    ctx.mark_non_differentiable(row_sum)


def _backward(ctx, grad, d_row_sum):
    rows, valid, row_sum = ctx.saved_tensors
    inv_t, backend = ctx.options
    return _backward_op(rows, valid, row_sum, grad, inv_t, backend), None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_library.forbid_double_backward(_backward_op, OP_NAME)
_library.no_matmul_flops("nsf_forward", "nsf_backward")


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
    backend = backend_for(rows, OP_NAME)
    if backend == "reference":
        out = reference.nsf(rows, temperature, valid)
    else:
        out, _ = _forward_op(rows, valid, 1.0 / temperature, backend)
    return out.reshape(scores.shape)
