"""ASMIL's EMA anchor and its FEAT-token attention block on one fused pass over the bag.

- :class:`EMAAnchor` keeps an exponential moving average copy (the *anchor*) of any module.
- :class:`AnchoredQueryAttention` is ASMIL's block of FEAT tokens: ``num_tokens`` learned queries, each
  with its own multi-head cross-attention module (children ``q_proj, k_proj, v_proj, out_proj:
  Linear(E, E)``, ``layer_norm: LayerNorm(E, eps=1e-6)``, ``dropout``), their EMA anchor scored with the
  normalized sigmoid (NSF) and the stabilization loss ``L_kd``. Every token's attention comes from ONE
  :func:`~milkernels.ops.query_attention.folded_attention` call over the bag, and in training the anchor's
  scores, without gradient, from the same call's ``anchor`` (read from the same pass over the bag where the
  kernels allow; as columns of the call's own, whose backward cannot tell that they take no gradient, their
  gradients would be computed and dropped).

The anchor is a training device only: at inference only the online tokens run, and ``forward`` in eval
mode computes no anchor scores and no loss.

Shapes: N instances per bag, B bags, E = ``embedding_dim``, H heads of ``dh = E / H``, Tk = ``num_tokens``.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._bags import Bags, autocast_inputs, check_bag_shape, check_temperature, pack_bags
from ..ops.anchor_kl import anchor_kl
from ..ops.nsf import reference as nsf_reference
from ..ops.query_attention import columns_to_caller, fold_queries, folded_attention, unfold_values
from ._empty import no_instances
from .query_attention import QueryAttention

QUERY_INIT_STD = 1e-6


def _check_momentum(momentum: float) -> float:
    if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


class EMAAnchor(nn.Module):
    """An EMA copy of ``online``: ``anchor = momentum * anchor + (1 - momentum) * online``.

    Training only: ASMIL's anchor supplies the attention targets of its stabilization loss and is
    discarded at inference. The copy (child ``module``) starts equal to ``online``; its parameters have
    ``requires_grad=False`` and change only in :meth:`update`. They are in ``state_dict`` (keys
    ``module.*``), so a checkpoint resumes training with the anchor as it was. Works for any module:
    ASMIL's ``ModuleList`` of per-token attention modules, or a whole model.

    Args:
        online: the module to follow; :meth:`update` without an argument reads it.
        momentum: the EMA factor in [0, 1]: 0 copies ``online`` at every update, 1 freezes the anchor.
    """

    def __init__(self, online: nn.Module, momentum: float = 0.999):
        super().__init__()
        self.momentum = _check_momentum(momentum)
        self.module = copy.deepcopy(online)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        self._online = (online,)  # a plain reference: not a child, so not in parameters() or state_dict

    @torch.no_grad()
    def update(self, online: nn.Module | None = None) -> None:
        """One EMA step from ``online`` (default: the module given at construction); call it after each
        optimizer step. Float parameters move to ``m * anchor + (1 - m) * online``; other parameters and
        all buffers (e.g. BatchNorm statistics) are copied. Raises ValueError if the structures differ."""
        online = self._online[0] if online is None else online
        for anchor_tensors, online_tensors in ((self.module.named_parameters(), online.named_parameters()),
                                               (self.module.named_buffers(), online.named_buffers())):
            anchor_tensors, online_tensors = dict(anchor_tensors), dict(online_tensors)
            if anchor_tensors.keys() != online_tensors.keys():
                raise ValueError("online does not have the anchor's parameters and buffers: "
                                 f"{sorted(anchor_tensors.keys() ^ online_tensors.keys())}")
            for name, anchor in anchor_tensors.items():
                self._step(anchor, online_tensors[name], isinstance(anchor, nn.Parameter))

    def _step(self, anchor: torch.Tensor, online: torch.Tensor, average: bool) -> None:
        if average and anchor.is_floating_point():
            anchor.mul_(self.momentum).add_(online, alpha=1.0 - self.momentum)
        else:
            anchor.copy_(online)

    def forward(self, *args, **kwargs):
        """The anchor module on the given inputs, under ``torch.no_grad``."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class AnchoredOutput(NamedTuple):
    """What :class:`AnchoredQueryAttention` returns (one bag; padded bags put B in front of each shape).

    ``tokens: (Tk, E)``: every token's output (``out_proj``, dropout, ``layer_norm`` applied).
    ``kept: (Tk - n_drop, E)``: in training the rows of ``tokens`` left after dropping ``n_drop`` random
    tokens (in token order); in eval all of ``tokens``.
    ``logits: (Tk, H, N)``: the online logits before the softmax (masked instances: -inf).
    ``loss``: ``L_kd``, a 0-dim float32 (float64 for float64 input) tensor in training, None in eval.
    """

    tokens: torch.Tensor
    kept: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor | None


class AnchoredQueryAttention(nn.Module):
    """ASMIL's FEAT-token block: Tk learned queries, per-token attention, EMA anchor and ``L_kd``, fused.

    Args:
        embedding_dim: E, the instance features. num_heads: H, dividing E. num_tokens: Tk FEAT tokens.
        n_drop: tokens dropped at random from ``kept`` in training (ASMIL's token random dropping).
        temperature: the anchor's NSF temperature T. momentum: the anchor's EMA factor.
        dropout: the per-token modules' dropout after ``out_proj``.

    Parameters and children: ``query: (Tk, E)`` (normal init, std 1e-6, as ASMIL), ``tokens``: a
    ``ModuleList`` of Tk attention modules (``q_proj, k_proj, v_proj, out_proj, layer_norm, dropout``),
    ``anchor``: their :class:`EMAAnchor`. Call :meth:`update_anchor` after each optimizer step.

    For token t and head h the online logits are ``s = q_proj_t(query_t)_h . k_proj_t(x)_h / sqrt(dh)``,
    the online attention ``softmax(s)`` over the bag's instances, the anchor's ``NSF(s_anchor / T)`` with
    ``NSF(z) = sigmoid(z) / (sum_n sigmoid(z_n) + 1e-8)`` from the anchor's weights, and
    ``L_kd = -mean(NSF(s_anchor / T) * log_softmax(s))`` over tokens, heads and instances, the anchor
    being a stop-gradient target. Each set of logits comes from a folded pass over x (the anchor's without
    gradient): token t, head h is column ``t * H + h``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, num_tokens: int, *, n_drop: int = 0,
                 temperature: float = 1.0, momentum: float = 0.999, dropout: float = 0.1):
        super().__init__()
        _check_sizes(embedding_dim, num_heads, num_tokens, n_drop, temperature)
        self.num_heads = num_heads
        self.n_drop = n_drop
        self.temperature = float(temperature)
        self.query = nn.Parameter(torch.empty(num_tokens, embedding_dim).normal_(std=QUERY_INIT_STD))
        self.tokens = nn.ModuleList(QueryAttention(embedding_dim, num_heads, dropout=dropout) for _ in range(num_tokens))
        self.anchor = EMAAnchor(self.tokens, momentum)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def update_anchor(self) -> None:
        """The anchor's EMA step from the online tokens; call it after each optimizer step."""
        self.anchor.update(self.tokens)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnchoredOutput:
        """Pool the bag with every token; in training also the anchor's scores and ``L_kd``.

        Args:
            x: one bag ``(N, E)``, or padded bags ``(B, N, E)`` with an optional ``mask: (B, N)``
                (nonzero = real instance; all bags drop the same tokens).

        Returns:
            An :class:`AnchoredOutput`. For N = 0 ASMIL's: every token ``layer_norm(dropout(out_proj(0)))``,
            empty logits and a NaN loss (a mean over no instance).
        """
        (x,) = autocast_inputs(x)
        if no_instances(x):
            check_bag_shape(x, self.query.shape[1])
            return self._without_instances(x)
        bags = pack_bags(x, self.query.shape[1], mask)
        u, c = self._fold(self.tokens, 1.0)
        columns = u.shape[1]
        folded = folded_attention(bags, u, c, nsf_from=columns, num_pooled=columns, training=self.training,
                                  anchor=self._anchor_queries() if self.training else None)
        tokens = bags.bags_to_caller(self._token_outputs(folded.pooled, folded.mass))
        logits = columns_to_caller(folded.z.to(x.dtype), bags, self.num_tokens, fill=float("-inf"))
        if not self.training:
            return AnchoredOutput(tokens, tokens, logits, None)
        loss = self._loss(folded.z, folded.anchor_z, bags)
        return AnchoredOutput(tokens, self._keep(tokens), logits, loss)

    def _anchor_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA anchor's folded queries ``(u_a: (1, Tk * H, E), c_a: (1, Tk * H))``, without gradient, whose
        scores ``s_anchor / T`` :func:`~milkernels.ops.query_attention.folded_attention` forms in the pass over
        the bag that pools it (x read once for both where the kernels allow)."""
        with torch.no_grad():
            return self._fold(self.anchor.module, self.temperature)

    def _without_instances(self, x: torch.Tensor) -> AnchoredOutput:
        """The forward on ``x: (0, E)`` or ``(B, 0, E)``, which the fused op refuses: ASMIL's composition in
        plain torch (:meth:`_composed`), ``L_kd = -mean(NSF(s_anchor / T) * log_softmax(s))`` in training."""
        bags = x if x.dim() == 3 else x[None]
        tokens, logits = self._composed(self.tokens, bags)
        loss = None
        if self.training:
            with torch.no_grad():
                _, anchor_logits = self._composed(self.anchor.module, bags)
            weights = nsf_reference.nsf(anchor_logits, self.temperature, None)
            loss = -(weights * logits.log_softmax(-1)).mean().to(torch.promote_types(x.dtype, torch.float32))
        if x.dim() == 2:
            tokens, logits = tokens[0], logits[0]
        return AnchoredOutput(tokens, self._keep(tokens) if self.training else tokens, logits, loss)

    def _composed(self, modules: nn.ModuleList, bags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's module (:meth:`QueryAttention._composed`) on its query over ``bags: (B, N, E)``, in plain
        torch: ``(tokens: (B, Tk, E), logits: (B, Tk, H, N))``."""
        query = self.query[None].expand(bags.shape[0], -1, -1)                                  # (B, Tk, E)
        outs, logits = zip(*(module._composed(query[:, t:t + 1], bags, bags) for t, module in enumerate(modules)))
        return torch.cat(outs, dim=1), torch.cat(logits, dim=2).transpose(1, 2)

    def _fold(self, modules: nn.ModuleList, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's folded queries stacked: ``u: (1, Tk * H, E)``, ``c: (1, Tk * H)``, column ``t * H + h``."""
        folds = [fold_queries(F.linear(self.query[t:t + 1], module.q_proj.weight, module.q_proj.bias)[None],
                              module.k_proj.weight, module.k_proj.bias, self.num_heads, temperature)
                 for t, module in enumerate(modules)]
        return tuple(torch.cat(parts, dim=1) for parts in zip(*folds))

    def _token_outputs(self, pooled: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """``(B, Tk, E)`` from the online columns' ``pooled: (B, Tk * H, E)`` and ``mass: (B, Tk * H)``:
        per token the value projection, ``out_proj``, dropout and ``layer_norm``."""
        heads = self.num_heads
        outputs = []
        for t, module in enumerate(self.tokens):
            part = slice(t * heads, (t + 1) * heads)
            values = unfold_values(pooled[:, part], mass[:, part], module.v_proj.weight, module.v_proj.bias, heads)
            outputs.append(module.layer_norm(module.dropout(module.out_proj(values))))
        return torch.cat(outputs, dim=1)

    def _loss(self, online: torch.Tensor, anchor: torch.Tensor, bags: Bags) -> torch.Tensor:
        """``L_kd`` from the online scores ``s`` and the anchor's ``s_anchor / T``, both ``(rows, Tk * H)``
        (so :func:`anchor_kl` takes temperature 1); masked instances are left out."""
        valid = None if bags.row_valid is None else _per_column(bags.row_valid[:, None].expand_as(online), bags)
        return anchor_kl(_per_column(online, bags), _per_column(anchor, bags), 1.0, mask=valid)

    def _keep(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens: (..., Tk, E)`` less ``n_drop`` random tokens, in token order."""
        if self.n_drop == 0:
            return tokens
        kept = torch.randperm(self.num_tokens)[: self.num_tokens - self.n_drop].sort().values
        return tokens.index_select(-2, kept.to(tokens.device))


def _per_column(values: torch.Tensor, bags: Bags) -> torch.Tensor:
    """Per-row ``values: (B * N, J)`` of B bags of N rows as ``(B * J, N)``: one row per bag and column."""
    batch, columns = bags.num_bags, values.shape[1]
    return values.reshape(batch, -1, columns).transpose(1, 2).reshape(batch * columns, -1)


def _check_sizes(embedding_dim, num_heads, num_tokens, n_drop, temperature) -> None:
    for name, value in dict(embedding_dim=embedding_dim, num_heads=num_heads, num_tokens=num_tokens).items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if embedding_dim % num_heads:
        raise ValueError(f"embedding_dim = {embedding_dim} must be divisible by num_heads = {num_heads}")
    if not (isinstance(n_drop, int) and 0 <= n_drop < num_tokens):
        raise ValueError(f"n_drop must be an int in [0, num_tokens = {num_tokens}), got {n_drop!r}")
    check_temperature(temperature)
