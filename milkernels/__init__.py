"""milkernels: fused Triton and CUDA kernels for the attention layers of multiple-instance learning.

Public API: the ops under :mod:`milkernels.ops`, the drop-in modules under :mod:`milkernels.nn`,
:func:`swap` for model surgery, and backend control with :func:`use_backend` and :func:`backends`.
"""

from ._backends import BackendUnavailable, backends, use_backend
from . import nn, ops
from .swap import SwapReport, swap, swap_report

__all__ = ["BackendUnavailable", "backends", "nn", "ops", "swap", "swap_report", "SwapReport", "use_backend"]
__version__ = "0.1.0"
