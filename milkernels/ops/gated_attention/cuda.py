"""The cuda backend of gated attention: the fused scoring kernel of ``milkernels._C`` (forward only).

The kernel computes the raw scores ``s: (T, K)`` in float32 without writing anything of size
``T x D``; the bag softmax and the pooling reuse :mod:`.reference`. ``milkernels._C`` is imported
on first use, so this module imports without the extension.
"""

from __future__ import annotations

import importlib

import torch

from ..._backends import capability_reasons
from .._bags import Bags
from . import reference

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def not_supported_reasons(x2d, wa, ba, wb, bb, wc, bc) -> list[str]:
    """Reasons the kernel cannot run on rows ``x2d: (T, L)`` and these weights (empty when it can).

    ``wa, wb: (D, L)``, ``ba, bb: (D,)``, ``wc: (K, D)``, ``bc: (K,)``; any of ``ba, wb, bb, bc``
    may be None. The kernel takes any strides (:func:`scores` makes operands contiguous) and any
    T, D, K >= 1, but needs L >= 1 and tensor cores with bfloat16 and tf32 (compute capability
    8.0+). The extension, the device type and the dtypes are checked by the dispatcher.
    """
    reasons = []
    if x2d.shape[1] == 0:
        reasons.append("the cuda kernel needs at least one feature, got L = 0")
    return reasons + capability_reasons(x2d, "the cuda kernels")


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def scores(x2d, wa, ba, wb, bb, wc, bc) -> torch.Tensor:
    """Raw scores ``(T, K)`` in float32 of rows ``x2d: (T, L)``, on the current CUDA stream.

    ``wa, wb: (D, L)``, ``ba, bb: (D,)``, ``wc: (K, D)``, ``bc: (K,)``: CUDA tensors of one dtype
    (float32, float16 or bfloat16) on one device; ``wb = None`` is the ungated form and a bias may
    be None.
    """
    extension = importlib.import_module("milkernels._C")
    operands = [None if t is None else t.contiguous() for t in (x2d, wa, ba, wb, bb, wc, bc)]
    (rows, features), hidden, heads = x2d.shape, wa.shape[0], wc.shape[0]
    out = torch.empty(rows, heads, dtype=torch.float32, device=x2d.device)
    with torch.cuda.device(x2d.device):
        stream = torch.cuda.current_stream().cuda_stream
        extension.gated_scores(*map(_address, operands), out.data_ptr(), rows, features, hidden, heads,
                               DTYPE_CODES[x2d.dtype], stream)
    return out


def pool(bags: Bags, raw: torch.Tensor) -> torch.Tensor:
    """``(B, K, L)``: bag softmax of the float32 scores ``raw: (T, K)``, pooled over ``bags.x2d``."""
    x2d = bags.x2d
    if bags.num_bags == 1 and bags.row_valid is None:
        weights = torch.softmax(raw, dim=0).to(x2d.dtype)
        return (weights.t() @ x2d)[None]
    bag_index = bags.bag_index()
    weights = reference.segment_softmax(raw, bag_index, bags.num_bags, bags.row_valid).to(x2d.dtype)
    return reference.pool(x2d, weights, bag_index, bags.num_bags, bags.row_valid)
