"""Gated attention pooling in Triton: a fused forward, a combine and a fused backward.

Forward (``_forward_kernel``), one program per block of BLOCK_N rows of one bag: both projections
on the tensor cores (L in BLOCK_L steps, D in BLOCK_D steps), tanh/sigmoid gating, dropout from a
Philox seed, the K scores, and a block-local softmax (max, sum of exp) with the weighted sum of x
into fp32 partials ``(blocks, K, L)``. Nothing of size N x D is written. :func:`milkernels.ops._combine.combine`
merges the partials of each bag into ``pooled`` and the per-bag log-sum-exp.

Backward (``_backward_rows_kernel``), per block again: the softmax gradient from the saved scores
and log-sum-exp, the pooling part of dx, the recomputed projections and dropout masks, and the
gradients of the pre-activations ``dH = [dHa | dHb]`` for a bounded chunk of rows, plus per-block
partial dWc and dbc. The two dense products of the backward, ``dx += dH W`` and ``dW = dH^T x``,
run as GEMMs on that chunk; all reductions have a fixed order, so results are deterministic.
"""

from __future__ import annotations

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
    """Tile sizes and launch settings of the row kernels."""

    block_n: int
    block_d: int
    block_l: int
    num_warps: int


def config_for(features: int, hidden: int) -> Config:
    """The shipped configuration for L = ``features`` and D = ``hidden`` (see ``SHIPPED_CONFIGS``)."""
    # D tiles stop at 64, with 8 warps: at BLOCK_D = 128 (8 warps, or even 16) the fp16/bf16 backward with
    # gating and dropout spills on sm_90 (255 registers and about 300 B of spill stores), and so does
    # BLOCK_D = 64 at 4 warps; BLOCK_D = 64 at 8 warps takes about 175 registers and spills nothing.
    block_d = min(64, max(16, triton.next_power_of_2(hidden)))
    block_l = min(64, max(16, triton.next_power_of_2(features)))
    return Config(block_n=64, block_d=block_d, block_l=block_l, num_warps=8 if block_d == 64 else 4)


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
def _project(x_ptr, w_ptr, rows64, row_ok, cols_d, d_ok, L, acc,
             BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc (BLOCK_N, BLOCK_D) += x[rows, :] @ w[cols_d, :]^T, L in BLOCK_L steps."""
    offs_l = tl.arange(0, BLOCK_L)
    for l0 in range(0, L, BLOCK_L):
        cols_l = l0 + offs_l
        l_ok = cols_l < L
        x_tile = tl.load(x_ptr + rows64[:, None] * L + cols_l[None, :], mask=row_ok[:, None] & l_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptr + cols_d.to(tl.int64)[None, :] * L + cols_l[:, None], mask=d_ok[None, :] & l_ok[:, None], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(x_tile, w_tile, acc)
    return acc


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
    h_a = _project(x_ptr, wa_ptr, rows64, row_ok, cols_d, d_ok, L, zeros, BLOCK_L, DOT_FP32, FP32_PRECISION)
    a = _tanh(h_a + tl.load(ba_ptr + cols_d, mask=d_ok, other=0.0).to(tl.float32)[None, :])
    if GATED:
        h_b = _project(x_ptr, wb_ptr, rows64, row_ok, cols_d, d_ok, L, zeros, BLOCK_L, DOT_FP32, FP32_PRECISION)
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
def _forward_kernel(
    x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, valid_ptr,
    block_start_ptr, block_end_ptr, scores_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    L, D, seed, p_drop, drop_scale,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    GATED: tl.constexpr, DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr, POOL: tl.constexpr,
    DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    block, rows64, row_ok = _block_rows(block_start_ptr, block_end_ptr, 0, BLOCK_N)
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
    if POOL:
        valid = _row_valid(valid_ptr, rows64, row_ok, HAS_MASK)
        masked = tl.where(valid[:, None], scores, float("-inf"))
        block_max = tl.max(masked, axis=0)
        safe_max = tl.where(block_max == float("-inf"), 0.0, block_max)
        weights = tl.where(valid[:, None], tl.exp(scores - safe_max[None, :]), 0.0)
        tl.store(part_max_ptr + block * K + heads, block_max, mask=heads < K)
        tl.store(part_sum_ptr + block * K + heads, tl.sum(weights, axis=0), mask=heads < K)
        offs_l = tl.arange(0, BLOCK_L)
        for l0 in range(0, L, BLOCK_L):
            cols_l = l0 + offs_l
            l_ok = cols_l < L
            x_tile = tl.load(x_ptr + rows64[:, None] * L + cols_l[None, :], mask=valid[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
            for k in tl.static_range(K):
                weight_k = tl.sum(tl.where(heads[None, :] == k, weights, 0.0), axis=1)
                partial = tl.sum(weight_k[:, None] * x_tile, axis=0)
                tl.store(part_acc_ptr + (block * K + k).to(tl.int64) * L + cols_l, partial, mask=l_ok)


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
def _backward_rows_kernel(
    x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, valid_ptr,
    block_start_ptr, block_end_ptr, block_bag_ptr,
    scores_ptr, d_scores_ptr, lse_ptr, delta_ptr, d_pooled_ptr,
    dx_ptr, dh_ptr, part_dwc_ptr, part_dbc_ptr,
    chunk_row0, chunk_block0, L, D, seed, p_drop, drop_scale,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    GATED: tl.constexpr, DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr, POOL: tl.constexpr,
    HAS_DSCORES: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """Per block of rows: ds, the pooling part of dx, dH rows (relative to ``chunk_row0``), partial dWc and dbc."""
    block, rows64, row_ok = _block_rows(block_start_ptr, block_end_ptr, chunk_block0, BLOCK_N)
    bag = tl.load(block_bag_ptr + block)
    heads = tl.arange(0, K_PAD)
    valid = _row_valid(valid_ptr, rows64, row_ok, HAS_MASK)
    d_s = _score_grads(scores_ptr, d_scores_ptr, lse_ptr, delta_ptr, d_pooled_ptr, x_ptr, dx_ptr, bag, rows64, row_ok,
                       valid, heads, L, K, K_PAD, BLOCK_L, POOL, HAS_DSCORES)
    d_s = tl.where(row_ok[:, None], d_s, 0.0)
    tl.store(part_dbc_ptr + block * K + heads, tl.sum(d_s, axis=0), mask=heads < K)
    local64 = rows64 - chunk_row0
    dh_width = 2 * D if GATED else D
    for d0 in range(0, D, BLOCK_D):
        cols_d, d_ok, a, b, keep_a, keep_b = _gates(
            x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, rows64, row_ok, d0, L, D, seed, p_drop, drop_scale,
            BLOCK_N, BLOCK_D, BLOCK_L, GATED, DROPOUT, DOT_FP32, FP32_PRECISION)
        a_kept = a * keep_a
        b_kept = b * keep_b
        d_gated = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for k in tl.static_range(K):
            d_s_k = tl.sum(tl.where(heads[None, :] == k, d_s, 0.0), axis=1)
            wc_k = tl.load(wc_ptr + k * D + cols_d, mask=d_ok, other=0.0).to(tl.float32)
            d_gated += d_s_k[:, None] * wc_k[None, :]
            tl.store(part_dwc_ptr + (block * K + k).to(tl.int64) * D + cols_d, tl.sum(d_s_k[:, None] * a_kept * b_kept, axis=0), mask=d_ok)
        d_ha = d_gated * b_kept * keep_a * (1.0 - a * a)
        store_mask = row_ok[:, None] & d_ok[None, :]
        dh_rows = dh_ptr + local64[:, None] * dh_width + cols_d[None, :]
        tl.store(dh_rows, d_ha.to(dh_ptr.dtype.element_ty), mask=store_mask)
        if GATED:
            d_hb = d_gated * a_kept * keep_b * b * (1.0 - b)
            tl.store(dh_rows + D, d_hb.to(dh_ptr.dtype.element_ty), mask=store_mask)


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
    """What one call launches: the tile configuration, the block table, the bag count and the dropout.

    It holds no input tensor, so keeping it on an autograd context keeps no activation alive.
    """

    cfg: Config
    table: BlockTable
    num_bags: int
    has_mask: bool
    dropout_p: float
    seed: int

    @staticmethod
    def make(bags: Bags, hidden: int, dropout_p: float, seed: int) -> "Plan":
        cfg = config_for(bags.x2d.shape[1], hidden)
        table = block_table(bags.bounds, cfg.block_n, bags.x2d.device)
        return Plan(cfg, table, bags.num_bags, bags.row_valid is not None, dropout_p, seed)

    def launch_args(self, x2d, hidden, gated, heads):
        """Keyword arguments shared by the row kernels."""
        return dict(
            L=x2d.shape[1], D=hidden, seed=self.seed, p_drop=float(self.dropout_p),
            drop_scale=1.0 / (1.0 - self.dropout_p), K=heads, K_PAD=triton.next_power_of_2(heads),
            BLOCK_N=self.cfg.block_n, BLOCK_D=self.cfg.block_d, BLOCK_L=self.cfg.block_l,
            GATED=gated, DROPOUT=self.dropout_p > 0, HAS_MASK=self.has_mask,
            **dot_flags(x2d.dtype, triton_interpreted()), num_warps=self.cfg.num_warps,
        )


def _or(tensor, placeholder):
    """``tensor``, or a placeholder pointer for a kernel argument that a constexpr flag leaves unread."""
    return tensor if tensor is not None else placeholder


def _bias(bias, weight):
    return bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def _gate_weights(wa, ba, wb, bb):
    """``(wa, ba, wb, bb)`` as the kernels take them: absent biases as zeros, an absent wb as wa."""
    return wa, _bias(ba, wa), wb if wb is not None else wa, _bias(bb, wa)


def forward(x2d, wa, ba, wb, bb, wc, bc, row_valid, plan: Plan, pool: bool):
    """Fused forward over packed rows ``x2d: (T, L)``; ``row_valid: (T,)`` bool, or None without a mask.

    Returns ``(pooled: (B, K, L) or None, scores: (T, K) fp32, lse: (B, K) fp32 or None)``; backward
    takes the fp32 scores and ``lse`` back, so the attention weights are recomputed exactly.
    """
    total_rows, features = x2d.shape
    heads = wc.shape[0]
    table, device = plan.table, x2d.device
    scores = _blocks.new_buffer(total_rows, heads, dtype=torch.float32, device=device)
    blocks = table.num_blocks if pool else 1
    part_acc = _blocks.new_buffer(blocks, heads, features, dtype=torch.float32, device=device)
    part_max = _blocks.new_buffer(blocks, heads, dtype=torch.float32, device=device)
    part_sum = _blocks.new_buffer(blocks, heads, dtype=torch.float32, device=device)
    _forward_kernel[(table.num_blocks,)](
        x2d, *_gate_weights(wa, ba, wb, bb), wc, _bias(bc, wc), _or(row_valid, x2d),
        table.start, table.end, scores, part_acc, part_max, part_sum,
        POOL=pool, **plan.launch_args(x2d, wa.shape[0], wb is not None, heads),
    )
    if not pool:
        return None, scores, None
    pooled, _, lse = _combine.combine(part_acc, part_max, part_sum, part_sum, table.bag_first_block, plan.num_bags,
                                      x2d.dtype, heads, 0.0, COMBINE_BLOCK_L)
    return pooled, scores, lse


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
    ``d_scores: (T, K)`` may be None.
    """
    features = x2d.shape[1]
    hidden, heads = wa.shape[0], wc.shape[0]
    table, device = plan.table, x2d.device
    pool = pool and d_pooled is not None
    gated = wb is not None
    dx = _blocks.new_buffer(*x2d.shape, dtype=x2d.dtype, device=device) if pool else torch.zeros_like(x2d)
    delta = (d_pooled.float() * pooled.float()).sum(-1) if pool else scores
    part_dwc = _blocks.new_buffer(table.num_blocks, heads, hidden, dtype=torch.float32, device=device)
    part_dbc = _blocks.new_buffer(table.num_blocks, heads, dtype=torch.float32, device=device)
    gemm_dtype = _gemm_dtype(x2d.dtype)
    w_stack = (torch.cat([wa, wb]) if gated else wa).to(gemm_dtype)
    d_w = torch.zeros(w_stack.shape, dtype=torch.float32, device=device)
    d_b = torch.zeros(w_stack.shape[0], dtype=torch.float32, device=device)
    chunk_rows = _chunk_rows(features, w_stack.shape[0], x2d.dtype, gemm_dtype, plan.cfg.block_n)
    for first, stop, row0, row1 in _chunks(table, chunk_rows):
        d_h = _blocks.new_buffer(row1 - row0, w_stack.shape[0], dtype=gemm_dtype, device=device)
        _backward_rows_kernel[(stop - first,)](
            x2d, *_gate_weights(wa, ba, wb, bb), wc, _or(row_valid, x2d),
            table.start, table.end, table.bag, scores,
            d_scores.contiguous() if d_scores is not None else scores, lse if pool else scores, delta,
            d_pooled.contiguous() if pool else scores, dx, d_h, part_dwc, part_dbc, row0, first,
            POOL=pool, HAS_DSCORES=d_scores is not None, **plan.launch_args(x2d, hidden, gated, heads),
        )
        if wanted[0]:
            dx[row0:row1] += (d_h @ w_stack).to(x2d.dtype)
        if any(wanted[1:5]):
            d_w += (d_h.t() @ x2d[row0:row1].to(gemm_dtype)).float()
            d_b += d_h.float().sum(0)
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
    with and without gating, dropout, a mask and pooling. ``aligned`` names the integer arguments that are
    multiples of 16 in such a launch (a launch specializes on those): L and D where the example sizes are,
    and the backward's chunk offsets, 0 in the one-chunk call.
    """
    for dtype, ptr in _POINTER_TYPES.items():
        for features, hidden in ((20, 10), (1024, 256), (384, 48)):
            cfg = config_for(features, hidden)
            aligned = tuple(name for name, size in (("L", features), ("D", hidden)) if size % 16 == 0)
            for heads, gated, dropout, has_mask in _FLAG_SETS:
                tiles = dict(K=heads, K_PAD=triton.next_power_of_2(heads), BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                             BLOCK_L=cfg.block_l, GATED=gated, DROPOUT=dropout, HAS_MASK=has_mask,
                             **dot_flags(dtype, interpreted=False))
                valid = "*i1" if has_mask else ptr
                for pool in (True, False):
                    yield (_forward_kernel, _forward_signature(ptr, valid), dict(tiles, POOL=pool), cfg.num_warps,
                           aligned)
                    yield (_backward_rows_kernel, _backward_signature(ptr, valid, _POINTER_TYPES[_gemm_dtype(dtype)]),
                           dict(tiles, POOL=pool, HAS_DSCORES=True), cfg.num_warps,  # autograd materializes dS
                           aligned + ("chunk_row0", "chunk_block0"))
        yield _combine.specialization(ptr, COMBINE_BLOCK_L, features=1024)
    yield _dropout_mask_kernel, dict(keep_ptr="*i8", seed="i32", T="i32", D="i32", p_drop="fp32"), dict(BLOCK_N=64, BLOCK_D=64), 4


def _scalars():
    return dict(L="i32", D="i32", seed="i32", p_drop="fp32", drop_scale="fp32")


def _forward_signature(ptr, valid):
    tensors = dict.fromkeys(["x_ptr", "wa_ptr", "ba_ptr", "wb_ptr", "bb_ptr", "wc_ptr", "bc_ptr"], ptr)
    tensors.update(valid_ptr=valid, block_start_ptr="*i32", block_end_ptr="*i32", scores_ptr="*fp32",
                   part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32")
    return dict(tensors, **_scalars())


def _backward_signature(ptr, valid, dh):
    tensors = dict.fromkeys(["x_ptr", "wa_ptr", "ba_ptr", "wb_ptr", "bb_ptr", "wc_ptr"], ptr)
    tensors.update(valid_ptr=valid, block_start_ptr="*i32", block_end_ptr="*i32", block_bag_ptr="*i32",
                   scores_ptr="*fp32", d_scores_ptr=ptr, lse_ptr="*fp32", delta_ptr="*fp32", d_pooled_ptr=ptr,
                   dx_ptr=ptr, dh_ptr=dh, part_dwc_ptr="*fp32", part_dbc_ptr="*fp32",
                   chunk_row0="i32", chunk_block0="i32")
    return dict(tensors, **_scalars())
