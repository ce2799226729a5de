"""Backend selection: use_backend, MILKERNELS_BACKEND, auto, and the reasons a backend cannot run."""

import pytest
import torch

import milkernels
from milkernels import _backends
from milkernels.ops import gated_attention_pool


def small_case():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=generator)
    weights = [torch.randn(4, 8, generator=generator), None, torch.randn(4, 8, generator=generator), None,
               torch.randn(1, 4, generator=generator), None]
    return x, weights


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("MILKERNELS_BACKEND", raising=False)
    assert _backends.requested_backend() == "auto"
    with milkernels.use_backend("triton"):
        with milkernels.use_backend("reference"):
            assert _backends.requested_backend() == "reference"
        assert _backends.requested_backend() == "triton"
    assert _backends.requested_backend() == "auto"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("MILKERNELS_BACKEND", "Reference")
    assert _backends.requested_backend() == "reference"
    with milkernels.use_backend("triton"):
        assert _backends.requested_backend() == "triton"


def test_unknown_backend_name_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with milkernels.use_backend("fast"):
            pass
    monkeypatch.setenv("MILKERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        _backends.requested_backend()


def test_auto_runs_the_reference_on_cpu_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(_backends, "device_reasons", lambda name, device: calls.append(name) or [])
    assert _backends.choose("op", torch.device("cpu"), lambda name: ["never"]) == "reference"
    assert _backends.choose("op", torch.device("cuda"), lambda name: [] if name == "cuda" else ["no"]) == "cuda"
    assert _backends.choose("op", torch.device("cuda"), lambda name: []) == "triton"


def test_backends_report_names_every_backend_with_a_reason():
    report = milkernels.backends()
    assert set(report) == {"reference", "triton", "cuda"}
    assert report["reference"] == "available"
    assert report["triton"] == "available"  # conftest sets TRITON_INTERPRET=1
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in report["cuda"] or "cannot import" in report["cuda"]


def test_forcing_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    x, weights = small_case()
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="TRITON_INTERPRET"):
        gated_attention_pool(x, *weights)


def test_forced_triton_runs_on_cpu_under_the_interpreter():
    x, weights = small_case()
    with milkernels.use_backend("triton"):
        pooled, _ = gated_attention_pool(x, *weights)
    with milkernels.use_backend("reference"):
        expected, _ = gated_attention_pool(x, *weights)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
