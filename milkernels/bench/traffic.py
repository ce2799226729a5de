"""Memory traffic and tensor-core work of Triton kernels, counted under the Triton interpreter (CPU); and
the benchmark's kernel traffic and recompute factors, measured with it.

    from milkernels.bench.traffic import counting
    with counting() as counts:
        run_some_triton_kernels()
    counts.load_bytes, counts.store_bytes, counts.requested_bytes, counts.dot_flops, counts.launches
    counts.by_kernel["_score_kernel"].requested_bytes  # the same, of one kernel's launches

Every kernel launched inside the block under the interpreter (``TRITON_INTERPRET=1`` set before triton is
imported, as ``tests/conftest.py`` does) adds to ``counts``:

- ``load_bytes`` and ``store_bytes``: the bytes that ``tl.load`` and ``tl.store`` request, one element per
  lane whose mask is true, at the pointer's element size in whole bytes (a bool pointer reaches the
  interpreter as an int8 one: 1 byte). An address read twice counts twice: this is the traffic the kernel
  asks of the memory system, not what DRAM serves. ``requested_bytes`` is their sum.
- ``dot_flops``: 2*M*N*K for each ``tl.dot`` of (M, K) x (K, N) tiles; 2*B*M*N*K for a batched
  (B, M, K) x (B, K, N) one.
- ``launches``: kernel launches, one per ``kernel[grid](...)`` however many programs the grid holds.
- ``by_kernel``: the same counts per kernel, by the jitted function's name.

How: for the length of the block, methods of the interpreter's classes are swapped for wrappers that count
and then call the method they replaced. ``InterpreterBuilder.create_masked_load`` and
``create_masked_store`` see every load and store exactly once: the unmasked ``create_load`` and
``create_store`` call them with an all-true mask, as do the atomic loads and stores, and the tensor
descriptor loads and stores call them with the descriptor's bounds as the mask. ``create_atomic_rmw`` (an
atomic add and the like) counts its lanes' bytes as read and as written: the read-modify-write the memory system
does, though the GPU sends the bytes only one way (a ``red``), so this is the upper figure. ``create_dot`` sees
the dots and ``GridExecutor.__call__`` the launches. Work the counter cannot size raises NotImplementedError
rather than going uncounted: ``create_atomic_cas`` (a compare-and-swap's traffic depends on the loop around it)
and ``create_dot_scaled`` (packed operands). Block pointers (``tl.make_block_ptr``) are gone from this Triton:
they raise by themselves.

Leaving the block puts back the methods it found, on an exception too. Blocks nest: each counts what runs
inside it, so an inner block's work also counts in the outer one.

:func:`kernel_factors` runs an op of the benchmark on the triton backend on the CPU and returns, per pass,
``kernel_traffic`` (the bytes its kernels request over the op's minimal bytes) and ``kernel_recompute``
(their dot FLOPs over the op's matmul FLOPs). Only Triton kernels are counted: GEMMs an op runs in PyTorch
(the gated attention backward's, the projections around an op) are in neither figure.
``python -m milkernels.bench.traffic OP N DIMS_JSON DTYPE`` prints them as JSON, with the interpreter on;
:func:`factors_in_subprocess` runs that, for a process whose Triton runs natively.
"""

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
import triton
from triton.runtime import interpreter

_BUILDER = interpreter.InterpreterBuilder
_REFUSED = ("create_atomic_cas", "create_dot_scaled")


@dataclasses.dataclass
class Counts:
    """What the kernels launched inside one :func:`counting` block did: bytes, dot FLOPs and launches."""

    load_bytes: int = 0
    store_bytes: int = 0
    dot_flops: int = 0
    launches: int = 0
    by_kernel: dict = dataclasses.field(default_factory=dict)
    running: list = dataclasses.field(default_factory=list)  # the Counts of the kernel running, if any

    def add(self, field: str, amount: int) -> None:
        """Add ``amount`` to ``field`` here and in the running kernel's counts."""
        for counts in (self, *self.running):
            setattr(counts, field, getattr(counts, field) + amount)

    @property
    def requested_bytes(self) -> int:
        """Bytes loaded plus bytes stored."""
        return self.load_bytes + self.store_bytes


def _lane_bytes(ptrs, mask) -> int:
    """Bytes behind the lanes of the pointer handle ``ptrs`` whose ``mask`` is true."""
    lanes = np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape))
    return int(lanes) * -(-ptrs.get_element_ty().primitive_bitwidth // 8)


def _count_loads(counts, load):
    """``create_masked_load`` that adds the bytes it loads to ``counts``, then calls ``load``."""

    def counted_load(self, ptrs, mask, *rest):  # rest: other, cache and volatile flags (Triton 3.6 has one more)
        counts.add("load_bytes", _lane_bytes(ptrs, mask))
        return load(self, ptrs, mask, *rest)

    return counted_load


def _count_stores(counts, store):
    """``create_masked_store`` that adds the bytes it stores to ``counts``, then calls ``store``."""

    def counted_store(self, ptrs, value, mask, *rest):
        counts.add("store_bytes", _lane_bytes(ptrs, mask))
        return store(self, ptrs, value, mask, *rest)

    return counted_store


def _count_atomic_adds(counts, rmw):
    """``create_atomic_rmw`` that adds the bytes it reads and writes (each lane whose mask is true, once each way) to
    ``counts``, then calls ``rmw``."""

    def counted_rmw(self, rmw_op, ptrs, value, mask, *rest):
        lane_bytes = _lane_bytes(ptrs, mask)
        counts.add("load_bytes", lane_bytes)
        counts.add("store_bytes", lane_bytes)
        return rmw(self, rmw_op, ptrs, value, mask, *rest)

    return counted_rmw


def _count_dots(counts, dot):
    """``create_dot`` that adds the FLOPs of (..., M, K) x (..., K, N) to ``counts``, then calls ``dot``."""

    def counted_dot(self, a, b, *rest):
        counts.add("dot_flops", 2 * math.prod(a.data.shape) * b.data.shape[-1])
        return dot(self, a, b, *rest)

    return counted_dot


def _count_launches(counts, launch):
    """``GridExecutor.__call__`` that counts one launch in ``counts`` and attributes what the launch does to its
    kernel, then calls ``launch``."""

    def counted_launch(self, *args, **kwargs):
        kernel = counts.by_kernel.setdefault(self.fn.__name__, Counts())
        counts.running[:] = [kernel]
        counts.add("launches", 1)
        try:
            return launch(self, *args, **kwargs)
        finally:
            counts.running.clear()

    return counted_launch


def _refusal(name):
    """A builder method that raises: ``name`` does work the counter cannot size."""

    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"traffic.counting cannot count {name}")

    return refuse


_COUNTERS = (
    (_BUILDER, "create_masked_load", _count_loads),
    (_BUILDER, "create_masked_store", _count_stores),
    (_BUILDER, "create_atomic_rmw", _count_atomic_adds),
    (_BUILDER, "create_dot", _count_dots),
    (interpreter.GridExecutor, "__call__", _count_launches),
)


@contextlib.contextmanager
def counting():
    """Count the bytes, dot FLOPs and launches of the Triton kernels run inside the block into a :class:`Counts`.

    Raises RuntimeError if the Triton interpreter is off (the kernels would run natively, uncounted).
    """
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("traffic.counting needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    counts = Counts()
    found = [(owner, name, vars(owner)[name]) for owner, name, _ in _COUNTERS]
    refused = [name for name in _REFUSED if name in vars(_BUILDER)]  # Triton 3.6's has no create_dot_scaled
    found += [(_BUILDER, name, vars(_BUILDER)[name]) for name in refused]
    try:
        for (owner, name, wrap), (_, _, method) in zip(_COUNTERS, found):
            setattr(owner, name, wrap(counts, method))
        for name in refused:
            setattr(_BUILDER, name, _refusal(name))
        yield counts
    finally:
        for owner, name, method in found:
            setattr(owner, name, method)


TRAFFIC_ROWS = 2048  # the bag size at which the factors are measured: the interpreter is slow


def kernel_factors(op_name: str, n: int, dims: dict, dtype: torch.dtype) -> dict:
    """``{pass: {"kernel_traffic": float, "kernel_recompute": float}}`` of the op's triton backend on a bag of
    ``n`` on the CPU, ``pass`` being ``fwd`` and ``fwd_bwd``; needs the interpreter on."""
    from . import registry
    from .sweep import forward_step, fwd_bwd_step, grad_outputs

    op = registry.ops()[op_name]
    inputs = op.build(n, dims, dtype, torch.device("cpu"))
    triton_call = registry.GENERIC_IMPLS["triton"](op)
    steps = dict(fwd=forward_step(triton_call, inputs), fwd_bwd=fwd_bwd_step(triton_call, inputs, grad_outputs(op, inputs)))
    factors = {}
    for pass_, step in steps.items():
        with counting() as counts:
            step()
        backward = pass_ == "fwd_bwd"
        factors[pass_] = dict(kernel_traffic=counts.requested_bytes / op.min_bytes(n, dims, dtype.itemsize, backward),
                              kernel_recompute=counts.dot_flops / op.flops(n, dims, backward))
    return factors


def factors_in_subprocess(op_name: str, n: int, dims: dict, dtype: torch.dtype, timeout: float = 900) -> dict:
    """:func:`kernel_factors` run in a fresh Python with the interpreter on. Raises RuntimeError with the
    child's last line of output if it fails."""
    command = [sys.executable, "-m", __name__, op_name, str(n), json.dumps(dims), str(dtype).removeprefix("torch.")]
    done = subprocess.run(command, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"counting {op_name}'s kernel traffic failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    name, rows, dims_json, dtype_name = sys.argv[1:]
    print(json.dumps(kernel_factors(name, int(rows), json.loads(dims_json), getattr(torch, dtype_name))))
