"""FLOP formulas of the ``milkernels::`` custom ops: ``FlopCounterMode`` counts the same matmul FLOPs for a call
on the triton backend (the custom ops, interpreted on CPU) as on the reference backend, for the forward alone
and for forward + backward; and every custom op has a formula."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import milkernels
from milkernels.ops import (anchor_kl, cross_attention, dilated_attention, gated_attention_pool,
                            gated_attention_scores, lin_mil_attention, linear_attention, nsf, projected_linear_attention,
                            query_attention)
from milkernels.ops._bags import pack_bags
from milkernels.ops._library import NAMESPACE
from milkernels.ops.cross_attention.local import LocalNeighbourhood
from milkernels.ops.gated_attention import reference as gated_reference
from milkernels.ops.query_attention import folded_attention

HIDDEN = 5  # D of the gated attention weights


def randn(*shape, dtype=torch.float32, seed=0, grad=True):
    """A random tensor of ``shape`` and ``dtype``, requiring grad when ``grad``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype).requires_grad_(grad)


def counted_flops(backend: str, call, backward: bool) -> int:
    """The FLOPs ``FlopCounterMode`` counts for ``call()`` on ``backend``; with ``backward`` also for a backward
    from the tensors ``call`` returns (None entries left out)."""
    with milkernels.use_backend(backend), FlopCounterMode(display=False) as counter:
        outputs = [out for out in call() if out is not None]
        if backward:
            torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
    return counter.get_total_flops()


def assert_counts_agree(call) -> int:
    """Assert that the triton backend counts the reference's FLOPs for ``call``, forward alone and forward +
    backward; return the reference's forward + backward count."""
    for backward in (False, True):
        reference, triton = (counted_flops(backend, call, backward) for backend in ("reference", "triton"))
        assert triton == reference, f"backward={backward}: triton counts {triton}, the reference {reference}"
    return reference


def gated_inputs(x_shape, heads=3, gated=True, biases=True, dtype=torch.float32, frozen=()):
    """``[x, wa, ba, wb, bb, wc, bc]`` for ``x: x_shape`` (L its last size), D = HIDDEN and K = ``heads``; the
    gate's weights are None unless ``gated``, the biases unless ``biases``; those named in ``frozen`` take no
    gradient."""
    features = x_shape[-1]
    shapes = dict(x=x_shape, wa=(HIDDEN, features), ba=(HIDDEN,), wb=(HIDDEN, features), bb=(HIDDEN,),
                  wc=(heads, HIDDEN), bc=(heads,))
    absent = ({"wb", "bb"} if not gated else set()) | ({"ba", "bb", "bc"} if not biases else set())
    return [None if name in absent else randn(*shape, dtype=dtype, seed=seed, grad=name not in frozen)
            for seed, (name, shape) in enumerate(shapes.items())]


@pytest.mark.parametrize("x_shape, kwargs, options", [
    pytest.param((7, 6), {}, {}, id="one-bag"),
    pytest.param((1, 7, 6), {}, {}, id="padded-one-bag-no-mask"),
    pytest.param((2, 7, 6), dict(mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3])), {}, id="padded-mask"),
    pytest.param((9, 6), dict(cu_seqlens=torch.tensor([0, 2, 9])), {}, id="packed"),
    pytest.param((7, 6), {}, dict(heads=1, gated=False, biases=False), id="ungated-no-bias-one-head"),
    pytest.param((2, 7, 6), {}, dict(gated=False), id="padded-ungated"),
    pytest.param((7, 6), {}, dict(dtype=torch.bfloat16), id="bfloat16"),
    pytest.param((7, 6), dict(dropout_p=0.3), {}, id="dropout"),
    pytest.param((7, 6), {}, dict(frozen=("x",)), id="weights-only"),
    pytest.param((7, 6), {}, dict(frozen=("wa", "ba", "wb", "bb", "wc", "bc")), id="x-only"),
    pytest.param((9, 6), dict(cu_seqlens=torch.tensor([0, 4, 9])), dict(frozen=("x", "wa", "ba", "wc", "bc")),
                 id="gate-only-packed"),
])
@pytest.mark.parametrize("outputs", [(0, 1), (0,), (1,)], ids=["pooled-and-scores", "pooled", "scores"])
def test_gated_attention_pool(x_shape, kwargs, options, outputs):
    inputs = gated_inputs(x_shape, **options)
    call = lambda: [gated_attention_pool(*inputs, **kwargs)[i] for i in outputs]  # noqa: E731
    assert assert_counts_agree(call) > 0


@pytest.mark.parametrize("options", [{}, dict(gated=False, heads=1)], ids=["gated", "ungated"])
def test_gated_attention_scores(options):
    inputs = gated_inputs((2, 5, 6), **options)
    assert assert_counts_agree(lambda: [gated_attention_scores(*inputs)]) > 0


@pytest.mark.parametrize("gated", [True, False])
def test_cuda_scores_formula_counts_the_reference_scores(gated):
    """The cuda backend's scoring op (no CUDA here): its formula against the reference's scores."""
    inputs = gated_inputs((7, 6), gated=gated)
    with FlopCounterMode(display=False) as counter:
        gated_reference.gated_scores(*inputs)
    formula = flop_registry[getattr(torch.ops, NAMESPACE).gated_attention_cuda_scores]
    assert formula(*inputs, out_val=None) == counter.get_total_flops() > 0


def linear_call(shape, heads, outputs=(0, 1, 2), temperature=True, dtype=torch.float32, **kwargs):
    """A call of :func:`linear_attention` on ``qkv: shape`` returning ``(out, numerator, map)`` at ``outputs``."""
    qkv = randn(*shape, dtype=dtype)
    tau = randn(heads, dtype=dtype, seed=1).detach().abs().add(0.5).requires_grad_() if temperature else None
    return lambda: [linear_attention(qkv, heads, temperature=tau, return_numerator=True, return_map=True,
                                     **kwargs)[i] for i in outputs]


@pytest.mark.parametrize("call", [
    pytest.param(linear_call((7, 18), 2, denominator="clamp"), id="one-bag-clamp"),
    pytest.param(linear_call((2, 5, 18), 3, temperature=False, mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])),
                 id="padded-mask-three-heads"),
    pytest.param(linear_call((9, 12), 1, cu_seqlens=torch.tensor([0, 1, 9]), activation="elu"),
                 id="packed-one-head"),
    pytest.param(linear_call((7, 18), 2, outputs=(2,)), id="map-only"),
    pytest.param(linear_call((7, 18), 2, outputs=(1,)), id="numerator-only"),
    pytest.param(linear_call((7, 18), 2, outputs=(0,)), id="out-only"),
    pytest.param(linear_call((7, 24), 8, dtype=torch.bfloat16), id="bfloat16-head-size-one"),
])
def test_linear_attention(call):
    assert assert_counts_agree(call) > 0


def test_lin_mil_attention():
    qkv, temperature = randn(2, 6, 18), randn(3, 1, 1, seed=1)
    assert assert_counts_agree(lambda: [lin_mil_attention(qkv, temperature, 3)]) > 0


@pytest.mark.parametrize("bias, return_map", [(True, True), (False, False)], ids=["bias-map", "no-bias-out"])
def test_projected_linear_attention(bias, return_map):
    x, weight = randn(2, 6, 5), randn(18, 5, seed=1)
    qkv_bias = randn(18, seed=2) if bias else None
    call = lambda: projected_linear_attention(x, weight, qkv_bias, 3, return_map=return_map)  # noqa: E731
    assert assert_counts_agree(lambda: call() if return_map else [call()]) > 0


def dilated_call(shape, segments, rates, dtype=torch.float32, **kwargs):
    """A call of :func:`dilated_attention` on ``q, k, v`` of ``shape`` returning ``[out]``."""
    q, k, v = (randn(*shape, dtype=dtype, seed=seed) for seed in range(3))
    return lambda: [dilated_attention(q, k, v, segments, rates, **kwargs)]


@pytest.mark.parametrize("call", [
    pytest.param(dilated_call((21, 3, 4), [8, 16, 32], [1, 2, 4]), id="torchscale-padded-segments-rate-over-heads"),
    pytest.param(dilated_call((11, 2, 3), [6, 4], [4, 1], cu_seqlens=torch.tensor([0, 5, 11])),
                 id="torchscale-packed-rate-not-dividing"),
    pytest.param(dilated_call((2, 10, 2, 4), [4, 8], [1, 2]), id="torchscale-padded-bags"),
    pytest.param(dilated_call((13, 2, 4), [4, 8], [1, 2], dtype=torch.float16), id="torchscale-float16"),
    pytest.param(dilated_call((2, 10, 2, 4), [4, 8], [1, 2], mode="exact",
                              mask=torch.tensor([[1] * 10, [1] * 6 + [0] * 4])), id="exact-mask"),
    pytest.param(dilated_call((300, 1, 2), [8, 16], [2, 4], mode="exact"), id="exact-two-query-chunks"),
    pytest.param(dilated_call((12, 3, 5), [4], [2], mode="exact", cu_seqlens=torch.tensor([0, 3, 12]),
                              dtype=torch.bfloat16), id="exact-packed-bfloat16"),
])
def test_dilated_attention(call):
    assert assert_counts_agree(call) > 0


def cross_call(queries, keys, width, batch=(), dtype=torch.float32, **kwargs):
    """A call of :func:`cross_attention` on ``xq, q: (*batch, queries, width)``, ``k, v: (*batch, keys, width)`` and
    LayerNorm parameters, returning ``[out]``."""
    rows = [randn(*batch, n, width, dtype=dtype, seed=seed) for seed, n in enumerate((queries, queries, keys, keys))]
    params = [randn(width, seed=seed) for seed in (4, 5)]
    return lambda: [cross_attention(*rows, *params, **kwargs)]


PADDING = torch.arange(6) >= torch.tensor([[6], [2]])  # the second of two bags of 6 keys: 4 padding keys


@pytest.mark.parametrize("call", [
    pytest.param(cross_call(7, 5, 12, heads=3), id="one-bag-three-heads"),
    pytest.param(cross_call(4, 6, 8, batch=(2,), key_padding_mask=PADDING), id="padded-mask"),
    pytest.param(cross_call(9, 11, 8, cu_seqlens_q=torch.tensor([0, 4, 9]), cu_seqlens_k=torch.tensor([0, 0, 11])),
                 id="packed-empty-key-bag"),
    pytest.param(cross_call(3, 300, 16, heads=2), id="split-kv"),
    pytest.param(cross_call(5, 7, 8, dtype=torch.bfloat16), id="bfloat16"),
])
def test_cross_attention(call):
    assert assert_counts_agree(call) > 0


def query_inputs(x_shape, count=2, width=8, per_bag=False, biases=True, frozen=()):
    """``[x, query, wk, bk, wv, bv]`` for ``x: x_shape`` and ``count`` queries of ``width``; ``query`` is one set
    per bag with ``per_bag``; no biases unless ``biases``; those named in ``frozen`` take no gradient."""
    features = x_shape[-1]
    query_shape = (x_shape[0], count, width) if per_bag else (count, width)
    shapes = dict(x=x_shape, query=query_shape, wk=(width, features), bk=(width,), wv=(width, features), bv=(width,))
    return [None if not biases and name in ("bk", "bv") else randn(*shape, seed=seed, grad=name not in frozen)
            for seed, (name, shape) in enumerate(shapes.items())]


def query_call(inputs, heads=2, outputs=(0, 1, 2), **kwargs):
    """A call of :func:`query_attention` with weights and logits, returning ``(out, weights, logits)`` at
    ``outputs``; masked logits (-inf) are replaced by 0."""
    def call():
        result = query_attention(*inputs, heads, need_weights=True, need_logits=True, **kwargs)
        return [result[i] if i < 2 else result[i].nan_to_num(neginf=0.0) for i in outputs]

    return call


@pytest.mark.parametrize("call", [
    pytest.param(query_call(query_inputs((7, 6))), id="one-bag-softmax"),
    pytest.param(query_call(query_inputs((2, 5, 6)), normalization="nsf",
                            mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])), id="padded-mask-nsf"),
    pytest.param(query_call(query_inputs((2, 9, 6), per_bag=True), heads=4), id="per-bag-queries"),
    pytest.param(query_call(query_inputs((9, 6), biases=False), cu_seqlens=torch.tensor([0, 4, 9]), dropout_p=0.3),
                 id="packed-no-bias-dropout"),
    pytest.param(query_call(query_inputs((7, 6), frozen=("x",))), id="weights-only"),
    pytest.param(query_call(query_inputs((7, 6), frozen=("query", "wk", "bk", "wv", "bv")), outputs=(0,)),
                 id="x-only-out-only"),
    pytest.param(query_call(query_inputs((7, 6)), outputs=(2,)), id="logits-only"),
])
def test_query_attention(call):
    assert assert_counts_agree(call) > 0


@pytest.mark.parametrize("outputs", [(0, 1, 2, 3), (0,), (1,), (2,)], ids=["all", "pooled", "mass", "z"])
@pytest.mark.parametrize("frozen", [(), ("x",), ("u",), ("x", "u")], ids=["all", "u-c", "x-c", "c"])
def test_folded_attention_with_score_only_columns(outputs, frozen):
    """20 columns, the first 12 pooled, NSF from column 8 (``milkernels.nn.AnchoredQueryAttention``'s form)."""
    x, u, c = (randn(*shape, seed=seed, grad=name not in frozen)
               for seed, (name, shape) in enumerate(dict(x=(2, 6, 5), u=(1, 20, 5), c=(1, 20)).items()))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])

    def call():
        folded = folded_attention(pack_bags(x, 5, mask), u, c, nsf_from=8, num_pooled=12, need_weights=True)
        return [folded[i] for i in outputs]

    assert assert_counts_agree(call) > 0


def test_nsf_and_anchor_kl_count_no_flops():
    """Their references run no matmul; their ops count 0 (the formulas run without error)."""
    online, anchor = randn(3, 7), randn(3, 7, seed=1)
    mask = torch.tensor([1, 1, 1, 1, 0, 1, 0])
    assert assert_counts_agree(lambda: [nsf(online, 0.5, mask=mask)]) == 0
    assert assert_counts_agree(lambda: [anchor_kl(online, anchor, 0.5, mask=mask)]) == 0


def test_local_cross_attention_counts_no_attention_flops():
    """The local reference gathers its neighbouring pairs (no matmul); the local ops count 0 as well."""
    coords_q, coords_k = torch.tensor([[0, 0], [512, 0], [9000, 0]]), torch.tensor([[0, 0], [256, 256], [512, 0]])
    local = LocalNeighbourhood(coords_q, coords_k, 512, 256)
    assert assert_counts_agree(cross_call(3, 3, 8, heads=2, local=local)) == 0


def test_every_custom_op_has_a_flop_formula():
    names = [name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith(f"{NAMESPACE}::")]
    missing = [name for name in names if getattr(getattr(torch.ops, NAMESPACE), name) not in flop_registry]
    assert names and not missing, f"custom ops without a FLOP formula: {missing}"
