"""LongNet dilated attention modules on :func:`milkernels.ops.dilated_attention` (its ``"torchscale"`` mode).

- :class:`DilatedAttention` is torchscale's ``DilatedAttention`` (``torchscale.component.dilated_attention``,
  the self-attention of Prov-GigaPath's LongNet slide encoder): same constructor, attributes, children
  (``k_proj``, ``v_proj``, ``q_proj``, ``out_proj = Linear(E, E)``, ``inner_attn_ln`` with ``subln``,
  ``dropout_module``), so the same ``state_dict`` keys, and the same ``forward(query, key, value, ...) ->
  (attn, None)``.
- :class:`LinMILDilatedAttention` is Lin-MIL's copy (``lin_mil.attention.dilated_attention``, the
  ``attention="dilated"`` ablation): identity projections and ``forward(x, ...) -> (attn, None)``.

The fused path projects ``q, k, v`` (calling the projection children, so a ``MultiwayNetwork`` or a hooked
Linear works), runs the op over the branches ``zip(args.segment_length, args.dilated_ratio)`` at scale
``head_dim ** -0.5``, then ``inner_attn_ln`` and ``out_proj``. It runs unless the call or the module needs
what the op does not have (:attr:`DilatedAttention.fused_when`): ``incremental_state``, ``attn_mask`` or
``is_causal``; key and value not of the query's shape; ``xpos``; attention dropout in training; keys and
values gathered across ranks where upstream's gathering is not the whole bag's attention (``args.seq_parallel``
while ``torch.distributed`` runs more than one process and a segment is longer than the sequence, on shards the
branches do not line up with: :func:`seq_parallel_problem`). Such a call runs the forward of the class the
module was made from by :meth:`DilatedAttention.from_module` (upstream's own code, on this module's state), and
raises NotImplementedError on a module built here, which has no upstream to fall back on. Where the branches
line up, ``args.seq_parallel`` runs the sequence-parallel op on the default group, whose result is upstream's.

Upstream's behavior that is kept: ``key_padding_mask`` is accepted and ignored (torchscale's flash-attention
path never reads it; padded positions are keys like the others); ``rel_pos`` must be None (upstream asserts
it); the scale is ``head_dim ** -0.5`` (``flash_attn_func`` with ``softmax_scale=None``; ``scaling`` is
kept as an attribute but, as upstream's flash path, not read). What differs: upstream's flash path passes
``dropout`` to the kernel on every call, in eval mode too; here no dropout is applied in eval mode (see
:meth:`DilatedAttention.forward`). Lin-MIL's copy exits the process when an input holds NaN and returns
``(x, None)`` when a branch's output does; here NaN propagates. Upstream cannot take a bag without
instances (N = 0 fails in its padding arithmetic, B = 0 on an assert); here such input gives an empty
result of the right shape (see :meth:`DilatedAttention.forward`).

Shapes: B bags, N instances (tokens), E = ``embed_dim`` features, H = ``num_heads`` heads of
``head_dim = E // H`` features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import dilated_attention
from ._empty import no_instances
from .query_attention import share_state

FUSED_WHEN = ("incremental_state and attn_mask are None, is_causal is False, xpos is None, no attention "
              "dropout applies (dropout is 0 or eval mode) and, where args.seq_parallel gathers keys across ranks, "
              "torchscale's gathering is the whole bag's attention (see seq_parallel_problem)")


def distributed_world_size() -> int:
    """The number of processes of ``torch.distributed``'s default group, 1 when it is not initialized."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gathers_across_ranks(args, length: int) -> bool:
    """Whether torchscale's ``DilatedAttention`` on a sequence of ``length`` gathers keys and values from the
    other ranks: ``args.seq_parallel``, a world size above 1 and a segment longer than ``length``."""
    return (bool(getattr(args, "seq_parallel", False)) and distributed_world_size() > 1
            and any(w > length for w in args.segment_length))


def seq_parallel_problem(args, length: int, world_size: int) -> str:
    """Why torchscale's gathering, on ``world_size`` shards of ``length`` positions, is not dilated attention on the
    whole bag of ``world_size * length`` (so not what the sequence-parallel op computes), or ``""``. It is where
    every branch's segments and dilation line up with the shards: ``w`` a multiple of ``length`` that is a
    multiple of ``r``, and the bag a whole number of segments or one (``w > length``, gathered); or ``length`` a
    multiple of ``w``, itself a multiple of ``r`` (local)."""
    total = world_size * length
    if length == 0:
        return ""  # every rank's shard is empty (upstream's are of one size): nothing is gathered
    for w, r in zip(args.segment_length, args.dilated_ratio):
        if w > length:
            aligned = w % length == 0 and length % r == 0 and (w >= total or total % w == 0)
        else:
            aligned = length % w == 0 and w % r == 0
        if not aligned:
            return (f"branch (w={w}, r={r}) does not line up with {world_size} shards of {length} positions, where "
                    "torchscale's gathering is not the whole bag's attention")
    return ""


class DilatedAttention(nn.Module):
    """torchscale's ``DilatedAttention`` (LongNet) with its core on :func:`milkernels.ops.dilated_attention`.

    Args (torchscale's): args: a config with ``segment_length`` and ``dilated_ratio`` (lists of ints, one
    length each), ``layernorm_eps``, ``seq_parallel``, ``multiway`` and ``xpos_rel_pos`` (False: a module
    built here has neither MultiwayNetwork projections nor XPOS; :meth:`from_module` takes upstream modules
    that have them). embed_dim: E. num_heads: H, dividing E. dropout: attention dropout p. self_attention,
    encoder_decoder_attention: exactly one True. subln: an ``inner_attn_ln = LayerNorm(E,
    eps=args.layernorm_eps)`` before ``out_proj`` (self-attention only).

    Children, in torchscale's order: ``k_proj``, ``v_proj``, ``q_proj``, ``out_proj = Linear(E, E)``,
    ``inner_attn_ln`` (or None), ``dropout_module = Dropout(dropout)``; ``xpos`` is None.

    Sequence parallelism (:mod:`milkernels.distributed`): with ``process_group`` (keyword, or the attribute, e.g.
    set by :func:`milkernels.distributed.set_process_group`) each rank's ``query`` is its shard of the bags, and
    the result its rows of the whole bags' attention. Without one, ``args.seq_parallel`` keeps torchscale's
    meaning: where a segment is longer than the local sequence and ``torch.distributed`` runs several processes,
    the shards are those of the default group, as upstream's ``gather_kv`` takes them.
    """

    process_group = None

    fused_when = "key and value have the query's shape, " + FUSED_WHEN
    unfused_path = "upstream's forward (from_module) or NotImplementedError"

    def __init__(self, args, embed_dim: int, num_heads: int, dropout: float = 0.0, self_attention: bool = False,
                 encoder_decoder_attention: bool = False, subln: bool = False, *, process_group=None):
        super().__init__()
        self.process_group = process_group
        if getattr(args, "multiway", False):
            raise NotImplementedError("args.multiway: milkernels builds no MultiwayNetwork; build the upstream "
                                      "module and use DilatedAttention.from_module")
        if getattr(args, "xpos_rel_pos", False) and self_attention:
            raise NotImplementedError("args.xpos_rel_pos: the op has no XPOS rotary embedding")
        if not bool(self_attention) ^ bool(encoder_decoder_attention):
            raise ValueError("exactly one of self_attention and encoder_decoder_attention must be True")
        self.args = args
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = dropout
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.k_proj = self._projection(embed_dim)
        self.v_proj = self._projection(embed_dim)
        self.q_proj = self._projection(embed_dim)
        self.out_proj = self._projection(embed_dim)
        self.inner_attn_ln = (nn.LayerNorm(embed_dim, eps=args.layernorm_eps) if subln and self_attention else None)
        self.dropout_module = nn.Dropout(dropout)
        self.xpos = None
        self.upstream_class = None

    @staticmethod
    def _projection(embed_dim: int) -> nn.Module:
        return nn.Linear(embed_dim, embed_dim, bias=True)

    @classmethod
    def from_module(cls, module: nn.Module) -> "DilatedAttention":
        """One holding ``module``'s very children (so its parameters and ``state_dict`` keys), attributes
        and training flag; calls the fused path cannot take run ``type(module).forward`` on this state.
        :func:`milkernels.swap` checks the structure and the behavior first."""
        new = share_state(cls, module)
        new.upstream_class = type(module)
        return new

    def reset_parameters(self):
        """torchscale's init: Xavier-uniform projections (gain ``2 ** -0.5`` for q, k, v), ``out_proj.bias = 0``."""
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    @property
    def segment_lengths(self) -> list:
        """``args.segment_length``: the branches' segment lengths w."""
        return list(self.args.segment_length)

    @property
    def dilation_rates(self) -> list:
        """``args.dilated_ratio``: the branches' dilation rates r."""
        return list(self.args.dilated_ratio)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, incremental_state=None,
                key_padding_mask=None, attn_mask=None, rel_pos=None, is_first_step: bool = False,
                is_causal: bool = False):
        """torchscale's contract: ``query, key, value: (B, N, E)`` -> ``(attn: (B, N, E), None)``.

        ``key_padding_mask`` is ignored, as upstream's flash path does; ``rel_pos`` must be None. The fused
        path runs when :attr:`fused_when`; other calls run upstream's forward (a module made by
        :meth:`from_module`) or raise NotImplementedError. With ``dropout > 0`` the fused path runs in eval
        mode only, without dropout (upstream's flash path drops in eval mode too). A bag without instances
        (N = 0, or B = 0), which upstream cannot take, gives an empty ``attn`` with every parameter in the graph.
        """
        options = dict(incremental_state=incremental_state, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                       rel_pos=rel_pos, is_first_step=is_first_step, is_causal=is_causal)
        problem = self._unfused_problem(query, key, value, **options)
        if problem:
            return self._upstream_forward(problem, (query, key, value), options)
        return self._attend(query, key, value), None

    def _unfused_problem(self, query, key, value, incremental_state, key_padding_mask, attn_mask, rel_pos,
                         is_first_step, is_causal) -> str:
        """Why this call cannot take the fused path, or ``""``; ValueError for what upstream refuses."""
        if rel_pos is not None:
            raise ValueError("rel_pos must be None: torchscale's DilatedAttention asserts it")
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (B, N, embed_dim={self.embed_dim}), got shape {tuple(query.shape)}")
        checks = [
            (incremental_state is not None, "incremental_state is given"),
            (attn_mask is not None, "attn_mask is given"),
            (bool(is_causal), "is_causal is True"),
            (key.shape != query.shape or value.shape != query.shape,
             f"key {tuple(key.shape)} or value {tuple(value.shape)} differs from query {tuple(query.shape)}"),
            (self.xpos is not None, "xpos is set"),
            (self.dropout > 0 and self.training, f"dropout={self.dropout} in training mode"),
        ]
        problem = next((reason for failed, reason in checks if failed), "")
        if not problem and self.process_group is None and gathers_across_ranks(self.args, query.shape[1]):
            problem = seq_parallel_problem(self.args, query.shape[1], distributed_world_size())
        if problem and self.process_group is not None:
            raise ValueError(f"{type(self).__name__} has a process_group, but this call cannot take the fused path, "
                             f"the only sequence-parallel one ({problem}): it runs when {self.fused_when}")
        return problem

    def _upstream_forward(self, problem: str, inputs: tuple, options: dict):
        """``type(upstream).forward`` on this module's state (a throw-away instance of that class sharing this
        module's ``__dict__``), for calls the fused path cannot take; NotImplementedError without one."""
        cls = self.upstream_class
        if cls is None:
            raise NotImplementedError(f"milkernels' {type(self).__name__} has no fused path for this call ({problem})"
                                      " and no upstream forward to fall back on: it was not made by from_module")
        view = cls.__new__(cls)
        object.__setattr__(view, "__dict__", self.__dict__)
        given = {name: value for name, value in options.items() if value is not None and value is not False}
        return cls.forward(view, *inputs, **given)

    def _process_group(self, length: int):
        """The group the op shards the bags over: :attr:`process_group`, else the default group where
        ``args.seq_parallel`` gathers across ranks (:func:`gathers_across_ranks`), else None."""
        if self.process_group is not None:
            return self.process_group
        return torch.distributed.group.WORLD if gathers_across_ranks(self.args, length) else None

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The fused path: ``out_proj(inner_attn_ln(dilated attention of the projections)): (B, N, E)``."""
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        group = self._process_group(query.shape[1])
        if group is None and no_instances(q):
            attn = 0 * (q + k + v)  # upstream cannot take it: the empty result, every projection in the graph
        else:
            heads = [t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v)]       # (B, N, H, head_dim)
            attn = dilated_attention(*heads, self.segment_lengths, self.dilation_rates, mode="torchscale",
                                     process_group=group).flatten(-2)
        if self.inner_attn_ln is not None:
            attn = self.inner_attn_ln(attn)
        return self.out_proj(attn)


class LinMILDilatedAttention(DilatedAttention):
    """Lin-MIL's ``DilatedAttention`` (``lin_mil.attention.dilated_attention``): torchscale's constructor and
    attributes with ``nn.Identity`` projections (so no parameters but ``inner_attn_ln``'s with ``subln``) and
    ``forward(x, ...) -> (attn, None)``. Lin-MIL's ablation block calls it in float16 (``attn.half()``,
    ``y.half()``), which works the same here."""

    fused_when = FUSED_WHEN

    @staticmethod
    def _projection(embed_dim: int) -> nn.Module:
        return nn.Identity()

    def reset_parameters(self):
        """Lin-MIL's: nothing (the projections are identities)."""

    def forward(self, x: torch.Tensor, incremental_state=None, key_padding_mask=None, attn_mask=None, rel_pos=None,
                is_first_step: bool = False, is_causal: bool = False):
        """Lin-MIL's contract: ``x: (B, N, E)`` -> ``(attn: (B, N, E), None)``, self-attention of ``x``; the
        options as in :meth:`DilatedAttention.forward`."""
        options = dict(incremental_state=incremental_state, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                       rel_pos=rel_pos, is_first_step=is_first_step, is_causal=is_causal)
        problem = self._unfused_problem(x, x, x, **options)
        if problem:
            return self._upstream_forward(problem, (x,), options)
        return self._attend(x, x, x), None
