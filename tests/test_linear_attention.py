"""Linear attention: the triton kernels (interpreter on CPU) against the float64 reference."""

import gc
import weakref

import pytest
import torch

import milkernels
from milkernels.ops import lin_mil_attention, linear_attention, projected_linear_attention
from milkernels.ops.linear_attention import triton as kernels

import aot
import kernel_checks
from milkernels.bench.traffic import counting

pytestmark = pytest.mark.usefixtures("poisoned_buffers")
ACTIVATIONS = ["relu", "gelu", "elu", "leaky_relu", "tanh", "softplus"]


def make_qkv(shape, heads, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    """Fresh random ``qkv`` of ``shape`` and a per-head temperature, both requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(*shape, generator=generator) * scale).to(dtype=dtype, device=device).requires_grad_()
    temperature = (torch.rand(heads, generator=generator) + 0.5).to(dtype=dtype, device=device).requires_grad_()
    return qkv, temperature


def all_outputs(qkv, temperature, heads, **kwargs):
    return linear_attention(qkv, heads, temperature=temperature, return_numerator=True, return_map=True, **kwargs)


@pytest.mark.parametrize("rows", [1, 2, 17, 1000, 4099])
def test_lin_mil_form_matches_reference(rows, device):
    qkv, temperature = make_qkv((1, rows, 3 * 40), 4, device=device, scale=2.0, seed=rows)
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=4, denominator="clamp")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation, device):
    qkv, temperature = make_qkv((2, 90, 3 * 48), 4, device=device, scale=1.5, seed=1)
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=4, activation=activation,
                          denominator="clamp")


def test_clamp_reached_on_some_rows_and_not_others(device):
    qkv, temperature = make_qkv((1, 300, 3 * 24), 2, device=device, scale=1.0, seed=2)
    with torch.no_grad(), milkernels.use_backend("reference"):
        q = torch.relu(qkv[..., :24]).reshape(300, 2, 12)
        q_dot_z = (q * torch.relu(qkv[..., 24:48]).reshape(300, 2, 12).sum(0)).sum(-1)
    assert (q_dot_z < 100).any() and (q_dot_z > 100).any()
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=2, denominator="clamp")


def test_standard_normalized_form_without_temperature(device):
    qkv, _ = make_qkv((2, 70, 3 * 33), 3, device=device, seed=3)
    kernel_checks.compare(all_outputs, [qkv, None], torch.float32, heads=3, denominator="eps", eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, device):
    qkv, temperature = make_qkv((1, 200, 3 * 64), 4, dtype=dtype, device=device, seed=4)
    kernel_checks.compare(all_outputs, [qkv, temperature], dtype, heads=4, denominator="clamp")


def test_key_padding_mask(device):
    qkv, temperature = make_qkv((3, 80, 3 * 40), 4, device=device, seed=5)
    mask = torch.rand(3, 80, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[2, 5:] = False
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=4, mask=mask.to(device),
                          denominator="clamp")


@pytest.mark.parametrize("denominator, floor", [("eps", dict(eps=0.0)), ("clamp", dict(clamp_min=0.0))])
def test_masked_rows_are_zero_at_a_zero_denominator_floor(denominator, floor, device):
    """With eps = 0 (or clamp_min = 0) a masked row's numerator and denominator are both 0: its output is 0, as
    the reference's, not 0 / 0."""
    qkv, temperature = make_qkv((2, 50, 3 * 32), 2, device=device, seed=15)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 30:] = False
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=2, mask=mask.to(device),
                          denominator=denominator, **floor)


def test_packed_bags_equal_separate_calls(device):
    qkv, temperature = make_qkv((217, 3 * 40), 4, device=device, seed=6)
    cu_seqlens = torch.tensor([0, 1, 66, 200, 217], device=device)
    with milkernels.use_backend("triton"):
        packed = all_outputs(qkv, temperature, 4, cu_seqlens=cu_seqlens)
        bounds = cu_seqlens.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out, numerator, attention_map = all_outputs(qkv[start:stop], temperature, 4)
            torch.testing.assert_close(packed[0][start:stop], out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(packed[1][start:stop], numerator.transpose(0, 1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(packed[2][start:stop], attention_map, rtol=1e-5, atol=1e-6)
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=4, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("target_programs", [4, 9])
def test_splits_of_many_blocks_match_reference(target_programs, device, monkeypatch):
    """Few programs, so each split loops over several 64-row blocks (its last one short): packed bags of
    awkward lengths (one shorter than a block), and padded bags with a mask; every output and
    gradient."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", target_programs)
    monkeypatch.setattr(kernels, "MIN_SPLIT_BLOCKS", 1)
    assert kernels.split_rows(700, 4) == 64 * -(-700 // (64 * -(-target_programs // 4))) > 64
    qkv, temperature = make_qkv((700, 3 * 40), 4, device=device, seed=7)
    cu_seqlens = torch.tensor([0, 30, 451, 700], device=device)
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=4, cu_seqlens=cu_seqlens,
                          denominator="clamp")
    qkv, temperature = make_qkv((2, 333, 3 * 40), 4, device=device, seed=8)
    mask = torch.rand(2, 333, generator=torch.Generator().manual_seed(8)) > 0.2
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=4, mask=mask.to(device),
                          denominator="clamp")


def test_partials_do_not_grow_with_the_bag():
    """The number of splits (and so of fp32 partials) is about TARGET_PROGRAMS / H whatever N: at 1M rows as at
    100k, with one more per bag at most."""
    for rows in (100_000, 1_000_000):
        for heads in (1, 8):
            splits = -(-rows // kernels.split_rows(rows, heads))
            assert splits <= -(-kernels.TARGET_PROGRAMS // heads)


TRAFFIC_BUDGET = 2.0  # requested bytes over the minimum (issue 12: memory-bound kernels)
RECOMPUTE_BUDGET = 1.3  # dot FLOPs over the useful ones


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_traffic_within_budget(dtype):
    """One bag of 2048 rows, C = 256 in 4 heads of 64: the forward reads qkv and writes out, the backward
    also reads dO and writes d_qkv, each within 2x of those bytes (bf16 1.20 / 1.15, fp32 1.10 / 1.07 at
    4096 x 512 in 8 heads); dot FLOPs: S and q S forward (exactly), the backward's four products and the
    numerator's recompute (1.25x)."""
    rows, channels, heads = 2048, 256, 4
    qkv, _ = make_qkv((rows, 3 * channels), heads, dtype=dtype, seed=9)
    with milkernels.use_backend("triton"):
        with counting() as forward:
            out = linear_attention(qkv, heads, denominator="clamp")
        with counting() as backward:
            out.backward(torch.randn_like(out))
    row_bytes = channels * dtype.itemsize
    product_flops = 2 * rows * channels * (channels // heads)  # one (N x dh) x (dh x dh) product, all heads
    assert forward.requested_bytes <= TRAFFIC_BUDGET * rows * 4 * row_bytes
    assert backward.requested_bytes <= TRAFFIC_BUDGET * rows * 7 * row_bytes
    assert forward.dot_flops == 2 * product_flops
    assert backward.dot_flops == 5 * product_flops <= RECOMPUTE_BUDGET * 4 * product_flops


def test_map_only_never_forms_the_numerator(device, monkeypatch):
    qkv, temperature = make_qkv((1, 100, 3 * 40), 4, device=device, seed=7)
    allocated = []
    original = kernels._blocks.new_buffer
    monkeypatch.setattr(kernels._blocks, "new_buffer", lambda *shape, **kw: allocated.append(shape) or original(*shape, **kw))
    with milkernels.use_backend("triton"):
        out, attention_map = lin_mil_attention(qkv, temperature.reshape(4, 1, 1), 4, return_map=True)
    assert (100, 4, 10) not in allocated and attention_map.shape == (1, 100)
    kernel_checks.compare(lambda q, t: lin_mil_attention(q, t.reshape(4, 1, 1), 4, return_map=True),
                          [qkv, temperature], torch.float32)


def test_non_contiguous_qkv_and_gradient_on_one_input_only(device):
    wide, temperature = make_qkv((2, 50, 3 * 40 + 7), 4, device=device, seed=10)
    qkv = wide[..., 3:3 + 3 * 40]
    assert not qkv.is_contiguous()
    kernel_checks.compare(all_outputs, [qkv, temperature.detach()], torch.float32, heads=4, denominator="clamp")
    kernel_checks.compare(all_outputs, [qkv.detach(), temperature], torch.float32, heads=4, denominator="clamp")


@pytest.mark.parametrize("heads,head_dim", [(1, 24), (6, 1)])
def test_one_head_and_head_size_one(heads, head_dim, device):
    qkv, temperature = make_qkv((1, 70, 3 * heads * head_dim), heads, device=device, seed=11)
    kernel_checks.compare(all_outputs, [qkv, temperature], torch.float32, heads=heads, denominator="eps")


def test_graph_does_not_keep_the_input_alive(device):
    qkv, temperature = make_qkv((1, 40, 3 * 16), 2, device=device, seed=12)
    source = qkv.detach().clone().requires_grad_()
    view = source * 1.0
    with milkernels.use_backend("triton"):
        out, attention_map = linear_attention(view, 2, temperature=temperature, return_map=True)
    out.sum().backward()  # the map still holds the op's node, as Lin-MIL's returned attention map does
    alive = weakref.ref(view)
    del view
    gc.collect()
    assert alive() is None, "the op's autograd context still holds qkv after backward"
    assert attention_map.grad_fn is not None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_casts_qkv_and_temperature(backend, device):
    qkv, temperature = make_qkv((1, 60, 3 * 40), 4, device=device, seed=13)
    with milkernels.use_backend(backend), torch.autocast(device.type, dtype=torch.bfloat16):
        out = linear_attention(qkv, 4, temperature=temperature, denominator="clamp")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32 and temperature.grad.dtype == torch.float32
    with milkernels.use_backend("reference"):
        expected = linear_attention(qkv.detach().bfloat16(), 4, temperature=temperature.detach().bfloat16(),
                                    denominator="clamp")
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


def test_lin_mil_output_shapes_follow_lin_mil(device):
    qkv, temperature = make_qkv((2, 30, 3 * 40), 4, device=device, seed=8)
    with milkernels.use_backend("triton"):
        out, numerator, attention_map = all_outputs(qkv, temperature, 4)
    assert out.shape == (2, 30, 40) and numerator.shape == (2, 4, 30, 10) and attention_map.shape == (2, 30)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_in_a_real_instance_gives_nan_and_a_masked_one_is_ignored(backend, device):
    qkv, temperature = make_qkv((2, 40, 3 * 16), 2, device=device, seed=9)
    qkv = qkv.detach().clone()
    qkv[0, 5, 20] = float("nan")  # a key of bag 0
    with milkernels.use_backend(backend):
        out = linear_attention(qkv, 2, temperature=temperature.detach())
        assert out[0].isnan().any() and not out[1].isnan().any()
        mask = torch.ones(2, 40, dtype=torch.bool, device=device)
        mask[0, 5] = False
        assert not linear_attention(qkv, 2, temperature=temperature.detach(), mask=mask).isnan().any()


def bad_input_cases():
    qkv = torch.randn(2, 10, 3 * 8)
    yield "rank", (torch.randn(2, 2, 10, 24), 2), {}
    yield "divisible by num_heads=5", (qkv, 5), {}
    yield "float32, float16", (qkv.long(), 2), {}
    yield "num_heads must be a positive int", (qkv, 0), {}
    yield "activation must be one of", (qkv, 2), {"activation": "swish"}
    yield "denominator must be", (qkv, 2), {"denominator": "none"}
    yield r"one value or one per head \(2\)", (qkv, 2), {"temperature": torch.ones(3)}
    yield "one dtype", (qkv, 2), {"temperature": torch.ones(2, dtype=torch.float64)}
    yield "one device", (qkv, 2), {"temperature": torch.ones(2, device="meta")}
    yield "empty bag", (torch.randn(2, 0, 24), 2), {}
    yield "empty bag", (torch.randn(10, 24), 2), {"cu_seqlens": torch.tensor([0, 4, 4, 10])}
    yield "mask must have shape", (qkv, 2), {"mask": torch.ones(2, 9)}


@pytest.mark.parametrize("message,args,kwargs", list(bad_input_cases()))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        linear_attention(*args, **kwargs)


@pytest.mark.parametrize("projected", [False, True], ids=["core", "projected"])
def test_heads_of_more_than_64_features_are_refused_by_the_kernels(projected):
    """C = 256 in 2 heads of 128: the triton backend says why it cannot (a program holds a head's (dh x dh) state;
    in bf16 the backward at dh 256 would ask for 320 KiB of shared memory on sm_90); the reference runs it."""
    qkv, temperature = make_qkv((1, 10, 3 * 256), 2)
    weight = torch.randn(3 * 256, 32)
    call = ((lambda: projected_linear_attention(torch.randn(1, 10, 32), weight, None, 2)) if projected
            else (lambda: linear_attention(qkv, 2, temperature=temperature)))
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="dh=128"):
        call()
    with milkernels.use_backend("reference"):
        assert call().shape == (1, 10, 256)


def test_cuda_backend_says_there_is_no_cuda_kernel():
    qkv, temperature = make_qkv((1, 10, 24), 2)
    with milkernels.use_backend("cuda"), pytest.raises(milkernels.BackendUnavailable, match="linear attention"):
        linear_attention(qkv, 2)


test_compiles_for_sm90 = aot.sm90_test(kernels)


TEMPERATURE_FORMS = {"float": lambda h: 0.8, "0-d": lambda h: torch.tensor(0.8), "one value": lambda h: torch.tensor([0.8]),
                     "(H,)": lambda h: h, "(H, 1, 1)": lambda h: h.reshape(-1, 1, 1)}


@pytest.mark.parametrize("form", TEMPERATURE_FORMS)
def test_temperature_forms(form):
    """A number, a 0-d tensor, one value, (H,) and Lin-MIL's (H, 1, 1) mean what they say; each tensor form
    gets its gradient in its own shape."""
    qkv, per_head = make_qkv((2, 30, 3 * 16), 4, seed=13)
    temperature = TEMPERATURE_FORMS[form](per_head.detach())
    full = per_head.detach() if form.startswith("(H") else torch.full((4,), 0.8)
    with milkernels.use_backend("reference"):
        expected = linear_attention(qkv.detach(), 4, temperature=full)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.clone().requires_grad_()
    for backend in ("reference", "triton"):
        with milkernels.use_backend(backend):
            out = linear_attention(qkv, 4, temperature=temperature)
        torch.testing.assert_close(out, expected)
        if isinstance(temperature, torch.Tensor):
            grad, = torch.autograd.grad(out.sum(), temperature)
            assert grad.shape == temperature.shape


def test_temperature_bool_is_refused():
    qkv, _ = make_qkv((1, 10, 24), 2)
    with pytest.raises(ValueError, match="temperature"):
        linear_attention(qkv, 2, temperature=True)


def op_inputs(masked: bool, with_temperature: bool, device):
    """Arguments of ``milkernels::linear_attention_forward``: two bags of 9 and 14 rows, C = 32, H = 2."""
    generator = torch.Generator().manual_seed(14)
    qkv2d = torch.randn(23, 96, generator=generator).to(device).requires_grad_()
    temperature = (torch.rand(2, generator=generator) + 0.5).to(device).requires_grad_() if with_temperature else None
    row_valid = (torch.rand(23, generator=generator) > 0.3).to(device) if masked else None
    return [qkv2d, temperature, [0, 9, 23], row_valid, 2, "gelu", "clamp", 100.0, 1e-6, True, True, None]


@pytest.mark.parametrize("masked, with_temperature", [(True, True), (False, False)])
def test_opcheck(masked, with_temperature, device):
    forward_args = op_inputs(masked, with_temperature, device)
    torch.library.opcheck(torch.ops.milkernels.linear_attention_forward, forward_args)
    with torch.no_grad():
        out, numerator, attention_map, state = torch.ops.milkernels.linear_attention_forward(*forward_args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in forward_args[:9]]
    for cotangents in ([out, numerator, attention_map], [out, None, None]):
        grads = [torch.randn_like(t) if t is not None else None for t in cotangents]
        torch.library.opcheck(torch.ops.milkernels.linear_attention_backward, [*detached, state, *grads, None])


def lin_mil_loss(qkv, temperature, mask):
    out, attention_map = lin_mil_attention(qkv, temperature.reshape(2, 1, 1), 2, mask=mask, return_map=True)
    return out.square().sum() + attention_map.sum()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    qkv, temperature = make_qkv((2, 30, 3 * 16), 2, seed=15)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 19:] = False
    kernel_checks.assert_compiles_without_graph_break(lin_mil_loss, [qkv, temperature, mask], backend)


def test_double_backward_raises_on_triton():
    qkv, temperature = make_qkv((1, 20, 3 * 16), 2, seed=16)
    kernel_checks.assert_double_backward_raises(all_outputs, [qkv, temperature, 2], "linear_attention")


def test_double_backward_on_the_reference():
    qkv, temperature = kernel_checks.as_float64(make_qkv((1, 6, 3 * 4), 2, seed=17))
    with milkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda q, t: all_outputs(q, t, 2, activation="gelu"), [qkv, temperature])
