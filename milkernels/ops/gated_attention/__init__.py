"""Gated attention pooling (CLAM, ABMIL, CMA-MIL): public functions, autograd Function, dispatch.

:func:`gated_attention_pool` returns the pooled bag and the raw scores from one fused pass over the
bag; :func:`gated_attention_scores` returns only the raw scores (CLAM's ``Attn_Net_Gated``).
The math is in :mod:`.reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backends
from .. import _library, _sharded
from .._bags import Bags, autocast_inputs, bags_in_op, check_float, check_like, pack_bags
from . import reference

OP_NAME = "gated_attention"


def _check_weights(x, wa, ba, wb, bb, wc, bc):
    """Raise ValueError unless the weights have consistent shapes, x's dtype and device; return (L, D, K)."""
    for name, tensor in dict(wa=wa, wc=wc).items():
        check_float(name, tensor)
    present = check_like(x, "the weights", wa=wa, ba=ba, wb=wb, bb=bb, wc=wc, bc=bc)
    if wa.dim() != 2 or wc.dim() != 2:
        raise ValueError(f"wa must be (D, L) and wc (K, D), got {tuple(wa.shape)} and {tuple(wc.shape)}")
    hidden, features = wa.shape
    heads = wc.shape[0]
    expected = dict(wb=(hidden, features), ba=(hidden,), bb=(hidden,), wc=(heads, hidden), bc=(heads,))
    for name, shape in expected.items():
        if name in present and tuple(present[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match wa {tuple(wa.shape)}, got {tuple(present[name].shape)}")
    if bb is not None and wb is None:
        raise ValueError("bb given without wb: the ungated form takes wb=None and bb=None (the gate has no bias "
                         "without its weight)")
    if hidden == 0 or heads == 0:
        raise ValueError(f"D and K must be positive, got D={hidden}, K={heads}")
    return features, hidden, heads


def _kernel_reasons(backend, bags: Bags, weights, dropout_p, pool, needs_grad):
    reasons = _backends.kernel_reasons(backend, bags.x2d)
    if backend == "cuda":
        reasons += _cuda_reasons(bags, weights, dropout_p, pool, needs_grad)
    return reasons


def _cuda_reasons(bags, weights, dropout_p, pool, needs_grad):
    from . import cuda

    reasons = cuda.not_supported_reasons(bags.x2d, *weights)
    if needs_grad:
        reasons.append("the cuda backend has the forward only; use the triton backend for training")
    if dropout_p > 0:
        reasons.append("the cuda backend has no dropout; use the triton backend")
    return reasons


def _plan(x2d, wa, bounds, row_valid, dropout_p, seed):
    from . import triton as kernels

    return kernels.Plan.make(bags_in_op(x2d, bounds, row_valid), wa.shape[0], dropout_p, _library.seed_value(seed))


@_library.custom_op("gated_attention_forward")
def _forward_op(x2d: Tensor, wa: Tensor, ba: Optional[Tensor], wb: Optional[Tensor], bb: Optional[Tensor],
                wc: Tensor, bc: Optional[Tensor], bounds: list[int], row_valid: Optional[Tensor], dropout_p: float,
                seed: Optional[Tensor], pool: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The triton forward on packed rows ``x2d: (T, L)`` with bag ``bounds`` (B + 1 ints).

    Returns ``pooled: (B, K, L)`` in x's dtype, the raw ``scores: (T, K)`` and their log-sum-exp
    ``lse: (B, K)``, both float32; pooled and lse are empty when ``pool`` is False.
    """
    from . import triton as kernels

    plan = _plan(x2d, wa, bounds, row_valid, dropout_p, seed)
    pooled, scores, lse = kernels.forward(x2d, wa, ba, wb, bb, wc, bc, row_valid, plan, pool)
    return (pooled, scores, lse) if pool else (_library.absent(x2d), scores, _library.absent(scores))


@_forward_op.register_fake
def _(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, pool):
    (rows, features), heads, num_bags = x2d.shape, wc.shape[0], len(bounds) - 1
    scores = x2d.new_empty(rows, heads, dtype=torch.float32)
    if not pool:
        return _library.absent(x2d), scores, _library.absent(scores)
    return x2d.new_empty(num_bags, heads, features), scores, scores.new_empty(num_bags, heads)


@_library.custom_op("gated_attention_backward")
def _backward_op(x2d: Tensor, wa: Tensor, ba: Optional[Tensor], wb: Optional[Tensor], bb: Optional[Tensor],
                 wc: Tensor, bc: Optional[Tensor], bounds: list[int], row_valid: Optional[Tensor], dropout_p: float,
                 seed: Optional[Tensor], pool: bool, scores: Tensor, lse: Tensor, pooled: Tensor,
                 d_pooled: Optional[Tensor], d_scores: Optional[Tensor], wanted: list[bool]) -> list[Tensor]:
    """Gradients of ``(x2d, wa, ba, wb, bb, wc, bc)``, each empty where ``wanted`` is False.

    ``scores: (T, K)`` float32 and ``lse: (B, K)`` are the forward's; ``d_pooled: (B, K, L)`` and
    ``d_scores: (T, K)`` may be None.
    """
    from . import triton as kernels

    plan = _plan(x2d, wa, bounds, row_valid, dropout_p, seed)
    grads = kernels.backward(x2d, wa, ba, wb, bb, wc, bc, row_valid, scores, lse, pooled, plan, pool, d_pooled,
                             d_scores, wanted)
    return _library.owned(grads, x2d)


@_backward_op.register_fake
def _(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, pool, scores, lse, pooled, d_pooled,
      d_scores, wanted):
    inputs = (x2d, wa, ba, wb, bb, wc, bc)
    return [torch.empty_like(t) if want else _library.absent(x2d) for t, want in zip(inputs, wanted)]


@_library.custom_op("gated_attention_forward_sharded")
def _sharded_forward_op(x2d: Tensor, wa: Tensor, ba: Optional[Tensor], wb: Optional[Tensor], bb: Optional[Tensor],
                        wc: Tensor, bc: Optional[Tensor], bounds: list[int], row_valid: Optional[Tensor],
                        dropout_p: float, seed: Optional[Tensor], group_name: str) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_forward_op` with ``pool`` on a rank's shard ``x2d``, its ``pooled: (B, K, L)`` and ``lse: (B, K)``
    those of the whole bags across the ranks of process group ``group_name`` (the scores stay the shard's)."""
    pooled, scores, lse = _forward_op(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, True)
    pooled, _, lse = _sharded.combine_pools(pooled, None, lse, lse.shape[1], 0.0, group_name, OP_NAME)
    return pooled, scores, lse


@_sharded_forward_op.register_fake
def _(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, group_name):
    (rows, features), heads, num_bags = x2d.shape, wc.shape[0], len(bounds) - 1
    scores = x2d.new_empty(rows, heads, dtype=torch.float32)
    return x2d.new_empty(num_bags, heads, features), scores, scores.new_empty(num_bags, heads)


def _setup_context(ctx, inputs, output):
    x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, pool = inputs
    pooled, scores, lse = output
    ctx.save_for_backward(x2d, wa, ba, wb, bb, wc, bc, row_valid, seed, scores, lse, pooled)
    ctx.options = (bounds, dropout_p, pool)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, d_pooled, d_scores, d_lse):
    x2d, wa, ba, wb, bb, wc, bc, row_valid, seed, scores, lse, pooled = ctx.saved_tensors
    bounds, dropout_p, pool = ctx.options
    inputs = (x2d, wa, ba, wb, bb, wc, bc)
    wanted = [bool(need) and t is not None for need, t in zip(ctx.needs_input_grad, inputs)]
    d_scores = d_scores.to(x2d.dtype) if d_scores is not None else None  # the kernels read it in x's dtype
    grads = _backward_op(*inputs, bounds, row_valid, dropout_p, seed, pool, scores, lse, pooled, d_pooled, d_scores,
                         wanted)
    return (*(g if want else None for g, want in zip(grads, wanted)), None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _sharded_setup_context(ctx, inputs, output):
    _setup_context(ctx, (*inputs[:-1], True), output)
    ctx.group_name = inputs[-1]


def _sharded_backward(ctx, d_pooled, d_scores, d_lse):
    (d_pooled,) = _sharded.sum_gradients(ctx.group_name, OP_NAME, d_pooled)
    return _backward(ctx, d_pooled, d_scores, d_lse)


_sharded_forward_op.register_autograd(_sharded_backward, setup_context=_sharded_setup_context)

_library.forbid_double_backward(_backward_op, "gated_attention_pool and gated_attention_scores")


def _score_flops(rows: int, features: int, hidden: int, heads: int, gated: bool) -> int:
    """The reference's forward matmuls for the scores: the a (and b) projection and the head projection."""
    return 2 * rows * hidden * (features * (2 if gated else 1) + heads)


def _pools_by_matmul(bounds, row_valid) -> bool:
    """Whether the reference pools with one matmul (one bag, no mask); several bags pool with index_add."""
    return len(bounds) == 2 and row_valid is None


@_library.flop_formula("gated_attention_forward")
def _forward_flops(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, pool):
    """The scores' matmuls, and the pooling matmul ``A^T x`` where the reference has one (one bag, no mask)."""
    (rows, features), hidden, heads = x2d, wa[0], wc[0]
    pooling = 2 * heads * rows * features if pool and _pools_by_matmul(bounds, row_valid) else 0
    return _score_flops(rows, features, hidden, heads, wb is not None) + pooling


@_library.flop_formula("gated_attention_forward_sharded")
def _sharded_forward_flops(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, group_name):
    """The pooling forward's count on the shard (the combine across ranks has no matmul)."""
    return _forward_flops(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, True)


@_library.flop_formula("gated_attention_backward")
def _backward_flops(x2d, wa, ba, wb, bb, wc, bc, bounds, row_valid, dropout_p, seed, pool, scores, lse, pooled,
                    d_pooled, d_scores, wanted):
    """The gradients that autograd takes through the reference's matmuls for the inputs in ``wanted``.

    The pooling matmul (one bag, no mask) gives d A and, if x is wanted, d x; when the scores take a gradient,
    the head projection gives d (a * b) (when an input of a or b is wanted) and d wc, then the a and b
    projections d x and d wa, d wb.
    """
    (rows, features), hidden, heads = x2d, wa[0], wc[0]
    need_x, need_wa, need_ba, need_wb, need_bb, need_wc, _ = wanted
    pooled_gradient = pool and d_pooled is not None
    flops = 0
    if pooled_gradient and _pools_by_matmul(bounds, row_valid):
        flops += 2 * heads * rows * features * (1 + need_x)
    if pooled_gradient or d_scores is not None:
        through_gate = need_x or need_wa or need_ba or need_wb or need_bb
        flops += 2 * rows * heads * hidden * (through_gate + need_wc)
        if through_gate:
            projection = 2 * rows * hidden * features
            flops += projection * (need_x + need_wa) + (projection * (need_x + need_wb) if wb is not None else 0)
    return flops


@_library.custom_op("gated_attention_cuda_scores")
def _cuda_scores_op(x2d: Tensor, wa: Tensor, ba: Optional[Tensor], wb: Optional[Tensor], bb: Optional[Tensor],
                    wc: Tensor, bc: Optional[Tensor]) -> Tensor:
    """Raw scores ``(T, K)`` float32 from the cuda backend's fused scoring kernel (forward only)."""
    from . import cuda

    return cuda.scores(x2d, wa, ba, wb, bb, wc, bc)


@_cuda_scores_op.register_fake
def _(x2d, wa, ba, wb, bb, wc, bc):
    return x2d.new_empty(x2d.shape[0], wc.shape[0], dtype=torch.float32)


@_library.flop_formula("gated_attention_cuda_scores")
def _cuda_scores_flops(x2d, wa, ba, wb, bb, wc, bc):
    """The reference's matmuls for the scores (the cuda backend pools outside the op, as the reference does)."""
    (rows, features), hidden, heads = x2d, wa[0], wc[0]
    return _score_flops(rows, features, hidden, heads, wb is not None)


def _run(x, wa, ba, wb, bb, wc, bc, bags: Bags, dropout_p, training, pool, group_name=None):
    """Dispatch one call; returns ``(pooled (B, K, L) or None, scores (T, K))``. With ``group_name``, ``bags`` is a
    rank's shard and ``pooled`` that of the whole bags across the group's ranks."""
    weights = (wa, ba, wb, bb, wc, bc)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
    active_p = dropout_p if training else 0.0
    backend = _backends.choose(
        OP_NAME, bags.x2d.device,
        lambda name: [] if name == "reference" else _kernel_reasons(name, bags, weights, active_p, pool, needs_grad)
        + (["the cuda backend has no sequence parallelism"] if name == "cuda" and group_name else []))
    if backend == "reference" and pool:
        pooled, scores = reference.gated_attention_pool(bags.x2d, *weights, bags, dropout_p, training)
        return (_combine_reference(pooled, scores, bags, group_name) if group_name else pooled), scores
    if backend == "reference":
        return None, reference.gated_scores(bags.x2d, *weights, dropout_p, training)
    if backend == "cuda":
        from . import cuda

        raw = _cuda_scores_op(bags.x2d, *weights)
        return (cuda.pool(bags, raw) if pool else None), raw.to(bags.x2d.dtype)
    contiguous = [t.contiguous() if t is not None else None for t in (bags.x2d, *weights)]
    seed = _library.dropout_seed(active_p > 0)
    if group_name:
        pooled, scores, _ = _sharded_forward_op(*contiguous, list(bags.bounds), bags.row_valid, active_p,
                                                _sharded.rank_seed(seed, group_name), group_name)
        return pooled, scores.to(bags.x2d.dtype)
    pooled, scores, _ = _forward_op(*contiguous, list(bags.bounds), bags.row_valid, active_p, seed, pool)
    return (pooled if pool else None), scores.to(bags.x2d.dtype)


def _combine_reference(pooled, scores, bags: Bags, group_name: str):
    """The whole bags' pool across the ranks from a shard's reference ``pooled: (B, K, L)`` and ``scores: (T, K)``."""
    work = scores.to(torch.promote_types(scores.dtype, torch.float32))
    lse = reference.segment_logsumexp(work, bags.bag_index(), bags.num_bags, bags.row_valid)
    return _sharded.combine_pools(pooled, None, lse, lse.shape[1], 0.0, group_name, OP_NAME)[0]


def gated_attention_pool(x, wa, ba, wb, bb, wc, bc=None, *, mask=None, cu_seqlens=None,
                         dropout_p: float = 0.0, training: bool = True, process_group=None):
    """Gated attention pooling of a bag (or bags) in one fused pass.

    Args:
        x: one bag ``(N, L)``; padded bags ``(B, N, L)`` with ``mask: (B, N)`` (nonzero = real
            instance); or packed bags ``(T, L)`` with ``cu_seqlens: (B + 1,)``.
        wa, wb: ``(D, L)``; ``ba, bb: (D,)`` or None; ``wb = None`` is the ungated form.
        wc: ``(K, D)``; ``bc: (K,)`` or None. K is the number of attention heads.
        dropout_p: dropout on both branches, active when ``training``.
        process_group: sequence parallelism (:mod:`milkernels.distributed`): ``x`` is this rank's shard of the
            bags (N may be 0; a packed bag needs a row on every rank), and ``pooled`` is the whole bags' pool,
            the same on every rank of the group.

    x and the weights share one dtype (float32, float16, bfloat16; float64 on the reference); under
    ``torch.autocast`` they are cast to the autocast dtype first.

    Returns:
        ``pooled``: ``(K, L)`` for one bag, else ``(B, K, L)``.
        ``scores``: the raw scores, ``(N, K)``, ``(B, N, K)`` or ``(T, K)`` (the shard's rows).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    x, wa, ba, wb, bb, wc, bc = autocast_inputs(x, wa, ba, wb, bb, wc, bc)
    features, hidden, heads = _check_weights(x, wa, ba, wb, bb, wc, bc)
    shard, group_name = _sharded.shard_call(OP_NAME, x, features, mask, cu_seqlens, process_group, hidden=hidden,
                                            heads=heads, gated=wb is not None)
    pooled, scores = _run(x, wa, ba, wb, bb, wc, bc, shard.bags, dropout_p, training, True, group_name)
    return shard.bags_to_caller(pooled), shard.rows_to_caller(scores)


def gated_attention_scores(x, wa, ba, wb, bb, wc, bc=None, *, dropout_p: float = 0.0, training: bool = True):
    """Raw gated attention scores ``(..., K)`` of instances ``x: (..., L)`` (no softmax, no pooling)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    x, wa, ba, wb, bb, wc, bc = autocast_inputs(x, wa, ba, wb, bb, wc, bc)
    features, _, _ = _check_weights(x, wa, ba, wb, bb, wc, bc)
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"x must end in the feature size L={features}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty bag: x has shape {tuple(x.shape)}")
    rows = x.reshape(-1, features)
    bags = pack_bags(rows, features)
    _, scores = _run(rows, wa, ba, wb, bb, wc, bc, bags, dropout_p, training, pool=False)
    return scores.reshape(*x.shape[:-1], scores.shape[-1])
