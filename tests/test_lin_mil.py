"""milkernels against the real lin-mil package: its LinearAttention, Lin_MIL model and softmax ablation,
before and after :func:`milkernels.swap` (values, attention maps, every gradient, checkpoints, report).

lin-mil imports timm for ``DropPath`` only; timm needs torchvision, so :mod:`timm_stub` stands in for it.
"""

import copy
import importlib
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import milkernels
import milkernels.nn.linear_attention as fused_module
from milkernels.bench import timm_stub
from milkernels.nn import FusedLinMIL, LinearAttention, SoftmaxAttention
from milkernels.bench.saved import saved_bytes
from milkernels.swap import swap_report
from test_nn import Case

with timm_stub.installed():
    lin_mil = pytest.importorskip("lin_mil", reason="lin-mil is not importable even with the timm stand-in "
                                                    "(pip install --no-deps lin-mil einops)")
    from lin_mil.attention.linear_attention import LinearAttention as LinMILAttention
    from lin_mil.attention.softmax_attention import Attention

op_module = importlib.import_module("milkernels.ops.linear_attention")  # the attribute is the op function
projected_module = importlib.import_module("milkernels.ops.linear_attention.projected")
TRITON_SOURCE = Path(op_module.__file__).with_name("triton.py")
INPUT_DIM = 20
ACTS = [nn.ReLU, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Softplus]


CASES = [Case("reference", torch.float64, (1e-9, 1e-11)), Case("triton", torch.float32, (1e-4, 1e-4))]


@pytest.fixture(params=CASES, ids=lambda c: c.backend)
def case(request):
    """Each case with its backend forced; triton only once its linear attention kernels have landed."""
    if request.param.backend == "triton" and not TRITON_SOURCE.exists():
        pytest.skip("milkernels/ops/linear_attention/triton.py has not landed yet")
    with milkernels.use_backend(request.param.backend):
        yield request.param


class CoordsEncoding(nn.Module):
    """A positional encoding as Lin-MIL calls one, ``pos_enc(x, coords)``: a Linear on the coordinates, added."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(2, dim)

    def forward(self, x, coords):
        return x + self.linear(coords)


def build(dim=48, heads=4, pooling="cls", act="ReLU", depth=2, attention="linear", dropout=0., emb_dropout=0.,
          pos_enc=False):
    """A ``lin_mil.Lin_MIL`` (ablation blocks unless ``attention == "linear"``, a :class:`CoordsEncoding` if
    ``pos_enc``), its temperatures and LayerNorms drawn at random so that no head or feature looks like another."""
    config = lin_mil.Config(latent_dim=dim, transformer_depth=depth, dropout=dropout, emb_dropout=emb_dropout,
                            act=act, attention=attention, pooling=pooling, ablation=attention != "linear")
    model = lin_mil.Lin_MIL(num_classes=3, input_dim=INPUT_DIM, config=config, heads=heads,
                            pos_enc=CoordsEncoding(dim) if pos_enc else None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "temperature" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 2.0))
            elif "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


MODELS = {  # latent dim, heads, pooling, act: dh 12, 8, 5 and 16
    "d48_h4_cls_relu": dict(dim=48, heads=4, pooling="cls", act="ReLU"),
    "d64_h8_mean_gelu": dict(dim=64, heads=8, pooling="mean", act="GeLU"),
    "d40_h8_cls_gelu": dict(dim=40, heads=8, pooling="cls", act="GeLU"),
    "d64_h4_mean_relu": dict(dim=64, heads=4, pooling="mean", act="ReLU"),
    "d48_h4_cls_relu_pos_enc": dict(dim=48, heads=4, pooling="cls", act="ReLU", pos_enc=True),
}


def model_pair(case, **options):
    """``(lin-mil model, swapped deep copy)`` in ``case.dtype``, eval mode."""
    torch.manual_seed(0)
    before = build(**options).to(case.dtype).eval()
    after = copy.deepcopy(before)
    assert milkernels.swap(after) is after
    assert isinstance(after, FusedLinMIL) and isinstance(after, lin_mil.Lin_MIL)
    fused = LinearAttention if options.get("attention", "linear") == "linear" else SoftmaxAttention
    assert all(type(block.attn) is fused for block in after.transformer), swap_report(after)
    return before, after


def outputs_and_grads(model, x, coords):
    """``model(x, coords)`` and the gradients of a random mix of its outputs w.r.t. ``x`` and every parameter."""
    outputs = model(x, coords)
    generator = torch.Generator().manual_seed(5)
    loss = sum((out * torch.randn(out.shape, generator=generator).to(out)).sum() for out in outputs)
    return outputs, torch.autograd.grad(loss, [x, *model.parameters()])


def assert_same_run(before, after, x, case):
    """Same logits, attention map and gradients of the input and of every parameter, none of them zero, on
    ``x`` and random coordinates (which only a ``pos_enc`` reads)."""
    coords = coordinates(x)
    expected_outputs, expected_grads = outputs_and_grads(before, x, coords)
    outputs, grads = outputs_and_grads(after, x, coords)
    for name, out, expected in zip(("logits", "att"), outputs, expected_outputs, strict=True):
        torch.testing.assert_close(out, expected, **case.tol(expected.abs().max().item()), msg=lambda m: f"{name}: {m}")
    names = ["input", *(n for n, _ in after.named_parameters())]
    for name, grad, expected in zip(names, grads, expected_grads, strict=True):
        scale = expected.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grad, expected, **case.tol(scale), msg=lambda m: f"{name}: {m}")


def tokens(case, batch, length, dim=INPUT_DIM):
    torch.manual_seed(1)
    return torch.randn(batch, length, dim, dtype=case.dtype, requires_grad=True)


def coordinates(x):
    """Random patch coordinates ``(B, N, 2)`` for the tokens ``x: (B, N, .)``."""
    generator = torch.Generator().manual_seed(2)
    return torch.rand(x.shape[:2] + (2,), generator=generator, dtype=torch.float64).to(x.dtype)


@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("name", list(MODELS))
def test_lin_mil_outputs_and_grads_unchanged(case, name, length):
    before, after = model_pair(case, **MODELS[name])
    assert_same_run(before, after, tokens(case, 2, length), case)


def test_lin_mil_long_bag(case):
    """N = 3000 (small and cheap otherwise): q.z is above Lin-MIL's clamp at 100 for some rows and below it for
    others in every block (short bags are all clamped), so both branches are checked."""
    before, after = model_pair(case, dim=8, heads=2)
    denominators = []
    for block in before.transformer:
        block.attn.qk_mul.register_forward_hook(lambda module, args, qz: denominators.append(qz.detach()))
    assert_same_run(before, after, tokens(case, 1, 3000), case)
    assert len(denominators) == 2
    for qz in denominators:
        assert (qz < 100).any() and (qz > 100).any()


def test_lin_mil_bfloat16_under_reference():
    case = Case("reference", torch.bfloat16, (2e-2, 2e-2))
    before, after = model_pair(case, **MODELS["d48_h4_cls_relu"])
    with milkernels.use_backend(case.backend):
        assert_same_run(before, after, tokens(case, 2, 37), case)


def test_lin_mil_training_mode_without_dropout(case):
    before, after = model_pair(case, **MODELS["d40_h8_cls_gelu"])
    before.train()
    after.train()
    assert_same_run(before, after, tokens(case, 2, 9), case)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_lin_mil_training_with_dropout_same_masks_under_reference(attention):
    """Dropout and DropPath on: the fused forward draws the same masks in the same order."""
    torch.manual_seed(0)
    before = build(dropout=0.3, emb_dropout=0.2, attention=attention, pooling="mean").double().train()
    after = milkernels.swap(copy.deepcopy(before))
    x = torch.randn(4, 11, INPUT_DIM, dtype=torch.float64)
    torch.manual_seed(7)
    expected = before(x)
    with milkernels.use_backend("reference"):
        torch.manual_seed(7)
        outputs = after(x)
    assert not torch.equal(expected[0], before.eval()(x)[0]), "dropout had no effect: the test would prove nothing"
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def _spy(monkeypatch, module, name, calls, transform=lambda args, kwargs: kwargs):
    """Replace ``module.name`` by a wrapper recording ``transform(args, kwargs)`` of each call in ``calls``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(transform(args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _refuse_numerator(*args):
    raise AssertionError("the (B, H, N, dh) numerator was formed")


@pytest.mark.parametrize("pos_enc", [False, True], ids=["no_pos_enc", "pos_enc"])
def test_swapped_lin_mil_never_forms_the_numerator(case, monkeypatch, pos_enc):
    """Also with a ``pos_enc`` taking coordinates, which the probe passes, so such a model is fused too."""
    _, after = model_pair(case, **MODELS["d48_h4_cls_relu"], pos_enc=pos_enc)
    calls, projected_calls, kernel_calls = [], [], []
    _spy(monkeypatch, fused_module, "lin_mil_attention", calls)
    _spy(monkeypatch, fused_module, "lin_mil_projected_attention", projected_calls)
    _spy(monkeypatch, projected_module, "_forward_op", kernel_calls, lambda args, kwargs: args[-2])  # want_map
    monkeypatch.setattr(op_module, "_numerator_to_caller", _refuse_numerator)
    x = tokens(case, 2, 5)
    logits, att = after(x, coordinates(x))
    (logits.sum() + att.sum()).backward()
    assert calls == [] and [c["return_map"] for c in projected_calls] == [False, True]
    assert kernel_calls == ([False, True] if case.backend == "triton" else [])
    with pytest.raises(AssertionError, match="numerator was formed"):  # the spies do see a numerator
        after.transformer[0].attn(torch.randn(1, 3, 48, dtype=case.dtype))
    assert calls[-1]["return_numerator"] is True


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.__name__)
def test_linear_attention_module_matches_lin_mil(case, act):
    """Same constructor (parameters drawn alike), ``state_dict`` keys and ``(out, numerator)``; the map
    mode gives Lin-MIL's map and the plain mode the same ``out``."""
    torch.manual_seed(3)
    theirs = LinMILAttention(40, num_heads=8, qkv_bias=True, att_act=act, proj_drop=0.1).to(case.dtype).eval()
    torch.manual_seed(3)
    mine = LinearAttention(40, num_heads=8, qkv_bias=True, att_act=act, proj_drop=0.1).to(case.dtype).eval()
    assert list(mine.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():  # one temperature per head, not Lin-MIL's equal ones
        theirs.temperature.mul_(torch.linspace(0.5, 2.0, 8, dtype=case.dtype)[:, None, None])
        mine.temperature.copy_(theirs.temperature)
    x = tokens(case, 3, 17, dim=40)
    expected_out, expected_numerator = theirs(x)
    out, numerator = mine(x)
    tol = case.tol(expected_numerator.abs().max().item())
    torch.testing.assert_close(out, expected_out, **tol)
    assert numerator.is_contiguous() and expected_numerator.is_contiguous()  # Lin-MIL's attn1: view() works
    torch.testing.assert_close(numerator.view(3, 8, -1), expected_numerator.view(3, 8, -1), **tol)
    out_map, attention_map = mine.forward_with_map(x)
    torch.testing.assert_close(out_map, expected_out, **tol)
    torch.testing.assert_close(attention_map, expected_numerator.mean(dim=1).mean(dim=-1), **tol)
    torch.testing.assert_close(mine.forward_without_attention(x), expected_out, **tol)


@pytest.mark.parametrize("mode", ["forward_without_attention", "forward_with_map"])
def test_fused_layer_keeps_under_a_third_of_lin_mils(mode):
    """Issue 12: what the swapped layer saves for backward (``proj``'s input, T x C, and the per-bag state)
    against Lin-MIL's own layer (``qkv``, its activations, the numerator and more), inputs and parameters
    excluded."""
    torch.manual_seed(4)
    theirs = LinMILAttention(64, num_heads=8, qkv_bias=True)
    mine = LinearAttention.from_module(copy.deepcopy(theirs))
    x = torch.randn(2, 300, 64, requires_grad=True)
    with milkernels.use_backend("triton"):
        fused = saved_bytes(getattr(mine, mode), x, exclude=mine.parameters())
    upstream = saved_bytes(theirs, x, exclude=theirs.parameters())
    state = 2 * 8 * (8 + 1) * 8 * 4
    assert fused == 2 * 300 * 64 * 4 + state
    assert fused * 3 <= upstream, (fused, upstream)


def test_linear_attention_constructor_refuses_what_the_op_lacks():
    with pytest.raises(ValueError, match="default arguments"):
        LinearAttention(16, 2, att_act=lambda: nn.LeakyReLU(0.2))
    with pytest.raises(ValueError, match="SiLU"):
        LinearAttention(16, 2, att_act=nn.SiLU)
    with pytest.raises(ValueError, match="default arguments"):  # compiled calls rely on this check
        LinearAttention.from_module(LinMILAttention(16, 2, att_act=lambda: nn.LeakyReLU(0.2)))


def _manual_per_bag(module, x, lengths):
    """Lin-MIL's module run on each bag alone: lists of ``out (n, C)`` and ``numerator (H, n, dh)``."""
    outs, numerators = zip(*(module(x[b:b + 1, :n]) for b, n in enumerate(lengths)))
    return [o[0] for o in outs], [m[0] for m in numerators]


def test_padded_and_packed_bags_match_each_bag_alone(case):
    """The module's mask and cu_seqlens paths: each bag as Lin-MIL computes it alone; padded rows are no keys,
    their numerator and map 0, their out proj(0), their input gradient 0."""
    torch.manual_seed(4)
    theirs = LinMILAttention(48, num_heads=4, qkv_bias=True).to(case.dtype).eval()
    mine = milkernels.swap(copy.deepcopy(theirs))
    lengths = [7, 4, 1]
    x = tokens(case, 3, 7, dim=48)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    outs, numerators = _manual_per_bag(theirs, x, lengths)
    out, numerator = mine(x, mask=mask)
    assert numerator.is_contiguous()  # as Lin-MIL's attn1
    _, attention_map = mine.forward_with_map(x, mask=mask)
    tol = case.tol(max(m.abs().max().item() for m in numerators))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], outs[b], **tol)
        torch.testing.assert_close(numerator[b, :, :n], numerators[b], **tol)
        torch.testing.assert_close(attention_map[b, :n], numerators[b].mean(dim=0).mean(dim=-1), **tol)
    padded = ~mask
    torch.testing.assert_close(out[padded], mine.proj.bias.expand(int(padded.sum()), -1), **tol)
    assert not numerator.transpose(1, 2)[padded].any() and not attention_map[padded].any()
    grad, = torch.autograd.grad((out * mask[..., None]).sum() + attention_map.sum(), x)
    expected = torch.autograd.grad(sum(o.sum() for o in outs) + sum(m.mean(0).mean(-1).sum() for m in numerators), x)[0]
    torch.testing.assert_close(grad, expected, **case.tol(expected.abs().max().item()))
    assert not grad[padded].any()
    packed = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
    cu_seqlens = torch.tensor([0, 7, 11, 12], dtype=torch.int32)
    packed_out, packed_numerator = mine(packed, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(packed_out, torch.cat(outs), **tol)
    torch.testing.assert_close(packed_numerator, torch.cat(numerators, dim=1).transpose(0, 1), **tol)


def test_softmax_ablation_uses_sdpa_where_the_matrix_is_unused(case, monkeypatch):
    """Ablation ``attention="softmax"``: same logits, map and gradients; SDPA runs in every block but the
    last, whose softmax matrix the model averages into its map."""
    before, after = model_pair(case, attention="softmax", depth=3, pooling="cls")
    assert all(type(block.attn) is SoftmaxAttention for block in after.transformer)
    sdpa_calls = []
    _spy(monkeypatch, F, "scaled_dot_product_attention", sdpa_calls)
    assert_same_run(before, after, tokens(case, 2, 13), case)
    assert len(sdpa_calls) == 2
    assert after.transformer[0].attn.get_attention_map() is None
    torch.testing.assert_close(after.transformer[-1].attn.get_attention_map(),
                               before.transformer[-1].attn.get_attention_map())


def test_softmax_attention_module_keeps_the_contract(case):
    torch.manual_seed(2)
    theirs = Attention(40, heads=4, dim_head=12).to(case.dtype).eval()
    mine = milkernels.swap(copy.deepcopy(theirs))
    assert type(mine) is SoftmaxAttention and list(mine.state_dict()) == list(theirs.state_dict())
    x = tokens(case, 2, 9, dim=40)
    (out, attn), (expected_out, expected_attn) = mine(x, register_hook=True), theirs(x, register_hook=True)
    torch.testing.assert_close(out, expected_out, **case.tol())
    torch.testing.assert_close(attn, expected_attn, **case.tol())
    torch.testing.assert_close(mine.forward_without_attention(x), expected_out, **case.tol())
    (out.sum() + attn.square().sum()).backward()
    (expected_out.sum() + expected_attn.square().sum()).backward()
    torch.testing.assert_close(mine.get_attn_gradients(), theirs.get_attn_gradients(), **case.tol())
    torch.testing.assert_close(mine.get_self_attention(x), theirs.get_self_attention(x), **case.tol())


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_parameters_state_dict_and_checkpoints_kept(attention):
    torch.manual_seed(0)
    original = build(attention=attention).eval()
    checkpoint = io.BytesIO()
    torch.save(original.state_dict(), checkpoint)
    torch.manual_seed(1)
    swapped = build(attention=attention).eval()
    params, keys = list(swapped.parameters()), list(swapped.state_dict())
    milkernels.swap(swapped)
    assert all(a is b for a, b in zip(swapped.parameters(), params, strict=True))
    assert list(swapped.state_dict()) == keys
    checkpoint.seek(0)
    swapped.load_state_dict(torch.load(checkpoint))
    x = torch.randn(2, 15, INPUT_DIM)
    for out, expected in zip(swapped(x), original(x), strict=True):
        torch.testing.assert_close(out, expected)
    unswapped = build(attention=attention)
    unswapped.load_state_dict(swapped.state_dict())
    for mine, theirs in zip(unswapped.state_dict().values(), original.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_swapped_model_pickles_and_copies_as_itself():
    torch.manual_seed(0)
    model = milkernels.swap(build().eval())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (loaded, copy.deepcopy(model)):
        assert type(clone) is type(model) and isinstance(clone, lin_mil.Lin_MIL)
        assert type(clone.transformer[0].attn) is LinearAttention
        x = torch.randn(2, 6, INPUT_DIM)
        for out, expected in zip(clone(x), model(x), strict=True):
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _ablation(attention):
    return build(attention=attention, dim=64, heads=4)


def test_idempotent_and_report(capsys, monkeypatch):
    """The dilated model stays: lin-mil's flash_attn_func is None here (it is on CPU), so neither its attention
    nor the model can run (tests/test_dilated_attention_nn.py swaps them with a stand-in kernel)."""
    monkeypatch.setattr(importlib.import_module("lin_mil.attention.dilated_attention"), "flash_attn_func", None)
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(
        linear=build(), softmax=_ablation("softmax"), nystrom=_ablation("nystrom"), dilated=_ablation("dilated"),
        leaky=LinMILAttention(16, 2, att_act=lambda: nn.LeakyReLU(0.2)), relu=LinMILAttention(16, 2)))
    blocks = ("transformer.0", "transformer.1")
    attns = {f"{m}.{b}.attn" for m in ("linear", "softmax") for b in blocks}
    report = swap_report(model)
    assert report.fused == {} and set(report.swappable) == {"linear", "softmax", "relu"} | attns
    assert set(report.skipped) == ({"nystrom", "dilated", "leaky"} | {f"nystrom.{b}" for b in blocks}
                                   | {f"dilated.{b}.attn" for b in blocks})
    milkernels.swap(model, verbose=True)
    printed = capsys.readouterr().out
    modules = dict(model.named_modules())
    report = swap_report(model)
    milkernels.swap(model)
    assert dict(model.named_modules()) == modules and swap_report(model) == report
    assert report.swappable == {} and set(report.fused) == {"linear", "softmax", "relu"} | attns
    assert report.fused["linear"] == "lin_mil.Lin_MIL.Lin_MIL -> milkernels.nn.FusedLinMIL"
    assert report.fused["softmax.transformer.1.attn"] == ("lin_mil.attention.softmax_attention.Attention -> "
                                                          "milkernels.nn.SoftmaxAttention")
    assert report.fused["relu"].endswith("LinearAttention -> milkernels.nn.LinearAttention")
    assert "attention_type='nystrom'" in report.skipped["nystrom.transformer.0"]
    assert "transformer.0.attn: flash_attn_func is None" in report.skipped["dilated"]
    assert "LeakyReLU(negative_slope=0.2)" in report.skipped["leaky"]
    assert "7 fused, 0 swappable, 7 skipped" in printed


class ReturnsOut(LinMILAttention):
    """Lin-MIL's children, another contract: ``out`` alone."""

    def forward(self, x):
        return super().forward(x)[0]


def _softmaxed_map(self, x, coords=None):
    logits, att = lin_mil.Lin_MIL.forward(self, x, coords)
    return logits, att.softmax(dim=-1)


SoftmaxedMap = type("Lin_MIL", (lin_mil.Lin_MIL,), dict(forward=_softmaxed_map))  # a name swap recognizes


def _hooked(module, path):
    module.get_submodule(path).register_forward_hook(lambda *args: None)
    return module


def _config(**options):
    return lin_mil.Config(latent_dim=16, transformer_depth=1, **options)


UNSUPPORTED = {
    "elu_alpha": (lambda: LinMILAttention(16, 2, att_act=lambda: nn.ELU(alpha=0.5)), "default arguments"),
    "softplus_beta": (lambda: LinMILAttention(16, 2, att_act=lambda: nn.Softplus(beta=2)), "default arguments"),
    "gelu_tanh": (lambda: LinMILAttention(16, 2, att_act=lambda: nn.GELU("tanh")), "default arguments"),
    "silu": (lambda: LinMILAttention(16, 2, att_act=nn.SiLU), "act is a SiLU"),
    "hooked_attention": (lambda: _hooked(LinMILAttention(16, 2), "qkv"), "qkv has forward hooks"),
    "parametrized_qkv": (lambda: _weight_normed(), "qkv is parametrized"),
    "other_contract": (lambda: ReturnsOut(16, 2), "forward differs from Lin-MIL's LinearAttention"),
    "other_model_forward": (lambda: SoftmaxedMap(num_classes=2, input_dim=8, config=_config(), heads=2),
                            "forward differs from Lin-MIL's Lin_MIL"),
    "hooked_block": (lambda: _hooked(lin_mil.Lin_MIL(num_classes=2, input_dim=8, config=_config(), heads=2),
                                     "transformer.0"), "transformer.0 has forward hooks"),
    "other_pooling": (lambda: _with_pool(lin_mil.Lin_MIL(num_classes=2, input_dim=8, config=_config(), heads=2)),
                      "pool='max'"),
}


def _weight_normed():
    module = LinMILAttention(16, 2)
    nn.utils.parametrizations.weight_norm(module.qkv)
    return module


def _with_pool(model):
    model.pool = "max"
    return model


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_variants_skipped_with_reason(name):
    build_module, reason = UNSUPPORTED[name]
    model = nn.Sequential(build_module())
    original, original_class = model[0], type(model[0])
    milkernels.swap(model)
    assert model[0] is original and type(original) is original_class
    report = swap_report(model)
    assert "0" in report.skipped and reason in report.skipped["0"], report


def test_hooked_block_still_gets_fused_attention():
    """A hook on a block keeps the model's own forward, but its attention modules are still swapped."""
    torch.manual_seed(0)
    model = _hooked(build(), "transformer.1").double().eval()
    expected = model(torch.ones(1, 4, INPUT_DIM, dtype=torch.float64))
    milkernels.swap(model)
    assert not isinstance(model, FusedLinMIL) and type(model.transformer[1].attn) is LinearAttention
    for out, want in zip(model(torch.ones(1, 4, INPUT_DIM, dtype=torch.float64)), expected, strict=True):
        torch.testing.assert_close(out, want)


def test_inplace_relu_and_standalone_swap():
    """``ReLU(inplace=True)`` computes what ReLU() does: swapped; a module given alone comes back replaced."""
    torch.manual_seed(0)
    theirs = LinMILAttention(24, 3, att_act=lambda: nn.ReLU(inplace=True)).double()
    mine = milkernels.swap(copy.deepcopy(theirs))
    assert type(mine) is LinearAttention and mine.swapped_from.endswith("LinearAttention")
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    for out, want in zip(mine(x), theirs(x), strict=True):
        torch.testing.assert_close(out, want)
