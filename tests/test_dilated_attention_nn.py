"""milkernels.nn's DilatedAttention and LinMILDilatedAttention against lin-mil's real DilatedAttention (the
torchscale code, run on CPU with a plain-torch stand-in for ``flash_attn_func``) and a torchscale-structured
module (Prov-GigaPath's: Linear projections, subln LayerNorm): outputs and every gradient, state_dict and
checkpoints, the calls that run upstream's forward, empty bags, and milkernels.swap on Lin_MIL models with
dilated blocks (outputs, gradients, report and the reasons modules stay).
"""

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import milkernels
from milkernels.bench import timm_stub
from milkernels.nn import DilatedAttention, FusedLinMIL, LinMILDilatedAttention
from milkernels.swap import swap_report
from test_nn import Case

with timm_stub.installed():
    lin_mil = pytest.importorskip("lin_mil", reason="lin-mil is not importable even with the timm stand-in "
                                                    "(pip install --no-deps lin-mil einops)")
    import lin_mil.attention.dilated_attention as upstream

CASES = [Case("reference", torch.float64, (1e-10, 1e-12)), Case("triton", torch.float32, (1e-4, 1e-5))]
FP16 = Case("reference", torch.float16, (2e-2, 2e-2))  # Lin-MIL's ablation block runs the branch in float16


def flash_stand_in(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """``flash_attn_func`` in plain torch, in flash-attn's layout: ``q, k, v: (b, l, h, d)`` -> ``(out: (b, l, h,
    d), lse: (b, h, l))``, at least float32 inside (flash-attn accumulates in float32), ``out`` in q's dtype."""
    assert bias is None
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = softmax_scale or q.shape[-1] ** -0.5
    scores = torch.einsum("blhd,bmhd->bhlm", q.to(dtype), k.to(dtype)) * scale
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nn.functional.dropout(torch.exp(scores - lse[..., None]), dropout)
    return torch.einsum("bhlm,bmhd->blhd", weights, v.to(dtype)).to(q.dtype), lse


@pytest.fixture
def flash(monkeypatch):
    """lin-mil's module-level ``flash_attn_func`` (None on CPU) replaced by :func:`flash_stand_in`."""
    monkeypatch.setattr(upstream, "flash_attn_func", flash_stand_in)


@pytest.fixture(params=CASES, ids=lambda c: c.backend)
def case(request, flash):
    """Each case with its backend forced; triton only once the op has a triton dilated attention kernel."""
    with milkernels.use_backend(request.param.backend):
        if request.param.backend == "triton":
            tiny = torch.zeros(1, 2, 1, 4)
            try:
                milkernels.ops.dilated_attention(tiny, tiny, tiny, [2], [1])
            except milkernels.BackendUnavailable as exc:
                pytest.skip(f"the triton backend cannot run dilated attention yet: {exc}")
        yield request.param


def dilated_args(segments, rates, **options):
    """lin-mil's ``Dilated_Args`` (``seq_parallel=True``, as lin-mil has it) with these branches."""
    args = upstream.Dilated_Args()
    args.segment_length, args.dilated_ratio = list(segments), list(rates)
    for name, value in options.items():
        setattr(args, name, value)
    return args


def lin_mil_attention(segments, rates, dim, heads, dtype, subln=False, **options):
    """lin-mil's ``DilatedAttention`` (identity projections; with ``subln`` a LayerNorm drawn at random)."""
    module = upstream.DilatedAttention(dilated_args(segments, rates, **options), dim, heads, self_attention=True,
                                       subln=subln)
    _randomize(module)
    return module.to(dtype).eval()


def _randomize(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn_like(param))


class TorchscaleDilatedAttention(upstream.DilatedAttention):
    """torchscale's ``DilatedAttention`` as Prov-GigaPath builds it: ``Linear(E, E)`` projections (``MultiwayWrapper``
    with ``multiway=False`` is the Linear itself), ``inner_attn_ln`` with ``subln``, and ``forward(query, key, value,
    ...)``; the dilated computation is lin-mil's copy of torchscale's code (self-attention: key is value is query)."""

    def __init__(self, args, embed_dim, num_heads, dropout=0.0, self_attention=False, encoder_decoder_attention=False,
                 subln=False):
        super().__init__(args, embed_dim, num_heads, dropout, self_attention, encoder_decoder_attention, subln)
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, upstream.MultiwayWrapper(args, nn.Linear(embed_dim, embed_dim, bias=True)))

    def forward(self, query, key, value, incremental_state=None, key_padding_mask=None, attn_mask=None, rel_pos=None,
                is_first_step=False, is_causal=False):
        assert key is query and value is query, "the test stand-in is self-attention only"
        return super().forward(query, incremental_state, key_padding_mask, attn_mask, rel_pos, is_first_step,
                               is_causal)


def gigapath_args(**options):
    """A LongNet config as Prov-GigaPath's slide encoder reads it, with small branches."""
    values = dict(segment_length=[8, 16, 32], dilated_ratio=[1, 2, 4], multiway=False, xpos_rel_pos=False,
                  xpos_scale_base=512, flash_attention=True, seq_parallel=False, layernorm_eps=1e-5)
    return SimpleNamespace(**{**values, **options})


def gigapath_attention(dtype=torch.float64, dim=48, heads=4, **options):
    """The torchscale-structured module: dim 48, 4 heads, subln, branches [8, 16, 32] x [1, 2, 4]."""
    torch.manual_seed(2)
    module = TorchscaleDilatedAttention(gigapath_args(**options), dim, heads, self_attention=True, subln=True)
    _randomize(module)
    return module.to(dtype).eval()


def outputs_and_grads(module, x, *args, **kwargs):
    """``(attn, {name: gradient})`` of a random mix of ``attn`` w.r.t. ``x`` and every parameter; the second output
    must be None."""
    attn, second = module(x, *args, **kwargs)
    assert second is None
    generator = torch.Generator().manual_seed(5)
    loss = (attn * torch.randn(attn.shape, generator=generator, dtype=torch.float64).to(attn)).sum()
    names, tensors = zip(*[("input", x), *module.named_parameters()])
    return attn, dict(zip(names, torch.autograd.grad(loss, tensors)))


def assert_same_run(case, expected_module, module, x, *args, zero_ok=(), **kwargs):
    """Same ``attn`` and gradients (input and every parameter) within ``case``'s tolerance, relative to each
    tensor's magnitude; none of them zero but those in ``zero_ok``, which may be (about) zero and are compared
    at the magnitude of the largest gradient."""
    expected, expected_grads = outputs_and_grads(expected_module, x, *args, **kwargs)
    attn, grads = outputs_and_grads(module, x, *args, **kwargs)
    torch.testing.assert_close(attn, expected, **case.tol(expected.abs().max().item()))
    assert grads.keys() == expected_grads.keys()
    largest = max(want.abs().max().item() for want in expected_grads.values())
    for name, want in expected_grads.items():
        scale = want.abs().max().item() if name not in zero_ok else largest
        assert scale > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads[name], want, **case.tol(scale), msg=lambda m: f"{name}: {m}")


def tokens(batch, length, dim, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()


LIN_MIL_SHAPES = {  # branches, E, H, N: N a multiple of no segment length, H not divisible by r, w > N
    "w8-16-32_r1-2-4_h5_n37": ([8, 16, 32], [1, 2, 4], 30, 5, 37),
    "w8-16-32_r1-2-4_h5_n20_w_above_n": ([8, 16, 32], [1, 2, 4], 30, 5, 20),
    "w6-10_r4-3_h3_n29_r_not_dividing_w": ([6, 10], [4, 3], 18, 3, 29),
    "lin_mil_default_w128-64-32_r2-4-8_h4_n150": ([128, 64, 32], [2, 4, 8], 24, 4, 150),
    "w16_r2_h2_n1": ([16], [2], 8, 2, 1),
}


@pytest.mark.parametrize("subln", [False, True])
@pytest.mark.parametrize("shape", list(LIN_MIL_SHAPES))
def test_lin_mil_dilated_attention_matches_upstream(case, shape, subln):
    segments, rates, dim, heads, length = LIN_MIL_SHAPES[shape]
    if case.backend == "triton" and length > 40:
        length = 40  # the interpreter is slow
    original = lin_mil_attention(segments, rates, dim, heads, case.dtype, subln=subln)
    fused = LinMILDilatedAttention.from_module(original)
    assert [p is q for p, q in zip(fused.parameters(), original.parameters(), strict=True)] == [True] * (2 * subln)
    x = tokens(2, length, dim, case.dtype)
    skip_if_refused(case, fused, x)
    if subln:
        assert_same_run(case, original, fused, x)
    else:  # no parameter: the input gradient only
        expected, (expected_grad,) = _input_run(original, x)
        attn, (grad,) = _input_run(fused, x)
        torch.testing.assert_close(attn, expected, **case.tol(expected.abs().max().item()))
        torch.testing.assert_close(grad, expected_grad, **case.tol(expected_grad.abs().max().item()))


def skip_if_refused(case, module, x):
    """Skip (with the op's reason) where the forced backend does not take these branches at this length."""
    try:
        with torch.no_grad():
            module(x)
    except milkernels.BackendUnavailable as exc:
        pytest.skip(f"the {case.backend} backend does not take this shape: {exc}")


def _input_run(module, x):
    attn, _ = module(x)
    weights = torch.randn(attn.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(attn)
    return attn, torch.autograd.grad((attn * weights).sum(), [x])


def test_lin_mil_dilated_attention_in_float16_as_the_block_calls_it(flash):
    original = lin_mil_attention([128, 64, 32], [2, 4, 8], 32, 4, torch.float32).half()
    fused = LinMILDilatedAttention.from_module(original)
    x = tokens(2, 70, 32, torch.float16)
    expected, (expected_grad,) = _input_run(original, x)
    attn, (grad,) = _input_run(fused, x)
    assert attn.dtype == torch.float16 and grad.dtype == torch.float16
    torch.testing.assert_close(attn, expected, **FP16.tol(expected.abs().max().item()))
    torch.testing.assert_close(grad, expected_grad, **FP16.tol(expected_grad.abs().max().item()))


def test_fresh_lin_mil_module_matches_upstream_construction(flash):
    args = dilated_args([8, 16], [1, 2])
    original = upstream.DilatedAttention(args, 12, 3, self_attention=True, subln=True)
    fresh = LinMILDilatedAttention(args, 12, 3, self_attention=True, subln=True)
    assert [n for n, _ in fresh.named_children()] == [n for n, _ in original.named_children()]
    assert list(fresh.state_dict()) == list(original.state_dict()) == ["inner_attn_ln.weight", "inner_attn_ln.bias"]
    for attr in ("embed_dim", "num_heads", "head_dim", "scaling", "dropout", "self_attention",
                 "encoder_decoder_attention", "xpos", "args"):
        assert getattr(fresh, attr) == getattr(original, attr), attr
    x = tokens(2, 19, 12, torch.float32)
    torch.testing.assert_close(fresh(x)[0], original(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 23, 64, 100])
def test_gigapath_shaped_module_matches_its_composition(case, length):
    """A torchscale-structured module (Linear projections, subln LayerNorm, dim 48, 4 heads, w [8, 16, 32] x
    r [1, 2, 4]) and milkernels' DilatedAttention made from it, called as Prov-GigaPath's encoder layer calls
    it (keyword query = key = value and an all-False key_padding_mask)."""
    original = gigapath_attention(case.dtype)
    fused = DilatedAttention.from_module(original)
    x = tokens(2, length, 48, case.dtype)
    no_padding = torch.zeros(2, length, dtype=torch.bool)

    class Called(nn.Module):  # the keyword call, as a module for outputs_and_grads
        def __init__(self, attention):
            super().__init__()
            self.attention = attention

        def forward(self, y):
            return self.attention(query=y, key=y, value=y, key_padding_mask=no_padding)

    # a key bias moves a segment's scores together (but for padded keys, which are 0); with N = 1, out = v
    one_key = [f"attention.{p}_proj.{w}" for p in "qk" for w in ("weight", "bias")]
    zero_ok = one_key if length == 1 else ["attention.k_proj.bias"]
    assert_same_run(case, Called(original), Called(fused), x, zero_ok=zero_ok)


def test_fresh_module_state_dict_and_checkpoint_round_trip(flash):
    original = gigapath_attention(torch.float32)
    fresh = DilatedAttention(gigapath_args(), 48, 4, self_attention=True, subln=True)
    assert [n for n, _ in fresh.named_children()] == [n for n, _ in original.named_children()]
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert list(fresh.state_dict()) == list(original.state_dict())
    checkpoint = io.BytesIO()
    torch.save(original.state_dict(), checkpoint)
    checkpoint.seek(0)
    fresh.load_state_dict(torch.load(checkpoint))
    x = tokens(3, 41, 48, torch.float32)
    torch.testing.assert_close(fresh(x, x, x)[0], original(x, x, x)[0], rtol=1e-5, atol=1e-5)
    swapped = milkernels.swap(copy.deepcopy(original))
    assert type(swapped) is DilatedAttention and list(swapped.state_dict()) == list(original.state_dict())
    swapped_checkpoint = io.BytesIO()
    torch.save(swapped.state_dict(), swapped_checkpoint)
    swapped_checkpoint.seek(0)
    original.load_state_dict(torch.load(swapped_checkpoint))  # and back into the upstream class
    fresh.reset_parameters()
    assert fresh.out_proj.bias.abs().max() == 0


def test_from_module_shares_parameters_and_pickles(flash):
    original = gigapath_attention(torch.float32)
    fused = DilatedAttention.from_module(original)
    assert all(p is q for p, q in zip(fused.parameters(), original.parameters(), strict=True))
    assert fused.q_proj is original.q_proj and fused.args is original.args
    with torch.no_grad():
        original.out_proj.bias.add_(1.0)  # one parameter, seen by both
    x = tokens(2, 9, 48, torch.float32)
    torch.testing.assert_close(fused(x, x, x)[0], original(x, x, x)[0], rtol=1e-5, atol=1e-5)
    lin_mil_module = LinMILDilatedAttention.from_module(lin_mil_attention([8], [2], 12, 3, torch.float32, subln=True))
    buffer = io.BytesIO()
    torch.save(lin_mil_module, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(lin_mil_module)):
        assert type(clone) is LinMILDilatedAttention and clone.upstream_class is upstream.DilatedAttention
        y = tokens(1, 11, 12, torch.float32)
        torch.testing.assert_close(clone(y)[0], lin_mil_module(y)[0], rtol=0, atol=0)


def test_key_padding_mask_is_ignored_as_upstream_does(flash):
    original = gigapath_attention()
    fused = DilatedAttention.from_module(original)
    x = tokens(2, 30, 48, torch.float64)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 20:] = True
    expected = original(x, x, x, key_padding_mask=padding)[0]
    torch.testing.assert_close(fused(x, x, x, key_padding_mask=padding)[0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused(x, x, x)[0], expected, rtol=1e-10, atol=1e-12)


def test_calls_the_op_cannot_take_run_upstream_forward(flash, monkeypatch):
    """is_causal, a key of another length, training with dropout and seq-parallel gathering run upstream's
    forward on the module's state; attn_mask does too (and lin-mil's flash path refuses it, as before)."""
    original = lin_mil_attention([8, 16], [1, 2], 12, 3, torch.float64, subln=True)
    fused = LinMILDilatedAttention.from_module(original)
    x = tokens(2, 21, 12, torch.float64)
    torch.testing.assert_close(fused(x, is_causal=True)[0], original(x, is_causal=True)[0], rtol=0, atol=0)
    assert not torch.allclose(fused(x, is_causal=True)[0], fused(x)[0])
    with pytest.raises(AssertionError):
        fused(x, attn_mask=torch.zeros(21, 21, dtype=torch.float64))
    with pytest.raises(ValueError, match="rel_pos must be None"):
        fused(x, rel_pos=torch.zeros(1))

    calls = []
    monkeypatch.setattr(upstream, "flash_attn_func", lambda *a: calls.append(a) or flash_stand_in(*a))
    fused.dropout = original.dropout = 0.5
    fused.eval()
    fused(x)
    assert calls == []  # eval mode: the fused path, no dropout
    fused.train()
    torch.manual_seed(0)
    dropped = fused(x)[0]
    assert len(calls) == 2 and calls[0][3] == 0.5  # upstream's forward: one flash call per branch, with dropout
    torch.manual_seed(0)
    torch.testing.assert_close(dropped, original(x)[0], rtol=0, atol=0)
    fused.dropout, calls[:] = 0.0, []

    _distributed(monkeypatch, 2)
    fused(tokens(2, 40, 12, torch.float64))  # every segment (8, 16) fits in 40: nothing is gathered, fused
    assert calls == []
    with pytest.raises(Exception):  # w = 16 > 9: upstream's forward gathers across ranks (none here: it fails)
        fused(tokens(2, 9, 12, torch.float64))
    assert len(calls) == 1  # upstream's forward ran the w = 8 branch, then failed to gather for w = 16


def test_torchscale_key_of_another_shape_runs_upstream(flash):
    fused = DilatedAttention.from_module(gigapath_attention())
    x = tokens(1, 10, 48, torch.float64)
    with pytest.raises(AssertionError, match="self-attention only"):  # the test class's own forward ran
        fused(x, x[:, :5], x[:, :5])


def test_fresh_module_refuses_what_it_cannot_fall_back_on():
    module = DilatedAttention(gigapath_args(), 48, 4, dropout=0.1, self_attention=True)
    x = tokens(1, 10, 48, torch.float32)
    for kwargs, reason in [(dict(is_causal=True), "is_causal is True"),
                           (dict(incremental_state={}), "incremental_state is given"),
                           (dict(attn_mask=torch.zeros(10, 10)), "attn_mask is given")]:
        with pytest.raises(NotImplementedError, match=reason):
            module.eval()(x, x, x, **kwargs)
    module(x, x, x)  # eval mode: no dropout applies
    with pytest.raises(NotImplementedError, match="dropout=0.1 in training mode"):
        module.train()(x, x, x)
    with pytest.raises(NotImplementedError, match="xpos"):
        DilatedAttention(gigapath_args(xpos_rel_pos=True), 48, 4, self_attention=True)
    with pytest.raises(NotImplementedError, match="multiway"):
        DilatedAttention(gigapath_args(multiway=True), 48, 4, self_attention=True)
    with pytest.raises(ValueError, match="exactly one"):
        DilatedAttention(gigapath_args(), 48, 4)


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_empty_bags(flash, shape):
    """Upstream cannot take them (N = 0: ZeroDivisionError, B = 0: an assert); milkernels gives an empty result
    of the right shape and zero gradients."""
    original = gigapath_attention(torch.float32)
    fused = DilatedAttention.from_module(original)
    x = torch.zeros(*shape, 48, requires_grad=True)
    with pytest.raises((ZeroDivisionError, AssertionError)):
        original(x, x, x)
    attn, second = fused(x, x, x)
    assert attn.shape == (*shape, 48) and second is None
    grads = torch.autograd.grad(attn.sum(), [x, *fused.parameters()])
    assert all(g is not None and not g.any() for g in grads)
    lin_mil_fused = LinMILDilatedAttention.from_module(lin_mil_attention([8], [2], 12, 3, torch.float32))
    assert lin_mil_fused(torch.zeros(*shape, 12))[0].shape == (*shape, 12)


def build_lin_mil(depth=2, dim=32, heads=4, pooling="cls", attention="dilated"):
    """A ``Lin_MIL`` with ablation blocks (``attention="dilated"``: lin-mil's ``Dilated_Args``, w [128, 64, 32]
    x r [2, 4, 8], ``seq_parallel=True``), its LayerNorms drawn at random."""
    torch.manual_seed(0)
    config = lin_mil.Config(latent_dim=dim, transformer_depth=depth, dropout=0., emb_dropout=0., attention=attention,
                            pooling=pooling, ablation=True)
    model = lin_mil.Lin_MIL(num_classes=3, input_dim=20, config=config, heads=heads)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_swap_lin_mil_dilated_model(flash, pooling):
    before = build_lin_mil(pooling=pooling)
    after = copy.deepcopy(before)
    assert milkernels.swap(after) is after
    assert isinstance(after, FusedLinMIL) and isinstance(after, lin_mil.Lin_MIL)
    assert all(type(block.attn) is LinMILDilatedAttention for block in after.transformer)
    x = tokens(2, 150, 20, torch.float32)  # N + cls: 151, a multiple of no segment length
    outputs, expected = after(x), before(x)
    assert outputs[1] is None and expected[1] is None  # dilated blocks give no attention map
    torch.testing.assert_close(outputs[0], expected[0], **FP16.tol(expected[0].abs().max().item()))
    mix = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((outputs[0] * mix).sum(), [x, *after.parameters()])
    expected_grads = torch.autograd.grad((expected[0] * mix).sum(), [x, *before.parameters()])
    names = ["input", *(n for n, _ in after.named_parameters())]
    for name, grad, want in zip(names, grads, expected_grads, strict=True):
        scale = want.abs().max().item()
        assert scale > 0, f"{name}: zero gradient"
        torch.testing.assert_close(grad, want, **FP16.tol(scale), msg=lambda m: f"{name}: {m}")
    report = swap_report(after)
    assert report.skipped == {} and report.swappable == {}
    assert report.fused[""] == "lin_mil.Lin_MIL.Lin_MIL -> milkernels.nn.FusedLinMIL"
    line = report.replaced["transformer.1.attn"]
    assert line.startswith("lin_mil.attention.dilated_attention.DilatedAttention -> "
                           "milkernels.nn.LinMILDilatedAttention; fused only when incremental_state")
    assert list(after.state_dict()) == list(before.state_dict())


def test_swap_report_before_and_idempotent(flash, capsys):
    model = nn.ModuleDict(dict(lin_mil=build_lin_mil(depth=1), gigapath=gigapath_attention(torch.float32)))
    report = swap_report(model)
    assert report.skipped == {} and set(report.swappable) == {"lin_mil", "lin_mil.transformer.0.attn", "gigapath"}
    milkernels.swap(model, verbose=True)
    assert "1 fused, 0 swappable, 0 skipped, 2 replaced" in capsys.readouterr().out
    modules = dict(model.named_modules())
    milkernels.swap(model)
    assert dict(model.named_modules()) == modules
    assert type(model["gigapath"]) is DilatedAttention
    assert model["gigapath"].swapped_from.endswith("TorchscaleDilatedAttention")


def _distributed(monkeypatch, world):
    """A fake initialized process group of ``world`` processes (lin-mil caches its group on a function)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(upstream.get_data_parallel_group, "_global_group", None, raising=False)


SKIPPED = {  # module, what the reason says
    "xpos": (lambda: lin_mil_attention([8], [2], 12, 3, torch.float32, xpos_rel_pos=True), "xpos is set"),
    "dropout": (lambda: upstream.DilatedAttention(dilated_args([8], [2]), 12, 3, dropout=0.1, self_attention=True),
                "dropout=0.1: upstream's flash path drops"),
    "flash_attention_off": (lambda: lin_mil_attention([8], [2], 12, 3, torch.float32, flash_attention=False),
                            "args.flash_attention is False"),
    "branches_of_two_lengths": (lambda: lin_mil_attention([8, 16], [2], 12, 3, torch.float32),
                                "segment_lengths and dilation_rates must have one length"),
    "hooked": (lambda: _hooked(gigapath_attention(torch.float32)), "it has forward hooks"),
}


def _hooked(module):
    module.register_forward_hook(lambda *args: None)
    module.q_proj.register_forward_hook(lambda *args: None)  # a child's hook still runs: not a reason
    return module


@pytest.mark.parametrize("name", list(SKIPPED))
def test_modules_left_alone_with_the_reason(flash, name):
    build, reason = SKIPPED[name]
    module = build()
    report = swap_report(module)
    assert list(report.skipped) == [""] and reason in report.skipped[""], report.skipped
    assert milkernels.swap(module) is module


def test_seq_parallel_does_not_block_the_swap(flash, monkeypatch):
    """The probes run with ``args.seq_parallel`` off (one process compares), which is set back after."""
    model = build_lin_mil(depth=1)
    assert model.transformer[0].attn.args.seq_parallel  # lin-mil's default
    _distributed(monkeypatch, 2)
    assert set(swap_report(model).swappable) == {"", "transformer.0.attn"}
    after = milkernels.swap(model)
    assert isinstance(after, FusedLinMIL) and type(after.transformer[0].attn) is LinMILDilatedAttention
    assert after.transformer[0].attn.args.seq_parallel


@pytest.mark.parametrize("segments, rates, length, world, aligned", [
    ([8, 32], [1, 2], 16, 2, True),      # 32 gathered over both shards, 8 local
    ([8, 64], [1, 2], 16, 2, True),      # 64 >= the bag: one segment over every shard
    ([8, 48], [1, 2], 16, 4, False),     # 48 splits a bag of 64 into a segment and a part that upstream leaves short
    ([8, 32], [1, 4], 18, 2, False),     # 32 is no multiple of 18
    ([6, 32], [1, 2], 16, 2, False),     # 6 does not divide a shard: its local segments cross the shards
    ([8, 32], [4, 2], 16, 2, True),      # r = 4 divides the local segment 8
    ([8, 32], [1, 32], 16, 2, False),    # r = 32 does not divide a shard of 16
])
def test_seq_parallel_problem(segments, rates, length, world, aligned):
    """Where torchscale's gathering is the whole bag's attention (what the sequence-parallel op computes)."""
    from milkernels.nn.dilated_attention import seq_parallel_problem

    problem = seq_parallel_problem(SimpleNamespace(segment_length=segments, dilated_ratio=rates), length, world)
    assert (problem == "") == aligned, problem


def test_missing_upstream_kernel_is_the_reason(monkeypatch):
    """On CPU lin-mil's flash_attn_func is None: neither the attention nor the model can run or be checked."""
    monkeypatch.setattr(upstream, "flash_attn_func", None)
    model = build_lin_mil(depth=1)
    report = swap_report(model)
    assert report.swappable == {}
    assert "flash_attn_func is None in lin_mil.attention.dilated_attention" in report.skipped["transformer.0.attn"]
    assert report.skipped[""].startswith("lin_mil.Lin_MIL.Lin_MIL: transformer.0.attn: flash_attn_func is None")
