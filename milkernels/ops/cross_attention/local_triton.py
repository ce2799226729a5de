"""Block-sparse cross-attention over coordinate-local neighbourhoods in Triton: the dense kernels' tiles,
walked over each block's candidate keys (:mod:`.local`) and masked exactly with the patch coordinates.

Layout. Rows stay where they are: ``xq, q: (Nq, E)`` and ``k, v: (Nk, E)`` (contiguous, one bag). A
:class:`~.local.LocalPlan` orders the queries along the Z curve of their grid and cuts them into blocks of
``BLOCK_M``; each program gathers its block's rows through ``query_order`` and walks its candidate keys
(``candidate_ptr`` / ``candidate_key``, original key indices, a superset of the block's neighbours at tile
granularity) in tiles of ``BLOCK_N``. The exact neighbour test (:func:`_near`, the gap rule of :mod:`.local`)
masks each (query, key) pair, so every key outside a query's neighbourhood gets weight 0 whatever the plan.

- Forward (``_local_forward_kernel``): the dense kernels' online softmax and LayerNorm epilogue; a query with
  no neighbour gets ``attn = 0``, ``lse = -inf`` and ``out = LayerNorm(xq)``.
- Backward: the dense ``_norm_grad_kernel`` (:func:`.triton.norm_grad`, row-wise over all rows), then
  ``_local_query_grad_kernel`` (``dq`` per query block, over its candidates) and ``_local_key_grad_kernel``
  (``dk``, ``dv`` per key block of the transposed plan, over its candidate queries). Each row belongs to one
  block: no partials, no atomics, deterministic.

Coordinates go to the kernels as int32 relative to the smallest one; a slide whose extent (plus patch sizes and
radius) passes 2^30 level-0 pixels is refused (:func:`kernel_coords`).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted
from .. import _blocks
from .local import LocalNeighbourhood, candidate_positions, plan
from .triton import (_CONFIGS, _POINTER_TYPES, _epilogue, _heads_mm, _key_grad_step, _load_heads, _query_grad_step,
                     _query_side, _softmax_step, _store_heads, kernel_flags, norm_grad, padded_heads)

MAX_EXTENT = 2 ** 30
_HALF_FORWARD_BLOCK_N = {(1, 256): 32}
"""Where the local forward takes fewer key rows per tile than the dense one in fp16 and bf16: its coordinate
mask costs registers, and at ``(1, 256)`` the dense tile spills (``tests/aot.py``)."""


def local_flags(tile: tuple[int, int], dtype, interpreted: bool, backward: bool) -> dict:
    """The dense kernels' :func:`.triton.kernel_flags` of the local configurations, with
    :data:`_HALF_FORWARD_BLOCK_N` applied."""
    flags = kernel_flags(tile, dtype, interpreted, backward, local=True)
    if not backward and dtype != torch.float32 and tile in _HALF_FORWARD_BLOCK_N:
        flags["BLOCK_N"] = _HALF_FORWARD_BLOCK_N[tile]
    return flags


@triton.jit
def _load_coords(coords_ptr, rows, ok):
    """The ``(x, y)`` int32 corners of ``rows`` in ``(N, 2)`` coordinates, 0 where not ok."""
    at = coords_ptr + rows.to(tl.int64) * 2
    return tl.load(at, mask=ok, other=0), tl.load(at + 1, mask=ok, other=0)


@triton.jit
def _near(ax, ay, bx, by, size_a, size_b, radius):
    """``(len(a), len(b))``: whether patch ``b`` (corner ``bx, by``, side ``size_b``) lies within ``radius`` of patch
    ``a`` along both axes (the gap rule of :mod:`.local`; symmetric in swapping ``a`` and ``b``)."""
    gap_x = tl.maximum(bx[None, :] - (ax[:, None] + size_a), ax[:, None] - (bx[None, :] + size_b))
    gap_y = tl.maximum(by[None, :] - (ay[:, None] + size_a), ay[:, None] - (by[None, :] + size_b))
    return (gap_x < radius) & (gap_y < radius)


@triton.jit
def _own_block(order_ptr, coords_ptr, count, BLOCK: tl.constexpr):
    """This program's block of a plan: its rows (original indices), which exist, and their corners."""
    sorted_rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = sorted_rows < count
    rows = tl.load(order_ptr + sorted_rows, mask=ok, other=0)
    x, y = _load_coords(coords_ptr, rows, ok)
    return rows, ok, x, y


@triton.jit
def _candidate_range(candidate_ptr_ptr):
    """This program's block's candidates: positions ``first .. stop`` of the candidate list."""
    return tl.load(candidate_ptr_ptr + tl.program_id(0)), tl.load(candidate_ptr_ptr + tl.program_id(0) + 1)


@triton.jit
def _candidates(candidate_ptr, start, stop, coords_ptr, BLOCK: tl.constexpr):
    """Candidates ``start .. start + BLOCK`` of a block (below ``stop``): their rows, which exist, their corners."""
    index = start + tl.arange(0, BLOCK)
    ok = index < stop
    rows = tl.load(candidate_ptr + index, mask=ok, other=0)
    x, y = _load_coords(coords_ptr, rows, ok)
    return rows, ok, x, y


@triton.jit
def _local_forward_kernel(xq_ptr, q_ptr, k_ptr, v_ptr, weight_ptr, bias_ptr, out_ptr, attn_ptr, mean_ptr, rstd_ptr,
                          lse_ptr, query_order_ptr, candidate_ptr_ptr, candidate_key_ptr, coords_q_ptr, coords_k_ptr,
                          Nq, patch_q, patch_k, radius, H, dh, E, scale, eps, HP: tl.constexpr, DHP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                          FP32_PRECISION: tl.constexpr):
    rows, row_ok, qx, qy = _own_block(query_order_ptr, coords_q_ptr, Nq, BLOCK_M)
    q = _load_heads(q_ptr, rows, row_ok, H, dh, E, HP, DHP)
    m = tl.full([HP, BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([HP, BLOCK_M], tl.float32)
    acc = tl.zeros([HP, BLOCK_M, DHP], tl.float32)
    first, stop = _candidate_range(candidate_ptr_ptr)
    for start in range(first, stop, BLOCK_N):
        keys, key_ok, kx, ky = _candidates(candidate_key_ptr, start, stop, coords_k_ptr, BLOCK_N)
        near = _near(qx, qy, kx, ky, patch_q, patch_k, radius) & key_ok[None, :] & row_ok[:, None]
        k = _load_heads(k_ptr, keys, key_ok, H, dh, E, HP, DHP)
        v = _load_heads(v_ptr, keys, key_ok, H, dh, E, HP, DHP)
        scores = _heads_mm(q, tl.trans(k, 0, 2, 1), k_ptr, DOT_FP32, FP32_PRECISION) * scale
        scores = tl.where(near[None, :, :], scores, float("-inf"))
        m, l, acc = _softmax_step(scores, v, m, l, acc, k_ptr, DOT_FP32, FP32_PRECISION)
    _epilogue(acc, m, l, rows, row_ok, xq_ptr, weight_ptr, bias_ptr, out_ptr, attn_ptr, mean_ptr, rstd_ptr, lse_ptr,
              H, dh, E, eps, HP, DHP)


@triton.jit
def _local_query_grad_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, d_attn_ptr, d_q_ptr, query_order_ptr,
                             candidate_ptr_ptr, candidate_key_ptr, coords_q_ptr, coords_k_ptr, Nq, patch_q, patch_k,
                             radius, H, dh, E, scale, HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``dq`` of a block of queries over its candidate keys."""
    rows, row_ok, qx, qy = _own_block(query_order_ptr, coords_q_ptr, Nq, BLOCK_M)
    q, d_attn, live, lse, delta = _query_side(q_ptr, d_attn_ptr, lse_ptr, delta_ptr, rows, row_ok, H, dh, E, HP, DHP)
    d_q = tl.zeros([HP, BLOCK_M, DHP], tl.float32)
    first, stop = _candidate_range(candidate_ptr_ptr)
    for start in range(first, stop, BLOCK_N):
        keys, key_ok, kx, ky = _candidates(candidate_key_ptr, start, stop, coords_k_ptr, BLOCK_N)
        near = _near(qx, qy, kx, ky, patch_q, patch_k, radius) & key_ok[None, :]
        k = _load_heads(k_ptr, keys, key_ok, H, dh, E, HP, DHP)
        v = _load_heads(v_ptr, keys, key_ok, H, dh, E, HP, DHP)
        d_q += _query_grad_step(q, k, v, d_attn, live, lse, delta, near[None, :, :], scale, q_ptr, DOT_FP32,
                                FP32_PRECISION)
    _store_heads(d_q_ptr, d_q * scale, rows, row_ok, H, dh, E, HP, DHP)


@triton.jit
def _local_key_grad_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, d_attn_ptr, d_k_ptr, d_v_ptr, key_order_ptr,
                           candidate_ptr_ptr, candidate_query_ptr, coords_q_ptr, coords_k_ptr, Nk, patch_q, patch_k,
                           radius, H, dh, E, scale, HP: tl.constexpr, DHP: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``dk`` and ``dv`` of a block of keys (the transposed plan's) over its candidate queries."""
    keys, key_ok, kx, ky = _own_block(key_order_ptr, coords_k_ptr, Nk, BLOCK_N)
    k = _load_heads(k_ptr, keys, key_ok, H, dh, E, HP, DHP)
    v = _load_heads(v_ptr, keys, key_ok, H, dh, E, HP, DHP)
    d_k = tl.zeros([HP, BLOCK_N, DHP], tl.float32)
    d_v = tl.zeros([HP, BLOCK_N, DHP], tl.float32)
    first, stop = _candidate_range(candidate_ptr_ptr)
    for start in range(first, stop, BLOCK_M):
        rows, row_ok, qx, qy = _candidates(candidate_query_ptr, start, stop, coords_q_ptr, BLOCK_M)
        near_t = _near(kx, ky, qx, qy, patch_k, patch_q, radius) & row_ok[None, :]
        q, d_attn, live, lse, delta = _query_side(q_ptr, d_attn_ptr, lse_ptr, delta_ptr, rows, row_ok, H, dh, E, HP,
                                                  DHP)
        d_k, d_v = _key_grad_step(k, v, q, d_attn, live, lse, delta, near_t[None, :, :], d_k, d_v, scale, q_ptr,
                                  DOT_FP32, FP32_PRECISION)
    _store_heads(d_k_ptr, d_k * scale, keys, key_ok, H, dh, E, HP, DHP)
    _store_heads(d_v_ptr, d_v, keys, key_ok, H, dh, E, HP, DHP)


def kernel_coords(local: LocalNeighbourhood) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coords_q, coords_k)``: ``(Nq, 2)`` and ``(Nk, 2)`` int32, relative to the smallest corner of both.

    ValueError where the extent plus the patch sizes and radius passes :data:`MAX_EXTENT` (int32 gaps).
    """
    both = torch.cat([local.coords_q, local.coords_k]).long()
    if not len(both):
        return local.coords_q.int(), local.coords_k.int()
    origin = both.amin(dim=0)
    extent = int((both.amax(dim=0) - origin).max())
    reach = extent + local.patch_size_q + local.patch_size_k + local.radius
    if reach >= MAX_EXTENT:
        raise ValueError(f"the coordinates span {extent} level-0 pixels; with patch sizes {local.patch_size_q}, "
                         f"{local.patch_size_k} and radius {local.radius} that passes the kernels' int32 range "
                         f"({MAX_EXTENT})")
    return ((c.long() - origin).int().contiguous() for c in (local.coords_q, local.coords_k))


class LocalLaunch:
    """What the launches of one call share: the int32 coordinates, the sizes and the tile."""

    def __init__(self, xq, k, local: LocalNeighbourhood, heads: int):
        self.local = local
        self.coords_q, self.coords_k = kernel_coords(local)
        self.query_rows, self.width = xq.shape
        self.key_rows = k.shape[0]
        self.heads, self.head_dim = heads, self.width // heads
        self.tile, self.dtype = padded_heads(heads, self.head_dim), xq.dtype

    def flags(self, backward: bool) -> dict:
        return local_flags(self.tile, self.dtype, triton_interpreted(), backward)

    def neighbourhood(self, transposed: bool = False) -> tuple:
        """Coordinates, the row count of the blocked side, patch sizes and radius, as the kernels take them."""
        local = self.local
        return (self.coords_q, self.coords_k, self.key_rows if transposed else self.query_rows,
                local.patch_size_q, local.patch_size_k, local.radius)

    def sizes(self) -> tuple[int, int, int]:
        return self.heads, self.head_dim, self.width

    def blocks(self, block: int, transposed: bool = False) -> tuple[int, tuple]:
        """``(programs, (order, candidate_ptr, candidates))`` of the plan for blocks of ``block`` queries (keys
        where ``transposed``): int32 original rows of the blocked side, int64 CSR offsets, int32 rows of the other."""
        local_plan = plan(self.local.swapped() if transposed else self.local, block)
        candidate_ptr, position = candidate_positions(local_plan)
        return len(candidate_ptr) - 1, (local_plan.q_order.int(), candidate_ptr,
                                        local_plan.k_order[position].int())


def forward(xq, q, k, v, weight, bias, launch: LocalLaunch, scale: float, eps: float):
    """``(out, attn, mean, rstd, lse)`` as the dense :func:`.triton.forward`, each query attending only to its
    neighbours; ``weight, bias: (E,)`` float32."""
    out, attn = (_blocks.new_buffer(*xq.shape, dtype=xq.dtype, device=xq.device) for _ in range(2))
    mean, rstd = (_blocks.new_buffer(launch.query_rows, dtype=torch.float32, device=xq.device) for _ in range(2))
    lse = _blocks.new_buffer(launch.query_rows, launch.heads, dtype=torch.float32, device=xq.device)
    flags = launch.flags(backward=False)
    programs, blocks = launch.blocks(flags["BLOCK_M"])
    if programs:
        _local_forward_kernel[(programs,)](xq, q, k, v, weight, bias, out, attn, mean, rstd, lse, *blocks,
                                           *launch.neighbourhood(), *launch.sizes(), scale, eps, **flags)
    return out, attn, mean, rstd, lse


def backward(xq, q, k, v, weight, attn, mean, rstd, lse, d_out, launch: LocalLaunch, scale: float):
    """``(d_xq, d_q, d_k, d_v, d_ln)`` as the dense :func:`.triton.backward`."""
    d_xq, d_q = (_blocks.new_buffer(*xq.shape, dtype=xq.dtype, device=xq.device) for _ in range(2))
    d_k, d_v = (_blocks.new_buffer(*k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
    delta = _blocks.new_buffer(launch.query_rows, launch.heads, dtype=torch.float32, device=xq.device)
    flags = launch.flags(backward=True)
    query_programs, query_blocks = launch.blocks(flags["BLOCK_M"])
    d_ln = norm_grad(xq, attn, weight, mean, rstd, d_out, d_xq, delta, launch.heads, launch.tile)
    if query_programs:
        _local_query_grad_kernel[(query_programs,)](q, k, v, lse, delta, d_xq, d_q, *query_blocks,
                                                    *launch.neighbourhood(), *launch.sizes(), scale, **flags)
    key_programs, key_blocks = launch.blocks(flags["BLOCK_N"], transposed=True)
    if key_programs:
        _local_key_grad_kernel[(key_programs,)](q, k, v, lse, delta, d_xq, d_k, d_v, *key_blocks,
                                                *launch.neighbourhood(transposed=True), *launch.sizes(), scale,
                                                **flags)
    return d_xq, d_q, d_k, d_v, d_ln


def _signatures(ptr: str) -> dict:
    """Each kernel's argument types for inputs of pointer type ``ptr``."""
    rows = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr)
    neighbourhood = dict(coords_q_ptr="*i32", coords_k_ptr="*i32")
    scalars = dict(patch_q="i32", patch_k="i32", radius="i32", H="i32", dh="i32", E="i32", scale="fp32")
    grads = dict(lse_ptr="*fp32", delta_ptr="*fp32", d_attn_ptr=ptr)
    query_blocks = dict(query_order_ptr="*i32", candidate_ptr_ptr="*i64", candidate_key_ptr="*i32")
    return {
        _local_forward_kernel: dict(xq_ptr=ptr, **rows, weight_ptr="*fp32", bias_ptr="*fp32", out_ptr=ptr,
                                    attn_ptr=ptr, mean_ptr="*fp32", rstd_ptr="*fp32", lse_ptr="*fp32", **query_blocks,
                                    **neighbourhood, Nq="i32", **scalars, eps="fp32"),
        _local_query_grad_kernel: dict(rows, **grads, d_q_ptr=ptr, **query_blocks, **neighbourhood, Nq="i32",
                                       **scalars),
        _local_key_grad_kernel: dict(rows, **grads, d_k_ptr=ptr, d_v_ptr=ptr, key_order_ptr="*i32",
                                     candidate_ptr_ptr="*i64", candidate_query_ptr="*i32", **neighbourhood, Nk="i32",
                                     **scalars),
    }


def shipped_specializations():
    """Every local-mode kernel specialization the dispatcher can launch on a GPU, for ahead-of-time compile
    checks: the forward and the two gradient kernels, for the three dtypes and every ``(HP, DHP)`` tile of the
    dense kernels (whose norm-gradient kernel the backward shares). Yields ``(kernel, signature, constexprs,
    num_warps, aligned)``; ``aligned``: E and dh, multiples of 16 where the head size is."""
    for (dtype, ptr), tile in itertools.product(_POINTER_TYPES.items(), _CONFIGS):
        signatures = _signatures(ptr)
        for kernel, backward in ((_local_forward_kernel, False), (_local_query_grad_kernel, True),
                                 (_local_key_grad_kernel, True)):
            flags = local_flags(tile, dtype, False, backward)
            warps = flags.pop("num_warps")
            yield kernel, signatures[kernel], flags, warps, ("E", "dh")
