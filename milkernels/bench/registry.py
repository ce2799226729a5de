"""The ops the benchmark knows and the implementations it times.

An op registers an :class:`Op`: its public function, its plain-PyTorch reference, a case builder,
its FLOP and byte formulas and its default sizes. Every op is timed under the generic
implementations (``GENERIC_IMPLS``: the eager reference, the reference under ``torch.compile``,
the triton and cuda backends) and under its own ``peers`` (other libraries' versions of the same
op). An implementation maker takes the :class:`Op` and returns a function with the op's
signature; the function raises :class:`Skip` or :class:`milkernels.BackendUnavailable` when it
cannot run a case here (any other exception is a failure: an ``error`` row).

A new op adds a module that calls :func:`register` and names it in ``_BUILTIN``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._backends import use_backend

_BUILTIN = ("milkernels.bench.gated_attention", "milkernels.bench.linear_attention",
            "milkernels.bench.query_attention", "milkernels.bench.dilated_attention",
            "milkernels.bench.cross_attention")
_OPS: dict[str, "Op"] = {}


class Skip(RuntimeError):
    """An implementation cannot run this case; the message says why."""


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``call(*inputs)`` is the public op, returning a tensor or a tuple of tensors; ``reference`` the
    same computation in plain PyTorch without the dispatch, which ``torch.compile`` traces whole.
    ``build(n, dims, dtype, device)`` returns ``inputs`` for a bag of ``n`` instances, floating
    tensors with ``requires_grad``; ``dims`` holds the op's other sizes (e.g. ``{"L": 1024, ...}``).
    ``flops(n, dims, backward)`` is the matmul FLOP count of the forward (``backward=False``) or of
    forward plus backward; ``min_bytes(n, dims, itemsize, backward)`` the fewest bytes any
    implementation must move. ``gpu_dims`` and ``cpu_dims`` are the default ``dims`` on each device.
    ``peers`` maps a name to an implementation maker, like ``GENERIC_IMPLS``.
    """

    name: str
    call: Callable
    reference: Callable
    build: Callable
    flops: Callable
    min_bytes: Callable
    gpu_dims: dict
    cpu_dims: dict
    peers: dict = field(default_factory=dict)


def register(op: Op) -> Op:
    """Add ``op`` to the registry (replacing one of the same name) and return it."""
    _OPS[op.name] = op
    return op


def ops() -> dict[str, Op]:
    """Every registered op by name, the built-in ones imported first."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return dict(_OPS)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _under_backend(fn: Callable, backend: str) -> Callable:
    """``fn`` called with ``backend`` forced."""

    def run(*inputs):
        with use_backend(backend):
            return fn(*inputs)

    return run


def _compiled_reference(op: Op) -> Callable:
    """``op.reference`` under ``torch.compile``; a compile failure raises like any other failure (an ``error``).

    ``fullgraph=True``: a graph break is a failure, so the baseline is the compiler's best on the
    whole op. ``dynamic=True``: one graph serves every bag size, as in MIL training, where each
    slide has its own N (a static-shape compile would recompile per slide).
    """
    return torch.compile(op.reference, dynamic=True, fullgraph=True)


GENERIC_IMPLS: dict[str, Callable[[Op], Callable]] = {
    "reference": lambda op: _under_backend(op.call, "reference"),
    "reference_compiled": _compiled_reference,
    "triton": lambda op: _under_backend(op.call, "triton"),
    "cuda": lambda op: _under_backend(op.call, "cuda"),
}


def impls(op: Op) -> dict[str, Callable[[Op], Callable]]:
    """The implementation makers for ``op``: the generic ones, then its peers."""
    return {**GENERIC_IMPLS, **op.peers}
