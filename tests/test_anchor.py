"""EMAAnchor and AnchoredQueryAttention against an unfused plain-PyTorch ASMIL composition."""

import copy
import math

import pytest
import torch
from torch import nn

import milkernels
from milkernels.nn.anchor import AnchoredQueryAttention, EMAAnchor

import kernel_checks

EMBED, HEADS, TOKENS, TEMPERATURE = 128, 8, 8, 0.5


def head_logits(module, query, x, heads):
    """``(H, N)``: ``q_proj(query) . k_proj(x) / sqrt(dh)`` per head, the keys formed over the whole bag."""
    head_dim = x.shape[1] // heads
    q = module.q_proj(query).reshape(heads, head_dim)
    k = module.k_proj(x).reshape(-1, heads, head_dim)
    return torch.einsum("hd,nhd->hn", q, k) / math.sqrt(head_dim)


def attend(module, query, x, heads):
    """ASMIL's per-token module from its children, unfused, ``k = v = x``: ``(out: (E,), logits: (H, N))``."""
    logits = head_logits(module, query, x, heads)
    v = module.v_proj(x).reshape(x.shape[0], heads, x.shape[1] // heads)  # not -1: N may be 0
    out = torch.einsum("hn,nhd->hd", logits.softmax(-1), v).reshape(-1)
    return module.layer_norm(module.dropout(module.out_proj(out))), logits


def nsf(scores, temperature):
    weights = torch.sigmoid(scores / temperature)
    return weights / (weights.sum(-1, keepdim=True) + 1e-8)


def unfused(model, x):
    """ASMIL's composition on one bag ``x: (N, E)``: ``(tokens: (Tk, E), logits: (Tk, H, N), L_kd)``."""
    outs, logits, anchor_logits = [], [], []
    for query, online, anchor in zip(model.query, model.tokens, model.anchor.module):
        out, scores = attend(online, query, x, model.num_heads)
        with torch.no_grad():
            anchor_scores = head_logits(anchor, query, x, model.num_heads)
        outs.append(out)
        logits.append(scores)
        anchor_logits.append(anchor_scores)
    logits, anchor_logits = torch.stack(logits), torch.stack(anchor_logits)
    loss = -(nsf(anchor_logits, model.temperature) * logits.log_softmax(-1)).mean()
    return torch.stack(outs), logits, loss


def make_model(dtype=torch.float64, seed=0, **kwargs):
    """A model with spread-out logits and an anchor that differs from the online tokens."""
    torch.manual_seed(seed)
    options = dict(temperature=TEMPERATURE, dropout=0.0) | kwargs
    model = AnchoredQueryAttention(EMBED, HEADS, TOKENS, **options).to(dtype)
    with torch.no_grad():
        model.query.normal_(std=2.0)
        for parameter in model.anchor.module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def online_inputs(model, x):
    return [x, *(p for p in model.parameters() if p.requires_grad)]


def outputs_and_grads(outputs, inputs, seed=1):
    """The three outputs and the gradients of ``inputs`` for fixed random output gradients."""
    tokens, logits, loss = outputs
    generator = torch.Generator().manual_seed(seed)
    objective = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
                    for out in (tokens, logits)) + 3.0 * loss
    return [tokens, logits, loss, *torch.autograd.grad(objective, inputs)]


def assert_all_close(got, want, rtol=None):
    for g, w in zip(got, want, strict=True):
        if rtol is None:
            torch.testing.assert_close(g, w)
        else:
            torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=rtol * w.abs().max().item())


def compare_with_unfused(backend, dtype, n, rtol=None, model=None, x=None):
    model = make_model(dtype) if model is None else model
    x = torch.randn(n, EMBED, dtype=dtype, requires_grad=True) if x is None else x
    inputs = online_inputs(model, x)
    want = outputs_and_grads(unfused(model, x), inputs)
    with milkernels.use_backend(backend):
        out = model(x)
    assert out.tokens.shape == (TOKENS, EMBED) and out.logits.shape == (TOKENS, HEADS, n)
    assert_all_close(outputs_and_grads((out.tokens, out.logits, out.loss), inputs), want, rtol)


@pytest.mark.parametrize("n", [1, 17, 300])
def test_matches_unfused_reference_float64(n):
    compare_with_unfused("reference", torch.float64, n)


@pytest.mark.parametrize("n", [1, 17, 300])
def test_matches_unfused_triton_float32(n):
    compare_with_unfused("triton", torch.float32, n, rtol=2e-4)


def test_token_module_forward_is_the_unfused_definition():
    model = make_model()
    x = torch.randn(9, EMBED, dtype=torch.float64)
    module = model.tokens[3]
    out, logits = module(model.query[3][None, None], x[None], x[None])
    want_out, want_logits = attend(module, model.query[3], x, HEADS)
    assert out.shape == (1, EMBED) and logits.shape == (HEADS, 1, 9)
    torch.testing.assert_close(out[0], want_out)
    torch.testing.assert_close(logits[:, 0], want_logits)


def test_dropout_matches_unfused_under_one_seed():
    model = make_model(dropout=0.5)
    x = torch.randn(20, EMBED, dtype=torch.float64)
    torch.manual_seed(5)
    want_tokens, _, want_loss = unfused(model, x)
    with milkernels.use_backend("reference"):
        torch.manual_seed(5)
        out = model(x)
        other_draw = model(x)
    assert not torch.allclose(out.tokens, other_draw.tokens)
    torch.testing.assert_close(out.tokens, want_tokens)
    torch.testing.assert_close(out.loss, want_loss)


def test_padded_bags_with_a_mask_match_single_bags():
    model = make_model()
    lengths = (5, 12)
    x = torch.randn(2, 12, EMBED, dtype=torch.float64)
    x[0, 5:] = float("nan")  # padding is never read
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    with milkernels.use_backend("reference"):
        out = model(x, mask)
        singles = [model(x[b, :length]) for b, length in enumerate(lengths)]
    assert out.tokens.shape == (2, TOKENS, EMBED) and out.logits.shape == (2, TOKENS, HEADS, 12)
    for b, (single, length) in enumerate(zip(singles, lengths)):
        torch.testing.assert_close(out.tokens[b], single.tokens)
        torch.testing.assert_close(out.logits[b, ..., :length], single.logits)
        assert torch.isneginf(out.logits[b, ..., length:]).all()
    weighted = sum(single.loss * length for single, length in zip(singles, lengths)) / sum(lengths)
    torch.testing.assert_close(out.loss, weighted)


def test_anchor_gets_no_gradient_and_backward_leaves_it_unchanged():
    model = make_model()
    before = copy.deepcopy(model.anchor.state_dict())
    x = torch.randn(30, EMBED, dtype=torch.float64, requires_grad=True)
    with milkernels.use_backend("reference"):
        out = model(x)
    assert out.loss.requires_grad
    (out.loss + out.tokens.sum()).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.anchor.parameters())
    for name, tensor in model.anchor.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert model.query.grad is not None and x.grad is not None


def test_loss_gradient_does_not_flow_through_the_anchor_scores():
    model = make_model()
    x = torch.randn(25, EMBED, dtype=torch.float64, requires_grad=True)
    with milkernels.use_backend("reference"):
        out = model(x)
    _, _, want_loss = unfused(model, x)
    torch.testing.assert_close(torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(want_loss, x)[0])


def test_training_backward_takes_no_anchor_column(monkeypatch):
    """The anchor's scores come without gradient from the online call's one-pass kernel (its second tile: x is
    read once for both), so the backward has the online columns alone: with the one-pass kernels (fp16/bf16's,
    here in fp32) it runs the one-pass backward (with the anchor's columns among the call's own it ran the
    score- and weight-gradient kernels); the outputs and gradients match the unfused composition."""
    from milkernels.ops.query_attention import triton as kernels

    monkeypatch.setattr(kernels, "ONE_PASS_DTYPES", (torch.float32,))
    model = make_model(torch.float32)
    x = torch.randn(90, EMBED, requires_grad=True)
    with kernel_checks.launched() as launches:
        compare_with_unfused("triton", torch.float32, 90, rtol=2e-4, model=model, x=x)
    assert "_one_pass_grad_kernel" in launches.by_kernel and "_score_grad_kernel" not in launches.by_kernel
    assert launches.by_kernel["_one_pass_kernel"].launches == 1 and "_score_kernel" not in launches.by_kernel


def test_n_drop_keeps_a_random_subset_in_training_and_all_in_eval():
    model = make_model(n_drop=3)
    x = torch.randn(10, EMBED, dtype=torch.float64)
    with milkernels.use_backend("reference"):
        out = model(x)
        chosen = set()
        for _ in range(6):
            kept = model(x).kept
            rows = [int(torch.nonzero((out.tokens == row).all(-1))[0]) for row in kept]
            assert rows == sorted(set(rows)) and len(rows) == TOKENS - 3
            chosen.add(tuple(rows))
        assert len(chosen) > 1
        model.eval()
        evaluated = model(x)
    assert evaluated.loss is None and evaluated.kept.shape == (TOKENS, EMBED)
    torch.testing.assert_close(evaluated.kept, out.tokens)
    torch.testing.assert_close(evaluated.logits, out.logits)


def test_defaults_follow_asmil():
    model = AnchoredQueryAttention(64, 4, 5)
    assert model.query.shape == (5, 64) and model.query.abs().max() < 1e-4
    assert len(model.tokens) == len(model.anchor.module) == 5 and model.anchor.momentum == 0.999
    token = model.tokens[0]
    assert token.layer_norm.eps == 1e-6 and token.dropout.p == 0.1
    assert {type(m) for m in (token.q_proj, token.k_proj, token.v_proj, token.out_proj)} == {nn.Linear}
    assert any(key.startswith("anchor.module.4.k_proj") for key in model.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_drop=8), "n_drop"), (dict(n_drop=-1), "n_drop"), (dict(momentum=1.5), "momentum"),
    (dict(momentum=-0.1), "momentum"), (dict(temperature=0.0), "temperature"),
    (dict(embedding_dim=100), "divisible"), (dict(num_tokens=0), "num_tokens"),
])
def test_constructor_errors(kwargs, match):
    args = dict(embedding_dim=EMBED, num_heads=HEADS, num_tokens=TOKENS) | kwargs
    with pytest.raises(ValueError, match=match):
        AnchoredQueryAttention(**args)


@pytest.mark.parametrize("shape", [(10, EMBED + 1), (EMBED,), (1, 2, 10, EMBED), (0, EMBED + 1), (1, 2, 0, EMBED)])
def test_wrong_x_shape_raises(shape):
    with pytest.raises(ValueError):
        make_model()(torch.randn(shape, dtype=torch.float64))


def _perturbed(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))
    return module


def test_ema_starts_equal_and_frozen_from_backprop():
    online = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    ema = EMAAnchor(online, momentum=0.9)
    for (name, a), (_, o) in zip(ema.module.state_dict().items(), online.state_dict().items()):
        assert torch.equal(a, o), name
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert set(ema.state_dict()) == {f"module.{key}" for key in online.state_dict()}
    assert not ema(torch.randn(3, 6, dtype=torch.float64)).requires_grad


def test_ema_update_is_the_moving_average_and_copies_buffers():
    online = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    ema = EMAAnchor(online, momentum=0.75)
    _perturbed(online, 1)
    online(torch.randn(5, 6, dtype=torch.float64))  # moves the BatchNorm statistics
    old = {name: p.clone() for name, p in ema.module.named_parameters()}
    ema.update()  # the online module given at construction
    for name, parameter in ema.module.named_parameters():
        torch.testing.assert_close(parameter, 0.75 * old[name] + 0.25 * dict(online.named_parameters())[name],
                                   rtol=1e-15, atol=1e-15)
    for (name, a), (_, o) in zip(ema.module.named_buffers(), online.named_buffers()):
        assert torch.equal(a, o), name


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_ema_momentum_zero_copies_and_one_freezes(momentum):
    online = nn.Linear(5, 3)
    ema = EMAAnchor(online, momentum=momentum)
    before = copy.deepcopy(ema.module.state_dict())
    ema.update(_perturbed(online, 2))
    want = online.state_dict() if momentum == 0.0 else before
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_ema_rejects_bad_momentum_and_other_structures():
    for momentum in (-0.5, 1.01, "0.9", True):
        with pytest.raises(ValueError, match="momentum"):
            EMAAnchor(nn.Linear(2, 2), momentum=momentum)
    with pytest.raises(ValueError, match="parameters and buffers"):
        EMAAnchor(nn.Linear(2, 2)).update(nn.Linear(2, 3, bias=False))


def test_ema_state_dict_resumes_training():
    model = make_model()
    _perturbed(model.tokens, 3)
    model.update_anchor()
    restored = AnchoredQueryAttention(EMBED, HEADS, TOKENS, temperature=TEMPERATURE).double()
    restored.load_state_dict(model.state_dict())
    for name, tensor in model.anchor.state_dict().items():
        assert torch.equal(restored.anchor.state_dict()[name], tensor), name


def test_training_loop_with_an_optimizer():
    model = make_model(momentum=0.5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    expected = {name: p.clone() for name, p in model.anchor.module.named_parameters()}
    losses = []
    for step in range(3):
        x = torch.randn(40, EMBED, dtype=torch.float64)
        with milkernels.use_backend("reference"):
            out = model(x)
        optimizer.zero_grad()
        (out.loss + out.kept.square().mean()).backward()
        optimizer.step()
        model.update_anchor()
        losses.append(out.loss.item())
        online = dict(model.tokens.named_parameters())
        for name in expected:
            expected[name] = 0.5 * expected[name] + 0.5 * online[name].detach()
    for name, parameter in model.anchor.module.named_parameters():
        torch.testing.assert_close(parameter, expected[name])
        assert parameter.grad is None
    assert all(math.isfinite(loss) for loss in losses)


def test_autocast_runs_the_fused_pass_in_the_autocast_dtype():
    module = AnchoredQueryAttention(32, 4, 3)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.tokens.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert module.tokens[0].k_proj.weight.grad is not None
