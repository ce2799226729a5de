"""Gated attention pooling: the triton kernels (interpreter on CPU) against the float64 reference."""

import gc
import weakref

import pytest
import torch

import milkernels
from milkernels.ops import gated_attention_pool, gated_attention_scores
from milkernels.ops._bags import pack_bags
from milkernels.ops.gated_attention import reference
from milkernels.ops.gated_attention import triton as kernels

import aot
import kernel_checks
from milkernels.bench.traffic import counting

pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def make_weights(features, hidden, heads, dtype, device, gated=True, generator=None):
    """Fresh random (wa, ba, wb, bb, wc, bc) with requires_grad; wb, bb are None when ungated."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype=dtype, device=device).requires_grad_()

    scale = features ** -0.5
    wa, ba = rand(hidden, features, scale=scale), rand(hidden, scale=0.1)
    wb, bb = (rand(hidden, features, scale=scale), rand(hidden, scale=0.1)) if gated else (None, None)
    return [wa, ba, wb, bb, rand(heads, hidden, scale=hidden ** -0.5 * 3), rand(heads, scale=0.1)]


def compare(fn, x, weights, dtype, **kwargs):
    """Triton in ``dtype`` against the reference in float64: outputs and every gradient."""
    kernel_checks.compare(fn, [x, *weights], dtype, **kwargs)


def outputs_and_grads(fn, x, weights, **kwargs):
    return kernel_checks.outputs_and_grads(fn, [x, *weights], **kwargs)


@pytest.mark.parametrize("rows", [1, 2, 17, 1000, 4099])
@pytest.mark.parametrize("heads", [1, 3])
def test_one_bag_matches_reference(rows, heads, device):
    generator = torch.Generator().manual_seed(rows * 10 + heads)
    weights = make_weights(45, 27, heads, torch.float32, device, generator=generator)
    x = torch.randn(rows, 45, generator=generator).to(device).requires_grad_()
    compare(gated_attention_pool, x, weights, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, device):
    generator = torch.Generator().manual_seed(3)
    weights = make_weights(70, 33, 2, dtype, device, generator=generator)
    x = torch.randn(300, 70, generator=generator).to(dtype=dtype, device=device).requires_grad_()
    compare(gated_attention_pool, x, weights, dtype)


def test_ungated_and_without_biases(device):
    generator = torch.Generator().manual_seed(4)
    wa, _, _, _, wc, _ = make_weights(30, 19, 1, torch.float32, device, gated=False, generator=generator)
    x = torch.randn(130, 30, generator=generator).to(device).requires_grad_()
    compare(gated_attention_pool, x, [wa, None, None, None, wc, None], torch.float32)


def test_wide_hidden_takes_several_d_tiles(device):
    generator = torch.Generator().manual_seed(5)
    weights = make_weights(150, 260, 3, torch.float32, device, generator=generator)
    x = torch.randn(150, 150, generator=generator).to(device).requires_grad_()
    compare(gated_attention_pool, x, weights, torch.float32)


def test_padded_bags_with_mask(device):
    generator = torch.Generator().manual_seed(6)
    weights = make_weights(37, 23, 3, torch.float32, device, generator=generator)
    x = torch.randn(3, 90, 37, generator=generator).to(device).requires_grad_()
    mask = torch.rand(3, 90, generator=generator) > 0.3
    mask[1, :70] = False
    compare(gated_attention_pool, x, weights, torch.float32, mask=mask.to(device))


def test_packed_bags_equal_separate_calls(device):
    generator = torch.Generator().manual_seed(8)
    weights = make_weights(37, 23, 2, torch.float32, device, generator=generator)
    cu_seqlens = torch.tensor([0, 1, 66, 200, 217], device=device)
    x = torch.randn(217, 37, generator=generator).to(device).requires_grad_()
    with milkernels.use_backend("triton"):
        (pooled, scores), grads = outputs_and_grads(gated_attention_pool, x, weights, cu_seqlens=cu_seqlens)
        bounds = cu_seqlens.tolist()
        for bag, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            one_pooled, one_scores = gated_attention_pool(x[start:stop], *weights)
            torch.testing.assert_close(pooled[bag], one_pooled, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(scores[start:stop], one_scores, rtol=1e-5, atol=1e-5)
    compare(gated_attention_pool, x, weights, torch.float32, cu_seqlens=cu_seqlens)


def test_scores_only(device):
    generator = torch.Generator().manual_seed(9)
    weights = make_weights(41, 29, 3, torch.float32, device, generator=generator)
    x = torch.randn(2, 70, 41, generator=generator).to(device).requires_grad_()
    compare(gated_attention_scores, x, weights, torch.float32)


def test_only_pooled_used_in_loss(device):
    generator = torch.Generator().manual_seed(10)
    weights = make_weights(33, 21, 1, torch.float32, device, generator=generator)
    x = torch.randn(80, 33, generator=generator).to(device).requires_grad_()
    compare(lambda *args: gated_attention_pool(*args)[0], x, weights, torch.float32)


@pytest.mark.parametrize("lengths", [[300], [1, 39, 1, 189]])
def test_backward_in_chunks_smaller_than_a_bag(lengths, device, monkeypatch):
    monkeypatch.setattr(kernels, "BACKWARD_SCRATCH_BYTES", 100 * 2 * 23 * 4)  # 100 rows of fp32 dH
    generator = torch.Generator().manual_seed(14)
    weights = make_weights(37, 23, 2, torch.float32, device, generator=generator)
    x = torch.randn(sum(lengths), 37, generator=generator).to(device).requires_grad_()
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0)
    compare(gated_attention_pool, x, weights, torch.float32, cu_seqlens=cu_seqlens)
    compare(gated_attention_scores, x, weights, torch.float32)


def test_non_contiguous_weights_and_mask(device):
    generator = torch.Generator().manual_seed(15)
    wa, ba, wb, bb, wc, bc = make_weights(37, 23, 3, torch.float32, device, generator=generator)
    transposed = [w.detach().t().contiguous().t().requires_grad_() for w in (wa, wb, wc)]
    assert not any(w.is_contiguous() for w in transposed)
    x = torch.randn(3, 80, 37, generator=generator).to(device).requires_grad_()
    mask = (torch.rand(3, 160, generator=generator) > 0.3).to(device)[:, ::2]
    weights = [transposed[0], ba, transposed[1], bb, transposed[2], bc]
    compare(gated_attention_pool, x, weights, torch.float32, mask=mask)


def test_fully_masked_bag_pools_to_nan_and_leaves_other_gradients_finite(device):
    generator = torch.Generator().manual_seed(16)
    weights = make_weights(37, 23, 2, torch.float32, device, generator=generator)
    x = torch.randn(3, 40, 37, generator=generator).to(device).requires_grad_()
    mask = torch.ones(3, 40, dtype=torch.bool, device=device)
    mask[1] = False
    keep_bags = torch.tensor([0, 2], device=device)

    def other_bags(*args, **kwargs):
        pooled, scores = gated_attention_pool(*args, **kwargs)
        assert pooled[1].isnan().all()
        return pooled[keep_bags], scores

    compare(other_bags, x, weights, torch.float32, mask=mask)


def test_gradients_only_for_inputs_that_need_them(device):
    generator = torch.Generator().manual_seed(17)
    weights = [w.detach() for w in make_weights(37, 23, 2, torch.float32, device, generator=generator)]
    weights[4].requires_grad_()
    x = torch.randn(70, 37, generator=generator).to(device)
    compare(gated_attention_pool, x, weights, torch.float32)


def test_dropout_same_seed_same_result_and_backward_matches_forward_mask(device):
    generator = torch.Generator().manual_seed(11)
    weights = make_weights(37, 23, 2, torch.float32, device, generator=generator)
    x = torch.randn(150, 37, generator=generator).to(device).requires_grad_()
    with milkernels.use_backend("triton"):
        torch.manual_seed(3)
        first, grads = outputs_and_grads(gated_attention_pool, x, weights, dropout_p=0.25)
        torch.manual_seed(3)
        again, _ = outputs_and_grads(gated_attention_pool, x, weights, dropout_p=0.25)
        other, _ = outputs_and_grads(gated_attention_pool, x, weights, dropout_p=0.25)
        no_drop, _ = outputs_and_grads(gated_attention_pool, x, weights, dropout_p=0.25, training=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    keep = kernels.dropout_keep_masks(seed, 150, 23, 0.25, device)
    assert 0.65 < keep[0].float().mean() < 0.85 and not torch.equal(keep[0], keep[1])
    bags = pack_bags(x, 37)
    want, want_grads = outputs_and_grads(
        lambda *a: reference.gated_attention_pool(*a, bags, 0.25, True, keep), x, weights)
    torch.testing.assert_close(first[0], want[0][0], rtol=1e-4, atol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with milkernels.use_backend("reference"):
        plain, _ = outputs_and_grads(gated_attention_pool, x, weights)
    torch.testing.assert_close(no_drop[0], plain[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_casts_x_and_weights_like_linear(backend, device):
    generator = torch.Generator().manual_seed(18)
    weights = make_weights(37, 23, 2, torch.float32, device, generator=generator)
    x = torch.randn(60, 37, generator=generator).to(device).requires_grad_()
    with milkernels.use_backend(backend), torch.autocast(device.type, dtype=torch.bfloat16):
        pooled, scores = gated_attention_pool(x, *weights)
    assert pooled.dtype == scores.dtype == torch.bfloat16
    pooled.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weights[0].grad.dtype == torch.float32
    with milkernels.use_backend("reference"):
        expected, _ = gated_attention_pool(*[t.detach().bfloat16() for t in (x, *weights)])
    torch.testing.assert_close(pooled.float(), expected.float(), rtol=0.05, atol=0.05)


def test_graph_does_not_keep_the_input_alive(device):
    generator = torch.Generator().manual_seed(19)
    weights = make_weights(20, 12, 1, torch.float32, device, generator=generator)
    source = torch.randn(2, 30, 20, generator=generator).to(device).requires_grad_()
    view = source * 1.0
    with milkernels.use_backend("triton"):
        pooled, scores = gated_attention_pool(view, *weights, mask=torch.ones(2, 30, dtype=torch.bool, device=device))
    pooled.sum().backward()  # scores still hold the op's node
    alive = weakref.ref(view)
    del view
    gc.collect()
    assert alive() is None, "the op's autograd context still holds x after backward"
    assert scores.grad_fn is not None


def test_backward_is_deterministic(device):
    generator = torch.Generator().manual_seed(12)
    weights = make_weights(37, 23, 3, torch.float32, device, generator=generator)
    x = torch.randn(500, 37, generator=generator).to(device).requires_grad_()
    with milkernels.use_backend("triton"):
        _, first = outputs_and_grads(gated_attention_pool, x, weights)
        _, second = outputs_and_grads(gated_attention_pool, x, weights)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_in_input_gives_nan_out(backend, device):
    generator = torch.Generator().manual_seed(13)
    weights = make_weights(20, 12, 1, torch.float32, device, generator=generator)
    x = torch.randn(2, 50, 20, generator=generator).to(device)
    x[0, 7, 3] = float("nan")
    with milkernels.use_backend(backend):
        pooled, _ = gated_attention_pool(x, *weights)
        assert pooled[0].isnan().all() and not pooled[1].isnan().any()
        mask = torch.ones(2, 50, dtype=torch.bool, device=device)
        mask[0, 7] = False
        masked_pooled, _ = gated_attention_pool(x, *weights, mask=mask)
        assert not masked_pooled.isnan().any(), "a masked-out instance must not reach the result"


def bad_input_cases():
    x = torch.randn(10, 8)
    weights = make_weights(8, 4, 1, torch.float32, "cpu")
    yield "rank", (torch.randn(2, 3, 4, 8), *weights), {}
    yield "feature size L=9", (torch.randn(10, 9), *weights), {}
    yield "float32, float16", (torch.randint(0, 5, (10, 8)), *weights), {}
    yield "one device", (x, weights[0].detach().to("meta"), *weights[1:]), {}
    yield "empty bag", (torch.randn(0, 8), *weights), {}
    yield "empty bag", (x, *weights), {"cu_seqlens": torch.tensor([0, 4, 4, 10])}
    yield "cu_seqlens must start", (x, *weights), {"cu_seqlens": torch.tensor([0, 4, 9])}
    yield "mask must have shape", (torch.randn(2, 5, 8), *weights), {"mask": torch.ones(2, 4)}
    yield "wc must have shape", (x, *weights[:4], torch.randn(1, 5), None), {}
    yield "dropout_p", (x, *weights), {"dropout_p": 1.0}
    yield "wa is torch.float32 but x is torch.float16", (x.half(), *weights), {}
    yield "x must be a torch.Tensor", (x.tolist(), *weights), {}
    yield "cu_seqlens must be a torch.Tensor", (x, *weights), {"cu_seqlens": [0, 10]}
    yield "bb given without wb", (x, *weights[:2], None, *weights[3:]), {}


@pytest.mark.parametrize("message,args,kwargs", list(bad_input_cases()))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        gated_attention_pool(*args, **kwargs)


def test_triton_rejects_float64_with_a_reason():
    weights = make_weights(8, 4, 1, torch.float64, "cpu")
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="float64"):
        gated_attention_pool(torch.randn(10, 8, dtype=torch.float64), *weights)


test_compiles_for_sm90 = aot.sm90_test(kernels)


def test_ungated_call_takes_wb_and_bb_none(device):
    generator = torch.Generator().manual_seed(31)
    wa, ba, _, _, wc, bc = make_weights(20, 12, 2, torch.float32, device, gated=False, generator=generator)
    x = torch.randn(3, 40, 20, generator=generator).to(device).requires_grad_()
    compare(gated_attention_pool, x, [wa, ba, None, None, wc, bc], torch.float32)


def op_inputs(pool: bool, masked: bool, dropout_p: float, device):
    """Arguments of ``milkernels::gated_attention_forward``: two bags of 9 and 14 rows, L = 20, D = 12, K = 2."""
    generator = torch.Generator().manual_seed(32)
    x2d = torch.randn(23, 20, generator=generator).to(device).requires_grad_()
    row_valid = (torch.rand(23, generator=generator) > 0.3).to(device) if masked else None
    seed = torch.tensor([123]) if dropout_p > 0 else None
    weights = make_weights(20, 12, 2, torch.float32, device, generator=generator)
    return [x2d, *weights, [0, 9, 23], row_valid, dropout_p, seed, pool]


@pytest.mark.parametrize("pool, masked, dropout_p", [(True, True, 0.0), (True, False, 0.3), (False, False, 0.0)])
def test_opcheck(pool, masked, dropout_p, device):
    forward_args = op_inputs(pool, masked, dropout_p, device)
    torch.library.opcheck(torch.ops.milkernels.gated_attention_forward, forward_args)
    with torch.no_grad():
        pooled, scores, lse = torch.ops.milkernels.gated_attention_forward(*forward_args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in forward_args]
    d_pooled = torch.randn_like(pooled) if pool else None
    for wanted in ([True] * 7, [False, True, False, False, False, True, False]):
        torch.library.opcheck(torch.ops.milkernels.gated_attention_backward,
                              [*detached, scores, lse, pooled, d_pooled, torch.randn_like(scores), wanted])


def pool_and_scores(x, wa, ba, wb, bb, wc, bc, mask):
    """A scalar of pooling (padded bags, mask, dropout) and of the scores alone."""
    pooled, scores = gated_attention_pool(x, wa, ba, wb, bb, wc, bc, mask=mask, dropout_p=0.25)
    alone = gated_attention_scores(x[0], wa, ba, wb, bb, wc, bc)
    return pooled.square().sum() + scores.masked_fill(~mask[..., None], 0).sum() + alone.sum()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    generator = torch.Generator().manual_seed(33)
    x = torch.randn(2, 30, 20, generator=generator).requires_grad_()
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 21:] = False
    weights = make_weights(20, 12, 2, torch.float32, "cpu", generator=generator)
    kernel_checks.assert_compiles_without_graph_break(pool_and_scores, [x, *weights, mask], backend)


def test_double_backward_raises_on_triton():
    generator = torch.Generator().manual_seed(34)
    x = torch.randn(25, 20, generator=generator).requires_grad_()
    weights = make_weights(20, 12, 2, torch.float32, "cpu", generator=generator)
    name = "gated_attention_pool and gated_attention_scores"
    kernel_checks.assert_double_backward_raises(gated_attention_pool, [x, *weights], name)
    kernel_checks.assert_double_backward_raises(gated_attention_scores, [x, *weights], name)


def test_double_backward_on_the_reference():
    generator = torch.Generator().manual_seed(35)
    x = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64).requires_grad_()
    weights = kernel_checks.as_float64(make_weights(4, 3, 2, torch.float32, "cpu", generator=generator))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with milkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda *t: gated_attention_pool(*t, mask=mask), [x, *weights])


GEMM_BUDGET = 80  # dot FLOPs a requested byte of the score kernel, bf16 (issue 12: an H100's L2 stops being the bound)
TRAFFIC_BUDGET = 2.0  # requested bytes over the minimum, of the memory-bound kernels


def test_traffic_within_budget():
    """CLAM's shape (L = 1024, D = 256, K = 1), 256 rows, bf16, no dropout. The score kernel: 85.2 dot FLOPs a
    requested byte (30.0 before: weights re-read per 64 rows, x read per projection and D tile), its dot
    FLOPs exactly the projections'. The pooling kernel: 1.04x its minimum (x once). The backward's row kernel
    (no dot: ``H`` and the products with the weights are GEMMs outside): 1.04x its minimum (x and ``H`` read,
    dx and ``dH`` written once)."""
    rows, features, hidden, dtype = 256, 1024, 256, torch.bfloat16
    generator = torch.Generator().manual_seed(30)
    weights = make_weights(features, hidden, 1, dtype, "cpu", generator=generator)
    x = torch.randn(rows, features, generator=generator).to(dtype).requires_grad_()
    with milkernels.use_backend("triton"):
        with counting() as forward:
            pooled, scores = gated_attention_pool(x, *weights)
        with counting() as backward:
            (pooled.float().sum() + scores.float().sum()).backward()
    score, pool = forward.by_kernel["_score_kernel"], forward.by_kernel["_pool_kernel"]
    assert score.dot_flops == forward.dot_flops == 2 * rows * features * 2 * hidden
    assert score.dot_flops >= GEMM_BUDGET * score.requested_bytes
    x_bytes = rows * features * dtype.itemsize
    assert pool.requested_bytes <= TRAFFIC_BUDGET * x_bytes
    h_bytes = rows * 2 * hidden * kernels._gemm_dtype(dtype).itemsize
    assert backward.dot_flops == 0
    assert backward.by_kernel["_backward_rows_kernel"].requested_bytes <= TRAFFIC_BUDGET * 2 * (x_bytes + h_bytes)


def test_each_block_table_is_built_where_it_is_used(monkeypatch):
    """Each table is built on first use (a host-to-device copy each): the forward the score kernel's blocks and
    the pooling splits (not the pooling splits for scores alone), the backward its own splits only."""
    built = kernel_checks.record_block_tables(monkeypatch, kernels)
    generator = torch.Generator().manual_seed(10)
    weights = make_weights(16, 8, 2, torch.float32, "cpu", generator=generator)
    x = torch.randn(300, 16, generator=generator).requires_grad_()
    plan = kernels.Plan.make(pack_bags(x, 16), 8, 0.0, 0)
    with milkernels.use_backend("triton"):
        gated_attention_scores(x, *weights)
        assert built == [(300, plan.score.block_n)]
        pooled, _ = gated_attention_pool(x, *weights)
        assert built[1:] == [(300, plan.score.block_n), (300, plan.split_rows)]
        pooled.sum().backward()
    assert built[3:] == [(300, plan.grad_split_rows)]


def test_partials_do_not_grow_with_the_bag():
    """The pooling and backward splits are at most about TARGET_PROGRAMS programs, whatever N."""
    for rows in (10_000, 1_000_000):
        bags = pack_bags(torch.empty(rows, 1024, device="meta"), 1024, None, None)
        plan = kernels.Plan.make(bags, 256, 0.0, 0)
        assert plan.splits.num_blocks * (1024 // plan.cfg.pool_block_l) <= kernels.TARGET_PROGRAMS
        assert plan.grad_splits.num_blocks <= kernels.TARGET_PROGRAMS
