"""pytest-benchmark set-up shared by the ``test_<op>.py`` files: one test per registered op, run for
every implementation, bag size and pass, on the sweep's case builders and steps.

On a CPU only the eager reference is timed, on one thread, at small bags in float32; on a CUDA GPU
the reference, triton and cuda backends, at larger bags in bfloat16, each call synchronized
(pytest-benchmark times wall clock). An implementation that cannot run here
(``BackendUnavailable``, ``registry.Skip``, a module that does not import) is skipped with the
reason; any other exception fails the test. ``benchmark.extra_info`` holds the dtype, the op's sizes,
its FLOPs and minimal bytes for the pass and, for ``fwd_bwd``, the bytes one autograd forward call
saves for backward (inputs excluded), so they are stored (``--benchmark-autosave``) beside the
timings of each commit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from milkernels import BackendUnavailable
from milkernels.bench import registry
from milkernels.bench.saved import saved_bytes
from milkernels.bench.sweep import PASSES, dims_text, forward_step, fwd_bwd_step, grad_outputs, op_dims

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMPLS = ("reference", "triton", "cuda") if ON_GPU else ("reference",)
SIZES = (4096, 65536, 262144) if ON_GPU else (1024, 4096, 16384)
ROUNDS, WARMUP_ROUNDS = (20, 2) if ON_GPU else (10, 1)

if not ON_GPU:
    torch.set_num_threads(1)  # CPU timings that do not swing with what else the machine runs


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    """The implementation timed: a key of ``registry.impls(op)``."""
    return request.param


@pytest.fixture(params=SIZES, ids=lambda n: f"N={n}")
def n(request) -> int:
    """The bag size N."""
    return request.param


@pytest.fixture(params=PASSES)
def pass_(request) -> str:
    """``fwd`` (inference, under ``torch.no_grad``) or ``fwd_bwd`` (autograd, then backward)."""
    return request.param


@pytest.fixture
def time_op(benchmark, impl, n, pass_):
    """``time_op(op_name)`` times the registered op under this test's implementation, bag size and pass."""
    return lambda op_name: time_case(benchmark, registry.ops()[op_name], impl, n, pass_)


def time_case(benchmark, op: registry.Op, impl: str, n: int, pass_: str) -> None:
    """Build the case, record its counts in ``benchmark.extra_info`` and time ``ROUNDS`` calls of the step."""
    dims = op_dims(op, DEVICE, {})
    inputs = op.build(n, dims, DTYPE, DEVICE)
    backward = pass_ == "fwd_bwd"
    benchmark.group = f"{op.name} {pass_}"
    benchmark.extra_info.update(dtype=str(DTYPE).removeprefix("torch."), dims=dims_text(dims),
                                flops=op.flops(n, dims, backward),
                                min_bytes=op.min_bytes(n, dims, DTYPE.itemsize, backward))
    with skipped_if_unavailable(impl):
        fn = registry.impls(op)[impl](op)
        if backward:
            benchmark.extra_info["saved_bytes"] = saved_bytes(fn, *inputs)
        step = synchronized(fwd_bwd_step(fn, inputs, grad_outputs(op, inputs)) if backward
                            else forward_step(fn, inputs))
        step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


@contextlib.contextmanager
def skipped_if_unavailable(impl: str):
    """Turn an implementation's "cannot run here" into a skip with the reason; other errors pass through."""
    try:
        yield
    except (registry.Skip, BackendUnavailable, ImportError) as exc:
        pytest.skip(f"{impl}: {type(exc).__name__}: {registry.first_line(exc)}")


def synchronized(step):
    """``step``, followed on a GPU by a synchronize, so that wall-clock time covers the kernels it queued."""
    if DEVICE.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize(DEVICE)

    return run
