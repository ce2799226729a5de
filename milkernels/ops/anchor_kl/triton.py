"""anchor_kl in Triton, on the row-chunk machinery of :mod:`..nsf.triton`.

Forward, rows ``online, anchor: (R, N)``:

1. ``_kl_partials_kernel``, one pass over both inputs: per (row, chunk) the online max and sum of exp
   (relative to that max), the sum of ``w = sigmoid(anchor / T)`` and the sum of ``w * online``, over the
   valid entries;
2. fixed-order combines: the online log-sum-exp ``lse (R,)`` (partials rescaled to the row max), the
   anchor sums ``S (R,)`` and ``W = sum w * online``; then ``row_loss = sum p_anchor * (online - lse)
   = (W - lse * S) / (S + eps)`` and the total, a fixed-order sum too. The loss is ``-total / M``.

Backward, one elementwise pass (``_kl_grad_kernel``) from those row statistics, with
``coef = dL_out / M`` and ``P = S / (S + eps)`` (the row's total anchor weight):
``d_online = coef * (softmax(online) * P - p_anchor)`` and
``d_anchor = coef * sigmoid'(anchor / T) / T / (S + eps) * (row_loss - (online - lse))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _blocks
from ..nsf import triton as rows_kernels
from ..nsf.triton import EPS, load, program_rows, row_values, store_partials, tile, weights

COMBINE_BLOCK = rows_kernels.COMBINE_BLOCK


@triton.jit
def _exp_below(x, top):
    """exp(x - top), and 0 where top is -inf (nothing valid seen yet)."""
    empty = top == float("-inf")
    return tl.where(empty, 0.0, tl.exp(x - tl.where(empty, 0.0, top)))


@triton.jit
def _kl_partials_kernel(o_ptr, a_ptr, valid_ptr, part_max_ptr, part_exp_ptr, part_anchor_ptr, part_weighted_ptr,
                        inv_t, R, N, C, ITERS, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Per (row, chunk): online max, sum of exp(online - max), sum of w = sigmoid(anchor / T) and sum of
    w * online; valid entries only."""
    rows = program_rows(BLOCK_R)
    run_max = tl.full((BLOCK_R, BLOCK_N), float("-inf"), tl.float32)
    run_exp = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    anchor = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    weighted = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for i in range(ITERS):
        offsets, ok, valid = tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N, HAS_MASK)
        w = weights(a_ptr, offsets, ok, valid, inv_t)
        online = tl.where(valid, load(o_ptr, offsets, ok), float("-inf"))
        anchor += w
        weighted += tl.where(valid, w * online, 0.0)
        new_max = tl.maximum(run_max, online)
        run_exp = run_exp * _exp_below(run_max, new_max) + _exp_below(online, new_max)
        run_max = new_max
    chunk_max = tl.max(run_max, axis=1)
    store_partials(part_max_ptr, rows, R, C, chunk_max)
    store_partials(part_exp_ptr, rows, R, C, tl.sum(run_exp * _exp_below(run_max, chunk_max[:, None]), axis=1))
    store_partials(part_anchor_ptr, rows, R, C, tl.sum(anchor, axis=1))
    store_partials(part_weighted_ptr, rows, R, C, tl.sum(weighted, axis=1))


@triton.jit
def _row_lse_kernel(part_max_ptr, part_exp_ptr, lse_ptr, C, BLOCK: tl.constexpr):
    """``lse[row]`` from the chunk maxima and rescaled sums of exp of ``(R, C)`` partials; 0 for no valid entry."""
    base = tl.program_id(0).to(tl.int64) * C
    offs = tl.arange(0, BLOCK)
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK):
        run_max = tl.maximum(run_max, tl.load(part_max_ptr + base + c0 + offs, mask=c0 + offs < C, other=float("-inf")))
    row_max = tl.max(run_max, axis=0)
    total = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, C, BLOCK):
        chunk_max = tl.load(part_max_ptr + base + c0 + offs, mask=c0 + offs < C, other=float("-inf"))
        total += _exp_below(chunk_max, row_max) * tl.load(part_exp_ptr + base + c0 + offs, mask=c0 + offs < C, other=0.0)
    row_sum = tl.sum(total, axis=0)
    tl.store(lse_ptr + tl.program_id(0), tl.where(row_sum > 0, row_max + tl.log(tl.where(row_sum > 0, row_sum, 1.0)), 0.0))


@triton.jit
def _kl_grad_kernel(o_ptr, a_ptr, valid_ptr, lse_ptr, row_anchor_ptr, row_loss_ptr, coef_ptr, d_o_ptr, d_a_ptr,
                    inv_t, R, N, ITERS,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                    NEED_ONLINE: tl.constexpr, NEED_ANCHOR: tl.constexpr):
    """``d_online`` and/or ``d_anchor`` (see the module doc); 0 on masked entries."""
    rows = program_rows(BLOCK_R)
    coef = tl.load(coef_ptr)
    row_anchor = row_values(row_anchor_ptr, rows, R)
    scale = 1.0 / (row_anchor + EPS)
    lse = row_values(lse_ptr, rows, R)
    row_loss = row_values(row_loss_ptr, rows, R)
    for i in range(ITERS):
        offsets, ok, valid = tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N, HAS_MASK)
        w = weights(a_ptr, offsets, ok, valid, inv_t)
        log_p = load(o_ptr, offsets, ok) - lse
        if NEED_ONLINE:
            d_o = tl.where(valid, coef * (tl.exp(log_p) * (row_anchor * scale) - w * scale), 0.0)
            tl.store(d_o_ptr + offsets, d_o.to(d_o_ptr.dtype.element_ty), mask=ok)
        if NEED_ANCHOR:
            d_a = tl.where(valid, coef * w * (1.0 - w) * (inv_t * scale) * (row_loss - log_p), 0.0)
            tl.store(d_a_ptr + offsets, d_a.to(d_a_ptr.dtype.element_ty), mask=ok)


def _row_lse(part_max: torch.Tensor, part_exp: torch.Tensor) -> torch.Tensor:
    lse = _blocks.new_buffer(part_max.shape[0], dtype=torch.float32, device=part_max.device)
    _row_lse_kernel[(part_max.shape[0],)](part_max, part_exp, lse, part_max.shape[1], BLOCK=COMBINE_BLOCK)
    return lse


def forward(online: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor | None, inv_t: float):
    """The summed loss terms of contiguous rows ``online, anchor: (R, N)``; ``valid: (R, N)`` bool or None.

    Returns ``(total: (1,) fp32, stats)``: ``total = sum over valid entries of p_anchor * log_softmax(online)``
    and ``stats = (lse, row_anchor, row_loss)``, each ``(R,)`` fp32, for :func:`backward`.
    """
    plan = rows_kernels.Plan.make(*online.shape)
    mask = valid if valid is not None else online
    partials = [rows_kernels.new_partials(plan, online.device) for _ in range(4)]
    _kl_partials_kernel[plan.grid](online, anchor, mask, *partials, inv_t, C=plan.chunks, **plan.launch_args(valid))
    part_max, part_exp, part_anchor, part_weighted = partials
    lse, row_anchor = _row_lse(part_max, part_exp), rows_kernels.row_sums(part_anchor)
    row_loss = (rows_kernels.row_sums(part_weighted) - lse * row_anchor) / (row_anchor + EPS.value)
    return rows_kernels.row_sums(row_loss[None]), (lse, row_anchor, row_loss)


def backward(online, anchor, valid, stats, coef: torch.Tensor, inv_t: float, need_online: bool, need_anchor: bool):
    """``(d_online, d_anchor)``, each ``(R, N)`` in the input dtype or None when not needed.

    ``stats`` are :func:`forward`'s; ``coef: (1,)`` fp32 is the loss gradient divided by M.
    """
    plan = rows_kernels.Plan.make(*online.shape)
    mask = valid if valid is not None else online
    grads = [_blocks.new_buffer(*online.shape, dtype=online.dtype, device=online.device) if need else None
             for need in (need_online, need_anchor)]
    d_online, d_anchor = (g if g is not None else online for g in grads)
    _kl_grad_kernel[plan.grid](online, anchor, mask, *stats, coef, d_online, d_anchor, inv_t,
                               NEED_ONLINE=need_online, NEED_ANCHOR=need_anchor, **plan.launch_args(valid))
    return tuple(grads)


GRAD_FLAGS = ((True, False), (True, True), (False, True))  # (NEED_ONLINE, NEED_ANCHOR)


def shipped_specializations():
    """Every anchor_kl kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, num_warps)``: the three dtypes, every tile, with and without a
    mask, and each combination of wanted gradients.
    """
    specializations = rows_kernels.row_specializations
    yield (_row_lse_kernel, dict(part_max_ptr="*fp32", part_exp_ptr="*fp32", lse_ptr="*fp32", C="i32"),
           dict(BLOCK=COMBINE_BLOCK), rows_kernels.NUM_WARPS)
    yield from specializations(_kl_partials_kernel, ["o_ptr", "a_ptr"],
                               ["part_max_ptr", "part_exp_ptr", "part_anchor_ptr", "part_weighted_ptr"])
    for need_online, need_anchor in GRAD_FLAGS:
        yield from specializations(_kl_grad_kernel, ["o_ptr", "a_ptr", "d_o_ptr", "d_a_ptr"],
                                   ["lse_ptr", "row_anchor_ptr", "row_loss_ptr", "coef_ptr"],
                                   NEED_ONLINE=need_online, NEED_ANCHOR=need_anchor)
