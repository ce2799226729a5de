"""Learned-query attention modules on the fused op :func:`milkernels.ops.query_attention.query_attention`.

- :class:`MultiheadAttention` is ``torch.nn.MultiheadAttention`` (a subclass: same constructor,
  parameters, ``state_dict`` keys and ``forward`` contract) whose ``forward`` takes the fused path for
  a few queries attending to a bag (LiteMIL's learned queries), and PyTorch's own path otherwise.
- :class:`QueryAttention` is ASMIL's multi-head attention module (``forward(q, k, v) -> (out, logits)``
  for one bag, softmax or NSF weights, ``out_proj``, dropout and LayerNorm after pooling).

The op folds the key projection into the queries and applies the value projection after pooling, so
no ``N x E`` key or value tensor is formed. :func:`milkernels.swap` puts these modules into models.

Shapes: B bags, L (or Q) queries, S (or N) instances, E embedding features, H heads of dh = E / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._bags import FLOAT_DTYPES
from ..ops.query_attention import query_attention
from ..ops.nsf import reference as nsf_reference

MAX_FUSED_QUERIES = 64
LAYER_NORM_EPS = 1e-6  # ASMIL's


def share_state(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s very parameters, buffers, children and plain attributes
    (in its order, so the ``state_dict`` keys stay) and its training flag; no hooks are copied."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in vars(module).items():
        if name not in vars(new):
            new.__dict__[name] = value
    for name, parameter in module._parameters.items():
        new.register_parameter(name, parameter)
    for name, buffer in module._buffers.items():
        new.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        new.add_module(name, child)
    new.training = module.training
    return new


def fused_path_problem(mha: nn.MultiheadAttention) -> str:
    """Why :class:`MultiheadAttention`'s fused path can never run for ``mha``, whatever the call (its
    construction: ``add_bias_kv``, ``add_zero_attn``, ``kdim != vdim``), or ``""``."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True: the fused op has no bias_k/bias_v key and value rows"
    if mha.add_zero_attn:
        return "add_zero_attn=True: the fused op has no zero key and value row"
    if mha.kdim != mha.vdim:
        return f"kdim={mha.kdim} != vdim={mha.vdim}: key is never value"
    return ""


def fusable_tensors(*tensors: torch.Tensor) -> bool:
    """Whether the fused op takes ``tensors`` as they are: strided (not nested), one device, one float dtype."""
    first = tensors[0]
    return (first.dtype in FLOAT_DTYPES and not any(t.is_nested for t in tensors)
            and all(t.dtype == first.dtype and t.device == first.device for t in tensors))


def sharded_without_fused_path(module: nn.Module, sharded: bool) -> bool:
    """False, or ValueError when ``sharded`` (a process group is set) since only the fused path is sequence
    parallel; ``module.fused_when`` says when it runs."""
    if sharded:
        raise ValueError(f"{type(module).__name__} has a process_group, but this call cannot take the fused path, "
                         f"the only sequence-parallel one: it runs when {module.fused_when}")
    return False


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with a fused path for learned queries attending to bags.

    Constructor, parameters, ``state_dict`` keys, ``forward`` signature and outputs are PyTorch's. The
    fused path (:func:`query_attention`, then ``out_proj``) runs when ``key is value``, ``attn_mask``
    is None and ``is_causal`` False, there is no ``bias_k``/``bias_v`` and no ``add_zero_attn``,
    ``kdim == vdim``, the inputs are batched ``(B, L, E)`` / ``(L, B, E)`` (as ``batch_first`` says) or
    unbatched ``(L, E)``, L <= 64, ``key_padding_mask`` is None or bool, and query, key and weights
    share a float dtype and device; anything else runs ``nn.MultiheadAttention.forward`` unchanged.

    A query expanded over the batch from one ``(L, E)`` tensor (stride 0 on the batch dim, LiteMIL's
    ``query.unsqueeze(0).expand(B, -1, -1)``) is projected once and read once by the kernel.
    Dropout on the attention weights (training only) is the op's: it draws its own mask (a Philox seed
    from torch's generator on the triton backend, ``F.dropout`` in another layout on the reference), so
    it has PyTorch's distribution but not PyTorch's exact draw for a given seed.
    """

    fused_when = (f"key is value (with at least one row), attn_mask is None, is_causal is False and the query "
                  f"has 1 to {MAX_FUSED_QUERIES} rows")
    process_group = None  # set: sequence parallel (milkernels.distributed), on the fused path only

    @property
    def fused_path_possible(self) -> bool:
        """Whether the fused path can run on some call: no ``bias_k``/``bias_v``, no ``add_zero_attn``,
        ``kdim == vdim`` (:func:`fused_path_problem`)."""
        return not fused_path_problem(self)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """One sharing ``mha``'s very Parameters, ``out_proj``, settings and training flag."""
        return share_state(cls, mha)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PyTorch's contract.

        Args:
            query: ``(B, L, E)`` (``batch_first``), ``(L, B, E)`` or unbatched ``(L, E)``.
            key, value: ``(B, S, kdim)``, ``(S, B, kdim)`` or ``(S, kdim)``; the same tensor for the fused path.
            key_padding_mask: ``(B, S)`` or ``(S,)``, True = padding (a float mask is added to the logits).

        Returns:
            ``attn_output`` in the query's layout, and ``attn_weights`` (after dropout in training):
            ``(B, L, S)`` averaged over heads, ``(B, H, L, S)`` per head, without B when unbatched, or None
            unless ``need_weights``.
        """
        if not self._takes_fused_path(query, key, value, key_padding_mask, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused(query, key, key_padding_mask, need_weights, average_attn_weights)

    def _takes_fused_path(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        """Whether this call takes the fused path (the conditions in the class docstring)."""
        sharded = self.process_group is not None
        fused = (key is value and attn_mask is None and not is_causal and self.fused_path_possible
                 and self._fusable_inputs(query, key, key_padding_mask))
        return fused or sharded_without_fused_path(self, sharded)

    def _fusable_inputs(self, query, key, key_padding_mask) -> bool:
        """Whether the fused path takes these inputs (shapes, dtypes, a bool or no padding mask)."""
        if query.dim() not in (2, 3) or key.dim() != query.dim():
            return False
        if not fusable_tensors(query, key, *self._projections()[0]):
            return False
        q, x = self._batch_first(query), self._batch_first(key)
        empty = x.shape[1] == 0 and self.process_group is None
        if (q.shape[0] != x.shape[0] or not 0 < q.shape[1] <= MAX_FUSED_QUERIES or empty
                or q.shape[2] != self.embed_dim or x.shape[2] != self.kdim):
            return False
        mask_shape = x.shape[:2] if key.dim() == 3 else x.shape[1:2]
        return key_padding_mask is None or (key_padding_mask.dtype == torch.bool
                                            and key_padding_mask.shape == mask_shape)

    def _batch_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as a ``(B, L, features)`` view: unbatched gets B = 1, sequence-first is transposed."""
        if tensor.dim() == 2:
            return tensor[None]
        return tensor if self.batch_first else tensor.transpose(0, 1)

    def _projections(self):
        """``((wq, wk, wv), (bq, bk, bv))``: the ``(E, E)``, ``(E, kdim)``, ``(E, vdim)`` weights and the
        ``(E,)`` biases (None without ``bias``), as views of PyTorch's parameters."""
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return weights, biases

    def _fused(self, query, key, key_padding_mask, need_weights, average_attn_weights):
        """The fused path on inputs :meth:`_takes_fused_path` accepted; PyTorch's outputs."""
        q, x = self._batch_first(query), self._batch_first(key)
        (wq, wk, wv), (bq, bk, bv) = self._projections()
        if q.shape[0] == 1 or q.stride(0) == 0:
            q = q[0]  # one set of queries for every bag: projected once, (L, E)
        mask = None if key_padding_mask is None else ~key_padding_mask.reshape(x.shape[:2])
        result = query_attention(x, F.linear(q, wq, bq), wk, bk, wv, bv, self.num_heads, mask=mask,
                                 dropout_p=self.dropout, training=self.training, need_weights=need_weights,
                                 process_group=self.process_group)
        out = F.linear(result.out, self.out_proj.weight, self.out_proj.bias)              # (B, L, E)
        weights = result.weights                                                            # (B, H, L, S)
        if need_weights and average_attn_weights:
            weights = weights.mean(dim=1)
        if query.dim() == 2:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights


class QueryAttention(nn.Module):
    """ASMIL's multi-head attention module: a few queries attend to one bag, softmax or NSF weights.

    Args:
        embedding_dim: E. num_heads: H, dividing ``internal_dim = E // downsample_rate``.
        dropout: the p of the dropout after ``out_proj``. softmax: True for softmax weights over the
            instances, False for NSF (``sigmoid(s) / (sum sigmoid(s) + 1e-8)``).

    Children: ``q_proj``, ``k_proj``, ``v_proj = Linear(E, internal_dim)``, ``out_proj =
    Linear(internal_dim, E)``, ``layer_norm = LayerNorm(E, eps=1e-6)``, ``dropout = Dropout(p)``.
    """

    fused_when = "k is v and q, k are one bag (1, ., E) with at least one query and one instance"
    process_group = None  # set: sequence parallel (milkernels.distributed), on the fused path only

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.1,
                 softmax: bool = True):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads = {num_heads} must divide embedding_dim // downsample_rate = "
                             f"{self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.layer_norm = nn.LayerNorm(embedding_dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.softmax = softmax

    @classmethod
    def from_module(cls, module: nn.Module) -> "QueryAttention":
        """One sharing ``module``'s very children, ``num_heads`` and ``softmax`` (True when missing)."""
        new = share_state(cls, module)
        new.softmax = getattr(module, "softmax", True)
        return new

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q: (1, Q, E)``, ``k, v: (1, N, E)`` -> ``(out: (Q, E), logits: (H, Q, N))`` for one bag, the
        logits ``q_h . k_h / sqrt(dh)`` before normalization; fused when ``k is v`` (:attr:`fused_when`)."""
        if self._takes_fused_path(q, k, v):
            return self._fused(q[0], k[0])
        out, logits = self._composed(q, k, v)
        return out[0], logits[0]

    def _takes_fused_path(self, q, k, v) -> bool:
        """``k is v``, both ``q`` and ``k`` one bag ``(1, ., E)`` (neither empty, but for a rank's shard under a
        process group), one float dtype and device."""
        sharded = self.process_group is not None
        fused = (k is v and q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0] == 1 and q.shape[1] > 0
                 and (k.shape[1] > 0 or sharded)
                 and fusable_tensors(q, k, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        return fused or sharded_without_fused_path(self, sharded)

    def _fused(self, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q: (Q, E)``, ``x: (N, E)`` through :func:`query_attention`."""
        result = query_attention(x, self.q_proj(q), self.k_proj.weight, self.k_proj.bias, self.v_proj.weight,
                                 self.v_proj.bias, self.num_heads, normalization="softmax" if self.softmax else "nsf",
                                 need_logits=True, process_group=self.process_group)
        return self._finish(result.out), result.logits

    def _composed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain PyTorch composition on ``q: (B, Q, E)``, ``k, v: (B, N, E)``: ``(out: (B, Q, E), logits:
        (B, H, Q, N))``; also for N = 0 (``out``: ``layer_norm(dropout(out_proj(0)))``)."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                           # (B, H, Q, N)
        weights = torch.softmax(logits, dim=-1) if self.softmax else nsf_reference.nsf(logits, 1.0, None)
        out = (weights @ v).transpose(1, 2).flatten(2)                                      # (B, Q, internal)
        return self._finish(out), logits

    def _heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, n, H * dh)`` -> ``(B, H, n, dh)``."""
        batch, count, width = tensor.shape
        return tensor.reshape(batch, count, self.num_heads, width // self.num_heads).transpose(1, 2)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """``layer_norm(dropout(out_proj(out)))`` of the concatenated heads ``(..., internal_dim)``."""
        return self.layer_norm(self.dropout(self.out_proj(out)))
