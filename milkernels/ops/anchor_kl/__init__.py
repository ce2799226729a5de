"""anchor_kl, ASMIL's anchor loss: the online attention scores against the NSF of the anchor's.

``L = -(1/M) * sum over rows and n of NSF(anchor / T)[n] * log_softmax(online)[n]``, over the last
dim. The math is in :mod:`.reference`, the kernels in :mod:`.triton` and :mod:`.cuda`; the input
layer is :mod:`..nsf`'s.
"""

from __future__ import annotations

import torch

from .._bags import check_float, check_same_device
from .._bags import check_temperature, fp32_under_autocast
from ..nsf import as_rows, kernels_for
from . import reference

OP_NAME = "anchor_kl"


class _AnchorKLFn(torch.autograd.Function):
    """Fused forward and backward on the kernels of ``kernels`` (the triton or cuda module).

    ``count`` is M: a python int, or a 0-dim tensor (the mask's count, at least 1).
    """

    @staticmethod
    def forward(ctx, online, anchor, valid, count, inv_t, kernels):
        total, stats = kernels.forward(online, anchor, valid, inv_t)
        ctx.save_for_backward(online, anchor, valid, *stats)
        ctx.config = (count, inv_t, kernels)
        return (-total[0] / count).to(online.dtype)

    @staticmethod
    def backward(ctx, grad):
        online, anchor, valid, *stats = ctx.saved_tensors
        count, inv_t, kernels = ctx.config
        coef = (grad.float() / count).reshape(1)
        d_online, d_anchor = kernels.backward(online, anchor, valid, stats, coef, inv_t, *ctx.needs_input_grad[:2])
        return d_online, d_anchor, None, None, None, None


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
    kernels = kernels_for(__name__, online, OP_NAME)
    if kernels is None:
        return reference.anchor_kl(online, anchor, temperature, valid)
    count = online.numel() if valid is None else valid.sum().clamp_min(1)
    return _AnchorKLFn.apply(online, anchor, valid, count, 1.0 / temperature, kernels)
