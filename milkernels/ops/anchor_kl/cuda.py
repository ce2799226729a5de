"""The cuda backend of anchor_kl: ``milkernels._C.anchor_kl_forward`` and ``anchor_kl_backward``.

Same contract as :mod:`.triton`; the launch plumbing is :mod:`..nsf.cuda`'s.
"""

from __future__ import annotations

import torch

from .. import _blocks
from ..nsf.cuda import launch, workspace


def forward(online: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor | None, inv_t: float):
    """``(total: (1,) fp32, (lse, row_anchor, row_loss))`` of contiguous rows ``online, anchor: (R, N)``;
    see :func:`.triton.forward`."""
    stats = _blocks.new_buffer(3, online.shape[0], dtype=torch.float32, device=online.device)
    total = _blocks.new_buffer(1, dtype=torch.float32, device=online.device)
    launch("anchor_kl_forward", online, online, anchor, valid, workspace(online, 4), *stats, total, inv_t=inv_t)
    return total, tuple(stats)


def backward(online, anchor, valid, stats, coef: torch.Tensor, inv_t: float, need_online: bool, need_anchor: bool):
    """``(d_online, d_anchor)``, each ``(R, N)`` in the input dtype or None; see :func:`.triton.backward`."""
    grads = tuple(_blocks.new_buffer(*online.shape, dtype=online.dtype, device=online.device) if need else None
                  for need in (need_online, need_anchor))
    launch("anchor_kl_backward", online, online, anchor, valid, *stats, coef, *grads, inv_t=inv_t)
    return grads
