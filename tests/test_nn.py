"""milkernels.nn: CLAM's Attn_Net_Gated contract (constructor, state_dict, init, forward) and the pool module.

The CLAM replicas here are also the models of tests/test_swap.py.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import milkernels
from milkernels.nn import GatedAttention, GatedAttentionPool

TRITON_SOURCE = Path(milkernels.__file__).parent / "ops" / "gated_attention" / "triton.py"
L, D, EMBED = 72, 40, 50  # features, hidden units, CLAM's input features: none a power of two


class AttnNetGated(nn.Module):
    """CLAM's ``Attn_Net_Gated`` (models/model_clam.py), verbatim but for names."""

    def __init__(self, L=1024, D=256, dropout=False, n_classes=1):
        super().__init__()
        self.attention_a = [nn.Linear(L, D), nn.Tanh()]
        self.attention_b = [nn.Linear(L, D), nn.Sigmoid()]
        if dropout:
            self.attention_a.append(nn.Dropout(0.25))
            self.attention_b.append(nn.Dropout(0.25))
        self.attention_a = nn.Sequential(*self.attention_a)
        self.attention_b = nn.Sequential(*self.attention_b)
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        a = self.attention_a(x)
        b = self.attention_b(x)
        A = a.mul(b)
        A = self.attention_c(A)
        return A, x


class AttnNet(nn.Module):
    """CLAM's ungated ``Attn_Net``."""

    def __init__(self, L=1024, D=256, dropout=False, n_classes=1):
        super().__init__()
        self.module = [nn.Linear(L, D), nn.Tanh()]
        if dropout:
            self.module.append(nn.Dropout(0.25))
        self.module.append(nn.Linear(D, n_classes))
        self.module = nn.Sequential(*self.module)

    def forward(self, x):
        return self.module(x), x


class ClamSB(nn.Module):
    """CLAM_SB's bag path: ``attention_net = Sequential(Linear, ReLU, Dropout, attention)``, softmax, classifier."""

    def __init__(self, n_classes=2, dropout=0.25, attention=AttnNetGated, heads=1):
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(EMBED, L), nn.ReLU(), nn.Dropout(dropout),
                                           attention(L=L, D=D, dropout=dropout, n_classes=heads))
        self.classifiers = nn.Linear(L, n_classes)

    def forward(self, h):
        """``h: (N, EMBED)`` -> ``(logits: (1, n_classes), A_raw: (heads, N))``."""
        A, h = self.attention_net(h)
        A_raw = torch.transpose(A, 1, 0)
        M = torch.mm(F.softmax(A_raw, dim=1), h)
        return self.classifiers(M), A_raw


class ClamMB(ClamSB):
    """CLAM_MB's bag path: one attention head and one bag classifier per class."""

    def __init__(self, n_classes=3, dropout=0.25, attention=AttnNetGated):
        super().__init__(n_classes, dropout, attention, heads=n_classes)
        self.classifiers = nn.ModuleList([nn.Linear(L, 1) for _ in range(n_classes)])

    def forward(self, h):
        A, h = self.attention_net(h)
        A_raw = torch.transpose(A, 1, 0)
        M = torch.mm(F.softmax(A_raw, dim=1), h)
        logits = torch.cat([classifier(M[c]) for c, classifier in enumerate(self.classifiers)])[None]
        return logits, A_raw


TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)}  # (rtol, atol at scale 1)


@dataclass(frozen=True)
class Case:
    """A backend forced for the milkernels side, the dtype of the comparison and its ``(rtol, atol)``
    for values of magnitude 1 (default: ``TOLERANCES`` of the dtype)."""

    backend: str
    dtype: torch.dtype
    tolerance: tuple[float, float] | None = None

    def tol(self, scale: float = 1.0) -> dict:
        """assert_close tolerances for values of magnitude about ``scale``."""
        rtol, atol = self.tolerance or TOLERANCES[self.dtype]
        return dict(rtol=rtol, atol=atol * scale)


CASES = [Case("reference", torch.float64), Case("reference", torch.float32), Case("triton", torch.float32)]


@pytest.fixture(params=CASES, ids=lambda c: f"{c.backend}-{str(c.dtype).removeprefix('torch.')}")
def case(request):
    """Each case, with its backend forced for the test; triton only once its kernels have landed."""
    if request.param.backend == "triton" and not TRITON_SOURCE.exists():
        pytest.skip("milkernels/ops/gated_attention/triton.py has not landed yet")
    with milkernels.use_backend(request.param.backend):
        yield request.param


def gated_scores(x, a, b, c):
    """CLAM's scores from the Linear layers ``a``, ``b``, ``c`` (no dropout)."""
    return c(torch.tanh(a(x)) * torch.sigmoid(b(x)))


@pytest.mark.parametrize("dropout", [False, True, 0.25])
@pytest.mark.parametrize("heads", [1, 3])
def test_state_dict_matches_clam(dropout, heads):
    ours = GatedAttention(L, D, dropout, heads).state_dict()
    clam = AttnNetGated(L, D, dropout, heads).state_dict()
    assert list(ours) == list(clam)
    assert [v.shape for v in ours.values()] == [v.shape for v in clam.values()]


def test_children_and_init_match_clam():
    torch.manual_seed(0)
    clam = AttnNetGated(L, D, True, 3)
    torch.manual_seed(0)
    ours = GatedAttention(L, D, True, 3)
    assert repr(ours.attention_a) == repr(clam.attention_a)
    assert repr(ours.attention_b) == repr(clam.attention_b)
    assert repr(ours.attention_c) == repr(clam.attention_c)
    for (name, mine), theirs in zip(ours.state_dict().items(), clam.state_dict().values()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize("dropout", [False, 0, 0.0, None, True, 1, 0.1, 0.5, 1.0, 2])
def test_dropout_flag_as_clam(dropout):
    """CLAM's ``if dropout:``: any truthy value is Dropout(0.25), a falsy one none, in both branches."""
    module = GatedAttention(L, D, dropout)
    clam = AttnNetGated(L, D, dropout)
    assert module.dropout_p == (0.25 if dropout else 0.0)
    assert repr(module.attention_a) == repr(clam.attention_a)
    assert repr(module.attention_b) == repr(clam.attention_b)


@pytest.mark.parametrize("module_class", [GatedAttention, GatedAttentionPool])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_p_keyword(module_class, dropout, p):
    module = module_class(L, D, dropout, dropout_p=p)
    assert module.dropout_p == p
    assert len(module.attention_a) == len(module.attention_b) == (3 if p else 2)


@pytest.mark.parametrize("p", [1.0, -0.1, 2, float("nan"), True])
def test_dropout_p_out_of_range(p):
    with pytest.raises(ValueError, match="dropout_p"):
        GatedAttention(L, D, dropout_p=p)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("rows", [1, 17, 300])
def test_forward_contract(case, device, heads, rows):
    clam = AttnNetGated(L, D, True, heads).to(device, case.dtype).eval()
    ours = GatedAttention(L, D, True, heads).to(device, case.dtype).eval()
    ours.load_state_dict(clam.state_dict())
    x = torch.randn(rows, L, dtype=case.dtype, device=device)
    scores, same_x = ours(x)
    expected, _ = clam(x)
    assert same_x is x
    assert scores.shape == (rows, heads) and scores.dtype == case.dtype
    torch.testing.assert_close(scores, expected, **case.tol())


def test_clam_model_with_gated_attention_matches(case, device):
    clam = ClamSB().to(device, case.dtype).eval()
    ours = ClamSB(attention=GatedAttention).to(device, case.dtype).eval()
    assert list(ours.state_dict()) == list(clam.state_dict())
    ours.load_state_dict(clam.state_dict())
    h = torch.randn(40, EMBED, dtype=case.dtype, device=device)
    for mine, theirs in zip(ours(h), clam(h)):
        torch.testing.assert_close(mine, theirs, **case.tol())


def bag_math(module, x):
    """``(pooled: (K, L), scores: (N, K))`` of one bag ``x: (N, L)``, in plain PyTorch."""
    scores = gated_scores(x, module.attention_a[0], module.attention_b[0], module.attention_c)
    return torch.softmax(scores, dim=0).t() @ x, scores


@pytest.mark.parametrize("heads", [1, 3])
def test_pool_one_bag(case, device, heads):
    module = GatedAttentionPool(L, D, n_classes=heads).to(device, case.dtype)
    x = torch.randn(17, L, dtype=case.dtype, device=device)
    pooled, scores = module(x)
    expected_pooled, expected_scores = bag_math(module, x)
    assert pooled.shape == (heads, L) and scores.shape == (17, heads)
    torch.testing.assert_close(pooled, expected_pooled, **case.tol())
    torch.testing.assert_close(scores, expected_scores, **case.tol())


@pytest.mark.parametrize("heads", [1, 3])
def test_pool_padded_bags_with_mask(case, device, heads):
    module = GatedAttentionPool(L, D, n_classes=heads).to(device, case.dtype)
    lengths = [17, 5, 1]
    x = torch.randn(len(lengths), max(lengths), L, dtype=case.dtype, device=device)
    mask = torch.arange(max(lengths), device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    pooled, scores = module(x, mask=mask)
    assert pooled.shape == (len(lengths), heads, L) and scores.shape == (len(lengths), max(lengths), heads)
    for bag, length in enumerate(lengths):
        expected_pooled, expected_scores = bag_math(module, x[bag, :length])
        torch.testing.assert_close(pooled[bag], expected_pooled, **case.tol())
        torch.testing.assert_close(scores[bag, :length], expected_scores, **case.tol())


@pytest.mark.parametrize("heads", [1, 3])
def test_pool_packed_bags_forward_and_grads(case, device, heads):
    module = GatedAttentionPool(L, D, n_classes=heads).to(device, case.dtype)
    lengths = [1, 17, 70]
    x = torch.randn(sum(lengths), L, dtype=case.dtype, device=device, requires_grad=True)
    cu_seqlens = torch.tensor([0, 1, 18, 88], dtype=torch.int32, device=device)
    pooled, scores = module(x, cu_seqlens=cu_seqlens)
    bags = [bag_math(module, part) for part in x.split(lengths)]
    expected_pooled = torch.stack([p for p, _ in bags])
    expected_scores = torch.cat([s for _, s in bags])
    torch.testing.assert_close(pooled, expected_pooled, **case.tol())
    torch.testing.assert_close(scores, expected_scores, **case.tol())
    weights = [torch.randn_like(pooled), torch.randn_like(scores)]
    inputs = [x, *module.parameters()]
    ours = torch.autograd.grad((pooled * weights[0]).sum() + (scores * weights[1]).sum(), inputs)
    expected = torch.autograd.grad((expected_pooled * weights[0]).sum() + (expected_scores * weights[1]).sum(), inputs)
    for mine, theirs in zip(ours, expected):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(mine, theirs, **case.tol(theirs.abs().max().item()))


@pytest.mark.parametrize("module_class", [GatedAttention, GatedAttentionPool])
def test_dropout_only_in_training(case, device, module_class):
    module = module_class(L, D, dropout=True).to(device, case.dtype)
    x = torch.randn(64, L, dtype=case.dtype, device=device)
    expected_pooled, expected_scores = bag_math(module, x)
    expected = expected_scores if module_class is GatedAttention else expected_pooled

    def output(seed):
        torch.manual_seed(seed)
        return module(x)[0]

    evaluated = module.eval()(x)[0]
    torch.testing.assert_close(evaluated, expected, **case.tol())
    module.train()
    first = output(1)
    torch.testing.assert_close(output(1), first, rtol=0, atol=0)
    assert not torch.allclose(output(2), first)
    assert not torch.allclose(evaluated, first)


def test_training_dropout_matches_clam_under_reference(device):
    """The reference backend draws dropout from torch's generator in CLAM's order: same seed, same result."""
    clam = AttnNetGated(L, D, True, 3).to(device).train()
    ours = GatedAttention(L, D, True, 3).to(device).train()
    ours.load_state_dict(clam.state_dict())
    x = torch.randn(50, L, device=device)
    with milkernels.use_backend("reference"):
        torch.manual_seed(3)
        scores, _ = ours(x)
    torch.manual_seed(3)
    expected, _ = clam(x)
    torch.testing.assert_close(scores, expected)
    assert not torch.allclose(scores, gated_scores(x, ours.attention_a[0], ours.attention_b[0], ours.attention_c))
