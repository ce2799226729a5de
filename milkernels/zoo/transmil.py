"""TransMIL (Shao et al. 2021): two Nystrom-attention transformer layers around a PPEG position encoding.

``_fc1`` (``Linear(F, 512)`` + ReLU) embeds the instances; the bag is padded to a square number of tokens by
repeating its first ones, a class token is prepended; ``layer1``, ``pos_layer`` (PPEG: depthwise 7x7, 5x5 and
3x3 convolutions over the square grid plus identity), ``layer2``, ``norm`` and ``_fc2`` on the class token.
Each layer is ``x + NystromAttention(LayerNorm(x))`` (the ``nystrom_attention`` package: 8 heads of 64, 256
landmarks, 6 pseudo-inverse iterations, its residual value convolution, dropout 0.1).

:func:`milkernels.swap` replaces nothing here: TransMIL is the baseline.

Shapes: N instances, F input features, E = 512, S = ceil(sqrt(N)).
"""

import math

import torch
from torch import nn

DIM = 512


def _nystrom_attention(dim: int) -> nn.Module:
    try:
        from nystrom_attention import NystromAttention
    except ImportError as exc:
        raise ImportError("the transmil zoo model needs the nystrom-attention package "
                          "(pip install nystrom-attention)") from exc
    return NystromAttention(dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2, pinv_iterations=6,
                            residual=True, dropout=0.1)


class TransLayer(nn.Module):
    """``x + attn(norm(x))`` on ``x: (B, L, E)``."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _nystrom_attention(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, L, E)`` -> ``(B, L, E)``."""
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """TransMIL's pyramid position encoding generator: depthwise convolutions over the tokens laid out as a
    square grid, the class token passed through."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``x: (B, 1 + height * width, E)``, class token first -> the same shape."""
        batch, _, dim = x.shape
        cls_token, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(batch, dim, height, width)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat((cls_token, grid.flatten(2).transpose(1, 2)), dim=1)


class TransMIL(nn.Module):
    """TransMIL on one bag. Args: in_dim: F; n_classes: logits."""

    profile_layers = ("_fc1", "layer1", "pos_layer", "layer2")

    def __init__(self, in_dim: int, n_classes: int = 2):
        super().__init__()
        self.pos_layer = PPEG(DIM)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, DIM), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.layer1 = TransLayer(DIM)
        self.layer2 = TransLayer(DIM)
        self.norm = nn.LayerNorm(DIM)
        self._fc2 = nn.Linear(DIM, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)`` (``coords`` unused) -> ``logits: (1, n_classes)``."""
        h = self._fc1(features[None])
        side = math.ceil(math.sqrt(h.shape[1]))
        h = torch.cat([self.cls_token, h, h[:, :side * side - h.shape[1]]], dim=1)
        h = self.layer2(self.pos_layer(self.layer1(h), side, side))
        return self._fc2(self.norm(h)[:, 0])
