"""milkernels.swap on LiteMIL (nn.MultiheadAttention) and ASMIL models: outputs, gradients, parameters,
checkpoints, training steps and the report; variants that must stay as they are."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import milkernels
from milkernels.nn.query_attention import MultiheadAttention, QueryAttention
from milkernels.swap import swap_report
from test_query_attention_nn import (ASMIL, ASMIL_DIM, ASMIL_HEADS, ASMIL_TOKENS, HEADS, HID, IN_DIM, ASMILAttention,
                                     LiteMIL, assert_same, bags, outputs_and_grads)
from test_query_attention_nn import qcase  # noqa: F401 (a fixture)

MODELS = {
    "lite_mil_q1": (lambda: LiteMIL(1), ["attention"], MultiheadAttention),
    "lite_mil_q4_sequence_first": (lambda: LiteMIL(4, batch_first=False), ["attention"], MultiheadAttention),
    "asmil_softmax": (lambda: ASMIL(softmax=True), [f"attentions.{i}" for i in range(ASMIL_TOKENS)], QueryAttention),
    "asmil_nsf": (lambda: ASMIL(softmax=False), [f"attentions.{i}" for i in range(ASMIL_TOKENS)], QueryAttention),
}


def model_inputs(name, rows, dtype):
    """``(x, *args)`` for model ``name``: padded bags with a key padding mask for LiteMIL, one bag for ASMIL."""
    if name.startswith("asmil"):
        return (torch.randn(rows, IN_DIM, dtype=dtype, requires_grad=True),)
    return bags(rows, dtype, padded=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_grads_unchanged(qcase, name):
    torch.manual_seed(0)
    before = MODELS[name][0]().to(qcase.dtype).eval()
    after = copy.deepcopy(before)
    assert milkernels.swap(after) is after
    _, paths, fused_class = MODELS[name]
    assert all(type(after.get_submodule(path)) is fused_class for path in paths)
    inputs = model_inputs(name, 17, qcase.dtype)
    expected, expected_grads = outputs_and_grads(before, *inputs)
    outputs, grads = outputs_and_grads(after, *inputs)
    assert_same(qcase, outputs, expected, grads, expected_grads)


@pytest.mark.parametrize("name", list(MODELS))
def test_parameters_state_dict_and_old_checkpoint(name):
    torch.manual_seed(0)
    original = MODELS[name][0]().eval()
    params, keys = list(original.parameters()), list(original.state_dict())
    checkpoint = io.BytesIO()
    torch.save(original.state_dict(), checkpoint)
    inputs = model_inputs(name, 20, torch.float32)
    expected = original(*inputs)
    swapped = milkernels.swap(copy.deepcopy(original))
    assert list(swapped.state_dict()) == keys
    torch.manual_seed(1)
    fresh = milkernels.swap(MODELS[name][0]().eval())
    checkpoint.seek(0)
    fresh.load_state_dict(torch.load(checkpoint))
    for out, want in zip(fresh(*inputs), expected, strict=True):
        torch.testing.assert_close(out, want)
    milkernels.swap(original)
    assert all(a is b for a, b in zip(original.parameters(), params, strict=True))


def test_report_lists_modules_and_swap_is_idempotent():
    bias_kv = nn.MultiheadAttention(HID, HEADS, add_bias_kv=True)
    model = nn.ModuleDict(dict(lite=LiteMIL(4), asmil=ASMIL(), bias_kv=bias_kv))
    report = swap_report(model)
    assert set(report.swappable) == {"lite.attention", *(f"asmil.attentions.{i}" for i in range(ASMIL_TOKENS))}
    assert set(report.skipped) == {"bias_kv"} and report.fused == {}
    milkernels.swap(model)
    modules = dict(model.named_modules())
    report = swap_report(model)
    milkernels.swap(model)
    assert dict(model.named_modules()) == modules and swap_report(model) == report
    assert report.swappable == {} and set(report.skipped) == {"bias_kv"} and report.fused == {}
    assert report.replaced["lite.attention"].startswith("torch.nn.modules.activation.MultiheadAttention -> "
                                                        "milkernels.nn.MultiheadAttention; fused only when key is value")
    assert report.replaced["asmil.attentions.0"].startswith("test_query_attention_nn.ASMILAttention -> "
                                                            "milkernels.nn.QueryAttention; fused only when k is v")
    assert len(report.replaced) == 1 + ASMIL_TOKENS


class SelfAttentionMIL(nn.Module):
    """A transformer-style MIL layer: self-attention over the instances (query is key is value)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(HID, HEADS, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)[0]


def test_report_says_fused_only_where_the_fused_path_runs(capsys):
    """Self-attention, a long query or another call can take PyTorch's path: such a module is 'replaced',
    with the conditions of its fused path, never 'fused'; one whose fused path can never run says why."""
    model = nn.ModuleDict(dict(self_attention=SelfAttentionMIL(), lite=LiteMIL(4)))
    milkernels.swap(model, verbose=True)
    printed = capsys.readouterr().out
    report = swap_report(model)
    assert report.fused == {} and set(report.replaced) == {"self_attention.attention", "lite.attention"}
    line = report.replaced["self_attention.attention"]
    assert "fused only when key is value" in line and "the query has 1 to 64 rows" in line
    assert "0 fused, 0 swappable, 0 skipped, 2 replaced but fused on some calls only" in printed
    assert "  replaced  self_attention.attention: " in printed and "  fused " not in printed
    built = nn.Sequential(MultiheadAttention(HID, HEADS, add_bias_kv=True), MultiheadAttention(HID, HEADS))
    assert not built[0].fused_path_possible and built[1].fused_path_possible
    report = swap_report(built)
    assert report.replaced["0"] == ("milkernels.nn.MultiheadAttention; never fused: add_bias_kv=True: the fused op "
                                    "has no bias_k/bias_v key and value rows")
    assert report.replaced["1"].startswith("milkernels.nn.MultiheadAttention; fused only when key is value")


def test_swap_the_module_itself_keeps_flags():
    mha = nn.MultiheadAttention(HID, HEADS, batch_first=True).eval()
    fused = milkernels.swap(mha)
    assert type(fused) is MultiheadAttention and not fused.training and fused.in_proj_weight is mha.in_proj_weight
    assert type(milkernels.swap(ASMILAttention(ASMIL_DIM, ASMIL_HEADS).train())) is QueryAttention


def test_one_training_step_matches():
    """Eval mode (the attention dropout's draw is the op's own), float64, reference backend, AdamW."""
    torch.manual_seed(0)
    before = LiteMIL(4).double().eval()
    after = milkernels.swap(copy.deepcopy(before))
    x, mask = bags(30, torch.float64, padded=True)
    target = torch.tensor([0, 1, 1])
    with milkernels.use_backend("reference"):
        for model in (before, after):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            nn.functional.cross_entropy(model(x, mask)[0], target).backward()
            optimizer.step()
    for (name, mine), theirs in zip(after.named_parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["lite_mil_q1", "asmil_nsf"])
def test_probe_passes_in_every_dtype(name, dtype):
    model = MODELS[name][0]().to(dtype)
    assert swap_report(model).skipped == {}
    milkernels.swap(model)
    assert type(model.get_submodule(MODELS[name][1][0])) is MODELS[name][2]


def _hooked(module, path=""):
    module.get_submodule(path).register_forward_hook(lambda *args: None)
    return module


def _pruned(module, path, name="weight"):
    prune.l1_unstructured(module.get_submodule(path), name, amount=0.5)
    return module


def _parametrized(module, path, name="weight"):
    parametrize.register_parametrization(module.get_submodule(path), name, nn.Identity())
    return module


def _weight_normed_out_proj():
    mha = _mha()
    parametrizations.weight_norm(mha.out_proj)
    return mha


def _with(module, **attributes):
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


class SoftmaxedASMIL(ASMILAttention):
    """ASMIL's children, but returns the normalized weights in place of the logits."""

    def forward(self, q, k, v):
        out, logits = super().forward(q, k, v)
        return out, torch.softmax(logits, dim=-1)


class ScaledMHA(nn.MultiheadAttention):
    """A subclass whose forward scales the output: not PyTorch's contract."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return 2 * out, weights


def _mha(**kwargs):
    return nn.MultiheadAttention(HID, HEADS, batch_first=True, **kwargs)


def _asmil(**kwargs):
    return ASMILAttention(ASMIL_DIM, ASMIL_HEADS, **kwargs)


UNSUPPORTED = {
    "bias_kv": (lambda: _mha(add_bias_kv=True), "add_bias_kv=True"),
    "zero_attn": (lambda: _mha(add_zero_attn=True), "add_zero_attn=True"),
    "kdim_vdim": (lambda: _mha(kdim=32, vdim=48), "kdim=32 != vdim=48"),
    "hooked": (lambda: _hooked(_mha()), "it has forward hooks"),
    "out_proj_hooked": (lambda: _hooked(_mha(), "out_proj"), "out_proj has forward hooks"),
    "in_proj_parametrized": (lambda: _parametrized(_mha(), "", "in_proj_weight"), "it is parametrized"),
    "in_proj_pruned": (lambda: _pruned(_mha(), "", "in_proj_weight"), "parameters or buffers of its own"),
    "out_proj_weight_norm": (lambda: _weight_normed_out_proj(), "out_proj is parametrized"),
    "out_proj_pruned": (lambda: _pruned(_mha(), "out_proj"), "out_proj has forward pre hooks"),
    "mha_meta": (lambda: _mha().to("meta"), "meta device"),
    "mha_forward_differs": (lambda: ScaledMHA(HID, HEADS), "forward differs from torch.nn.MultiheadAttention"),
    "asmil_hooked": (lambda: _hooked(_asmil(), "k_proj"), "k_proj has forward hooks"),
    "asmil_parametrized": (lambda: _parametrized(_asmil(), "v_proj"), "v_proj is parametrized"),
    "asmil_heads": (lambda: _with(_asmil(), num_heads=5), "num_heads=5 is not an int dividing"),
    "asmil_softmax_flag": (lambda: _with(_asmil(), softmax="yes"), "softmax='yes' is not a bool"),
    "asmil_norm": (lambda: _with(_asmil(), layer_norm=nn.BatchNorm1d(ASMIL_DIM)), "not a LayerNorm"),
    "asmil_shapes": (lambda: _with(_asmil(), v_proj=nn.Linear(ASMIL_DIM, 64)), "not Linear(E, I) x 3"),
    "asmil_forward_differs": (lambda: SoftmaxedASMIL(ASMIL_DIM, ASMIL_HEADS), "forward differs from ASMIL's"),
    "asmil_meta": (lambda: _asmil().to("meta"), "meta device"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_variants_skipped_with_reason(name):
    build_module, reason = UNSUPPORTED[name]
    model = nn.Sequential(build_module())
    original = model[0]
    assert milkernels.swap(model) is model and model[0] is original
    report = swap_report(model)
    assert report.fused == {} and list(report.skipped) == ["0"]
    assert reason in report.skipped["0"]
