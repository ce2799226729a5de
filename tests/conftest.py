"""Test set-up. TRITON_INTERPRET must be set before anything imports triton, so it comes first.

On a machine with a CUDA GPU (``benchmarks/gpu.sh``) the interpreter stays off and the kernels run
natively; set ``MILKERNELS_TEST_GPU=1`` there.
"""

import os

ON_GPU = os.environ.get("MILKERNELS_TEST_GPU") == "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import sharding  # noqa: E402
from milkernels import _backends  # noqa: E402


# What a CPU test meets on the GPU machine (MILKERNELS_TEST_GPU=1, no interpreter): it cannot run there, so it is
# reported as skipped with the reason, not as a failure (benchmarks/gpu.sh's first run listed 257 such failures).
CANNOT_RUN_WITHOUT_THE_INTERPRETER = ("the triton backend needs CUDA tensors, got cpu tensors",
                                      "traffic.counting needs the Triton interpreter")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under MILKERNELS_TEST_GPU=1, a test that failed with one of :data:`CANNOT_RUN_WITHOUT_THE_INTERPRETER`
    (a CPU test forcing the triton backend, a traffic count) is reported as skipped."""
    outcome = yield
    report = outcome.get_result()
    if not ON_GPU or call.excinfo is None or report.when != "call":
        return
    message = str(call.excinfo.value)
    reason = next((text for text in CANNOT_RUN_WITHOUT_THE_INTERPRETER if text in message), None)
    if reason is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: on the GPU machine: {reason}")


@pytest.fixture
def flat_heads(monkeypatch):
    """Cross-attention's products as one 2-D product a head at every head count and dtype (under Triton before
    3.9 they are at up to 1 head in fp32 and 2 in fp16 / bf16: ``FLAT_HEADS_FP32``, ``FLAT_HEADS_HALF``), under
    the interpreter only: compiled kernels keep the value they were built with, and Triton raises when it
    changes."""
    if not _backends.triton_interpreted():
        pytest.skip("forcing FLAT_HEADS_* needs the interpreter; on a GPU the Triton version sets them")
    import triton

    from milkernels.ops.cross_attention import triton as kernels
    for name in ("FLAT_HEADS_FP32", "FLAT_HEADS_HALF"):
        monkeypatch.setattr(kernels, name, triton.language.constexpr(kernels.MAX_HEADS))


@pytest.fixture
def device():
    """Where kernel tests run: the GPU under MILKERNELS_TEST_GPU=1, else the CPU (interpreter)."""
    return sharding.device()


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the Triton kernels allocate starts as NaN, so an entry they fail to write shows up."""
    from milkernels.ops import _blocks

    def poisoned(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_blocks, "new_buffer", poisoned)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test (warn only, for torch's own CPU ops)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def pytest_configure(config):
    config.addinivalue_line("markers", "aot: ahead-of-time sm_90 compiles of the shipped Triton specializations "
                                       "(tests/aot.py; about 30 min on 2 cores; deselect with -m 'not aot')")
