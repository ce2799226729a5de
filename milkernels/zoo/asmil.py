"""ASMIL (attention-stabilized MIL; Linfeng-Ye/ASMIL ``ACMIL_MYMHA``), the online model that runs at inference.

The instances go through ``dimreduction`` (``Linear(F, E, bias=False)`` + ReLU); each of T learned FEAT tokens
pools them with its own multi-head attention module (``sub_attention``); a class token pools the FEAT tokens'
outputs with ``bag_attention``; ``Slide_classifier`` gives the logits.

Left out, all training-only: the EMA anchor (a copy of ``sub_attention`` scored with the normalized sigmoid;
see :class:`milkernels.nn.AnchoredQueryAttention`), token random dropping (``n_drop``, 0 by default in the
released script) and the per-token classifiers, whose loss the released training script sets to 0.
:func:`milkernels.swap` fuses every attention module (:class:`milkernels.nn.QueryAttention`).

Shapes: N instances, F input features, E = ``hidden`` features, H heads, T FEAT tokens.
"""

import math

import torch
from torch import nn

FEAT_TOKENS, HEADS = 8, 8                      # the paper's 8 FEAT tokens (CAMELYON-16, BRACS); 8 heads
HIDDEN = {384: 128, 512: 256, 768: 384, 1024: 512, 1536: 768}  # the released script's D_inner per D_feat
DEFAULT_HIDDEN = 512
TOKEN_INIT_STD = 1e-6
NSF_EPS = 1e-8


class ASMILAttention(nn.Module):
    """ASMIL's multi-head attention of queries ``q`` to keys ``k`` and values ``v``, with the projections
    ``q_proj``, ``k_proj``, ``v_proj: Linear(E, I)``, ``out_proj: Linear(I, E)`` (I = E / downsample_rate),
    then ``dropout`` and ``layer_norm``; softmax weights, or the normalized sigmoid (NSF) of the anchor."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.1,
                 softmax: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.softmax = softmax
        internal_dim = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(embedding_dim, internal_dim)
        self.v_proj = nn.Linear(embedding_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)
        self.layer_norm = nn.LayerNorm(embedding_dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, I)`` -> ``(B, H, L, I / H)``."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q: (1, Q, E)``, ``k, v: (1, N, E)`` -> ``(out: (Q, E), logits: (H, Q, N))``, the logits before
        normalization."""
        q = self.separate_heads(self.q_proj(q))
        k = self.separate_heads(self.k_proj(k))
        v = self.separate_heads(self.v_proj(v))
        logits = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        if self.softmax:
            weights = torch.softmax(logits, dim=-1)
        else:
            weights = torch.sigmoid(logits)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + NSF_EPS)
        out = (weights @ v).transpose(1, 2).flatten(2)
        out = self.layer_norm(self.dropout(self.out_proj(out)))
        return out[0], logits[0]


class ASMIL(nn.Module):
    """ASMIL's online model on one bag.

    Args: in_dim: F; n_classes: logits; hidden: E (default: the released script's for F, else 512);
    tokens: T FEAT tokens; heads: H.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int | None = None, tokens: int = FEAT_TOKENS,
                 heads: int = HEADS):
        super().__init__()
        hidden = hidden or HIDDEN.get(in_dim, DEFAULT_HIDDEN)
        self.dimreduction = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.ReLU())
        self.sub_attention = nn.ModuleList(ASMILAttention(hidden, heads) for _ in range(tokens))
        self.bag_attention = ASMILAttention(hidden, heads)
        self.q = nn.Parameter(torch.randn(1, tokens, hidden) * TOKEN_INIT_STD)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.Slide_classifier = nn.Linear(hidden, n_classes)
        self.profile_layers = ("dimreduction", *(f"sub_attention.{i}" for i in range(tokens)), "bag_attention")

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)`` (``coords`` unused) -> ``logits: (1, n_classes)``."""
        h = self.dimreduction(features)[None]
        feats = torch.cat([attention(self.q[:, [i]], h, h)[0] for i, attention in enumerate(self.sub_attention)])
        feats = feats[None]
        bag, _ = self.bag_attention(self.cls, feats, feats)
        return self.Slide_classifier(bag)
