"""Coordinate-local cross-attention: each query patch attends only to the key patches near it on the slide.

Patches are boxes in level-0 pixels: query ``i`` is ``[qx, qx + pq) x [qy, qy + pq)`` with ``(qx, qy) =
coords_q[i]`` (the top-left corner, as CLAM/TRIDENT store it), key ``j`` is ``[kx, kx + pk) x [ky, ky + pk)``.
Their gaps along each axis are

    gap_x = max(kx - (qx + pq), qx - (kx + pk))      negative when the x-intervals overlap
    gap_y = max(ky - (qy + pq), qy - (ky + pk))

and key ``j`` is a neighbour of query ``i`` iff ``gap_x < radius`` and ``gap_y < radius``. ``radius = 0``
keeps the overlapping patches only (patches that merely touch do not overlap); a 10x patch of 512 px then
sees the four 20x patches of 256 px inside it, and a 20x patch its 10x parent. The relation is symmetric:
swapping the query and key roles (coordinates and patch sizes) transposes it.

Nothing here forms an ``Nq x Nk`` array except :func:`neighbour_mask`, the brute-force oracle for small
bags. :func:`plan` sorts both sides by tile and lists, for each block of sorted queries, the ranges of sorted
keys that hold all their neighbours, in ``O((Nq + Nk) log N)`` plus the size of the plan; a block-sparse
flash kernel and :func:`local_reference` walk those ranges and mask exactly with the coordinates.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..gated_attention.reference import segment_softmax

REFERENCE_BLOCK_Q = 32


@dataclass(frozen=True)
class LocalNeighbourhood:
    """Which keys each query sees: patch coordinates and sizes in level-0 pixels, and a radius.

    ``coords_q: (Nq, 2)`` and ``coords_k: (Nk, 2)`` integer top-left ``(x, y)``, on one device;
    ``patch_size_q``, ``patch_size_k`` >= 1 and ``radius`` >= 0 Python ints (see the module docstring).
    """

    coords_q: torch.Tensor
    coords_k: torch.Tensor
    patch_size_q: int
    patch_size_k: int
    radius: int = 0

    def __post_init__(self):
        for name in ("coords_q", "coords_k"):
            check_coords(name, getattr(self, name))
        if self.coords_q.device != self.coords_k.device:
            raise ValueError(f"coords_q and coords_k must be on one device, "
                             f"got {self.coords_q.device} and {self.coords_k.device}")
        check_int("patch_size_q", self.patch_size_q, minimum=1)
        check_int("patch_size_k", self.patch_size_k, minimum=1)
        check_int("radius", self.radius, minimum=0)

    def swapped(self) -> LocalNeighbourhood:
        """The transposed neighbourhood: keys become queries and queries keys."""
        return LocalNeighbourhood(self.coords_k, self.coords_q, self.patch_size_k, self.patch_size_q, self.radius)


def check_coords(name: str, coords):
    """Raise ValueError unless ``coords`` is an ``(N, 2)`` integer tensor."""
    if not isinstance(coords, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, 2), got {type(coords).__name__}")
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) (top-left x, y), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer level-0 pixels, got {coords.dtype}")


def check_int(name: str, value, minimum: int):
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def is_neighbour(coords_q, coords_k, local: LocalNeighbourhood) -> torch.Tensor:
    """Whether each key is a neighbour of each query; ``coords_q: (..., 2)`` and ``coords_k: (..., 2)`` broadcast.

    Returns the broadcast shape without the last axis, bool.
    """
    coords_q, coords_k = coords_q.long(), coords_k.long()
    gap = torch.maximum(coords_k - (coords_q + local.patch_size_q), coords_q - (coords_k + local.patch_size_k))
    return (gap < local.radius).all(dim=-1)


def neighbour_mask(local: LocalNeighbourhood) -> torch.Tensor:
    """The dense ``(Nq, Nk)`` bool neighbour relation, by brute force: for tests and small bags only."""
    return is_neighbour(local.coords_q[:, None], local.coords_k[None], local)


@dataclass(frozen=True)
class LocalPlan:
    """Block-sparse structure of a :class:`LocalNeighbourhood`, all int64 on the coordinates' device.

    ``q_order: (Nq,)`` the queries in Morton order of their patch grid; block ``b`` is the sorted queries
    ``q_order[b * block_q : (b + 1) * block_q]`` (the last block may be short), ``Bq = ceil(Nq / block_q)``.
    ``k_order: (Nk,)`` the keys sorted by tile, row-major (tile ``(ty, tx)`` of side ``tile_size``).
    ``range_ptr: (Bq + 1,)`` CSR over blocks: block ``b`` owns ranges ``range_ptr[b] : range_ptr[b + 1]``.
    ``range_start, range_end: (R,)`` half-open ranges of positions in ``k_order``; sorted, disjoint and
    not touching within a block, and together holding every neighbour of the block's queries (a superset
    at tile granularity: a kernel masks exactly with the coordinates).
    """

    q_order: torch.Tensor
    k_order: torch.Tensor
    range_ptr: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    block_q: int
    tile_size: int


def default_tile_size(local: LocalNeighbourhood) -> int:
    """The tile side in level-0 pixels: the smaller patch size, or the radius where larger.

    Small tiles keep the candidates close to the union of a block's neighbours (on 20x and 10x grids,
    1.0 to 1.2 times it for blocks of 32 to 128 queries); no smaller than the radius, a query's window
    spans at most ``(pq + pk) / tile + 4`` tile rows.
    """
    return max(min(local.patch_size_q, local.patch_size_k), local.radius)


def plan(local: LocalNeighbourhood, block_q: int, tile_size: int | None = None) -> LocalPlan:
    """The :class:`LocalPlan` of ``local`` for blocks of ``block_q`` sorted queries.

    ``tile_size`` (level-0 pixels, default :func:`default_tile_size`) trades the number of ranges (one per
    tile row a block touches, fewer for larger tiles) against the candidates beyond the true neighbours.
    Two sorts, one search per query and tile row of its window, one sort of those ranges:
    ``O((Nq + Nk) log N)``.
    """
    check_int("block_q", block_q, minimum=1)
    tile_size = default_tile_size(local) if tile_size is None else tile_size
    check_int("tile_size", tile_size, minimum=1)
    num_blocks = -(-len(local.coords_q) // block_q)
    if not len(local.coords_q) or not len(local.coords_k):
        return empty_plan(local, num_blocks, block_q, tile_size)
    q_order = morton_order(local.coords_q, local.patch_size_q)
    key_tiles, tile_grid = tile_ids(local.coords_k, tile_size)
    sorted_tiles, k_order = torch.sort(key_tiles, stable=True)
    block, start, end = query_row_ranges(local, q_order, block_q, tile_size, sorted_tiles, tile_grid)
    block, start, end = merge_ranges(block, start, end, num_keys=len(k_order))
    counts = torch.bincount(block, minlength=num_blocks)
    range_ptr = F.pad(torch.cumsum(counts, 0), (1, 0))
    return LocalPlan(q_order, k_order, range_ptr, start, end, block_q, tile_size)


def empty_plan(local: LocalNeighbourhood, num_blocks: int, block_q: int, tile_size: int) -> LocalPlan:
    """The plan without a range, for a bag with no query or no key."""
    device = local.coords_q.device
    no_range = torch.zeros(0, dtype=torch.long, device=device)
    return LocalPlan(torch.arange(len(local.coords_q), device=device), torch.arange(len(local.coords_k), device=device),
                     torch.zeros(num_blocks + 1, dtype=torch.long, device=device), no_range, no_range, block_q, tile_size)


def morton_order(coords: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N,)`` int64: the order of ``coords: (N, 2)`` along the Z curve of their ``patch_size`` grid.

    Grid indices (from the smallest coordinate) must stay below 2^31, far beyond any slide.
    """
    grid = (coords.long() - coords.long().amin(dim=0)) // patch_size
    code = spread_bits(grid[:, 0]) | (spread_bits(grid[:, 1]) << 1)
    return torch.sort(code, stable=True).indices


def spread_bits(value: torch.Tensor) -> torch.Tensor:
    """``value: (N,)`` int64 below 2^31 with a zero bit inserted above each of its bits."""
    for shift, keep in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                        (2, 0x3333333333333333), (1, 0x5555555555555555)):
        value = (value | (value << shift)) & keep
    return value


@dataclass(frozen=True)
class TileGrid:
    """The key tiles: ``origin: (2,)`` the level-0 pixel of tile (0, 0), and ``width x height`` tiles."""

    origin: torch.Tensor
    width: int
    height: int


def tile_ids(coords_k: torch.Tensor, tile_size: int):
    """``(tile id: (Nk,) int64, TileGrid)``: row-major ids of the tiles holding each key's top-left corner."""
    origin = coords_k.long().amin(dim=0)
    tiles = (coords_k.long() - origin) // tile_size
    width, height = (tiles.amax(dim=0) + 1).tolist()
    return tiles[:, 1] * width + tiles[:, 0], TileGrid(origin, width, height)


def query_row_ranges(local, q_order, block_q, tile_size, sorted_tiles, grid: TileGrid):
    """``(block, start, end)``, each ``(M,)`` int64: one key range per query and tile row it may reach.

    A key can be a neighbour only if its top-left corner lies strictly within ``pk + radius`` before and
    ``pq + radius`` after the query's, along each axis; the tiles of that window, clamped to the grid,
    are a rectangle, and each of its rows one run of ``sorted_tiles``.
    """
    coords = local.coords_q[q_order].long() - grid.origin
    low = (coords - (local.patch_size_k + local.radius - 1)).div(tile_size, rounding_mode="floor")
    high = (coords + (local.patch_size_q + local.radius - 1)).div(tile_size, rounding_mode="floor")
    last = torch.tensor([grid.width - 1, grid.height - 1], device=coords.device)
    low, high = low.clamp(min=0), torch.minimum(high, last)
    rows = (high[:, 1] - low[:, 1] + 1).clamp(min=0) * (high[:, 0] >= low[:, 0])
    query = torch.repeat_interleave(torch.arange(len(coords), device=coords.device), rows)
    row = low[query, 1] + offsets_within(rows)
    start = torch.searchsorted(sorted_tiles, row * grid.width + low[query, 0], side="left")
    end = torch.searchsorted(sorted_tiles, row * grid.width + high[query, 0], side="right")
    return query // block_q, start, end


def offsets_within(counts: torch.Tensor) -> torch.Tensor:
    """``0 .. counts[i] - 1`` for each ``i`` in turn, concatenated: ``(counts.sum(),)`` int64."""
    firsts = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(firsts, counts)


def merge_ranges(block, start, end, num_keys: int):
    """Per block, the union of the half-open ranges ``[start, end)`` as sorted, disjoint, non-touching ranges.

    ``block, start, end: (M,)`` int64 in any order; returns ``(block, start, end)`` of the merged ranges.
    Empty ranges vanish.
    """
    keep = end > start
    block, start, end = block[keep], start[keep], end[keep]
    stride = num_keys + 1
    order = torch.sort(block * stride + start, stable=True).indices
    block, start, end = block[order], start[order], end[order]
    reach = torch.cummax(block * stride + end, 0).values - block * stride
    opens = torch.ones(len(block), dtype=torch.bool, device=block.device)
    opens[1:] = (block[1:] != block[:-1]) | (start[1:] > reach[:-1])
    closes = torch.roll(opens, -1)
    return block[opens], start[opens], reach[closes]


def candidate_positions(local_plan: LocalPlan):
    """``(candidate_ptr: (Bq + 1,), position: (C,))`` int64: each block's ranges spelled out, CSR over blocks.

    Block ``b``'s candidates are the keys ``k_order[position[candidate_ptr[b] : candidate_ptr[b + 1]]]``,
    in sorted key order: a kernel can walk them in chunks of ``BLOCK_K`` whatever the ranges' lengths.
    """
    lengths = local_plan.range_end - local_plan.range_start
    position = torch.repeat_interleave(local_plan.range_start, lengths) + offsets_within(lengths)
    return F.pad(torch.cumsum(lengths, 0), (1, 0))[local_plan.range_ptr], position


def candidate_pairs(local_plan: LocalPlan):
    """``(query, key)``, each ``(P,)`` int64 original indices: every query paired with its block's candidates."""
    candidate_ptr, position = candidate_positions(local_plan)
    num_blocks, num_queries = len(candidate_ptr) - 1, len(local_plan.q_order)
    position_block = torch.repeat_interleave(torch.arange(num_blocks, device=position.device), candidate_ptr.diff())
    block_sizes = (num_queries - position_block * local_plan.block_q).clamp(max=local_plan.block_q)
    key = torch.repeat_interleave(local_plan.k_order[position], block_sizes)
    sorted_query = torch.repeat_interleave(position_block * local_plan.block_q, block_sizes) + offsets_within(block_sizes)
    return local_plan.q_order[sorted_query], key


def neighbour_pairs(local: LocalNeighbourhood, block_q: int = REFERENCE_BLOCK_Q):
    """``(query, key)``, each ``(P,)`` int64: every neighbouring pair, found through :func:`plan`."""
    query, key = candidate_pairs(plan(local, block_q))
    keep = is_neighbour(local.coords_q[query], local.coords_k[key], local)
    return query[keep], key[keep]


def local_reference(xq, q, k, v, ln_weight, ln_bias, local: LocalNeighbourhood, *, heads: int = 1,
                    softmax_scale: float | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``out: (Nq, E) = LayerNorm(xq + attention of each query over its neighbours only)``, in xq's dtype.

    ``xq, q: (Nq, E)``, ``k, v: (Nk, E)``, split into ``heads`` of ``dh = E // heads``; scores
    ``q_h . k_h * softmax_scale`` (default ``dh ** -0.5``), softmax over the neighbours of each query
    (:class:`LocalNeighbourhood`); ``ln_weight, ln_bias: (E,)`` or None; computed in at least float32. A
    query with no neighbour gets attention 0, so ``out = LayerNorm(xq)``; no NaN arises, in gradients either.
    Plain PyTorch, differentiable by autograd; memory is ``O(P E)`` for the ``P`` candidate pairs of
    :func:`plan` (a few times the neighbouring pairs), never ``Nq x Nk``.
    """
    num_queries, width = xq.shape
    if q.shape != xq.shape or k.shape != v.shape or k.shape[1] != width or width % heads:
        raise ValueError(f"need xq, q: (Nq, E), k, v: (Nk, E) with E divisible by heads={heads}, got "
                         f"{tuple(xq.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if len(local.coords_q) != num_queries or len(local.coords_k) != len(k):
        raise ValueError(f"coords for {len(local.coords_q)} queries and {len(local.coords_k)} keys, "
                         f"tensors for {num_queries} and {len(k)}")
    compute_dtype = torch.promote_types(xq.dtype, torch.float32)
    head_dim = width // heads
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    query, key = neighbour_pairs(local)
    q_heads, k_heads, v_heads = (t.to(compute_dtype).reshape(len(t), heads, head_dim) for t in (q, k, v))
    scores = (q_heads[query] * k_heads[key]).sum(-1) * scale                              # (P, H)
    weights = segment_softmax(scores, query, num_queries)
    attention = torch.zeros_like(q_heads).index_add(0, query, weights[:, :, None] * v_heads[key])
    weight, bias = (None if t is None else t.to(compute_dtype) for t in (ln_weight, ln_bias))
    out = F.layer_norm(xq.to(compute_dtype) + attention.flatten(1), (width,), weight, bias, eps)
    return out.to(xq.dtype)
