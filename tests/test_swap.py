"""milkernels.swap: CLAM and torchmil models keep their outputs, gradients, parameters and checkpoints."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

import milkernels
from milkernels.nn import GatedAttention, TorchmilAttentionPool
from milkernels.swap import swap_report
from test_nn import EMBED, AttnNet, AttnNetGated, ClamMB, ClamSB, L, D, case  # noqa: F401 (case is a fixture)

try:
    from torchmil.nn import AttentionPool
except ImportError:  # torchmil 1.0.2's AttentionPool, reduced to what swap sees and what forward does

    class LazyLinear(nn.Module):
        def __init__(self, in_features=None, out_features=512, bias=True):
            super().__init__()
            self.module = nn.Linear(in_features, out_features, bias) if in_features else nn.LazyLinear(out_features, bias)

        def forward(self, x):
            return self.module(x)

    class AttentionPool(nn.Module):
        def __init__(self, in_dim=None, att_dim=128, act="tanh", gated=False):
            super().__init__()
            self.in_dim, self.att_dim, self.act, self.gated = in_dim, att_dim, act, gated
            self.fc1 = LazyLinear(in_dim, att_dim)
            self.fc2 = nn.Linear(att_dim, 1, bias=False)
            if self.gated:
                self.fc_gated = LazyLinear(in_dim, att_dim)
                self.act_gated = nn.Sigmoid()
            self.act_layer = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}[act]()

        def forward(self, X, mask=None, return_att=False):
            if mask is None:
                mask = torch.ones(X.shape[0], X.shape[1], device=X.device)
            H = self.act_layer(self.fc1(X))
            if self.gated:
                H = H * self.act_gated(self.fc_gated(X))
            f = self.fc2(H)
            s = torch.softmax(f.masked_fill(mask.unsqueeze(-1) == 0, -float("inf")), dim=1)
            z = torch.bmm(X.transpose(1, 2), s).squeeze(dim=-1)
            return (z, f.squeeze(dim=-1)) if return_att else z


class TorchmilModel(nn.Module):
    """An ABMIL-style torchmil model: instance encoder, ``AttentionPool``, bag classifier."""

    def __init__(self, gated=True, act="tanh", in_dim=L):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(EMBED, L), nn.ReLU())
        self.pool = AttentionPool(in_dim, D, act, gated)
        self.classifier = nn.Linear(L, 2)

    def forward(self, X, mask=None):
        """``X: (B, N, EMBED)``, ``mask: (B, N)`` -> ``(logits: (B, 2), f: (B, N))``."""
        z, f = self.pool(self.encoder(X), mask, return_att=True)
        return self.classifier(z), f


MODELS = {
    "clam_sb": (ClamSB, "attention_net.3", GatedAttention),
    "clam_mb": (ClamMB, "attention_net.3", GatedAttention),
    "torchmil_gated": (lambda: TorchmilModel(gated=True), "pool", TorchmilAttentionPool),
    "torchmil": (lambda: TorchmilModel(gated=False), "pool", TorchmilAttentionPool),
}


def inputs_for(name, rows, dtype, device):
    """Random inputs (never zeros) of model ``name``: one bag, or two padded bags with a mask for torchmil."""
    if not name.startswith("torchmil"):
        return (torch.randn(rows, EMBED, dtype=dtype, device=device, requires_grad=True),)
    X = torch.randn(2, rows, EMBED, dtype=dtype, device=device, requires_grad=True)
    mask = torch.ones(2, rows, dtype=torch.bool, device=device)
    mask[1, (rows + 2) // 3 * 2:] = False
    return X, mask


def outputs_and_grads(model, inputs):
    """The outputs of ``model(*inputs)`` and the gradients of a random mix of them w.r.t. inputs and parameters."""
    outputs = model(*inputs)
    generator = torch.Generator().manual_seed(5)
    loss = sum((out * torch.randn(out.shape, generator=generator).to(out)).sum() for out in outputs)
    wrt = [inputs[0], *model.parameters()]
    return outputs, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("rows", [1, 17, 1000])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_grads_unchanged(case, device, name, rows):
    build, path, fused_class = MODELS[name]
    torch.manual_seed(0)
    before = build().to(device, case.dtype).eval()
    after = copy.deepcopy(before)
    assert milkernels.swap(after) is after
    assert type(after.get_submodule(path)) is fused_class
    inputs = inputs_for(name, rows, case.dtype, device)
    expected_outputs, expected_grads = outputs_and_grads(before, inputs)
    outputs, grads = outputs_and_grads(after, inputs)
    for out, expected in zip(outputs, expected_outputs, strict=True):
        torch.testing.assert_close(out, expected, **case.tol())
    names = ["input", *(n for n, _ in after.named_parameters())]
    for param, grad, expected in zip(names, grads, expected_grads, strict=True):
        scale = expected.abs().max().item()
        assert scale > 0, f"{param}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grad, expected, **case.tol(scale), msg=lambda m: f"{param}: {m}")


def test_training_with_dropout_matches_under_reference(device):
    """Dropout on: the reference backend draws CLAM's masks from torch's generator in CLAM's order."""
    torch.manual_seed(0)
    before = ClamMB().to(device).train()
    after = milkernels.swap(copy.deepcopy(before))
    h = torch.randn(30, EMBED, device=device)
    torch.manual_seed(7)
    expected = before(h)
    with milkernels.use_backend("reference"):
        torch.manual_seed(7)
        outputs = after(h)
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want)


@pytest.mark.parametrize("name", list(MODELS))
def test_parameters_and_state_dict_keys_kept(name):
    model = MODELS[name][0]()
    params = list(model.parameters())
    keys = list(model.state_dict())
    milkernels.swap(model)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_round_trip(device, name):
    build, _, _ = MODELS[name]
    torch.manual_seed(0)
    original = build().to(device).eval()
    checkpoint = io.BytesIO()
    torch.save(original.state_dict(), checkpoint)
    torch.manual_seed(1)
    swapped = milkernels.swap(build().to(device).eval())
    checkpoint.seek(0)
    swapped.load_state_dict(torch.load(checkpoint))
    inputs = inputs_for(name, 20, torch.float32, device)
    for out, expected in zip(swapped(*inputs), original(*inputs), strict=True):
        torch.testing.assert_close(out, expected)
    unswapped = build().to(device)
    unswapped.load_state_dict(swapped.state_dict())
    for mine, theirs in zip(unswapped.state_dict().values(), original.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_idempotent_and_report(capsys):
    model = nn.ModuleDict(dict(sb=ClamSB(), mb=ClamMB(), pool=TorchmilModel(), relu=TorchmilModel(act="relu")))
    assert swap_report(model).fused == {}
    assert set(swap_report(model).swappable) == {"sb.attention_net.3", "mb.attention_net.3", "pool.pool"}
    milkernels.swap(model, verbose=True)
    printed = capsys.readouterr().out
    modules = dict(model.named_modules())
    report = swap_report(model)
    milkernels.swap(model)
    assert dict(model.named_modules()) == modules
    assert swap_report(model) == report
    assert report.swappable == {}
    assert report.fused["sb.attention_net.3"] == "test_nn.AttnNetGated -> milkernels.nn.GatedAttention"
    assert report.fused["pool.pool"].endswith("AttentionPool -> milkernels.nn.TorchmilAttentionPool")
    assert set(report.fused) == {"sb.attention_net.3", "mb.attention_net.3", "pool.pool"}
    assert set(report.skipped) == {"relu.pool"}
    assert "3 fused, 0 swappable, 1 skipped" in printed and "act='relu'" in printed


def test_swap_the_module_itself_and_shared_modules():
    assert type(milkernels.swap(AttnNetGated(L, D))) is GatedAttention
    shared = AttnNetGated(L, D)
    model = nn.Sequential(shared, nn.Sequential(shared))
    milkernels.swap(model)
    assert type(model[0]) is GatedAttention and model[1][0] is model[0]


def test_swap_on_a_bare_layer_returns_the_replacement_and_leaves_the_layer():
    """Nothing can rebind the caller's name: ``layer = milkernels.swap(layer)`` is the way (the README says so)."""
    layer = AttnNetGated(L, D).eval()
    children, attributes = dict(layer.named_children()), set(vars(layer))
    state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    replacement = milkernels.swap(layer)
    assert type(replacement) is GatedAttention and replacement is not layer
    assert type(layer) is AttnNetGated and not layer.training and set(vars(layer)) == attributes
    assert all(child is children[name] for name, child in layer.named_children())
    assert all(torch.equal(tensor, state[name]) for name, tensor in layer.state_dict().items())
    assert swap_report(layer).swappable == {"": "test_nn.AttnNetGated"}
    assert swap_report(replacement).fused == {"": "test_nn.AttnNetGated -> milkernels.nn.GatedAttention"}


def test_verbose_prints_the_report_once_and_swap_report_prints_nothing(capsys):
    model = nn.ModuleDict(dict(sb=ClamSB(), relu=TorchmilModel(act="relu")))
    swap_report(model)
    assert capsys.readouterr().out == ""
    milkernels.swap(model, verbose=True)
    printed = capsys.readouterr().out
    report = swap_report(model)
    assert capsys.readouterr().out == ""
    assert printed == f"{report}\n" and printed.count("milkernels.swap:") == 1
    milkernels.swap(model)
    assert capsys.readouterr().out == ""


def test_eval_mode_kept():
    model = milkernels.swap(ClamSB().eval())
    assert type(model.attention_net[3]) is GatedAttention and not model.attention_net[3].training


def _with_hook(module):
    module.register_forward_hook(lambda *args: None)
    return module


def _with_parameter(module):
    module.temperature = nn.Parameter(torch.ones(()))
    return module


def _with_branch(module, branch, layers):
    setattr(module, branch, nn.Sequential(*layers))
    return module


def _changed(module, path, change):
    """``module`` after ``change(module.get_submodule(path))``: a hook, pruning or a weight norm on a child."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style torch.nn.utils.weight_norm
        change(module.get_submodule(path))
    return module


def _pruned_without_hook(linear):
    """Pruned, then the pruning pre-hook dropped: ``weight`` is left a plain tensor beside ``weight_orig``."""
    prune.l1_unstructured(linear, "weight", amount=0.5)
    linear._forward_pre_hooks.clear()


def _forward_hook(module):
    module.register_forward_hook(lambda *args: None)


class SoftmaxedAttnNetGated(AttnNetGated):
    """Same children as CLAM's, but returns the softmaxed attention."""

    def forward(self, x):
        A, x = super().forward(x)
        return F.softmax(A, dim=0), x


class ScoresOnlyAttnNetGated(AttnNetGated):
    """Same children as CLAM's, but returns the scores only."""

    def forward(self, x):
        return super().forward(x)[0]


class CoordsAttnNetGated(AttnNetGated):
    """Same children as CLAM's, but its forward takes another argument."""

    def forward(self, x, coords):
        return super().forward(x + coords)


def _torchmil_variant(forward):
    """A class named ``AttentionPool`` (so swap recognizes it) with torchmil's children and another ``forward``."""
    return type("AttentionPool", (AttentionPool,), {"forward": forward})


def _softmaxed_att(self, X, mask=None, return_att=False):
    z, f = AttentionPool.forward(self, X, mask, return_att=True)
    return (z, torch.softmax(f, dim=1)) if return_att else z


def _mask_ignored(self, X, mask=None, return_att=False):
    return AttentionPool.forward(self, X, None, return_att)


def _always_att(self, X, mask=None, return_att=False):
    return AttentionPool.forward(self, X, mask, return_att=True)


UNSUPPORTED = {
    "relu": (lambda: AttentionPool(L, D, act="relu"), "act='relu'"),
    "gelu": (lambda: AttentionPool(L, D, act="gelu", gated=True), "act='gelu'"),
    "lazy": (lambda: AttentionPool(None, D), "not initialized"),
    "ungated_clam": (lambda: ClamSB(attention=AttnNet).attention_net[3], "ungated Attn_Net"),
    "hook": (lambda: _with_hook(AttnNetGated(L, D)), "hooks"),
    "child_forward_hook": (lambda: _changed(AttnNetGated(L, D), "attention_a", _forward_hook),
                           "attention_a has forward hooks"),
    "child_pre_hook": (lambda: _changed(AttnNetGated(L, D), "attention_c",
                                        lambda m: m.register_forward_pre_hook(lambda *args: None)),
                       "attention_c has forward pre hooks"),
    "child_backward_hook": (lambda: _changed(AttnNetGated(L, D), "attention_b.1",
                                             lambda m: m.register_full_backward_hook(lambda *args: None)),
                            "attention_b.1 has backward hooks"),
    "pruned": (lambda: _changed(AttnNetGated(L, D), "attention_a.0", lambda m: prune.l1_unstructured(m, "weight", 0.5)),
               "attention_a.0 has forward pre hooks"),
    "pruned_hook_dropped": (lambda: _changed(AttnNetGated(L, D), "attention_a.0", _pruned_without_hook),
                            "attention_a.0.weight is not a plain registered Parameter"),
    "old_weight_norm": (lambda: _changed(AttnNetGated(L, D), "attention_c", nn.utils.weight_norm),
                        "attention_c has forward pre hooks"),
    "parametrized": (lambda: _changed(AttnNetGated(L, D), "attention_b.0", parametrizations.weight_norm),
                     "attention_b.0 is parametrized"),
    "torchmil_child_hook": (lambda: _changed(AttentionPool(L, D, gated=True), "fc_gated.module", _forward_hook),
                            "fc_gated.module has forward hooks"),
    "torchmil_pruned": (lambda: _changed(AttentionPool(L, D), "fc2",
                                         lambda m: prune.random_unstructured(m, "weight", 0.5)),
                        "fc2 has forward pre hooks"),
    "torchmil_parametrized": (lambda: _changed(AttentionPool(L, D), "fc1.module", parametrizations.weight_norm),
                              "fc1.module is parametrized"),
    "meta_device": (lambda: AttnNetGated(L, D).to("meta"), "meta device"),
    "softmaxed_scores": (lambda: SoftmaxedAttnNetGated(L, D), "forward differs from CLAM's Attn_Net_Gated"),
    "scores_only": (lambda: ScoresOnlyAttnNetGated(L, D), "forward differs from CLAM's Attn_Net_Gated"),
    "forward_raises": (lambda: CoordsAttnNetGated(L, D), "its forward raised TypeError"),
    "torchmil_softmaxed_att": (lambda: _torchmil_variant(_softmaxed_att)(L, D), "forward differs from torchmil's"),
    "torchmil_mask_ignored": (lambda: _torchmil_variant(_mask_ignored)(L, D, gated=True),
                              "forward differs from torchmil's"),
    "torchmil_always_att": (lambda: _torchmil_variant(_always_att)(L, D), "forward differs from torchmil's"),
    "own_parameter": (lambda: _with_parameter(AttnNetGated(L, D)), "parameters"),
    "relu_branch": (lambda: _with_branch(AttnNetGated(L, D), "attention_a", [nn.Linear(L, D), nn.ReLU()]),
                    "attention_a is not Sequential(Linear, Tanh"),
    "dropout_mismatch": (lambda: _with_branch(AttnNetGated(L, D), "attention_b",
                                              [nn.Linear(L, D), nn.Sigmoid(), nn.Dropout(0.5)]), "dropout p"),
    "shape_mismatch": (lambda: _with_branch(AttnNetGated(L, D), "attention_b", [nn.Linear(L, D + 1), nn.Sigmoid()]),
                       "shapes do not match"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_variants_skipped_with_reason(name):
    build, reason = UNSUPPORTED[name]
    model = nn.Sequential(build())
    original = model[0]
    assert milkernels.swap(model) is model
    assert model[0] is original
    report = swap_report(model)
    assert report.fused == {} and list(report.skipped) == ["0"]
    assert reason in report.skipped["0"]


def test_lazy_torchmil_pool_swapped_once_initialized():
    model = TorchmilModel(in_dim=None)
    milkernels.swap(model)
    assert "not initialized" in swap_report(model).skipped["pool"]
    X = torch.randn(2, 9, EMBED)
    expected = model(X)
    milkernels.swap(model)
    assert type(model.pool) is TorchmilAttentionPool
    for out, want in zip(model(X), expected, strict=True):
        torch.testing.assert_close(out, want)


def test_torchmil_replacement_keeps_attributes_and_return_contract():
    pool = AttentionPool(L, D, gated=True)
    fused = milkernels.swap(pool)
    assert (fused.in_dim, fused.att_dim, fused.act, fused.gated) == (L, D, "tanh", True)
    X = torch.randn(3, 11, L)
    assert fused(X).shape == (3, L)
    z, f = fused(X, return_att=True)
    assert z.shape == (3, L) and f.shape == (3, 11)
    with pytest.raises(ValueError, match="batch_size, bag_size"):
        fused(X[0])


class GatedAttentionNet(nn.Module):
    """CMA-MIL style: CLAM's children and contract under another class name, forward written otherwise."""

    def __init__(self):
        super().__init__()
        self.attention_c = nn.Linear(D, 2)
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), nn.Dropout(0.1))
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), nn.Dropout(0.1))

    def forward(self, features):
        return self.attention_c(self.attention_a(features) * self.attention_b(features)), features


def test_other_class_with_the_same_forward_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(GatedAttentionNet()).eval()
    x = torch.randn(9, L)
    expected, _ = model(x)
    milkernels.swap(model)
    assert type(model[0]) is GatedAttention and model[0].dropout_p == 0.1
    torch.testing.assert_close(model(x)[0], expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
def test_probe_passes_in_every_dtype(name, dtype):
    build, path, fused_class = MODELS[name]
    model = build().to(dtype)
    assert swap_report(model).skipped == {}
    milkernels.swap(model)
    assert type(model.get_submodule(path)) is fused_class


@pytest.mark.parametrize("build", [ClamSB, SoftmaxedAttnNetGated, lambda: TorchmilModel(gated=True)])
def test_probe_keeps_training_flags_and_global_rng(build):
    model = build().train()
    for index, module in enumerate(model.modules()):
        module.training = index % 3 != 1  # a mix of flags, children included
    flags = [module.training for module in model.modules()]
    rng = torch.get_rng_state()
    report = swap_report(model)
    assert [module.training for module in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert report.swappable or report.skipped
