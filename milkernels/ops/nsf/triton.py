"""NSF in Triton, and the row-chunk machinery that anchor_kl's kernels share.

Rows ``s: (R, N)`` are cut into tiles of BLOCK_R rows x one chunk of ITERS * BLOCK_N columns; a
program owns one tile, so a long row is spread over several programs and short rows share one.
Every reduction over a row runs in two fixed-order steps: each program writes an fp32 partial per
(row, chunk), and ``_row_sum_kernel`` adds a row's partials in chunk order. Results are therefore
deterministic.

Forward: ``_nsf_partials_kernel`` (sums of sigmoid(s / T)), the row sums, ``_nsf_output_kernel``.
Backward: ``_nsf_grad_partials_kernel`` (sums of g * p), the row sums, ``_nsf_grad_kernel``:
``ds = sigmoid'(s / T) / T / (S + eps) * (g - sum_n g_n p_n)``. Masked entries get 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _blocks
from . import reference

# (BLOCK_R, BLOCK_N): the first whose BLOCK_N covers a row is taken; longer rows use the last.
TILES = ((32, 64), (4, 512), (1, 4096))
NUM_WARPS = 4
TARGET_PROGRAMS = 1024  # rows are split into chunks until about this many programs run
COMBINE_BLOCK = 1024
EPS = tl.constexpr(reference.EPS)


@dataclass(frozen=True)
class Plan:
    """The launch of the row kernels for rows ``(R, N)``: the tile, ITERS tiles per chunk, C chunks per row."""

    rows: int
    n: int
    block_r: int
    block_n: int
    iters: int
    chunks: int

    @staticmethod
    def make(rows: int, n: int) -> "Plan":
        block_r, block_n = next((tile for tile in TILES if tile[1] >= n), TILES[-1])
        blocks = triton.cdiv(n, block_n)
        wanted = max(1, TARGET_PROGRAMS // triton.cdiv(rows, block_r))
        iters = triton.cdiv(blocks, min(blocks, wanted))
        return Plan(rows, n, block_r, block_n, iters, triton.cdiv(blocks, iters))

    @property
    def grid(self) -> tuple[int, int]:
        return triton.cdiv(self.rows, self.block_r), self.chunks

    def launch_args(self, valid) -> dict:
        """Keyword arguments shared by the row kernels (the partials kernels also take C); ``valid``: the mask or None."""
        return dict(R=self.rows, N=self.n, ITERS=self.iters, BLOCK_R=self.block_r,
                    BLOCK_N=self.block_n, HAS_MASK=valid is not None, num_warps=NUM_WARPS)


@triton.jit
def program_rows(BLOCK_R: tl.constexpr):
    """The rows ``(BLOCK_R,)`` of this program's tile."""
    return tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)


@triton.jit
def tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Step ``i`` of this program's chunk: int64 offsets, in-bounds and valid masks, all (BLOCK_R, BLOCK_N)."""
    cols = (tl.program_id(1) * ITERS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < R)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    valid = ok
    if HAS_MASK:
        valid = ok & (tl.load(valid_ptr + offsets, mask=ok, other=0) != 0)
    return offsets, ok, valid


@triton.jit
def load(ptr, offsets, ok):
    """An fp32 tile (masked-out entries 0)."""
    return tl.load(ptr + offsets, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def weights(s_ptr, offsets, ok, valid, inv_t):
    """sigmoid(s / T) where valid, else 0."""
    return tl.where(valid, tl.sigmoid(load(s_ptr, offsets, ok) * inv_t), 0.0)


@triton.jit
def row_values(ptr, rows, R):
    """A per-row fp32 value as a (BLOCK_R, 1) column."""
    return tl.load(ptr + rows, mask=rows < R, other=0.0)[:, None]


@triton.jit
def store_partials(part_ptr, rows, R, C, values):
    """Write ``values: (BLOCK_R,)`` as this chunk's partials ``part[rows, chunk]`` of a ``(R, C)`` buffer."""
    tl.store(part_ptr + rows.to(tl.int64) * C + tl.program_id(1), values, mask=rows < R)


@triton.jit
def _row_sum_kernel(part_ptr, out_ptr, C, BLOCK: tl.constexpr):
    """``out[row] = sum_c part[row, c]`` for ``part: (R, C)``, in a fixed order."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, C, BLOCK):
        acc += tl.load(part_ptr + row.to(tl.int64) * C + c0 + offs, mask=c0 + offs < C, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _nsf_partials_kernel(s_ptr, valid_ptr, part_ptr, inv_t, R, N, C, ITERS,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """``part[r, chunk]`` = the sum of sigmoid(s / T) over the valid entries of the chunk."""
    rows = program_rows(BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for i in range(ITERS):
        offsets, ok, valid = tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N, HAS_MASK)
        acc += weights(s_ptr, offsets, ok, valid, inv_t)
    store_partials(part_ptr, rows, R, C, tl.sum(acc, axis=1))


@triton.jit
def _nsf_output_kernel(s_ptr, valid_ptr, row_sum_ptr, out_ptr, inv_t, R, N, ITERS,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """``out = sigmoid(s / T) / (S + eps)`` on valid entries, 0 elsewhere."""
    rows = program_rows(BLOCK_R)
    scale = 1.0 / (row_values(row_sum_ptr, rows, R) + EPS)
    for i in range(ITERS):
        offsets, ok, valid = tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N, HAS_MASK)
        out = weights(s_ptr, offsets, ok, valid, inv_t) * scale
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nsf_grad_partials_kernel(s_ptr, valid_ptr, row_sum_ptr, g_ptr, part_ptr, inv_t, R, N, C, ITERS,
                              BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """``part[r, chunk]`` = the sum of g * p over the valid entries of the chunk."""
    rows = program_rows(BLOCK_R)
    scale = 1.0 / (row_values(row_sum_ptr, rows, R) + EPS)
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for i in range(ITERS):
        offsets, ok, valid = tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N, HAS_MASK)
        p = weights(s_ptr, offsets, ok, valid, inv_t) * scale
        acc += tl.where(valid, p * load(g_ptr, offsets, ok), 0.0)
    store_partials(part_ptr, rows, R, C, tl.sum(acc, axis=1))


@triton.jit
def _nsf_grad_kernel(s_ptr, valid_ptr, row_sum_ptr, row_dot_ptr, g_ptr, ds_ptr, inv_t, R, N, ITERS,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """``ds = sigmoid'(s / T) / T / (S + eps) * (g - sum_n g_n p_n)`` on valid entries, 0 elsewhere."""
    rows = program_rows(BLOCK_R)
    scale = inv_t / (row_values(row_sum_ptr, rows, R) + EPS)
    dot = row_values(row_dot_ptr, rows, R)
    for i in range(ITERS):
        offsets, ok, valid = tile(rows, i, R, N, ITERS, valid_ptr, BLOCK_N, HAS_MASK)
        w = weights(s_ptr, offsets, ok, valid, inv_t)
        ds = tl.where(valid, w * (1.0 - w) * scale * (load(g_ptr, offsets, ok) - dot), 0.0)
        tl.store(ds_ptr + offsets, ds.to(ds_ptr.dtype.element_ty), mask=ok)


def row_sums(partials: torch.Tensor) -> torch.Tensor:
    """``(R,)`` fp32: the fixed-order sums of the rows of ``partials: (R, C)`` fp32."""
    out = _blocks.new_buffer(partials.shape[0], dtype=torch.float32, device=partials.device)
    _row_sum_kernel[(partials.shape[0],)](partials, out, partials.shape[1], BLOCK=COMBINE_BLOCK)
    return out


def new_partials(plan: Plan, device) -> torch.Tensor:
    """An fp32 buffer ``(R, C)`` for one partial per (row, chunk)."""
    return _blocks.new_buffer(plan.rows, plan.chunks, dtype=torch.float32, device=device)


def forward(scores: torch.Tensor, valid: torch.Tensor | None, inv_t: float):
    """NSF of contiguous rows ``scores: (R, N)``; ``valid: (R, N)`` bool or None.

    Returns ``(p: (R, N) in scores' dtype, row_sum: (R,) fp32)``, the row sums S of sigmoid(s / T)
    that :func:`backward` takes back.
    """
    plan = Plan.make(*scores.shape)
    mask = valid if valid is not None else scores
    partials = new_partials(plan, scores.device)
    _nsf_partials_kernel[plan.grid](scores, mask, partials, inv_t, C=plan.chunks, **plan.launch_args(valid))
    row_sum = row_sums(partials)
    out = _blocks.new_buffer(*scores.shape, dtype=scores.dtype, device=scores.device)
    _nsf_output_kernel[plan.grid](scores, mask, row_sum, out, inv_t, **plan.launch_args(valid))
    return out, row_sum


def backward(scores, valid, row_sum, grad, inv_t: float) -> torch.Tensor:
    """``ds: (R, N)`` in scores' dtype from the output gradient ``grad: (R, N)`` (contiguous)."""
    plan = Plan.make(*scores.shape)
    mask = valid if valid is not None else scores
    partials = new_partials(plan, scores.device)
    _nsf_grad_partials_kernel[plan.grid](scores, mask, row_sum, grad, partials, inv_t, C=plan.chunks,
                                         **plan.launch_args(valid))
    row_dot = row_sums(partials)
    ds = _blocks.new_buffer(*scores.shape, dtype=scores.dtype, device=scores.device)
    _nsf_grad_kernel[plan.grid](scores, mask, row_sum, row_dot, grad, ds, inv_t, **plan.launch_args(valid))
    return ds


POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def row_specializations(kernel, pointer_names, fp32_names=(), **flags):
    """``(kernel, signature, constexprs, num_warps)`` of a row kernel for every dtype, tile and mask flag.

    ``pointer_names`` take the input dtype, ``fp32_names`` are fp32 buffers, ``valid_ptr`` is the mask;
    ``flags`` are extra constexprs. No integer argument is marked a multiple of 16 (the AOT compile's
    ``aligned``): R, N and the chunk counts follow the bags, so a launch in general has none.
    """
    for dtype, ptr in POINTER_TYPES.items():
        for block_r, block_n in TILES:
            for has_mask in (False, True):
                signature = dict.fromkeys(pointer_names, ptr)
                signature.update(valid_ptr="*i1" if has_mask else ptr, **dict.fromkeys(fp32_names, "*fp32"),
                                 inv_t="fp32", R="i32", N="i32", C="i32", ITERS="i32")
                constexprs = dict(BLOCK_R=block_r, BLOCK_N=block_n, HAS_MASK=has_mask, **flags)
                yield kernel, _ordered(kernel, signature), constexprs, NUM_WARPS


def _ordered(kernel, signature: dict) -> dict:
    """``signature`` in the kernel's argument order (constexprs left out)."""
    return {name: signature[name] for name in kernel.arg_names if name in signature}


def shipped_specializations():
    """Every NSF kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile checks.

    Yields ``(kernel, signature, constexprs, num_warps)``: the three dtypes, every tile, with and without a mask.
    """
    yield _row_sum_kernel, dict(part_ptr="*fp32", out_ptr="*fp32", C="i32"), dict(BLOCK=COMBINE_BLOCK), NUM_WARPS
    yield from row_specializations(_nsf_partials_kernel, ["s_ptr"], ["part_ptr"])
    yield from row_specializations(_nsf_output_kernel, ["s_ptr", "out_ptr"], ["row_sum_ptr"])
    yield from row_specializations(_nsf_grad_partials_kernel, ["s_ptr", "g_ptr"], ["row_sum_ptr", "part_ptr"])
    yield from row_specializations(_nsf_grad_kernel, ["s_ptr", "g_ptr", "ds_ptr"], ["row_sum_ptr", "row_dot_ptr"])
