"""Benchmark entries for CMA-MIL's cross-magnification block, :func:`milkernels.ops.cross_attention`, dense
and coordinate-local.

``cross_magnification``: the block 10x -> 20x of CMA-MIL (``cross_attn_10x_20x``), one head: the ``N_q =
n / 4`` instances of the 10x bag attend to the ``N_k = n`` instances of the 20x bag (a 10x patch holds 2 x 2
20x patches)::

    out = LayerNorm(x_10x + softmax(q k^T / sqrt(D)) v),  q = x_10x Wq^T + bq,  k, v = x_20x W^T + b

Inputs ``(x_10x: (N_q, D), x_20x: (N_k, D), wq, bq, wk, bk, wv, bv, ln_w, ln_b)``, the weights ``(D, D)``
and the vectors ``(D,)``, all with ``requires_grad``; output ``(N_q, D)``. ``D = 128`` (CMA-MIL's ``--dim``)
on both devices.

Implementations: ``call`` projects and runs milkernels' op, which never forms the ``N_q x N_k`` matrix.
``reference`` is the eager block as CMA-MIL computes it, dense: the scores and the weights are ``N_q x N_k``
(16 GiB in float32 at n = 128k), so past the memory it runs out (an ``oom`` row). The peer ``sdpa`` is the
same block with ``F.scaled_dot_product_attention`` (a flash or memory-efficient kernel where one takes the
case), what a user gets from PyTorch alone.

``cross_magnification_local``: the same block in the coordinate-local mode, on a slide: the ``n / 4`` 10x
patches (512 px) of a square region, each attending only to the four 20x patches (256 px) inside it (radius
0), the 20x rows in a shuffled order. Inputs: the dense op's, then ``coords_10x: (N_q, 2)`` and ``coords_20x:
(N_k, 2)`` int64 (level-0 pixels, no gradient). ``call`` runs the op with ``local=``: block-sparse kernels, O(N)
time and memory. ``reference`` is the eager block with the neighbour mask applied to the dense scores (what a
PyTorch user writes; ``N_q x N_k`` memory, so ``oom`` past a few 100k); the peer ``local_reference`` is
milkernels' plain-PyTorch local path (gathers over the neighbouring pairs, O(N) memory).

FLOPs count the matmuls: the projections ``2 D^2 (N_q + 2 N_k)`` and the attention ``4 N_q N_k D`` (``q k^T``
and ``p v``; left out of the local op's count, :func:`local_flops`); forward + backward is 3 x forward (both
gradients of every product: every operand takes one). The softmax, the residual and the LayerNorm are
elementwise and left out.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..ops.cross_attention import cross_attention
from ..ops.cross_attention.local import LocalNeighbourhood, is_neighbour, local_reference
from .registry import Op, register

EPS = 1e-5  # CMA-MIL's LayerNorm(dim) default
QUERIES_PER_KEY = 4  # a 10x patch holds 2 x 2 20x patches
PATCH_10X, PATCH_20X = 512, 256  # level-0 pixels


def queries(n: int) -> int:
    """``N_q``, the 10x instances of a 20x bag of ``n``: ``n / 4``, at least 1."""
    return max(1, n // QUERIES_PER_KEY)


def _projections(x_10x, x_20x, wq, bq, wk, bk, wv, bv) -> tuple:
    """``(q: (N_q, D), k: (N_k, D), v: (N_k, D))``: the query, key and value projections."""
    return F.linear(x_10x, wq, bq), F.linear(x_20x, wk, bk), F.linear(x_20x, wv, bv)


def dense_attention(q, k, v):
    """``softmax(q k^T / sqrt(D)) v: (N_q, D)``, forming the ``(N_q, N_k)`` weights, as CMA-MIL does."""
    return torch.softmax(q @ k.T / q.shape[-1] ** 0.5, dim=-1) @ v


def sdpa_attention(q, k, v):
    """``softmax(q k^T / sqrt(D)) v: (N_q, D)`` by ``F.scaled_dot_product_attention`` (a fused kernel if any)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def eager_block(attend, x_10x, x_20x, wq, bq, wk, bk, wv, bv, ln_w, ln_b):
    """CMA-MIL's block in plain PyTorch with ``attend(q, k, v) -> (N_q, D)``: ``(N_q, D)``."""
    q, k, v = _projections(x_10x, x_20x, wq, bq, wk, bk, wv, bv)
    return F.layer_norm(x_10x + attend(q, k, v), ln_w.shape, ln_w, ln_b, EPS)


def call(x_10x, x_20x, wq, bq, wk, bk, wv, bv, ln_w, ln_b):
    """The projections, then milkernels' :func:`~milkernels.ops.cross_attention` (one head, scale ``D ** -0.5``):
    ``(N_q, D)``."""
    q, k, v = _projections(x_10x, x_20x, wq, bq, wk, bk, wv, bv)
    return cross_attention(x_10x, q, k, v, ln_w, ln_b, softmax_scale=x_10x.shape[-1] ** -0.5, eps=EPS)


def build(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """The inputs for a 20x bag of ``n`` (module doc), all with ``requires_grad``."""
    dim = dims["D"]
    generator = torch.Generator(device=device).manual_seed(n)

    def randn(shape, scale, shift=0.0):
        values = torch.randn(shape, generator=generator, device=device) * scale + shift
        return values.to(dtype).requires_grad_()

    projections = [randn(shape, scale) for _ in range(3) for shape, scale in (((dim, dim), dim ** -0.5), (dim, 0.1))]
    return (randn((queries(n), dim), 1.0), randn((n, dim), 1.0), *projections, randn(dim, 0.1, 1.0), randn(dim, 0.1))


def flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs (module doc): ``2 D^2 (N_q + 2 N_k) + 4 N_q N_k D`` forward, 3 x that with the backward."""
    dim, n_q = dims["D"], queries(n)
    forward = 2 * dim * dim * (n_q + 2 * n) + 4 * n_q * n * dim
    return 3 * forward if backward else forward


def min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes moved: the forward reads both bags and the weights once and writes the output.

    The backward reads the bags, the weights and the output gradient again and writes their gradients (the
    bags' and the weights').
    """
    dim = dims["D"]
    bags, weights, out = (queries(n) + n) * dim, 3 * dim * dim + 5 * dim, queries(n) * dim
    forward = bags + weights + out
    return itemsize * (forward + 2 * (bags + weights) + out if backward else forward)


CROSS_MAGNIFICATION = register(Op(
    name="cross_magnification",
    call=call,
    reference=functools.partial(eager_block, dense_attention),
    build=build,
    flops=flops,
    min_bytes=min_bytes,
    gpu_dims={"D": 128},
    cpu_dims={"D": 128},
    peers={"sdpa": lambda op: functools.partial(eager_block, sdpa_attention)},
))


def slide_coords(n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coords_10x: (N_q, 2), coords_20x: (4 N_q, 2))`` int64: the first ``N_q = queries(n)`` cells of a square
    grid of 10x patches, row by row, and the four 20x patches inside each, in a shuffled order."""
    n_q = queries(n)
    side = math.isqrt(n_q - 1) + 1
    cells = torch.arange(n_q)
    coords_10x = torch.stack([cells % side, cells // side], 1) * PATCH_10X
    children = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]) * PATCH_20X
    coords_20x = (coords_10x[:, None] + children).reshape(-1, 2)
    coords_20x = coords_20x[torch.randperm(len(coords_20x), generator=generator)]
    return coords_10x.to(device), coords_20x.to(device)


def neighbourhood(coords_10x, coords_20x) -> LocalNeighbourhood:
    return LocalNeighbourhood(coords_10x, coords_20x, PATCH_10X, PATCH_20X)


def local_call(x_10x, x_20x, wq, bq, wk, bk, wv, bv, ln_w, ln_b, coords_10x, coords_20x):
    """:func:`call` in the coordinate-local mode: ``(N_q, D)``."""
    q, k, v = _projections(x_10x, x_20x, wq, bq, wk, bk, wv, bv)
    return cross_attention(x_10x, q, k, v, ln_w, ln_b, softmax_scale=x_10x.shape[-1] ** -0.5, eps=EPS,
                           local=neighbourhood(coords_10x, coords_20x))


def masked_dense_block(x_10x, x_20x, wq, bq, wk, bk, wv, bv, ln_w, ln_b, coords_10x, coords_20x):
    """CMA-MIL's eager block with the scores of the non-neighbours at ``-inf`` (every 10x patch has its four
    children, so no row is empty): ``(N_q, D)``, forming ``N_q x N_k`` scores, weights and mask."""
    allowed = is_neighbour(coords_10x[:, None], coords_20x[None], neighbourhood(coords_10x, coords_20x))

    def attend(q, k, v):
        scores = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    return eager_block(attend, x_10x, x_20x, wq, bq, wk, bk, wv, bv, ln_w, ln_b)


def local_reference_block(x_10x, x_20x, wq, bq, wk, bk, wv, bv, ln_w, ln_b, coords_10x, coords_20x):
    """The block through milkernels' plain-PyTorch local path: ``(N_q, D)``."""
    q, k, v = _projections(x_10x, x_20x, wq, bq, wk, bk, wv, bv)
    return local_reference(x_10x, q, k, v, ln_w, ln_b, neighbourhood(coords_10x, coords_20x), eps=EPS)


def local_build(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """:func:`build`'s inputs for ``4 N_q`` 20x patches (``n`` rounded down to a multiple of 4, at least 4),
    then the two bags' coordinates (module doc)."""
    inputs = build(QUERIES_PER_KEY * queries(n), dims, dtype, device)
    return (*inputs, *slide_coords(n, torch.Generator().manual_seed(n), device))


def local_flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs: the projections ``2 D^2 (N_q + 2 N_k)`` with ``N_k = 4 N_q``, 3 x with the backward.

    The local attention (``4 P D`` for its ``P = N_k`` pairs, under 1% of the projections at D = 128) runs as
    gathers in the reference and as a FLOP count of 0 in the custom op's formula (pairs depend on the
    coordinates' values), so, as ``FlopCounterMode``, this leaves it out.
    """
    dim, n_q = dims["D"], queries(n)
    forward = 2 * dim * dim * (n_q + 2 * QUERIES_PER_KEY * n_q)
    return 3 * forward if backward else forward


def local_min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """:func:`min_bytes` of the dense op on the ``4 N_q`` 20x patches, plus reading the int64 coordinates once."""
    keys = QUERIES_PER_KEY * queries(n)
    return min_bytes(keys, dims, itemsize, backward) + 8 * 2 * (queries(n) + keys)


CROSS_MAGNIFICATION_LOCAL = register(Op(
    name="cross_magnification_local",
    call=local_call,
    reference=masked_dense_block,
    build=local_build,
    flops=local_flops,
    min_bytes=local_min_bytes,
    gpu_dims={"D": 128},
    cpu_dims={"D": 128},
    peers={"local_reference": lambda op: local_reference_block},
))
