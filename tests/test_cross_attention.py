"""Cross-attention with a residual LayerNorm: the reference against CMA-MIL's eager block and scaled dot-product
attention, the triton kernels (interpreter on CPU) against the float64 reference, bag layouts, queries with no
key, checks, custom ops."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import milkernels
from milkernels.bench.saved import saved_bytes
from milkernels.ops import cross_attention
from milkernels.ops.cross_attention import reference

import aot
import kernel_checks
import sharding
from milkernels.bench.traffic import counting

kernels = importlib.import_module("milkernels.ops.cross_attention.triton")
pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def make_inputs(queries, keys, width, batch=(), dtype=torch.float32, seed=0, norm_params=True):
    """``[xq, q, k, v, ln_weight, ln_bias]``: ``(*batch, queries, width)`` and ``(*batch, keys, width)`` rows and
    ``(width,)`` LayerNorm parameters (None unless ``norm_params``), all requiring grad."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(sharding.device(), dtype).requires_grad_()

    rows = [randn(*batch, queries, width) for _ in range(2)] + [randn(*batch, keys, width) for _ in range(2)]
    params = [randn(width), randn(width)] if norm_params else [None, None]
    return rows + params


def attend(heads=1, **kwargs):
    return lambda *t: cross_attention(*t, heads=heads, **kwargs)


def sdpa_block(xq, q, k, v, weight, bias, heads, allowed=None):
    """``LayerNorm(xq + SDPA(q, k, v))`` of padded bags ``(B, N, E)`` (``allowed: (B, Nk)``, True = a key)."""
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    mask = None if allowed is None else allowed[:, None, None, :]
    attention = F.scaled_dot_product_attention(*split, attn_mask=mask).transpose(1, 2).flatten(2)
    return F.layer_norm(xq + attention, xq.shape[-1:], weight, bias)


def test_reference_is_cma_mils_block():
    """CMA-MIL's ``norm(x1 + softmax(Q K^T / sqrt(dim)) V)`` with ``Linear`` projections, one head."""
    torch.manual_seed(0)
    x1, x2 = torch.randn(30, 24, dtype=torch.float64), torch.randn(50, 24, dtype=torch.float64)
    query, key, value = (torch.nn.Linear(24, 24).double() for _ in range(3))
    norm = torch.nn.LayerNorm(24).double()
    q, k, v = query(x1), key(x2), value(x2)
    expected = norm(x1 + torch.softmax(q @ k.T / 24 ** 0.5, dim=-1) @ v)
    with milkernels.use_backend("reference"):
        got = cross_attention(x1, q, k, v, norm.weight, norm.bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 3])
def test_reference_is_sdpa_with_key_padding(heads):
    xq, q, k, v, weight, bias = kernel_checks.as_float64(make_inputs(7, 9, 12, batch=(3,), seed=1))
    padding = torch.zeros(3, 9, dtype=torch.bool, device=sharding.device())
    padding[1, 4:] = True
    with milkernels.use_backend("reference"):
        got = cross_attention(xq, q, k, v, weight, bias, heads=heads, key_padding_mask=padding)
    torch.testing.assert_close(got, sdpa_block(xq, q, k, v, weight, bias, heads, ~padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("queries, keys, heads, width", [
    (1, 1, 4, 72), (1, 5, 1, 72), (1, 700, 1, 72), (17, 1, 1, 72), (17, 5, 4, 72), (17, 700, 4, 72), (300, 1, 4, 72),
    (300, 5, 1, 72), (300, 700, 1, 48),
])
def test_matches_reference(queries, keys, heads, width):
    """E no power of two (72: 18 per head at 4 heads; 48 for the largest case, whose fp32 tiles are larger and
    interpret faster): out and the gradients of xq, q, k, v and the norm."""
    inputs = make_inputs(queries, keys, width, seed=queries + keys)
    kernel_checks.compare(attend(heads), inputs, torch.float32)


def test_matches_reference_without_norm_parameters_at_a_custom_scale():
    inputs = make_inputs(20, 40, 64, seed=2, norm_params=False)
    kernel_checks.compare(attend(8, softmax_scale=0.3, eps=1e-3), inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """Out and every gradient within the half-precision tolerance; LayerNorm parameters in float32 (as a
    module's under autocast) take float32 gradients."""
    xq, q, k, v, weight, bias = make_inputs(40, 70, 48, dtype=dtype, seed=3)
    weight, bias = (t.detach().float().requires_grad_() for t in (weight, bias))
    kernel_checks.compare(attend(2), [xq, q, k, v], dtype)
    with milkernels.use_backend("triton"):
        out = cross_attention(xq, q, k, v, weight, bias, heads=2)
        grads = torch.autograd.grad(out.float().sum(), [weight, bias])
    assert out.dtype == dtype and all(g.dtype == torch.float32 for g in grads)


def test_padded_bags_with_key_padding_mask():
    """Bag 1 partly padded, bag 2 fully padded: its queries get ``LayerNorm(xq)`` and no NaN anywhere."""
    inputs = make_inputs(20, 30, 40, batch=(3,), seed=4)
    padding = torch.zeros(3, 30, dtype=torch.bool, device=sharding.device())
    padding[1, 11:] = True
    padding[2] = True
    kernel_checks.compare(attend(2, key_padding_mask=padding), inputs, torch.float32)
    xq, *_, weight, bias = inputs
    with milkernels.use_backend("triton"):
        out = cross_attention(*inputs, heads=2, key_padding_mask=padding)
    torch.testing.assert_close(out[2], F.layer_norm(xq[2], (40,), weight, bias))


@pytest.fixture
def short_splits(monkeypatch):
    """Splits of at least 128 rows (the forward's and dk/dv's are 512, dq's 1024), so that the small bags of a test
    split into several ranges, a ragged last one among them."""
    monkeypatch.setattr(kernels, "MIN_SPLIT_ROWS", 128)
    monkeypatch.setattr(kernels, "MIN_QUERY_GRAD_SPLIT_ROWS", 128)


# bag 1 has no query; bag 2 splits its 260 queries in two ranges
CU_Q = torch.tensor([0, 5, 5, 265, 266], device=sharding.device())
# bag 0 has no key (its queries get LayerNorm(xq)); bag 3 splits its 297 keys
CU_K = torch.tensor([0, 0, 30, 33, 330], device=sharding.device())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_bags_equal_separate_calls(backend, short_splits):
    xq, q, k, v, weight, bias = make_inputs(266, 330, 32, seed=5)
    with milkernels.use_backend(backend):
        packed = cross_attention(xq, q, k, v, weight, bias, heads=2, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K)
        separate = [cross_attention(*(t[q0:q1] for t in (xq, q)), *(t[k0:k1] for t in (k, v)), weight, bias, heads=2)
                    for q0, q1, k0, k1 in zip(CU_Q[:-1], CU_Q[1:], CU_K[:-1], CU_K[1:])]
    torch.testing.assert_close(packed, torch.cat(separate))
    torch.testing.assert_close(packed[:5], F.layer_norm(xq[:5], (32,), weight, bias))


def test_packed_bags_match_reference(short_splits):
    kernel_checks.compare(attend(2, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K), make_inputs(266, 330, 32, seed=5),
                          torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_keys_gives_the_norm_of_the_residual(backend):
    """One bag with N_k = 0: ``out = LayerNorm(xq)``, its gradients those of the norm alone, ``dq = 0``."""
    xq, q, k, v, weight, bias = make_inputs(9, 0, 16, seed=6)
    with milkernels.use_backend(backend):
        out = cross_attention(xq, q, k, v, weight, bias, heads=2)
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), [xq, q, weight, bias])
    torch.testing.assert_close(out, F.layer_norm(xq, (16,), weight, bias))
    assert all(g.isfinite().all() for g in grads) and not grads[1].any()


def test_split_kv_matches_one_range_and_is_deterministic(monkeypatch, short_splits):
    """A few queries over many keys run split (5 key ranges); bitwise the same twice, and close to one range."""
    inputs = make_inputs(17, 700, 32, seed=7)
    with milkernels.use_backend("triton"):
        split = [kernel_checks.outputs_and_grads(attend(2), inputs) for _ in range(2)]
        monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
        single = kernel_checks.outputs_and_grads(attend(2), inputs)
    for first, second, whole in zip(*(out + grads for out, grads in (*split, single))):
        assert torch.equal(first, second)
        torch.testing.assert_close(first, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits", ["split", "unsplit"])
def test_deterministic_mode_runs_the_dq_kernel(splits, monkeypatch, deterministic, short_splits):
    """fp16 under ``torch.use_deterministic_algorithms``: dq comes from its own kernel (``_query_grad_kernel``, over
    5 key ranges at "split"), with the padded-bag and key-padding layout; outputs and every gradient match the
    reference. The default fp16 backward (atomic dq) launches no such kernel. (fp32 always takes the dq kernel.)"""
    if splits == "unsplit":
        monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
    inputs = make_inputs(17, 700, 72, batch=(2,), dtype=torch.float16, seed=16)
    padding = torch.zeros(2, 700, dtype=torch.bool, device=sharding.device())
    padding[1, 300:] = True
    with kernel_checks.launched() as deterministic_run:
        kernel_checks.compare(attend(4, key_padding_mask=padding), inputs, torch.float16)
    torch.use_deterministic_algorithms(False)
    with kernel_checks.launched() as default_run, milkernels.use_backend("triton"):
        kernel_checks.outputs_and_grads(attend(4, key_padding_mask=padding), inputs)
    assert deterministic_run.by_kernel["_query_grad_kernel"].launches == 1
    assert "_query_grad_kernel" not in default_run.by_kernel


def test_atomic_dq_in_half_precision(short_splits):
    """fp16's default backward (atomic dq) at E = 128 in one head (16 x 128 key-kernel tiles): two padded bags of
    300 queries over 200 keys, the second with key padding, the queries split 2 ways per key block (fp32 dk, dv
    partials); outputs and every gradient within the fp16 tolerance, and no dq kernel."""
    inputs = make_inputs(300, 200, 128, batch=(2,), dtype=torch.float16, seed=22)
    padding = torch.zeros(2, 200, dtype=torch.bool, device=sharding.device())
    padding[1, 70:] = True
    with kernel_checks.launched() as run:
        kernel_checks.compare(attend(1, key_padding_mask=padding), inputs, torch.float16)
    assert "_query_grad_kernel" not in run.by_kernel and run.by_kernel["_key_grad_kernel"].launches == 1


@pytest.mark.parametrize("queries, keys, heads, width", [(300, 700, 1, 128), (600, 40, 4, 72)])
def test_atomic_dq_in_fp32(queries, keys, heads, width, monkeypatch, short_splits):
    """The atomic-dq backward (fp16 / bf16's default), forced in fp32 for a tight comparison: E = 128 in one head
    takes its own key tiles (16 x 128); 600 queries over one key block split the queries 4 ways (float32 dk, dv
    partials beside the atomic dq); padded bags with key padding. Outputs and every gradient."""
    monkeypatch.setattr(kernels, "atomic_dq", lambda dtype: True)
    inputs = make_inputs(queries, keys, width, batch=(2,), seed=queries)
    padding = torch.zeros(2, keys, dtype=torch.bool, device=sharding.device())
    padding[1, keys // 3:] = True
    with kernel_checks.launched() as run:
        kernel_checks.compare(attend(heads, key_padding_mask=padding), inputs, torch.float32)
    assert "_query_grad_kernel" not in run.by_kernel


@pytest.mark.parametrize("dq", ["atomic", "deterministic"])
@pytest.mark.parametrize("heads, width, queries, keys", [(1, 128, 300, 700), (3, 72, 140, 300), (8, 40, 140, 300)])
def test_heads_as_2d_products(dq, heads, width, queries, keys, monkeypatch, short_splits, flat_heads):
    """One 2-D product a head (:func:`_heads_mm`; the GPU machine's Triton 3.6 at one and two heads), the heads
    halved down to one (3 heads pad to 4; 8 heads of 5 columns), in the split forward and every backward kernel
    (the atomic dq's own key tiles at E = 128 in one head, or the dq kernel), over padded bags with key padding;
    outputs and every gradient against the reference (every tile forced flat; a head swapped fails it)."""
    monkeypatch.setattr(kernels, "atomic_dq", lambda dtype: dq == "atomic")
    inputs = make_inputs(queries, keys, width, batch=(2,), seed=31)
    padding = torch.zeros(2, keys, dtype=torch.bool, device=sharding.device())
    padding[1, keys // 3:] = True
    kernel_checks.compare(attend(heads, key_padding_mask=padding), inputs, torch.float32)


@pytest.mark.parametrize("version, limits", [("3.6.0", (1, 2)), ("3.8.1", (1, 2)), ("3.9.0", (0, 0)),
                                             ("4.0.0", (0, 0))])
def test_flat_head_limits_follow_the_triton_version(version, limits, monkeypatch):
    """``(fp32, fp16 / bf16)`` heads multiplied one 2-D product a head: 1 and 2 before Triton 3.9 (the sm_90
    compiles' choice), none from 3.9 on; the module's limits are those of the installed Triton."""
    assert (kernels.FLAT_HEADS_FP32.value, kernels.FLAT_HEADS_HALF.value) == kernels._flat_heads()
    monkeypatch.setattr(kernels.triton, "__version__", version)
    assert kernels._flat_heads() == limits


@pytest.mark.parametrize("version, tiles", [("3.6.0", {(1, 256)}), ("3.8.1", {(1, 256)}), ("3.9.0", set()),
                                            ("4.0.0", set())])
def test_atomic_dq_tiles_follow_the_triton_version(version, tiles, monkeypatch):
    """One head of 256 takes the deterministic dq before Triton 3.9 (its atomic key kernel spills 4-5 KB under
    3.6), the atomic one from 3.9 on; the module's set is that of the installed Triton, and the plan follows it."""
    assert kernels.ATOMIC_SPILLING_TILES == kernels._atomic_spilling_tiles()
    monkeypatch.setattr(kernels.triton, "__version__", version)
    assert kernels._atomic_spilling_tiles() == tiles
    monkeypatch.setattr(kernels, "ATOMIC_SPILLING_TILES", kernels._atomic_spilling_tiles())
    for width, heads, atomic in ((256, 1, not tiles), (200, 1, not tiles), (128, 1, True), (256, 2, True)):
        xq = torch.empty(8, width, dtype=torch.bfloat16)
        assert kernels.Plan(xq, [0, 8], [0, 8], heads).atomic_dq is atomic, (width, heads)
    atomic_tiles = {(flags["HP"], flags["DHP"]) for _, _, flags, _, _ in kernels.shipped_specializations()
                    if flags.get("ATOMIC_DQ")}
    assert (1, 256) not in atomic_tiles if tiles else (1, 256) in atomic_tiles  # the AOT list: what launches
    assert (1, 128) in atomic_tiles


def test_norm_grad_partials_do_not_grow_with_the_bag(monkeypatch):
    """With 3 LayerNorm-gradient programs for 19 blocks of 16 rows (300 rows in two bags), each loops over
    several blocks: the gradients match the reference, and the kernel writes dy, delta and 3 (2, E) partials."""
    monkeypatch.setattr(kernels, "NORM_GRAD_PROGRAMS", 3)
    inputs = make_inputs(150, 40, 48, batch=(2,), seed=11)
    kernel_checks.compare(attend(2), inputs, torch.float32)
    with milkernels.use_backend("triton"):
        out = cross_attention(*inputs, heads=2)
        with counting() as backward:
            out.backward(torch.randn_like(out))
    assert backward.by_kernel["_norm_grad_kernel"].store_bytes == (300 * 48 + 300 * 2 + 3 * 2 * 48) * 4


def test_splits_cover_the_other_side():
    assert kernels.num_splits(1, 700, 256) == 2 and kernels.num_splits(1, 5, 256) == 1
    assert kernels.num_splits(kernels.TARGET_PROGRAMS, 10**6, 256) == 1 and kernels.num_splits(0, 10, 256) == 1
    assert kernels.num_splits(100, 10**6, 512) == 3 and kernels.num_splits(1, 2047, 1024) == 1


def test_each_block_table_is_built_where_it_is_used(monkeypatch):
    """Each table is built on first use (a host-to-device copy each): the forward the query blocks of its
    kernel, the backward the dq kernel's query blocks and the dk/dv kernel's key blocks."""
    built = kernel_checks.record_block_tables(monkeypatch, kernels)
    xq, q, k, v, weight, bias = make_inputs(40, 70, 16, seed=21)
    with milkernels.use_backend("triton"):
        out = cross_attention(xq, q, k, v, weight, bias)
        assert [rows for rows, _ in built] == [40]
        out.sum().backward()
    assert sorted(rows for rows, _ in built[1:]) == [40, 70]


def bad_input_cases():
    x, y = torch.randn(6, 8), torch.randn(4, 8)
    padded, padded_keys = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    yield "share one dtype", (x, x, y.double(), y), {}
    yield "q must have xq's shape", (x, x[:5], y, y), {}
    yield "q must have xq's shape", (x, x, y, y[:3]), {}
    yield "xq's E", (x, x, torch.randn(4, 6), torch.randn(4, 6)), {}
    yield "xq's E", (padded, padded, torch.randn(3, 4, 8), torch.randn(3, 4, 8)), {}
    yield "xq, q: \\(Nq, E\\)", (x, x, padded_keys, padded_keys), {}
    yield "xq, q: \\(Nq, E\\)", (torch.randn(8),) * 2 + (y, y), {}
    yield "heads must be an int >= 1 dividing E=8", (x, x, y, y), {"heads": 3}
    yield "heads must be", (x, x, y, y), {"heads": 0}
    yield "softmax_scale must be", (x, x, y, y), {"softmax_scale": -1.0}
    yield "eps must be", (x, x, y, y), {"eps": 0.0}
    yield "ln_weight must be \\(8,\\)", (x, x, y, y, torch.ones(7)), {}
    yield "ln_bias must be \\(8,\\) in torch.float32", (x, x, y, y, None, torch.ones(8, dtype=torch.float64)), {}
    yield "must be float32, float16, bfloat16 or float64", (x.long(), x, y, y), {}
    yield "key_padding_mask must be \\(2, 4\\) bool", (padded, padded, padded_keys, padded_keys), \
        {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}
    yield "key_padding_mask must be \\(2, 4\\) bool", (padded, padded, padded_keys, padded_keys), \
        {"key_padding_mask": torch.zeros(2, 4)}
    yield "one bag \\(N, E\\) takes none", (x, x, y, y), {"key_padding_mask": torch.zeros(4, dtype=torch.bool)}
    yield "give both", (x, x, y, y), {"cu_seqlens_q": torch.tensor([0, 6])}
    yield "cu_seqlens_k must run from 0 to the row count 4", (x, x, y, y), \
        {"cu_seqlens_q": torch.tensor([0, 6]), "cu_seqlens_k": torch.tensor([0, 3])}
    yield "cu_seqlens_q must run .* without decreasing", (x, x, y, y), \
        {"cu_seqlens_q": torch.tensor([0, 4, 2, 6]), "cu_seqlens_k": torch.tensor([0, 1, 2, 4])}
    yield "cu_seqlens_q must be \\(B \\+ 1,\\) int32 or int64", (x, x, y, y), \
        {"cu_seqlens_q": torch.tensor([0.0, 6.0]), "cu_seqlens_k": torch.tensor([0, 4])}
    yield "count the same bags", (x, x, y, y), \
        {"cu_seqlens_q": torch.tensor([0, 6]), "cu_seqlens_k": torch.tensor([0, 1, 4])}
    yield "packed bags take 2-D", (padded, padded, padded_keys, padded_keys), \
        {"cu_seqlens_q": torch.tensor([0, 6]), "cu_seqlens_k": torch.tensor([0, 4])}
    yield "B >= 1", (torch.randn(0, 6, 8),) * 2 + (torch.randn(0, 4, 8),) * 2, {}
    yield "must be a torch.Tensor", (x, x, y, y.tolist()), {}


@pytest.mark.parametrize("message, args, kwargs", list(bad_input_cases()))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        cross_attention(*args, **kwargs)


def test_forced_backends_say_why_and_auto_uses_the_reference():
    wide = [t.detach() for t in make_inputs(3, 4, 288, seed=8)]  # one head of 288 pads to 512 columns
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="pads to 1 x 512"):
        cross_attention(*wide)
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="float64"):
        cross_attention(*(t.double() for t in wide))
    with milkernels.use_backend("cuda"), pytest.raises(milkernels.BackendUnavailable, match="no cuda kernel"):
        cross_attention(*wide[:4])
    with milkernels.use_backend("auto"):
        assert cross_attention(*wide).shape == (3, 288)  # CPU tensors: the reference


def test_kernels_save_the_attention_output_and_row_statistics():
    """Beyond the inputs, the fused op keeps ``A V`` (Tq x E), the row mean and rstd and the lse (Tq x H);
    the reference keeps the score and weight matrices (H x Tq x Tk each)."""
    inputs = make_inputs(64, 200, 32, seed=9)
    with milkernels.use_backend("triton"):
        fused = saved_bytes(attend(4), *inputs)
    with milkernels.use_backend("reference"):
        composed = saved_bytes(attend(4), *inputs)
    assert fused == 64 * 32 * 4 + 64 * (2 + 4) * 4
    assert fused * 4 < composed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16's backward takes the atomic dq
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, dtype):
    xq, q, k, v, weight, bias = (t.detach().requires_grad_() for t in make_inputs(11, 23, 24, dtype=dtype, seed=10))
    key_valid = torch.rand(23, device=sharding.device()) > 0.3 if masked else None
    params = [weight, bias] if masked else [None, None]
    args = [xq, q, k, v, *params, key_valid, [0, 4, 11], [0, 9, 23], 3, 0.25, 1e-5]
    torch.library.opcheck(torch.ops.milkernels.cross_attention_forward, args)
    with torch.no_grad():
        _, attn, mean, rstd, lse = torch.ops.milkernels.cross_attention_forward(*args)
    detached = [t.detach() for t in (xq, q, k, v)]
    torch.library.opcheck(torch.ops.milkernels.cross_attention_backward,
                          [*detached, weight.detach() if masked else None, key_valid, attn, mean, rstd, lse,
                           torch.randn_like(xq), *args[7:11]])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    padding = torch.zeros(2, 30, dtype=torch.bool, device=sharding.device())
    padding[1, 21:] = True
    fn = lambda *t: cross_attention(*t[:6], heads=2, key_padding_mask=t[6])  # noqa: E731
    kernel_checks.assert_compiles_without_graph_break(fn, [*make_inputs(10, 30, 32, batch=(2,), seed=11), padding],
                                                      backend)
    kernel_checks.assert_compiles_without_graph_break(attend(1), make_inputs(10, 30, 32, seed=12), backend)
    half = make_inputs(10, 30, 32, dtype=torch.float16, seed=12)  # on triton, the backward's atomic dq
    kernel_checks.assert_compiles_without_graph_break(attend(1), half, backend)


def test_double_backward_raises_on_triton():
    kernel_checks.assert_double_backward_raises(attend(2), make_inputs(5, 7, 32, seed=13), "cross_attention")


def test_double_backward_on_the_reference():
    """True second derivatives, a fully padded bag included."""
    inputs = kernel_checks.as_float64(make_inputs(3, 4, 4, batch=(2,), seed=14))
    padding = torch.tensor([[False, True, False, True], [True] * 4], device=sharding.device())
    with milkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(attend(2, key_padding_mask=padding), inputs)


GEMM_FLOPS_PER_BYTE = 80  # issue 12: tl.dot FLOPs per requested byte of a flash kernel in bf16 (H100's L2 bound)
TRAFFIC_BUDGET = 2.0  # issue 12: a memory-bound kernel's requested bytes over the op's minimum
RECOMPUTE_BUDGET = 1.3  # issue 12: dot FLOPs over the useful ones
MARGIN = 1.1  # where a budget is not met, how much worse than measured a figure may get before the test fails
MEASURED_FLOPS_PER_BYTE = {  # dot FLOPs per requested byte at test_traffic_within_budget's shape
    (torch.bfloat16, "split", "atomic dq"): dict(_split_forward_kernel=92.7, _key_grad_kernel=79.7),
    (torch.bfloat16, "unsplit", "atomic dq"): dict(_forward_kernel=101.8, _key_grad_kernel=79.7),
    (torch.bfloat16, "split", "deterministic"): dict(_split_forward_kernel=92.7, _query_grad_kernel=87.5,
                                                     _key_grad_kernel=84.4),
    (torch.bfloat16, "unsplit", "deterministic"): dict(_query_grad_kernel=87.5, _key_grad_kernel=84.4),
    (torch.float32, "split", "deterministic"): dict(_split_forward_kernel=15.0, _query_grad_kernel=11.7,
                                                    _key_grad_kernel=14.1),
    (torch.float32, "unsplit", "deterministic"): dict(_forward_kernel=15.0, _query_grad_kernel=11.7,
                                                      _key_grad_kernel=14.1),
}
BACKWARD_PRODUCTS = {"atomic dq": 5, "deterministic": 7}  # (Nq x E) x (E x Nk)-sized products the backward takes


@pytest.mark.parametrize("dtype, splits, dq", MEASURED_FLOPS_PER_BYTE)
def test_traffic_within_budget(dtype, splits, dq, monkeypatch, request):
    """The benchmark's E = 128, one head: 256 queries over 1024 keys, with the split-KV ranges the dispatcher
    takes at this size ("split") or one range per block, as from 264 blocks on ("unsplit": large N); the default
    backward ("atomic dq" in bf16, the two kernels in fp32) or the deterministic one.

    Issue 12's budgets. Memory-bound kernels within 2x of the op's minimum (read xq, q, k, v, write out; the
    backward also reads d_out and writes d_xq, d_q, d_k, d_v): met, the combine 0.65x (fp32 0.47x), the norm
    gradient 0.20x. Dot FLOPs over the useful 4 Nq Nk E (backward 8 Nq Nk E): forward 1.00x, met; backward with
    the atomic dq 1.25x, met (5 products: S, dP, dV, dK, dQ); deterministic 1.75x, not met (the dq kernel forms S
    and dP again: 7). 80 dot FLOPs per requested byte in bf16: the forward met unsplit (101.8: 128-row tiles) and
    split (92.7: 2 ranges of 512 keys, each adding fp32 partials and a read of q; 72.7 at 4 ranges of 256); the
    atomic key kernel 79.7 (atomic adds counted as read and written; K, V reads and dK, dV writes amortize over
    only 16 query tiles here), was 84.4 and dq 87.5 in the deterministic kernels, which remain (dq splits its keys
    from 2048 on: :func:`test_split_dq_kernel_past_80_flops_a_byte`). fp32: 15.0 split and unsplit, dq 11.7, dk/dv
    14.1 (smaller tiles: three tf32 products each). Where not met, the measured figure is held within 10%.
    """
    if splits == "unsplit":
        monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
    if dq == "deterministic":
        request.getfixturevalue("deterministic")
    queries, keys, width = 256, 1024, 128
    xq, q, k, v, weight, bias = make_inputs(queries, keys, width, dtype=dtype, seed=20)
    with milkernels.use_backend("triton"):
        with counting() as forward:
            out = cross_attention(xq, q, k, v, weight, bias)
        with counting() as backward:
            out.backward(torch.randn_like(out))
    row_bytes = width * dtype.itemsize
    forward_min, backward_min = (3 * queries + 2 * keys) * row_bytes, (5 * queries + 4 * keys) * row_bytes
    product_flops = 2 * queries * keys * width  # one (Nq x E) x (E x Nk) product
    if splits == "split":
        assert forward.by_kernel["_combine_kernel"].requested_bytes <= TRAFFIC_BUDGET * forward_min
    assert backward.by_kernel["_norm_grad_kernel"].requested_bytes <= TRAFFIC_BUDGET * backward_min
    for name, measured in MEASURED_FLOPS_PER_BYTE[dtype, splits, dq].items():
        counts = (forward.by_kernel | backward.by_kernel)[name]
        assert counts.dot_flops >= min(GEMM_FLOPS_PER_BYTE, measured / MARGIN) * counts.requested_bytes, name
    assert forward.dot_flops <= RECOMPUTE_BUDGET * 2 * product_flops
    assert backward.dot_flops == BACKWARD_PRODUCTS[dq] * product_flops
    assert ("_query_grad_kernel" in backward.by_kernel) == (dq == "deterministic")


def test_split_dq_kernel_past_80_flops_a_byte(deterministic):
    """bf16, 256 queries over 2048 keys, E = 128, deterministic: the dq kernel splits the keys in 2 ranges of
    1024 (:data:`MIN_QUERY_GRAD_SPLIT_ROWS`: its q, dO reads and fp32 partials per range kept it at 63.7 dot FLOPs
    a requested byte at 256 keys a range, 76.6 at 512) and requests 85.1; the forward's 4 ranges of 512 keys 92.7."""
    xq, q, k, v, weight, bias = make_inputs(256, 2048, 128, dtype=torch.bfloat16, seed=20)
    with milkernels.use_backend("triton"):
        with counting() as forward:
            out = cross_attention(xq, q, k, v, weight, bias)
        with counting() as backward:
            out.backward(torch.randn_like(out))
    plan = kernels.Plan(xq, [0, 256], [0, 2048], 1)
    assert (plan.forward_splits, plan.query_grad_splits) == (4, 2)
    for counts in forward.by_kernel["_split_forward_kernel"], backward.by_kernel["_query_grad_kernel"]:
        assert counts.dot_flops >= GEMM_FLOPS_PER_BYTE * counts.requested_bytes


def test_atomic_key_kernel_past_80_flops_a_byte_on_a_larger_bag(monkeypatch):
    """The benchmark's shape at n = 2048 (512 queries over 2048 keys, E = 128, bf16), one query range per key
    block (as from 264 key blocks on): the atomic key kernel's K, V reads and dK, dV writes amortize over 32 query
    tiles, so it requests 91.0 dot FLOPs a byte (79.7 at test_traffic_within_budget's 16), past issue 12's 80."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
    xq, q, k, v, weight, bias = make_inputs(512, 2048, 128, dtype=torch.bfloat16, seed=21)
    with milkernels.use_backend("triton"):
        out = cross_attention(xq, q, k, v, weight, bias)
        with counting() as backward:
            out.backward(torch.randn_like(out))
    counts = backward.by_kernel["_key_grad_kernel"]
    assert counts.dot_flops >= GEMM_FLOPS_PER_BYTE * counts.requested_bytes
    assert "_query_grad_kernel" not in backward.by_kernel


test_compiles_for_sm90 = aot.sm90_test(kernels)
