"""The cuda backend of nsf and anchor_kl against the float64 reference (on a GPU), and the extension's
argument checks (no GPU needed, but an extension built with these ops)."""

import importlib.util

import pytest
import torch

import milkernels
from milkernels import _backends
from milkernels.ops.anchor_kl import anchor_kl
from milkernels.ops.anchor_kl import reference as anchor_kl_reference
from milkernels.ops.nsf import nsf
from milkernels.ops.nsf import reference

import kernel_checks

pytestmark = pytest.mark.usefixtures("poisoned_buffers")

CUDA_STATUS = milkernels.backends()["cuda"]
needs_gpu = pytest.mark.skipif(CUDA_STATUS != "available", reason=f"cuda backend unavailable: {CUDA_STATUS}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _extension_has_these_ops() -> bool:
    if importlib.util.find_spec("milkernels._C") is None:
        return False
    from milkernels import _C

    return hasattr(_C, "nsf_forward")


def make(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype=dtype, device="cuda").requires_grad_()


def make_mask(shape, seed, dead_row=None):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < 0.7
    if dead_row is not None:
        mask[dead_row] = False
    return mask.cuda()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 4099), (2, 100_003), (5000, 33)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_nsf_matches_reference(dtype, shape, masked):
    mask = make_mask(shape, seed=1, dead_row=0 if len(shape) == 2 and shape[0] > 1 else None) if masked else None
    kernel_checks.compare(nsf, [make(shape, dtype, seed=2), 0.6], dtype, backend="cuda", mask=mask)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 4099), (2, 100_003), (5000, 33)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("anchor_grad", [False, True])
def test_anchor_kl_matches_reference(dtype, shape, masked, anchor_grad):
    mask = make_mask(shape, seed=3, dead_row=0 if len(shape) == 2 and shape[0] > 1 else None) if masked else None
    online, anchor = make(shape, dtype, seed=4), make(shape, dtype, seed=5).detach().requires_grad_(anchor_grad)
    kernel_checks.compare(anchor_kl, [online, anchor, 1.7], dtype, backend="cuda", mask=mask)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_deterministic(backend):
    if backend == "triton" and _backends.triton_interpreted():
        pytest.skip("the triton kernels run natively only with MILKERNELS_TEST_GPU=1")
    online, anchor = make((4, 300_001), torch.float32, seed=6), make((4, 300_001), torch.float32, seed=7)

    def run():
        with milkernels.use_backend(backend):
            loss = anchor_kl(online, anchor, 0.5) + (nsf(online, 2.0) * anchor).sum()
        return (loss.detach(), *torch.autograd.grad(loss, (online, anchor)))

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_to_the_31_entries(backend):
    if backend == "triton" and _backends.triton_interpreted():
        pytest.skip("the triton kernels run natively only with MILKERNELS_TEST_GPU=1")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    n = 2**30 + 3
    scores = torch.randn(2, n, dtype=torch.bfloat16, device="cuda")
    with milkernels.use_backend(backend):
        out = nsf(scores, 1.0)
    want = reference.nsf(scores[1:].float(), 1.0, None)[0, -1000:]
    assert torch.allclose(out[1, -1000:].float(), want, rtol=2e-2, atol=0)
    del out, want
    with milkernels.use_backend(backend):
        loss = anchor_kl(scores, scores, 1.0)
    want = sum(anchor_kl_reference.anchor_kl(row, row, 1.0, None).float() for row in scores[:, None]) / 2
    assert torch.allclose(loss.float(), want, rtol=1e-3)


needs_extension = pytest.mark.skipif(not _extension_has_these_ops(), reason="milkernels._C is not built with nsf")


@needs_extension
@pytest.mark.parametrize("name, args, message", [
    ("nsf_forward", (0, 0, 0, 0, 0, 1, 8, 1, 1.0, 0, 0), "null pointer"),
    ("nsf_forward", (1, 0, 1, 1, 1, 1, 8, 9, 1.0, 0, 0), "chunks"),
    ("nsf_forward", (1, 0, 1, 1, 1, 0, 8, 1, 1.0, 0, 0), "rows and n"),
    ("nsf_backward", (1, 0, 1, 1, 1, 1, 1, 1, 8, 1, 0.0, 0, 0), "inv_temperature"),
    ("anchor_kl_forward", (1, 1, 0, 1, 1, 1, 1, 1, 1, 8, 1, 1.0, 7, 0), "dtype"),
    ("anchor_kl_backward", (1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 8, 1, 1.0, 0, 0), "null pointer"),
])
def test_extension_rejects_bad_arguments(name, args, message):
    from milkernels import _C

    with pytest.raises(RuntimeError, match=message):
        getattr(_C, name)(*args)
