"""The cuda backend of NSF (and the launch plumbing anchor_kl's cuda backend shares): ``milkernels._C``.

The kernels (``csrc/nsf.cu``) give each (row, chunk) of rows ``(R, N)`` one warp and combine the
per-chunk partials in a fixed order. ``milkernels._C`` is imported on first use, so this module
imports without the extension.
"""

from __future__ import annotations

import importlib

import torch

from ..._backends import capability_reasons
from .. import _blocks

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FUNCTIONS = ("nsf_forward", "nsf_backward", "anchor_kl_forward", "anchor_kl_backward")
TARGET_WARPS = 16384  # rows are split into chunks until about this many warps run
MIN_CHUNK = 1024  # entries per chunk, at least (unless the row is shorter)


def not_supported_reasons(tensor: torch.Tensor) -> list[str]:
    """Reasons the kernels cannot take ``tensor`` (empty when they can), beyond the dispatcher's device
    and dtype checks: an extension built before these ops, or a GPU older than compute capability 8.0."""
    extension = importlib.import_module("milkernels._C")
    reasons = []
    missing = [name for name in FUNCTIONS if not hasattr(extension, name)]
    if missing:
        reasons.append(f"milkernels._C has no {', '.join(missing)}: it predates these ops; rebuild it (`pip install -e .`)")
    return reasons + capability_reasons(tensor, "the cuda kernels")


def chunks_per_row(rows: int, n: int) -> int:
    """How many warps share a row of ``n`` entries: enough to fill the GPU, each with at least MIN_CHUNK entries."""
    return max(1, min(-(-TARGET_WARPS // rows), -(-n // MIN_CHUNK)))


def launch(name: str, rows_tensor: torch.Tensor, *args, inv_t: float) -> None:
    """Call ``milkernels._C.<name>`` for rows ``rows_tensor: (R, N)`` on the current CUDA stream.

    ``args`` are the kernel's tensors (passed as addresses; None is a null pointer). The sizes, chunks,
    temperature, dtype and stream follow them, as every function of ``csrc/nsf.h`` takes them.
    """
    rows, n = rows_tensor.shape
    chunks = chunks_per_row(rows, n)
    addresses = [0 if t is None else t.data_ptr() for t in args]
    with torch.cuda.device(rows_tensor.device):
        stream = torch.cuda.current_stream().cuda_stream
        getattr(importlib.import_module("milkernels._C"), name)(
            *addresses, rows, n, chunks, inv_t, DTYPE_CODES[rows_tensor.dtype], stream)


def workspace(scores: torch.Tensor, planes: int) -> torch.Tensor:
    """The fp32 partials buffer of a launch on rows ``scores: (R, N)``: ``planes`` planes of ``(R, chunks)``."""
    rows, n = scores.shape
    return _blocks.new_buffer(planes, rows, chunks_per_row(rows, n), dtype=torch.float32, device=scores.device)


def forward(scores: torch.Tensor, valid: torch.Tensor | None, inv_t: float):
    """NSF of contiguous rows ``scores: (R, N)``; ``valid: (R, N)`` bool or None.

    Returns ``(p: (R, N) in scores' dtype, row_sum: (R,) fp32)``, as :func:`..triton.forward`.
    """
    out = _blocks.new_buffer(*scores.shape, dtype=scores.dtype, device=scores.device)
    row_sum = _blocks.new_buffer(scores.shape[0], dtype=torch.float32, device=scores.device)
    launch("nsf_forward", scores, scores, valid, out, workspace(scores, 1), row_sum, inv_t=inv_t)
    return out, row_sum


def backward(scores, valid, row_sum, grad, inv_t: float) -> torch.Tensor:
    """``ds: (R, N)`` in scores' dtype from the output gradient ``grad: (R, N)`` (contiguous)."""
    ds = _blocks.new_buffer(*scores.shape, dtype=scores.dtype, device=scores.device)
    row_dot = _blocks.new_buffer(scores.shape[0], dtype=torch.float32, device=scores.device)
    launch("nsf_backward", scores, scores, valid, row_sum, grad, ds, workspace(scores, 1), row_dot, inv_t=inv_t)
    return ds
