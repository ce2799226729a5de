"""milkernels.nn.query_attention: nn.MultiheadAttention's and ASMIL's attention contracts, fused and fallback.

Each fused comparison runs twice: the reference backend in float64 (tight) and the triton backend in
float32 (2e-4 relative to the largest magnitude). The LiteMIL- and ASMIL-shaped models here are also
the models of tests/test_swap_query_attention.py.
"""

import copy

import pytest
import torch
from torch import nn

import milkernels
import milkernels.nn.query_attention as qa
from milkernels.nn.query_attention import MultiheadAttention, QueryAttention
from milkernels.zoo import asmil as zoo_asmil
from test_nn import Case

IN_DIM, HID, HEADS = 64, 256, 4                       # LiteMIL: features, hidden width, heads
ASMIL_DIM, ASMIL_HEADS, ASMIL_TOKENS = 128, 8, 8
ROWS = [1, 17, 200]
QCASES = [Case("reference", torch.float64), Case("triton", torch.float32, (2e-4, 2e-4))]


@pytest.fixture(params=QCASES, ids=lambda c: f"{c.backend}-{str(c.dtype).removeprefix('torch.')}")
def qcase(request):
    """Each fused-path case, with its backend forced for the test (triton fails until its kernels land)."""
    with milkernels.use_backend(request.param.backend):
        yield request.param


@pytest.fixture
def op_calls(monkeypatch):
    """A list that gets one entry per call of the fused op by the modules."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return query_attention(*args, **kwargs)

    query_attention = qa.query_attention
    monkeypatch.setattr(qa, "query_attention", counted)
    return calls


class LiteMIL(nn.Module):
    """LiteMIL-shaped: instance encoder, learned queries ``(Q, HID)`` expanded over the batch, nn.MultiheadAttention
    (batch-first, or sequence-first with its inputs transposed)."""

    def __init__(self, queries=1, batch_first=True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, HID), nn.LayerNorm(HID), nn.ReLU())
        self.query = nn.Parameter(torch.randn(queries, HID))
        self.attention = nn.MultiheadAttention(HID, HEADS, dropout=0.25, batch_first=batch_first)
        self.classifier = nn.Linear(HID, 2)

    def forward(self, x, key_padding_mask=None, average_attn_weights=True):
        """``x: (B, N, IN_DIM)``, ``key_padding_mask: (B, N)`` True = padding -> ``(logits: (B, 2),
        weights: (B, Q, N) or per head (B, H, Q, N))``."""
        h = self.encoder(x)
        query = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        if not self.attention.batch_first:
            query, h = query.transpose(0, 1), h.transpose(0, 1)
        pooled, weights = self.attention(query, h, h, key_padding_mask=key_padding_mask,
                                         average_attn_weights=average_attn_weights)
        return self.classifier(pooled.mean(dim=1 if self.attention.batch_first else 0)), weights


class ASMILAttention(zoo_asmil.ASMILAttention):
    """ASMIL's multi-head attention (:class:`milkernels.zoo.asmil.ASMILAttention`), unfused: what swap replaces;
    a subclass so that swap reports name it ``test_query_attention_nn.ASMILAttention``."""


class ASMIL(nn.Module):
    """ASMIL-shaped: an instance encoder, 8 learnable FEAT tokens, one attention module per token."""

    def __init__(self, attention=ASMILAttention, softmax=True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, ASMIL_DIM), nn.ReLU())
        self.tokens = nn.Parameter(torch.randn(1, ASMIL_TOKENS, ASMIL_DIM))
        self.attentions = nn.ModuleList([attention(ASMIL_DIM, ASMIL_HEADS, softmax=softmax)
                                         for _ in range(ASMIL_TOKENS)])
        self.classifier = nn.Linear(ASMIL_TOKENS * ASMIL_DIM, 2)

    def forward(self, x):
        """``x: (N, IN_DIM)`` -> ``(logits: (1, 2), attention logits: (H, 8, N))``."""
        h = self.encoder(x)[None]
        tokens = self.tokens.split(1, dim=1)
        outs, logits = zip(*(attention(token, h, h) for token, attention in zip(tokens, self.attentions)))
        return self.classifier(torch.cat(outs).reshape(1, -1)), torch.cat(logits, dim=1)


def fused_copy(model):
    """A deep copy of ``model`` whose attention modules are ours (``from_module``), for side-by-side runs."""
    ours = {nn.MultiheadAttention: MultiheadAttention, ASMILAttention: QueryAttention}
    fused = copy.deepcopy(model)
    for name, module in list(fused.named_modules()):
        if type(module) in ours:
            parent, _, child = name.rpartition(".")
            setattr(fused.get_submodule(parent), child, ours[type(module)].from_module(module))
    return fused


def bags(rows, dtype, padded=False, batch=3):
    """``(x: (batch, rows, IN_DIM), key_padding_mask: (batch, rows) True = padding, or None)``; with
    ``padded`` the bags after the first hold about 2/3 and 1/3 of the rows."""
    x = torch.randn(batch, rows, IN_DIM, dtype=dtype, requires_grad=True)
    if not padded:
        return x, None
    lengths = torch.tensor([rows, max(1, rows * 2 // 3), max(1, rows // 3)])[:batch]
    return x, torch.arange(rows)[None] >= lengths[:, None]


def outputs_and_grads(model, inputs, *args, **kwargs):
    """``(outputs, {name: gradient})`` of a random mix of the outputs, w.r.t. ``inputs`` (a tensor) and
    every parameter; padded instances' attention weights (NaN-free zeros) count too."""
    outputs = model(inputs, *args, **kwargs)
    generator = torch.Generator().manual_seed(5)
    loss = sum((out * torch.randn(out.shape, generator=generator).to(out)).sum() for out in outputs)
    names, tensors = zip(*[("input", inputs), *model.named_parameters()])
    return outputs, dict(zip(names, torch.autograd.grad(loss, tensors)))


def assert_same(case, outputs, expected, grads, expected_grads, zero_ok=()):
    """Outputs and every gradient within ``case``'s tolerance, relative to each tensor's largest magnitude;
    a gradient named in ``zero_ok`` may be all zeros (else a zero expectation would prove nothing)."""
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, **case.tol(want.abs().max().item()))
    assert grads.keys() == expected_grads.keys()
    for name, want in expected_grads.items():
        scale = want.abs().max().item()
        assert scale > 0 or name in zero_ok, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads[name], want, **case.tol(scale or 1.0), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("queries", [1, 4])
def test_lite_mil_attention_matches_pytorch(qcase, op_calls, queries, rows, padded, average):
    torch.manual_seed(0)
    model = LiteMIL(queries).to(qcase.dtype).eval()
    fused = fused_copy(model)
    x, mask = bags(rows, qcase.dtype, padded)
    expected, expected_grads = outputs_and_grads(model, x, mask, average)
    outputs, grads = outputs_and_grads(fused, x, mask, average)
    assert len(op_calls) == 1 and op_calls[0]["need_weights"]
    assert outputs[1].shape == ((3, queries, rows) if average else (3, HEADS, queries, rows))
    assert_same(qcase, outputs, expected, grads, expected_grads, zero_ok=("query",) if rows == 1 else ())


@pytest.mark.parametrize("layout", ["sequence_first", "unbatched", "separate_kv_dims"])
def test_other_layouts_and_projections_match_pytorch(qcase, op_calls, layout):
    """Sequence-first ``(L, B, E)``, unbatched ``(L, E)`` with an ``(S,)`` mask, and ``kdim = vdim != E``
    (``q/k/v_proj_weight``) without biases; a query per bag (not expanded)."""
    torch.manual_seed(0)
    kdim = 48 if layout == "separate_kv_dims" else HID
    mha = nn.MultiheadAttention(HID, HEADS, batch_first=layout == "separate_kv_dims", bias=layout != "separate_kv_dims",
                                kdim=kdim, vdim=kdim).to(qcase.dtype).eval()
    fused = MultiheadAttention.from_module(mha)
    query = torch.randn(2, 3, HID, dtype=qcase.dtype, requires_grad=True)
    x = torch.randn(2, 30, kdim, dtype=qcase.dtype, requires_grad=True)
    mask = torch.arange(30)[None] >= torch.tensor([[30], [11]])
    if layout == "sequence_first":
        query, x = query.transpose(0, 1), x.transpose(0, 1)
    elif layout == "unbatched":
        query, x, mask = query[1], x[1], mask[1]

    def run(module, tensor):
        outputs = module(query, tensor, tensor, key_padding_mask=mask, average_attn_weights=False)
        generator = torch.Generator().manual_seed(5)
        loss = sum((out * torch.randn(out.shape, generator=generator).to(out)).sum() for out in outputs)
        names, tensors = zip(*[("query", query), ("x", tensor), *module.named_parameters()])
        return outputs, dict(zip(names, torch.autograd.grad(loss, tensors)))

    expected, expected_grads = run(mha, x)
    outputs, grads = run(fused, x)
    assert len(op_calls) == 1
    assert_same(qcase, outputs, expected, grads, expected_grads)


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("rows", ROWS)
def test_asmil_attention_matches_plain_module(qcase, op_calls, rows, softmax):
    torch.manual_seed(0)
    model = ASMIL(softmax=softmax).to(qcase.dtype).eval()
    fused = fused_copy(model)
    x = torch.randn(rows, IN_DIM, dtype=qcase.dtype, requires_grad=True)
    expected, expected_grads = outputs_and_grads(model, x)
    outputs, grads = outputs_and_grads(fused, x)
    assert len(op_calls) == ASMIL_TOKENS
    assert {call["normalization"] for call in op_calls} == {"softmax" if softmax else "nsf"}
    assert outputs[1].shape == (ASMIL_HEADS, ASMIL_TOKENS, rows)
    assert_same(qcase, outputs, expected, grads, expected_grads)


def test_asmil_training_dropout_matches_plain_module(qcase):
    """ASMIL's dropout acts after out_proj, outside the op: the same seed gives the same output."""
    torch.manual_seed(0)
    plain = ASMILAttention(ASMIL_DIM, ASMIL_HEADS, dropout=0.5).to(qcase.dtype).train()
    fused = QueryAttention.from_module(plain)
    q = torch.randn(1, 3, ASMIL_DIM, dtype=qcase.dtype)
    x = torch.randn(1, 40, ASMIL_DIM, dtype=qcase.dtype)
    torch.manual_seed(1)
    expected = plain(q, x, x)
    torch.manual_seed(1)
    outputs = fused(q, x, x)
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, **qcase.tol(want.abs().max().item()))


def test_mha_training_dropout(qcase):
    """Dropout on the attention weights in training: finite output, zeros where dropped, the kept weights
    scaled by 1 / (1 - p), the output pooled with those very weights, and one seed one draw. PyTorch's own
    random draw is not reproduced (the op draws its mask in its own layout)."""
    torch.manual_seed(0)
    mha = MultiheadAttention(HID, HEADS, dropout=0.25, batch_first=True).to(qcase.dtype)
    query = torch.randn(2, 4, HID, dtype=qcase.dtype)
    x = torch.randn(2, 50, HID, dtype=qcase.dtype)
    expected = mha.eval()(query, x, x, average_attn_weights=False)[1]
    mha.train()
    torch.manual_seed(3)
    out, weights = mha(query, x, x, average_attn_weights=False)
    torch.manual_seed(3)
    assert torch.equal(mha(query, x, x, average_attn_weights=False)[1], weights)
    assert torch.isfinite(out).all()
    dropped = weights == 0
    assert 0.15 < dropped.double().mean().item() < 0.35
    torch.testing.assert_close(weights[~dropped], expected[~dropped] / 0.75, **qcase.tol())
    values = torch.nn.functional.linear(x, mha.in_proj_weight.chunk(3)[2], mha.in_proj_bias.chunk(3)[2])
    values = values.unflatten(-1, (HEADS, -1)).transpose(1, 2)                          # (B, H, S, dh)
    pooled = (weights @ values).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, mha.out_proj(pooled), **qcase.tol(out.abs().max().item()))


def _attn_mask(query, x):
    return dict(attn_mask=torch.zeros(query.shape[1], x.shape[1], dtype=query.dtype))


def _float_padding(query, x):
    return dict(key_padding_mask=torch.zeros(x.shape[:2], dtype=query.dtype).index_fill(1, torch.tensor([2]), -1.5))


FALLBACKS = {
    "attn_mask": lambda query, x: (query, x, x, _attn_mask(query, x)),
    "is_causal": lambda query, x: (x, x, x, dict(attn_mask=torch.ones(20, 20).triu(1).bool(), is_causal=True)),
    "long_self_attention": lambda query, x: (x[:, :65], x[:, :65], x[:, :65], {}),
    "key_is_not_value": lambda query, x: (query, x, x.clone(), {}),
    "float_key_padding_mask": lambda query, x: (query, x, x, _float_padding(query, x)),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_mha_fallbacks_are_pytorch(op_calls, name):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(HID, HEADS, batch_first=True).eval()
    fused = MultiheadAttention.from_module(mha)
    query, x = torch.randn(2, 3, HID), torch.randn(2, 70 if name == "long_self_attention" else 20, HID)
    *args, kwargs = FALLBACKS[name](query, x)
    for out, want in zip(fused(*args, **kwargs), mha(*args, **kwargs), strict=True):
        assert torch.equal(out, want)
    assert op_calls == []


def test_asmil_key_not_value_is_the_plain_composition(op_calls):
    torch.manual_seed(0)
    plain = ASMILAttention(ASMIL_DIM, ASMIL_HEADS, softmax=False).double().eval()
    q, k, v = (torch.randn(1, rows, ASMIL_DIM, dtype=torch.float64) for rows in (3, 9, 9))
    for out, want in zip(QueryAttention.from_module(plain)(q, k, v), plain(q, k, v), strict=True):
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert op_calls == []


def test_from_module_shares_parameters_and_flags():
    mha = nn.MultiheadAttention(HID, HEADS, dropout=0.25, kdim=32, vdim=32).train()
    fused = MultiheadAttention.from_module(mha)
    assert isinstance(fused, nn.MultiheadAttention) and fused.training and fused.out_proj is mha.out_proj
    assert list(fused.state_dict()) == list(mha.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), mha.parameters(), strict=True))
    assert (fused.dropout, fused.batch_first, fused.kdim, fused.num_heads) == (0.25, False, 32, HEADS)
    plain = ASMILAttention(ASMIL_DIM, ASMIL_HEADS, softmax=False).eval()
    ours = QueryAttention.from_module(plain)
    assert not ours.training and ours.softmax is False and ours.num_heads == ASMIL_HEADS
    assert all(getattr(ours, name) is child for name, child in plain.named_children())
    assert list(ours.state_dict()) == list(plain.state_dict())


def test_query_attention_constructor_matches_asmil():
    ours, plain = QueryAttention(ASMIL_DIM, 4, downsample_rate=2, dropout=0.2), ASMILAttention(ASMIL_DIM, 4, 2, 0.2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert (ours.internal_dim, ours.dropout.p, ours.layer_norm.eps, ours.softmax) == (ASMIL_DIM // 2, 0.2, 1e-6, True)
    with pytest.raises(ValueError, match="must divide"):
        QueryAttention(ASMIL_DIM, 3)
