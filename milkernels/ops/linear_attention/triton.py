"""Non-causal linear attention in Triton, straight from the packed ``qkv: (T, 3C)`` projection output.

Every row kernel runs one program per split (program axis 0) and head (axis 1). A split is a run of whole
BLOCK_N-row blocks of one bag, sized so that a call launches about :data:`TARGET_PROGRAMS` programs however
large the bag (:func:`split_rows`); a program loops over its split's blocks, so the per-split fp32
partials, ``(splits, H, dh + 1, dh)``, do not grow with N, and each program reads the bag's state once.

Forward: ``_state_kernel`` writes each split's partial of ``S = sum phi(k) v^T`` and ``z = sum phi(k)``
(row dh holds z); ``_combine_kernel`` sums a bag's partials in a fixed order; ``_apply_kernel`` computes
``numerator = phi(q) (tau S)``, the denominator, ``out`` (written into ``(T, C)`` at the head's columns: no
permute copies), and, when asked, the numerator and the per-head attention map ``q . mean_d(tau S)`` (the
mean over dh of the numerator).

Backward: ``_query_grad_kernel`` writes the q part of ``d_qkv`` and each split's partial of ``dS'`` and
``dz`` (combined by ``_combine_kernel``); ``_key_grad_kernel`` writes the k and v parts. Deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted
from .. import _blocks
from .._bags import Bags
from .._blocks import BlockTable, block_table, dot_flags

ACTIVATION_CODES = {"relu": 0, "gelu": 1, "elu": 2, "leaky_relu": 3, "tanh": 4, "softplus": 5}
BLOCK_N = 64
COMBINE_BLOCK_B = 32
TARGET_PROGRAMS = 528  # four per SM on an H100 / H200, over all splits and heads
MIN_SPLIT_BLOCKS = 8  # 512 rows: a split's partial and state reads stay under 10% of its rows' bytes


def split_rows(total_rows: int, num_heads: int) -> int:
    """Rows per split: whole blocks of BLOCK_N, at least :data:`MIN_SPLIT_BLOCKS` of them, and enough that the
    splits of all bags and heads come to at most about :data:`TARGET_PROGRAMS` programs (more only for bags
    shorter than a split).

    A split of one head writes a ``(dh + 1) x dh`` fp32 partial, which the combine reads back, and each
    program reads its bag's state: 3 x 16.6 KiB at dh = 64, against 512 B of input and output per row and
    head in bf16; 512 rows keep that under a fifth (a tenth in fp32).
    """
    splits = max(1, -(-TARGET_PROGRAMS // num_heads))
    return max(MIN_SPLIT_BLOCKS, -(-total_rows // (splits * BLOCK_N))) * BLOCK_N


FP32_GRADIENT_ROWS = {16: 32, 32: 16, 64: 32}
"""Rows per tile of the fp32 gradient kernels, by DH: their tf32x3 dots hold three products a tile, and at 64
rows the query gradient, whose loop carries both the state and its gradient, spills on sm_90."""


def gradient_block_n(dtype, block_dh: int) -> int:
    """Rows per tile of the gradient kernels for inputs of ``dtype`` and heads padded to ``block_dh``."""
    return FP32_GRADIENT_ROWS[block_dh] if dtype == torch.float32 else BLOCK_N


def row_num_warps(block_dh: int) -> int:
    """Warps of the row kernels: 8 from DH = 32 on (at 4 the fp16/bf16 query gradient of gelu at DH = 32 and of
    softplus at DH = 64 spills on sm_90), else 4."""
    return 8 if block_dh >= 32 else 4


@triton.jit
def _phi(x, ACT: tl.constexpr):
    """The feature map, as torch's defaults: relu, gelu (erf), elu (alpha 1), leaky_relu (0.01), tanh, softplus.

    Written so that a NaN input gives NaN (``tl.maximum``/``tl.minimum`` would drop it).
    """
    if ACT == 0:
        y = tl.where(x < 0, 0.0, x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = tl.where(x > 0, x, tl.exp(x) - 1.0)
    elif ACT == 3:
        y = tl.where(x < 0, 0.01 * x, x)
    elif ACT == 4:
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        y = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.where(x > 20.0, 20.0, x))))
    return y


@triton.jit
def _phi_grad(x, ACT: tl.constexpr):
    """d phi / dx, matching torch's backward at the kinks (relu' (0) = 0, elu' (0) = 1)."""
    if ACT == 0:
        g = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 1:
        g = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        g = tl.where(x > 0, 1.0, tl.exp(x))
    elif ACT == 3:
        g = tl.where(x > 0, 1.0, 0.01)
    elif ACT == 4:
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        g = 1.0 - t * t
    else:
        g = tl.where(x > 20.0, 1.0, tl.sigmoid(x))
    return g


@triton.jit
def _dot(a, b, like_ptr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """a @ b in fp32 (tf32x3 on a GPU) for fp32 input, else on the tensor cores in the input's dtype."""
    if DOT_FP32:
        return tl.dot(a, b, input_precision=FP32_PRECISION)
    return tl.dot(a.to(like_ptr.dtype.element_ty), b.to(like_ptr.dtype.element_ty))


@triton.jit
def _split(split_start_ptr, split_end_ptr, split_bag_ptr):
    """This program's split (axis 0): its first row, the row it ends before, and its bag."""
    split = tl.program_id(0)
    return tl.load(split_start_ptr + split), tl.load(split_end_ptr + split), tl.load(split_bag_ptr + split)


@triton.jit
def _rows(row0, end, valid_ptr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block of rows from ``row0`` (before ``end``): its rows (int64), which exist, and which are real
    instances (not masked)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    rows64 = rows.to(tl.int64)
    valid = row_ok
    if HAS_MASK:
        valid = row_ok & (tl.load(valid_ptr + rows64, mask=row_ok, other=0) != 0)
    return rows64, row_ok, valid


@triton.jit
def _load_head(ptr, rows64, row_stride, col0, cols, dh, keep):
    """The (BLOCK_N, DH) fp32 tile ``ptr[rows, col0 + cols]``; 0 where ``keep`` is False or cols >= dh."""
    mask = keep[:, None] & (cols[None, :] < dh)
    return tl.load(ptr + rows64[:, None] * row_stride + col0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_keys(qkv_ptr, rows64, valid, head, C, dh, ACT: tl.constexpr, DH: tl.constexpr):
    """``(k_pre, phi(k), v)`` of one head for a block of rows, each (BLOCK_N, DH) fp32, 0 on masked rows."""
    cols = tl.arange(0, DH)
    k_pre = _load_head(qkv_ptr, rows64, 3 * C, C + head * dh, cols, dh, valid)
    k = tl.where(valid[:, None] & (cols[None, :] < dh), _phi(k_pre, ACT), 0.0)
    return k_pre, k, _load_head(qkv_ptr, rows64, 3 * C, 2 * C + head * dh, cols, dh, valid)


@triton.jit
def _load_state(state_ptr, bag, head, H, dh, DH: tl.constexpr):
    """``(S (DH, DH), z (DH,))`` of one bag and head from ``state: (B, H, dh + 1, dh)`` fp32."""
    i = tl.arange(0, DH)
    base = state_ptr + ((bag * H + head) * (dh + 1)).to(tl.int64) * dh
    state = tl.load(base + i[:, None] * dh + i[None, :], mask=(i[:, None] < dh) & (i[None, :] < dh), other=0.0)
    z = tl.load(base + dh * dh + i, mask=i < dh, other=0.0)
    return state, z


@triton.jit
def _store_partial(part_ptr, block, head, H, dh, mat, vec, DH: tl.constexpr):
    """``part[block, head] = [mat; vec]`` into ``part: (blocks, H, dh + 1, dh)`` fp32."""
    i = tl.arange(0, DH)
    base = part_ptr + ((block * H + head) * (dh + 1)).to(tl.int64) * dh
    tl.store(base + i[:, None] * dh + i[None, :], mat, mask=(i[:, None] < dh) & (i[None, :] < dh))
    tl.store(base + dh * dh + i, vec, mask=i < dh)


@triton.jit
def _state_kernel(qkv_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, part_ptr, C, H, dh,
                  ACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr,
                  DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """The partial ``S = phi(k)^T v`` and ``z = sum phi(k)`` of one split and head."""
    start, end, _ = _split(split_start_ptr, split_end_ptr, split_bag_ptr)
    head = tl.program_id(1)
    state = tl.zeros((DH, DH), tl.float32)
    z = tl.zeros((DH,), tl.float32)
    for row0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _rows(row0, end, valid_ptr, HAS_MASK, BLOCK_N)
        k_pre, k, v = _load_keys(qkv_ptr, rows64, valid, head, C, dh, ACT, DH)
        state += _dot(tl.trans(k), v, qkv_ptr, DOT_FP32, FP32_PRECISION)
        z += tl.sum(k, axis=0)
    _store_partial(part_ptr, tl.program_id(0), head, H, dh, state, z, DH)


@triton.jit
def _combine_kernel(part_ptr, bag_first_block_ptr, out_ptr, H, dh, BLOCK_B: tl.constexpr, DH: tl.constexpr):
    """``out[bag, head, row] = sum over the bag's blocks of part[block, head, row]`` (rows 0..dh), in order."""
    bag = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.program_id(2)
    first = tl.load(bag_first_block_ptr + bag)
    last = tl.load(bag_first_block_ptr + bag + 1)
    cols = tl.arange(0, DH)
    offs_b = tl.arange(0, BLOCK_B)
    acc = tl.zeros((DH,), tl.float32)
    for b0 in range(first, last, BLOCK_B):
        blocks = b0 + offs_b
        index = ((blocks * H + head) * (dh + 1) + row).to(tl.int64)[:, None] * dh + cols[None, :]
        acc += tl.sum(tl.load(part_ptr + index, mask=(blocks < last)[:, None] & (cols[None, :] < dh), other=0.0), axis=0)
    tl.store(out_ptr + ((bag * H + head) * (dh + 1) + row).to(tl.int64) * dh + cols, acc, mask=cols < dh)


@triton.jit
def _scaled_state(state_ptr, tau_ptr, bag, head, H, dh, DH: tl.constexpr):
    """``(tau S (DH, DH), z (DH,))`` of one bag and head."""
    state, z = _load_state(state_ptr, bag, head, H, dh, DH)
    return state * tl.load(tau_ptr + head).to(tl.float32), z


@triton.jit
def _numerator(qkv_ptr, state, z, rows64, valid, head, C, dh, ACT: tl.constexpr, DH: tl.constexpr,
               DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``(q_pre, q, numerator = q tau S, q . z)`` for a block of rows and a head, from ``state = tau S``."""
    cols = tl.arange(0, DH)
    q_pre = _load_head(qkv_ptr, rows64, 3 * C, head * dh, cols, dh, valid)
    q = tl.where(valid[:, None] & (cols[None, :] < dh), _phi(q_pre, ACT), 0.0)
    numerator = _dot(q, state, qkv_ptr, DOT_FP32, FP32_PRECISION)
    return q_pre, q, numerator, tl.sum(q * z[None, :], axis=1)


@triton.jit
def _denominator(q_dot_z, clamp_min, eps, CLAMP: tl.constexpr):
    if CLAMP:
        return tl.where(q_dot_z < clamp_min, clamp_min, q_dot_z)  # as torch.clamp_min: NaN stays NaN
    return q_dot_z + eps


@triton.jit
def _apply_kernel(qkv_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, state_ptr, tau_ptr,
                  out_ptr, numerator_ptr, map_ptr, C, H, dh, clamp_min, eps,
                  ACT: tl.constexpr, HAS_MASK: tl.constexpr, CLAMP: tl.constexpr, STORE_NUMERATOR: tl.constexpr,
                  STORE_MAP: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr,
                  DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``out[rows, head cols] = numerator / denominator`` over one split; optionally the numerator and its mean
    over dh."""
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr)
    head = tl.program_id(1)
    cols = tl.arange(0, DH)
    state, z = _scaled_state(state_ptr, tau_ptr, bag, head, H, dh, DH)
    row_means = tl.sum(state, axis=1) / dh  # mean_d(tau S): the map is q . mean_d(tau S)
    for row0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _rows(row0, end, valid_ptr, HAS_MASK, BLOCK_N)
        _, q, numerator, q_dot_z = _numerator(qkv_ptr, state, z, rows64, valid, head, C, dh, ACT, DH, DOT_FP32,
                                              FP32_PRECISION)
        # a masked row's numerator and denominator are 0 at eps = 0 (or clamp_min <= 0): 0, as the reference
        out = tl.where(valid[:, None], numerator / _denominator(q_dot_z, clamp_min, eps, CLAMP)[:, None], 0.0)
        store = row_ok[:, None] & (cols[None, :] < dh)
        columns = rows64[:, None] * C + head * dh + cols[None, :]
        tl.store(out_ptr + columns, out.to(out_ptr.dtype.element_ty), mask=store)
        if STORE_NUMERATOR:
            tl.store(numerator_ptr + columns, numerator.to(numerator_ptr.dtype.element_ty), mask=store)
        if STORE_MAP:
            tl.store(map_ptr + rows64 * H + head, tl.sum(q * row_means[None, :], axis=1), mask=row_ok)


@triton.jit
def _query_grad_kernel(qkv_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, state_ptr, tau_ptr,
                       d_out_ptr, d_numerator_ptr, d_map_ptr, d_qkv_ptr, part_ptr, C, H, dh, clamp_min, eps, map_scale,
                       ACT: tl.constexpr, HAS_MASK: tl.constexpr, CLAMP: tl.constexpr, HAS_DOUT: tl.constexpr,
                       HAS_DNUMERATOR: tl.constexpr, HAS_DMAP: tl.constexpr, BLOCK_N: tl.constexpr,
                       DH: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """The q part of ``d_qkv`` over one split and head, and the split's partial of ``dS' = q^T g`` and ``dz``
    (S' = tau S)."""
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr)
    head = tl.program_id(1)
    cols = tl.arange(0, DH)
    state, z = _scaled_state(state_ptr, tau_ptr, bag, head, H, dh, DH)
    d_state = tl.zeros((DH, DH), tl.float32)
    d_z = tl.zeros((DH,), tl.float32)
    for row0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _rows(row0, end, valid_ptr, HAS_MASK, BLOCK_N)
        q_pre, q, numerator, q_dot_z = _numerator(qkv_ptr, state, z, rows64, valid, head, C, dh, ACT, DH, DOT_FP32,
                                                  FP32_PRECISION)
        g_num, g_den = _output_grads(d_out_ptr, d_numerator_ptr, d_map_ptr, rows64, valid, numerator, q_dot_z, head,
                                     C, dh, clamp_min, eps, map_scale, CLAMP, HAS_DOUT, HAS_DNUMERATOR, HAS_DMAP,
                                     BLOCK_N, DH)
        d_q = _dot(g_num, tl.trans(state), qkv_ptr, DOT_FP32, FP32_PRECISION) + g_den[:, None] * z[None, :]
        d_q_pre = d_q * _phi_grad(q_pre, ACT)
        store = row_ok[:, None] & (cols[None, :] < dh)
        tl.store(d_qkv_ptr + rows64[:, None] * (3 * C) + head * dh + cols[None, :],
                 tl.where(valid[:, None], d_q_pre, 0.0).to(d_qkv_ptr.dtype.element_ty), mask=store)
        d_state += _dot(tl.trans(q), g_num, qkv_ptr, DOT_FP32, FP32_PRECISION)
        d_z += tl.sum(g_den[:, None] * q, axis=0)
    _store_partial(part_ptr, tl.program_id(0), head, H, dh, d_state, d_z, DH)


@triton.jit
def _output_grads(d_out_ptr, d_numerator_ptr, d_map_ptr, rows64, valid, numerator, q_dot_z, head, C, dh, clamp_min,
                  eps, map_scale, CLAMP: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DNUMERATOR: tl.constexpr,
                  HAS_DMAP: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr):
    """``(g_num (BLOCK_N, DH), g_den (BLOCK_N,))``: the gradients of a block's numerator and denominator from
    the upstream gradients present, 0 on masked rows."""
    cols = tl.arange(0, DH)
    denom = _denominator(q_dot_z, clamp_min, eps, CLAMP)
    g_num = tl.zeros((BLOCK_N, DH), tl.float32)
    g_den = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_DOUT:
        d_out = _load_head(d_out_ptr, rows64, C, head * dh, cols, dh, valid)
        g_num += d_out / denom[:, None]
        g_den -= tl.sum(d_out * numerator, axis=1) / (denom * denom)
    if HAS_DNUMERATOR:
        g_num += _load_head(d_numerator_ptr, rows64, C, head * dh, cols, dh, valid)
    if HAS_DMAP:
        d_map = tl.load(d_map_ptr + rows64, mask=valid, other=0.0).to(tl.float32)
        g_num += tl.where(cols[None, :] < dh, d_map[:, None] * map_scale, 0.0)
    if CLAMP:
        g_den = tl.where(q_dot_z >= clamp_min, g_den, 0.0)
    return tl.where(valid[:, None], g_num, 0.0), tl.where(valid, g_den, 0.0)


@triton.jit
def _key_grad_kernel(qkv_ptr, valid_ptr, split_start_ptr, split_end_ptr, split_bag_ptr, d_state_ptr, d_qkv_ptr,
                     C, H, dh, ACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr,
                     DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """The k and v parts of ``d_qkv`` over one split and head: dk = v dS^T + dz, dv = k dS (dS w.r.t. S)."""
    start, end, bag = _split(split_start_ptr, split_end_ptr, split_bag_ptr)
    head = tl.program_id(1)
    cols = tl.arange(0, DH)
    d_state, d_z = _load_state(d_state_ptr, bag, head, H, dh, DH)
    for row0 in range(start, end, BLOCK_N):
        rows64, row_ok, valid = _rows(row0, end, valid_ptr, HAS_MASK, BLOCK_N)
        k_pre, k, v = _load_keys(qkv_ptr, rows64, valid, head, C, dh, ACT, DH)
        d_k = _dot(v, tl.trans(d_state), qkv_ptr, DOT_FP32, FP32_PRECISION) + d_z[None, :]
        d_v = _dot(k, d_state, qkv_ptr, DOT_FP32, FP32_PRECISION)
        store = row_ok[:, None] & (cols[None, :] < dh)
        row_ptrs = d_qkv_ptr + rows64[:, None] * (3 * C) + head * dh + cols[None, :]
        d_k_pre = tl.where(valid[:, None], d_k * _phi_grad(k_pre, ACT), 0.0)
        tl.store(row_ptrs + C, d_k_pre.to(d_qkv_ptr.dtype.element_ty), mask=store)
        tl.store(row_ptrs + 2 * C, tl.where(valid[:, None], d_v, 0.0).to(d_qkv_ptr.dtype.element_ty), mask=store)


@dataclass(frozen=True)
class Plan:
    """What one call launches: the split table (:func:`split_rows` rows a split), the sizes and the op's options.

    It holds no input tensor, so keeping it on an autograd context keeps no activation alive.
    """

    table: BlockTable
    num_bags: int
    has_mask: bool
    num_heads: int
    head_dim: int
    activation: str
    denominator: str
    clamp_min: float
    eps: float

    @staticmethod
    def make(bags: Bags, num_heads, activation, denominator, clamp_min, eps) -> "Plan":
        table = block_table(bags.bounds, split_rows(bags.x2d.shape[0], num_heads), bags.x2d.device)
        head_dim = bags.x2d.shape[1] // 3 // num_heads
        return Plan(table, bags.num_bags, bags.row_valid is not None, num_heads, head_dim, activation, denominator,
                    clamp_min, eps)

    @property
    def block_dh(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))

    def flags(self, qkv2d, backward: bool = False) -> dict:
        """Constexprs and the launch's warps of the forward's row kernels, or of the gradient kernels."""
        block_n = gradient_block_n(qkv2d.dtype, self.block_dh) if backward else BLOCK_N
        return dict(ACT=ACTIVATION_CODES[self.activation], HAS_MASK=self.has_mask, BLOCK_N=block_n, DH=self.block_dh,
                    **dot_flags(qkv2d.dtype, triton_interpreted()), num_warps=row_num_warps(self.block_dh))

    def rows_args(self, qkv2d, row_valid):
        """The leading arguments of every row kernel: qkv, the row mask and the split table."""
        return qkv2d, row_valid if row_valid is not None else qkv2d, self.table.start, self.table.end, self.table.bag

    def grid(self):
        return (self.table.num_blocks, self.num_heads)

    def reduce(self, partials, rows):
        """Sum ``partials: (splits, H, dh + 1, dh)`` over each bag's splits: ``(B, H, dh + 1, dh)`` fp32."""
        out = _blocks.new_buffer(self.num_bags, self.num_heads, rows, self.head_dim,
                                 dtype=torch.float32, device=partials.device)
        grid = (self.num_bags, self.num_heads, rows)
        _combine_kernel[grid](partials, self.table.bag_first_block, out, self.num_heads, self.head_dim,
                              BLOCK_B=COMBINE_BLOCK_B, DH=self.block_dh)
        return out


def _partials(plan: Plan, device):
    return _blocks.new_buffer(plan.table.num_blocks, plan.num_heads, plan.head_dim + 1, plan.head_dim,
                              dtype=torch.float32, device=device)


def _tau(temperature, plan, like):
    return temperature if temperature is not None else torch.ones(plan.num_heads, dtype=like.dtype, device=like.device)


def forward(qkv2d, temperature, row_valid, plan: Plan, want_numerator: bool, want_map: bool, sum_shards=None):
    """``(out: (T, C), numerator: (T, H, dh) or None, map: (T,) or None, saved: (state,))``.

    ``row_valid: (T,)`` bool, or None without a mask. ``sum_shards``, under sequence parallelism, sums a
    ``(B, H, dh + 1, dh)`` fp32 state over the ranks in place.
    ``state: (B, H, dh + 1, dh)`` fp32 holds S (before the temperature) and z per bag and head.
    """
    total, channels = qkv2d.shape[0], qkv2d.shape[1] // 3
    heads, dh, device = plan.num_heads, plan.head_dim, qkv2d.device
    flags = plan.flags(qkv2d)
    partials = _partials(plan, device)
    _state_kernel[plan.grid()](*plan.rows_args(qkv2d, row_valid), partials, channels, heads, dh, **flags)
    state = plan.reduce(partials, dh + 1)
    if sum_shards is not None:
        sum_shards(state)
    out = _blocks.new_buffer(total, channels, dtype=qkv2d.dtype, device=device)
    numerator = _blocks.new_buffer(total, heads, dh, dtype=qkv2d.dtype, device=device) if want_numerator else out
    head_maps = _blocks.new_buffer(total, heads, dtype=torch.float32, device=device) if want_map else out
    _apply_kernel[plan.grid()](
        *plan.rows_args(qkv2d, row_valid), state, _tau(temperature, plan, qkv2d), out, numerator,
        head_maps,
        channels, heads, dh, plan.clamp_min, plan.eps, CLAMP=plan.denominator == "clamp",
        STORE_NUMERATOR=want_numerator, STORE_MAP=want_map, **flags)
    attention_map = head_maps.mean(dim=1).to(qkv2d.dtype) if want_map else None
    return out, numerator if want_numerator else None, attention_map, (state,)


def backward(qkv2d, temperature, row_valid, saved, plan: Plan, d_out, d_numerator, d_map, sum_shards=None):
    """``(d_qkv: (T, 3C), d_temperature: (H,) or None)`` from the upstream gradients (any may be None).

    With ``sum_shards`` (see :func:`forward`), the state's gradient is summed over the ranks before the keys'
    and values' gradients; the temperature's stays the rank's share, as the projection's."""
    (state,) = saved
    channels = qkv2d.shape[1] // 3
    heads, dh, device = plan.num_heads, plan.head_dim, qkv2d.device
    flags = plan.flags(qkv2d, backward=True)
    tau = _tau(temperature, plan, qkv2d)
    d_qkv = _blocks.new_buffer(*qkv2d.shape, dtype=qkv2d.dtype, device=device)
    partials = _partials(plan, device)
    present = [t.contiguous() if t is not None else qkv2d for t in (d_out, d_numerator, d_map)]
    _query_grad_kernel[plan.grid()](
        *plan.rows_args(qkv2d, row_valid), state, tau, *present, d_qkv, partials,
        channels, heads, dh, plan.clamp_min, plan.eps, 1.0 / (heads * dh), CLAMP=plan.denominator == "clamp",
        HAS_DOUT=d_out is not None, HAS_DNUMERATOR=d_numerator is not None, HAS_DMAP=d_map is not None, **flags)
    d_scaled = plan.reduce(partials, dh + 1)  # dS' (w.r.t. tau S) and dz
    d_state = d_scaled.clone()
    if sum_shards is not None:
        sum_shards(d_state)
    d_state[:, :, :dh] *= tau.float().reshape(1, heads, 1, 1)
    _key_grad_kernel[plan.grid()](*plan.rows_args(qkv2d, row_valid), d_state, d_qkv, channels, heads, dh, **flags)
    d_temperature = None
    if temperature is not None:
        d_temperature = (d_scaled[:, :, :dh] * state[:, :, :dh]).sum(dim=(0, 2, 3)).to(temperature.dtype)
    return d_qkv, d_temperature


_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def shipped_specializations():
    """Every kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, num_warps, aligned)`` as the launches build them: the three dtypes,
    head sizes padded to 16, 32 and 64, with and without a mask, both denominators, every activation,
    and each pair of optional outputs (numerator, map) with its matching backward. ``aligned``: the size
    arguments that are multiples of 16 at ``_AOT_HEADS`` heads of the example head size (a launch
    specializes on those).
    """
    configs = ((64, "relu", True, True), (20, "gelu", False, False), (16, "relu", False, True), (8, "tanh", True, False))
    for dtype, ptr in _POINTER_TYPES.items():
        for head_dim, activation, has_mask, clamp in configs:
            yield from _specializations_for(ptr, dtype, head_dim, activation, has_mask, clamp)
    for activation in ("elu", "leaky_relu", "softplus"):
        yield from _specializations_for("*bf16", torch.bfloat16, 64, activation, False, True)
    for block_dh, head_dim in ((16, 16), (32, 20), (64, 64)):
        yield (_combine_kernel, dict(part_ptr="*fp32", bag_first_block_ptr="*i32", out_ptr="*fp32", H="i32", dh="i32"),
               dict(BLOCK_B=COMBINE_BLOCK_B, DH=block_dh), 4,
               tuple(name for name in _aot_aligned(head_dim) if name != "C"))


_AOT_HEADS = 8  # the head count of the AOT examples: C = 8 * dh (TransMIL-like: 8 heads of 64 at C = 512)


def _aot_aligned(head_dim):
    """Which of the sizes ``C, H, dh`` are multiples of 16 at ``_AOT_HEADS`` heads of ``head_dim``."""
    sizes = dict(C=_AOT_HEADS * head_dim, H=_AOT_HEADS, dh=head_dim)
    return tuple(name for name, value in sizes.items() if value % 16 == 0)


def _specializations_for(ptr, dtype, head_dim, activation, has_mask, clamp):
    flags = dict(ACT=ACTIVATION_CODES[activation], HAS_MASK=has_mask, BLOCK_N=BLOCK_N,
                 DH=max(16, triton.next_power_of_2(head_dim)), **dot_flags(dtype, interpreted=False))
    rows = dict(qkv_ptr=ptr, valid_ptr="*i1" if has_mask else ptr, split_start_ptr="*i32", split_end_ptr="*i32",
                split_bag_ptr="*i32")
    sizes = dict(C="i32", H="i32", dh="i32")
    aligned = _aot_aligned(head_dim)
    warps = row_num_warps(flags["DH"])
    gradient_flags = dict(flags, BLOCK_N=gradient_block_n(dtype, flags["DH"]))
    yield _state_kernel, dict(rows, part_ptr="*fp32", **sizes), flags, warps, aligned
    common = dict(rows, state_ptr="*fp32", tau_ptr=ptr)
    for numerator, attention_map in ((False, False), (True, False), (False, True), (True, True)):
        yield (_apply_kernel, dict(common, out_ptr=ptr, numerator_ptr=ptr, map_ptr="*fp32" if attention_map else ptr,
                                   **sizes, clamp_min="fp32", eps="fp32"),
               dict(flags, CLAMP=clamp, STORE_NUMERATOR=numerator, STORE_MAP=attention_map), warps, aligned)
        yield (_query_grad_kernel, dict(common, d_out_ptr=ptr, d_numerator_ptr=ptr, d_map_ptr=ptr, d_qkv_ptr=ptr,
                                        part_ptr="*fp32", **sizes, clamp_min="fp32", eps="fp32", map_scale="fp32"),
               dict(gradient_flags, CLAMP=clamp, HAS_DOUT=True, HAS_DNUMERATOR=numerator, HAS_DMAP=attention_map),
               warps, aligned)
    yield (_key_grad_kernel, dict(rows, d_state_ptr="*fp32", d_qkv_ptr=ptr, **sizes), gradient_flags,
           warps, aligned)
