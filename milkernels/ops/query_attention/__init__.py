"""Learnable-query attention (LiteMIL, ASMIL): public functions, custom ops, dispatch.

:func:`query_attention` attends from a few projected queries to every instance of a bag with softmax
or NSF weights, in the folded form of :mod:`.reference`: one pass over the bag, no key or value
tensor. :func:`folded_attention` is the core on folded queries, for callers that stack several
attention layers' queries into one pass (``milkernels.nn.AnchoredQueryAttention``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ... import _backends
from .. import _library, _sharded
from .._bags import Bags, autocast_inputs, bags_in_op, check_float, check_like, check_temperature, pack_bags
from . import reference
from .reference import NSF_EPS, fold_queries, unfold_values

OP_NAME = "query_attention"
NORMALIZATIONS = ("softmax", "nsf")


class QueryAttentionOutput(NamedTuple):
    """What :func:`query_attention` returns.

    ``out``: ``(Q, E)`` for one bag, else ``(B, Q, E)``: the heads' pooled values, concatenated
    (before any output projection). ``weights``: the attention weights after dropout, and ``logits``:
    ``q . k / sqrt(dh)`` (masked instances: -inf), each ``(H, Q, N)`` for one bag, ``(B, H, Q, N)`` for
    padded bags, ``(H, Q, T)`` for packed bags; None unless asked for.
    """

    out: torch.Tensor
    weights: torch.Tensor | None
    logits: torch.Tensor | None


class Folded(NamedTuple):
    """What :func:`folded_attention` returns: ``pooled: (B, P, Ein)``, ``mass: (B, P)`` (x's dtype),
    ``z: (T, J)``, ``weights: (T, P)`` (after dropout; None unless asked for) and ``anchor_z: (T, Ja)``, without
    gradient (None without an anchor); the scores in float32 on the triton backend, in x's dtype on the
    reference."""

    pooled: torch.Tensor
    mass: torch.Tensor
    z: torch.Tensor
    weights: torch.Tensor | None
    anchor_z: torch.Tensor | None = None


def _plan(x2d, u, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed):
    from . import triton as kernels

    bags = bags_in_op(x2d, bounds, row_valid)
    return kernels.Plan.make(bags, u, nsf_from, num_pooled, dropout_p, _library.seed_value(seed))


@_library.custom_op("folded_attention_forward")
def _forward_op(x2d: Tensor, u: Tensor, c: Tensor, bounds: list[int], row_valid: Optional[Tensor], nsf_from: int,
                num_pooled: int, dropout_p: float, seed: Optional[Tensor], anchor_u: Optional[Tensor] = None,
                anchor_c: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The triton forward on packed rows ``x2d: (T, Ein)`` with bag ``bounds`` (B + 1 ints).

    Returns ``pooled: (B, P, Ein)`` and ``mass: (B, P)`` in x's dtype, the scores ``z: (T, J)``, the pooled
    columns' log-sum-exp ``lse: (B, P)`` and the scores ``anchor_z: (T, Ja)`` of ``anchor_u: (Bu, Ja, Ein)``
    and ``anchor_c: (Bu, Ja)`` (empty without them), all three float32.
    """
    from . import triton as kernels

    plan = _plan(x2d, u, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed)
    anchor = None if anchor_u is None else (anchor_u, anchor_c)
    *outputs, anchor_z = kernels.forward(x2d, u, c, row_valid, plan, anchor)
    return (*outputs, _library.absent(outputs[2]) if anchor_z is None else anchor_z)


def _fake_outputs(x2d, u, bounds, num_pooled) -> tuple:
    """Empty ``(pooled, mass, z, lse)`` of the forward ops' shapes and dtypes, for their fake implementations."""
    (rows, features), num_bags = x2d.shape, len(bounds) - 1
    lse = x2d.new_empty(num_bags, num_pooled, dtype=torch.float32)
    z = x2d.new_empty(rows, u.shape[1], dtype=torch.float32)
    return x2d.new_empty(num_bags, num_pooled, features), x2d.new_empty(num_bags, num_pooled), z, lse


@_forward_op.register_fake
def _(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, anchor_u=None, anchor_c=None):
    anchor_shape = (0,) if anchor_u is None else (x2d.shape[0], anchor_u.shape[1])
    return (*_fake_outputs(x2d, u, bounds, num_pooled), x2d.new_empty(anchor_shape, dtype=torch.float32))


@_library.custom_op("folded_attention_backward")
def _backward_op(x2d: Tensor, u: Tensor, c: Tensor, bounds: list[int], row_valid: Optional[Tensor], nsf_from: int,
                 num_pooled: int, dropout_p: float, seed: Optional[Tensor], z: Tensor, lse: Tensor, pooled: Tensor,
                 mass: Tensor, d_pooled: Optional[Tensor], d_mass: Optional[Tensor], d_z: Optional[Tensor],
                 wanted: list[bool]) -> list[Tensor]:
    """Gradients ``(dx: (T, Ein), du: (Bu, J, Ein), dc: (Bu, J))``, each empty where ``wanted`` is False.

    ``u, c`` are the forward's inputs and ``z, lse, pooled, mass`` its outputs; ``d_pooled: (B, P, Ein)``,
    ``d_mass: (B, P)`` and ``d_z: (T, J)`` may each be None.
    """
    from . import triton as kernels

    plan = _plan(x2d, u, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed)
    grads = kernels.backward(x2d, u, c, row_valid, z, lse, pooled, mass, plan, d_pooled, d_mass, d_z, wanted)
    return _library.owned(grads, x2d)


@_backward_op.register_fake
def _(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, z, lse, pooled, mass, d_pooled, d_mass,
      d_z, wanted):
    shapes = (x2d.shape, u.shape, u.shape[:2])
    return [x2d.new_empty(shape, dtype=like.dtype) if want else _library.absent(x2d)
            for shape, like, want in zip(shapes, (x2d, u, u), wanted)]


@_library.custom_op("folded_attention_forward_sharded")
def _sharded_forward_op(x2d: Tensor, u: Tensor, c: Tensor, bounds: list[int], row_valid: Optional[Tensor],
                        nsf_from: int, num_pooled: int, dropout_p: float, seed: Optional[Tensor],
                        group_name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward_op` on a rank's shard ``x2d``, its ``pooled``, ``mass`` and ``lse`` those of the whole
    bags across the ranks of process group ``group_name`` (the scores ``z`` stay the shard's)."""
    pooled, mass, z, lse, _ = _forward_op(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed)
    pooled, mass, lse = _sharded.combine_pools(pooled, mass, lse, nsf_from, NSF_EPS, group_name, OP_NAME)
    return pooled, mass, z, lse


@_sharded_forward_op.register_fake
def _(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, group_name):
    return _fake_outputs(x2d, u, bounds, num_pooled)


def _setup_context(ctx, inputs, output):
    """Both forward ops': their first 9 inputs and 4 outputs; ``lse`` and the anchor's scores take no gradient."""
    x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed = inputs[:9]
    pooled, mass, z, lse = output[:4]
    ctx.save_for_backward(x2d, u, c, row_valid, seed, z, lse, pooled, mass)
    ctx.options = (bounds, nsf_from, num_pooled, dropout_p)
    ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)


def _input_grads(ctx, d_pooled, d_mass, d_z) -> tuple:
    """The gradients of the forward ops' first 9 inputs (x2d, u, c; None for the others)."""
    x2d, u, c, row_valid, seed, z, lse, pooled, mass = ctx.saved_tensors
    bounds, nsf_from, num_pooled, dropout_p = ctx.options
    wanted = [bool(need) for need in ctx.needs_input_grad[:3]]
    grads = _backward_op(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, z, lse, pooled, mass,
                         d_pooled, d_mass, d_z, wanted)
    return (*(g if want else None for g, want in zip(grads, wanted)), None, None, None, None, None, None)


def _backward(ctx, d_pooled, d_mass, d_z, d_lse, d_anchor_z):
    return (*_input_grads(ctx, d_pooled, d_mass, d_z), None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _sharded_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs[:-1], output)
    ctx.group_name = inputs[-1]


def _sharded_backward(ctx, d_pooled, d_mass, d_z, d_lse):
    d_pooled, d_mass = _sharded.sum_gradients(ctx.group_name, OP_NAME, d_pooled, d_mass)
    return (*_input_grads(ctx, d_pooled, d_mass, d_z), None)


_sharded_forward_op.register_autograd(_sharded_backward, setup_context=_sharded_setup_context)

_library.forbid_double_backward(_backward_op, OP_NAME)


@_library.flop_formula("folded_attention_forward")
def _forward_flops(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, anchor_u=None,
                   anchor_c=None):
    """The reference's per-bag matmuls over all rows: the scores ``x u^T`` (J columns), the pooling ``p^T x``
    (P columns) and the anchor's scores (Ja columns)."""
    rows, features = x2d
    return 2 * rows * features * (u[1] + num_pooled + (anchor_u[1] if anchor_u else 0))


@_library.flop_formula("folded_attention_forward_sharded")
def _sharded_forward_flops(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, group_name):
    """The forward's count on the shard (the combine across ranks has no matmul)."""
    return _forward_flops(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed)


@_library.flop_formula("folded_attention_backward")
def _backward_flops(x2d, u, c, bounds, row_valid, nsf_from, num_pooled, dropout_p, seed, z, lse, pooled, mass,
                    d_pooled, d_mass, d_z, wanted):
    """The gradients that autograd takes through the reference's matmuls for the inputs in ``wanted`` (x, u, c).

    The pooling ``p^T x`` gives d p (p depends on every input) and, if x is wanted, d x when pooled takes a
    gradient; the scores ``x u^T`` give d x and d u, as wanted, when any output takes a gradient (pooled and
    mass through p).
    """
    rows, features = x2d
    need_x, need_u, _ = wanted
    flops = 0
    if d_pooled is not None:
        flops += 2 * rows * features * num_pooled * (1 + need_x)
    if d_pooled is not None or d_mass is not None or d_z is not None:
        flops += 2 * rows * features * u[1] * (need_x + need_u)
    return flops


@_library.custom_op("folded_attention_dropout_keep")
def _dropout_keep_op(z: Tensor, num_pooled: int, dropout_p: float, seed: Tensor) -> Tensor:
    """The boolean keep mask ``(T, P)`` that the kernels draw for the pooled columns of ``z: (T, J)``."""
    from . import triton as kernels

    return kernels.dropout_keep(_library.seed_value(seed), *z.shape, num_pooled, dropout_p, z.device)


@_dropout_keep_op.register_fake
def _(z, num_pooled, dropout_p, seed):
    return z.new_empty(z.shape[0], num_pooled, dtype=torch.bool)


_library.no_matmul_flops("folded_attention_dropout_keep")


def _check_folded(bags: Bags, u, c, nsf_from, num_pooled, dropout_p):
    for name, tensor in dict(u=u, c=c).items():
        check_float(name, tensor)
    check_like(bags.x2d, "the folded queries", u=u, c=c)
    if u.dim() != 3 or u.shape[0] not in (1, bags.num_bags) or u.shape[2] != bags.x2d.shape[1]:
        raise ValueError(f"u must be (1 or B={bags.num_bags}, J, Ein={bags.x2d.shape[1]}), got {tuple(u.shape)}")
    if tuple(c.shape) != tuple(u.shape[:2]):
        raise ValueError(f"c must have shape {tuple(u.shape[:2])} to match u, got {tuple(c.shape)}")
    columns = u.shape[1]
    if columns == 0 or not 0 <= nsf_from <= columns or not 0 <= num_pooled <= columns:
        raise ValueError(f"need J > 0, 0 <= nsf_from <= J and 0 <= num_pooled <= J; got J={columns}, "
                         f"nsf_from={nsf_from}, num_pooled={num_pooled}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def folded_attention(bags: Bags, u, c, *, nsf_from: int, num_pooled: int, dropout_p: float = 0.0,
                     training: bool = True, need_weights: bool = False, group_name: str | None = None,
                     anchor: tuple[Tensor, Tensor] | None = None) -> Folded:
    """Attention pooling of packed ``bags`` (from :func:`milkernels.ops._bags.pack_bags`) with folded queries.

    ``u: (Bu, J, Ein)`` and ``c: (Bu, J)``, Bu = 1 (all bags) or B, give the scores
    ``z = x u^T + c`` of J columns. Columns from ``nsf_from`` on are normalized with NSF, the others
    with softmax, over the rows of each bag; the first ``num_pooled`` columns are pooled (with dropout
    ``dropout_p`` on their weights when ``training``), the rest give scores only (all of them at
    ``num_pooled = 0``: ``pooled`` and ``mass`` are then empty). See :class:`Folded`.
    With ``group_name`` (:func:`milkernels.distributed.group_name`), ``bags`` is a rank's shard, ``pooled`` and
    ``mass`` are the whole bags' and the weights are detached.

    ``anchor``: ``(u_a: (Bu, Ja, Ein), c_a: (Bu, Ja))`` or None, the folded queries of further columns scored
    only and without gradient, ``anchor_z = x u_a^T + c_a`` (ASMIL's EMA anchor). The triton backend scores
    them in the pass that pools the bag where one pass over whole rows runs without dropout and Ja is at most
    the call's first column tile (J's padded to 16, 32 or 64 columns; ASMIL's 64 over 512 features: x is read
    once for both), else (and with ``group_name``) in a scores-only call of their own.
    """
    _check_folded(bags, u, c, nsf_from, num_pooled, dropout_p)
    if anchor is not None:
        try:
            _check_folded(bags, *anchor, 0, 0, 0.0)
        except ValueError as error:
            raise ValueError(f"anchor: {error}") from None
    active_p = dropout_p if training else 0.0
    backend = _backends.choose(OP_NAME, bags.x2d.device, lambda name: _reasons(name, bags))
    if group_name:
        folded = _sharded_folded(backend, bags, u, c, nsf_from, num_pooled, active_p, need_weights, group_name)
        return _with_anchor_scores(folded, bags, anchor)
    if backend == "reference":
        folded = Folded(*reference.folded_attention(bags.x2d, u, c, bags, nsf_from, num_pooled, active_p, training))
        return _with_anchor_scores(folded, bags, anchor)
    seed = _library.dropout_seed(active_p > 0)
    anchor_u, anchor_c = (None, None) if anchor is None else (t.contiguous() for t in anchor)
    pooled, mass, z, _, anchor_z = _forward_op(bags.x2d.contiguous(), u.contiguous(), c.contiguous(),
                                               list(bags.bounds), bags.row_valid, nsf_from, num_pooled, active_p,
                                               seed, anchor_u, anchor_c)
    weights = None
    if need_weights:
        keep = _dropout_keep_op(z.detach(), num_pooled, active_p, seed) if seed is not None else None
        probabilities = reference.normalize(z[:, :num_pooled], bags, nsf_from)
        weights = reference.apply_dropout(probabilities, active_p, True, keep).to(bags.x2d.dtype)
    return Folded(pooled, mass, z, weights, None if anchor is None else anchor_z)


def _with_anchor_scores(folded: Folded, bags: Bags, anchor) -> Folded:
    """``folded`` with the ``anchor``'s scores from a scores-only call of their own (none without one)."""
    if anchor is None:
        return folded
    with torch.no_grad():
        anchor_z = folded_attention(bags, *anchor, nsf_from=0, num_pooled=0, training=False).z
    return folded._replace(anchor_z=anchor_z)


def _sharded_folded(backend: str, bags: Bags, u, c, nsf_from: int, num_pooled: int, active_p: float,
                    need_weights: bool, group_name: str) -> Folded:
    """:func:`folded_attention` on a rank's shard: the whole bags' pooled and mass, the shard's z, and its
    weights (after the dropout the pooling drew, detached) under the whole bags' normalizers."""
    seed = _sharded.rank_seed(_library.dropout_seed(active_p > 0), group_name)
    keep = None
    if backend == "reference":
        if active_p > 0:
            keep = torch.rand(bags.x2d.shape[0], num_pooled, device=bags.x2d.device) >= active_p
        pooled, mass, z, _ = reference.folded_attention(bags.x2d, u, c, bags, nsf_from, num_pooled, active_p, True,
                                                        keep)
        lse = reference.log_normalizer(z[:, :num_pooled], bags, nsf_from)
        pooled, mass, lse = _sharded.combine_pools(pooled, mass, lse, nsf_from, NSF_EPS, group_name, OP_NAME)
    else:
        pooled, mass, z, lse = _sharded_forward_op(bags.x2d.contiguous(), u.contiguous(), c.contiguous(),
                                                   list(bags.bounds), bags.row_valid, nsf_from, num_pooled, active_p,
                                                   seed, group_name)
        if need_weights and seed is not None:
            keep = _dropout_keep_op(z.detach(), num_pooled, active_p, seed)
    weights = None
    if need_weights:
        weights = reference.weights_from_lse(z.detach(), lse.detach(), bags, nsf_from)
        weights = reference.apply_dropout(weights, active_p, True, keep).to(bags.x2d.dtype)
    return Folded(pooled, mass, z, weights)


def _reasons(backend: str, bags: Bags) -> list[str]:
    if backend == "reference":
        return []
    reasons = _backends.kernel_reasons(backend, bags.x2d)
    if backend == "cuda":
        reasons.append("query attention has no cuda kernel; use the triton backend")
    return reasons


def _check(x, query, wk, bk, wv, bv, num_heads, normalization, temperature):
    """Raise ValueError unless the arguments are consistent; return ``(Ein, E)``."""
    for name, tensor in dict(query=query, wk=wk, wv=wv).items():
        check_float(name, tensor)
    present = check_like(x, "the query and the weights", query=query, wk=wk, bk=bk, wv=wv, bv=bv)
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    check_temperature(temperature)
    if wk.dim() != 2 or wv.shape != wk.shape:
        raise ValueError(f"wk and wv must both be (E, Ein), got {tuple(wk.shape)} and {tuple(wv.shape)}")
    width, features = wk.shape
    if width == 0 or width % num_heads:
        raise ValueError(f"E = {width} must be a positive multiple of num_heads = {num_heads}")
    for name in ("bk", "bv"):
        if name in present and tuple(present[name].shape) != (width,):
            raise ValueError(f"{name} must have shape ({width},), got {tuple(present[name].shape)}")
    if query.dim() not in (2, 3) or query.shape[-1] != width or query.shape[-2] == 0:
        raise ValueError(f"query must be (Q, E) or (B, Q, E) with E = {width} and Q >= 1, got {tuple(query.shape)}")
    return features, width


def _queries(query, bags: Bags):
    """``query`` as ``(Bq, Q, E)``, Bq = 1 or B; a batch-expanded query (stride 0) is taken once."""
    if query.dim() == 2:
        return query[None]
    if query.shape[0] == 1 or (query.shape[0] == bags.num_bags and query.stride(0) == 0):
        return query[:1]
    if query.shape[0] != bags.num_bags or bags.layout == "single":
        raise ValueError(f"query has {query.shape[0]} sets of queries for {bags.num_bags} bag(s); give (Q, E), "
                         "(1, Q, E) or one set per bag")
    return query


def columns_to_caller(columns, bags: Bags, num_heads: int, fill=None):
    """Per-row values ``(T, H * Q)`` (column ``h * Q + q``) in the caller's layout: ``(H, Q, N)`` for one
    bag, ``(B, H, Q, N)`` for padded bags, ``(H, Q, T)`` for packed bags; masked rows set to ``fill``."""
    if fill is not None and bags.row_valid is not None:
        columns = columns.masked_fill(~bags.row_valid[:, None], fill)
    rows, width = columns.shape
    if bags.layout == "padded":
        return columns.reshape(bags.shape[0], bags.shape[1], num_heads, width // num_heads).permute(0, 2, 3, 1)
    return columns.reshape(rows, num_heads, width // num_heads).permute(1, 2, 0)


def query_attention(x, query, wk, bk, wv, bv, num_heads: int, *, normalization: str = "softmax",
                    temperature: float = 1.0, mask=None, cu_seqlens=None, dropout_p: float = 0.0,
                    training: bool = True, need_weights: bool = False, need_logits: bool = False,
                    process_group=None):
    """Multi-head attention from learned queries to the instances of a bag, in one fused pass.

    Args:
        x: one bag ``(N, Ein)``; padded bags ``(B, N, Ein)`` with ``mask: (B, N)`` (nonzero = real
            instance); or packed bags ``(T, Ein)`` with ``cu_seqlens: (B + 1,)``.
        query: projected queries ``(Q, E)`` for every bag, or ``(B, Q, E)`` one set per bag (a
            batch-expanded ``(Q, E)`` parameter is recognized by its stride and read once).
        wk, wv: ``(E, Ein)``; ``bk, bv: (E,)`` or None. ``E = num_heads * dh``.
        normalization: ``"softmax"`` or ``"nsf"`` (normalized sigmoid), of ``logits / temperature``.
        dropout_p: dropout on the attention weights, active when ``training`` (as nn.MultiheadAttention).
        process_group: sequence parallelism (:mod:`milkernels.distributed`): ``x`` is this rank's shard of the
            bags (N may be 0; a packed bag needs a row on every rank); ``out`` is the whole bags', the same on
            every rank; the weights and logits are the shard's rows, the weights detached.

    x, query and the weights share one dtype (float32, float16, bfloat16; float64 on the reference);
    under ``torch.autocast`` they are cast to its dtype. Returns a :class:`QueryAttentionOutput`.
    """
    x, query, wk, bk, wv, bv = autocast_inputs(x, query, wk, bk, wv, bv)
    features, width = _check(x, query, wk, bk, wv, bv, num_heads, normalization, temperature)
    shard, group_name = _sharded.shard_call(OP_NAME, x, features, mask, cu_seqlens, process_group, width=width,
                                            heads=num_heads)
    bags = shard.bags
    u, c = fold_queries(_queries(query, bags), wk, bk, num_heads, float(temperature))
    columns = u.shape[1]
    nsf_from = 0 if normalization == "nsf" else columns
    folded = folded_attention(bags, u, c, nsf_from=nsf_from, num_pooled=columns, dropout_p=dropout_p,
                              training=training, need_weights=need_weights, group_name=group_name)
    out = shard.bags_to_caller(unfold_values(folded.pooled, folded.mass, wv, bv, num_heads))
    weights = shard.cut(columns_to_caller(folded.weights, bags, num_heads)) if need_weights else None
    logits = None
    if need_logits:
        logits = columns_to_caller((folded.z * temperature).to(x.dtype), bags, num_heads, fill=float("-inf"))
        logits = shard.cut(logits)
    return QueryAttentionOutput(out, weights, logits)
