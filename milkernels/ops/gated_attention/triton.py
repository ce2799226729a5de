"""Gated attention pooling in Triton: a two-pass forward, a combine and a fused backward.

Forward, pass one (``_score_kernel``), one program per block of rows of one bag (128 mostly, ``SCORE_TILES``): both projections on
the tensor cores in one pass over L (each x tile read once for a and b; D in steps of up to 128 columns), tanh/sigmoid
gating, dropout from a Philox seed and the K scores, written in fp32 (4K bytes a row). Nothing of size
N x D is written. Pass two (``_pool_kernel``), one program per (feature tile, split), a split being whole
blocks of one bag and the splits about TARGET_PROGRAMS programs in all: the split's softmax statistics
(max, sum of exp) from the stored scores, then the weighted sum of its x rows for the feature tile, into
fp32 partials ``(splits, K, L)`` that do not grow with N. :func:`milkernels.ops._combine.combine` merges
each bag's partials into ``pooled`` and the per-bag log-sum-exp.

Backward (``_backward_rows_kernel``), per block again: the softmax gradient from the saved scores
and log-sum-exp, the pooling part of dx, the recomputed projections and dropout masks, and the
gradients of the pre-activations ``dH = [dHa | dHb]`` for a bounded chunk of rows, plus per-block
partial dWc and dbc. The two dense products of the backward, ``dx += dH W`` and ``dW = dH^T x``,
run as GEMMs on that chunk; all reductions have a fixed order, so results are deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted
from .. import _blocks, _combine
from .._bags import Bags
from .._blocks import BlockTable, block_table, dot_flags

BACKWARD_SCRATCH_BYTES = 128 << 20  # dH (and an x copy for fp16) held at once in backward


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch settings: of the backward's row kernel, and the pooling kernel's feature tile."""

    block_n: int
    block_d: int
    block_l: int
    num_warps: int
    pool_block_l: int


def config_for(features: int, hidden: int) -> Config:
    """The shipped configuration for L = ``features`` and D = ``hidden`` (see ``shipped_specializations``)."""
    # The backward's row kernel is elementwise (its GEMMs run outside), but its dropout draws (Philox on 64-bit
    # counters) take many registers: 64-row tiles spilled 12-52 B with dropout on sm_90 (64 x 16 at 4 and 8
    # warps, 64 x 64 at 8), 32-row tiles at 4 warps do not.
    return Config(block_n=32, block_d=min(64, max(16, triton.next_power_of_2(hidden))),
                  block_l=min(64, max(16, triton.next_power_of_2(features))), num_warps=4,
                  pool_block_l=min(128, max(16, triton.next_power_of_2(features))))


@dataclass(frozen=True)
class ScoreTiles:
    """Tiles of the score kernel: rows, D columns (of a and of b each), the L step, warps."""

    block_n: int
    block_d: int
    block_l: int
    num_warps: int


SCORE_TILES = {  # (fp32 input, dropout) -> (rows, D columns, L step, warps), the largest with no sm_90 spill
    (False, False): (128, 128, 64, 8),  # a 128 x 256 GEMM tile: 85 dot FLOPs a requested byte (L 1024, D 256)
    (False, True): (128, 64, 32, 16),  # the Philox draws of 128 x 128 spill at 8 and 16 warps (2-3 KB)
    (True, False): (128, 64, 32, 8),  # fp32 operands (tf32x3): 128 x 128 spills (0.8-1.7 KB)
    (True, True): (64, 64, 16, 8),
}


def score_tiles(features: int, hidden: int, dtype, dropout: bool) -> ScoreTiles:
    """The score kernel's tiles for L = ``features``, D = ``hidden``, x's ``dtype`` and whether dropout is on."""
    block_n, block_d, block_l, num_warps = SCORE_TILES[(dtype == torch.float32, dropout)]
    return ScoreTiles(block_n, min(block_d, max(16, triton.next_power_of_2(hidden))),
                      min(block_l, max(16, triton.next_power_of_2(features))), num_warps)


POOL_BLOCK_N = 64  # rows a step of the pooling kernel
TARGET_PROGRAMS = 1024  # pooling programs a call, about 8 an SM on an H100
MIN_SPLIT_BLOCKS = 8  # 512 rows a split at least: its (K, L) fp32 partial is at most 1/64 of its rows' bytes
GRAD_MIN_SPLIT_BLOCKS = 4  # the backward's splits: 128 rows at least; their (K, D) partials are smaller still
COMBINE_BLOCK_L = 64


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dropout_keep(seed, rows, cols, hidden, p_drop):
    """Boolean keep mask (BLOCK_N, BLOCK_D) for element (row, col) of a T x D activation.

    The Philox counter is the 64-bit element index, so the pattern never repeats within a call.
    """
    offsets = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """acc + a @ b: fp32 operands (tf32x3 on a GPU) for fp32 input, else ``dtype`` on the tensor cores."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=FP32_PRECISION)
    return tl.dot(a.to(dtype), b.to(dtype), acc)


@triton.jit
def _project(x_ptr, wa_ptr, wb_ptr, rows64, row_ok, cols_d, d_ok, L, h_a, h_b,
             BLOCK_L: tl.constexpr, GATED: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``h_a (BLOCK_N, BLOCK_D) += x[rows, :] @ wa[cols_d, :]^T`` and, if GATED, the same of wb into ``h_b``,
    in one pass over L in BLOCK_L steps: each x tile is read once for both."""
    offs_l = tl.arange(0, BLOCK_L)
    w_rows = cols_d.to(tl.int64)[None, :] * L
    for l0 in range(0, L, BLOCK_L):
        cols_l = l0 + offs_l
        l_ok = cols_l < L
        x_tile = tl.load(x_ptr + rows64[:, None] * L + cols_l[None, :], mask=row_ok[:, None] & l_ok[None, :], other=0.0)
        w_mask = d_ok[None, :] & l_ok[:, None]
        wa_tile = tl.load(wa_ptr + w_rows + cols_l[:, None], mask=w_mask, other=0.0)
        h_a = _dot(x_tile, wa_tile, h_a, DOT_FP32, FP32_PRECISION, x_ptr.dtype.element_ty)
        if GATED:
            wb_tile = tl.load(wb_ptr + w_rows + cols_l[:, None], mask=w_mask, other=0.0)
            h_b = _dot(x_tile, wb_tile, h_b, DOT_FP32, FP32_PRECISION, x_ptr.dtype.element_ty)
    return h_a, h_b


@triton.jit
def _gates(x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, rows64, row_ok, d0, L, D, seed, p_drop, drop_scale,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
           GATED: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """For the D columns ``cols_d = d0 + arange(BLOCK_D)`` of the block: a and b after activation, and
    their dropout factors.

    Returns ``(cols_d, d_ok, a, b, keep_a, keep_b)``, the last four (BLOCK_N, BLOCK_D) fp32; keep_* is
    0 or 1/(1-p) (all 1 without dropout), and b is 1 when ungated.
    """
    cols_d = d0 + tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    zeros = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    h_a, h_b = _project(x_ptr, wa_ptr, wb_ptr, rows64, row_ok, cols_d, d_ok, L, zeros, zeros, BLOCK_L, GATED,
                        DOT_FP32, FP32_PRECISION)
    a = _tanh(h_a + tl.load(ba_ptr + cols_d, mask=d_ok, other=0.0).to(tl.float32)[None, :])
    if GATED:
        b = tl.sigmoid(h_b + tl.load(bb_ptr + cols_d, mask=d_ok, other=0.0).to(tl.float32)[None, :])
    else:
        b = zeros + 1.0
    keep_a = zeros + 1.0
    keep_b = zeros + 1.0
    if DROPOUT:
        keep_a = tl.where(_dropout_keep(seed, rows64, cols_d, D, p_drop), drop_scale, 0.0)
        if GATED:
            keep_b = tl.where(_dropout_keep(seed + 1, rows64, cols_d, D, p_drop), drop_scale, 0.0)
    return cols_d, d_ok, a, b, keep_a, keep_b


@triton.jit
def _block_rows(block_start_ptr, block_end_ptr, first_block, BLOCK_N: tl.constexpr):
    """This program's block (``first_block`` + program id), its rows (int64) and which of them exist."""
    block = first_block + tl.program_id(0)
    start = tl.load(block_start_ptr + block)
    end = tl.load(block_end_ptr + block)
    rows = start + tl.arange(0, BLOCK_N)
    return block, rows.to(tl.int64), rows < end


@triton.jit
def _row_valid(valid_ptr, rows64, row_ok, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return row_ok & (tl.load(valid_ptr + rows64, mask=row_ok, other=0) != 0)
    return row_ok


@triton.jit
def _score_kernel(
    x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, block_start_ptr, block_end_ptr, scores_ptr,
    L, D, seed, p_drop, drop_scale,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    GATED: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """The forward's first pass, per block of BLOCK_N rows: both projections (D in BLOCK_D steps, each x tile
    read once for a and b), gating, dropout and the K scores ``(BLOCK_N, K)``, written in fp32."""
    _, rows64, row_ok = _block_rows(block_start_ptr, block_end_ptr, 0, BLOCK_N)
    heads = tl.arange(0, K_PAD)
    scores = tl.zeros((BLOCK_N, K_PAD), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols_d, d_ok, a, b, keep_a, keep_b = _gates(
            x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, rows64, row_ok, d0, L, D, seed, p_drop, drop_scale,
            BLOCK_N, BLOCK_D, BLOCK_L, GATED, DROPOUT, DOT_FP32, FP32_PRECISION)
        gated = a * keep_a * b * keep_b
        for k in tl.static_range(K):
            wc_k = tl.load(wc_ptr + k * D + cols_d, mask=d_ok, other=0.0).to(tl.float32)
            score_k = tl.sum(gated * wc_k[None, :], axis=1)
            scores += tl.where(heads[None, :] == k, score_k[:, None], 0.0)
    scores += tl.load(bc_ptr + heads, mask=heads < K, other=0.0).to(tl.float32)[None, :]
    tl.store(scores_ptr + rows64[:, None] * K + heads[None, :], scores, mask=row_ok[:, None] & (heads[None, :] < K))


@triton.jit
def _split_block(r0, end, valid_ptr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block of a split's rows from ``r0`` (before ``end``): rows (int64), which exist, which are instances."""
    rows64 = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows64 < end
    return rows64, row_ok, _row_valid(valid_ptr, rows64, row_ok, HAS_MASK)


@triton.jit
def _split_scores(scores_ptr, rows64, valid, heads, K: tl.constexpr):
    """The ``(BLOCK_N, K_PAD)`` fp32 scores of a block, -inf where a row is no instance or a head is padding."""
    return tl.load(scores_ptr + rows64[:, None] * K + heads[None, :], mask=valid[:, None] & (heads[None, :] < K),
                   other=float("-inf"))


@triton.jit
def _split_softmax(scores_ptr, valid_ptr, start, end, heads,
                   K: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split's max and sum of ``exp(score - max)`` per head (``(K_PAD,)`` each; -inf and 0 without
    instances), in one pass over its scores."""
    run_max = tl.full(heads.shape, float("-inf"), tl.float32)
    run_sum = tl.zeros(heads.shape, tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        z = _split_scores(scores_ptr, rows64, valid, heads, K)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(z - safe_max[None, :]), axis=0)
        run_max = new_max
    return run_max, run_sum


@triton.jit
def _pool_kernel(
    x_ptr, valid_ptr, split_start_ptr, split_end_ptr, scores_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, L,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """The forward's second pass, per (feature tile, split of whole blocks of one bag), the feature tiles fastest on a
    1-D grid, so that those of a split run together and share its scores in L2 (and past 65535 splits): the split's
    softmax statistics from the stored scores, then ``acc = sum_n exp(score_n - max) x_n`` over its rows for the feature
    tile (x read once in all). Writes the split's fp32 partials ``(K, L)``, max and sum (the first feature tile writes
    these two)."""
    l_tiles = tl.cdiv(L, BLOCK_L)
    l_tile = tl.program_id(0) % l_tiles
    split = tl.program_id(0) // l_tiles
    start = tl.load(split_start_ptr + split)
    end = tl.load(split_end_ptr + split)
    heads = tl.arange(0, K_PAD)
    split_max, split_sum = _split_softmax(scores_ptr, valid_ptr, start, end, heads, K, HAS_MASK, BLOCK_N)
    safe_max = tl.where(split_max == float("-inf"), 0.0, split_max)
    cols_l = l_tile * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = cols_l < L
    acc = tl.zeros((K_PAD, BLOCK_L), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        weights = tl.exp(_split_scores(scores_ptr, rows64, valid, heads, K) - safe_max[None, :])
        x_tile = tl.load(x_ptr + rows64[:, None] * L + cols_l[None, :], mask=valid[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            weight_k = tl.sum(tl.where(heads[None, :] == k, weights, 0.0), axis=1)
            acc += tl.where(heads[:, None] == k, tl.sum(weight_k[:, None] * x_tile, axis=0)[None, :], 0.0)
    part = (split * K + heads).to(tl.int64)
    head_ok = heads < K
    tl.store(part_acc_ptr + part[:, None] * L + cols_l[None, :], acc, mask=head_ok[:, None] & l_ok[None, :])
    if l_tile == 0:
        tl.store(part_max_ptr + part, split_max, mask=head_ok)
        tl.store(part_sum_ptr + part, split_sum, mask=head_ok)


@triton.jit
def _score_grads(scores_ptr, d_scores_ptr, lse_ptr, delta_ptr, d_pooled_ptr, x_ptr, dx_ptr, bag, rows64, row_ok,
                 valid, heads, L,
                 K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_L: tl.constexpr, POOL: tl.constexpr,
                 HAS_DSCORES: tl.constexpr):
    """ds (BLOCK_N, K_PAD) = A * (x . dP - delta) + dS; writes the pooling part of dx, A dP."""
    rows_heads = rows64[:, None] * K + heads[None, :]
    head_ok = heads[None, :] < K
    d_s = tl.zeros((rows64.shape[0], K_PAD), tl.float32)
    if HAS_DSCORES:
        d_s += tl.load(d_scores_ptr + rows_heads, mask=row_ok[:, None] & head_ok, other=0.0).to(tl.float32)
    if POOL:
        scores = tl.load(scores_ptr + rows_heads, mask=row_ok[:, None] & head_ok, other=0.0)
        lse = tl.load(lse_ptr + bag * K + heads, mask=heads < K, other=0.0)
        attn = tl.where(valid[:, None] & head_ok, tl.exp(scores - lse[None, :]), 0.0)
        d_attn = tl.zeros((rows64.shape[0], K_PAD), tl.float32)
        offs_l = tl.arange(0, BLOCK_L)
        for l0 in range(0, L, BLOCK_L):
            cols_l = l0 + offs_l
            l_ok = cols_l < L
            x_tile = tl.load(x_ptr + rows64[:, None] * L + cols_l[None, :], mask=valid[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
            dx_tile = tl.zeros(x_tile.shape, tl.float32)
            for k in tl.static_range(K):
                d_pooled_k = tl.load(d_pooled_ptr + (bag * K + k).to(tl.int64) * L + cols_l, mask=l_ok, other=0.0).to(tl.float32)
                d_attn += tl.where(heads[None, :] == k, tl.sum(x_tile * d_pooled_k[None, :], axis=1)[:, None], 0.0)
                attn_k = tl.sum(tl.where(heads[None, :] == k, attn, 0.0), axis=1)
                dx_tile += attn_k[:, None] * d_pooled_k[None, :]
            tl.store(dx_ptr + rows64[:, None] * L + cols_l[None, :], dx_tile.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & l_ok[None, :])
        delta = tl.load(delta_ptr + bag * K + heads, mask=heads < K, other=0.0)
        # delta is NaN for a bag with no valid row (its pooled is 0/0); such rows have no softmax gradient
        d_s += tl.where(valid[:, None] & head_ok, attn * (d_attn - delta[None, :]), 0.0)
    return d_s


@triton.jit
def _gate_grads(h_rows, ba_ptr, bb_ptr, wc_ptr, part_dwc_rows, rows64, row_ok, d_s, heads, d0, D, seed, p_drop,
                drop_scale, K: tl.constexpr, BLOCK_D: tl.constexpr, GATED: tl.constexpr, DROPOUT: tl.constexpr):
    """For the D columns ``d0 + arange(BLOCK_D)`` of a block: a and b from the pre-activations ``H`` at
    ``h_rows`` (``[Ha | Hb]``, made by the caller's GEMM), their dropout, the gradients ``[dHa | dHb]``,
    written over ``H``, and this block's part of dWc, added to the split's partial at ``part_dwc_rows``.
    With no GEMM here, BLOCK_D is the elementwise tile."""
    cols_d = d0 + tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    h_tile = h_rows + cols_d[None, :]
    a = _tanh(tl.load(h_tile, mask=tile_ok, other=0.0).to(tl.float32)
              + tl.load(ba_ptr + cols_d, mask=d_ok, other=0.0).to(tl.float32)[None, :])
    keep_a = tl.where(_dropout_keep(seed, rows64, cols_d, D, p_drop), drop_scale, 0.0) if DROPOUT else 1.0
    a_kept = a * keep_a
    b_kept = 1.0
    if GATED:
        b = tl.sigmoid(tl.load(h_tile + D, mask=tile_ok, other=0.0).to(tl.float32)
                       + tl.load(bb_ptr + cols_d, mask=d_ok, other=0.0).to(tl.float32)[None, :])
        keep_b = tl.where(_dropout_keep(seed + 1, rows64, cols_d, D, p_drop), drop_scale, 0.0) if DROPOUT else 1.0
        b_kept = b * keep_b
    d_gated = tl.zeros(a.shape, tl.float32)
    for k in tl.static_range(K):
        d_s_k = tl.sum(tl.where(heads[None, :] == k, d_s, 0.0), axis=1)
        d_gated += d_s_k[:, None] * tl.load(wc_ptr + k * D + cols_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        dwc_k = part_dwc_rows + k * D + cols_d
        tl.store(dwc_k, tl.load(dwc_k, mask=d_ok) + tl.sum(d_s_k[:, None] * a_kept * b_kept, axis=0), mask=d_ok)
    tl.debug_barrier()  # the next block's read of the partial sees this store, whichever thread made it
    tl.store(h_tile, (d_gated * b_kept * keep_a * (1.0 - a * a)).to(h_rows.dtype.element_ty), mask=tile_ok)
    if GATED:
        tl.store(h_tile + D, (d_gated * a_kept * keep_b * b * (1.0 - b)).to(h_rows.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_rows_kernel(
    x_ptr, h_ptr, ba_ptr, bb_ptr, wc_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr,
    scores_ptr, d_scores_ptr, lse_ptr, delta_ptr, d_pooled_ptr, dx_ptr, part_dwc_ptr, part_dbc_ptr,
    chunk_row0, chunk_split0, L, D, seed, p_drop, drop_scale,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    GATED: tl.constexpr, DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr, POOL: tl.constexpr,
    HAS_DSCORES: tl.constexpr,
):
    """Per split of the chunk (whole blocks of one bag, looped over): ds, the pooling part of dx, and from the
    chunk's pre-activations ``H`` (rows relative to ``chunk_row0``) the gradients ``dH``, written over them;
    the split's fp32 partials of dWc ``(K, D)`` and dbc ``(K,)``. No product with the weights: the caller's
    GEMMs make ``H`` and apply ``dH``."""
    split = chunk_split0 + tl.program_id(0)
    start = tl.load(split_start_ptr + split)
    end = tl.load(split_end_ptr + split)
    bag = tl.load(split_bag_ptr + split)
    heads = tl.arange(0, K_PAD)
    dh_width = 2 * D if GATED else D
    part_dwc_rows = part_dwc_ptr + split.to(tl.int64) * K * D  # zeros to start with
    d_bc = tl.zeros((K_PAD,), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        d_s = _score_grads(scores_ptr, d_scores_ptr, lse_ptr, delta_ptr, d_pooled_ptr, x_ptr, dx_ptr, bag, rows64,
                           row_ok, valid, heads, L, K, K_PAD, BLOCK_L, POOL, HAS_DSCORES)
        d_s = tl.where(row_ok[:, None], d_s, 0.0)
        d_bc += tl.sum(d_s, axis=0)
        h_rows = h_ptr + (rows64 - chunk_row0)[:, None] * dh_width
        for d0 in range(0, D, BLOCK_D):
            _gate_grads(h_rows, ba_ptr, bb_ptr, wc_ptr, part_dwc_rows, rows64, row_ok, d_s, heads, d0, D, seed,
                        p_drop, drop_scale, K, BLOCK_D, GATED, DROPOUT)
    tl.store(part_dbc_ptr + split * K + heads, d_bc, mask=heads < K)


@triton.jit
def _dropout_mask_kernel(keep_ptr, seed, T, D, p_drop, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """keep[t, d] (int8) of the forward's dropout for seed ``seed``: for tests and debugging."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = _dropout_keep(seed, rows.to(tl.int64), cols, D, p_drop)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(keep_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], keep.to(tl.int8), mask=mask)


@dataclass(frozen=True)
class Plan:
    """What one call launches: the tile configuration, the rows of the block tables (each built on first
    use: the score kernel's and the pooling splits in the forward, the backward's splits in the backward),
    the bag count and the dropout.

    It holds no input tensor, so keeping it on an autograd context keeps no activation alive.
    """

    cfg: Config
    score: ScoreTiles
    bounds: tuple
    split_rows: int
    grad_split_rows: int
    device: torch.device
    has_mask: bool
    dropout_p: float
    seed: int

    @staticmethod
    def make(bags: Bags, hidden: int, dropout_p: float, seed: int) -> "Plan":
        rows, features = bags.x2d.shape
        cfg = config_for(features, hidden)
        split = _blocks.split_rows(rows, triton.cdiv(features, cfg.pool_block_l), POOL_BLOCK_N, TARGET_PROGRAMS,
                                   MIN_SPLIT_BLOCKS)
        grad_split = _blocks.split_rows(rows, 1, cfg.block_n, TARGET_PROGRAMS, GRAD_MIN_SPLIT_BLOCKS)
        score = score_tiles(features, hidden, bags.x2d.dtype, dropout_p > 0)
        return Plan(cfg, score, bags.bounds, split, grad_split, bags.x2d.device, bags.row_valid is not None,
                    dropout_p, seed)

    @property
    def num_bags(self) -> int:
        return len(self.bounds) - 1

    @functools.cached_property
    def score_table(self) -> BlockTable:
        """The score kernel's blocks."""
        return block_table(self.bounds, self.score.block_n, self.device)

    @functools.cached_property
    def splits(self) -> BlockTable:
        """The pooling kernel's splits."""
        return block_table(self.bounds, self.split_rows, self.device)

    @functools.cached_property
    def grad_splits(self) -> BlockTable:
        """The backward's splits."""
        return block_table(self.bounds, self.grad_split_rows, self.device)

    def launch_args(self, x2d, hidden, gated, heads, score_kernel=False):
        """Keyword arguments of the score kernel or (by default) of the backward's row kernel."""
        cfg, score = self.cfg, self.score
        tiles = (dict(BLOCK_N=score.block_n, BLOCK_D=score.block_d, BLOCK_L=score.block_l, num_warps=score.num_warps,
                      **dot_flags(x2d.dtype, triton_interpreted())) if score_kernel else
                 dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_L=cfg.block_l, HAS_MASK=self.has_mask,
                      num_warps=cfg.num_warps))
        return dict(L=x2d.shape[1], D=hidden, seed=self.seed, p_drop=float(self.dropout_p),
                    drop_scale=1.0 / (1.0 - self.dropout_p), K=heads, K_PAD=triton.next_power_of_2(heads),
                    GATED=gated, DROPOUT=self.dropout_p > 0, **tiles)


def _or(tensor, placeholder):
    """``tensor``, or a placeholder pointer for a kernel argument that a constexpr flag leaves unread."""
    return tensor if tensor is not None else placeholder


def _bias(bias, weight):
    return bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def _gate_weights(wa, ba, wb, bb):
    """``(wa, ba, wb, bb)`` as the kernels take them: absent biases as zeros, an absent wb as wa."""
    return wa, _bias(ba, wa), wb if wb is not None else wa, _bias(bb, wa)


def forward(x2d, wa, ba, wb, bb, wc, bc, row_valid, plan: Plan, pool: bool):
    """Forward over packed rows ``x2d: (T, L)``; ``row_valid: (T,)`` bool, or None without a mask.

    Returns ``(pooled: (B, K, L) or None, scores: (T, K) fp32, lse: (B, K) fp32 or None)``; backward
    takes the fp32 scores and ``lse`` back, so the attention weights are recomputed exactly.
    """
    heads = wc.shape[0]
    scores = _blocks.new_buffer(x2d.shape[0], heads, dtype=torch.float32, device=x2d.device)
    _score_kernel[(plan.score_table.num_blocks,)](
        x2d, *_gate_weights(wa, ba, wb, bb), wc, _bias(bc, wc), plan.score_table.start, plan.score_table.end,
        scores, **plan.launch_args(x2d, wa.shape[0], wb is not None, heads, score_kernel=True))
    if not pool:
        return None, scores, None
    pooled, lse = _pool(x2d, row_valid, scores, plan)
    return pooled, scores, lse


def _pool(x2d, row_valid, scores, plan: Plan):
    """``(pooled: (B, K, L) x's dtype, lse: (B, K) fp32)`` of the stored ``scores: (T, K)``: the pooling
    kernel's fp32 partials (``(splits, K, L)``, a number of splits that does not grow with N), combined per
    bag in a fixed order."""
    features, heads, splits = x2d.shape[1], scores.shape[1], plan.splits
    part_acc = _blocks.new_buffer(splits.num_blocks, heads, features, dtype=torch.float32, device=x2d.device)
    part_max, part_sum = (_blocks.new_buffer(splits.num_blocks, heads, dtype=torch.float32, device=x2d.device)
                          for _ in range(2))
    _pool_kernel[(triton.cdiv(features, plan.cfg.pool_block_l) * splits.num_blocks,)](
        x2d, _or(row_valid, x2d), splits.start, splits.end, scores, part_acc, part_max, part_sum, features,
        K=heads, K_PAD=triton.next_power_of_2(heads), BLOCK_N=POOL_BLOCK_N, BLOCK_L=plan.cfg.pool_block_l,
        HAS_MASK=plan.has_mask, num_warps=4)
    pooled, _, lse = _combine.combine(part_acc, part_max, part_sum, part_sum, splits.bag_first_block, plan.num_bags,
                                      x2d.dtype, heads, 0.0, COMBINE_BLOCK_L)
    return pooled, lse


def _chunks(table: BlockTable, chunk_rows: int):
    """Consecutive block ranges ``(first, stop, row0, row1)`` of at most ``chunk_rows`` rows each (one block at least)."""
    starts, ends = table.host_start.tolist(), table.host_end.tolist()
    first = 0
    while first < table.num_blocks:
        stop = first + 1
        while stop < table.num_blocks and ends[stop] - starts[first] <= chunk_rows:
            stop += 1
        yield first, stop, starts[first], ends[stop - 1]
        first = stop


def _gemm_dtype(x_dtype):
    """The dtype of dH and the backward GEMMs: bf16 for bf16 input (fp32's range), else fp32.

    fp16 would underflow: dH scales with the attention weights, about 1/N for a bag of N.
    """
    return torch.bfloat16 if x_dtype == torch.bfloat16 and not triton_interpreted() else torch.float32


def _chunk_rows(features, dh_width, x_dtype, gemm_dtype, block_n):
    """Rows per backward chunk: dH and a GEMM-dtype copy of x, if one is needed, within the scratch budget."""
    row_bytes = dh_width * gemm_dtype.itemsize + (features * gemm_dtype.itemsize if gemm_dtype != x_dtype else 0)
    return max(block_n, BACKWARD_SCRATCH_BYTES // row_bytes)


def backward(x2d, wa, ba, wb, bb, wc, bc, row_valid, scores, lse, pooled, plan: Plan, pool, d_pooled, d_scores,
             wanted):
    """Gradients ``(dx, dwa, dba, dwb, dbb, dwc, dbc)`` of the fused op; None where an input is absent or
    ``wanted`` (``ctx.needs_input_grad``) says no gradient is needed.

    ``scores: (T, K)`` fp32 and ``lse: (B, K)`` are the forward's; ``d_pooled: (B, K, L)`` and
    ``d_scores: (T, K)`` may be None. Per chunk of rows: ``H = x W^T`` (GEMM), the row kernel's ``dH`` written
    over it, then ``dx += dH W`` and ``dW += dH^T x`` (GEMMs).
    """
    hidden, heads = wa.shape[0], wc.shape[0]
    splits, device = plan.grad_splits, x2d.device
    pool = pool and d_pooled is not None
    gated = wb is not None
    dx = _blocks.new_buffer(*x2d.shape, dtype=x2d.dtype, device=device) if pool else torch.zeros_like(x2d)
    delta = (d_pooled.float() * pooled.float()).sum(-1) if pool else scores
    part_dwc = torch.zeros(splits.num_blocks, heads, hidden, dtype=torch.float32, device=device)
    part_dbc = _blocks.new_buffer(splits.num_blocks, heads, dtype=torch.float32, device=device)
    gemm_dtype = _gemm_dtype(x2d.dtype)
    w_stack = (torch.cat([wa, wb]) if gated else wa).to(gemm_dtype)
    d_w = torch.zeros(w_stack.shape, dtype=torch.float32, device=device)
    d_b = torch.zeros(w_stack.shape[0], dtype=torch.float32, device=device)
    chunk_rows = _chunk_rows(x2d.shape[1], w_stack.shape[0], x2d.dtype, gemm_dtype, plan.cfg.block_n)
    for first, stop, row0, row1 in _chunks(splits, chunk_rows):
        x_chunk = x2d[row0:row1].to(gemm_dtype)
        h = x_chunk @ w_stack.t()  # becomes dH
        _backward_rows_kernel[(stop - first,)](
            x2d, h, _bias(ba, wa), _bias(bb, wa), wc, _or(row_valid, x2d), splits.start, splits.end, splits.bag,
            scores, d_scores.contiguous() if d_scores is not None else scores, lse if pool else scores, delta,
            d_pooled.contiguous() if pool else scores, dx, part_dwc, part_dbc, row0, first,
            POOL=pool, HAS_DSCORES=d_scores is not None, **plan.launch_args(x2d, hidden, gated, heads),
        )
        if wanted[0]:
            dx[row0:row1] += (h @ w_stack).to(x2d.dtype)
        if any(wanted[1:5]):
            d_w += (h.t() @ x_chunk).float()
            d_b += h.float().sum(0)
    d_wa, d_wb = (d_w[:hidden], d_w[hidden:]) if gated else (d_w, None)
    d_ba, d_bb = (d_b[:hidden], d_b[hidden:]) if gated else (d_b, None)
    grads = (dx, d_wa, d_ba, d_wb, d_bb, part_dwc.sum(0), part_dbc.sum(0))
    inputs = (x2d, wa, ba, wb, bb, wc, bc)
    return tuple(g.to(ref.dtype) if ref is not None and want else None for g, ref, want in zip(grads, inputs, wanted))


def dropout_keep_masks(seed: int, rows: int, hidden: int, dropout_p: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The boolean keep masks ``(keep_a, keep_b)``, each ``(rows, hidden)``, that the kernels draw for ``seed``."""
    masks = []
    for branch_seed in (seed, seed + 1):
        keep = torch.empty(rows, hidden, dtype=torch.int8, device=device)
        grid = (triton.cdiv(rows, 64), triton.cdiv(hidden, 64))
        _dropout_mask_kernel[grid](keep, branch_seed, rows, hidden, float(dropout_p), BLOCK_N=64, BLOCK_D=64)
        masks.append(keep.bool())
    return tuple(masks)


_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_FLAG_SETS = ((1, True, True, True), (3, False, False, False), (2, True, False, True))  # K, gated, dropout, mask


def shipped_specializations():
    """Every kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, num_warps, aligned)`` built as the launches build them: the
    three dtypes, the tile configurations of ``config_for`` for small and large L and D, K in {1, 2, 3},
    with and without gating, dropout, a mask and (in the backward) pooling. ``aligned`` names the integer
    arguments that are multiples of 16 in such a launch (a launch specializes on those): L and D where the
    example sizes are, and the backward's chunk offsets, 0 in the one-chunk call.
    """
    for dtype, ptr in _POINTER_TYPES.items():
        for features, hidden in ((20, 10), (1024, 256), (384, 48)):
            cfg = config_for(features, hidden)
            aligned = tuple(name for name, size in (("L", features), ("D", hidden)) if size % 16 == 0)
            for heads, gated, dropout, has_mask in _FLAG_SETS:
                shared = dict(K=heads, K_PAD=triton.next_power_of_2(heads), GATED=gated, DROPOUT=dropout)
                valid = "*i1" if has_mask else ptr
                score = score_tiles(features, hidden, dtype, dropout)
                yield (_score_kernel, _score_signature(ptr), dict(shared, BLOCK_N=score.block_n, BLOCK_D=score.block_d,
                       BLOCK_L=score.block_l, **dot_flags(dtype, interpreted=False)), score.num_warps, aligned)
                yield (_pool_kernel, _pool_signature(ptr, valid),
                       dict(K=heads, K_PAD=shared["K_PAD"], BLOCK_N=POOL_BLOCK_N, BLOCK_L=cfg.pool_block_l,
                            HAS_MASK=has_mask), 4, tuple(name for name in aligned if name == "L"))
                tiles = dict(shared, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_L=cfg.block_l, HAS_MASK=has_mask)
                for pool in (True, False):
                    yield (_backward_rows_kernel, _backward_signature(ptr, valid, _POINTER_TYPES[_gemm_dtype(dtype)]),
                           dict(tiles, POOL=pool, HAS_DSCORES=True), cfg.num_warps,  # autograd materializes dS
                           aligned + ("chunk_row0", "chunk_split0"))
        yield _combine.specialization(ptr, COMBINE_BLOCK_L, features=1024)
    yield _dropout_mask_kernel, dict(keep_ptr="*i8", seed="i32", T="i32", D="i32", p_drop="fp32"), dict(BLOCK_N=64, BLOCK_D=64), 4


def _scalars():
    return dict(L="i32", D="i32", seed="i32", p_drop="fp32", drop_scale="fp32")


def _score_signature(ptr):
    tensors = dict.fromkeys(["x_ptr", "wa_ptr", "ba_ptr", "wb_ptr", "bb_ptr", "wc_ptr", "bc_ptr"], ptr)
    tensors.update(block_start_ptr="*i32", block_end_ptr="*i32", scores_ptr="*fp32")
    return dict(tensors, **_scalars())


def _pool_signature(ptr, valid):
    return dict(x_ptr=ptr, valid_ptr=valid, split_start_ptr="*i32", split_end_ptr="*i32", scores_ptr="*fp32",
                part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", L="i32")


def _backward_signature(ptr, valid, h):
    tensors = dict(x_ptr=ptr, h_ptr=h, ba_ptr=ptr, bb_ptr=ptr, wc_ptr=ptr, valid_ptr=valid, split_start_ptr="*i32",
                   split_end_ptr="*i32", split_bag_ptr="*i32", scores_ptr="*fp32", d_scores_ptr=ptr, lse_ptr="*fp32",
                   delta_ptr="*fp32", d_pooled_ptr=ptr, dx_ptr=ptr, part_dwc_ptr="*fp32", part_dbc_ptr="*fp32",
                   chunk_row0="i32", chunk_split0="i32")
    return dict(tensors, **_scalars())
