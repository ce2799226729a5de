"""Bags without instances (N = 0): each milkernels module returns what the layer it replaces returns
(shapes, dtypes, values, NaN where upstream has NaN) and the same gradients, although the fused ops
refuse such bags (``ValueError: empty bag``)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import milkernels
from milkernels.nn import GatedAttentionPool, MultiheadAttention
from test_anchor import EMBED, HEADS, TOKENS, make_model, unfused
from test_lin_mil import Attention, LinMILAttention, build
from test_nn import AttnNetGated
from test_query_attention_nn import ASMILAttention
from test_swap import AttentionPool

L, D, K = 12, 8, 2


def tensors(outputs) -> list:
    """The tensors among ``outputs`` (a tensor, or a tuple holding tensors and Nones)."""
    return [outputs] if isinstance(outputs, torch.Tensor) else [o for o in outputs if o is not None]


def outputs_and_grads(module, args, kwargs=None, forward=None):
    """``forward(*args, **kwargs)``'s tensors (``forward``: ``module`` by default) and ``{name: gradient}`` of a
    random mix of them w.r.t. ``args[0]`` ("input") and each parameter of ``module`` (None where the graph
    does not reach it)."""
    outputs = tensors((forward or module)(*args, **(kwargs or {})))
    generator = torch.Generator().manual_seed(0)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)).sum()
               for out in outputs)
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, [args[0], *params.values()], allow_unused=True)
    return outputs, dict(zip(["input", *params], grads))


def assert_same(got, want):
    """Same tensors (shape, dtype, values, NaN where NaN) and gradients (None where None)."""
    (outputs, grads), (expected, expected_grads) = got, want
    assert len(outputs) == len(expected)
    for out, exp in zip(outputs, expected):
        torch.testing.assert_close(out, exp, equal_nan=True)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (expected_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, expected_grads[name], equal_nan=True, msg=lambda m: f"{name}: {m}")


def assert_swap_keeps(upstream, replacement_type, args, kwargs=None):
    """``swap`` replaces ``upstream`` by a ``replacement_type`` giving its outputs and gradients on ``args``."""
    swapped = milkernels.swap(copy.deepcopy(upstream))
    assert type(swapped) is replacement_type
    assert_same(outputs_and_grads(swapped, args, kwargs), outputs_and_grads(upstream, args, kwargs))


def empty(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("shape", [(0, L), (3, 0, L)])
def test_clam_gated_attention(shape):
    torch.manual_seed(0)
    assert_swap_keeps(AttnNetGated(L, D, n_classes=K), milkernels.nn.GatedAttention, (empty(*shape),))


def clam_pool(attention, x):
    """CLAM's bag path on ``attention``'s output: ``(softmax(A_raw^T) @ x: (..., K, L), A_raw: (..., N, K))``."""
    scores, x = attention(x)
    return F.softmax(scores.transpose(-1, -2), dim=-1) @ x, scores


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(0, L), (2, 0, L)])
def test_gated_attention_pool(shape, masked):
    torch.manual_seed(0)
    clam = AttnNetGated(L, D, n_classes=K)
    pool = GatedAttentionPool.from_modules(clam.attention_a, clam.attention_b, clam.attention_c)
    x = empty(*shape)
    kwargs = dict(mask=torch.ones(shape[:-1], dtype=torch.bool)) if masked and len(shape) == 3 else {}
    expected = outputs_and_grads(clam, (x,), forward=lambda x: clam_pool(clam, x))
    assert_same(outputs_and_grads(pool, (x,), kwargs), expected)


@pytest.mark.parametrize("kwargs", [{}, dict(return_att=True), dict(mask=True), dict(mask=True, return_att=True)],
                         ids=["plain", "return_att", "mask", "mask_return_att"])
@pytest.mark.parametrize("shape", [(2, 0, L), (0, 3, L)])
@pytest.mark.parametrize("gated", [False, True])
def test_torchmil_attention_pool(gated, shape, kwargs):
    torch.manual_seed(0)
    if kwargs.get("mask"):
        kwargs = dict(kwargs, mask=torch.ones(shape[:2], dtype=torch.bool))
    assert_swap_keeps(AttentionPool(L, D, "tanh", gated), milkernels.nn.TorchmilAttentionPool, (empty(*shape),), kwargs)


def test_torchmil_empty_bag_pools_to_zeros():
    pool = milkernels.swap(AttentionPool(L, D, "tanh", True))
    z, f = pool(torch.randn(2, 0, L), return_att=True)
    assert torch.equal(z, torch.zeros(2, L)) and f.shape == (2, 0)


def test_lin_mil_linear_attention():
    torch.manual_seed(0)
    upstream = LinMILAttention(16, 2)
    assert_swap_keeps(upstream, milkernels.nn.LinearAttention, (empty(2, 0, 16),))
    fused = milkernels.swap(copy.deepcopy(upstream))
    x = empty(2, 0, 16)
    out, attention_map = fused.forward_with_map(x)
    assert out.shape == (2, 0, 16) and attention_map.shape == (2, 0)
    assert fused.forward_without_attention(x).shape == (2, 0, 16)
    out, numerator = fused(empty(0, 16))
    assert out.shape == (0, 16) and numerator.shape == (2, 0, 8)


def test_lin_mil_softmax_attention():
    torch.manual_seed(0)
    upstream = Attention(16, 2, 8)
    fused = milkernels.swap(copy.deepcopy(upstream))  # before a forward: the saved map stops deepcopy
    assert fused.forward_without_attention(empty(2, 0, 16)).shape == (2, 0, 16)
    assert_swap_keeps(upstream, milkernels.nn.SoftmaxAttention, (empty(2, 0, 16),))


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_lin_mil_model(pooling, attention):
    """Mean pooling over no token gives NaN logits upstream, and so after the swap."""
    torch.manual_seed(0)
    upstream = build(dim=16, heads=2, pooling=pooling, attention=attention).eval()
    swapped = milkernels.swap(copy.deepcopy(upstream))
    x = empty(2, 0, 20)
    expected = outputs_and_grads(upstream, (x,))
    assert expected[0][0].isnan().all() == (pooling == "mean")
    assert_same(outputs_and_grads(swapped, (x,)), expected)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_key_of_length_zero(batch_first, masked):
    """PyTorch's own result (its path runs: the fused path needs at least one key row), in training mode."""
    torch.manual_seed(0)
    upstream = nn.MultiheadAttention(16, 2, dropout=0.25, batch_first=batch_first)
    query, x = empty(2, 3, 16), empty(2, 0, 16)
    if not batch_first:
        query, x = query.transpose(0, 1), x.transpose(0, 1)
    kwargs = dict(key_padding_mask=torch.zeros(2, 0, dtype=torch.bool)) if masked else {}
    assert_swap_keeps(upstream, MultiheadAttention, (query, x, x), kwargs)


@pytest.mark.parametrize("rows", [(3, 0), (0, 5)], ids=["no_instance", "no_query"])
@pytest.mark.parametrize("softmax", [True, False])
def test_asmil_query_attention(softmax, rows):
    torch.manual_seed(0)
    queries, instances = rows
    x = empty(1, instances, 16)
    assert_swap_keeps(ASMILAttention(16, 2, softmax=softmax).eval(), milkernels.nn.QueryAttention,
                      (empty(1, queries, 16), x, x))


@pytest.mark.parametrize("training", [True, False])
def test_anchored_query_attention_matches_asmil(training):
    """One bag of no instance: tokens ``layer_norm(out_proj(0))``, logits ``(Tk, H, 0)``, a NaN loss in training."""
    model = make_model().train(training)
    x = empty(0, EMBED, dtype=torch.float64)
    out = model(x)
    assert out.tokens.shape == out.kept.shape == (TOKENS, EMBED) and out.logits.shape == (TOKENS, HEADS, 0)
    assert (out.loss is not None and out.loss.isnan()) if training else out.loss is None
    kept = 3 if training else 2  # tokens, logits and, in training, the loss
    expected = outputs_and_grads(model, (x,), forward=lambda x: unfused(model, x)[:kept])
    got = outputs_and_grads(model, (x,), forward=lambda x: (lambda o: (o.tokens, o.logits, o.loss))(model(x)))
    assert_same(got, expected)


def test_anchored_query_attention_padded_bags():
    model = make_model().eval()
    out = model(torch.randn(3, 0, EMBED, dtype=torch.float64), torch.ones(3, 0, dtype=torch.bool))
    single = model(torch.randn(0, EMBED, dtype=torch.float64))
    assert out.tokens.shape == (3, TOKENS, EMBED) and out.logits.shape == (3, TOKENS, HEADS, 0)
    torch.testing.assert_close(out.tokens, single.tokens.expand(3, -1, -1))
