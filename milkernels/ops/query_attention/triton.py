"""Learnable-query attention in Triton, folded form: a split-N forward, a combine and a three-kernel backward.

Forward, flash-decoding style, over splits (runs of a bag's rows). In fp16/bf16, when every pooled column lies
in the first column tile and whole rows fit (:func:`forward_tiles`: up to 64 columns over 512 features),
``_one_pass_kernel`` (one program per split) loads u once and reads each block of whole rows once, for its
scores ``z = x u^T + c`` on the tensor cores (written to ``z``, which the op returns and the backward reads)
and its pooling ``acc = p^T x``, rescaled as the running max grows; without dropout it also scores a second,
score-only tile from the same rows (an ``anchor``'s columns, ASMIL's EMA anchor, or the call's columns past
the first tile); other score-only tiles go to the score kernel. Otherwise two passes: ``_score_kernel``, one
program per (tile of BLOCK_J columns, split): for each block of BLOCK_N rows, ``z`` over all Ein in BLOCK_K
steps, once, and for the pooled columns the split's running max, sum of weights (softmax; NSF columns have no
max) and sum of weights after dropout (from a Philox seed); ``_pool_kernel``, one program per (tile of BLOCK_E
features, pooled column tile, split): the weights again from ``z`` and the split's max (no score recomputed)
and ``acc`` for its feature tile. All write fp32 partials per split; :func:`milkernels.ops._combine.combine`
merges each bag's splits into ``pooled``, ``mass`` (the sum of the weights) and the per-column log-normalizer
``lse``. Score-only columns (from ``num_pooled`` on) are only scored.

Backward: after the one-pass forward, with every column in one column tile, ``_one_pass_grad_kernel`` (per
split, u and dP loaded once, interleaved) reads each block of whole rows once for the scores (recomputed, in
one product with ``x . dP``), the score gradients ``ds`` (the normalization's Jacobian applied to
``dp = keep (x . dP + d_mass)``, plus ``dz``) and the split's partials of ``du = ds^T x`` and ``dc``, storing
``ds`` and the dropped weights ``pk`` (in x's dtype) only for dx.
Elsewhere ``_score_grad_kernel`` (per block of rows and column tile) forms ``ds`` and ``pk`` and
``_weight_grad_kernel`` (per split; over whole rows where the one-pass forward runs, and there both column
tiles in one program where the second is score-only) the partials of ``du`` and ``dc``. ``_dx_kernel`` (per
block of rows and feature tile) writes ``dx = pk dP + ds u``, or, where two column tiles at most hold the
columns, the first every pooled one, ``_dx_split_kernel`` (per split, u and dP loaded once). The partials
are summed per bag in a fixed order: everything is deterministic.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted
from .. import _blocks, _combine
from .._bags import Bags, bags_in_op
from .._blocks import BlockTable, block_table, dot_flags
from ..gated_attention.triton import _dot, _dropout_keep, _dropout_mask_kernel, _row_valid, _split_block
from .reference import NSF_EPS

BLOCK_N = 64
TARGET_PROGRAMS = 1024  # forward and weight-gradient programs per call, about 8 per SM on an H100
MIN_SPLIT_BLOCKS = 8  # 512 rows a split at least
# and at least 12 rows a pooled column: a split's fp32 (P, Ein) partial and its read of u are then at most 1/4 of its
# x bytes in bf16 (768 rows at ASMIL's P = 64, where 512 left the one-pass kernel at 79 dot FLOPs a byte)
SPLIT_ROWS_PER_COLUMN = 12
# feature tile of the per-split dx and weight gradients over two column tiles after one pass: at 512, the dx with
# the score-only tile's u too took 248 KiB of shared memory
SCORE_TILE_FEATURES = 256
# rows a step of the score kernel on score-only tiles, which holds u and steps whole rows: 48-64 registers and 136 KiB
# of shared memory on sm_90 at 512 features (272 KiB at 64 rows)
SCORE_ONLY_ROWS = 32
SCORE_ONLY_FEATURES = 512  # most features of those whole rows, as the one-pass forward's at 64 columns
TWO_PASS_DX_ROWS = 32  # rows a step of the per-split dx after two passes: at 64 (J = 64), fp32 spilled 308-608 B
TWO_PASS_DX_WARPS = 8  # its warps, as the one-pass kernels' (80-205 registers in fp32 on sm_90)
TWO_PASS_SCORE_TILE_FEATURES = 64  # its feature tile with a score-only tile: at 128, fp32 took 248 KiB of shared
# rows a step of the one-pass backward: its x tile multiplies the interleaved u and dP, which on 64 rows (a wgmma
# operand) failed to compile for sm_90 at 16 columns x 32 features ("Illegal shared layout"); on the forward's steps
# the former two products spilled 24-72 B
GRAD_ROWS = 16
COMBINE_BLOCK_E = 64  # features a combine program merges: at 128, a feature count not a multiple of 16 spilled 40 B
GRID_SPLITS = 65532  # splits a pooling launch takes on grid axis 2 (CUDA's 65535 at most; a multiple of 4, so that
# each chunk's int32 table and fp32 partials start 16 bytes aligned, as the first chunk's, and share its compile)


@dataclass(frozen=True)
class Config:
    """Tile sizes: columns per program, the Ein step of the score product and the feature tile pooled."""

    block_j: int
    block_k: int
    block_e: int
    num_warps: int


def _padded(size: int) -> int:
    """``size`` padded to a power of two of at least 16 (the smallest tile)."""
    return max(16, triton.next_power_of_2(size))


def config_for(columns: int, features: int) -> Config:
    """The shipped configuration for J = ``columns`` and Ein = ``features``."""
    block_j = min(64, _padded(columns))
    block_k = min(64, _padded(features))
    block_e = min(128, _padded(features))
    # 8 warps from 32 columns x 64-wide Ein steps, 64 x 32 and 16 x 128-feature tiles on: at 4, the score-gradient
    # kernel spilled 68-476 B on sm_90 at 32 columns, and at 16 x 128 the two-pass kernels 4-580 B in fp32 and the
    # pooling kernel with dropout 8 B in fp16/bf16
    return Config(block_j, block_k, block_e, num_warps=8 if 2 * block_j * max(block_e, block_k) >= 32 * 128 else 4)


# where the one-pass forward holds whole rows: (column tile, most features, rows a step), the first that fits; on
# sm_90, 16 columns over 512 features spill at 32 rows, 64 columns over 64 features with dropout at 64 rows, and
# 32 columns over 64 features at 32 rows when Ein is not a multiple of 16 (4 B)
ONE_PASS_TILES = ((16, 256, 64), (32, 128, 64), (32, 512, 32), (64, 512, 32))
ONE_PASS_WARPS = 8  # its warps: at 4, 256 features with dropout take 255 registers; at 16, 64 x 512 spills
ONE_PASS_DTYPES = (torch.float16, torch.bfloat16)  # fp32's tf32x3 products spill there, even at 16 rows
# pipeline stages of the one-pass backward: at Triton's default of 3, 32 columns x 256 features spilled 56 B on sm_90
ONE_PASS_GRAD_STAGES = 2
# columns x features up to which the one-pass backward runs on 4 warps: on 8, 32 x 256 spilled 8 B (at 128 registers)
SMALL_GRAD_TILE = 8192


@dataclass(frozen=True)
class ForwardTiles:
    """The forward's row steps and tiles: rows and Ein step of the score kernel, rows and feature tile of the
    pooling kernel; ``one_pass``: the first column tile in :func:`_one_pass_kernel` (its rows
    ``pool_block_n``, its feature tile ``pool_block_e``, all of Ein), the score kernel only for the
    score-only column tiles past it; ``scores_only``: no pooled column, the score kernel on the score-only
    tiles."""

    score_block_n: int
    score_block_k: int
    pool_block_n: int
    pool_block_e: int
    one_pass: bool = False
    scores_only: bool = False


def forward_tiles(cfg: Config, num_pooled: int, features: int, dtype, dropout: bool) -> ForwardTiles:
    """The forward's tiles. In :data:`ONE_PASS_DTYPES`, when the first column tile holds all ``num_pooled``
    pooled columns (at least one) and :data:`ONE_PASS_TILES` lets it hold whole rows (LiteMIL's 4 heads over
    256 features, ASMIL's 64 columns over 512, with or without the anchor's 64 score-only columns), one pass
    over blocks of whole rows, on :data:`ONE_PASS_WARPS` warps. The score kernel's tiles: at 64 columns in
    fp16/bf16 128-row steps without dropout (u, as many bytes as 64 rows of x at J = 64, is read once per
    step; with dropout's draws 128 rows spilled 36 B on sm_90) and 16-wide Ein steps; the pooling kernel's
    there: 256 features (the fp32 scores are read once per feature tile) on 32-row steps, where wider ones
    spilled. Otherwise (or fp32, whose tf32x3 tiles spill at these sizes) both step 64 rows over the
    configuration's tiles. With no pooled column, from 33 columns on (64-column tiles) over up to
    :data:`SCORE_ONLY_FEATURES` in fp16/bf16 (ASMIL's anchor scored alone), the score kernel takes the
    score-only tiles that follow the one-pass forward."""
    padded_features = _padded(features)
    if dtype == torch.float32 or cfg.block_j < 64:
        two_pass = ForwardTiles(BLOCK_N, cfg.block_k, BLOCK_N, cfg.block_e)
    else:
        score_block_n, score_block_k = (BLOCK_N, cfg.block_k) if dropout else (128, 16)
        two_pass = ForwardTiles(score_block_n, score_block_k, 32, min(256, padded_features))
    if not num_pooled and dtype in ONE_PASS_DTYPES and cfg.block_j == 64 and padded_features <= SCORE_ONLY_FEATURES:
        return replace(two_pass, scores_only=True)
    for block_j, max_features, rows in ONE_PASS_TILES:
        fits = cfg.block_j == block_j and 0 < num_pooled <= block_j and padded_features <= max_features
        if dtype in ONE_PASS_DTYPES and fits:
            return ForwardTiles(two_pass.score_block_n, two_pass.score_block_k, rows, padded_features, one_pass=True)
    return two_pass


def score_kernel_tiles(tiles: ForwardTiles, features: int, dropout: bool) -> dict:
    """Constexprs of the score kernel. After the one-pass forward it scores only the score-only tiles past
    the first, and so where ``tiles.scores_only`` (``POOLED`` False: no statistics, no dropout draws, u read
    once a split and whole rows on :data:`SCORE_ONLY_ROWS`-row steps); else on the forward ``tiles``' steps,
    keeping the pooled columns' statistics."""
    if tiles.one_pass or tiles.scores_only:
        return dict(BLOCK_N=SCORE_ONLY_ROWS, BLOCK_K=_padded(features), POOLED=False, DROPOUT=False)
    return dict(BLOCK_N=tiles.score_block_n, BLOCK_K=tiles.score_block_k, POOLED=True, DROPOUT=dropout)


def dx_split_tiles(tiles: ForwardTiles, cfg: Config, columns: int, num_pooled: int) -> dict | None:
    """Constexprs and warps of the per-split dx kernel, which loads u and dP once a split, or None where dx
    runs per block: where two column tiles at most hold the ``columns``, the first every pooled one (the second
    score-only). After the one-pass forward, on its ``tiles``' whole rows (:data:`SCORE_TILE_FEATURES`-wide
    feature tiles with a second column tile); after two passes (fp32, or where whole rows do not fit, e.g.
    past 512 features), on :data:`TWO_PASS_DX_ROWS`-row steps over the configuration's feature tiles, or
    :data:`TWO_PASS_SCORE_TILE_FEATURES`-wide ones with a second tile (the per-block kernel spilled 496-712 B
    in fp32 at 32 and 64 columns on sm_90)."""
    if columns > 2 * cfg.block_j or num_pooled > cfg.block_j:
        return None
    if tiles.one_pass:
        return split_tiles(tiles, cfg, columns)
    score_tile = columns > cfg.block_j
    block_e = min(TWO_PASS_SCORE_TILE_FEATURES, cfg.block_e) if score_tile else cfg.block_e
    return dict(BLOCK_N=TWO_PASS_DX_ROWS, BLOCK_E=block_e, num_warps=TWO_PASS_DX_WARPS, SCORE_TILE=score_tile)


def score_grad_tiles(tiles: ForwardTiles, cfg: Config, columns: int, num_pooled: int, dropout: bool) -> dict:
    """Rows a block and Ein step of the score-gradient kernel: 128 rows over 32-wide steps at 64 columns without
    dropout after the one-pass forward, where the per-split dx leaves the row blocks to it alone (dP is read
    once per block; with dropout's draws 128 rows spilled 200 B on sm_90), else 64 rows over the
    configuration's steps (the per-block dx, which steps 64 rows, shares the block table)."""
    if cfg.block_j == 64 and not dropout and tiles.one_pass and dx_split_tiles(tiles, cfg, columns, num_pooled):
        return dict(BLOCK_N=2 * BLOCK_N, BLOCK_K=32)
    return dict(BLOCK_N=BLOCK_N, BLOCK_K=cfg.block_k)


def split_tiles(tiles: ForwardTiles, cfg: Config, columns: int) -> dict:
    """Rows a step, feature tile, warps and ``SCORE_TILE`` of the backward's per-split kernels (the weight
    gradients always, dx where :func:`dx_split_tiles` says so after one pass): the one-pass forward's whole
    rows where it runs, and where exactly two column tiles hold the ``columns`` (the second score-only: ASMIL's
    anchor), both in one program (``SCORE_TILE``) on :data:`SCORE_TILE_FEATURES`-wide feature tiles; else, for
    the weight gradients, 64-row steps over the configuration's feature tiles, a program per column tile."""
    if not tiles.one_pass:
        return dict(BLOCK_N=BLOCK_N, BLOCK_E=cfg.block_e, num_warps=cfg.num_warps, SCORE_TILE=False)
    score_tile = cfg.block_j < columns <= 2 * cfg.block_j
    block_e = min(SCORE_TILE_FEATURES, tiles.pool_block_e) if score_tile else tiles.pool_block_e
    return dict(BLOCK_N=tiles.pool_block_n, BLOCK_E=block_e, num_warps=ONE_PASS_WARPS, SCORE_TILE=score_tile)


@triton.jit
def _scores(x_ptr, u_ptr, rows64, row_ok, cols_j, j_ok, E, acc,
            BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc (BLOCK_N, BLOCK_J) + x[rows] @ u[cols_j]^T, Ein in BLOCK_K steps (rows not ok read as 0)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, E, BLOCK_K):
        cols_k = k0 + offs_k
        k_ok = cols_k < E
        x_tile = _load_rows(x_ptr, rows64, row_ok, cols_k, k_ok, E)
        u_tile = _load_rows_t(u_ptr, cols_j, j_ok, cols_k, k_ok, E)
        acc = _dot(x_tile, u_tile, acc, DOT_FP32, FP32_PRECISION, x_ptr.dtype.element_ty)
    return acc


@triton.jit
def _keep_factor(seed, rows64, cols_j, J, p_drop, drop_scale, DROPOUT: tl.constexpr):
    """(BLOCK_N, BLOCK_J) dropout factor of weight (row, column): 0 or 1/(1-p); 1 without dropout."""
    if DROPOUT:
        return tl.where(_dropout_keep(seed, rows64, cols_j, J, p_drop), drop_scale, 0.0)
    return tl.full((rows64.shape[0], cols_j.shape[0]), 1.0, tl.float32)


@triton.jit
def _split(split_start_ptr, split_end_ptr, split_bag_ptr, split):
    """Split ``split``'s first row, end row and bag."""
    return tl.load(split_start_ptr + split), tl.load(split_end_ptr + split), tl.load(split_bag_ptr + split)


@triton.jit
def _weights(z, valid, run_max, is_nsf):
    """``(BLOCK_N, BLOCK_J)`` weights of scores ``z`` against the running max: ``exp(z - max)`` for softmax
    columns (``max = -inf`` counts as 0), ``sigmoid(z)`` for NSF columns; 0 on rows not valid."""
    safe_max = tl.where(run_max == float("-inf"), 0.0, run_max)
    weights = tl.where(is_nsf[None, :], tl.sigmoid(z), tl.exp(z - safe_max[None, :]))
    return tl.where(valid[:, None], weights, 0.0)


@triton.jit
def _running_stats(z, valid, is_nsf, run_max, run_sum, run_mass, keep):
    """A block's scores ``z: (BLOCK_N, BLOCK_J)`` into a split's running max, sum of weights and sum of kept
    weights (``keep``: the dropout factor): ``(max, alpha, sum, mass, kept)``, ``alpha`` being the rescale of
    the earlier sums (1 for NSF columns, which have no max) and ``kept`` the block's kept weights against the
    new max."""
    block_max = tl.max(tl.where(valid[:, None], z, float("-inf")), axis=0)
    new_max = tl.where(is_nsf, 0.0, tl.maximum(run_max, block_max))
    alpha = tl.where(is_nsf | (new_max == float("-inf")), 1.0, tl.exp(run_max - new_max))
    weights = _weights(z, valid, new_max, is_nsf)
    kept = weights * keep
    return (new_max, alpha, run_sum * alpha + tl.sum(weights, axis=0), run_mass * alpha + tl.sum(kept, axis=0),
            kept)


@triton.jit
def _store_split_stats(part_max_ptr, part_sum_ptr, part_mass_ptr, split, cols_j, num_pooled, run_max, run_sum,
                       run_mass):
    """A split's max, sum of weights and sum of kept weights of its pooled columns among ``cols_j``; returns the
    partials' row indices ``(BLOCK_J,)``."""
    pool_ok = cols_j < num_pooled
    part = (split * num_pooled + cols_j).to(tl.int64)
    tl.store(part_max_ptr + part, run_max, mask=pool_ok)
    tl.store(part_sum_ptr + part, run_sum, mask=pool_ok)
    tl.store(part_mass_ptr + part, run_mass, mask=pool_ok)
    return part


@triton.jit
def _score_kernel(
    x_ptr, valid_ptr, u_ptr, c_ptr, split_start_ptr, split_end_ptr, split_bag_ptr,
    z_ptr, part_max_ptr, part_sum_ptr, part_mass_ptr,
    E, J, num_pooled, nsf_from, u_bag_stride, c_bag_stride, seed, p_drop, drop_scale, first_column,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, POOLED: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """The forward's first pass, per (column tile from ``first_column`` on, split), the tiles of a split in
    consecutive programs of a 1-D grid (axis 1 would stop at 65535 splits): ``z`` over all Ein, once,
    written for every row. With ``POOLED``, u is read per block in ``BLOCK_K`` steps and, for pooled columns,
    the split's max, sum of weights and sum of kept weights are kept; without, every tile is score-only, all
    of Ein fits in ``BLOCK_K``: u is loaded once and each block of whole rows read once."""
    column_tiles = tl.cdiv(J - first_column, BLOCK_J)
    j0 = first_column + tl.program_id(0) % column_tiles * BLOCK_J
    split = tl.program_id(0) // column_tiles
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr, split)
    cols_j = j0 + tl.arange(0, BLOCK_J)
    j_ok = cols_j < J
    is_nsf = cols_j >= nsf_from
    u_bag = u_ptr + bag.to(tl.int64) * u_bag_stride
    c = tl.load(c_ptr + bag * c_bag_stride + cols_j, mask=j_ok, other=0.0).to(tl.float32)
    run_max = tl.where(is_nsf, 0.0, float("-inf"))
    run_sum = tl.zeros((BLOCK_J,), tl.float32)
    run_mass = tl.zeros((BLOCK_J,), tl.float32)
    cols_k = tl.arange(0, BLOCK_K)
    if not POOLED:
        u_t = _load_rows_t(u_bag, cols_j, j_ok, cols_k, cols_k < E, E)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        z = tl.zeros((BLOCK_N, BLOCK_J), tl.float32)
        if POOLED:
            z = _scores(x_ptr, u_bag, rows64, valid, cols_j, j_ok, E, z, BLOCK_K, DOT_FP32, FP32_PRECISION)
        else:
            z = _dot(_load_rows(x_ptr, rows64, valid, cols_k, cols_k < E, E), u_t, z, DOT_FP32, FP32_PRECISION,
                     x_ptr.dtype.element_ty)
        z += c[None, :]
        _store_rows(z_ptr, rows64, row_ok, cols_j, j_ok, J, z)
        if POOLED:
            if j0 < num_pooled:
                run_max, _, run_sum, run_mass, _ = _running_stats(
                    z, valid, is_nsf, run_max, run_sum, run_mass,
                    _keep_factor(seed, rows64, cols_j, J, p_drop, drop_scale, DROPOUT))
    if POOLED:
        if j0 < num_pooled:
            _store_split_stats(part_max_ptr, part_sum_ptr, part_mass_ptr, split, cols_j, num_pooled, run_max,
                               run_sum, run_mass)


@triton.jit
def _pool_kernel(
    x_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, z_ptr, part_max_ptr, part_acc_ptr,
    E, J, num_pooled, nsf_from, seed, p_drop, drop_scale,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """The forward's second pass, per (feature tile, pooled column tile, split): the kept weights from the
    first pass's ``z`` and the split's max, pooled into ``acc = p^T x`` for the feature tile (no score is
    recomputed). The splits are on grid axis 2, which CUDA stops at 65535: :func:`forward` launches them in
    chunks of :data:`GRID_SPLITS`."""
    e_tile = tl.program_id(0)  # fastest: the feature tiles of a split run together and share its z in L2
    cols_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = tl.program_id(2)
    start, end, _ = _split(split_start_ptr, split_end_ptr, split_bag_ptr, split)
    pool_ok = cols_j < num_pooled
    is_nsf = cols_j >= nsf_from
    cols_e = e_tile * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    part = (split * num_pooled + cols_j).to(tl.int64)
    split_max = tl.load(part_max_ptr + part, mask=pool_ok, other=0.0)
    acc = tl.zeros((BLOCK_J, BLOCK_E), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        z = _load_rows(z_ptr, rows64, valid, cols_j, pool_ok, J)
        weights = _weights(z, valid, split_max, is_nsf) * _keep_factor(seed, rows64, cols_j, J, p_drop, drop_scale,
                                                                       DROPOUT)
        x_tile = _load_rows(x_ptr, rows64, valid, cols_e, e_ok, E)
        acc = _dot(tl.trans(weights), x_tile, acc, DOT_FP32, FP32_PRECISION, x_ptr.dtype.element_ty)
    _store_rows(part_acc_ptr, part, pool_ok, cols_e, e_ok, E, acc)


@triton.jit
def _one_pass_kernel(
    x_ptr, valid_ptr, u_ptr, c_ptr, split_start_ptr, split_end_ptr, split_bag_ptr,
    z_ptr, part_max_ptr, part_sum_ptr, part_mass_ptr, part_acc_ptr, second_u_ptr, second_c_ptr, second_z_ptr,
    E, J, num_pooled, nsf_from, u_bag_stride, c_bag_stride, second_columns, second_u_bag_stride,
    second_c_bag_stride, second_z_stride, seed, p_drop, drop_scale,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, SECOND: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """Both forward passes in one, per split, for the first column tile (it holds every pooled column) over
    whole rows: ``u`` is loaded once, each block of rows once for its scores ``z`` (written) and its pooling,
    and ``acc = p^T x`` is rescaled as the running max grows (online softmax). Writes what
    :func:`_score_kernel` and :func:`_pool_kernel` write for that tile. With ``SECOND``, the same blocks of
    rows also give the scores of a second, score-only tile of ``second_columns`` columns (``second_u``,
    ``second_c``), written to ``second_z`` (rows ``second_z_stride`` apart). That product is formed
    transposed, ``second_u x^T``, so that the second u stays in shared memory: held as ``x``'s right operand,
    it took the registers of a second ``u^T`` and spilled 860 B on sm_90."""
    split = tl.program_id(0)
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr, split)
    cols_j = tl.arange(0, BLOCK_J)
    j_ok = cols_j < J
    pool_ok = cols_j < num_pooled
    is_nsf = cols_j >= nsf_from
    cols_e = tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    u_bag = u_ptr + bag.to(tl.int64) * u_bag_stride
    u_t = _load_rows_t(u_bag, cols_j, j_ok, cols_e, e_ok, E)
    c = tl.load(c_ptr + bag * c_bag_stride + cols_j, mask=j_ok, other=0.0).to(tl.float32)
    run_max = tl.where(is_nsf, 0.0, float("-inf"))
    run_sum = tl.zeros((BLOCK_J,), tl.float32)
    run_mass = tl.zeros((BLOCK_J,), tl.float32)
    acc = tl.zeros((BLOCK_J, BLOCK_E), tl.float32)
    if SECOND:
        second_ok = cols_j < second_columns
        second_u = _load_rows(second_u_ptr + bag.to(tl.int64) * second_u_bag_stride, cols_j, second_ok, cols_e, e_ok,
                              E)
        second_c = tl.load(second_c_ptr + bag * second_c_bag_stride + cols_j, mask=second_ok, other=0.0)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        x_tile = _load_rows(x_ptr, rows64, valid, cols_e, e_ok, E)
        z = _dot(x_tile, u_t, tl.zeros((BLOCK_N, BLOCK_J), tl.float32), DOT_FP32, FP32_PRECISION,
                 x_ptr.dtype.element_ty) + c[None, :]
        _store_rows(z_ptr, rows64, row_ok, cols_j, j_ok, J, z)
        if SECOND:
            second_z_t = _dot(second_u, tl.trans(x_tile), tl.zeros((BLOCK_J, BLOCK_N), tl.float32), DOT_FP32,
                              FP32_PRECISION, x_ptr.dtype.element_ty) + second_c.to(tl.float32)[:, None]
            _store_rows_t(second_z_ptr, rows64, row_ok, cols_j, second_ok, second_z_stride, second_z_t)
        run_max, alpha, run_sum, run_mass, kept = _running_stats(
            z, valid, is_nsf, run_max, run_sum, run_mass,
            _keep_factor(seed, rows64, cols_j, J, p_drop, drop_scale, DROPOUT))
        acc = _dot(tl.trans(kept), x_tile, acc * alpha[:, None], DOT_FP32, FP32_PRECISION, x_ptr.dtype.element_ty)
    part = _store_split_stats(part_max_ptr, part_sum_ptr, part_mass_ptr, split, cols_j, num_pooled, run_max, run_sum,
                              run_mass)
    _store_rows(part_acc_ptr, part, pool_ok, cols_e, e_ok, E, acc)


@triton.jit
def _load_rows(ptr, rows, row_ok, cols, cols_ok, width):
    """``(len(rows), len(cols))`` entries of the row-major ``(*, width)`` matrix at ``ptr``; 0 where not ok."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], mask=row_ok[:, None] & cols_ok[None, :],
                   other=0.0)


@triton.jit
def _load_rows_t(ptr, rows, row_ok, cols, cols_ok, width):
    """The transpose of :func:`_load_rows`: ``(len(cols), len(rows))``, 0 where not ok."""
    return tl.load(ptr + rows.to(tl.int64)[None, :] * width + cols[:, None], mask=row_ok[None, :] & cols_ok[:, None],
                   other=0.0)


@triton.jit
def _store_rows(ptr, rows64, row_ok, cols, cols_ok, width, value):
    """``value: (len(rows64), len(cols))`` into the row-major ``(*, width)`` matrix at ``ptr``, where both are ok."""
    tl.store(ptr + rows64[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & cols_ok[None, :])


@triton.jit
def _store_rows_t(ptr, rows64, row_ok, cols, cols_ok, width, value_t):
    """The transpose of :func:`_store_rows`: ``value_t: (len(cols), len(rows64))``."""
    tl.store(ptr + rows64[None, :] * width + cols[:, None], value_t, mask=row_ok[None, :] & cols_ok[:, None])


@triton.jit
def _block(block_start_ptr, block_end_ptr, block_bag_ptr, valid_ptr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's block of rows: ``(rows64, row_ok, valid, bag)``."""
    block = tl.program_id(0)
    start = tl.load(block_start_ptr + block)
    rows = start + tl.arange(0, BLOCK_N)
    row_ok = rows < tl.load(block_end_ptr + block)
    rows64 = rows.to(tl.int64)
    return rows64, row_ok, _row_valid(valid_ptr, rows64, row_ok, HAS_MASK), tl.load(block_bag_ptr + block)


@triton.jit
def _add_score_grads(d_s, z, lse, delta, d_p, keep, tile, is_nsf):
    """``(d_s + the score gradients, the dropped weights)`` of a block's pooled columns, ``(BLOCK_N, BLOCK_J)``
    each: the normalization's Jacobian applied to ``keep * d_p`` (``d_p = x . dP + d_mass``), from the scores
    ``z``, the per-column ``lse`` and ``delta`` (``pooled . dP + mass d_mass``); 0 outside ``tile``."""
    sig = tl.sigmoid(z)
    weights = tl.where(is_nsf, sig * tl.exp(-lse[None, :]), tl.exp(z - lse[None, :]))
    weights = tl.where(tile, weights, 0.0)
    grad = weights * (keep * d_p - delta[None, :])
    # delta is NaN for a softmax bag with no valid row; its rows have weight 0 and no gradient
    return d_s + tl.where(tile, tl.where(is_nsf, grad * (1.0 - sig), grad), 0.0), weights * keep


@triton.jit
def _score_grad_kernel(
    x_ptr, valid_ptr, block_start_ptr, block_end_ptr, block_bag_ptr,
    z_ptr, lse_ptr, delta_ptr, d_pooled_ptr, d_mass_ptr, d_z_ptr, ds_ptr, pk_ptr,
    E, J, num_pooled, nsf_from, seed, p_drop, drop_scale,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, HAS_DZ: tl.constexpr, STORE_PK: tl.constexpr,
    DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """ds (T, J): the score gradients of a block of rows and a column tile; pk (T, P): the dropped weights."""
    rows64, row_ok, valid, bag = _block(block_start_ptr, block_end_ptr, block_bag_ptr, valid_ptr, HAS_MASK, BLOCK_N)
    j0 = tl.program_id(1) * BLOCK_J
    cols_j = j0 + tl.arange(0, BLOCK_J)
    j_ok = cols_j < J
    d_s = tl.zeros((BLOCK_N, BLOCK_J), tl.float32)
    if HAS_DZ:
        d_s += _load_rows(d_z_ptr, rows64, valid, cols_j, j_ok, J).to(tl.float32)
    if j0 < num_pooled:
        pool_ok = cols_j < num_pooled
        per_bag = bag * num_pooled + cols_j
        d_p = _scores(x_ptr, d_pooled_ptr + bag.to(tl.int64) * num_pooled * E, rows64, valid, cols_j, pool_ok, E,
                      tl.zeros((BLOCK_N, BLOCK_J), tl.float32), BLOCK_K, DOT_FP32, FP32_PRECISION)
        d_p += tl.load(d_mass_ptr + per_bag, mask=pool_ok, other=0.0).to(tl.float32)[None, :]
        d_s, pk = _add_score_grads(
            d_s, _load_rows(z_ptr, rows64, valid, cols_j, j_ok, J), tl.load(lse_ptr + per_bag, mask=pool_ok, other=0.0),
            tl.load(delta_ptr + per_bag, mask=pool_ok, other=0.0), d_p,
            _keep_factor(seed, rows64, cols_j, J, p_drop, drop_scale, DROPOUT),
            valid[:, None] & pool_ok[None, :], (cols_j >= nsf_from)[None, :])
        if STORE_PK:
            _store_rows(pk_ptr, rows64, row_ok, cols_j, pool_ok, num_pooled, pk)
    _store_rows(ds_ptr, rows64, row_ok, cols_j, j_ok, J, d_s)


@triton.jit
def _queries_with_pooled_grads(u_bag, d_pooled_bag, J, num_pooled, cols_e, e_ok, E, BLOCK_J: tl.constexpr):
    """``w: (len(cols_e), 2 BLOCK_J)``: the bag's query rows ``u_j`` (columns 2j) and pooled-gradient rows
    ``dP_j`` (columns 2j + 1, 0 from ``num_pooled`` on), transposed, loaded once and interleaved, so that one
    product ``x w`` gives each column's score and ``x . dP`` side by side. (One load picking u's or dP's row
    per column, instead of two loads joined, spilled 52-60 B on sm_90 at 64 columns x 512 features.)"""
    cols_j = tl.arange(0, BLOCK_J)
    queries = _load_rows_t(u_bag, cols_j, cols_j < J, cols_e, e_ok, E)
    pooled_grads = _load_rows_t(d_pooled_bag, cols_j, cols_j < num_pooled, cols_e, e_ok, E)
    return tl.reshape(tl.join(queries, pooled_grads), (cols_e.shape[0], 2 * BLOCK_J))


@triton.jit
def _one_pass_grad_kernel(
    x_ptr, valid_ptr, u_ptr, c_ptr, split_start_ptr, split_end_ptr, split_bag_ptr,
    lse_ptr, delta_ptr, d_pooled_ptr, d_mass_ptr, d_z_ptr, ds_ptr, pk_ptr, part_du_ptr, part_dc_ptr,
    E, J, num_pooled, nsf_from, u_bag_stride, c_bag_stride, seed, p_drop, drop_scale,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, HAS_DZ: tl.constexpr, FOR_DX: tl.constexpr,
    DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """The score gradients and the weight gradients in one pass, per split, where one column tile holds every
    column and whole rows fit (after :func:`_one_pass_kernel`): u and dP are loaded once, interleaved
    (:func:`_queries_with_pooled_grads`), and each block of whole rows read once for the scores
    ``z = x u^T + c`` (recomputed, not read back) and ``d_p = x . dP`` in one product, and for
    ``du += ds^T x``; writes the split's partials of ``du`` and ``dc`` (as
    :func:`_weight_grad_kernel`) and, with ``FOR_DX``, ``ds`` and ``pk`` for the dx kernel (as
    :func:`_score_grad_kernel`; ``ds`` rounded to x's dtype in both uses). One product over the interleaved
    columns, not two, lets 64 columns over 512 features compile without a spill for sm_90 (Triton 3.9)."""
    split = tl.program_id(0)
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr, split)
    cols_j = tl.arange(0, BLOCK_J)
    j_ok = cols_j < J
    pool_ok = cols_j < num_pooled
    is_nsf = (cols_j >= nsf_from)[None, :]
    cols_e = tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    w_t = _queries_with_pooled_grads(u_ptr + bag.to(tl.int64) * u_bag_stride,
                                     d_pooled_ptr + bag.to(tl.int64) * num_pooled * E, J, num_pooled, cols_e, e_ok, E,
                                     BLOCK_J)
    c = tl.load(c_ptr + bag * c_bag_stride + cols_j, mask=j_ok, other=0.0).to(tl.float32)
    per_bag = bag * num_pooled + cols_j
    d_mass = tl.load(d_mass_ptr + per_bag, mask=pool_ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + per_bag, mask=pool_ok, other=0.0)
    delta = tl.load(delta_ptr + per_bag, mask=pool_ok, other=0.0)
    acc = tl.zeros((BLOCK_J, BLOCK_E), tl.float32)
    d_c = tl.zeros((BLOCK_J,), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        x_tile = _load_rows(x_ptr, rows64, valid, cols_e, e_ok, E)
        z_and_d_p = _dot(x_tile, w_t, tl.zeros((BLOCK_N, 2 * BLOCK_J), tl.float32), DOT_FP32, FP32_PRECISION,
                         x_ptr.dtype.element_ty)
        z, d_p = tl.split(tl.reshape(z_and_d_p, (BLOCK_N, BLOCK_J, 2)))
        d_s, pk = _add_score_grads(tl.zeros((BLOCK_N, BLOCK_J), tl.float32), z + c[None, :], lse, delta,
                                   d_p + d_mass[None, :],
                                   _keep_factor(seed, rows64, cols_j, J, p_drop, drop_scale, DROPOUT),
                                   valid[:, None] & pool_ok[None, :], is_nsf)
        if HAS_DZ:
            d_s += _load_rows(d_z_ptr, rows64, valid, cols_j, j_ok, J).to(tl.float32)
        d_s = d_s.to(x_ptr.dtype.element_ty)
        if FOR_DX:
            _store_rows(ds_ptr, rows64, row_ok, cols_j, j_ok, J, d_s)
            _store_rows(pk_ptr, rows64, row_ok, cols_j, pool_ok, num_pooled, pk)
        acc, d_c = _add_weight_grads(d_s, x_tile, acc, d_c, DOT_FP32, FP32_PRECISION)
    _store_weight_grads(part_du_ptr, part_dc_ptr, split, cols_j, J, cols_e, e_ok, E, True, acc, d_c)


@triton.jit
def _dx_kernel(
    valid_ptr, block_start_ptr, block_end_ptr, block_bag_ptr, u_ptr, d_pooled_ptr, ds_ptr, pk_ptr, dx_ptr,
    E, J, num_pooled, u_bag_stride,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """dx[rows, cols_e] = pk dP[bag] + ds u[bag], over every column tile in order."""
    rows64, row_ok, valid, bag = _block(block_start_ptr, block_end_ptr, block_bag_ptr, valid_ptr, HAS_MASK, BLOCK_N)
    cols_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    u_bag = u_ptr + bag.to(tl.int64) * u_bag_stride
    d_pooled_bag = d_pooled_ptr + bag.to(tl.int64) * num_pooled * E
    acc = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    for j0 in range(0, J, BLOCK_J):
        cols_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = cols_j < J
        d_s = _load_rows(ds_ptr, rows64, row_ok, cols_j, j_ok, J)
        acc = _dot(d_s, _load_rows(u_bag, cols_j, j_ok, cols_e, e_ok, E), acc, DOT_FP32, FP32_PRECISION,
                   dx_ptr.dtype.element_ty)
        if j0 < num_pooled:
            pool_ok = cols_j < num_pooled
            pk = _load_rows(pk_ptr, rows64, row_ok, cols_j, pool_ok, num_pooled)
            acc = _dot(pk, _load_rows(d_pooled_bag, cols_j, pool_ok, cols_e, e_ok, E), acc, DOT_FP32, FP32_PRECISION,
                       dx_ptr.dtype.element_ty)
    _store_rows(dx_ptr, rows64, row_ok, cols_e, e_ok, E,
                tl.where(valid[:, None], acc, 0.0).to(dx_ptr.dtype.element_ty))


@triton.jit
def _dx_split_kernel(
    valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, u_ptr, d_pooled_ptr, ds_ptr, pk_ptr, dx_ptr,
    E, J, num_pooled, u_bag_stride,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, SCORE_TILE: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """dx[rows, cols_e] = pk dP[bag] + ds u[bag] over one split's rows and one feature tile, when the first
    column tile holds every pooled column and, with ``SCORE_TILE``, a second one the score-only columns past it:
    u's and dP's feature tiles are loaded once, ds and pk read once per feature tile (:func:`_dx_kernel` reloads
    u and dP per block of rows)."""
    split = tl.program_id(0)
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr, split)
    cols_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    cols_j = tl.arange(0, BLOCK_J)
    j_ok = cols_j < J
    pool_ok = cols_j < num_pooled
    u_bag = u_ptr + bag.to(tl.int64) * u_bag_stride
    u_tile = _load_rows(u_bag, cols_j, j_ok, cols_e, e_ok, E)
    d_pooled = _load_rows(d_pooled_ptr + bag.to(tl.int64) * num_pooled * E, cols_j, pool_ok, cols_e, e_ok, E)
    if SCORE_TILE:
        cols_s = BLOCK_J + cols_j
        s_ok = cols_s < J
        u_score = _load_rows(u_bag, cols_s, s_ok, cols_e, e_ok, E)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        d_s = _load_rows(ds_ptr, rows64, row_ok, cols_j, j_ok, J)
        pk = _load_rows(pk_ptr, rows64, row_ok, cols_j, pool_ok, num_pooled)
        acc = _dot(d_s, u_tile, tl.zeros((BLOCK_N, BLOCK_E), tl.float32), DOT_FP32, FP32_PRECISION,
                   dx_ptr.dtype.element_ty)
        acc = _dot(pk, d_pooled, acc, DOT_FP32, FP32_PRECISION, dx_ptr.dtype.element_ty)
        if SCORE_TILE:
            acc = _dot(_load_rows(ds_ptr, rows64, row_ok, cols_s, s_ok, J), u_score, acc, DOT_FP32, FP32_PRECISION,
                       dx_ptr.dtype.element_ty)
        _store_rows(dx_ptr, rows64, row_ok, cols_e, e_ok, E,
                    tl.where(valid[:, None], acc, 0.0).to(dx_ptr.dtype.element_ty))


@triton.jit
def _weight_grad_kernel(
    x_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, ds_ptr, part_du_ptr, part_dc_ptr, E, J,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, SCORE_TILE: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """Partials over one split: du[cols_j, cols_e] = ds^T x and dc[cols_j] = sum of ds; with ``SCORE_TILE``,
    of the next column tile too, from the same x tiles (read once for both)."""
    split = tl.program_id(0)
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr, split)
    cols_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    e_tile = tl.program_id(2)
    cols_e = e_tile * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    acc = tl.zeros((BLOCK_J, BLOCK_E), tl.float32)
    d_c = tl.zeros((BLOCK_J,), tl.float32)
    if SCORE_TILE:
        cols_s = BLOCK_J + cols_j
        acc_s = tl.zeros((BLOCK_J, BLOCK_E), tl.float32)
        d_c_s = tl.zeros((BLOCK_J,), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _split_block(r0, end, valid_ptr, HAS_MASK, BLOCK_N)
        d_s = _load_rows(ds_ptr, rows64, row_ok, cols_j, cols_j < J, J)
        if SCORE_TILE:
            d_s_score = _load_rows(ds_ptr, rows64, row_ok, cols_s, cols_s < J, J)
        x_tile = _load_rows(x_ptr, rows64, valid, cols_e, e_ok, E)
        acc, d_c = _add_weight_grads(d_s, x_tile, acc, d_c, DOT_FP32, FP32_PRECISION)
        if SCORE_TILE:
            acc_s, d_c_s = _add_weight_grads(d_s_score, x_tile, acc_s, d_c_s, DOT_FP32, FP32_PRECISION)
    _store_weight_grads(part_du_ptr, part_dc_ptr, split, cols_j, J, cols_e, e_ok, E, e_tile == 0, acc, d_c)
    if SCORE_TILE:
        _store_weight_grads(part_du_ptr, part_dc_ptr, split, cols_s, J, cols_e, e_ok, E, e_tile == 0, acc_s, d_c_s)


@triton.jit
def _add_weight_grads(d_s, x_tile, acc, d_c, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``(acc + ds^T x, d_c + the column sums of ds)`` over a block of rows."""
    acc = _dot(tl.trans(d_s), x_tile, acc, DOT_FP32, FP32_PRECISION, x_tile.dtype)
    return acc, d_c + tl.sum(d_s.to(tl.float32), axis=0)


@triton.jit
def _store_weight_grads(part_du_ptr, part_dc_ptr, split, cols_j, J, cols_e, e_ok, E, first_e_tile, acc, d_c):
    """A split's du partial ``(cols_j, cols_e)`` and, from the first feature tile, its dc partial."""
    j_ok = cols_j < J
    part = (split * J + cols_j).to(tl.int64)
    _store_rows(part_du_ptr, part, j_ok, cols_e, e_ok, E, acc)
    if first_e_tile:
        tl.store(part_dc_ptr + part, d_c, mask=j_ok)


@triton.jit
def _bag_sum_kernel(part_ptr, bag_first_split_ptr, out_ptr, width, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[bag, cols] = the sum over the bag's splits of part[split, cols], in order (part: (S, width)); a 1-D
    grid of (column tile, bag), the column tiles fastest (axis 1 would stop at 65535 bags)."""
    column_tiles = tl.cdiv(width, BLOCK_W)
    cols = tl.program_id(0) % column_tiles * BLOCK_W + tl.arange(0, BLOCK_W)
    bag = tl.program_id(0) // column_tiles
    first = tl.load(bag_first_split_ptr + bag)
    last = tl.load(bag_first_split_ptr + bag + 1)
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_W,), tl.float32)
    for s0 in range(first, last, BLOCK_S):
        splits = s0 + offs_s
        acc += tl.sum(_load_rows(part_ptr, splits, splits < last, cols, cols < width, width), axis=0)
    tl.store(out_ptr + bag.to(tl.int64) * width + cols, acc, mask=cols < width)


@dataclass(frozen=True)
class Plan:
    """What one call launches: tiles, the split table (and the block table, built where a backward kernel
    steps per block), the columns' roles and the dropout.

    It holds no input tensor, so keeping it on an autograd context keeps no activation alive.
    """

    cfg: Config
    tiles_fwd: ForwardTiles
    splits: BlockTable
    bounds: tuple
    block_rows: int
    has_mask: bool
    shared_queries: bool
    columns: int
    nsf_from: int
    num_pooled: int
    dropout_p: float
    seed: int

    @staticmethod
    def make(bags: Bags, u, nsf_from: int, num_pooled: int, dropout_p: float, seed: int) -> "Plan":
        columns, features = u.shape[1], u.shape[2]
        cfg = config_for(columns, features)
        tiles_fwd = forward_tiles(cfg, num_pooled, features, bags.x2d.dtype, dropout_p > 0)
        programs = _programs_per_split(tiles_fwd, cfg, columns, features, num_pooled)
        splits = block_table(bags.bounds, _split_rows(bags, programs, num_pooled), bags.x2d.device)
        block_rows = score_grad_tiles(tiles_fwd, cfg, columns, num_pooled, dropout_p > 0)["BLOCK_N"]
        return Plan(cfg, tiles_fwd, splits, bags.bounds, block_rows, bags.row_valid is not None,
                    u.shape[0] == 1, columns, nsf_from, num_pooled, dropout_p, seed)

    @property
    def num_bags(self) -> int:
        return len(self.bounds) - 1

    @functools.cached_property
    def blocks(self) -> BlockTable:
        """The per-block table of the score-gradient and per-block dx kernels, on first use."""
        return block_table(self.bounds, self.block_rows, self.splits.start.device)

    def flags(self, x2d) -> dict:
        """Constexprs and launch options shared by the kernels."""
        return dict(BLOCK_N=BLOCK_N, BLOCK_J=self.cfg.block_j, HAS_MASK=self.has_mask,
                    **dot_flags(x2d.dtype, triton_interpreted()), num_warps=self.cfg.num_warps)

    def dropout_args(self) -> dict:
        return dict(seed=self.seed, p_drop=float(self.dropout_p), drop_scale=1.0 / (1.0 - self.dropout_p))

    def tiles(self, features: int) -> tuple[int, int]:
        return triton.cdiv(self.columns, self.cfg.block_j), triton.cdiv(features, self.cfg.block_e)


def _programs_per_split(tiles: ForwardTiles, cfg: Config, columns: int, features: int, num_pooled: int) -> int:
    """Programs a split takes in the widest forward kernel: one in the one-pass kernel, a program per column
    tile in the score kernel of a scores-only call, else a program per column tile and feature tile."""
    if tiles.one_pass:
        return 1
    column_tiles = triton.cdiv(columns, cfg.block_j)
    return column_tiles * triton.cdiv(features, tiles.pool_block_e) if num_pooled else column_tiles


def _split_rows(bags: Bags, programs_per_split: int, num_pooled: int) -> int:
    """Rows per split: a multiple of BLOCK_N that gives about TARGET_PROGRAMS programs in all, and at least
    :data:`MIN_SPLIT_BLOCKS` blocks and :data:`SPLIT_ROWS_PER_COLUMN` rows a pooled column, so that a split's
    fp32 partials (``P x Ein`` pooled, and ``J x Ein`` for ``du``) stay small against its rows."""
    blocks = triton.cdiv(bags.x2d.shape[0], BLOCK_N)
    wanted_splits = max(1, TARGET_PROGRAMS // programs_per_split)
    min_blocks = max(MIN_SPLIT_BLOCKS, triton.cdiv(SPLIT_ROWS_PER_COLUMN * num_pooled, BLOCK_N))
    return BLOCK_N * max(min_blocks, triton.cdiv(blocks, wanted_splits))


def _or(tensor, placeholder):
    """``tensor``, or a placeholder pointer for an argument a constexpr flag leaves unread."""
    return tensor if tensor is not None else placeholder


class SecondTile(NamedTuple):
    """A score-only tile the one-pass kernel scores in its pass: ``u: (Bu, J2, Ein)``, ``c: (Bu, J2)`` (views
    allowed) and the ``z: (T, J2)`` fp32 view it writes, J2 up to a column tile."""

    u: torch.Tensor
    c: torch.Tensor
    z: torch.Tensor

    def args(self) -> tuple:
        """Its pointers and its sizes, in the one-pass kernel's order."""
        return (self.u, self.c, self.z), (self.u.shape[1], _bag_stride(self.u), _bag_stride(self.c), self.z.stride(0))


def _bag_stride(queries) -> int:
    """The stride between bags of ``queries: (Bu, ...)``: 0 where one set serves every bag (Bu = 1)."""
    return 0 if queries.shape[0] == 1 else queries.stride(0)


def second_tile(plan: Plan, u, c, z, anchor) -> SecondTile | None:
    """The one-pass kernel's second tile, where it runs without dropout (with dropout's draws, 512 features
    spilled 112 B on sm_90): the ``anchor``'s columns ``(u_a, c_a)``, written to a new buffer, else the
    score-only columns past the first tile (ASMIL's anchor in the same call); None where there is none or
    they fill more than a column tile."""
    first = plan.cfg.block_j
    u_second, c_second = anchor if anchor is not None else (u[:, first:], c[:, first:])
    if not plan.tiles_fwd.one_pass or plan.dropout_p > 0 or not 0 < u_second.shape[1] <= first:
        return None
    if anchor is None:
        return SecondTile(u_second, c_second, z[:, first:])
    anchor_z = _blocks.new_buffer(z.shape[0], u_second.shape[1], dtype=torch.float32, device=z.device)
    return SecondTile(u_second, c_second, anchor_z)


def forward(x2d, u, c, row_valid, plan: Plan, anchor=None):
    """Fused forward over packed rows ``x2d: (T, Ein)`` with ``u: (Bu, J, Ein)``, ``c: (Bu, J)``, and the scores
    of an ``anchor`` ``(u_a: (Bu, Ja, Ein), c_a: (Bu, Ja))`` if given (in the one-pass kernel's pass where
    :func:`second_tile` allows, else in a scores-only call of its own).

    Returns ``(pooled: (B, P, Ein) x's dtype, mass: (B, P) x's dtype, z: (T, J) fp32, lse: (B, P) fp32,
    anchor_z: (T, Ja) fp32 or None)``.
    """
    rows, features = x2d.shape
    device, pooled_cols, splits = x2d.device, plan.num_pooled, plan.splits.num_blocks
    z = _blocks.new_buffer(rows, plan.columns, dtype=torch.float32, device=device)
    part_acc = _blocks.new_buffer(splits, pooled_cols, features, dtype=torch.float32, device=device)
    part_stats = [_blocks.new_buffer(splits, pooled_cols, dtype=torch.float32, device=device) for _ in range(3)]
    table, tiles = plan.splits, plan.tiles_fwd
    splits_args = (table.start, table.end, table.bag)
    dropout = dict(**plan.dropout_args(), DROPOUT=plan.dropout_p > 0, **plan.flags(x2d))
    queries = (u, c, *splits_args, z, *part_stats)
    sizes = (features, plan.columns, pooled_cols, plan.nsf_from, _bag_stride(u), _bag_stride(c))
    second = second_tile(plan, u, c, z, anchor)
    scored = 0  # columns scored so far
    if tiles.one_pass:
        second_pointers, second_sizes = second.args() if second else ((x2d, x2d, z), (0, 0, 0, 0))
        _one_pass_kernel[(splits,)](x2d, _or(row_valid, x2d), *queries, part_acc, *second_pointers, *sizes,
                                    *second_sizes, **dict(dropout, BLOCK_N=tiles.pool_block_n,
                                                          BLOCK_E=tiles.pool_block_e, SECOND=second is not None,
                                                          num_warps=ONE_PASS_WARPS))
        scored = plan.columns if second and anchor is None else plan.cfg.block_j
    if scored < plan.columns:
        _score_kernel[(triton.cdiv(plan.columns - scored, plan.cfg.block_j) * splits,)](
            x2d, _or(row_valid, x2d), *queries, *sizes,
            **dict(dropout, first_column=scored, **score_kernel_tiles(tiles, features, plan.dropout_p > 0)),
        )
    if pooled_cols and not tiles.one_pass:
        tile_grid = (triton.cdiv(features, tiles.pool_block_e), triton.cdiv(pooled_cols, plan.cfg.block_j))
        for first in range(0, splits, GRID_SPLITS):  # from the chunk's first split on: its tables and partials
            chunk = (*(column[first:] for column in splits_args), z, part_stats[0][first:], part_acc[first:])
            _pool_kernel[(*tile_grid, min(GRID_SPLITS, splits - first))](
                x2d, _or(row_valid, x2d), *chunk, features, plan.columns, pooled_cols, plan.nsf_from,
                **dict(dropout, BLOCK_N=tiles.pool_block_n, BLOCK_E=tiles.pool_block_e))
    pooled, mass, lse = _combine.combine(part_acc, *part_stats, table.bag_first_block, plan.num_bags,
                                         x2d.dtype, plan.nsf_from, NSF_EPS, COMBINE_BLOCK_E)
    return pooled, mass, z, lse, _anchor_scores(x2d, row_valid, plan, anchor, second)


def _anchor_scores(x2d, row_valid, plan: Plan, anchor, second: SecondTile | None):
    """The ``anchor``'s scores ``(T, Ja)`` fp32: the second tile's where the one-pass kernel wrote them, else
    from a scores-only call; None without an anchor."""
    if anchor is None:
        return None
    if second is not None:
        return second.z
    anchor_plan = Plan.make(bags_in_op(x2d, plan.bounds, row_valid), anchor[0], 0, 0, 0.0, 0)
    return forward(x2d, *anchor, row_valid, anchor_plan)[2]


def _per_bag_sum(partials, plan: Plan):
    """``partials: (S, ...)`` fp32 summed over each bag's splits in order: ``(B, ...)``, or ``(1, ...)`` when
    the queries are shared by every bag."""
    if plan.shared_queries:
        return partials.sum(0, keepdim=True)
    width = partials[0].numel()
    out = _blocks.new_buffer(plan.num_bags, *partials.shape[1:], dtype=torch.float32, device=partials.device)
    _bag_sum_kernel[(triton.cdiv(width, 128) * plan.num_bags,)](partials, plan.splits.bag_first_block, out, width,
                                                              BLOCK_S=_combine.BLOCK_S, BLOCK_W=128)
    return out


def backward(x2d, u, c, row_valid, z, lse, pooled, mass, plan: Plan, d_pooled, d_mass, d_z, wanted):
    """Gradients ``(dx, du, dc)``; None where ``wanted`` (``needs_input_grad`` of x, u, c) says no.

    ``u: (Bu, J, Ein)`` and ``c: (Bu, J)`` are the forward's; ``d_pooled: (B, P, Ein)``, ``d_mass: (B, P)`` and
    ``d_z: (T, J)`` may each be None (no gradient).
    """
    rows, features = x2d.shape
    device = x2d.device
    d_pooled = torch.zeros_like(pooled) if d_pooled is None else d_pooled.contiguous()
    d_mass = torch.zeros_like(mass) if d_mass is None else d_mass.contiguous()
    d_z = d_z.contiguous() if d_z is not None else None
    delta = (pooled.float() * d_pooled.float()).sum(-1) + mass.float() * d_mass.float()
    # ds and pk only enter products, whose operands are in x's dtype: stored in it
    d_s = _blocks.new_buffer(rows, plan.columns, dtype=x2d.dtype, device=device) if wanted[0] else None
    pk = _blocks.new_buffer(rows, plan.num_pooled, dtype=x2d.dtype, device=device) if wanted[0] else None
    weight_grads = _weight_grad_partials(plan, x2d) if wanted[1] or wanted[2] else None
    if weight_grads and one_pass_backward(plan.tiles_fwd, plan.cfg, plan.columns):
        splits = plan.splits
        _one_pass_grad_kernel[(splits.num_blocks,)](
            x2d, _or(row_valid, x2d), u, c, splits.start, splits.end, splits.bag, lse, delta, d_pooled, d_mass,
            _or(d_z, z), _or(d_s, x2d), _or(pk, x2d), *weight_grads, features, plan.columns, plan.num_pooled,
            plan.nsf_from, _bag_stride(u), _bag_stride(c), **plan.dropout_args(),
            DROPOUT=plan.dropout_p > 0, HAS_DZ=d_z is not None, FOR_DX=wanted[0],
            **dict(plan.flags(x2d), **one_pass_grad_tiles(plan.tiles_fwd, plan.cfg)))
    else:
        if d_s is None:
            d_s = _blocks.new_buffer(rows, plan.columns, dtype=x2d.dtype, device=device)
        _score_grad_kernel[(plan.blocks.num_blocks, plan.tiles(features)[0])](
            x2d, _or(row_valid, x2d), plan.blocks.start, plan.blocks.end, plan.blocks.bag, z, lse, delta, d_pooled,
            d_mass, _or(d_z, z), d_s, _or(pk, d_s), features, plan.columns, plan.num_pooled, plan.nsf_from,
            **plan.dropout_args(),
            DROPOUT=plan.dropout_p > 0, HAS_DZ=d_z is not None, STORE_PK=pk is not None,
            **dict(plan.flags(x2d), **score_grad_tiles(plan.tiles_fwd, plan.cfg, plan.columns, plan.num_pooled,
                                                     plan.dropout_p > 0)))
        if weight_grads:
            _weight_grads(x2d, row_valid, d_s, *weight_grads, plan)
    dx = du = dc = None
    if wanted[0]:
        dx = _blocks.new_buffer(rows, features, dtype=x2d.dtype, device=device)
        _dx(dx, row_valid, u, d_pooled, d_s, pk, plan)
    if weight_grads:
        du = _per_bag_sum(weight_grads[0], plan).to(u.dtype) if wanted[1] else None
        dc = _per_bag_sum(weight_grads[1], plan).to(u.dtype) if wanted[2] else None
    return dx, du, dc


def one_pass_backward(tiles: ForwardTiles, cfg: Config, columns: int) -> bool:
    """Whether :func:`_one_pass_grad_kernel` forms the score and weight gradients: after the one-pass forward,
    with every column in its one column tile (ASMIL's online tokens, LiteMIL; not the anchor's score-only
    tile)."""
    return tiles.one_pass and columns <= cfg.block_j


def one_pass_grad_tiles(tiles: ForwardTiles, cfg: Config) -> dict:
    """Rows a step (:data:`GRAD_ROWS`), feature tile (the forward's, all of Ein), warps (:data:`ONE_PASS_WARPS`,
    or 4 up to :data:`SMALL_GRAD_TILE` columns x features) and pipeline stages (:data:`ONE_PASS_GRAD_STAGES`)
    of :func:`_one_pass_grad_kernel`."""
    warps = 4 if cfg.block_j * tiles.pool_block_e <= SMALL_GRAD_TILE else ONE_PASS_WARPS
    return dict(BLOCK_N=GRAD_ROWS, BLOCK_E=tiles.pool_block_e, num_warps=warps, num_stages=ONE_PASS_GRAD_STAGES)


def _weight_grad_partials(plan: Plan, x2d) -> tuple:
    """Per-split fp32 buffers of ``du: (S, J, Ein)`` and ``dc: (S, J)``."""
    splits, features = plan.splits.num_blocks, x2d.shape[1]
    return (_blocks.new_buffer(splits, plan.columns, features, dtype=torch.float32, device=x2d.device),
            _blocks.new_buffer(splits, plan.columns, dtype=torch.float32, device=x2d.device))


def _weight_grads(x2d, row_valid, d_s, part_du, part_dc, plan: Plan):
    """Writes the per-split partials of ``du = ds^T x`` and ``dc`` from the stored ``ds`` (on :func:`split_tiles`)."""
    splits, features = plan.splits, x2d.shape[1]
    weight_tiles = split_tiles(plan.tiles_fwd, plan.cfg, plan.columns)
    column_programs = 1 if weight_tiles["SCORE_TILE"] else plan.tiles(features)[0]
    _weight_grad_kernel[(splits.num_blocks, column_programs, triton.cdiv(features, weight_tiles["BLOCK_E"]))](
        x2d, _or(row_valid, x2d), splits.start, splits.end, splits.bag, d_s, part_du, part_dc, features,
        plan.columns, **dict(plan.flags(x2d), **weight_tiles))


def _dx(dx, row_valid, u, d_pooled, d_s, pk, plan: Plan):
    """Writes ``dx: (T, Ein)`` ``= pk dP + ds u``: per split, with u and dP loaded once, where
    :func:`dx_split_tiles` gives its tiles, else per block and feature tile."""
    features = dx.shape[1]
    sizes = (features, plan.columns, plan.num_pooled, _bag_stride(u))
    split_dx = dx_split_tiles(plan.tiles_fwd, plan.cfg, plan.columns, plan.num_pooled)
    if split_dx:
        table = plan.splits
        _dx_split_kernel[(table.num_blocks, triton.cdiv(features, split_dx["BLOCK_E"]))](
            _or(row_valid, dx), table.start, table.end, table.bag, u, d_pooled, d_s, pk, dx, *sizes,
            **dict(plan.flags(dx), **split_dx))
        return
    table = plan.blocks
    _dx_kernel[(table.num_blocks, plan.tiles(features)[1])](
        _or(row_valid, dx), table.start, table.end, table.bag, u, d_pooled, d_s, pk, dx, *sizes,
        BLOCK_E=plan.cfg.block_e, **plan.flags(dx))


def dropout_keep(seed: int, rows: int, columns: int, num_pooled: int, dropout_p: float, device) -> torch.Tensor:
    """The boolean keep mask ``(rows, P)`` of the pooled columns' weights that the kernels draw with ``seed``
    for scores of ``columns`` (J) columns (a :class:`Plan`'s seed, columns, num_pooled and dropout_p)."""
    keep = torch.empty(rows, columns, dtype=torch.int8, device=device)
    grid = (triton.cdiv(rows, 64), triton.cdiv(columns, 64))
    _dropout_mask_kernel[grid](keep, seed, rows, columns, float(dropout_p), BLOCK_N=64, BLOCK_D=64)
    return keep[:, :num_pooled].bool()


_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# (J, Ein, P pooled columns): odd, LiteMIL, LiteMIL over 300 features (two passes in every dtype), the 32-column
# tiles over few (an Ein not a multiple of 16), many and too many features for one pass, 64 columns over few
# features, ASMIL's online tokens, ASMIL's training step with the anchor's score-only columns, both over 1024
# features (two passes in every dtype), a wide one, and ASMIL's anchor scored alone (no pooled column)
_SHAPES = ((4, 20, 4), (4, 256, 4), (4, 300, 4), (24, 40, 24), (24, 200, 24), (24, 1024, 24), (64, 32, 64),
           (64, 512, 64), (128, 512, 64), (64, 1024, 64), (128, 1024, 64), (128, 1024, 128), (64, 512, 0))


def shipped_specializations():
    """Every kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, launch, aligned)`` as the launches build them (``launch``: the warps,
    or a dict of them and the pipeline stages): the three dtypes, the shapes of :data:`_SHAPES` (softmax columns),
    with neither or both of a mask and dropout, and of a gradient of the scores and a gradient of x (each of the
    four pairs for the one-pass backward); the one-pass kernel also with its second tile (without dropout; the
    columns past the first tile, or as many as J of an anchor; without it, a launch passes zeros for the second
    tile's sizes). ``aligned`` names the integer arguments (E, J, the per-bag strides J * E and J, the first column
    scored, P, the first NSF column and the second tile's sizes) that are multiples of 16 at the example shape (a
    launch specializes on those).
    """
    for dtype, ptr in _POINTER_TYPES.items():
        for columns, features, pooled in _SHAPES:
            cfg = config_for(columns, features)
            sizes = dict(E=features, J=columns, u_bag_stride=columns * features, c_bag_stride=columns,
                         first_column=0, num_pooled=pooled, nsf_from=pooled,
                         second_columns=columns - cfg.block_j if columns > cfg.block_j else columns,
                         second_u_bag_stride=columns * features, second_c_bag_stride=columns, second_z_stride=columns)
            aligned = {name for name, size in sizes.items() if size % 16 == 0}  # each kernel takes some of them
            base = dict(BLOCK_N=BLOCK_N, BLOCK_J=cfg.block_j, **dot_flags(dtype, interpreted=False))
            for has_mask, dropout in ((False, False), (True, True)):
                valid = "*i1" if has_mask else ptr
                flags = dict(base, HAS_MASK=has_mask)
                shape = (cfg, columns, features, pooled, dtype, flags, dropout, aligned)
                yield from _forward_specializations(ptr, valid, *shape)
                yield from _backward_specializations(ptr, valid, *shape)
            if pooled:
                yield _combine.specialization(ptr, COMBINE_BLOCK_E, features)
    yield (_bag_sum_kernel, dict(part_ptr="*fp32", bag_first_split_ptr="*i32", out_ptr="*fp32", width="i32"),
           dict(BLOCK_S=_combine.BLOCK_S, BLOCK_W=128), 4)


def _forward_specializations(ptr, valid, cfg: Config, columns: int, features: int, pooled: int, dtype, flags: dict,
                             dropout: bool, aligned):
    """The forward kernels :func:`forward` launches for one configuration: the one-pass kernel, with and
    without its second tile (and the score kernel for score-only tiles past the first), or the score and
    pooling kernels."""
    tiles = forward_tiles(cfg, pooled, features, dtype, dropout)
    scores = _score_signature(ptr, valid)
    if tiles.one_pass:
        one_pass = _signature(_one_pass_kernel, dict(scores, part_acc_ptr="*fp32", second_u_ptr=ptr, second_c_ptr=ptr,
                                                     second_z_ptr="*fp32", second_columns="i32",
                                                     second_u_bag_stride="i32", second_c_bag_stride="i32",
                                                     second_z_stride="i32"))
        tile_flags = dict(flags, BLOCK_N=tiles.pool_block_n, BLOCK_E=tiles.pool_block_e)
        no_second = aligned | {name for name in one_pass if name.startswith("second_") and one_pass[name] == "i32"}
        for second, with_dropout in ((False, dropout), (True, False)):
            yield (_one_pass_kernel, one_pass, dict(tile_flags, DROPOUT=with_dropout, SECOND=second), ONE_PASS_WARPS,
                   _named(aligned if second else no_second, one_pass))
    if not tiles.one_pass or columns > cfg.block_j:
        yield (_score_kernel, scores, dict(flags, **score_kernel_tiles(tiles, features, dropout)), cfg.num_warps,
               _named(aligned, scores))
    if tiles.one_pass or not pooled:
        return
    pool = _pool_signature(ptr, valid)
    yield (_pool_kernel, pool, dict(flags, BLOCK_N=tiles.pool_block_n, BLOCK_E=tiles.pool_block_e,
           DROPOUT=dropout), cfg.num_warps, _named(aligned, pool))


def _backward_specializations(ptr, valid, cfg: Config, columns: int, features: int, pooled: int, dtype,
                              flags: dict, dropout: bool, aligned):
    """The backward kernels :func:`backward` launches for one configuration: the score gradients, dx (per split
    where :func:`dx_split_tiles` says so, else per block and feature tile) and the weight gradients (on
    :func:`split_tiles`), or, where :func:`one_pass_backward` says so, both gradients in one pass (the score
    gradients' kernel then runs only where no weight gradient is wanted)."""
    tiles = forward_tiles(cfg, pooled, features, dtype, dropout)
    split_kernel_tiles = split_tiles(tiles, cfg, columns)
    warps = split_kernel_tiles.pop("num_warps")
    signature = _score_grad_signature(ptr, valid)
    for has_dz, store_pk in ((True, True), (False, False)):
        yield (_score_grad_kernel, signature,
               dict(flags, **score_grad_tiles(tiles, cfg, columns, pooled, dropout), DROPOUT=dropout, HAS_DZ=has_dz,
                    STORE_PK=store_pk), cfg.num_warps, _named(aligned, signature))
    split_dx = dx_split_tiles(tiles, cfg, columns, pooled)
    if split_dx:
        signature = _signature(_dx_split_kernel, _dx_signature(ptr, valid))
        dx_warps = split_dx.pop("num_warps")
        yield _dx_split_kernel, signature, dict(flags, **split_dx), dx_warps, _named(aligned, signature)
    else:
        signature = _dx_signature(ptr, valid)
        yield (_dx_kernel, signature, dict(flags, BLOCK_E=cfg.block_e), cfg.num_warps,
               _named(aligned, signature))
    if not one_pass_backward(tiles, cfg, columns):
        signature = _weight_grad_signature(ptr, valid)
        yield (_weight_grad_kernel, signature, dict(flags, **split_kernel_tiles), warps,
               _named(aligned, signature))
        return
    signature = _signature(_one_pass_grad_kernel, dict(_score_grad_signature(ptr, valid),
                                                       **_weight_grad_signature(ptr, valid), u_ptr=ptr, c_ptr=ptr,
                                                       u_bag_stride="i32", c_bag_stride="i32"))
    one_pass_tiles = one_pass_grad_tiles(tiles, cfg)
    options = dict(num_warps=one_pass_tiles.pop("num_warps"), num_stages=one_pass_tiles.pop("num_stages"))
    # all four pairs: under Triton 3.6, (False, True) spilled where (True, True) did not
    for has_dz, for_dx in itertools.product((True, False), repeat=2):
        yield (_one_pass_grad_kernel, signature,
               dict(flags, **one_pass_tiles, DROPOUT=dropout, HAS_DZ=has_dz, FOR_DX=for_dx), options,
               _named(aligned, signature))


def _named(aligned: set, signature: dict) -> tuple:
    """The ``aligned`` integer arguments that ``signature`` takes, sorted."""
    return tuple(sorted(aligned & signature.keys()))


def _signature(kernel, types: dict) -> dict:
    """``kernel``'s argument types, in its order, from ``types`` (and the split table's, for per-split kernels)."""
    types = dict(types, **_table("split"))
    return {name: types[name] for name in kernel.arg_names if name in types}


def _table(prefix):
    return {f"{prefix}_{name}_ptr": "*i32" for name in ("start", "end", "bag")}


def _score_signature(ptr, valid):
    return dict(x_ptr=ptr, valid_ptr=valid, u_ptr=ptr, c_ptr=ptr, **_table("split"), z_ptr="*fp32",
                part_max_ptr="*fp32", part_sum_ptr="*fp32", part_mass_ptr="*fp32", E="i32", J="i32",
                num_pooled="i32", nsf_from="i32", u_bag_stride="i32", c_bag_stride="i32", seed="i32", p_drop="fp32",
                drop_scale="fp32", first_column="i32")


def _pool_signature(ptr, valid):
    return dict(x_ptr=ptr, valid_ptr=valid, **_table("split"), z_ptr="*fp32", part_max_ptr="*fp32",
                part_acc_ptr="*fp32", E="i32", J="i32", num_pooled="i32", nsf_from="i32", seed="i32", p_drop="fp32",
                drop_scale="fp32")


def _score_grad_signature(ptr, valid):
    return dict(x_ptr=ptr, valid_ptr=valid, **_table("block"), z_ptr="*fp32", lse_ptr="*fp32", delta_ptr="*fp32",
                d_pooled_ptr=ptr, d_mass_ptr=ptr, d_z_ptr="*fp32", ds_ptr=ptr, pk_ptr=ptr, E="i32",
                J="i32", num_pooled="i32", nsf_from="i32", seed="i32", p_drop="fp32", drop_scale="fp32")


def _dx_signature(ptr, valid):
    return dict(valid_ptr=valid, **_table("block"), u_ptr=ptr, d_pooled_ptr=ptr, ds_ptr=ptr, pk_ptr=ptr,
                dx_ptr=ptr, E="i32", J="i32", num_pooled="i32", u_bag_stride="i32")


def _weight_grad_signature(ptr, valid):
    return dict(x_ptr=ptr, valid_ptr=valid, **_table("split"), ds_ptr=ptr, part_du_ptr="*fp32",
                part_dc_ptr="*fp32", E="i32", J="i32")
