"""The cuda backend of gated attention against the reference.

The GPU tests run only where a CUDA GPU is visible and ``milkernels._C`` imports. A result passes
when its error against the float64 reference is at most twice the error of the reference run in
the same dtype (plus a small slack). The last tests need no GPU.
"""

import importlib.util

import pytest
import torch

import milkernels
from milkernels import _backends
from milkernels.ops import gated_attention_pool, gated_attention_scores

CUDA_PROBLEM = _backends.cuda_problem()
EXTENSION_BUILT = importlib.util.find_spec("milkernels._C") is not None
needs_gpu = pytest.mark.skipif(CUDA_PROBLEM is not None, reason=f"cuda backend unavailable: {CUDA_PROBLEM}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHAPES = [(37, 19), (200, 129)]  # (L, D): neither a power of two; 37 also defeats vector loads


def make_weights(features, hidden, heads, dtype, device, gated=True):
    """``dict(wa, ba, wb, bb, wc, bc)``: ``wa, wb: (D, L)``, ``ba, bb: (D,)``, ``wc: (K, D)``, ``bc: (K,)``."""
    weights = dict(wa=torch.randn(hidden, features) / features**0.5, ba=torch.randn(hidden) * 0.1,
                   wb=torch.randn(hidden, features) / features**0.5, bb=torch.randn(hidden) * 0.1,
                   wc=torch.randn(heads, hidden) / hidden**0.5, bc=torch.randn(heads) * 0.1)
    if not gated:
        weights.update(wb=None, bb=None)
    return {name: None if w is None else w.to(device, dtype) for name, w in weights.items()}


def run(backend, op, x, weights, dtype=None, **kwargs):
    """``op`` on the given backend, with ``x`` and the weights cast to ``dtype`` when given."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    with milkernels.use_backend(backend):
        return op(cast(x), **{name: cast(w) for name, w in weights.items()}, **kwargs)


def assert_close(got, oracle, truth, dtype):
    """``got`` errs against ``truth`` (float64) at most twice as much as ``oracle`` does, plus slack."""
    assert got.dtype == oracle.dtype and got.shape == oracle.shape
    error = (got.double() - truth).abs().max().item()
    oracle_error = (oracle.double() - truth).abs().max().item()
    assert error <= 2 * oracle_error + SLACK[dtype], f"error {error:.3g}, reference in {dtype}: {oracle_error:.3g}"


def check_against_reference(op, x, weights, dtype, **kwargs):
    """Run ``op`` on the cuda and reference backends and in float64; compare every output."""
    got = run("cuda", op, x, weights, **kwargs)
    oracle = run("reference", op, x, weights, **kwargs)
    truth = run("reference", op, x, weights, dtype=torch.float64, **kwargs)
    for outputs in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, oracle, truth))):
        assert_close(*outputs, dtype)


@needs_gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 17, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores(dtype, rows, shape, heads, gated):
    torch.manual_seed(rows)
    features, hidden = shape
    weights = make_weights(features, hidden, heads, dtype, "cuda", gated)
    x = torch.randn(rows, features, device="cuda", dtype=dtype)
    check_against_reference(gated_attention_scores, x, weights, dtype)


@needs_gpu
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("rows", [1, 2, 17, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_one_bag(dtype, rows, heads):
    torch.manual_seed(rows)
    weights = make_weights(200, 129, heads, dtype, "cuda")
    x = torch.randn(rows, 200, device="cuda", dtype=dtype)
    check_against_reference(gated_attention_pool, x, weights, dtype)


@needs_gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_packed_bags(dtype, gated):
    torch.manual_seed(0)
    lengths = torch.tensor([1, 17, 1000, 2, 4099, 64])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to("cuda")
    weights = make_weights(37, 19, 3, dtype, "cuda", gated)
    x = torch.randn(int(lengths.sum()), 37, device="cuda", dtype=dtype)
    check_against_reference(gated_attention_pool, x, weights, dtype, cu_seqlens=cu_seqlens)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_masked_bags_never_read_padding(dtype):
    torch.manual_seed(0)
    lengths = torch.tensor([17, 1, 300, 64])
    mask = (torch.arange(300)[None, :] < lengths[:, None]).to("cuda")
    weights = make_weights(200, 129, 3, dtype, "cuda")
    x = torch.randn(4, 300, 200, device="cuda", dtype=dtype).masked_fill(~mask[..., None], float("nan"))
    got = run("cuda", gated_attention_pool, x, weights, mask=mask)
    oracle = run("reference", gated_attention_pool, x, weights, mask=mask)
    truth = run("reference", gated_attention_pool, x, weights, dtype=torch.float64, mask=mask)
    assert_close(got[0], oracle[0], truth[0], dtype)
    assert_close(got[1][mask], oracle[1][mask], truth[1][mask], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_writes_every_score(dtype):
    """The raw kernel on a NaN-poisoned output, with more heads than one block holds (K = 20)."""
    from milkernels import _C
    from milkernels.ops.gated_attention import cuda

    torch.manual_seed(0)
    rows, features, hidden, heads = 4099, 37, 19, 20
    weights = make_weights(features, hidden, heads, dtype, "cuda")
    x = torch.randn(rows, features, device="cuda", dtype=dtype)
    out = torch.full((rows, heads), float("nan"), device="cuda")
    addresses = [0 if w is None else w.data_ptr() for w in (x, *weights.values())]
    _C.gated_scores(*addresses, out.data_ptr(), rows, features, hidden, heads,
                    cuda.DTYPE_CODES[dtype], torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    check_against_reference(gated_attention_scores, x, weights, dtype)
    torch.testing.assert_close(out.to(dtype), run("cuda", gated_attention_scores, x, weights), rtol=0, atol=0)


def test_forced_cuda_backend_on_cpu_tensors_says_why():
    weights = make_weights(6, 5, 2, torch.float32, "cpu")
    x = torch.randn(4, 6)
    for op in (gated_attention_pool, gated_attention_scores):
        with pytest.raises(milkernels.BackendUnavailable) as raised:
            run("cuda", op, x, weights)
        message = str(raised.value)
        assert "backend 'cuda' cannot run gated_attention" in message
        reasons = ("cannot import milkernels._C", "no CUDA GPU is visible", "needs CUDA tensors")
        assert any(reason in message for reason in reasons), message


@pytest.mark.skipif(not EXTENSION_BUILT, reason="milkernels._C is not built")
def test_extension_rejects_bad_arguments():
    from milkernels import _C

    with pytest.raises(RuntimeError, match="null pointer"):
        _C.gated_scores(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0)
    with pytest.raises(RuntimeError, match="dtype must be"):
        _C.gated_scores(16, 16, 0, 0, 0, 16, 0, 16, 1, 1, 1, 1, 7, 0)
    with pytest.raises(RuntimeError, match="without wb"):
        _C.gated_scores(16, 16, 0, 0, 16, 16, 0, 16, 1, 1, 1, 1, 0, 0)


@pytest.mark.skipif(not EXTENSION_BUILT or torch.cuda.is_available(), reason="needs milkernels._C and no GPU")
def test_extension_raises_launch_errors():
    from milkernels import _C

    with pytest.raises(RuntimeError):
        _C.gated_scores(16, 16, 0, 0, 0, 16, 0, 16, 1, 1, 1, 1, 0, 0)
