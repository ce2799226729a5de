"""Linear attention with its ``qkv`` projection inside the op: the triton path (interpreter on CPU) against the
float64 reference (the projection, then :func:`linear_attention`), for outputs and the gradients of x, the
weight, the bias and the temperature; what it keeps for the backward; the custom ops' contracts."""

import pytest
import torch
import torch.nn.functional as F

import milkernels
from milkernels.bench.saved import saved_bytes
from milkernels.ops import linear_attention, projected_linear_attention

import kernel_checks

pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def make_inputs(x_shape, channels, heads, dtype=torch.float32, bias=True, seed=0):
    """``[x: x_shape, weight: (3C, L), bias: (3C,) or None, temperature: (H,)]``, fresh and requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    features = x_shape[-1]
    shapes = [x_shape, (3 * channels, features), (3 * channels,) if bias else None, (heads,)]
    scales = [1.0, features ** -0.5, 0.1, 0.5]
    tensors = [(torch.randn(*shape, generator=generator) * scale).to(dtype) if shape else None
               for shape, scale in zip(shapes, scales)]
    tensors[3] = tensors[3].abs() + 0.5
    return [t.requires_grad_() if t is not None else None for t in tensors]


def attend(x, weight, bias, temperature, heads, **kwargs):
    """``(out, map)`` of the projected op."""
    return projected_linear_attention(x, weight, bias, heads, temperature=temperature, return_map=True, **kwargs)


@pytest.mark.parametrize("x_shape, channels, heads, kwargs", [
    pytest.param((1, 20), 8, 2, {}, id="one-row"),
    pytest.param((300, 37), 24, 3, dict(denominator="clamp", activation="gelu"), id="one-bag-clamp-gelu"),
    pytest.param((2, 70, 19), 40, 4, dict(mask=torch.arange(70) < torch.tensor([[70], [33]])), id="padded-mask"),
    pytest.param((91, 16), 16, 1, dict(cu_seqlens=torch.tensor([0, 1, 50, 91]), activation="elu"), id="packed"),
])
def test_matches_the_reference(x_shape, channels, heads, kwargs):
    inputs = make_inputs(x_shape, channels, heads, seed=sum(x_shape))
    kernel_checks.compare(attend, inputs, torch.float32, heads=heads, **kwargs)


def test_without_bias_or_temperature():
    x, weight, _, _ = make_inputs((45, 12), 12, 2, bias=False, seed=1)
    kernel_checks.compare(attend, [x, weight, None, None], torch.float32, heads=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    inputs = make_inputs((2, 60, 32), 32, 4, dtype=dtype, seed=2)
    kernel_checks.compare(attend, inputs, dtype, heads=4, denominator="clamp")


def test_equals_the_unfused_op_on_triton():
    """The same kernels run on ``qkv``: the fused and the unfused op agree to rounding."""
    x, weight, bias, temperature = make_inputs((2, 50, 24), 16, 2, seed=3)
    with milkernels.use_backend("triton"):
        fused = kernel_checks.outputs_and_grads(attend, [x, weight, bias, temperature], heads=2)
        unfused = kernel_checks.outputs_and_grads(
            lambda *t, heads: linear_attention(F.linear(*t[:3]), heads, temperature=t[3], return_map=True),
            [x, weight, bias, temperature], heads=2)
    for got, want in zip(fused[0] + fused[1], unfused[0] + unfused[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_keeps_no_projection_output():
    """Beyond x and the parameters, the op keeps the per-bag state ``(B, H, dh + 1, dh)`` float32 alone; the
    unfused op keeps ``qkv`` (T x 3C) as well."""
    inputs = make_inputs((2, 500, 32), 64, 4, seed=4)
    with milkernels.use_backend("triton"):
        fused = saved_bytes(lambda *t: attend(*t, heads=4), *inputs)
        unfused = saved_bytes(lambda x, w, b, t: linear_attention(F.linear(x, w, b), 4, temperature=t,
                                                                  return_map=True), *inputs)
    assert fused == 2 * 4 * (16 + 1) * 16 * 4
    assert unfused >= 2 * 500 * 3 * 64 * 4 + fused


def bad_input_cases():
    x, weight = torch.randn(10, 8), torch.randn(24, 8)
    yield r"x must be \(N, L\)", (torch.randn(1, 2, 10, 8), weight, None, 2), {}
    yield r"weight must be \(3C, L\)", (x, torch.randn(24, 9), None, 2), {}
    yield r"bias must be \(24,\)", (x, weight, torch.randn(23), 2), {}
    yield "one dtype", (x, weight.double(), None, 2), {}
    yield "divisible", (x, weight, None, 3), {}
    yield "float32, float16", (x.long(), weight, None, 2), {}


@pytest.mark.parametrize("message,args,kwargs", list(bad_input_cases()))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        projected_linear_attention(*args, **kwargs)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, device):
    inputs = make_inputs((23, 10), 16, 2, seed=5)
    x, weight, bias, temperature = (t.detach().to(device).requires_grad_() for t in inputs)
    row_valid = (torch.rand(23, generator=torch.Generator().manual_seed(5)) > 0.3).to(device) if masked else None
    options = [[0, 9, 23], row_valid, 2, "gelu", "clamp", 100.0, 1e-6]
    forward_args = [x, weight, bias if masked else None, temperature if masked else None, *options, True, None]
    torch.library.opcheck(torch.ops.milkernels.linear_attention_projected_forward, forward_args)
    with torch.no_grad():
        out, attention_map, state = torch.ops.milkernels.linear_attention_projected_forward(*forward_args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in forward_args[:-2]]
    for cotangents in ([out, attention_map], [out, None], [None, attention_map]):
        grads = [torch.randn_like(t) if t is not None else None for t in cotangents]
        torch.library.opcheck(torch.ops.milkernels.linear_attention_projected_backward,
                              [*detached, state, *grads, None])


def projected_loss(x, weight, bias, temperature, mask):
    out, attention_map = attend(x, weight, bias, temperature, 2, mask=mask, denominator="clamp")
    return out.square().sum() + attention_map.sum()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    inputs = make_inputs((2, 30, 12), 16, 2, seed=6)
    mask = torch.arange(30) < torch.tensor([[30], [19]])
    kernel_checks.assert_compiles_without_graph_break(projected_loss, [*inputs, mask], backend)


def test_double_backward_raises_on_triton():
    inputs = make_inputs((20, 8), 16, 2, seed=7)
    kernel_checks.assert_double_backward_raises(attend, inputs, "linear_attention", heads=2)
