"""CLAM (Lu et al. 2021, ``models/model_clam.py``) and ABMIL (Ilse et al. 2018) on patch features.

Both pool a bag with gated attention (CLAM's ``Attn_Net_Gated``), which :func:`milkernels.swap` fuses.
CLAM's instance classifiers, which run only when a label is passed (its clustering loss), are left out.

Shapes: N instances, F input features, L hidden features, D attention hidden units, K attention branches.
"""

import torch
import torch.nn.functional as F
from torch import nn

CLAM_HIDDEN, CLAM_ATTENTION_HIDDEN, CLAM_DROPOUT = 512, 256, 0.25  # CLAM's "small" size, its --drop_out
ABMIL_HIDDEN, ABMIL_ATTENTION_HIDDEN = 500, 128                     # Ilse et al.'s L and D
BRANCH_DROPOUT = 0.25                                               # CLAM's Attn_Net_Gated, when dropout is set


class Attn_Net_Gated(nn.Module):  # noqa: N801 (CLAM's name)
    """CLAM's gated attention scores: ``attention_c(tanh(attention_a(x)) * sigmoid(attention_b(x)))``.

    Args: L: input features; D: hidden units; dropout: truthy adds ``Dropout(0.25)`` to both branches;
    n_classes: K, the attention branches.
    """

    def __init__(self, L: int = 1024, D: int = 256, dropout: bool | float = False, n_classes: int = 1):
        super().__init__()
        extra = [nn.Dropout(BRANCH_DROPOUT)] if dropout else []
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), *extra)
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), *extra)
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (N, L)`` -> ``(scores: (N, K), x)``."""
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x))), x


class GatedAttentionMIL(nn.Module):
    """CLAM_SB's bag path, which is ABMIL's: ``attention_net = Sequential(Linear(F, L), ReLU, Dropout,
    Attn_Net_Gated(L, D))``, softmax over the bag, the weighted mean of the hidden features, ``classifiers``.

    Args: in_dim: F; n_classes: logits; hidden: L; attention_hidden: D; dropout: p of the Dropout after the
    ReLU, and the branch dropout when nonzero; branches: K.
    """

    profile_layers = ("attention_net.0", "attention_net.3")

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = CLAM_HIDDEN,
                 attention_hidden: int = CLAM_ATTENTION_HIDDEN, dropout: float = CLAM_DROPOUT, branches: int = 1):
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                           Attn_Net_Gated(hidden, attention_hidden, dropout, branches))
        self.classifiers = nn.Linear(hidden, n_classes)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """``features: (N, F)`` -> the K attention-pooled hidden features ``(K, L)``."""
        scores, hidden = self.attention_net(features)
        return F.softmax(scores.transpose(1, 0), dim=1) @ hidden

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)`` (``coords`` unused) -> ``logits: (1, n_classes)``."""
        return self.classifiers(self.pooled(features))


class ClamMB(GatedAttentionMIL):
    """CLAM_MB's bag path: one attention branch and one ``Linear(L, 1)`` bag classifier per class."""

    def __init__(self, in_dim: int, n_classes: int = 2, dropout: float = CLAM_DROPOUT):
        super().__init__(in_dim, n_classes, dropout=dropout, branches=n_classes)
        self.classifiers = nn.ModuleList(nn.Linear(CLAM_HIDDEN, 1) for _ in range(n_classes))

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)`` (``coords`` unused) -> ``logits: (1, n_classes)``."""
        pooled = self.pooled(features)
        return torch.cat([classifier(pooled[c]) for c, classifier in enumerate(self.classifiers)])[None]


def clam_sb(in_dim: int, n_classes: int = 2) -> GatedAttentionMIL:
    """CLAM_SB, size "small" (L = 512, D = 256), dropout 0.25."""
    return GatedAttentionMIL(in_dim, n_classes)


def clam_mb(in_dim: int, n_classes: int = 2) -> ClamMB:
    """CLAM_MB, size "small" (L = 512, D = 256), dropout 0.25."""
    return ClamMB(in_dim, n_classes)


def abmil(in_dim: int, n_classes: int = 2) -> GatedAttentionMIL:
    """Ilse et al.'s gated attention MIL on features: ``Linear(F, 500)`` + ReLU, gated attention with 128
    hidden units, ``Linear(500, n_classes)``; no dropout."""
    return GatedAttentionMIL(in_dim, n_classes, ABMIL_HIDDEN, ABMIL_ATTENTION_HIDDEN, dropout=0.0)
