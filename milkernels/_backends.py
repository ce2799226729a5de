"""Backend selection: which implementation of an op runs.

The backends are ``reference`` (plain PyTorch, the oracle and the CPU path), ``triton`` and
``cuda`` (the pybind11 extension ``milkernels._C``). A backend is forced with the
:func:`use_backend` context manager or the ``MILKERNELS_BACKEND`` environment variable; otherwise
``auto`` runs a GPU kernel for CUDA tensors and the reference for CPU tensors. Under
``TRITON_INTERPRET=1`` the ``triton`` backend also runs on CPU tensors (that is how CI tests it).

The choice is plain Python that ``torch.compile`` traces without a graph break: the forced backend is a
thread-local attribute (Dynamo guards on it, so changing it recompiles), and what the machine can run is
assumed constant for the process. ``MILKERNELS_BACKEND`` is read when a call is traced.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

import torch

BACKENDS = ("reference", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_forced = threading.local()  # .name: the innermost use_backend of this thread, or absent


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call; the message says why."""


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend (``auto``, ``reference``, ``triton`` or ``cuda``) inside a ``with`` block."""
    outer = getattr(_forced, "name", None)
    _forced.name = _check_name(name)
    try:
        yield
    finally:
        _forced.name = outer


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``MILKERNELS_BACKEND``, else ``auto``."""
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    return _check_name(os.environ.get("MILKERNELS_BACKEND", "auto").strip().lower() or "auto")


def triton_interpreted() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure makes the backend unavailable, with its reason
        return f"cannot import {module}: {exc}"
    return None


@torch.compiler.assume_constant_result
def triton_problem() -> str | None:
    """Why the triton backend cannot run on this machine, or None when it can."""
    problem = _import_problem("triton")
    if problem:
        return problem
    if not (torch.cuda.is_available() or triton_interpreted()):
        return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
    return None


@torch.compiler.assume_constant_result
def cuda_problem() -> str | None:
    """Why the cuda backend cannot run on this machine, or None when it can."""
    problem = _import_problem("milkernels._C")
    if problem:
        return problem + " (the extension is built by `pip install -e .` when nvcc is present)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def backends() -> dict[str, str]:
    """What each backend can do on this machine: ``{name: "available" or the reason it is not}``."""
    problems = {"reference": None, "triton": triton_problem(), "cuda": cuda_problem()}
    return {name: problem or "available" for name, problem in problems.items()}


def choose(op_name: str, device: torch.device, reasons_for) -> str:
    """Pick the backend that runs ``op_name`` on ``device``.

    ``reasons_for(backend)`` returns the list of reasons the op cannot run on that backend for
    this call (empty when it can). A forced backend with reasons raises
    :class:`BackendUnavailable`; ``auto`` takes the first GPU backend with none for CUDA tensors
    and the reference otherwise.
    """
    wanted = requested_backend()
    if wanted == "auto":
        if device.type == "cuda":
            for name in ("triton", "cuda"):
                if not reasons_for(name):
                    return name
        return "reference"
    reasons = reasons_for(wanted)
    if reasons:
        raise BackendUnavailable(f"backend {wanted!r} cannot run {op_name}: " + "; ".join(reasons))
    return wanted


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_reasons(backend: str, device: torch.device) -> list[str]:
    """Reasons, shared by every op, that ``backend`` cannot run on tensors on ``device``."""
    if backend == "reference":
        return []
    problem = triton_problem() if backend == "triton" else cuda_problem()
    if problem:
        return [problem]
    if device.type != "cuda" and not (backend == "triton" and triton_interpreted()):
        return [f"the {backend} backend needs CUDA tensors, got {device.type} tensors"]
    return []


def kernel_reasons(backend: str, tensor: torch.Tensor) -> list[str]:
    """Reasons, shared by every op, that a GPU ``backend`` cannot take ``tensor``: its device or dtype."""
    reasons = device_reasons(backend, tensor.device)
    if tensor.dtype not in KERNEL_DTYPES:
        reasons.append(f"the {backend} kernels take float32, float16 or bfloat16, not {tensor.dtype}")
    return reasons


MIN_CUDA_CAPABILITY = (8, 0)


def capability_reasons(tensor: torch.Tensor, what: str) -> list[str]:
    """Why ``what`` (the csrc kernels of an op) cannot run on ``tensor``'s GPU: one older than compute
    capability 8.0 (they need bfloat16 and tf32 tensor cores). Empty for a CPU tensor."""
    if not tensor.is_cuda:
        return []
    capability = torch.cuda.get_device_capability(tensor.device)
    if capability >= MIN_CUDA_CAPABILITY:
        return []
    name = torch.cuda.get_device_name(tensor.device)
    return [f"{what} need compute capability 8.0 or newer; {name} has {capability[0]}.{capability[1]}"]
