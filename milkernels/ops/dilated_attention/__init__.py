"""Dilated attention (LongNet: Prov-GigaPath's slide encoder, Lin-MIL's ablation): public function, checks,
custom ops, dispatch.

The semantics are in :mod:`.reference`; the fused kernels in :mod:`.triton`, behind the custom ops
``milkernels::dilated_attention_forward`` and ``..._backward``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ... import _backends, distributed
from .. import _library
from .._bags import FLOAT_DTYPES, autocast_inputs, check_float, check_same_device, pack_bags
from . import reference, sharded

OP_NAME = "dilated_attention"
MODES = ("torchscale", "exact")
MAX_HEAD_DIM = 256


def check_branches(segment_lengths, dilation_rates, mode: str) -> tuple[tuple, tuple]:
    """The branches as two tuples of ints; ValueError unless they are non-empty, of one length, every ``w``
    and ``r`` an int >= 1, and in exact mode each ``r`` divides its ``w``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lists = {}
    for name, values in dict(segment_lengths=segment_lengths, dilation_rates=dilation_rates).items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{name} must be a non-empty list or tuple of ints, got {values!r}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in values):
            raise ValueError(f"every entry of {name} must be an int >= 1, got {list(values)}")
        lists[name] = tuple(int(v) for v in values)
    segments, rates = lists["segment_lengths"], lists["dilation_rates"]
    if len(segments) != len(rates):
        raise ValueError(f"segment_lengths and dilation_rates must have one length, got {len(segments)} and "
                         f"{len(rates)}")
    for w, r in zip(segments, rates):
        if mode == "exact" and w % r:
            raise ValueError(f"exact mode needs each dilation rate to divide its segment length, got r={r} for "
                             f"w={w}")
    return segments, rates


def _check_inputs(q, k, v, mask, mode, softmax_scale):
    """Raise ValueError unless q, k, v are one float dtype, device and shape ``(B, N, H, dh)`` or ``(N | T, H,
    dh)`` with ``dh <= 256``, the mask fits the mode and the scale is a positive number."""
    for name, t in dict(q=q, k=k, v=v).items():
        check_float(name, t)
    check_same_device(q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k and v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, N, H, dh), or (N, H, dh) / packed (T, H, dh), got shape {tuple(q.shape)}")
    heads, head_dim = q.shape[-2:]
    if heads < 1 or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"need H >= 1 and 1 <= dh <= {MAX_HEAD_DIM}, got H={heads}, dh={head_dim}")
    if mask is not None and mode != "exact":
        raise ValueError("a key padding mask needs mode='exact': torchscale's DilatedAttention ignores it, so the "
                         "compatible mode cannot take one")
    if mask is not None and q.dim() != 4:
        raise ValueError(f"a mask needs padded bags q: (B, N, H, dh), got shape {tuple(q.shape)}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
                                      or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a finite number > 0 or None, got {softmax_scale!r}")


def _reasons(backend: str, q: torch.Tensor, bounds, segments, rates, mode) -> list[str]:
    if backend == "reference":
        return []
    reasons = _backends.kernel_reasons(backend, q)
    if backend == "cuda":
        return reasons + ["no cuda kernel for dilated attention (the triton one runs on CUDA tensors)"]
    from .triton import unsupported_branches, unsupported_shape

    return reasons + unsupported_shape(q.shape[-1], q.dtype, mode) + unsupported_branches(bounds, segments, rates, mode)


def _plan(q, bounds, segments, rates, mode, row_valid, branch_outputs=False):
    from . import triton as kernels

    return kernels.Plan(q, bounds, segments, rates, mode, row_valid, branch_outputs=branch_outputs)


@_library.custom_op("dilated_attention_forward")
def _forward_op(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], segments: list[int], rates: list[int],
                row_valid: Optional[Tensor], scale: float, mode: str,
                keep_branches: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The triton forward on contiguous packed rows ``q, k, v: (T, H, dh)`` with bag ``bounds`` (B + 1 ints):
    ``out: (T, H, dh)`` in q's dtype, ``lse: (T, H)`` float32 and, with ``keep_branches`` (torchscale mode, for
    the backward's atomic dq: :func:`.triton.keeps_branches`), each branch's output ``(T, slots, dh)`` (else
    ``(0,)``)."""
    from . import triton as kernels

    return kernels.forward(q, k, v, _plan(q, bounds, segments, rates, mode, row_valid), scale, keep_branches)


@_library.custom_op("dilated_attention_backward")
def _backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, branch_out: Tensor, d_out: Tensor,
                 bounds: list[int], segments: list[int], rates: list[int], row_valid: Optional[Tensor], scale: float,
                 mode: str) -> list[Tensor]:
    """``[dq, dk, dv]``, each ``(T, H, dh)`` in q's dtype, from the forward's ``out``, ``lse``, ``branch_out``
    and ``d_out``."""
    from . import triton as kernels

    plan = _plan(q, bounds, segments, rates, mode, row_valid, branch_outputs=branch_out.numel() > 0)
    return list(kernels.backward(q, k, v, out, lse, branch_out, d_out.contiguous(), plan, scale))


@_library.custom_op("dilated_attention_window_forward")
def _window_forward_op(q: Tensor, k: Tensor, v: Tensor, window: list[int], segments: list[int], rates: list[int],
                       row_valid: Optional[Tensor], scale: float, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """The triton forward of a sequence-parallel rank's queries on the rows ``q, k, v: (bags * rows, H, dh)`` of
    its window (:meth:`.sharded.Window.kernel_window`): ``out`` (q's dtype) and ``lse`` (float32), 0 and ``-inf``
    on the rows that are not its queries, and no branch outputs (``(0,)``: its backward keeps the query kernel)."""
    from . import triton as kernels

    out, lse, branch_out = kernels.forward(q, k, v, kernels.Plan(q, None, segments, rates, mode, row_valid, window),
                                           scale)
    return (sharded.cleared(out, window, *window[3:5], 0.0), sharded.cleared(lse, window, *window[3:5], -math.inf),
            branch_out)


@_library.custom_op("dilated_attention_window_backward")
def _window_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, branch_out: Tensor, d_out: Tensor,
                        window: list[int], segments: list[int], rates: list[int], row_valid: Optional[Tensor],
                        scale: float, mode: str) -> list[Tensor]:
    """``[dq, dk, dv]`` of :func:`_window_forward_op`, each ``(bags * rows, H, dh)`` in q's dtype: dq on the
    window's queries, dk and dv on the keys they reach, 0 elsewhere."""
    from . import triton as kernels

    plan = kernels.Plan(q, None, segments, rates, mode, row_valid, window)
    d_q, d_k, d_v = kernels.backward(q, k, v, out, lse, branch_out, d_out.contiguous(), plan, scale)
    return [sharded.cleared(d_q, window, *window[3:5], 0.0)] + [sharded.cleared(t, window, *window[5:7], 0.0)
                                                                 for t in (d_k, d_v)]


def _forward_fake(q, k, v, where, segments, rates, row_valid, scale, mode, keep_branches=False):
    from .triton import branch_slots

    rows, heads, head_dim = q.shape
    branch_out = q.new_empty((rows, branch_slots(heads, rates), head_dim) if keep_branches else (0,))
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32), branch_out


def _backward_fake(q, k, v, out, lse, branch_out, d_out, where, segments, rates, row_valid, scale, mode):
    return [torch.empty_like(q) for _ in range(3)]


def _setup_context(ctx, inputs, output):
    q, k, v, where, segments, rates, row_valid, scale, mode = inputs[:9]
    out, lse, branch_out = output
    ctx.save_for_backward(q, k, v, out, lse, branch_out, row_valid)
    ctx.options = (where, segments, rates, scale, mode)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, branch_out)


def _register(forward_op, backward_op) -> None:
    """Fakes and autograd of a forward op and its backward op (arguments: q, k, v, then where the rows are: the
    bags' ``bounds`` or a ``window``, then the branches, mask, scale and mode)."""

    def backward(ctx, d_out, d_lse, d_branch_out):
        q, k, v, out, lse, branch_out, row_valid = ctx.saved_tensors
        where, segments, rates, scale, mode = ctx.options
        d_q, d_k, d_v = backward_op(q, k, v, out, lse, branch_out, d_out, where, segments, rates, row_valid, scale,
                                    mode)
        return (d_q, d_k, d_v) + (None,) * (ctx.num_inputs - 3)

    forward_op.register_fake(_forward_fake)
    backward_op.register_fake(_backward_fake)
    forward_op.register_autograd(backward, setup_context=_setup_context)
    _library.forbid_double_backward(backward_op, OP_NAME)


_register(_forward_op, _backward_op)
_register(_window_forward_op, _window_backward_op)


def _bag_flops(length: int, heads: int, head_dim: int, segments, rates, mode: str) -> int:
    """The reference's forward matmuls on one bag of ``length`` rows: scores and weighted values, 2 dh each per
    (query, key, head) pair it forms. Exact mode forms every pair (then masks); torchscale forms, per branch,
    segment and head, the ``Lsp^2`` pairs of the kept rows, padding rows included."""
    if mode == "exact":
        return 4 * heads * length * length * head_dim
    flops = 0
    for segment, rate in zip(segments, rates):
        span = min(segment, length)
        kept_rows, num_segments = -(-span // rate), -(-length // span)
        flops += 4 * num_segments * heads * kept_rows * kept_rows * head_dim
    return flops


def _forward_matmul_flops(q, bounds, segments, rates, mode) -> int:
    """:func:`_bag_flops` summed over the bags of ``bounds`` for ``q: (T, H, dh)``."""
    _, heads, head_dim = q
    return sum(_bag_flops(stop - start, heads, head_dim, segments, rates, mode)
               for start, stop in zip(bounds[:-1], bounds[1:]))


@_library.flop_formula("dilated_attention_forward")
def _forward_flops(q, k, v, bounds, segments, rates, row_valid, scale, mode, keep_branches=False):
    """The reference's score and value products over every bag (see :func:`_bag_flops`)."""
    return _forward_matmul_flops(q, bounds, segments, rates, mode)


@_library.flop_formula("dilated_attention_backward")
def _backward_flops(q, k, v, out, lse, branch_out, d_out, bounds, segments, rates, row_valid, scale, mode):
    """Twice the forward: both gradients of each of the reference's two products.

    Counts gradients for q, k and v, which the op always computes; where only some take one, the reference
    skips some of these products, which these arguments cannot tell.
    """
    return 2 * _forward_matmul_flops(q, bounds, segments, rates, mode)


def _window_matmul_flops(q, window, segments, rates, mode) -> int:
    """What the reference path of the same call computes: every position of the window's ``bags`` bags of N
    (:func:`.sharded.attend`), so the counts do not depend on the backend."""
    bags, length = window[:2]
    return _forward_matmul_flops(q, [bag * length for bag in range(bags + 1)], segments, rates, mode)


@_library.flop_formula("dilated_attention_window_forward")
def _window_forward_flops(q, k, v, window, segments, rates, row_valid, scale, mode):
    """The reference's score and value products over the whole bags (:func:`_window_matmul_flops`)."""
    return _window_matmul_flops(q, window, segments, rates, mode)


@_library.flop_formula("dilated_attention_window_backward")
def _window_backward_flops(q, k, v, out, lse, branch_out, d_out, window, segments, rates, row_valid, scale, mode):
    """Twice the forward's, as the single-process op's."""
    return 2 * _window_matmul_flops(q, window, segments, rates, mode)


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, mode: str = "torchscale", softmax_scale=None,
                      mask=None, cu_seqlens=None, return_lse: bool = False, process_group=None):
    """LongNet dilated attention of ``q, k, v`` over the branches ``zip(segment_lengths, dilation_rates)``.

    Args:
        q, k, v: padded bags ``(B, N, H, dh)`` (with an optional key padding ``mask: (B, N)``, nonzero =
            real, exact mode only), one bag ``(N, H, dh)``, or packed bags ``(T, H, dh)`` with
            ``cu_seqlens: (B + 1,)`` (each bag its own sequence). ``dh`` up to 256, any value.
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``, ints >= 1, one list each.
        mode: ``"torchscale"``: torchscale's ``DilatedAttention`` exactly (padding not masked, branches
            merged with weights that take no gradient; :mod:`.reference`); ``"exact"``: softmax attention
            over the union of the branches' key sets, padding and mask left out, full gradient (each ``r_i``
            must divide its ``w_i``).
        softmax_scale: the score scale, ``dh ** -0.5`` by default.
        return_lse: also return the merged log-sum-exp ``(..., H)`` float32.
        process_group: sequence parallelism (:mod:`milkernels.distributed`, :mod:`.sharded`): ``q, k, v`` are this
            rank's contiguous shard ``(n, H, dh)`` or ``(B, n, H, dh)`` of bags of N positions, the ranks'
            shards in rank order (any sizes, an empty one included; packed bags are not taken); the result is
            this rank's rows of the whole bags'. Every branch must have ``r`` dividing ``min(w, N)`` or ``w >= N``
            (otherwise torchscale moves outputs between segments, and so between ranks).

    Returns:
        ``out`` in q's shape and dtype; with ``return_lse`` also ``lse: (B, N, H)``, ``(N, H)`` or
        ``(T, H)``, float32 (``-inf`` where no key is reached; ``out`` is 0 there).
    """
    segments, rates = check_branches(segment_lengths, dilation_rates, mode)
    _check_inputs(q, k, v, mask, mode, softmax_scale)
    q, k, v = autocast_inputs(q, k, v)
    heads, head_dim = q.shape[-2:]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    if process_group is not None:
        out, lse = _sharded_call(q, k, v, mask, cu_seqlens, segments, rates, scale, mode, process_group)
        return (out, lse) if return_lse else out
    bags = pack_bags(q.flatten(-2), heads * head_dim, mask, cu_seqlens)
    q2, k2, v2 = (t.reshape(-1, heads, head_dim) for t in (q, k, v))
    backend = _backends.choose(OP_NAME, q.device, lambda name: _reasons(name, q, bags.bounds, segments, rates, mode))
    if backend == "reference":
        out, lse = reference.dilated_attention(q2, k2, v2, bags.bounds, segments, rates, scale, mode, bags.row_valid)
    else:
        out, lse, _ = _forward_op(q2.contiguous(), k2.contiguous(), v2.contiguous(), list(bags.bounds),
                                  list(segments), list(rates), bags.row_valid, scale, mode,
                                  _keeps_branches((q2, k2, v2), bags.bounds, segments, rates, mode))
    out = bags.rows_to_caller(out).reshape(q.shape)
    return (out, bags.rows_to_caller(lse.float())) if return_lse else out


def _keeps_branches(inputs, bounds, segments, rates, mode) -> bool:
    """Whether the triton forward on ``inputs = (q, k, v)``, each ``(T, H, dh)``, keeps each branch's output: when a
    backward follows and it pays (:func:`.triton.keeps_branches`)."""
    from . import triton as kernels

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return grad and kernels.keeps_branches(inputs[0], bounds, segments, rates, mode)


def _sharded_call(q, k, v, mask, cu_seqlens, segments, rates, scale, mode, process_group):
    """:func:`dilated_attention` of this rank's shard of bags sharded over ``process_group``: ``(out, lse)``."""
    if cu_seqlens is not None:
        raise ValueError("a process_group takes one bag (n, H, dh) or padded bags (B, n, H, dh), not packed bags")
    name = distributed.group_name(process_group)
    group = distributed.resolve(name)
    padded = q if q.dim() == 4 else q[None]
    bags, rows, heads, head_dim = padded.shape
    if mask is not None:
        check_same_device(q=q, mask=mask)
        if tuple(mask.shape) != (bags, rows):
            raise ValueError(f"mask must have shape (B, n) = {(bags, rows)}, got {tuple(mask.shape)}")
    # the backward's exchange is a collective: every rank must take it, or none
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    distributed.check_same_sizes(group, OP_NAME, q.device, bags=bags, heads=heads, head_dim=head_dim,
                                 dtype=FLOAT_DTYPES.index(q.dtype), mode=MODES.index(mode), masked=mask is not None,
                                 grad=grad, scale=scale, branches=len(segments),
                                 **{f"w{i}": w for i, w in enumerate(segments)},
                                 **{f"r{i}": r for i, r in enumerate(rates)})
    bounds = sharded.shard_bounds(rows, group, q.device)
    length = bounds[-1]
    if bags == 0 or length == 0:  # every rank's shard is empty: nothing to exchange
        return q * 0, q.new_full(q.shape[:-1], -math.inf, dtype=torch.float32)
    shifted = [f"(w={w}, r={r})" for w, r in zip(segments, rates) if mode == "torchscale" and w < length and w % r]
    if shifted:
        raise ValueError(f"sequence-parallel dilated attention needs each r to divide its w or w >= N (N={length}), "
                         f"got {', '.join(shifted)}: torchscale moves such branches' outputs between segments")
    backend = _backends.choose(OP_NAME, q.device, lambda name: _reasons(name, q, [0, length], segments, rates, mode))
    padded_k, padded_v = (t if t.dim() == 4 else t[None] for t in (k, v))
    out, lse = sharded.attend(padded, padded_k, padded_v, mask, segments, rates, scale, mode, name, backend, bounds,
                              _window_forward_op)
    return (out, lse.float()) if q.dim() == 4 else (out[0], lse[0].float())
