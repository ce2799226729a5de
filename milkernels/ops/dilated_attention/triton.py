"""Dilated attention in Triton: a fused forward over every branch and a FlashAttention-2 style backward.

Layout. Rows are packed bags ``q, k, v: (T, H, dh)`` (contiguous). With ``R = lcm(r_i)``, a program owns ``BLOCK``
positions of one bag that are congruent modulo R: ``p = c + R * j`` (a later forward or key launch's programs take
``ROWS * PARTS`` rows or 128 keys modulo the lcm of the rates of the branches no earlier launch took:
:func:`forward_launches`, :func:`key_launches`). Because every ``r_i`` of a launch divides its period, a branch
either covers all of a program's rows for its head (``c % r_i == g_i(h)``) or none of them. The rows of a branch's
segments are addressed as ``t -> s * sl + (t % Lsp) * r + g`` with ``s = t // Lsp`` (segment ``s``, kept row ``t %
Lsp``): strided loads, nothing gathered or copied.

- Forward, one program per (row block, head): for each covering branch, the key tiles of the segments
  its rows fall in, one online softmax over all of them. In ``torchscale`` mode that single softmax is
  exactly upstream's merge (``sum_i softmax_i(lse_i) out_i`` is one softmax over the branches' key
  sets, shared keys counted twice); the zero-padded keys of a bag's last segment add ``exp(0 - m)``
  each, counted without being read. In ``exact`` mode a key an earlier covering branch already gave
  the row is skipped, padding is never a key and the mask applies. Writes ``out`` and its fp32 ``lse``;
  in torchscale mode, where the backward takes the atomic dq (:func:`keeps_branches`), also each branch's
  own output ``out_i`` (each branch then runs its own online softmax, merged into the row's at its end).
- Backward: a query kernel writes ``dq`` and the per-row ``D`` (``exact``: ``dout . out``;
  ``torchscale``: ``D_i = dout . out_i`` per branch, from sums over the branch's keys in the same pass,
  since upstream's merge weights take no gradient: ``dS = P (dP - D_i)`` with ``P = exp(s - lse)``);
  a key kernel, one program per key block, walks the queries of each branch it belongs to (those at
  positions in a range: under sequence parallelism, the rank's own) and writes ``dk`` and ``dv``; with the
  atomic dq, on 128 keys of a residue for the branches whose segments hold them, then adding the others' in
  later launches, modulo the lcm of the rates left (:func:`key_launches`).
  Deterministic, except in fp16 / bf16 in exact mode and in torchscale mode with the branch outputs kept
  (:func:`atomic_dq`): there the key kernel also adds each query step's ``dS K`` to a zeroed float32 ``dq``
  with atomics and :func:`_delta_kernel` only finds ``D`` or each ``D_i`` (from ``out_i``): 5 products a tile
  pair instead of 7 (exact) or 8 (torchscale, whose query kernel also takes ``P K`` for ``D_i``).

Head dim: a tile of the next power of two, or two tiles side by side (:func:`head_tiles`: 32 + 16 for
Prov-GigaPath's dh = 48 in fp16/bf16 on 64-row blocks), so that the products take 48 columns, not 64; every
q, k, v, out and gradient tile is then a pair ``(main, tail)`` and every product over or into the head dim
two products.

Supported: every branch with ``r`` dividing ``sl = min(w, N)`` or a single segment (``w >= N``);
otherwise torchscale shifts the rows of later segments, which only the reference reproduces
(:func:`unsupported_branches`).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted
from .. import _blocks
from .._blocks import atomic_dq, dot_flags
from .reference import head_group_size, segment_spans

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
HALF_DTYPES = (torch.float16, torch.bfloat16)  # fp16 and bf16, whose tiles and rules differ from fp32's
ALL_POSITIONS = 2**30  # the key kernel's query range stop on whole bags: past every bag (and int32-safe)


def block_size(head_dim: int, segments, rates, longest_bag: int, mode: str) -> int:
    """Rows (or keys) per program, congruent modulo R = lcm(rates): 32 when dh pads to more than 64. Else
    exact mode takes 64 (its 32-row kernels spill on sm_90), and torchscale mode 64 when a block of 64 such
    rows (64 R positions) fits in every branch's segment ``min(w, N)``, else 32, so short segments waste
    fewer score tiles on pairs from different segments."""
    if padded_head_dim(head_dim) > 64:
        return 32
    if mode == "exact":
        return 64
    return 64 if shortest_segment(segments, longest_bag) >= 64 * math.lcm(*rates) else 32


def shortest_segment(segments, longest_bag: int) -> int:
    """The fewest positions of one segment of any branch on a bag of ``longest_bag`` rows: ``min(w, N)``."""
    return min(min(w, longest_bag) for w in segments)


def widest_block(head_dim: int, dtype, segments, rates, longest_bag: int, mode: str) -> int:
    """The most positions of one residue that a program of any kernel covers on inputs of ``dtype``: the forward's
    rows (:func:`forward_tiles`), in exact mode at least the key kernel's ``WIDE_BLOCK`` keys with the atomic dq
    (:func:`key_launches`; a bound, taken for every dtype)."""
    block = block_size(head_dim, segments, rates, longest_bag, mode)
    rows, parts = forward_tiles(dtype, block, math.lcm(*rates), shortest_segment(segments, longest_bag))
    return max(rows * parts, WIDE_BLOCK) if mode == "exact" else rows * parts


WIDE_BLOCK = 128
"""Rows (or keys) of one residue a wide program takes: the forward's rows in one part where ``WIDE_BLOCK * R``
positions fit in every segment (:func:`forward_tiles`), the atomic key kernel's keys for the branches whose
segments hold them (:func:`key_launches`)."""


def forward_tiles(dtype, block: int, period: int, shortest_segment: int) -> tuple[int, int]:
    """``(ROWS, PARTS)``: a forward program takes ``PARTS`` parts of ``ROWS`` query rows, over key tiles of
    ``block``. In fp16 / bf16 on 64-row blocks :data:`WIDE_BLOCK` rows, so each k, v tile it reads feeds up to
    twice the rows: one part where they (``WIDE_BLOCK * period`` positions) fit in the shortest segment, else two
    of 64, each with its own key range, so that a branch whose segments divide them (Prov-GigaPath's first, 1024
    positions at R = 16) forms no score tile of one part with the other's keys. Else ``(block, 1)``."""
    if dtype not in HALF_DTYPES or block != 64:
        return block, 1
    return (WIDE_BLOCK, 1) if WIDE_BLOCK * period <= shortest_segment else (block, 2)


def padded_head_dim(head_dim: int) -> int:
    """The head dim as one tile width: the next power of two, at least 32."""
    return max(32, triton.next_power_of_2(head_dim))


def head_tiles(head_dim: int, dtype, block: int) -> tuple[int, int]:
    """The head dim as the widths ``(main, tail)`` of two tiles side by side: ``(32, 16)`` for 32 < dh <= 48
    (Prov-GigaPath's 48) in fp16/bf16 on 64-row blocks, 48 columns where one padded tile has 64. Else
    ``(padded_head_dim, 0)``: there the two tiles spill on sm_90 (fp32's tf32x3 products; the torchscale dq
    kernel on 32-row blocks)."""
    if 32 < head_dim <= 48 and dtype in HALF_DTYPES and block == 64:
        return 32, 16
    return padded_head_dim(head_dim), 0


def longest_bag(bounds) -> int:
    """The most rows of one bag, from the bag boundaries ``bounds`` (B + 1 ints)."""
    return max(stop - start for start, stop in zip(bounds[:-1], bounds[1:]))


def unsupported_branches(bounds, segments, rates, mode: str) -> list[str]:
    """Why the kernels cannot run these branches on bags ``bounds``: in torchscale mode, a branch whose
    rate does not divide its segment length on a bag longer than the segment."""
    if mode != "torchscale":
        return []
    longest = longest_bag(bounds)
    return [f"branch (w={w}, r={r}): r does not divide w and a bag of {longest} > w rows has several segments, "
            "whose rows torchscale shifts (only the reference reproduces that)"
            for w, r in zip(segments, rates) if w % r and longest > w]


def unsupported_shape(head_dim: int, dtype, mode: str) -> list[str]:
    """Why no kernel is shipped for this head size, dtype and mode: exact mode's fp16/bf16 kernels for head
    dims above 64 (their 64-row tiles take too many registers, and the 32-row ones spill on sm_90)."""
    if mode == "exact" and dtype in HALF_DTYPES and padded_head_dim(head_dim) > 64:
        return [f"exact mode in {dtype} takes dh <= 64 on the kernels (dh={head_dim}: its sm_90 compile spills)"]
    return []


@triton.jit
def _mm(a, b, like_ptr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """a @ b: fp32 operands (tf32x3 on a GPU) for fp32 input and under the interpreter, else the input dtype."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32_PRECISION)
    return tl.dot(a.to(like_ptr.dtype.element_ty), b.to(like_ptr.dtype.element_ty))


@triton.jit
def _block(start_ptr, length_ptr, residue_ptr, first_ptr, R, BLOCK: tl.constexpr):
    """This program's bag (start row, length N), residue c, its positions ``c + R * j`` and which exist."""
    blk = tl.program_id(0)
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    residue = tl.load(residue_ptr + blk)
    first = tl.load(first_ptr + blk)
    positions = residue + R * (first + tl.arange(0, BLOCK))
    return start, length, residue, positions, positions < length


@triton.jit
def _branch(segment_ptr, rate_ptr, i, length, head, H, EXACT: tl.constexpr):
    """Branch ``i`` on a bag of ``length`` rows for ``head``: segment span ``sl``, rate ``r``, the head's
    group ``g``, kept rows per segment ``lsp`` and the kept-row index where the real rows end."""
    w = tl.load(segment_ptr + i)
    r = tl.load(rate_ptr + i)
    sl = w if EXACT else tl.minimum(w, length)
    g = head // tl.cdiv(H, r)
    lsp = tl.cdiv(sl, r)
    last = tl.cdiv(length, sl) - 1
    return sl, r, g, lsp, last * lsp + _real_rows(last, length, sl, r, g, lsp)


@triton.jit
def _real_rows(segment, length, sl, r, g, lsp):
    """How many of a segment's ``lsp`` kept rows are real positions of the bag (the rest are zero padding)."""
    return tl.minimum(tl.maximum(tl.cdiv(length - segment * sl - g, r), 0), lsp)


@triton.jit
def _kept_rows(t, sl, r, g, lsp):
    """Segment and bag position of kept-row index ``t`` of a branch."""
    segment = t // lsp
    return segment, segment * sl + (t - segment * lsp) * r + g


@triton.jit
def _kept_index(position, sl, r, g, lsp):
    """The kept-row index of a branch's first kept row at or after bag position ``position``."""
    segment = position // sl
    return segment * lsp + tl.minimum(tl.maximum(tl.cdiv(position - segment * sl - g, r), 0), lsp)


@triton.jit
def _zero_keys(positions, length, sl, r, g, lsp):
    """Per row: the zero-padded keys of its segment (torchscale counts them, score 0 and value 0)."""
    segment = positions // sl
    last = tl.cdiv(length, sl) - 1
    return tl.where(segment == last, lsp - _real_rows(segment, length, sl, r, g, lsp), 0).to(tl.float32)


@triton.jit
def _counted_before(i, query_pos, key_pos, segment_ptr, rate_ptr, head, H):
    """``[N, M]`` bool for keys ``key_pos [N, 1]`` and queries ``query_pos [1, M]``: the key already reaches
    the query through an earlier branch ``j < i`` (exact mode)."""
    seen = (query_pos < 0) | (key_pos < 0)  # all False, in the broadcast shape
    for j in range(0, i):
        w = tl.load(segment_ptr + j)
        r = tl.load(rate_ptr + j)
        g = head // tl.cdiv(H, r)
        seen |= (query_pos % r == g) & (key_pos % r == g) & (query_pos // w == key_pos // w)
    return seen


@triton.jit
def _drop_counted_before_rows(allowed, i, residue, rows, keys, segment_ptr, rate_ptr, head, H):
    """``allowed: [M, N]`` bool, cleared where key ``keys[n]`` already reaches row ``rows[m]`` through an earlier
    branch (exact mode). The rows share their residue modulo the launch's period, which every earlier branch's
    rate divides (:func:`forward_launches`), so whether branch ``j`` covers them is one scalar test. Clearing
    ``allowed`` in place, not building a second mask, keeps the 128-row forward at dh 64 from spilling under
    Triton 3.6 (4 B)."""
    for j in range(0, i):
        w = tl.load(segment_ptr + j)
        r = tl.load(rate_ptr + j)
        g = head // tl.cdiv(H, r)
        if residue % r == g:
            allowed &= ((rows // w)[:, None] != (keys // w)[None, :]) | (keys % r != g)[None, :]
    return allowed


@triton.jit
def _columns(ptr, rows, ok, start, head, H, dh, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """Pointers to columns ``FIRST .. FIRST + WIDTH`` of rows ``start + rows`` of head ``head`` in ``(T, H, dh)``,
    ``(len(rows), WIDTH)``, and which of them exist (row ok, column below dh)."""
    d = FIRST + tl.arange(0, WIDTH)
    offsets = ((start + rows).to(tl.int64) * H + head) * dh
    return ptr + offsets[:, None] + d[None, :], ok[:, None] & (d[None, :] < dh)


@triton.jit
def _load_columns(ptr, rows, ok, start, head, H, dh, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """The :func:`_columns` of ``ptr``: ``(len(rows), WIDTH)``; 0 where not ok or past dh."""
    pointers, exists = _columns(ptr, rows, ok, start, head, H, dh, FIRST, WIDTH)
    return tl.load(pointers, mask=exists, other=0.0)


@triton.jit
def _load_rows(ptr, rows, ok, start, head, H, dh, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr):
    """Rows ``start + rows`` of head ``head`` from ``(T, H, dh)`` as the tiles ``(main, tail)``: columns
    ``[0, BLOCK_DH)`` and ``[BLOCK_DH, BLOCK_DH + TAIL_DH)`` (when TAIL_DH is 0, a zero tile of 16
    columns, never loaded, stored or multiplied)."""
    main = _load_columns(ptr, rows, ok, start, head, H, dh, 0, BLOCK_DH)
    if TAIL_DH > 0:
        tail = _load_columns(ptr, rows, ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    else:
        tail = tl.zeros([rows.shape[0], 16], main.dtype)
    return main, tail


@triton.jit
def _store_columns(ptr, value, rows, ok, start, head, H, dh, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    pointers, exists = _columns(ptr, rows, ok, start, head, H, dh, FIRST, WIDTH)
    tl.store(pointers, value.to(ptr.dtype.element_ty), mask=exists)


@triton.jit
def _store_rows(ptr, main, tail, rows, ok, start, head, H, dh, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr):
    """Write the tiles ``(main, tail)`` of :func:`_load_rows` to rows ``start + rows`` of head ``head``."""
    _store_columns(ptr, main, rows, ok, start, head, H, dh, 0, BLOCK_DH)
    if TAIL_DH > 0:
        _store_columns(ptr, tail, rows, ok, start, head, H, dh, BLOCK_DH, TAIL_DH)


@triton.jit
def _add_rows(ptr, main, tail, rows, ok, start, head, H, dh, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr):
    """Add the fp32 tiles ``(main, tail)`` to rows ``start + rows`` of head ``head`` of the float32 ``(T, H, dh)`` at
    ``ptr``, atomically."""
    pointers, exists = _columns(ptr, rows, ok, start, head, H, dh, 0, BLOCK_DH)
    tl.atomic_add(pointers, main, mask=exists, sem="relaxed")
    if TAIL_DH > 0:
        pointers, exists = _columns(ptr, rows, ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
        tl.atomic_add(pointers, tail, mask=exists, sem="relaxed")


@triton.jit
def _mm_t(a, a_tail, b, b_tail, like_ptr, TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr,
          FP32_PRECISION: tl.constexpr):
    """``a @ b^T`` over the head dim of two tiled rows (:func:`_load_rows`): ``(len(a), len(b))`` fp32."""
    product = _mm(a, tl.trans(b), like_ptr, DOT_FP32, FP32_PRECISION)
    if TAIL_DH > 0:
        product += _mm(a_tail, tl.trans(b_tail), like_ptr, DOT_FP32, FP32_PRECISION)
    return product


@triton.jit
def _mm_rows(p, b, b_tail, like_ptr, TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``p @ b`` for tiled rows ``b`` (:func:`_load_rows`), as the tiles ``(main, tail)`` in fp32."""
    main = _mm(p, b, like_ptr, DOT_FP32, FP32_PRECISION)
    if TAIL_DH > 0:
        tail = _mm(p, b_tail, like_ptr, DOT_FP32, FP32_PRECISION)
    else:
        tail = tl.zeros([p.shape[0], 16], tl.float32)
    return main, tail


@triton.jit
def _row_valid(valid_ptr, rows, ok, start, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return ok & (tl.load(valid_ptr + start + rows, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _load_keys(t0, t_end, sl, r, g, lsp, k_ptr, v_ptr, valid_ptr, start, head, H, dh, HAS_MASK: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr):
    """The keys ``t0 .. t0 + BLOCK`` (kept-row indices, below ``t_end``) of a branch: their bag positions and
    segments, which are real and unmasked, and ``k, v`` as tiles ``(main, tail)`` (:func:`_load_rows`)."""
    key_segment, keys = _kept_rows(t0 + tl.arange(0, BLOCK), sl, r, g, lsp)
    key_ok = _row_valid(valid_ptr, keys, t0 + tl.arange(0, BLOCK) < t_end, start, HAS_MASK)
    k, k_tail = _load_rows(k_ptr, keys, key_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    v, v_tail = _load_rows(v_ptr, keys, key_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    return keys, key_segment, key_ok, k, k_tail, v, v_tail


@triton.jit
def _scores(q, q_tail, k, k_tail, rows, rows_ok, keys, key_segment, key_ok, i, sl, residue, q_ptr, segment_ptr,
            rate_ptr, head, H, scale, EXACT: tl.constexpr, TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr,
            FP32_PRECISION: tl.constexpr):
    """The scaled scores ``q k^T: (len(rows), len(keys))`` of branch ``i`` and which pairs count (same segment, key
    real and unmasked, row in ``rows_ok``; in exact mode not already given by an earlier branch)."""
    scores = _mm_t(q, q_tail, k, k_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION) * scale
    allowed = ((rows // sl)[:, None] == key_segment[None, :]) & key_ok[None, :] & rows_ok[:, None]
    if EXACT:
        allowed = _drop_counted_before_rows(allowed, i, residue, rows, keys, segment_ptr, rate_ptr, head, H)
    return scores, allowed


@triton.jit
def _key_tile(t0, t_end, i, sl, r, g, lsp, residue, rows, rows_ok, q, q_tail, q_ptr, k_ptr, v_ptr, valid_ptr,
              segment_ptr, rate_ptr, start, head, H, dh, scale, EXACT: tl.constexpr, HAS_MASK: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr,
              FP32_PRECISION: tl.constexpr):
    """:func:`_load_keys` and :func:`_scores` for the block's rows: ``k, k_tail, v, v_tail, scores, allowed``."""
    keys, key_segment, key_ok, k, k_tail, v, v_tail = _load_keys(t0, t_end, sl, r, g, lsp, k_ptr, v_ptr, valid_ptr,
                                                                 start, head, H, dh, HAS_MASK, BLOCK, BLOCK_DH,
                                                                 TAIL_DH)
    scores, allowed = _scores(q, q_tail, k, k_tail, rows, rows_ok, keys, key_segment, key_ok, i, sl, residue, q_ptr,
                              segment_ptr, rate_ptr, head, H, scale, EXACT, TAIL_DH, DOT_FP32, FP32_PRECISION)
    return k, k_tail, v, v_tail, scores, allowed


@triton.jit
def _branch_slot(rate_ptr, i, head, H):
    """Head ``head``'s column in branch ``i``'s outputs, as :func:`_forward_kernel` keeps them ``(T, slots, dh)``:
    branch ``j`` takes ``G_j = ceil(H / r_j)`` columns (one per head of a group, since a position's heads of
    the other groups do not run that branch), after those of the branches before it."""
    slot = head % tl.cdiv(H, tl.load(rate_ptr + i))
    for j in range(0, i):
        slot += tl.cdiv(H, tl.load(rate_ptr + j))
    return slot


@triton.jit
def _merged(m, l, acc, acc_tail, m_b, l_b, acc_b, acc_b_tail):
    """The online-softmax state ``(m, l, acc, acc_tail)`` with a branch's own ``(m_b, l_b, acc_b, acc_b_tail)``
    added."""
    m_new = tl.maximum(m, m_b)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    beta = tl.exp(m_b - m_safe)
    return (m_new, l * alpha + l_b * beta, acc * alpha[:, None] + acc_b * beta[:, None],
            acc_tail * alpha[:, None] + acc_b_tail * beta[:, None])


@triton.jit
def _empty_state(q_tail, BLOCK_DH: tl.constexpr):
    """A fresh online-softmax state ``(m, l, acc, acc_tail)`` for the rows of ``q_tail``."""
    return (tl.full([q_tail.shape[0]], float("-inf"), tl.float32), tl.zeros([q_tail.shape[0]], tl.float32),
            tl.zeros([q_tail.shape[0], BLOCK_DH], tl.float32), tl.zeros(q_tail.shape, tl.float32))


@triton.jit
def _with_zero_keys(m, l, acc, acc_tail, rows, row_ok, length, sl, r, g, lsp):
    """The state with the zero-padded keys of each row's segment counted (torchscale: score 0, value 0)."""
    zeros = tl.where(row_ok, _zero_keys(rows, length, sl, r, g, lsp), 0.0)
    m_new = tl.where(zeros > 0, tl.maximum(m, 0.0), m)
    alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
    l = l * alpha + zeros * tl.exp(-tl.where(zeros > 0, m_new, 0.0))
    return m_new, l, acc * alpha[:, None], acc_tail * alpha[:, None]


@triton.jit
def _key_range(rows, last_row, sl, lsp, real_end):
    """Kept-row indices ``[lo, end)`` of a branch's keys in the segments of ``rows`` (up to ``last_row``)."""
    return tl.min(rows // sl, axis=0) * lsp, tl.minimum((last_row // sl + 1) * lsp, real_end)


@triton.jit
def _attend(m, l, acc, acc_tail, q, q_tail, rows, row_ok, keys, key_segment, key_ok, k, k_tail, v, v_tail, i, sl,
            residue, q_ptr, segment_ptr, rate_ptr, head, H, scale, EXACT: tl.constexpr, TAIL_DH: tl.constexpr,
            DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """The online-softmax state of ``rows`` with one key tile of :func:`_load_keys` added."""
    scores, allowed = _scores(q, q_tail, k, k_tail, rows, row_ok, keys, key_segment, key_ok, i, sl, residue, q_ptr,
                              segment_ptr, rate_ptr, head, H, scale, EXACT, TAIL_DH, DOT_FP32, FP32_PRECISION)
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, axis=1)
    pv, pv_tail = _mm_rows(p, v, v_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
    return m_new, l, acc * alpha[:, None] + pv, acc_tail * alpha[:, None] + pv_tail


@triton.jit
def _store_rows_result(out_ptr, lse_ptr, valid_ptr, m, l, acc, acc_tail, rows, row_ok, start, head, H, dh,
                       HAS_MASK: tl.constexpr, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr):
    """Write ``out`` and the fp32 ``lse`` of the rows from their final state."""
    has_keys = _row_valid(valid_ptr, rows, row_ok, start, HAS_MASK) & (l > 0)
    _store_output(out_ptr, acc, acc_tail, l, has_keys, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("-inf"))
    tl.store(lse_ptr + (start + rows).to(tl.int64) * H + head, lse, mask=row_ok)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, lse_ptr, branch_out_ptr, start_ptr, length_ptr,
                    residue_ptr, first_ptr, segment_ptr, rate_ptr, branch_ptr, H, dh, R, num_branches, scale, slots,
                    EXACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr,
                    TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
                    KEEP_BRANCHES: tl.constexpr, ROWS: tl.constexpr, PARTS: tl.constexpr, MERGE: tl.constexpr):
    """``out`` and ``lse`` of the block's ``ROWS * PARTS`` rows (:func:`forward_tiles`) over the ``num_branches``
    branches whose indices ``branch_ptr`` lists (:class:`ForwardLaunch`), written, or with ``MERGE`` merged into those
    an earlier launch wrote, over tiles of ``BLOCK`` keys; with ``KEEP_BRANCHES`` (torchscale mode) also each covering
    branch's own output ``out_i`` in column :func:`_branch_slot` of ``branch_out: (T, slots, dh)`` (else unused): each
    branch then runs its own online softmax, merged into the rows' at its end. With ``PARTS = 2``
    (:func:`forward_tiles`) the rows are two parts of ``ROWS``, each with its own state and key range: a key tile is
    read once for both where their ranges meet and multiplied by the part (or parts) whose range it is in, so a branch
    whose segments the parts do not share forms no score tile of one part with the other's keys."""
    head = tl.program_id(1)
    start, length, residue, rows, row_ok = _block(start_ptr, length_ptr, residue_ptr, first_ptr, R, ROWS)
    q, q_tail = _load_rows(q_ptr, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    m, l, acc, acc_tail = _empty_state(q_tail, BLOCK_DH)
    last_row = tl.max(tl.where(row_ok, rows, 0), axis=0)
    if PARTS == 2:
        rows_b = rows + R * ROWS
        row_ok_b = rows_b < length
        q_b, q_b_tail = _load_rows(q_ptr, rows_b, row_ok_b, start, head, H, dh, BLOCK_DH, TAIL_DH)
        m_b, l_b, acc_b, acc_b_tail = _empty_state(q_b_tail, BLOCK_DH)
        last_row_b = tl.max(tl.where(row_ok_b, rows_b, 0), axis=0)
        has_rows_b = tl.max(row_ok_b.to(tl.int32), axis=0) > 0
    covering = 0  # how many of the launch's branches cover the block's residue for this head
    for n in range(0, num_branches):
        i = tl.load(branch_ptr + n)
        sl, r, g, lsp, real_end = _branch(segment_ptr, rate_ptr, i, length, head, H, EXACT)
        covering += (residue % r == g).to(tl.int32)
        if residue % r == g:
            if KEEP_BRANCHES:
                m_kept, l_kept, acc_kept, acc_kept_tail = m, l, acc, acc_tail
                m, l, acc, acc_tail = _empty_state(q_tail, BLOCK_DH)
                if PARTS == 2:
                    m_kept_b, l_kept_b, acc_kept_b, acc_kept_b_tail = m_b, l_b, acc_b, acc_b_tail
                    m_b, l_b, acc_b, acc_b_tail = _empty_state(q_b_tail, BLOCK_DH)
            if not EXACT:
                m, l, acc, acc_tail = _with_zero_keys(m, l, acc, acc_tail, rows, row_ok, length, sl, r, g, lsp)
                if PARTS == 2:
                    m_b, l_b, acc_b, acc_b_tail = _with_zero_keys(m_b, l_b, acc_b, acc_b_tail, rows_b, row_ok_b,
                                                                  length, sl, r, g, lsp)
            t_lo, t_end = _key_range(rows, last_row, sl, lsp, real_end)
            t_stop = t_end
            if PARTS == 2:
                t_lo_b, t_end_b = _key_range(rows_b, last_row_b, sl, lsp, real_end)
                t_stop = tl.maximum(t_end, t_end_b)
                t_lo_b = tl.where(has_rows_b, t_lo_b, t_stop + BLOCK)  # past every tile: no row to multiply
            for t0 in range(t_lo, t_stop, BLOCK):
                keys, key_segment, key_ok, k, k_tail, v, v_tail = _load_keys(
                    t0, t_stop, sl, r, g, lsp, k_ptr, v_ptr, valid_ptr, start, head, H, dh, HAS_MASK, BLOCK,
                    BLOCK_DH, TAIL_DH)
                if PARTS == 1:
                    m, l, acc, acc_tail = _attend(
                        m, l, acc, acc_tail, q, q_tail, rows, row_ok, keys, key_segment, key_ok, k, k_tail, v, v_tail,
                        i, sl, residue, q_ptr, segment_ptr, rate_ptr, head, H, scale, EXACT, TAIL_DH, DOT_FP32,
                        FP32_PRECISION)
                else:
                    if t0 < t_end:
                        m, l, acc, acc_tail = _attend(
                            m, l, acc, acc_tail, q, q_tail, rows, row_ok, keys, key_segment, key_ok, k, k_tail, v,
                            v_tail, i, sl, residue, q_ptr, segment_ptr, rate_ptr, head, H, scale, EXACT, TAIL_DH,
                            DOT_FP32, FP32_PRECISION)
                    if t0 + BLOCK > t_lo_b:
                        m_b, l_b, acc_b, acc_b_tail = _attend(
                            m_b, l_b, acc_b, acc_b_tail, q_b, q_b_tail, rows_b, row_ok_b, keys, key_segment, key_ok,
                            k, k_tail, v, v_tail, i, sl, residue, q_ptr, segment_ptr, rate_ptr, head, H, scale, EXACT,
                            TAIL_DH, DOT_FP32, FP32_PRECISION)
            if KEEP_BRANCHES:
                slot = _branch_slot(rate_ptr, i, head, H)
                _store_output(branch_out_ptr, acc, acc_tail, l, row_ok, rows, row_ok, start, slot, slots, dh,
                              BLOCK_DH, TAIL_DH)
                m, l, acc, acc_tail = _merged(m_kept, l_kept, acc_kept, acc_kept_tail, m, l, acc, acc_tail)
                if PARTS == 2:
                    _store_output(branch_out_ptr, acc_b, acc_b_tail, l_b, row_ok_b, rows_b, row_ok_b, start, slot,
                                  slots, dh, BLOCK_DH, TAIL_DH)
                    m_b, l_b, acc_b, acc_b_tail = _merged(m_kept_b, l_kept_b, acc_kept_b, acc_kept_b_tail, m_b, l_b,
                                                          acc_b, acc_b_tail)
    _finish_rows(out_ptr, lse_ptr, valid_ptr, m, l, acc, acc_tail, rows, row_ok, covering, start, head, H, dh,
                 HAS_MASK, BLOCK_DH, TAIL_DH, MERGE)
    if PARTS == 2:
        _finish_rows(out_ptr, lse_ptr, valid_ptr, m_b, l_b, acc_b, acc_b_tail, rows_b, row_ok_b, covering, start, head,
                     H, dh, HAS_MASK, BLOCK_DH, TAIL_DH, MERGE)


@triton.jit
def _finish_rows(out_ptr, lse_ptr, valid_ptr, m, l, acc, acc_tail, rows, row_ok, covering, start, head, H, dh,
                 HAS_MASK: tl.constexpr, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr, MERGE: tl.constexpr):
    """:func:`_store_rows_result` of the rows' final state; with ``MERGE``, merged first with the ``out`` (in the
    input dtype) and ``lse`` an earlier launch wrote, as the state ``(lse, 1, out)``. Where no branch of the launch
    covers the block (``covering`` 0), the earlier launch's rows stay as they are."""
    if MERGE:
        row_ok = tl.where(covering > 0, row_ok, False)
        before, before_tail = _load_rows(out_ptr, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
        lse = tl.load(lse_ptr + (start + rows).to(tl.int64) * H + head, mask=row_ok, other=float("-inf"))
        m, l, acc, acc_tail = _merged(lse, tl.where(lse > float("-inf"), 1.0, 0.0), before.to(tl.float32),
                                      before_tail.to(tl.float32), m, l, acc, acc_tail)
    _store_rows_result(out_ptr, lse_ptr, valid_ptr, m, l, acc, acc_tail, rows, row_ok, start, head, H, dh, HAS_MASK,
                       BLOCK_DH, TAIL_DH)


@triton.jit
def _store_output(ptr, acc, acc_tail, l, live, rows, row_ok, start, head, H, dh, BLOCK_DH: tl.constexpr,
                  TAIL_DH: tl.constexpr):
    """Write ``acc / l`` of the rows ``start + rows`` where ``row_ok`` (0 where not ``live`` or ``l`` is 0) to head
    ``head`` of the ``(T, H, dh)`` at ``ptr``."""
    has_keys = live & (l > 0)
    l_safe = tl.where(has_keys, l, 1.0)[:, None]
    out = tl.where(has_keys[:, None], acc / l_safe, 0.0)
    out_tail = tl.where(has_keys[:, None], acc_tail / l_safe, 0.0)
    _store_rows(ptr, out, out_tail, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)


@triton.jit
def _row_delta(out_ptr, d_out, d_out_tail, rows, live, start, head, H, dh, BLOCK_DH: tl.constexpr,
               TAIL_DH: tl.constexpr):
    """``D = dout . out: (len(rows),)`` fp32 of the rows ``start + rows`` (0 where not live), from the fp32 tiles
    ``(d_out, d_out_tail)`` of :func:`_load_rows`."""
    out, out_tail = _load_rows(out_ptr, rows, live, start, head, H, dh, BLOCK_DH, TAIL_DH)
    delta = tl.sum(d_out * out.to(tl.float32), axis=1)
    if TAIL_DH > 0:
        delta += tl.sum(d_out_tail * out_tail.to(tl.float32), axis=1)
    return delta


@triton.jit
def _delta_kernel(out_ptr, branch_out_ptr, d_out_ptr, delta_ptr, start_ptr, length_ptr, residue_ptr, first_ptr,
                  rate_ptr, T, H, dh, R, num_branches, slots, EXACT: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr):
    """The query side's only task with the atomic dq: exact mode's ``D = dout . out`` of the block's rows, or
    torchscale's ``D_i = dout . out_i`` of each branch covering them, from the forward's ``branch_out: (T, slots,
    dh)`` (:func:`_branch_slot`), at ``delta[i]`` of ``(branches, T, H)``. Unlike the query kernel's, it does not
    zero masked rows and rows with no keys (their ``out`` is 0): the key kernel never reads those."""
    head = tl.program_id(1)
    start, length, residue, rows, row_ok = _block(start_ptr, length_ptr, residue_ptr, first_ptr, R, BLOCK)
    d_out, d_out_tail = _load_rows(d_out_ptr, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    d_out, d_out_tail = d_out.to(tl.float32), d_out_tail.to(tl.float32)
    delta_rows = (start + rows).to(tl.int64) * H + head
    if EXACT:
        delta = _row_delta(out_ptr, d_out, d_out_tail, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
        tl.store(delta_ptr + delta_rows, delta, mask=row_ok)
    else:
        for i in range(0, num_branches):
            r = tl.load(rate_ptr + i)
            if residue % r == head // tl.cdiv(H, r):
                delta = _row_delta(branch_out_ptr, d_out, d_out_tail, rows, row_ok, start,
                                   _branch_slot(rate_ptr, i, head, H), slots, dh, BLOCK_DH, TAIL_DH)
                tl.store(delta_ptr + (tl.zeros([], tl.int64) + i) * T * H + delta_rows, delta, mask=row_ok)


@triton.jit
def _query_grad_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, lse_ptr, d_out_ptr, d_q_ptr, delta_ptr,
                       start_ptr, length_ptr, residue_ptr, first_ptr, segment_ptr, rate_ptr,
                       T, H, dh, R, num_branches, scale,
                       EXACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr,
                       TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    head = tl.program_id(1)
    start, length, residue, rows, row_ok = _block(start_ptr, length_ptr, residue_ptr, first_ptr, R, BLOCK)
    live = _row_valid(valid_ptr, rows, row_ok, start, HAS_MASK)
    q, q_tail = _load_rows(q_ptr, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    d_out, d_out_tail = _load_rows(d_out_ptr, rows, live, start, head, H, dh, BLOCK_DH, TAIL_DH)
    d_out, d_out_tail = d_out.to(tl.float32), d_out_tail.to(tl.float32)
    lse = tl.load(lse_ptr + (start + rows).to(tl.int64) * H + head, mask=row_ok, other=float("-inf"))
    live &= lse > float("-inf")
    lse = tl.where(live, lse, 0.0)
    delta_rows = (start + rows).to(tl.int64) * H + head
    # exact mode's D = dout . out; in torchscale mode the shift that each branch's D_i is taken relative to
    # (close to all of them), so the bf16/fp16 products below round small differences, not large terms
    delta = _row_delta(out_ptr, d_out, d_out_tail, rows, live, start, head, H, dh, BLOCK_DH, TAIL_DH)
    if EXACT:
        tl.store(delta_ptr + delta_rows, delta, mask=row_ok)
    d_q = tl.zeros([BLOCK, BLOCK_DH], tl.float32)
    d_q_tail = tl.zeros(q_tail.shape, tl.float32)
    last_row = tl.max(tl.where(row_ok, rows, 0), axis=0)
    for i in range(0, num_branches):
        sl, r, g, lsp, real_end = _branch(segment_ptr, rate_ptr, i, length, head, H, EXACT)
        if residue % r == g:
            if not EXACT:
                mass = tl.where(live, _zero_keys(rows, length, sl, r, g, lsp) * tl.exp(-lse), 0.0)
                weighted = -delta * mass  # the zero keys' p (dP - delta), with dP = 0
                a = tl.zeros([BLOCK, BLOCK_DH], tl.float32)
                a_tail = tl.zeros(q_tail.shape, tl.float32)
                b = tl.zeros([BLOCK, BLOCK_DH], tl.float32)
                b_tail = tl.zeros(q_tail.shape, tl.float32)
            t_lo, t_end = _key_range(rows, last_row, sl, lsp, real_end)
            for t0 in range(t_lo, t_end, BLOCK):
                k, k_tail, v, v_tail, scores, allowed = _key_tile(
                    t0, t_end, i, sl, r, g, lsp, residue, rows, live, q, q_tail, q_ptr, k_ptr, v_ptr, valid_ptr,
                    segment_ptr, rate_ptr, start, head, H, dh, scale, EXACT, HAS_MASK, BLOCK, BLOCK_DH, TAIL_DH,
                    DOT_FP32, FP32_PRECISION)
                p = tl.where(allowed, tl.exp(scores - lse[:, None]), 0.0)
                d_p = _mm_t(d_out, d_out_tail, v, v_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                d_s = p * (d_p - delta[:, None])
                d_s_k, d_s_k_tail = _mm_rows(d_s, k, k_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                if EXACT:
                    d_q += d_s_k
                    d_q_tail += d_s_k_tail
                else:
                    mass += tl.sum(p, axis=1)
                    weighted += tl.sum(d_s, axis=1)
                    p_k, p_k_tail = _mm_rows(p, k, k_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                    a += d_s_k
                    a_tail += d_s_k_tail
                    b += p_k
                    b_tail += p_k_tail
            if not EXACT:
                # D_i = delta + weighted / mass, and dq_i = sum p (dP - D_i) k = a - (D_i - delta) b
                shift = tl.where(mass > 0, weighted / tl.where(mass > 0, mass, 1.0), 0.0)
                d_q += a - shift[:, None] * b
                d_q_tail += a_tail - shift[:, None] * b_tail
                tl.store(delta_ptr + (tl.zeros([], tl.int64) + i) * T * H + delta_rows, delta + shift, mask=row_ok)
    _store_rows(d_q_ptr, d_q * scale, d_q_tail * scale, rows, row_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)


@triton.jit
def _key_grad_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, lse_ptr, d_out_ptr, delta_ptr, d_q_ptr, d_k_ptr, d_v_ptr,
                     start_ptr, length_ptr, residue_ptr, first_ptr, segment_ptr, rate_ptr, branch_ptr,
                     T, H, dh, R, num_branches, scale, query_start, query_stop,
                     EXACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr,
                     TAIL_DH: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, QUERY_BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr):
    """``dk`` and ``dv`` of the block's keys over the ``num_branches`` branches whose indices ``branch_ptr`` lists
    (:class:`KeyLaunch`), written, or with ``ACCUMULATE`` added to those an earlier launch wrote; with
    ``ATOMIC_DQ`` also each query step's part of ``dq``, ``dS K`` (from the transposed ``dS^T`` it holds), added to
    the float32 ``dq`` at ``d_q_ptr`` (else unused)."""
    head = tl.program_id(1)
    start, length, residue, keys, key_exists = _block(start_ptr, length_ptr, residue_ptr, first_ptr, R, BLOCK)
    key_ok = _row_valid(valid_ptr, keys, key_exists, start, HAS_MASK)
    k, k_tail = _load_rows(k_ptr, keys, key_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    v, v_tail = _load_rows(v_ptr, keys, key_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
    d_k = tl.zeros([BLOCK, BLOCK_DH], tl.float32)
    d_k_tail = tl.zeros(k_tail.shape, tl.float32)
    d_v = tl.zeros([BLOCK, BLOCK_DH], tl.float32)
    d_v_tail = tl.zeros(k_tail.shape, tl.float32)
    last_key = tl.max(tl.where(key_exists, keys, 0), axis=0)
    covering = 0  # how many of the launch's branches cover the block's residue for this head
    for n in range(0, num_branches):
        i = tl.load(branch_ptr + n)
        sl, r, g, lsp, real_end = _branch(segment_ptr, rate_ptr, i, length, head, H, EXACT)
        covering += (residue % r == g).to(tl.int32)
        if residue % r == g:
            key_segment = keys // sl
            # the queries of the keys' segments, those at positions [query_start, query_stop) only
            t_end = tl.minimum(tl.minimum((last_key // sl + 1) * lsp, real_end),
                               _kept_index(query_stop, sl, r, g, lsp))
            t_start = tl.maximum(tl.min(keys // sl, axis=0) * lsp, _kept_index(query_start, sl, r, g, lsp))
            for t0 in range(t_start, t_end, QUERY_BLOCK):
                t = t0 + tl.arange(0, QUERY_BLOCK)
                query_segment, queries = _kept_rows(t, sl, r, g, lsp)
                query_ok = _row_valid(valid_ptr, queries, t < t_end, start, HAS_MASK)
                q, q_tail = _load_rows(q_ptr, queries, query_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
                d_out, d_out_tail = _load_rows(d_out_ptr, queries, query_ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
                query_rows = (start + queries).to(tl.int64) * H + head
                lse = tl.load(lse_ptr + query_rows, mask=query_ok, other=float("-inf"))
                query_ok &= lse > float("-inf")
                if EXACT:
                    delta = tl.load(delta_ptr + query_rows, mask=query_ok, other=0.0)
                else:
                    branch_delta = delta_ptr + (tl.zeros([], tl.int64) + i) * T * H
                    delta = tl.load(branch_delta + query_rows, mask=query_ok, other=0.0)
                scores_t = _mm_t(k, k_tail, q, q_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION) * scale
                allowed = (key_segment[:, None] == query_segment[None, :]) & key_ok[:, None] & query_ok[None, :]
                if EXACT:
                    allowed &= ~_counted_before(i, queries[None, :], keys[:, None], segment_ptr, rate_ptr, head, H)
                p_t = tl.where(allowed, tl.exp(scores_t - tl.where(query_ok, lse, 0.0)[None, :]), 0.0)
                p_t_d_out, p_t_d_out_tail = _mm_rows(p_t, d_out, d_out_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                d_v += p_t_d_out
                d_v_tail += p_t_d_out_tail
                d_p_t = _mm_t(v, v_tail, d_out, d_out_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                d_s_t = p_t * (d_p_t - delta[None, :])
                d_s_q, d_s_q_tail = _mm_rows(d_s_t, q, q_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                d_k += d_s_q
                d_k_tail += d_s_q_tail
                if ATOMIC_DQ:
                    d_q, d_q_tail = _mm_rows(tl.trans(d_s_t), k, k_tail, q_ptr, TAIL_DH, DOT_FP32, FP32_PRECISION)
                    _add_rows(d_q_ptr, d_q * scale, d_q_tail * scale, queries, query_ok, start, head, H, dh,
                              BLOCK_DH, TAIL_DH)
    if ACCUMULATE:  # where no branch of the launch covers the block, the earlier launch's rows stay as they are
        key_exists = tl.where(covering > 0, key_exists, False)
    _store_key_rows(d_k_ptr, d_k * scale, d_k_tail * scale, keys, key_exists, start, head, H, dh, BLOCK_DH, TAIL_DH,
                    ACCUMULATE)
    _store_key_rows(d_v_ptr, d_v, d_v_tail, keys, key_exists, start, head, H, dh, BLOCK_DH, TAIL_DH, ACCUMULATE)


@triton.jit
def _store_key_rows(ptr, main, tail, rows, ok, start, head, H, dh, BLOCK_DH: tl.constexpr, TAIL_DH: tl.constexpr,
                    ACCUMULATE: tl.constexpr):
    """:func:`_store_rows` of the fp32 tiles ``(main, tail)``; with ``ACCUMULATE`` their sum with what is there."""
    if ACCUMULATE:
        before, before_tail = _load_rows(ptr, rows, ok, start, head, H, dh, BLOCK_DH, TAIL_DH)
        main += before.to(tl.float32)
        tail += before_tail.to(tl.float32)
    _store_rows(ptr, main, tail, rows, ok, start, head, H, dh, BLOCK_DH, TAIL_DH)


def residue_blocks(spans, period: int, block: int, device) -> list[torch.Tensor]:
    """The programs' blocks over ``spans``, per bag ``(start row, length N, first position, stop position)``: per
    block the bag's start row and length, the residue ``c`` modulo ``period`` and the first ``j`` of its positions
    ``c + period * j``, which start at the first position; four ``(num_blocks,)`` int32 tensors. A block's last
    positions may pass the stop position (not the bag's end)."""
    return launch_blocks(spans, [(period, block)], device)[0]


def launch_blocks(spans, launches, device) -> list[list[torch.Tensor]]:
    """:func:`residue_blocks` of each ``(period, block)`` of ``launches``, all in one host-to-device copy."""
    tables = [_residue_table(spans, period, block) for period, block in launches]
    moved = _blocks.to_device([column for table in tables for column in table], device)
    return [moved[4 * n:4 * n + 4] for n in range(len(tables))]


def _residue_table(spans, period: int, block: int) -> list[torch.Tensor]:
    """The four host columns of :func:`residue_blocks`."""
    entries = []
    for start, length, first_position, stop_position in spans:
        for residue in range(min(period, length)):
            first = max(0, -(-(first_position - residue) // period))
            stop = -(-(stop_position - residue) // period)
            entries += [(start, length, residue, j) for j in range(first, stop, block)]
    return list(torch.tensor(entries, dtype=torch.int32).reshape(-1, 4).t())


def num_warps(block: int, block_dh: int) -> int:
    """8 warps for 64-row tiles and 256-wide heads (at 4 they spill on sm_90 in fp16/bf16), else 4 (at 8 ptxas
    caps a thread at 128 registers, and the 32-row exact-mode kernels then spill)."""
    return 8 if block == 64 or block_dh == 256 else 4


class Plan:
    """What every launch of one call shares: the query, forward and key blocks (each built on first use), the
    branches and each forward and key launch's branch indices on the device, and the constexprs. ``window``
    (sequence parallelism, :mod:`.sharded`): ``[bags, N, offset, query start, query stop, key start, key stop]``;
    then ``q``'s rows are ``bags`` equal windows of a bag of N positions, from position ``offset`` on, and the
    blocks cover those query and key positions; else every row of the bags ``bounds``. ``branch_outputs``: the
    forward kept each branch's output (:func:`keeps_branches`), so a torchscale backward can take the atomic dq."""

    def __init__(self, q, bounds, segments, rates, mode: str, row_valid, window=None, branch_outputs: bool = False):
        self.rows, self.heads, self.head_dim = q.shape
        self.period = math.lcm(*rates)
        if window is None:
            longest = longest_bag(bounds)
            query_spans = key_spans = [(start, stop - start, 0, stop - start)
                                       for start, stop in zip(bounds[:-1], bounds[1:])]
            self.queries = (0, ALL_POSITIONS)
        else:
            longest, query_spans, key_spans = window_spans(self.rows, window)
            self.queries = tuple(window[3:5])
        self.block = block_size(self.head_dim, segments, rates, longest, mode)
        self.atomic_dq = atomic_dq(q.dtype) and (mode == "exact" or branch_outputs)
        self.slots = branch_slots(self.heads, rates)
        self.short_groups = any(self.heads % rate for rate in rates)
        spans = [min(w, longest) for w in segments]
        self.key_launches = key_launches(self.block, self.atomic_dq, rates, spans)
        self.forward_launches = forward_launches(q.dtype, self.block, rates, spans, mode == "exact")
        self.query_spans, self.key_spans, self.device = query_spans, key_spans, q.device
        # the branches' spans and rates, then each key and forward launch's branch indices, in one copy
        launches = self.key_launches + self.forward_launches
        tables = _blocks.to_device([torch.tensor(values) for values in
                                    (segment_spans(segments, rates, longest, mode), rates,
                                     *(launch.branches for launch in launches))], q.device)
        self.branches = tables[:2]
        self.key_branches = tables[2:2 + len(self.key_launches)]
        self.forward_branches = tables[2 + len(self.key_launches):]
        self.row_valid = row_valid
        block_dh, tail_dh = head_tiles(self.head_dim, q.dtype, self.block)
        self.flags = dict(EXACT=mode == "exact", HAS_MASK=row_valid is not None, BLOCK=self.block, BLOCK_DH=block_dh,
                          TAIL_DH=tail_dh, **dot_flags(q.dtype, triton_interpreted()),
                          num_warps=num_warps(self.block, padded_head_dim(self.head_dim)))

    @functools.cached_property
    def query_blocks(self) -> list[torch.Tensor]:
        """The query and delta kernels' blocks of ``block`` rows (:func:`residue_blocks`)."""
        return residue_blocks(self.query_spans, self.period, self.block, self.device)

    @functools.cached_property
    def forward_blocks(self) -> list[list[torch.Tensor]]:
        """Per forward launch (:func:`forward_launches`): its blocks of ``rows * parts`` rows
        (:func:`launch_blocks`)."""
        return launch_blocks(self.query_spans, [(launch.period, launch.rows * launch.parts)
                                                for launch in self.forward_launches], self.device)

    @functools.cached_property
    def key_blocks(self) -> list[list[torch.Tensor]]:
        """Per key launch (:func:`key_launches`): its blocks of ``keys`` keys (:func:`launch_blocks`)."""
        return launch_blocks(self.key_spans, [(launch.period, launch.keys) for launch in self.key_launches],
                             self.device)

    def key_flags(self, launch: int) -> dict:
        """The constexprs and warps of key launch ``launch`` (:func:`key_launches`): each after the first adds its
        dk and dv to the earlier ones'."""
        keys, queries, _, _ = self.key_launches[launch]
        return dict(self.flags, BLOCK=keys, QUERY_BLOCK=queries, ATOMIC_DQ=self.atomic_dq, ACCUMULATE=launch > 0)

    def sizes(self) -> tuple:
        return self.heads, self.head_dim, self.period, self.branches[0].numel()

    def valid(self, like):
        return self.row_valid if self.row_valid is not None else like


_ATOMIC_KEY_TILES = ((WIDE_BLOCK, 16), (64, 32))
"""The key kernel's ``(keys a program, queries a step)`` with the atomic dq: the first for the branches it fits
(:func:`key_launches`)."""


def branch_groups(rates, spans, holds) -> list[tuple[int, tuple]]:
    """The branches (rates ``rates``, segment spans ``spans``) in launches ``(period, branches)``, each modulo the
    ``lcm`` of the rates of the branches not yet taken: those whose segments ``holds(period, span)``, then again
    over the others; where none does, those that hold at no period (not even their own rate), else all that are
    left, then again over the others."""
    groups, rest = [], tuple(range(len(spans)))
    while rest:
        period = math.lcm(*(rates[i] for i in rest))
        branches = (tuple(i for i in rest if holds(period, spans[i]))
                    or tuple(i for i in rest if not holds(rates[i], spans[i])) or rest)
        groups.append((period, branches))
        rest = tuple(i for i in rest if i not in branches)
    return groups


class ForwardLaunch(NamedTuple):
    """One launch of the forward: ``parts`` parts of ``rows`` query rows a program (:func:`forward_tiles`), of one
    residue modulo ``period``, over the branches ``branches`` (indices, in order)."""

    rows: int
    parts: int
    period: int
    branches: tuple


FORWARD_SPLIT_KEYS = 2 * WIDE_BLOCK
"""The keys a row meets in the branches of a later forward launch (``min(w_i, N) / r_i`` each, summed) from which
that launch pays (:func:`forward_launches`). It reads each row's q again and reads and writes its out and lse
(about 3 dh elements), to read those branches' k and v once per 128 rows instead of per part of 64 (2 dh elements
a key, over 128 rows, saved): the two balance at about 192 keys a row; 256 leaves a margin (Prov-GigaPath's first
branch gives 1024, the [128, 1024] x [1, 2] of the tests 128, where a split measured 9% more bytes)."""


def forward_launches(dtype, block: int, rates, spans, exact: bool) -> tuple[ForwardLaunch, ...]:
    """The forward's launches over branches of rates ``rates`` and segment spans ``spans`` (``min(w, N)`` each): one
    over every branch, or in fp16 / bf16 on 64-row blocks 128 rows a program in one part over the branches whose
    segments hold 128 rows of one residue modulo the ``lcm`` of the rates left, then again over the others, each launch
    merging its rows' out and lse into the earlier ones' (:func:`branch_groups`). A later launch runs only where its
    branches hold 128 rows in one part, give a row at least :data:`FORWARD_SPLIT_KEYS` keys (else it does not pay) and,
    in exact mode, come after branches whose rates all divide its period (so that whether an earlier branch gave a pair
    stays one test a program: :func:`_drop_counted_before_rows`); else its branches join the first launch (modulo the
    lcm of every rate), which then takes two parts of 64 rows where they do not hold 128 (:func:`forward_tiles`). At
    Prov-GigaPath's rates 1 to 16 a second launch takes the first branch on 128 rows modulo 1 (1024 keys a row), so its
    keys are read once per 128 rows, not per part of 64."""
    def one_part(period, span):
        return forward_tiles(dtype, block, period, span)[1] == 1

    def own_launch(period, branches):
        keys = sum(spans[i] // rates[i] for i in branches)
        return (one_part(period, spans[branches[0]]) and keys >= FORWARD_SPLIT_KEYS
                and not (exact and any(period % rate for rate in rates[:max(branches)])))

    (period, first), *later = branch_groups(rates, spans, one_part)
    first = tuple(sorted(first + tuple(i for group in later if not own_launch(*group) for i in group[1])))
    groups = [(period, first), *(group for group in later if own_launch(*group))]
    return tuple(ForwardLaunch(*forward_tiles(dtype, block, period_i, min(spans[i] for i in branches)), period_i,
                               branches) for period_i, branches in groups)


class KeyLaunch(NamedTuple):
    """One launch of the key kernel: ``keys`` a program of one residue modulo ``period``, ``queries`` a step, over
    the branches ``branches`` (indices, in order; ``period`` is a multiple of each one's rate)."""

    keys: int
    queries: int
    period: int
    branches: tuple


def key_launches(block: int, atomic: bool, rates, spans) -> tuple[KeyLaunch, ...]:
    """The key kernel's launches over branches of rates ``rates`` and segment spans ``spans`` (``min(w, N)`` each):
    one of ``block`` keys a program and as many queries a step over every branch, its keys of one residue modulo
    ``lcm(rates)``; or with the atomic dq (fp16 / bf16 on 64-row blocks, :class:`Plan`) 128 keys a program and 16
    queries a step over the branches whose segments hold 128 keys of one residue modulo the ``lcm`` of the rates
    left (``128 * period`` positions), and so on over the others, each launch adding its dk and dv to the earlier
    ones'; where none of the branches left holds 128 keys modulo that lcm, 64 keys and 32 queries over those that
    hold them at no period (else over all left), then again (:func:`branch_groups`). At Prov-GigaPath's rates 1
    to 16, 128 keys of a residue modulo 16 span 2048 positions, two of the first branch's segments of 1024, so a
    second launch takes that branch on 128 keys modulo 1. Each step's float32 ``dq`` adds then serve 128 keys (a
    key block across segments would pair keys with the other segment's queries for nothing), and each k, v tile
    meets as many queries; 64 queries a step spill on sm_90 (up to 112 B at dh 64)."""
    if not atomic:
        return (KeyLaunch(block, block, math.lcm(*rates), tuple(range(len(spans)))),)
    wide, narrow = _ATOMIC_KEY_TILES

    def holds(period, span):
        return wide[0] * period <= span

    return tuple(KeyLaunch(*(wide if holds(period, spans[branches[0]]) else narrow), period, branches)
                 for period, branches in branch_groups(rates, spans, holds))


def keeps_branches(q, bounds, segments, rates, mode: str) -> bool:
    """Whether a torchscale forward on ``q: (T, H, dh)`` in bags ``bounds`` that a backward will follow keeps each
    branch's output ``out_i`` for it: where the backward then takes the atomic dq (:func:`atomic_dq`: fp16 / bf16,
    not deterministic) on 64-row blocks. Its ``D_i = dout . out_i`` then costs no pass over the keys: 5 products
    a tile pair, not 8, for ``T * slots * dh`` more elements kept (:func:`branch_slots`)."""
    return (mode == "torchscale" and atomic_dq(q.dtype)
            and block_size(q.shape[-1], segments, rates, longest_bag(bounds), mode) == 64)


def branch_slots(heads: int, rates) -> int:
    """Columns of the kept branch outputs ``(T, slots, dh)``: ``ceil(H / r_i)`` per branch, the heads of one group
    (a position runs branch i in one group's heads only): 31 for Prov-GigaPath's 16 heads and rates 1 to 16,
    1.94 outputs' worth."""
    return sum(head_group_size(heads, rate) for rate in rates)


def window_spans(rows: int, window) -> tuple:
    """``(N, query spans, key spans)`` of :class:`Plan`'s ``window`` on ``rows`` rows (spans as
    :func:`residue_blocks` takes them: a bag's start row is negative where the window starts past position 0)."""
    bags, length, offset, query_start, query_stop, key_start, key_stop = window
    starts = [bag * (rows // bags) - offset for bag in range(bags)]
    return (length, [(start, length, query_start, query_stop) for start in starts],
            [(start, length, key_start, key_stop) for start in starts])


def _grid(blocks, plan: Plan) -> tuple[int, int]:
    return blocks[0].numel(), plan.heads


def forward(q, k, v, plan: Plan, scale: float, keep_branches: bool = False):
    """``out: (T, H, dh)`` in q's dtype, ``lse: (T, H)`` float32 and the branch outputs of contiguous ``q, k, v: (T,
    H, dh)`` (the rows of the plan's forward blocks; each launch after the first merges its branches into the
    rows' ``out`` and ``lse``, :func:`forward_launches`): with ``keep_branches`` (torchscale, :func:`keeps_branches`)
    each branch's own ``out_i`` as ``(T, slots, dh)`` in q's dtype (:func:`_branch_slot`), else an empty ``(0,)``.
    Where ``r_i`` does not divide H, a short or empty last head group leaves some of branch i's columns of some
    rows unwritten: the buffer is zeroed first then."""
    out = _blocks.new_buffer(*q.shape, dtype=q.dtype, device=q.device)
    lse = _blocks.new_buffer(plan.rows, plan.heads, dtype=torch.float32, device=q.device)
    shape = (plan.rows, plan.slots, plan.head_dim) if keep_branches else (0,)
    allocate = torch.zeros if plan.short_groups else _blocks.new_buffer
    branch_out = allocate(*shape, dtype=q.dtype, device=q.device)
    launches = zip(plan.forward_launches, plan.forward_blocks, plan.forward_branches)
    for index, (launch, blocks, branches) in enumerate(launches):
        grid = _grid(blocks, plan)
        if grid[0]:
            _forward_kernel[grid](q, k, v, plan.valid(q), out, lse, branch_out if keep_branches else out, *blocks,
                                  *plan.branches, branches, plan.heads, plan.head_dim, launch.period, branches.numel(),
                                  scale, plan.slots, KEEP_BRANCHES=keep_branches, ROWS=launch.rows, PARTS=launch.parts,
                                  MERGE=index > 0, **plan.flags)
    return out, lse, branch_out


def backward(q, k, v, out, lse, branch_out, d_out, plan: Plan, scale: float):
    """``(dq, dk, dv)``, each ``(T, H, dh)`` in q's dtype, from the forward's ``out``, ``lse`` and ``branch_out`` and
    ``d_out`` (``dq`` on the rows of the plan's query blocks, ``dk`` and ``dv`` on those of its key blocks). With the
    plan's atomic dq (:func:`atomic_dq`; exact mode, or torchscale with the branch outputs kept) the key kernel adds
    ``dq`` into a zeroed float32 buffer and :func:`_delta_kernel` finds ``D`` or each ``D_i`` (no products); else
    the query kernel writes ``dq`` and ``D`` or each ``D_i``."""
    d_k, d_v = (_blocks.new_buffer(*q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    if plan.atomic_dq:
        d_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        d_q = _blocks.new_buffer(*q.shape, dtype=q.dtype, device=q.device)
    branches = 1 if plan.flags["EXACT"] else plan.branches[0].numel()
    delta = _blocks.new_buffer(branches, plan.rows, plan.heads, dtype=torch.float32, device=q.device)
    _query_side(q, k, v, out, lse, branch_out, d_out, d_q, delta, plan, scale)
    added_d_q = d_q if plan.atomic_dq else torch.empty(0, dtype=torch.float32, device=q.device)
    launches = zip(plan.key_launches, plan.key_blocks, plan.key_branches)
    for index, (launch, blocks, branch_indices) in enumerate(launches):
        grid = _grid(blocks, plan)
        if grid[0]:
            _key_grad_kernel[grid](q, k, v, plan.valid(q), lse, d_out, delta, added_d_q, d_k, d_v, *blocks,
                                   *plan.branches, branch_indices, plan.rows, plan.heads, plan.head_dim, launch.period,
                                   branch_indices.numel(), scale, *plan.queries, **plan.key_flags(index))
    return d_q.to(q.dtype), d_k, d_v


def _query_side(q, k, v, out, lse, branch_out, d_out, d_q, delta, plan: Plan, scale: float) -> None:
    """Launch the query side of :func:`backward`: writes ``delta`` and, without the atomic dq, ``d_q``."""
    grid = _grid(plan.query_blocks, plan)
    if not grid[0]:
        return
    if plan.atomic_dq:
        _delta_kernel[grid](out, branch_out if branch_out.numel() else out, d_out, delta, *plan.query_blocks,
                            plan.branches[1], plan.rows, *plan.sizes(), plan.slots,
                            num_warps=plan.flags["num_warps"], **delta_flags(plan.flags))
        return
    _query_grad_kernel[grid](q, k, v, plan.valid(q), out, lse, d_out, d_q, delta, *plan.query_blocks,
                             *plan.branches, plan.rows, *plan.sizes(), scale, **plan.flags)


def delta_flags(flags: dict) -> dict:
    """:func:`_delta_kernel`'s constexprs, from the other kernels' ``flags``."""
    return {name: flags[name] for name in ("EXACT", "BLOCK", "BLOCK_DH", "TAIL_DH")}


_AOT_SHAPES = ((16, 48, 64), (16, 48, 32), (16, 64, 64), (8, 32, 64), (8, 32, 32), (8, 128, 32), (4, 256, 32))
"""(H, dh, block: rows or keys a program): GigaPath's (in fp16/bf16 on 64-row blocks as tiles of 32 and 16), and
every one-tile head dim (32, 64, 128, 256) with each block it takes."""
_AOT_MODES = ((False, False), (True, False), (True, True))  # (EXACT, HAS_MASK): torchscale takes no mask


def _launched(dtype, head_dim: int, block: int, exact: bool) -> bool:
    """Whether the dispatcher launches this combination (see :func:`block_size`, :func:`unsupported_shape`)."""
    if not exact:
        return True
    return block == (32 if padded_head_dim(head_dim) > 64 else 64) and not unsupported_shape(head_dim, dtype, "exact")


def shipped_specializations():
    """Every kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, num_warps, aligned)`` as the launches build them: the three
    dtypes, the head tiles (:func:`head_tiles`) of 32, 32 + 16, 64, 128 and 256 columns with each block size
    they take, torchscale mode and exact mode with and without a mask (where :func:`_launched`), each once, the
    forward at each of its row tilings (:func:`forward_tiles`), where it has two the one-part one also merging into
    an earlier launch's rows (:func:`forward_launches`); in fp16 and bf16 in exact mode, and in torchscale
    mode on 64-row blocks, the backward both ways (:func:`atomic_dq`): the query and key kernels, and the
    :func:`_delta_kernel` and the key kernel at each of its atomic tiles, writing or adding to an earlier launch's dk
    and dv (:func:`key_launches`), and there in
    torchscale mode the forward both ways (:func:`keeps_branches`); ``aligned`` names H and dh where the example
    shape has them as multiples of 16.
    """
    seen = set()
    for dtype, ptr in _POINTER_TYPES.items():
        for heads, head_dim, block in _AOT_SHAPES:
            aligned = tuple(name for name, size in (("H", heads), ("dh", head_dim)) if size % 16 == 0)
            for exact, has_mask in _AOT_MODES:
                if not _launched(dtype, head_dim, block, exact):
                    continue
                block_dh, tail_dh = head_tiles(head_dim, dtype, block)
                flags = dict(EXACT=exact, HAS_MASK=has_mask, BLOCK=block, BLOCK_DH=block_dh, TAIL_DH=tail_dh,
                             **dot_flags(dtype, interpreted=False))
                warps = num_warps(block, padded_head_dim(head_dim))
                key = (dtype, tuple(flags.items()), aligned)
                if key in seen:  # fp32 takes one 64-wide tile at dh 48 and 64
                    continue
                seen.add(key)
                blocks = dict(start_ptr="*i32", length_ptr="*i32", residue_ptr="*i32", first_ptr="*i32",
                              segment_ptr="*i32", rate_ptr="*i32")
                sizes = dict(H="i32", dh="i32", R="i32", num_branches="i32", scale="fp32")
                rows = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, valid_ptr="*i1" if has_mask else ptr)
                forward_signature = dict(rows, out_ptr=ptr, lse_ptr="*fp32", branch_out_ptr=ptr, **blocks,
                                         branch_ptr="*i32", **sizes, slots="i32")
                atomic = dtype != torch.float32 and (exact or block == 64)  # keeps_branches in torchscale
                tilings = {forward_tiles(dtype, block, 1, shortest) for shortest in (ALL_POSITIONS, 1)}  # long, short
                merges = [(tiles, merge) for tiles in sorted(tilings) for merge in (False, True)
                          if not merge or (len(tilings) > 1 and tiles[1] == 1)]  # later launches: one part
                for (query_rows, parts), merge in merges:
                    for keep in (False, True) if atomic and not exact else (False,):
                        forward_flags = dict(flags, KEEP_BRANCHES=keep, ROWS=query_rows, PARTS=parts, MERGE=merge)
                        yield (_forward_kernel, forward_signature, forward_flags, warps, aligned)
                yield (_query_grad_kernel, dict(rows, out_ptr=ptr, lse_ptr="*fp32", d_out_ptr=ptr, d_q_ptr=ptr,
                                                delta_ptr="*fp32", **blocks, T="i32", **sizes), flags, warps, aligned)
                key_signature = dict(rows, lse_ptr="*fp32", d_out_ptr=ptr, delta_ptr="*fp32", d_q_ptr="*fp32",
                                     d_k_ptr=ptr, d_v_ptr=ptr, **blocks, branch_ptr="*i32", T="i32", **sizes,
                                     query_start="i32", query_stop="i32")
                yield (_key_grad_kernel, key_signature, dict(flags, QUERY_BLOCK=block, ATOMIC_DQ=False,
                                                             ACCUMULATE=False), warps, aligned)
                if not atomic:
                    continue
                for (keys, queries), add in itertools.product(_ATOMIC_KEY_TILES, (False, True)):  # later launches add
                    tiles = dict(BLOCK=keys, QUERY_BLOCK=queries, ACCUMULATE=add)
                    yield (_key_grad_kernel, key_signature, dict(flags, ATOMIC_DQ=True, **tiles), warps, aligned)
                if not has_mask:
                    delta_signature = dict(out_ptr=ptr, branch_out_ptr=ptr, d_out_ptr=ptr, delta_ptr="*fp32",
                                           **{name: "*i32" for name in list(blocks)[:4]}, rate_ptr="*i32", T="i32",
                                           H="i32", dh="i32", R="i32", num_branches="i32", slots="i32")
                    yield (_delta_kernel, delta_signature, delta_flags(flags), warps, aligned)
