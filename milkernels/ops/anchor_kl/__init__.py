"""anchor_kl, ASMIL's anchor loss: the online attention scores against the NSF of the anchor's.

``L = -(1/M) * sum over rows and n of NSF(anchor / T)[n] * log_softmax(online)[n]``, over the last
dim. The math is in :mod:`.reference`, the kernels in :mod:`.triton` and :mod:`.cuda`; the input
layer is :mod:`..nsf`'s.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _library
from .._bags import check_float, check_same_device
from .._bags import check_temperature, fp32_under_autocast
from ..nsf import as_rows, backend_for, kernel_module
from . import reference

OP_NAME = "anchor_kl"


def _count(online: Tensor, valid: Optional[Tensor]):
    """M: the number of valid entries (at least 1), or all of ``online``'s without a mask."""
    return online.numel() if valid is None else valid.sum().clamp_min(1)


@_library.custom_op("anchor_kl_forward")
def _forward_op(online: Tensor, anchor: Tensor, valid: Optional[Tensor], inv_t: float,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss of contiguous rows ``online, anchor: (R, N)`` (``valid: (R, N)`` bool or None) on ``backend``'s
    kernels: a 0-dim tensor in online's dtype, then the statistics ``lse, row_anchor, row_loss: (R,)`` float32
    that the backward takes back."""
    total, stats = kernel_module(__name__, backend).forward(online, anchor, valid, inv_t)
    loss = (-total[0] / _count(online, valid)).to(online.dtype)
    return loss, *_library.owned(stats, online)


@_forward_op.register_fake
def _(online, anchor, valid, inv_t, backend):
    stats = [online.new_empty(online.shape[0], dtype=torch.float32) for _ in range(3)]
    return online.new_empty(()), *stats


@_library.custom_op("anchor_kl_backward")
def _backward_op(online: Tensor, anchor: Tensor, valid: Optional[Tensor], lse: Tensor, row_anchor: Tensor,
                 row_loss: Tensor, grad: Tensor, inv_t: float, backend: str, wanted: list[bool]) -> list[Tensor]:
    """``(d_online, d_anchor)``, each ``(R, N)`` in online's dtype, empty where ``wanted`` is False; ``grad`` is
    the loss's 0-dim gradient."""
    coef = (grad.float() / _count(online, valid)).reshape(1)
    grads = kernel_module(__name__, backend).backward(online, anchor, valid, (lse, row_anchor, row_loss), coef,
                                                          inv_t, *wanted)
    return _library.owned(grads, online)


@_backward_op.register_fake
def _(online, anchor, valid, lse, row_anchor, row_loss, grad, inv_t, backend, wanted):
    return [online.new_empty(online.shape) if want else _library.absent(online) for want in wanted]


def _setup_context(ctx, inputs, output):
    online, anchor, valid, inv_t, backend = inputs
    _, *stats = output
    ctx.save_for_backward(online, anchor, valid, *stats)
    ctx.options = (inv_t, backend)
    ctx.mark_non_differentiable(*stats)


def _backward(ctx, grad, *d_stats):
    online, anchor, valid, *stats = ctx.saved_tensors
    inv_t, backend = ctx.options
    wanted = [bool(need) for need in ctx.needs_input_grad[:2]]
    grads = _backward_op(online, anchor, valid, *stats, grad, inv_t, backend, wanted)
    return (*(g if want else None for g, want in zip(grads, wanted)), None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_library.forbid_double_backward(_backward_op, OP_NAME)
_library.no_matmul_flops("anchor_kl_forward", "anchor_kl_backward")


def _check(online, anchor):
    check_float("online_scores", online)
    check_float("anchor_scores", anchor)
    check_same_device(online_scores=online, anchor_scores=anchor)
    if online.shape != anchor.shape:
        raise ValueError(f"online_scores {tuple(online.shape)} and anchor_scores {tuple(anchor.shape)} must have one shape")
    if online.dtype != anchor.dtype:
        raise ValueError(f"online_scores is {online.dtype} but anchor_scores is {anchor.dtype}: give them one dtype")


def anchor_kl(online_scores, anchor_scores, temperature=1.0, *, mask=None):
    """ASMIL's anchor loss: ``-(1/M) * sum NSF(anchor / T) * log_softmax(online)`` over the last dim.

    Args:
        online_scores: ``(..., N)`` raw attention scores, float32, float16 or bfloat16 (float64 on the
            reference backend); the leading dims are independent rows.
        anchor_scores: ``(..., N)``, the same shape, dtype and device; usually without grad, but its
            gradient (through NSF) is computed when it requires one.
        temperature: T of the anchor's NSF, a finite number > 0.
        mask: optional, broadcastable to the scores' shape; nonzero or True marks a real entry. Masked
            entries are left out of the NSF, the log-softmax, the sum and M; a row with no real entry
            contributes nothing.

    Returns:
        A 0-dim tensor in online_scores' dtype, computed in float32 at least. M is the number of real
        entries (all ``online_scores.numel()`` without a mask); with no real entry at all the loss is 0.
        Under ``torch.autocast`` half-precision inputs run in float32, as autocast runs log_softmax.
    """
    online_scores, anchor_scores = fp32_under_autocast(online_scores, anchor_scores)
    _check(online_scores, anchor_scores)
    online, valid = as_rows("online_scores", online_scores, mask)
    anchor = anchor_scores.reshape(online.shape).contiguous()
    temperature = check_temperature(temperature)
    backend = backend_for(online, OP_NAME)
    if backend == "reference":
        return reference.anchor_kl(online, anchor, temperature, valid)
    loss, *_ = _forward_op(online, anchor, valid, 1.0 / temperature, backend)
    return loss
