"""torch.compile of swapped models (CLAM, torchmil, Lin-MIL, LiteMIL, ASMIL): no graph break, the eager
results, on the reference and triton backends; and double backward through a swapped model: PyTorch's
numbers on the reference backend, a clear error naming the op on the triton backend."""

import copy

import pytest
import torch
from torch import nn

import milkernels
from milkernels.bench import registry
from milkernels.nn import AnchoredQueryAttention
from test_lin_mil import INPUT_DIM, build
from test_nn import EMBED, ClamSB
from test_query_attention_nn import ASMIL, IN_DIM, LiteMIL, bags
from test_swap import TorchmilModel, inputs_for

BACKENDS = ["reference", "triton"]


def lin_mil_inputs():
    x = torch.randn(2, 23, INPUT_DIM, requires_grad=True)
    return x, torch.rand(2, 23, 2)


def anchored_inputs():
    x = torch.randn(2, 19, 32, requires_grad=True)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 12:] = False
    return x, mask


def anchored_outputs(model, x, mask):
    """Every tensor of :class:`AnchoredQueryAttention`'s output (training mode: with the loss)."""
    out = model(x, mask)
    return out.tokens, out.logits, out.loss


MODELS = {  # name: (build the upstream model, its inputs, a call giving a tuple of tensors)
    "clam_sb": (lambda: ClamSB(), lambda: inputs_for("clam_sb", 37, torch.float32, "cpu"), None),
    "torchmil_gated": (lambda: TorchmilModel(gated=True), lambda: inputs_for("torchmil_gated", 21, torch.float32, "cpu"),
                       None),
    "lin_mil": (lambda: build(dim=48, heads=4, pooling="cls", act="GeLU"), lin_mil_inputs, None),
    "lin_mil_mean": (lambda: build(dim=64, heads=8, pooling="mean", act="ReLU"), lin_mil_inputs, None),
    "lite_mil": (lambda: LiteMIL(4), lambda: bags(13, torch.float32, padded=True), None),
    "asmil_nsf": (lambda: ASMIL(softmax=False), lambda: (torch.randn(17, IN_DIM, requires_grad=True),), None),
    "anchored_query_attention": (lambda: AnchoredQueryAttention(32, 4, 3, dropout=0.0), anchored_inputs,
                                 anchored_outputs),
}


def run(model, inputs, call):
    """The output tensors of ``model`` on ``inputs`` and the gradients of a fixed random mix of them w.r.t. the
    first input and every parameter that takes one."""
    outputs = call(model, *inputs) if call else model(*inputs)
    outputs = [o for o in outputs if o is not None]
    generator = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outputs)
    wrt = [inputs[0], *(p for p in model.parameters() if p.requires_grad)]
    return outputs, torch.autograd.grad(loss, wrt, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_swapped_model_compiles_without_graph_break(name, backend):
    make, make_inputs, call = MODELS[name]
    torch.manual_seed(0)
    model = milkernels.swap(copy.deepcopy(make().train(name == "anchored_query_attention")))
    inputs = make_inputs()
    forward = (lambda *args: call(model, *args)) if call else model
    with milkernels.use_backend(backend):
        explained = torch._dynamo.explain(forward)(*inputs)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        got = run(compiled, inputs, call)
        want = run(model, inputs, call)
    for g, w in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        torch.testing.assert_close(g, w)


def test_compiled_multihead_attention_on_triton():
    """The issue's case: a compiled swapped nn.MultiheadAttention crashed in fake tensor propagation."""
    torch.manual_seed(0)
    mha = milkernels.swap(nn.MultiheadAttention(48, 4, batch_first=True))
    q, x = torch.randn(2, 1, 48), torch.randn(2, 30, 48, requires_grad=True)
    with milkernels.use_backend("triton"):
        out, weights = torch.compile(mha, backend="eager", fullgraph=True)(q, x, x)
        expected, expected_weights = mha(q, x, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def gradient_penalty(model, x):
    """WGAN-GP style: ``|d logits / d x|^2`` with ``create_graph=True``, then its gradients w.r.t. x and every
    parameter."""
    logits = model(x)[0]
    grad_x, = torch.autograd.grad(logits.square().sum(), x, create_graph=True)
    penalty = grad_x.square().sum()
    return penalty, torch.autograd.grad(penalty, [x, *model.parameters()], allow_unused=True)


def test_gradient_penalty_through_swapped_clam_on_the_reference_is_pytorchs():
    torch.manual_seed(0)
    upstream = ClamSB().to(torch.float64).eval()
    swapped = milkernels.swap(copy.deepcopy(upstream))
    x = torch.randn(29, EMBED, dtype=torch.float64, requires_grad=True)
    expected, expected_grads = gradient_penalty(upstream, x)
    with milkernels.use_backend("reference"):
        got, grads = gradient_penalty(swapped, x)
    torch.testing.assert_close(got, expected)
    names = ["x", *(n for n, _ in swapped.named_parameters())]
    for name, grad, want in zip(names, grads, expected_grads, strict=True):
        assert (grad is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(grad, want, msg=lambda m: f"{name}: {m}")
    assert expected_grads[0].abs().max() > 0 and expected_grads[1].abs().max() > 0


@pytest.mark.parametrize("name, message", [("clam_sb", "gated_attention_pool and gated_attention_scores"),
                                           ("lite_mil", "query_attention"), ("lin_mil", "linear_attention")])
def test_gradient_penalty_through_swapped_model_on_triton_names_the_op(name, message):
    make, make_inputs, _ = MODELS[name]
    torch.manual_seed(0)
    model = milkernels.swap(make().eval())
    x, *rest = make_inputs()
    with milkernels.use_backend("triton"):
        logits = model(x, *rest)[0]
        grad_x, = torch.autograd.grad(logits.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"milkernels\.{message}: double backward .* not supported .*"
                                           r"use_backend\('reference'\)"):
        grad_x.square().sum().backward()


UNTRACEABLE = {("cross_magnification_local", "reference"):
               "the PyTorch local path plans with data-dependent sizes (its triton path traces)"}


def benchmark_cases():
    """Every (op, backend), the untraceable ones as strict xfails (a fix makes them fail: move them out)."""
    for name in registry.ops():
        for backend in BACKENDS:
            reason = UNTRACEABLE.get((name, backend))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


@pytest.mark.parametrize("name, backend", list(benchmark_cases()))
def test_benchmark_ops_trace_without_graph_break(name, backend):
    """The benchmark's compiled baseline (``op.reference`` under ``fullgraph=True``) and its milkernels call
    trace whole (after one eager call, which builds the modules the benchmark caches)."""
    op = registry.ops()[name]
    inputs = op.build(150, op.cpu_dims, torch.float32, "cpu")
    with milkernels.use_backend(backend):
        op.call(*inputs)
        for fn in (op.reference, op.call):
            explained = torch._dynamo.explain(fn)(*inputs)
            assert explained.graph_break_count == 0, explained.break_reasons
