"""LiteMIL (hkussaibi/LiteMIL, ``MILS/LiteMIL.py``): learned queries cross-attend to the bag.

``stream.project`` (``Linear(F, E)``, LayerNorm, ReLU, Dropout) embeds the instances, Q learned queries
attend to them with ``stream.attn`` (a batch-first ``torch.nn.MultiheadAttention``, which
:func:`milkernels.swap` fuses), their mean goes to ``classifier`` (``Linear(E, E / 2)``, GELU, Dropout,
``Linear(E / 2, n_classes)``). Defaults are the README's: E = 256, 4 heads, 1 query, dropout 0.25.

Shapes: N instances, F input features, E = ``hidden`` features, Q queries.
"""

import torch
from torch import nn

HIDDEN, HEADS, QUERIES, DROPOUT = 256, 4, 1, 0.25


class LiteMILStream(nn.Module):
    """LiteMIL's attention stream: ``project``, the learned ``query: (Q, E)`` and ``attn``."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, heads: int, queries: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout))
        self.query = nn.Parameter(nn.init.xavier_uniform_(torch.empty(queries, hidden)))
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, N, F)`` -> the bag embeddings ``(B, E)``, the mean over the queries' outputs."""
        h = self.project(x)
        query = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(query, h, h)
        return out.mean(dim=1)


class LiteMIL(nn.Module):
    """LiteMIL on one bag.

    Args: in_dim: F; n_classes: logits; hidden: E; heads: attention heads; queries: Q; dropout: p of every
    Dropout and of the attention weights.
    """

    profile_layers = ("stream.project", "stream.attn")

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = HIDDEN, heads: int = HEADS,
                 queries: int = QUERIES, dropout: float = DROPOUT):
        super().__init__()
        self.stream = LiteMILStream(in_dim, hidden, dropout, heads, queries)
        self.classifier = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(hidden // 2, n_classes))

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)`` (``coords`` unused) -> ``logits: (1, n_classes)``."""
        return self.classifier(self.stream(features[None]))
