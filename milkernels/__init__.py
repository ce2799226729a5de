"""milkernels: fused Triton and CUDA kernels for the attention layers of multiple-instance learning.

Public API: the ops under :mod:`milkernels.ops`, the drop-in modules under :mod:`milkernels.nn`,
:func:`swap` for model surgery, :func:`profile` for a model on a bag layer by layer (as given against
swapped), the model zoo under :mod:`milkernels.zoo`, sequence parallelism under :mod:`milkernels.distributed`,
and backend control with :func:`use_backend` and :func:`backends`.
"""

from ._backends import BackendUnavailable, backends, use_backend
from . import distributed, nn, ops
from .swap import SwapReport, swap, swap_report
from .bench.profile import profile

__all__ = ["BackendUnavailable", "backends", "distributed", "nn", "ops", "profile", "swap", "swap_report", "SwapReport", "use_backend"]
__version__ = "0.1.0"
