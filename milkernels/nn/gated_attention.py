"""Gated attention modules on the fused ops :func:`~milkernels.ops.gated_attention_scores` and
:func:`~milkernels.ops.gated_attention_pool`.

- :class:`GatedAttention` is CLAM's ``Attn_Net_Gated``: same constructor, same children (so the same
  ``state_dict`` keys and parameter init), same ``forward`` contract.
- :class:`GatedAttentionPool` has the same children and returns the pooled bag and the raw scores
  from one fused pass.
- :class:`TorchmilAttentionPool` is torchmil's ``AttentionPool`` (``act='tanh'``) built around that
  module's own children; :func:`milkernels.swap` makes it.

Shapes: L features per instance, D hidden units, K = ``n_classes`` attention heads. A bag without
instances (N = 0), which the fused ops refuse, gets the replaced layer's result from plain torch ops.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import gated_attention_pool, gated_attention_scores
from ._empty import no_instances, softmax_pool

CLAM_DROPOUT_P = 0.25


def dropout_probability(dropout: bool | float = False, dropout_p: float | None = None) -> float:
    """The dropout probability of both branches.

    ``dropout`` is CLAM's flag: any truthy value (``True``, ``1``, ``0.5``) means Dropout(0.25), as
    CLAM's ``if dropout:`` does; a falsy one means none. ``dropout_p``, when given, is the probability
    itself and overrides ``dropout``; it must lie in [0, 1).
    """
    if dropout_p is None:
        return CLAM_DROPOUT_P if dropout else 0.0
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a probability in [0, 1), got {dropout_p!r}")
    return p


def branch_dropout_p(branch: nn.Sequential) -> float:
    """The p of the Dropout ending ``Sequential(Linear, activation[, Dropout])``, else 0."""
    return branch[2].p if len(branch) > 2 else 0.0


def _branch(features: int, hidden: int, activation: nn.Module, p: float) -> nn.Sequential:
    layers = [nn.Linear(features, hidden), activation]
    if p > 0:
        layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


class _GatedAttentionBase(nn.Module):
    """The children of CLAM's ``Attn_Net_Gated`` and the weights the fused ops take from them."""

    def __init__(self, L: int = 1024, D: int = 256, dropout: bool | float = False, n_classes: int = 1, *,
                 dropout_p: float | None = None):
        super().__init__()
        p = dropout_probability(dropout, dropout_p)
        self.attention_a = _branch(L, D, nn.Tanh(), p)
        self.attention_b = _branch(L, D, nn.Sigmoid(), p)
        self.attention_c = nn.Linear(D, n_classes)

    @classmethod
    def from_modules(cls, attention_a: nn.Sequential, attention_b: nn.Sequential, attention_c: nn.Linear):
        """A module holding these very children (no new parameters), e.g. those of an ``Attn_Net_Gated``.

        ``attention_a = Sequential(Linear(L, D), Tanh()[, Dropout(p)])``, ``attention_b`` the same with
        ``Sigmoid`` and the same p, ``attention_c = Linear(D, K)``; :func:`milkernels.swap` checks this.
        """
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.attention_a = attention_a
        module.attention_b = attention_b
        module.attention_c = attention_c
        return module

    @property
    def dropout_p(self) -> float:
        """The dropout probability of both branches: that of ``attention_a``'s Dropout, else 0."""
        return branch_dropout_p(self.attention_a)

    def _op_args(self) -> tuple:
        a, b, c = self.attention_a[0], self.attention_b[0], self.attention_c
        return a.weight, a.bias, b.weight, b.bias, c.weight, c.bias

    def _composed_scores(self, x: torch.Tensor) -> torch.Tensor:
        """CLAM's forward in plain torch, ``x: (..., L)`` -> ``A_raw: (..., K)``: for inputs without instances."""
        return self.attention_c(self.attention_a(x) * self.attention_b(x))


class GatedAttention(_GatedAttentionBase):
    """CLAM's ``Attn_Net_Gated`` on the fused kernels: raw gated attention scores, no softmax.

    Args:
        L: features per instance. D: hidden units. n_classes: K, the attention heads.
        dropout: CLAM's flag: truthy for Dropout(0.25) after tanh and after sigmoid, falsy for none.
        dropout_p: another dropout probability in [0, 1), overriding ``dropout`` (keyword only).

    Children ``attention_a = Sequential(Linear(L, D), Tanh()[, Dropout])``, ``attention_b =
    Sequential(Linear(L, D), Sigmoid()[, Dropout])``, ``attention_c = Linear(D, K)``, as in CLAM.
    The fused op takes the Linear weights and the Dropout's p; it applies tanh, sigmoid and dropout itself.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (N, L)`` (or any ``(..., L)``) -> ``(A_raw: (N, K), x)``; dropout only in training mode."""
        if no_instances(x):
            return self._composed_scores(x), x
        scores = gated_attention_scores(x, *self._op_args(), dropout_p=self.dropout_p, training=self.training)
        return scores, x


class GatedAttentionPool(_GatedAttentionBase):
    """Gated attention pooling in one fused pass; the constructor and children of :class:`GatedAttention`.

    ``process_group`` (keyword, or set the attribute, e.g. with :func:`milkernels.distributed.set_process_group`)
    makes it sequence parallel: ``x`` is this rank's shard of the bags and ``pooled`` the whole bags'
    (:mod:`milkernels.distributed`); average the gradients over the group (DDP does) for the whole bag's.
    """

    process_group = None

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool bags with per-bag softmax attention; dropout only in training mode.

        Args:
            x: one bag ``(N, L)``; padded bags ``(B, N, L)`` with optional ``mask: (B, N)`` (nonzero =
                real instance); or packed bags ``(T, L)`` with ``cu_seqlens: (B + 1,)``.

        Returns:
            ``pooled``: ``(K, L)`` for one bag, else ``(B, K, L)``.
            ``A_raw``: the scores before softmax, ``(N, K)``, ``(B, N, K)`` or ``(T, K)``.

        Bags without instances (``(0, L)``, ``(B, 0, L)``) pool to zeros; packed bags need one instance each.
        """
        if self.process_group is None and cu_seqlens is None and no_instances(x):
            scores = self._composed_scores(x)
            return softmax_pool(scores, x), scores
        return gated_attention_pool(x, *self._op_args(), mask=mask, cu_seqlens=cu_seqlens,
                                    dropout_p=self.dropout_p, training=self.training,
                                    process_group=self.process_group)


class TorchmilAttentionPool(nn.Module):
    """torchmil's ``AttentionPool`` with ``act='tanh'`` (gated or not) on the fused kernel.

    It holds the given modules under torchmil's names, so ``state_dict`` keys stay ``fc1.module.*``,
    ``fc2.weight`` and ``fc_gated.module.*``. ``fc1`` and ``fc_gated`` are torchmil ``LazyLinear``
    wrappers whose initialized ``.module`` is a ``Linear(in_dim, att_dim)``; ``fc2 = Linear(att_dim, 1)``.
    ``act_layer`` (Tanh) and ``act_gated`` (Sigmoid) are kept as children; the fused op applies both itself.
    Setting ``process_group`` makes it sequence parallel, as :class:`GatedAttentionPool`.
    """

    process_group = None

    def __init__(self, fc1: nn.Module, fc2: nn.Linear, act_layer: nn.Module,
                 fc_gated: nn.Module | None = None, act_gated: nn.Module | None = None):
        super().__init__()
        self.fc1 = fc1
        self.fc2 = fc2
        if fc_gated is not None:
            self.fc_gated = fc_gated
            self.act_gated = act_gated
        self.act_layer = act_layer
        self.in_dim = fc1.module.in_features
        self.att_dim = fc1.module.out_features
        self.act = "tanh"
        self.gated = fc_gated is not None

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None, return_att: bool = False):
        """``X: (B, N, in_dim)``, ``mask: (B, N)`` (0 = padded) -> ``z: (B, in_dim)``, and with
        ``return_att`` also ``f: (B, N)``, the attention values before softmax. For N = 0, torchmil's
        result: ``z`` zeros, ``f`` empty."""
        if X.dim() != 3:
            raise ValueError(f"X must be (batch_size, bag_size, in_dim), got shape {tuple(X.shape)}")
        if self.process_group is None and no_instances(X):
            scores = self._composed_scores(X)
            pooled = softmax_pool(scores, X)
        else:
            pooled, scores = gated_attention_pool(X, *self._op_args(), mask=mask, process_group=self.process_group)
        z = pooled[:, 0]
        return (z, scores[..., 0]) if return_att else z

    def _composed_scores(self, X: torch.Tensor) -> torch.Tensor:
        """torchmil's attention values in plain torch, ``X: (B, N, in_dim)`` -> ``f: (B, N, 1)``: for
        inputs without instances."""
        H = self.act_layer(self.fc1(X))
        if self.gated:
            H = H * self.act_gated(self.fc_gated(X))
        return self.fc2(H)

    def _op_args(self) -> tuple:
        fc1 = self.fc1.module
        wb, bb = (self.fc_gated.module.weight, self.fc_gated.module.bias) if self.gated else (None, None)
        return fc1.weight, fc1.bias, wb, bb, self.fc2.weight, self.fc2.bias
