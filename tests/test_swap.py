"""milkernels.swap: CLAM and torchmil models keep their outputs, gradients, parameters and checkpoints."""

import copy
import io

import pytest
import torch
from torch import nn

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


UNSUPPORTED = {
    "relu": (lambda: AttentionPool(L, D, act="relu"), "act='relu'"),
    "gelu": (lambda: AttentionPool(L, D, act="gelu", gated=True), "act='gelu'"),
    "lazy": (lambda: AttentionPool(None, D), "not initialized"),
    "ungated_clam": (lambda: ClamSB(attention=AttnNet).attention_net[3], "ungated Attn_Net"),
    "hook": (lambda: _with_hook(AttnNetGated(L, D)), "hooks"),
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
