"""Test set-up. TRITON_INTERPRET must be set before anything imports triton, so it comes first.

On a machine with a CUDA GPU (``benchmarks/gpu.sh``) the interpreter stays off and the kernels run
natively; set ``MILKERNELS_TEST_GPU=1`` there.
"""

import os

if os.environ.get("MILKERNELS_TEST_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    """Where kernel tests run: the GPU under MILKERNELS_TEST_GPU=1, else the CPU (interpreter)."""
    return torch.device("cuda" if os.environ.get("MILKERNELS_TEST_GPU") == "1" else "cpu")


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
