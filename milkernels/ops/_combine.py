"""The combine of the split-N Triton forwards (flash-decoding style), shared by the pooling ops.

Each split (a run of rows of one bag) leaves fp32 partials per column j: the running max ``m`` of its
scores (0 for NSF columns, which need none), the sum ``l`` of its weights ``exp(z - m)`` (or
``sigmoid(z)``), the sum of its weights after dropout ``mass`` and the weighted sum of its rows ``acc``.
:func:`combine` merges a bag's splits in order into ``pooled = acc / (l + eps)``, ``mass / (l + eps)`` and
``lse = m + log(l + eps)``, with eps = 0 for softmax columns and ``nsf_eps`` for NSF columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _blocks

BLOCK_S = 32


@triton.jit
def combine_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, part_mass_ptr, bag_first_split_ptr,
    pooled_ptr, mass_ptr, lse_ptr, E, num_pooled, nsf_from, nsf_eps,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """pooled[bag, j, cols], mass[bag, j] and lse[bag, j] from the partials of the bag's splits."""
    bag = tl.program_id(0)
    j = tl.program_id(1)
    cols_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = cols_e < E
    first = tl.load(bag_first_split_ptr + bag)
    last = tl.load(bag_first_split_ptr + bag + 1)
    offs_s = tl.arange(0, BLOCK_S)
    running = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    for s0 in range(first, last, BLOCK_S):
        splits = s0 + offs_s
        running = tl.maximum(running, tl.load(part_max_ptr + splits * num_pooled + j, mask=splits < last,
                                              other=float("-inf")))
    bag_max = tl.max(running, axis=0)
    safe_max = tl.where(bag_max == float("-inf"), 0.0, bag_max)
    total = tl.zeros((BLOCK_S,), tl.float32)
    mass = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_E,), tl.float32)
    for s0 in range(first, last, BLOCK_S):
        splits = s0 + offs_s
        in_bag = splits < last
        part = splits * num_pooled + j
        scale = tl.exp(tl.load(part_max_ptr + part, mask=in_bag, other=float("-inf")) - safe_max)
        total += scale * tl.load(part_sum_ptr + part, mask=in_bag, other=0.0)
        mass += scale * tl.load(part_mass_ptr + part, mask=in_bag, other=0.0)
        partial = tl.load(part_acc_ptr + part.to(tl.int64)[:, None] * E + cols_e[None, :],
                          mask=in_bag[:, None] & e_ok[None, :], other=0.0)
        acc += tl.sum(scale[:, None] * partial, axis=0)
    denominator = tl.sum(total, axis=0) + tl.where(j >= nsf_from, nsf_eps, 0.0)
    out = bag * num_pooled + j
    tl.store(pooled_ptr + out.to(tl.int64) * E + cols_e, (acc / denominator).to(pooled_ptr.dtype.element_ty), mask=e_ok)
    if tl.program_id(2) == 0:
        tl.store(mass_ptr + out, (tl.sum(mass, axis=0) / denominator).to(mass_ptr.dtype.element_ty))
        tl.store(lse_ptr + out, safe_max + tl.log(denominator))


def combine(part_acc, part_max, part_sum, part_mass, bag_first_split, num_bags: int, dtype, nsf_from: int,
            nsf_eps: float, block_e: int):
    """``(pooled: (B, P, E) dtype, mass: (B, P) dtype, lse: (B, P) fp32)`` from the partials
    ``part_acc: (S, P, E)`` and ``part_max, part_sum, part_mass: (S, P)`` of S splits, the splits of bag b
    being ``bag_first_split[b]:bag_first_split[b + 1]``; columns from ``nsf_from`` on are NSF columns."""
    _, columns, features = part_acc.shape
    device = part_acc.device
    pooled = _blocks.new_buffer(num_bags, columns, features, dtype=dtype, device=device)
    mass = _blocks.new_buffer(num_bags, columns, dtype=dtype, device=device)
    lse = _blocks.new_buffer(num_bags, columns, dtype=torch.float32, device=device)
    if not columns:  # a scores-only call: nothing to launch (a grid of no program would still compile)
        return pooled, mass, lse
    grid = (num_bags, columns, triton.cdiv(features, block_e))
    combine_kernel[grid](part_acc, part_max, part_sum, part_mass, bag_first_split, pooled, mass, lse, features,
                         columns, nsf_from, nsf_eps, BLOCK_S=BLOCK_S, BLOCK_E=block_e)
    return pooled, mass, lse


def specialization(ptr: str, block_e: int, features: int | None = None):
    """``(kernel, signature, constexprs, num_warps, aligned)`` of :func:`combine` for output pointer type ``ptr``
    and E = ``features``: ``aligned`` names E when it is a multiple of 16 (a launch specializes on that)."""
    signature = dict(part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", part_mass_ptr="*fp32",
                     bag_first_split_ptr="*i32", pooled_ptr=ptr, mass_ptr=ptr, lse_ptr="*fp32", E="i32",
                     num_pooled="i32", nsf_from="i32", nsf_eps="fp32")
    aligned = ("E",) if features is not None and features % 16 == 0 else ()
    return combine_kernel, signature, dict(BLOCK_S=BLOCK_S, BLOCK_E=block_e), 4, aligned
