"""Cross-attention with a residual LayerNorm in Triton: a flash forward with the norm in its epilogue and a
two-kernel backward with an atomic dq (three kernels, deterministic, on request and in fp32).

Layout. Rows are packed bags, ``xq, q: (Tq, E)`` and ``k, v: (Tk, E)`` (contiguous). A program holds every head
of its rows as one 3-D tile ``(HP, rows, DHP)``: head ``h``, head column ``d`` is column ``h * dh + d``, with
``HP`` and ``DHP`` the head count and head size padded to powers of two (``DHP >= 16``), masked. The score and
value products are batched ``tl.dot`` over the heads, or under Triton before 3.9 one 2-D ``tl.dot`` a head at
one head, and at two in fp16 / bf16 (:func:`_flat_heads`).

- Forward (``_forward_kernel``), one program per block of query rows: the online softmax of each head over
  the keys of the rows' bag, then the epilogue: ``attn = A V``, ``y = xq + attn`` and the LayerNorm of ``y``
  over its E columns, so ``A V`` is never read back before the norm. Writes ``out``, ``attn`` (kept for
  the backward), the row ``mean`` and ``rstd`` and the per-head log-sum-exp ``lse`` (``-inf`` where the bag
  has no valid key: there ``attn = 0`` and ``out = LayerNorm(xq)``).
- Split-KV forward, when few query blocks would leave the GPU idle: ``_split_forward_kernel`` runs each
  query block over ``S`` ranges of its bag's keys and writes fp32 partials (running max, sum and
  unnormalized ``A V``); ``_combine_kernel`` merges them in a fixed order and runs the same epilogue.
- Backward: ``_norm_grad_kernel`` (at most ``NORM_GRAD_PROGRAMS`` programs, each looping over every
  ``num_programs``-th block of ``NORM_GRAD_ROWS`` of the query rows, whatever their bags) writes ``dy = d xq``
  (the LayerNorm's gradient, which is also the gradient of ``A V``), ``D = rowsum(dy * attn)`` per head and
  per-program partials of the weight and bias gradients (summed by torch); ``_key_grad_kernel`` (per key block
  and query range) writes ``dk`` and ``dv``, and in fp16 / bf16 adds each query tile's ``dS K`` atomically to an
  fp32 ``dq``: five products a tile (S, dP, dV, dK, dQ), FlashAttention-2's. Under
  ``torch.use_deterministic_algorithms``, always in fp32, and at one head of 256 under Triton before 3.9
  (:func:`_atomic_spilling_tiles`), ``dq`` comes instead from ``_query_grad_kernel`` (per query block and key
  range), which forms S and dP again (seven products) with no atomics. With several ranges the kernels write
  fp32 partials that torch sums in a fixed order.

Supported: ``HP * DHP <= 256`` and at most 8 heads (:func:`unsupported_shape`); other shapes run on the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted
from .. import _blocks
from .._blocks import BlockTable, atomic_dq, block_table, dot_flags
from ..dilated_attention.triton import _mm

MAX_PADDED_WIDTH = 256
MAX_HEADS = 8
TARGET_PROGRAMS = 264  # two per SM on an H100 / H200: below that, split the other side's rows
NORM_GRAD_PROGRAMS = 2 * TARGET_PROGRAMS  # the LayerNorm backward's programs, each looping over many query blocks
NORM_GRAD_ROWS = 16  # the LayerNorm backward's rows a block
MIN_SPLIT_ROWS = 512  # rows of the other side per split, at least (forward, dk/dv): see num_splits
MIN_QUERY_GRAD_SPLIT_ROWS = 1024  # keys per split of the deterministic dq kernel, at least: see num_splits
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _flat_heads() -> tuple[int, int]:
    """``(fp32, fp16 / bf16)``: the most heads a tile multiplies as one 2-D product a head (:func:`_heads_mm`)
    rather than one batched 3-D product: 1 and 2 under Triton before 3.9, 0 from 3.9 on. Triton 3.6 (the GPU
    machine's, with torch 2.11), 3.7 and 3.8 compile the one-head 3-D dot for sm_90 into 32 registers and 13-57 KB
    of local memory a thread at E = 128 (the kernels ran 30 times slower than PyTorch on the H200), and spill up
    to 16 KB at two heads in fp16 / bf16. As 2-D products, Triton 3.6's spills in the 88 fp16 / bf16 two-head
    specializations that multiply fell from 143 KB in all (84 spilling, up to 16 KB) to 9.2 KB (54, up to 868
    B); at 4 and 8 heads they grew (11 to 94 KB, 0 to 164 KB), and at two heads in fp32 (tf32x3, three products a tile)
    from 32 to 104 KB, so those stay 3-D. Triton 3.9 compiles the 3-D dot without a spill (and the one-head 2-D
    one with spills in the dk/dv kernel), so it keeps the 3-D dot."""
    return (1, 2) if _triton_before_3_9() else (0, 0)


def _triton_before_3_9() -> bool:
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9)


def _atomic_spilling_tiles() -> frozenset:
    """The tiles ``(HP, DHP)`` that take the deterministic dq kernel even where :func:`atomic_dq` allows the atomic
    one: ``(1, 256)`` under Triton before 3.9. Triton 3.6 compiles its atomic key kernel (32 x 32, fp16 / bf16) for
    sm_90 into 32 registers and 4.2-4.6 KB of local memory a thread, its two deterministic kernels into 183-188
    and 240-251 registers without a spill; Triton 3.9 compiles the atomic one without a spill."""
    return frozenset({(1, 256)}) if _triton_before_3_9() else frozenset()


ATOMIC_SPILLING_TILES = _atomic_spilling_tiles()


FLAT_HEADS_FP32, FLAT_HEADS_HALF = (tl.constexpr(heads) for heads in _flat_heads())


def padded_heads(heads: int, head_dim: int) -> tuple[int, int]:
    """``(HP, DHP)``: the head count and the head size as tile sizes, powers of two, ``DHP >= 16``."""
    return triton.next_power_of_2(heads), max(16, triton.next_power_of_2(head_dim))


def unsupported_shape(width: int, heads: int) -> list[str]:
    """Why the kernels cannot take rows of ``width`` columns in ``heads`` heads: a padded row (the epilogue
    holds one per query) wider than :data:`MAX_PADDED_WIDTH`, or more than :data:`MAX_HEADS` heads."""
    padded, padded_dim = padded_heads(heads, width // heads)
    if padded * padded_dim > MAX_PADDED_WIDTH:
        return [f"E={width} in {heads} heads pads to {padded} x {padded_dim} = {padded * padded_dim} columns per row, "
                f"more than the fused LayerNorm epilogue holds ({MAX_PADDED_WIDTH})"]
    if heads > MAX_HEADS:
        return [f"{heads} heads: the kernels take at most {MAX_HEADS} (their per-head score tiles of more spill)"]
    return []


@dataclass(frozen=True)
class Config:
    """Tile sizes: query and key rows per tile and warps, in the forward and in the backward."""

    forward_m: int
    forward_n: int
    forward_warps: int
    backward_m: int
    backward_n: int
    backward_warps: int


_CONFIGS = {
    (1, 16): Config(64, 64, 4, 64, 64, 4), (1, 32): Config(64, 64, 4, 64, 64, 4),
    (1, 64): Config(64, 64, 4, 64, 64, 8), (1, 128): Config(64, 64, 8, 32, 32, 4),
    (1, 256): Config(64, 64, 8, 32, 32, 8), (2, 16): Config(64, 64, 4, 64, 64, 4),
    (2, 32): Config(64, 64, 4, 64, 64, 8), (2, 64): Config(64, 64, 8, 32, 32, 8),
    (2, 128): Config(32, 32, 4, 32, 32, 8), (4, 16): Config(64, 64, 8, 64, 64, 8),
    (4, 32): Config(64, 64, 8, 32, 32, 8), (4, 64): Config(32, 32, 8, 32, 32, 8),
    (8, 16): Config(32, 32, 8, 32, 32, 8), (8, 32): Config(32, 32, 8, 16, 16, 4),
}
"""The fp16 and bf16 configuration of each ``(HP, DHP)`` the kernels take: the largest tiles (then the fewest
warps) that compile for sm_90 without a spill (``tests/aot.py``); the combine takes the forward's rows and warps
(``(8, 16)`` has 8 forward warps: its combine at 4 spills); the norm gradient its own (:func:`norm_grad_flags`)."""

_FP32_CONFIGS = {
    (1, 16): Config(64, 64, 8, 64, 64, 8), (1, 32): Config(64, 64, 8, 64, 32, 8),
    (1, 64): Config(64, 32, 8, 32, 32, 8), (1, 128): Config(32, 32, 8, 16, 16, 4),
    (1, 256): Config(16, 16, 4, 16, 16, 4), (2, 16): Config(64, 64, 8, 64, 32, 8),
    (2, 32): Config(64, 32, 8, 32, 32, 8), (2, 64): Config(32, 32, 8, 16, 16, 4),
    (2, 128): Config(16, 16, 4, 16, 16, 4), (4, 16): Config(64, 32, 8, 32, 32, 8),
    (4, 32): Config(32, 32, 8, 16, 16, 4), (4, 64): Config(32, 32, 8, 16, 16, 4),
    (8, 16): Config(32, 32, 8, 16, 16, 4), (8, 32): Config(16, 16, 4, 16, 16, 4),
}
"""The fp32 configurations (``tf32x3`` dots, three products a tile): the largest tiles without a spill within
160 KiB of shared memory (224 KiB for ``(4, 64)``), else the least spilling; wide rows spill in the backward."""


_LARGER_DENSE_CONFIGS = {
    (1, 16): Config(128, 64, 4, 64, 64, 4), (1, 32): Config(128, 64, 4, 64, 64, 4),
    (1, 64): Config(128, 64, 8, 64, 64, 8), (1, 128): Config(128, 64, 8, 64, 64, 8),
    (2, 16): Config(128, 64, 8, 64, 64, 4), (2, 32): Config(128, 64, 8, 64, 64, 8),
}
"""Where the dense kernels take larger fp16 / bf16 tiles than :data:`_CONFIGS` (which the local ones keep: a
larger block of Morton-ordered rows brings more candidates to each of its rows): 128 query rows a forward tile
and, at ``(1, 128)``, 64-row backward tiles, so each K, V element feeds twice the rows (issue 12's dot FLOPs a
byte); none spills on sm_90 (``(2, 64)`` and wider do at 128 rows)."""


_ATOMIC_KEY_TILES = {(1, 128): (16, 128)}
"""``(BLOCK_M, BLOCK_N)`` of the key kernel with the atomic ``dq`` (:func:`atomic_dq`: fp16 / bf16; fp32 only where
a test forces it) where they differ from the backward's: at ``(1, 128)`` (E = 128 in one head) 128 keys a
program, so each query tile's atomic ``dq`` adds and its q, dO reads feed twice the keys (bf16, 256 queries over
1024 keys: 79.7 dot FLOPs a requested byte where 64 x 64 gave 45.5); 16 query rows a step keep it from spilling
on sm_90 (32 spill 104 B). Every other tile compiles the atomic kernel without a spill at the backward's tiles."""


def config_for(tile: tuple[int, int], dtype, local: bool = False) -> Config:
    """The configuration of tile ``(HP, DHP)`` for inputs of ``dtype``, of the dense kernels or the ``local``
    ones."""
    if dtype == torch.float32:
        return _FP32_CONFIGS[tile]
    return _CONFIGS[tile] if local else _LARGER_DENSE_CONFIGS.get(tile, _CONFIGS[tile])


def kernel_flags(tile: tuple[int, int], dtype, interpreted: bool, backward: bool, dots: bool = True,
                 local: bool = False, atomic: bool = False) -> dict:
    """The constexprs and ``num_warps`` of a launch on tile ``(HP, DHP)``: the forward's or the backward's
    ``BLOCK_M`` and warps and, for the kernels that walk key or query tiles (``dots``), ``BLOCK_N`` and the dot
    settings for ``dtype``; of the dense kernels or the ``local`` ones (:func:`config_for`), or of the key kernel
    with the ``atomic`` dq (:data:`_ATOMIC_KEY_TILES`)."""
    cfg = config_for(tile, dtype, local)
    block_m, block_n, warps = ((cfg.backward_m, cfg.backward_n, cfg.backward_warps) if backward
                               else (cfg.forward_m, cfg.forward_n, cfg.forward_warps))
    if atomic:
        block_m, block_n = _ATOMIC_KEY_TILES.get(tile, (block_m, block_n))
    flags = dict(HP=tile[0], DHP=tile[1], BLOCK_M=block_m, num_warps=warps)
    return dict(flags, BLOCK_N=block_n, **dot_flags(dtype, interpreted)) if dots else flags


@triton.jit
def _heads_mm(a, b, like_ptr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``a @ b`` batched over the heads, ``(HP, M, K) @ (HP, K, N) -> (HP, M, N)`` fp32; at most
    :data:`FLAT_HEADS_FP32` or :data:`FLAT_HEADS_HALF` heads (by ``like_ptr``'s dtype) one 2-D product a head:
    the heads halved (:func:`_head_halves`) down to one, whose product is 2-D, reshaped."""
    flat_heads: tl.constexpr = FLAT_HEADS_FP32 if like_ptr.dtype.element_ty == tl.float32 else FLAT_HEADS_HALF
    if a.shape[0] <= flat_heads:
        if a.shape[0] == 1:
            product = _mm(tl.reshape(a, (a.shape[1], a.shape[2])), tl.reshape(b, (b.shape[1], b.shape[2])),
                          like_ptr, DOT_FP32, FP32_PRECISION)
            product = tl.reshape(product, (1, a.shape[1], b.shape[2]))
        else:
            a_lo, a_hi = _head_halves(a)
            b_lo, b_hi = _head_halves(b)
            product = _joined_heads(_heads_mm(a_lo, b_lo, like_ptr, DOT_FP32, FP32_PRECISION),
                                    _heads_mm(a_hi, b_hi, like_ptr, DOT_FP32, FP32_PRECISION))
    else:
        product = _mm(a, b, like_ptr, DOT_FP32, FP32_PRECISION)
    return product


@triton.jit
def _head_halves(a):
    """``(HP, M, K) -> ((HP / 2, M, K), (HP / 2, M, K))``: the first and the last half of the heads."""
    half: tl.constexpr = a.shape[0] // 2
    rows: tl.constexpr = a.shape[1]
    cols: tl.constexpr = a.shape[2]
    lo, hi = tl.split(tl.permute(tl.reshape(a, (2, half * rows * cols)), (1, 0)))
    return tl.reshape(lo, (half, rows, cols)), tl.reshape(hi, (half, rows, cols))


@triton.jit
def _joined_heads(lo, hi):
    """The inverse of :func:`_head_halves`."""
    half: tl.constexpr = lo.shape[0]
    rows: tl.constexpr = lo.shape[1]
    cols: tl.constexpr = lo.shape[2]
    joined = tl.join(tl.reshape(lo, (half * rows * cols,)), tl.reshape(hi, (half * rows * cols,)))
    return tl.reshape(tl.permute(joined, (1, 0)), (2 * half, rows, cols))


@triton.jit
def _columns(H, dh, HP: tl.constexpr, DHP: tl.constexpr):
    """Column ``h * dh + d`` of each head ``h`` and head column ``d``, ``(HP, 1, DHP)``, and whether it exists."""
    h = tl.arange(0, HP)[:, None, None]
    d = tl.arange(0, DHP)[None, None, :]
    return h * dh + d, (h < H) & (d < dh)


@triton.jit
def _head_elements(ptr, rows, ok, H, dh, E, HP: tl.constexpr, DHP: tl.constexpr):
    """The pointers to rows ``rows`` of a ``(T, E)`` array split into heads, ``(HP, len(rows), DHP)``, and which of
    them exist: in a head and on a row that is ok."""
    cols, in_head = _columns(H, dh, HP, DHP)
    return ptr + rows.to(tl.int64)[None, :, None] * E + cols, in_head & ok[None, :, None]


@triton.jit
def _load_heads(ptr, rows, ok, H, dh, E, HP: tl.constexpr, DHP: tl.constexpr):
    """Rows ``rows`` of ``(T, E)`` split into heads, ``(HP, len(rows), DHP)``; 0 outside the heads and rows not ok."""
    pointers, exists = _head_elements(ptr, rows, ok, H, dh, E, HP, DHP)
    return tl.load(pointers, mask=exists, other=0.0)


@triton.jit
def _store_heads(ptr, value, rows, ok, H, dh, E, HP: tl.constexpr, DHP: tl.constexpr):
    pointers, exists = _head_elements(ptr, rows, ok, H, dh, E, HP, DHP)
    tl.store(pointers, value.to(ptr.dtype.element_ty), mask=exists)


@triton.jit
def _add_heads(ptr, value, rows, ok, H, dh, E, HP: tl.constexpr, DHP: tl.constexpr):
    """Add ``value: (HP, len(rows), DHP)`` to rows ``rows`` of the float32 ``(T, E)`` at ``ptr``, atomically."""
    pointers, exists = _head_elements(ptr, rows, ok, H, dh, E, HP, DHP)
    tl.atomic_add(pointers, value, mask=exists, sem="relaxed")


@triton.jit
def _load_per_head(ptr, rows, ok, H, other, HP: tl.constexpr):
    """``(HP, len(rows))`` of a ``(T, H)`` float32 array; ``other`` outside."""
    h = tl.arange(0, HP)[:, None]
    return tl.load(ptr + rows.to(tl.int64)[None, :] * H + h, mask=(h < H) & ok[None, :], other=other)


@triton.jit
def _store_per_head(ptr, value, rows, ok, H, HP: tl.constexpr):
    h = tl.arange(0, HP)[:, None]
    tl.store(ptr + rows.to(tl.int64)[None, :] * H + h, value, mask=(h < H) & ok[None, :])


@triton.jit
def _load_vector(ptr, H, dh, HP: tl.constexpr, DHP: tl.constexpr):
    """An ``(E,)`` float32 vector (LayerNorm weight or bias) as ``(HP, 1, DHP)``; 0 outside the heads."""
    cols, in_head = _columns(H, dh, HP, DHP)
    return tl.load(ptr + cols, mask=in_head, other=0.0)


@triton.jit
def _row_sum(x):
    """``(rows,)``: the sum of ``x: (HP, rows, DHP)`` over every head and head column."""
    return tl.sum(tl.sum(x, axis=2), axis=0)


@triton.jit
def _own_rows(start_ptr, end_ptr, bag_ptr, BLOCK: tl.constexpr):
    """This program's block (axis 0) of a block table: its rows, which exist, and its bag."""
    block = tl.program_id(0)
    rows = tl.load(start_ptr + block) + tl.arange(0, BLOCK)
    return rows, rows < tl.load(end_ptr + block), tl.load(bag_ptr + block)


@triton.jit
def _split_range(cu_ptr, bag, BLOCK: tl.constexpr):
    """Rows ``[lo, hi)`` of ``bag`` in ``cu`` (B + 1 bounds) that this program's split (axis 1) takes: the
    bag cut into ``num_programs(1)`` ranges of whole ``BLOCK``s (the last ones may be short or empty)."""
    first = tl.load(cu_ptr + bag)
    last = tl.load(cu_ptr + bag + 1)
    chunk = tl.cdiv(tl.cdiv(last - first, tl.num_programs(1)), BLOCK) * BLOCK
    lo = first + tl.program_id(1) * chunk
    return lo, tl.minimum(lo + chunk, last)


@triton.jit
def _valid_keys(key_valid_ptr, keys, ok):
    return ok & (tl.load(key_valid_ptr + keys, mask=ok, other=0) != 0)


@triton.jit
def _softmax_step(scores, v, m, l, acc, like_ptr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """One key tile of the online softmax: ``scores: (HP, BLOCK_M, BLOCK_N)`` (``-inf`` where a key is not
    attended), ``v: (HP, BLOCK_N, DHP)``; returns the updated ``m``, ``l`` and ``acc``."""
    m_new = tl.maximum(m, tl.max(scores, axis=2))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, :, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, axis=2)
    acc = acc * alpha[:, :, None] + _heads_mm(p, v, like_ptr, DOT_FP32, FP32_PRECISION)
    return m_new, l, acc


@triton.jit
def _attend(q, k_ptr, v_ptr, key_valid_ptr, lo, hi, H, dh, E, scale, HP: tl.constexpr, DHP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """The online softmax of ``q: (HP, BLOCK_M, DHP)`` over the valid keys ``lo .. hi``: ``acc`` (unnormalized
    ``A V``, ``(HP, BLOCK_M, DHP)``), the running max ``m`` and sum ``l`` (``(HP, BLOCK_M)``), float32."""
    m = tl.full([HP, BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([HP, BLOCK_M], tl.float32)
    acc = tl.zeros([HP, BLOCK_M, DHP], tl.float32)
    for k0 in range(lo, hi, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = _valid_keys(key_valid_ptr, keys, keys < hi)
        k = _load_heads(k_ptr, keys, key_ok, H, dh, E, HP, DHP)
        v = _load_heads(v_ptr, keys, key_ok, H, dh, E, HP, DHP)
        scores = _heads_mm(q, tl.trans(k, 0, 2, 1), k_ptr, DOT_FP32, FP32_PRECISION) * scale
        scores = tl.where(key_ok[None, None, :], scores, float("-inf"))
        m, l, acc = _softmax_step(scores, v, m, l, acc, k_ptr, DOT_FP32, FP32_PRECISION)
    return acc, m, l


@triton.jit
def _epilogue(acc, m, l, rows, row_ok, xq_ptr, weight_ptr, bias_ptr, out_ptr, attn_ptr, mean_ptr, rstd_ptr, lse_ptr,
              H, dh, E, eps, HP: tl.constexpr, DHP: tl.constexpr):
    """From the softmax state of a block of rows: ``attn = acc / l`` (0 without keys) and its ``lse``, then
    ``out = LayerNorm(xq + attn)`` with the row's ``mean`` and ``rstd``; writes all five."""
    has_key = l > 0
    attn = tl.where(has_key[:, :, None], acc / tl.where(has_key, l, 1.0)[:, :, None], 0.0)
    _store_heads(attn_ptr, attn, rows, row_ok, H, dh, E, HP, DHP)
    _store_per_head(lse_ptr, tl.where(has_key, m + tl.log(tl.where(has_key, l, 1.0)), float("-inf")), rows, row_ok,
                    H, HP)
    y = _load_heads(xq_ptr, rows, row_ok, H, dh, E, HP, DHP).to(tl.float32) + attn
    mean = _row_sum(y) / E
    _, in_head = _columns(H, dh, HP, DHP)
    centered = tl.where(in_head, y - mean[None, :, None], 0.0)
    rstd = 1.0 / tl.sqrt(_row_sum(centered * centered) / E + eps)
    out = centered * rstd[None, :, None] * _load_vector(weight_ptr, H, dh, HP, DHP) + _load_vector(bias_ptr, H, dh,
                                                                                                   HP, DHP)
    _store_heads(out_ptr, out, rows, row_ok, H, dh, E, HP, DHP)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _forward_kernel(xq_ptr, q_ptr, k_ptr, v_ptr, key_valid_ptr, weight_ptr, bias_ptr,
                    out_ptr, attn_ptr, mean_ptr, rstd_ptr, lse_ptr, block_start_ptr, block_end_ptr, block_bag_ptr,
                    cu_k_ptr, H, dh, E, scale, eps, HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    rows, row_ok, bag = _own_rows(block_start_ptr, block_end_ptr, block_bag_ptr, BLOCK_M)
    lo, hi = _split_range(cu_k_ptr, bag, BLOCK_N)
    q = _load_heads(q_ptr, rows, row_ok, H, dh, E, HP, DHP)
    acc, m, l = _attend(q, k_ptr, v_ptr, key_valid_ptr, lo, hi, H, dh, E, scale, HP, DHP, BLOCK_M, BLOCK_N, DOT_FP32,
                        FP32_PRECISION)
    _epilogue(acc, m, l, rows, row_ok, xq_ptr, weight_ptr, bias_ptr, out_ptr, attn_ptr, mean_ptr, rstd_ptr, lse_ptr,
              H, dh, E, eps, HP, DHP)


@triton.jit
def _split_forward_kernel(q_ptr, k_ptr, v_ptr, key_valid_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
                          block_start_ptr, block_end_ptr, block_bag_ptr, cu_k_ptr, Tq, H, dh, E, scale,
                          HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    rows, row_ok, bag = _own_rows(block_start_ptr, block_end_ptr, block_bag_ptr, BLOCK_M)
    lo, hi = _split_range(cu_k_ptr, bag, BLOCK_N)
    q = _load_heads(q_ptr, rows, row_ok, H, dh, E, HP, DHP)
    acc, m, l = _attend(q, k_ptr, v_ptr, key_valid_ptr, lo, hi, H, dh, E, scale, HP, DHP, BLOCK_M, BLOCK_N, DOT_FP32,
                        FP32_PRECISION)
    split_rows = tl.program_id(1).to(tl.int64) * Tq
    _store_heads(part_acc_ptr + split_rows * E, acc, rows, row_ok, H, dh, E, HP, DHP)
    _store_per_head(part_max_ptr + split_rows * H, m, rows, row_ok, H, HP)
    _store_per_head(part_sum_ptr + split_rows * H, l, rows, row_ok, H, HP)


@triton.jit
def _combine_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, xq_ptr, weight_ptr, bias_ptr,
                    out_ptr, attn_ptr, mean_ptr, rstd_ptr, lse_ptr, block_start_ptr, block_end_ptr, block_bag_ptr,
                    num_splits, Tq, H, dh, E, eps, HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr):
    rows, row_ok, _ = _own_rows(block_start_ptr, block_end_ptr, block_bag_ptr, BLOCK_M)
    m = tl.full([HP, BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([HP, BLOCK_M], tl.float32)
    acc = tl.zeros([HP, BLOCK_M, DHP], tl.float32)
    for split in range(0, num_splits):
        split_rows = (tl.zeros([], tl.int64) + split) * Tq
        m_split = _load_per_head(part_max_ptr + split_rows * H, rows, row_ok, H, float("-inf"), HP)
        m_new = tl.maximum(m, m_split)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(m_split - m_safe)
        l = l * alpha + beta * _load_per_head(part_sum_ptr + split_rows * H, rows, row_ok, H, 0.0, HP)
        acc = acc * alpha[:, :, None] + beta[:, :, None] * _load_heads(part_acc_ptr + split_rows * E, rows, row_ok, H,
                                                                        dh, E, HP, DHP)
        m = m_new
    _epilogue(acc, m, l, rows, row_ok, xq_ptr, weight_ptr, bias_ptr, out_ptr, attn_ptr, mean_ptr, rstd_ptr, lse_ptr,
              H, dh, E, eps, HP, DHP)


@triton.jit
def _norm_grad_block(xq_ptr, attn_ptr, weight_ptr, mean_ptr, rstd_ptr, d_out_ptr, d_xq_ptr, delta_ptr, rows, row_ok,
                     H, dh, E, HP: tl.constexpr, DHP: tl.constexpr):
    """``dy`` (into ``d_xq``) and ``delta = rowsum(dy * attn)`` per head of query ``rows``; returns their
    ``(HP, 1, DHP)`` parts of the weight and bias gradients."""
    attn = _load_heads(attn_ptr, rows, row_ok, H, dh, E, HP, DHP).to(tl.float32)
    y = _load_heads(xq_ptr, rows, row_ok, H, dh, E, HP, DHP).to(tl.float32) + attn
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    _, in_head = _columns(H, dh, HP, DHP)
    normed = tl.where(in_head, (y - mean[None, :, None]) * rstd[None, :, None], 0.0)
    d_out = _load_heads(d_out_ptr, rows, row_ok, H, dh, E, HP, DHP).to(tl.float32)
    d_normed = d_out * _load_vector(weight_ptr, H, dh, HP, DHP)
    mean_grad = _row_sum(d_normed) / E
    mean_projection = _row_sum(d_normed * normed) / E
    d_y = tl.where(in_head, rstd[None, :, None] * (d_normed - mean_grad[None, :, None]
                                                  - normed * mean_projection[None, :, None]), 0.0)
    _store_heads(d_xq_ptr, d_y, rows, row_ok, H, dh, E, HP, DHP)
    _store_per_head(delta_ptr, tl.sum(d_y * attn, axis=2), rows, row_ok, H, HP)
    return tl.sum(d_out * normed, axis=1, keep_dims=True), tl.sum(d_out, axis=1, keep_dims=True)


@triton.jit
def _norm_grad_kernel(xq_ptr, attn_ptr, weight_ptr, mean_ptr, rstd_ptr, d_out_ptr, d_xq_ptr, delta_ptr, d_ln_ptr,
                      Tq, H, dh, E, HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr):
    """:func:`_norm_grad_block` over every ``num_programs``-th block of ``BLOCK_M`` of the ``Tq`` query rows
    (row-wise: bags do not matter) from this program's, and this program's ``d_ln: (2, E)`` partial (weight
    gradient, bias gradient), so the partials do not grow with N."""
    cols, in_head = _columns(H, dh, HP, DHP)
    d_weight = tl.zeros((HP, 1, DHP), tl.float32)
    d_bias = tl.zeros((HP, 1, DHP), tl.float32)
    for first in range(tl.program_id(0) * BLOCK_M, Tq, tl.num_programs(0) * BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        block_weight, block_bias = _norm_grad_block(xq_ptr, attn_ptr, weight_ptr, mean_ptr, rstd_ptr, d_out_ptr,
                                                    d_xq_ptr, delta_ptr, rows, rows < Tq, H, dh, E, HP, DHP)
        d_weight += block_weight
        d_bias += block_bias
    d_ln = d_ln_ptr + tl.program_id(0).to(tl.int64) * 2 * E + cols
    tl.store(d_ln, d_weight, mask=in_head)
    tl.store(d_ln + E, d_bias, mask=in_head)


@triton.jit
def _live_lse(lse_ptr, rows, row_ok, H, HP: tl.constexpr):
    """``(HP, len(rows))``: which (head, row) pairs saw a key, and their lse (0 where none did)."""
    lse = _load_per_head(lse_ptr, rows, row_ok, H, float("-inf"), HP)
    live = lse > float("-inf")
    return live, tl.where(live, lse, 0.0)


@triton.jit
def _query_side(q_ptr, d_attn_ptr, lse_ptr, delta_ptr, rows, row_ok, H, dh, E, HP: tl.constexpr, DHP: tl.constexpr):
    """What the gradient kernels read of query ``rows``: ``q`` and ``d_attn`` ``(HP, len(rows), DHP)``, and
    ``live``, ``lse`` and ``delta`` ``(HP, len(rows))``."""
    q = _load_heads(q_ptr, rows, row_ok, H, dh, E, HP, DHP)
    d_attn = _load_heads(d_attn_ptr, rows, row_ok, H, dh, E, HP, DHP)
    live, lse = _live_lse(lse_ptr, rows, row_ok, H, HP)
    return q, d_attn, live, lse, _load_per_head(delta_ptr, rows, row_ok, H, 0.0, HP)


@triton.jit
def _query_grad_step(q, k, v, d_attn, live, lse, delta, allowed, scale, like_ptr, DOT_FP32: tl.constexpr,
                     FP32_PRECISION: tl.constexpr):
    """One key tile's part of ``dq / scale`` for ``q, d_attn: (HP, BLOCK_M, DHP)`` over ``k, v: (HP, BLOCK_N,
    DHP)``; ``allowed`` broadcasts to ``(HP, BLOCK_M, BLOCK_N)``: which (query, key) pairs attend."""
    _, d_scores = _score_grad(q, k, v, d_attn, live, lse, delta, allowed, scale, like_ptr, DOT_FP32, FP32_PRECISION)
    return _heads_mm(d_scores, k, like_ptr, DOT_FP32, FP32_PRECISION)


@triton.jit
def _score_grad(q, k, v, d_attn, live, lse, delta, allowed, scale, like_ptr, DOT_FP32: tl.constexpr,
                FP32_PRECISION: tl.constexpr):
    """The attention ``P`` and the scores' gradient ``dS = P * (dP - D)``, ``(HP, BLOCK_M, BLOCK_N)``, of one
    query tile over one key tile: :func:`_query_grad_step`'s arguments."""
    scores = _heads_mm(q, tl.trans(k, 0, 2, 1), like_ptr, DOT_FP32, FP32_PRECISION) * scale
    p = tl.where(live[:, :, None] & allowed, tl.exp(scores - lse[:, :, None]), 0.0)
    d_p = _heads_mm(d_attn, tl.trans(v, 0, 2, 1), like_ptr, DOT_FP32, FP32_PRECISION)
    return p, p * (d_p - delta[:, :, None])


@triton.jit
def _key_grad_step(k, v, q, d_attn, live, lse, delta, allowed_t, d_k, d_v, scale, like_ptr, DOT_FP32: tl.constexpr,
                   FP32_PRECISION: tl.constexpr):
    """``(d_k, d_v)`` (``dk / scale`` and ``dv`` so far, ``(HP, BLOCK_N, DHP)``) plus one query tile's parts, for
    ``k, v: (HP, BLOCK_N, DHP)`` over ``q, d_attn: (HP, BLOCK_M, DHP)``; ``allowed_t`` broadcasts to ``(HP,
    BLOCK_N, BLOCK_M)``: which (key, query) pairs attend. ``d_v`` is updated first, freeing its product early."""
    scores_t = _heads_mm(k, tl.trans(q, 0, 2, 1), like_ptr, DOT_FP32, FP32_PRECISION) * scale
    p_t = tl.where(allowed_t & live[:, None, :], tl.exp(scores_t - lse[:, None, :]), 0.0)
    d_v += _heads_mm(p_t, d_attn, like_ptr, DOT_FP32, FP32_PRECISION)
    d_p_t = _heads_mm(v, tl.trans(d_attn, 0, 2, 1), like_ptr, DOT_FP32, FP32_PRECISION)
    d_k += _heads_mm(p_t * (d_p_t - delta[:, None, :]), q, like_ptr, DOT_FP32, FP32_PRECISION)
    return d_k, d_v


@triton.jit
def _query_grad_kernel(q_ptr, k_ptr, v_ptr, key_valid_ptr, lse_ptr, delta_ptr, d_attn_ptr, d_q_ptr,
                       block_start_ptr, block_end_ptr, block_bag_ptr, cu_k_ptr, Tq, H, dh, E, scale,
                       HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``dq`` of a block of query rows over one range of its bag's keys (split ``program_id(1)``)."""
    rows, row_ok, bag = _own_rows(block_start_ptr, block_end_ptr, block_bag_ptr, BLOCK_M)
    lo, hi = _split_range(cu_k_ptr, bag, BLOCK_N)
    q, d_attn, live, lse, delta = _query_side(q_ptr, d_attn_ptr, lse_ptr, delta_ptr, rows, row_ok, H, dh, E, HP, DHP)
    d_q = tl.zeros([HP, BLOCK_M, DHP], tl.float32)
    for k0 in range(lo, hi, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = _valid_keys(key_valid_ptr, keys, keys < hi)
        k = _load_heads(k_ptr, keys, key_ok, H, dh, E, HP, DHP)
        v = _load_heads(v_ptr, keys, key_ok, H, dh, E, HP, DHP)
        d_q += _query_grad_step(q, k, v, d_attn, live, lse, delta, key_ok[None, None, :], scale, q_ptr, DOT_FP32,
                                FP32_PRECISION)
    _store_heads(d_q_ptr + tl.program_id(1).to(tl.int64) * Tq * E, d_q * scale, rows, row_ok, H, dh, E, HP, DHP)


@triton.jit
def _key_grad_kernel(q_ptr, k_ptr, v_ptr, key_valid_ptr, lse_ptr, delta_ptr, d_attn_ptr, d_q_ptr, d_k_ptr, d_v_ptr,
                     block_start_ptr, block_end_ptr, block_bag_ptr, cu_q_ptr, Tk, H, dh, E, scale,
                     HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """``dk`` and ``dv`` of a block of key rows over one range of its bag's queries (split ``program_id(1)``).
    With ``ATOMIC_DQ``, also each query tile's part of ``dq``, ``dS K``, added atomically to the float32
    ``d_q_ptr`` (``(Tq, E)``, zeroed): five products a tile, where this kernel and ``_query_grad_kernel`` take seven."""
    keys, key_exists, bag = _own_rows(block_start_ptr, block_end_ptr, block_bag_ptr, BLOCK_N)
    key_ok = _valid_keys(key_valid_ptr, keys, key_exists)
    lo, hi = _split_range(cu_q_ptr, bag, BLOCK_M)
    k = _load_heads(k_ptr, keys, key_ok, H, dh, E, HP, DHP)
    v = _load_heads(v_ptr, keys, key_ok, H, dh, E, HP, DHP)
    d_k = tl.zeros([HP, BLOCK_N, DHP], tl.float32)
    d_v = tl.zeros([HP, BLOCK_N, DHP], tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        q, d_attn, live, lse, delta = _query_side(q_ptr, d_attn_ptr, lse_ptr, delta_ptr, rows, row_ok, H, dh, E, HP,
                                                  DHP)
        if ATOMIC_DQ:  # S = Q K^T untransposed: K and V only enter as B operands (the transposed form spills)
            p, d_scores = _score_grad(q, k, v, d_attn, live, lse, delta, key_ok[None, None, :], scale, q_ptr,
                                      DOT_FP32, FP32_PRECISION)
            d_v += _heads_mm(tl.trans(p, 0, 2, 1), d_attn, q_ptr, DOT_FP32, FP32_PRECISION)
            d_k += _heads_mm(tl.trans(d_scores, 0, 2, 1), q, q_ptr, DOT_FP32, FP32_PRECISION)
            d_q = _heads_mm(d_scores, k, q_ptr, DOT_FP32, FP32_PRECISION)
            _add_heads(d_q_ptr, d_q * scale, rows, row_ok, H, dh, E, HP, DHP)
        else:
            d_k, d_v = _key_grad_step(k, v, q, d_attn, live, lse, delta, key_ok[None, :, None], d_k, d_v, scale,
                                      q_ptr, DOT_FP32, FP32_PRECISION)
    split_rows = tl.program_id(1).to(tl.int64) * Tk
    _store_heads(d_k_ptr + split_rows * E, d_k * scale, keys, key_exists, H, dh, E, HP, DHP)
    _store_heads(d_v_ptr + split_rows * E, d_v, keys, key_exists, H, dh, E, HP, DHP)


def longest_bag(bounds) -> int:
    """The most rows of one bag, from the bag boundaries ``bounds`` (B + 1 ints)."""
    return max(stop - start for start, stop in zip(bounds[:-1], bounds[1:]))


def num_splits(num_blocks: int, longest_other_bag: int, min_split_rows: int) -> int:
    """Ranges to cut the other side's rows into: 1 from :data:`TARGET_PROGRAMS` blocks on, else enough to
    reach it, as long as each range of the longest bag of the other side keeps ``min_split_rows`` rows.

    Each range re-reads its block's rows and writes fp32 partials, so a range needs enough rows for its products
    to amortize them (issue 12's 80 dot FLOPs per requested byte; bf16, E = 128 in one head): the split forward
    requests 72.7 at 256 keys a range, 92.7 at :data:`MIN_SPLIT_ROWS` = 512; the deterministic dq kernel (three
    products, reading q and dO) 63.7 at 256, 76.6 at 512, 85.1 at :data:`MIN_QUERY_GRAD_SPLIT_ROWS` = 1024. Where
    they bind (few query blocks over fewer than about 512 x 264 / blocks keys), a call runs fewer programs than
    :data:`TARGET_PROGRAMS`, each on a short range: a trade of parallelism for bytes that a GPU run should weigh."""
    if num_blocks >= TARGET_PROGRAMS:
        return 1
    return max(1, min(-(-TARGET_PROGRAMS // max(num_blocks, 1)), longest_other_bag // min_split_rows))


class Plan:
    """What every launch of one call shares: the block tables, the splits, the constexprs. The bags' bounds go
    to the device in one copy; each block table is built on first use (the forward's query blocks in the
    forward, the backward's query and key blocks in the backward: a host-to-device copy each)."""

    def __init__(self, xq, bounds_q, bounds_k, heads: int):
        self.query_rows, self.width = xq.shape
        self.key_rows = bounds_k[-1]
        self.heads, self.head_dim = heads, self.width // heads
        self.tile, self.dtype = padded_heads(heads, self.head_dim), xq.dtype
        self.config = config_for(self.tile, self.dtype)
        self.device = xq.device
        self.bounds_q, self.bounds_k = bounds_q, bounds_k
        self.cu_q, self.cu_k = _blocks.to_device([torch.tensor(bounds_q), torch.tensor(bounds_k)], self.device)
        # fp32's atomic kernel spilled in a trial sm_90 compile at (1, 128) (380 B) and (2, 64) (16 B)
        self.atomic_dq = atomic_dq(self.dtype) and self.tile not in ATOMIC_SPILLING_TILES

    @functools.cached_property
    def forward_queries(self) -> BlockTable:
        """The forward's blocks of query rows."""
        return block_table(self.bounds_q, self.config.forward_m, self.device)

    @functools.cached_property
    def backward_queries(self) -> BlockTable:
        """The dq kernel's blocks of query rows."""
        return block_table(self.bounds_q, self.config.backward_m, self.device)

    @functools.cached_property
    def backward_keys(self) -> BlockTable:
        """The dk/dv kernel's blocks of key rows."""
        return block_table(self.bounds_k, self.backward_flags(self.atomic_dq)["BLOCK_N"], self.device)

    @functools.cached_property
    def forward_splits(self) -> int:
        """Key ranges a forward query block takes (:func:`num_splits`)."""
        return num_splits(self.forward_queries.num_blocks, longest_bag(self.bounds_k), MIN_SPLIT_ROWS)

    @functools.cached_property
    def query_grad_splits(self) -> int:
        """Key ranges a dq query block takes."""
        return num_splits(self.backward_queries.num_blocks, longest_bag(self.bounds_k), MIN_QUERY_GRAD_SPLIT_ROWS)

    @functools.cached_property
    def key_grad_splits(self) -> int:
        """Query ranges a dk/dv key block takes."""
        return num_splits(self.backward_keys.num_blocks, longest_bag(self.bounds_q), MIN_SPLIT_ROWS)

    def sizes(self) -> tuple[int, int, int]:
        return self.heads, self.head_dim, self.width

    def forward_flags(self, dots: bool = True) -> dict:
        """The forward kernels' :func:`kernel_flags`; without ``dots``, the combine's."""
        return kernel_flags(self.tile, self.dtype, triton_interpreted(), backward=False, dots=dots)

    def backward_flags(self, atomic: bool = False) -> dict:
        """The dq and dk/dv kernels' :func:`kernel_flags`; the key kernel's with the ``atomic`` dq."""
        return kernel_flags(self.tile, self.dtype, triton_interpreted(), backward=True, atomic=atomic)


def _table(table) -> tuple:
    return table.start, table.end, table.bag


def _split_buffer(splits: int, like: torch.Tensor) -> torch.Tensor:
    """Where a kernel split ``splits`` ways writes a gradient of ``like``'s shape: a buffer in ``like``'s dtype for
    one split, else fp32 partials ``(splits, *like.shape)``."""
    if splits == 1:
        return _blocks.new_buffer(*like.shape, dtype=like.dtype, device=like.device)
    return _blocks.new_buffer(splits, *like.shape, dtype=torch.float32, device=like.device)


def _split_total(buffer: torch.Tensor, splits: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient from :func:`_split_buffer`'s buffer: the partials summed in order, in ``like``'s dtype."""
    return buffer if splits == 1 else buffer.sum(0).to(like.dtype)


def forward(xq, q, k, v, key_valid, weight, bias, plan: Plan, scale: float, eps: float):
    """``(out, attn, mean, rstd, lse)`` of contiguous ``xq, q: (Tq, E)`` and ``k, v: (Tk, E)``, ``key_valid: (Tk,)``
    bool and float32 ``weight, bias: (E,)``: ``out`` and ``attn`` ``(Tq, E)`` in xq's dtype, ``mean, rstd: (Tq,)``
    and ``lse: (Tq, H)`` float32."""
    out, attn = (_blocks.new_buffer(*xq.shape, dtype=xq.dtype, device=xq.device) for _ in range(2))
    mean, rstd = (_blocks.new_buffer(plan.query_rows, dtype=torch.float32, device=xq.device) for _ in range(2))
    lse = _blocks.new_buffer(plan.query_rows, plan.heads, dtype=torch.float32, device=xq.device)
    table, splits = plan.forward_queries, plan.forward_splits
    if table.num_blocks == 0:
        return out, attn, mean, rstd, lse
    epilogue = (xq, weight, bias, out, attn, mean, rstd, lse, *_table(table))
    if splits == 1:
        _forward_kernel[(table.num_blocks,)](xq, q, k, v, key_valid, weight, bias, out, attn, mean, rstd, lse,
                                             *_table(table), plan.cu_k, *plan.sizes(), scale, eps,
                                             **plan.forward_flags())
        return out, attn, mean, rstd, lse
    part_acc = _blocks.new_buffer(splits, *xq.shape, dtype=torch.float32, device=xq.device)
    part_max, part_sum = (_blocks.new_buffer(splits, plan.query_rows, plan.heads, dtype=torch.float32,
                                             device=xq.device) for _ in range(2))
    _split_forward_kernel[(table.num_blocks, splits)](q, k, v, key_valid, part_acc, part_max, part_sum, *_table(table),
                                                      plan.cu_k, plan.query_rows, *plan.sizes(), scale,
                                                      **plan.forward_flags())
    _combine_kernel[(table.num_blocks,)](part_acc, part_max, part_sum, *epilogue, splits, plan.query_rows,
                                         *plan.sizes(), eps, **plan.forward_flags(dots=False))
    return out, attn, mean, rstd, lse


def backward(xq, q, k, v, key_valid, weight, attn, mean, rstd, lse, d_out, plan: Plan, scale: float):
    """``(d_xq, d_q, d_k, d_v, d_ln)``: the first four in their input's shape and dtype, ``d_ln: (2, E)`` float32
    (the LayerNorm weight's gradient, then the bias's), from the forward's saved tensors and ``d_out``. ``dq`` comes
    from the kernels :func:`atomic_dq` picks."""
    d_xq = _blocks.new_buffer(*xq.shape, dtype=xq.dtype, device=xq.device)
    delta = _blocks.new_buffer(plan.query_rows, plan.heads, dtype=torch.float32, device=xq.device)
    d_k, d_v = (_split_buffer(plan.key_grad_splits, k) for _ in range(2))
    d_ln = norm_grad(xq, attn, weight, mean, rstd, d_out, d_xq, delta, plan.heads, plan.tile)
    query_side = (q, k, v, key_valid, lse, delta, d_xq)
    if plan.atomic_dq:
        d_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _key_grads(query_side, d_q, d_k, d_v, plan, scale)
        return d_xq, d_q.to(q.dtype), *_key_totals(d_k, d_v, k, v, plan), d_ln
    queries = plan.backward_queries
    d_q = _split_buffer(plan.query_grad_splits, q)
    if queries.num_blocks:
        _query_grad_kernel[(queries.num_blocks, plan.query_grad_splits)](
            *query_side, d_q, *_table(queries), plan.cu_k, plan.query_rows, *plan.sizes(), scale,
            **plan.backward_flags())
    _key_grads(query_side, torch.empty(0, dtype=torch.float32, device=q.device), d_k, d_v, plan, scale)
    return d_xq, _split_total(d_q, plan.query_grad_splits, q), *_key_totals(d_k, d_v, k, v, plan), d_ln


def _key_grads(query_side: tuple, d_q, d_k, d_v, plan: Plan, scale: float) -> None:
    """Launch ``_key_grad_kernel`` over ``query_side`` (q, k, v, key_valid, lse, delta, d_attn) into the buffers
    ``d_k, d_v`` and, with the plan's atomic dq, adding into the zeroed float32 ``d_q`` (else an empty float32
    tensor, unused)."""
    keys = plan.backward_keys
    if keys.num_blocks:
        _key_grad_kernel[(keys.num_blocks, plan.key_grad_splits)](
            *query_side, d_q, d_k, d_v, *_table(keys), plan.cu_q, plan.key_rows, *plan.sizes(), scale,
            ATOMIC_DQ=plan.atomic_dq, **plan.backward_flags(plan.atomic_dq))


def _key_totals(d_k, d_v, k, v, plan: Plan) -> tuple:
    """``(dk, dv)`` in ``k``'s and ``v``'s dtype from the key kernel's buffers (:func:`_split_total`)."""
    return _split_total(d_k, plan.key_grad_splits, k), _split_total(d_v, plan.key_grad_splits, v)


def norm_grad(xq, attn, weight, mean, rstd, d_out, d_xq, delta, heads: int, tile: tuple[int, int]) -> torch.Tensor:
    """The LayerNorm backward over the ``Tq`` rows of ``xq: (Tq, E)`` in ``heads`` heads, padded to ``tile``:
    writes ``dy`` into ``d_xq: (Tq, E)`` and ``delta: (Tq, H)``; returns ``d_ln: (2, E)`` float32 (the weight's
    gradient, then the bias's), summed from at most :data:`NORM_GRAD_PROGRAMS` programs' partials."""
    rows, width = xq.shape
    programs = min(triton.cdiv(rows, NORM_GRAD_ROWS), NORM_GRAD_PROGRAMS)
    d_ln = _blocks.new_buffer(programs, 2, width, dtype=torch.float32, device=xq.device)
    if programs:
        _norm_grad_kernel[(programs,)](xq, attn, weight, mean, rstd, d_out, d_xq, delta, d_ln, rows, heads,
                                       width // heads, width, **norm_grad_flags(tile))
    return d_ln.sum(0)


def norm_grad_flags(tile: tuple[int, int]) -> dict:
    """``_norm_grad_kernel``'s constexprs and warps on tile ``(HP, DHP)``: :data:`NORM_GRAD_ROWS` rows a block and
    8 warps for every tile and dtype, which none spills at (32 rows at the backward's warps spilled)."""
    return dict(HP=tile[0], DHP=tile[1], BLOCK_M=NORM_GRAD_ROWS, num_warps=8)


def _signatures(ptr: str, grad_ptr: str) -> dict:
    """Each kernel's argument types for inputs of pointer type ``ptr``; the dq and dk/dv kernels write ``grad_ptr``."""
    table = dict(block_start_ptr="*i32", block_end_ptr="*i32", block_bag_ptr="*i32")
    sizes = dict(H="i32", dh="i32", E="i32")
    rows = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, key_valid_ptr="*i1")
    outputs = dict(out_ptr=ptr, attn_ptr=ptr, mean_ptr="*fp32", rstd_ptr="*fp32", lse_ptr="*fp32")
    params = dict(weight_ptr="*fp32", bias_ptr="*fp32")
    parts = dict(part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32")
    grads = dict(lse_ptr="*fp32", delta_ptr="*fp32", d_attn_ptr=ptr)
    return {
        _forward_kernel: dict(xq_ptr=ptr, **rows, **params, **outputs, **table, cu_k_ptr="*i32", **sizes,
                              scale="fp32", eps="fp32"),
        _split_forward_kernel: dict(rows, **parts, **table, cu_k_ptr="*i32", Tq="i32", **sizes, scale="fp32"),
        _combine_kernel: dict(parts, xq_ptr=ptr, **params, **outputs, **table, num_splits="i32", Tq="i32", **sizes,
                              eps="fp32"),
        _norm_grad_kernel: dict(xq_ptr=ptr, attn_ptr=ptr, weight_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
                                d_out_ptr=ptr, d_xq_ptr=ptr, delta_ptr="*fp32", d_ln_ptr="*fp32", Tq="i32",
                                **sizes),
        _query_grad_kernel: dict(rows, **grads, d_q_ptr=grad_ptr, **table, cu_k_ptr="*i32", Tq="i32", **sizes,
                                 scale="fp32"),
        _key_grad_kernel: dict(rows, **grads, d_q_ptr="*fp32", d_k_ptr=grad_ptr, d_v_ptr=grad_ptr, **table,
                               cu_q_ptr="*i32", Tk="i32", **sizes, scale="fp32"),
    }


def shipped_specializations():
    """Every kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, num_warps, aligned)`` as the launches build them, for the three
    dtypes and every ``(HP, DHP)`` tile (:data:`_CONFIGS`): the forward, the split forward and its combine, and
    the four backward kernels, the dq and dk/dv ones writing the gradient's dtype (one split) and, for fp16 and
    bf16, also float32 partials; for fp16 and bf16, the dk/dv kernel with the atomic dq too, writing either, but
    at the tiles that take the deterministic dq (:data:`ATOMIC_SPILLING_TILES`). ``aligned``: E and dh, multiples
    of 16 where the head size is.
    """
    for dtype, ptr in _POINTER_TYPES.items():
        for tile in _CONFIGS:
            aligned = ("E", "dh")
            launches = {kernel: kernel_flags(tile, dtype, False, backward, dots) for kernel, backward, dots in (
                (_forward_kernel, False, True), (_split_forward_kernel, False, True), (_combine_kernel, False, False),
                (_query_grad_kernel, True, True), (_key_grad_kernel, True, True))}
            launches[_norm_grad_kernel] = norm_grad_flags(tile)
            launches[_key_grad_kernel].update(ATOMIC_DQ=False)
            atomic = dict(kernel_flags(tile, dtype, False, backward=True, atomic=True), ATOMIC_DQ=True)
            for grad_ptr in dict.fromkeys((ptr, "*fp32")):
                signatures = _signatures(ptr, grad_ptr)
                kernels = launches if grad_ptr == ptr else (_query_grad_kernel, _key_grad_kernel)
                runs = [(kernel, launches[kernel]) for kernel in kernels]
                if dtype != torch.float32 and tile not in ATOMIC_SPILLING_TILES:
                    runs.append((_key_grad_kernel, atomic))
                for kernel, launch in runs:
                    flags = dict(launch)
                    warps = flags.pop("num_warps")
                    yield kernel, signatures[kernel], flags, warps, aligned
