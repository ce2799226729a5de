"""NSF: the triton kernels (interpreter on CPU) against the float64 reference, input checks, dispatch."""

import sys

import pytest
import torch

import milkernels
from milkernels import _backends
from milkernels.ops.nsf import nsf
from milkernels.ops.nsf import reference
from milkernels.ops.nsf import triton as kernels

import aot
import kernel_checks
from milkernels.bench.traffic import counting

pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def make_scores(shape, dtype, device, seed, scale=3.0):
    """Random scores ``shape`` with requires_grad; a wide spread, so sigmoid saturates in places."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype=dtype, device=device).requires_grad_()


def make_mask(shape, device, seed, keep=0.7):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < keep).to(device)


@pytest.mark.parametrize("n", [1, 2, 17, 4099])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)], ids=str)
def test_matches_reference(n, lead, device):
    scores = make_scores((*lead, n), torch.float32, device, seed=n)
    kernel_checks.compare(nsf, [scores, 0.7], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [17, 4099])
def test_dtypes_with_mask_and_a_fully_masked_row(dtype, n, device):
    scores = make_scores((4, n), dtype, device, seed=n + 1)
    mask = make_mask((4, n), device, seed=n)
    mask[2] = False
    kernel_checks.compare(nsf, [scores, 2.5], dtype, mask=mask)


@pytest.mark.parametrize("mask_shape", [(300,), (3, 1), (2, 3, 300)], ids=str)
def test_broadcast_and_float_masks(mask_shape, device):
    scores = make_scores((2, 3, 300), torch.float32, device, seed=5)
    mask = make_mask(mask_shape, device, seed=6).float() * 0.5  # nonzero = real
    kernel_checks.compare(nsf, [scores, 1.0], torch.float32, mask=mask)


def test_rows_split_into_chunks_and_chunks_into_several_tiles(device, monkeypatch):
    scores = make_scores((2, 9000), torch.float32, device, seed=7)
    assert kernels.Plan.make(2, 9000).chunks == 3
    kernel_checks.compare(nsf, [scores, 1.3], torch.float32)
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
    plan = kernels.Plan.make(2, 9000)
    assert (plan.chunks, plan.iters) == (1, 3)
    kernel_checks.compare(nsf, [scores, 1.3], torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_sum_to_just_under_one_and_masked_rows_are_zero(backend, device):
    scores = make_scores((5, 1000), torch.float32, device, seed=8).detach()
    mask = make_mask((5, 1000), device, seed=9)
    mask[3] = False
    with milkernels.use_backend(backend):
        p = nsf(scores, 0.5, mask=mask)
    sums = p.double().sum(-1)
    assert torch.all(p[~mask] == 0)
    assert sums[3] == 0
    others = sums[[0, 1, 2, 4]]
    assert torch.allclose(others, torch.ones_like(others), atol=1e-5)
    exact = reference.nsf(scores.double(), 0.5, mask).sum(-1)[[0, 1, 2, 4]]
    assert torch.all((exact < 1) & (exact > 1 - 1e-7))


def test_gradient_is_zero_on_masked_entries_and_fully_masked_rows(device):
    scores = make_scores((3, 50), torch.float32, device, seed=10)
    mask = make_mask((3, 50), device, seed=11)
    mask[1] = False
    with milkernels.use_backend("triton"):
        out = nsf(scores, 1.0, mask=mask)
    (grad,) = torch.autograd.grad((out * torch.randn(3, 50).to(device)).sum(), scores)
    assert torch.all(grad[~mask] == 0)
    assert torch.any(grad[mask] != 0)


def test_autocast_keeps_float32(device):
    scores = make_scores((4, 30), torch.float32, device, seed=12).detach()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = nsf(scores, 1.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, nsf(scores, 1.0))


BAD_INPUTS = [
    ("must be a torch.Tensor", ([[1.0, 2.0]],), {}),
    ("must be float32", (torch.ones(3, dtype=torch.int64),), {}),
    ("at least one dim", (torch.tensor(1.0),), {}),
    ("no empty dim", (torch.ones(3, 0),), {}),
    ("temperature must be finite and > 0", (torch.ones(3), 0.0), {}),
    ("temperature must be finite and > 0", (torch.ones(3), -1.0), {}),
    ("temperature must be finite and > 0", (torch.ones(3), float("inf")), {}),
    ("temperature must be finite and > 0", (torch.ones(3), float("nan")), {}),
    ("temperature must be a real number", (torch.ones(3), torch.tensor(1.0)), {}),
    ("mask must be a torch.Tensor", (torch.ones(2, 3),), dict(mask=[True, False, True])),
    ("does not broadcast", (torch.ones(2, 3),), dict(mask=torch.ones(4, dtype=torch.bool))),
    ("does not broadcast", (torch.ones(2, 3),), dict(mask=torch.ones(5, 2, 3, dtype=torch.bool))),
    ("one device", (torch.ones(2, 3),), dict(mask=torch.ones(2, 3, device="meta"))),
]


@pytest.mark.parametrize("message, args, kwargs", BAD_INPUTS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        nsf(*args, **kwargs)


def test_triton_rejects_float64_with_a_reason():
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="float64"):
        nsf(torch.ones(2, 3, dtype=torch.float64))


@pytest.fixture
def no_extension(monkeypatch):
    """``milkernels._C`` fails to import, as on a machine where it was never built."""
    monkeypatch.setitem(sys.modules, "milkernels._C", None)
    _backends._import_problem.cache_clear()
    yield
    _backends._import_problem.cache_clear()


def test_forced_cuda_without_the_extension_says_why(no_extension):
    with milkernels.use_backend("cuda"), pytest.raises(milkernels.BackendUnavailable) as raised:
        nsf(torch.ones(2, 3))
    assert "backend 'cuda' cannot run nsf" in str(raised.value)
    assert "cannot import milkernels._C" in str(raised.value)
    assert nsf(torch.zeros(2, 3)).allclose(torch.full((2, 3), 1 / 3))  # auto still runs the reference


def test_an_extension_built_before_these_ops_is_a_reason(monkeypatch):
    from types import ModuleType

    from milkernels.ops.nsf import cuda

    monkeypatch.setitem(sys.modules, "milkernels._C", ModuleType("milkernels._C"))
    reasons = cuda.not_supported_reasons(torch.ones(2, 3))
    assert len(reasons) == 1 and "nsf_forward, nsf_backward" in reasons[0], reasons


test_compiles_for_sm90 = aot.sm90_test(kernels)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, device):
    rows = make_scores((3, 20), torch.float32, device, seed=7)
    valid = make_mask((3, 20), device, seed=7) if masked else None
    torch.library.opcheck(torch.ops.milkernels.nsf_forward, (rows, valid, 1.5, "triton"))
    with torch.no_grad():
        _, row_sum = torch.ops.milkernels.nsf_forward(rows, valid, 1.5, "triton")
    grad = torch.randn(3, 20, device=device)
    torch.library.opcheck(torch.ops.milkernels.nsf_backward, (rows.detach(), valid, row_sum, grad, 1.5, "triton"))


def weighted_nsf(scores, mask):
    return (nsf(scores, 0.7, mask=mask) * torch.arange(scores.shape[-1], dtype=scores.dtype)).sum()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    scores = make_scores((2, 3, 20), torch.float32, "cpu", seed=8)
    kernel_checks.assert_compiles_without_graph_break(weighted_nsf, [scores, make_mask((3, 20), "cpu", seed=8)],
                                                      backend)


def test_double_backward_raises_on_triton():
    kernel_checks.assert_double_backward_raises(weighted_nsf, [make_scores((2, 20), torch.float32, "cpu", seed=9),
                                                               None], "nsf")


def test_double_backward_on_the_reference():
    scores = make_scores((2, 6), torch.float64, "cpu", seed=10, scale=1.0)
    mask = make_mask((2, 6), "cpu", seed=10)
    with milkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda s: nsf(s, 0.7, mask=mask), [scores])


TRAFFIC_BUDGET = 2.0  # requested bytes over the minimum (issue 12: memory-bound kernels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_traffic_within_budget(dtype):
    """ASMIL's anchor scores: 64 rows (8 tokens x 8 heads) over a bag of 4096. The forward reads s twice (row
    sums, then the output) and writes p: 1.50x its minimum (s read, p written once); the backward reads s
    and g twice and writes ds: 1.67x its minimum (s, g read, ds written once); bf16 and fp32 alike. No dot.
    The fp32 partials, one per (row, chunk), stop growing with N: at most TARGET_PROGRAMS / 64 chunks a row."""
    rows, n = 64, 4096
    scores = make_scores((rows, n), dtype, "cpu", seed=40)
    with milkernels.use_backend("triton"):
        with counting() as forward:
            p = nsf(scores, 0.5)
        with counting() as backward:
            p.backward(torch.randn_like(p))
    tensor_bytes = rows * n * dtype.itemsize
    assert forward.requested_bytes <= TRAFFIC_BUDGET * 2 * tensor_bytes
    assert backward.requested_bytes <= TRAFFIC_BUDGET * 3 * tensor_bytes
    assert forward.dot_flops == backward.dot_flops == 0
    assert kernels.Plan.make(rows, 10**6).chunks == kernels.Plan.make(rows, 10**8).chunks
