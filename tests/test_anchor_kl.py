"""anchor_kl: the triton kernels (interpreter on CPU) against the float64 reference and a plain torch
composition, the closed-form gradient, masks, input checks and dispatch."""

import sys

import pytest
import torch

import milkernels
from milkernels import _backends
from milkernels.ops.anchor_kl import anchor_kl
from milkernels.ops.anchor_kl import triton as kernels

import aot
import kernel_checks
from milkernels.bench.traffic import counting

pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def make_pair(shape, dtype, device, seed, anchor_grad=True):
    """Random ``(online, anchor)`` scores of ``shape``; online requires grad, anchor when ``anchor_grad``."""
    generator = torch.Generator().manual_seed(seed)
    online = (torch.randn(shape, generator=generator) * 3).to(dtype=dtype, device=device).requires_grad_()
    anchor = (torch.randn(shape, generator=generator) * 3).to(dtype=dtype, device=device)
    return online, anchor.requires_grad_(anchor_grad)


def make_mask(shape, device, seed, keep=0.7):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < keep).to(device)


def plain_anchor_kl(online, anchor, temperature):
    """The unmasked loss as a plain torch composition: ``-(nsf(anchor / T) * log_softmax(online)).mean()``."""
    weights = torch.sigmoid(anchor / temperature)
    p_anchor = weights / (weights.sum(-1, keepdim=True) + 1e-8)
    return -(p_anchor * torch.log_softmax(online, -1)).mean()


def triton_loss_and_grads(online, anchor, temperature, **kwargs):
    with milkernels.use_backend("triton"):
        loss = anchor_kl(online, anchor, temperature, **kwargs)
    return loss, torch.autograd.grad(loss, kernel_checks.leaves([online, anchor]))


@pytest.mark.parametrize("n", [1, 2, 17, 4099])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)], ids=str)
def test_matches_reference(n, lead, device):
    online, anchor = make_pair((*lead, n), torch.float32, device, seed=n)
    kernel_checks.compare(anchor_kl, [online, anchor, 0.7], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [17, 4099])
def test_dtypes_with_mask_and_a_fully_masked_row(dtype, n, device):
    online, anchor = make_pair((4, n), dtype, device, seed=n + 1)
    mask = make_mask((4, n), device, seed=n)
    mask[1] = False
    kernel_checks.compare(anchor_kl, [online, anchor, 2.5], dtype, mask=mask)


@pytest.mark.parametrize("anchor_grad", [False, True])
def test_only_the_wanted_gradients(anchor_grad, device):
    online, anchor = make_pair((3, 40), torch.float32, device, seed=3, anchor_grad=anchor_grad)
    kernel_checks.compare(anchor_kl, [online.detach().requires_grad_(not anchor_grad), anchor, 1.0], torch.float32)


def test_rows_split_into_chunks_and_chunks_into_several_tiles(device, monkeypatch):
    online, anchor = make_pair((2, 9000), torch.float32, device, seed=4)
    mask = make_mask((2, 9000), device, seed=5)
    mask[0, 4096:] = False  # a chunk with no valid entry
    kernel_checks.compare(anchor_kl, [online, anchor, 1.3], torch.float32, mask=mask)
    monkeypatch.setattr(kernels.rows_kernels, "TARGET_PROGRAMS", 1)
    assert kernels.rows_kernels.Plan.make(2, 9000).iters == 3
    kernel_checks.compare(anchor_kl, [online, anchor, 1.3], torch.float32, mask=mask)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_matches_plain_torch_composition_and_closed_form(temperature, device):
    online, anchor = make_pair((3, 257), torch.float32, device, seed=6)
    loss, (d_online, d_anchor) = triton_loss_and_grads(online, anchor, temperature)
    online64, anchor64 = (t.detach().double().requires_grad_() for t in (online, anchor))
    want = plain_anchor_kl(online64, anchor64, temperature)
    want_online, want_anchor = torch.autograd.grad(want, (online64, anchor64))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(d_anchor.double(), want_anchor, rtol=1e-4, atol=1e-9)
    weights = torch.sigmoid(anchor64.detach() / temperature)
    p_anchor = weights / (weights.sum(-1, keepdim=True) + 1e-8)
    p_online = torch.softmax(online64.detach(), -1)
    closed_form = (p_online * p_anchor.sum(-1, keepdim=True) - p_anchor) / online.numel()
    assert torch.allclose(want_online, closed_form, atol=1e-12)
    assert torch.allclose(d_online.double(), closed_form, rtol=1e-4, atol=1e-9)


def test_masked_entries_and_rows_are_left_out(device):
    """Masking the last columns equals slicing them off; a fully masked row equals dropping the row."""
    online, anchor = make_pair((3, 60), torch.float32, device, seed=7)
    mask = torch.ones(3, 60, dtype=torch.bool, device=device)
    mask[:, 45:] = False
    mask[2] = False
    loss, grads = triton_loss_and_grads(online, anchor, 0.8, mask=mask)
    kept = [t.detach()[:2, :45].clone().requires_grad_() for t in (online, anchor)]
    want, want_grads = triton_loss_and_grads(*kept, 0.8)
    assert torch.allclose(loss, want, rtol=1e-6)
    for grad, want_grad in zip(grads, want_grads):
        assert torch.all(grad[~mask] == 0)
        assert torch.allclose(grad[:2, :45], want_grad, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_valid_entry_at_all_gives_zero(backend, device):
    online, anchor = make_pair((2, 10), torch.float32, device, seed=8)
    with milkernels.use_backend(backend):
        loss = anchor_kl(online, anchor, mask=torch.zeros(2, 10, dtype=torch.bool, device=device))
    grads = torch.autograd.grad(loss, (online, anchor))
    assert loss.item() == 0
    assert all(torch.all(g == 0) for g in grads)


def test_autocast_runs_half_precision_in_float32(device):
    online, anchor = (t.detach() for t in make_pair((3, 20), torch.float32, device, seed=9))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = anchor_kl(online.bfloat16(), anchor, 1.0)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, anchor_kl(online.bfloat16().float(), anchor, 1.0))


ONES = torch.ones(2, 3)
BAD_INPUTS = [
    ("online_scores must be a torch.Tensor", ([1.0, 2.0], ONES), {}),
    ("anchor_scores must be a torch.Tensor", (ONES, None), {}),
    ("anchor_scores must be float32", (ONES, torch.ones(2, 3, dtype=torch.int32)), {}),
    ("must have one shape", (ONES, torch.ones(3, 2)), {}),
    ("give them one dtype", (ONES, ONES.half()), {}),
    ("one device", (ONES, torch.ones(2, 3, device="meta")), {}),
    ("no empty dim", (torch.ones(2, 0), torch.ones(2, 0)), {}),
    ("at least one dim", (torch.tensor(1.0), torch.tensor(1.0)), {}),
    ("temperature must be finite and > 0", (ONES, ONES, 0), {}),
    ("temperature must be finite and > 0", (ONES, ONES, float("inf")), {}),
    ("temperature must be a real number", (ONES, ONES, "1"), {}),
    ("does not broadcast", (ONES, ONES), dict(mask=torch.ones(2, 2))),
    ("one device", (ONES, ONES), dict(mask=torch.ones(2, 3, device="meta"))),
]


@pytest.mark.parametrize("message, args, kwargs", BAD_INPUTS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        anchor_kl(*args, **kwargs)


def test_forced_cuda_without_the_extension_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "milkernels._C", None)
    _backends._import_problem.cache_clear()
    try:
        with milkernels.use_backend("cuda"), pytest.raises(milkernels.BackendUnavailable) as raised:
            anchor_kl(ONES, ONES)
    finally:
        _backends._import_problem.cache_clear()
    assert "backend 'cuda' cannot run anchor_kl" in str(raised.value)
    assert "cannot import milkernels._C" in str(raised.value)


test_compiles_for_sm90 = aot.sm90_test(kernels)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, device):
    online, anchor = make_pair((3, 20), torch.float32, device, seed=11)
    valid = make_mask((3, 20), device, seed=11) if masked else None
    torch.library.opcheck(torch.ops.milkernels.anchor_kl_forward, (online, anchor, valid, 1.5, "triton"))
    with torch.no_grad():
        _, *stats = torch.ops.milkernels.anchor_kl_forward(online, anchor, valid, 1.5, "triton")
    for wanted in ([True, True], [True, False]):
        torch.library.opcheck(torch.ops.milkernels.anchor_kl_backward,
                              (online.detach(), anchor.detach(), valid, *stats, torch.tensor(0.5, device=device), 1.5,
                               "triton", wanted))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    online, anchor = make_pair((2, 3, 20), torch.float32, "cpu", seed=12)
    kernel_checks.assert_compiles_without_graph_break(anchor_kl, [online, anchor, 0.7], backend,
                                                      mask=make_mask((3, 20), "cpu", seed=12))


def test_double_backward_raises_on_triton():
    online, anchor = make_pair((2, 20), torch.float32, "cpu", seed=13)
    kernel_checks.assert_double_backward_raises(anchor_kl, [online, anchor, 0.7], "anchor_kl")


def test_double_backward_on_the_reference():
    online, anchor = (t.detach().double().requires_grad_() for t in make_pair((2, 6), torch.float32, "cpu", seed=14))
    mask = make_mask((2, 6), "cpu", seed=14)
    with milkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda a, b: anchor_kl(a, b, 0.7, mask=mask), [online, anchor])


TRAFFIC_BUDGET = 2.0  # requested bytes over the minimum (issue 12: memory-bound kernels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_traffic_within_budget(dtype):
    """ASMIL's loss: 64 rows (8 tokens x 8 heads) over a bag of 4096, the anchor without grad. The forward
    reads online and anchor once (the row loss follows from the row sums of w and w * online): 1.003x (bf16)
    / 1.002x (fp32) its minimum (both read, the loss written once; 2.004x / 2.002x when a second pass read
    them again for the loss terms). The backward, one pass reading both and writing d_online: 1.00x its
    minimum. No dot. The fp32 partials per (row, chunk) stop growing with N."""
    rows, n = 64, 4096
    online, anchor = make_pair((rows, n), dtype, "cpu", seed=40, anchor_grad=False)
    with milkernels.use_backend("triton"):
        with counting() as forward:
            loss = anchor_kl(online, anchor, 0.5)
        with counting() as backward:
            loss.backward()
    tensor_bytes, scalar_bytes = rows * n * dtype.itemsize, dtype.itemsize
    assert forward.requested_bytes <= 1.1 * (2 * tensor_bytes + scalar_bytes)
    assert backward.requested_bytes <= TRAFFIC_BUDGET * (3 * tensor_bytes + scalar_bytes)
    assert forward.dot_flops == backward.dot_flops == 0
    plan = kernels.rows_kernels.Plan
    assert plan.make(rows, 10**6).chunks == plan.make(rows, 10**8).chunks
