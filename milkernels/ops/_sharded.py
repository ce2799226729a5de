"""What the sequence-parallel ops share: a rank's shard as packed bags, the check that the ranks agree, and the
combine of the shards' normalized pools (see :mod:`milkernels.distributed` for the contract).

A pool normalized over one shard, ``pooled_r = sum_n p_rn x_n`` with ``p_rn = w_n / W_r``, and its log
normalizer ``lse_r = log W_r`` combine into the whole bag's as

    softmax columns:  W = sum_r exp(lse_r),             pooled = sum_r exp(lse_r - log W) pooled_r
    NSF columns:      W = sum_r (exp(lse_r) - eps) + eps (each shard's lse_r = log(S_r + eps))

computed against the largest ``lse_r`` (softmax) so that nothing overflows. A shard with no valid row has
``lse_r = -inf`` and adds nothing, whatever its pooled row holds (NaN included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import distributed
from ._bags import FLOAT_DTYPES, Bags, pack_bags


@dataclass(frozen=True)
class Shard:
    """A rank's shard as packed ``bags``. An empty shard (``N = 0``) is packed as one masked zero row per bag,
    so that the kernels and the collectives run as on every other rank; ``empty`` says so, and the per-row
    results are cut back to ``N = 0`` by :meth:`rows_to_caller`."""

    bags: Bags
    empty: bool
    single: bool

    @staticmethod
    def whole(bags: Bags) -> "Shard":
        """All of ``bags`` (no sequence parallelism)."""
        return Shard(bags, False, bags.layout == "single")

    def rows_to_caller(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row results ``(T, ...)`` in the caller's layout (``(0, ...)`` or ``(B, 0, ...)`` when empty)."""
        rows = self.bags.rows_to_caller(rows)
        if not self.empty:
            return rows
        return rows[0, :0] if self.single else rows[:, :0]

    def cut(self, per_row: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """A per-row result already in the caller's layout (rows along ``axis``, counted from the end, as in
        ``(B, H, Q, N)``), cut back to no row when the shard is empty."""
        if not self.empty:
            return per_row
        return (per_row[0] if self.single else per_row).narrow(axis, 0, 0)

    def bags_to_caller(self, per_bag: torch.Tensor) -> torch.Tensor:
        """Per-bag results ``(B, ...)`` in the caller's layout."""
        return per_bag[0] if self.single else self.bags.bags_to_caller(per_bag)


def shard_bags(x: torch.Tensor, features: int, mask=None, cu_seqlens=None) -> Shard:
    """A rank's shard ``x`` (one bag ``(N, L)``, padded ``(B, N, L)`` with an optional mask, or packed ``(T, L)``
    with ``cu_seqlens``) as a :class:`Shard`; N may be 0, a packed bag may not be empty on a rank."""
    empty = x.dim() in (2, 3) and x.shape[-2] == 0 and cu_seqlens is None
    if not empty:
        return Shard.whole(pack_bags(x, features, mask, cu_seqlens))
    padded = x[None] if x.dim() == 2 else x
    filler = padded.new_zeros(padded.shape[0], 1, padded.shape[2])
    bags = pack_bags(torch.cat([padded, filler], dim=1), features,
                     torch.zeros(padded.shape[0], 1, dtype=torch.bool, device=x.device))
    return Shard(bags, True, x.dim() == 2)


def shard_call(what: str, x: torch.Tensor, features: int, mask, cu_seqlens, process_group, **sizes: int):
    """``(shard, group_name)`` of a call of op ``what``: its bags as a :class:`Shard` and the name of its process
    group, after checking that the group's ranks agree on the bags and ``sizes``; without a group, all the bags
    and None."""
    if process_group is None:
        return Shard.whole(pack_bags(x, features, mask, cu_seqlens)), None
    group_name = distributed.group_name(process_group)
    shard = shard_bags(x, features, mask, cu_seqlens)
    check_shards(distributed.resolve(group_name), what, shard.bags, **sizes)
    return shard, group_name


def check_shards(group, what: str, bags: Bags, **sizes: int) -> None:
    """ValueError on every rank unless all ranks of ``group`` hold as many bags, of the same dtype, and give the
    same ``sizes``."""
    distributed.check_same_sizes(group, what, bags.x2d.device, bags=bags.num_bags, features=bags.x2d.shape[1],
                                 dtype=FLOAT_DTYPES.index(bags.x2d.dtype), **sizes)


def rank_seed(seed: torch.Tensor | None, group_name: str) -> torch.Tensor | None:
    """The dropout seed of this rank of ``group_name``: ``seed`` moved by the rank, so that shards draw
    independent masks."""
    if seed is None:
        return None
    return (seed + 1_000_003 * dist.get_rank(distributed.resolve(group_name))) % (2**31 - 1)


def sum_over_ranks(tensor: torch.Tensor, group_name: str, what: str) -> torch.Tensor:
    """``tensor`` summed in place over the ranks of ``group_name`` (op ``what`` in errors and counts)."""
    return distributed.all_reduce(tensor, dist.ReduceOp.SUM, distributed.resolve(group_name), what)


class SumOfShards(torch.autograd.Function):
    """The sum of ``tensor`` over the ranks, differentiable: the backward sums the upstream gradients over the
    ranks too (the group's loss being the mean of the ranks' losses, see :mod:`milkernels.distributed`)."""

    @staticmethod
    def forward(ctx, tensor, group_name: str, what: str):
        ctx.options = (group_name, what)
        return sum_over_ranks(tensor.clone(), group_name, what)

    @staticmethod
    def backward(ctx, grad):
        return sum_over_ranks(grad.contiguous().clone(), *ctx.options), None, None


def sum_gradients(group_name: str, what: str, *grads):
    """The upstream gradients of the whole bags' pooled results (``None`` where absent) summed over the ranks in
    one all-reduce: the adjoint of the forward's sum, with which the kernels' backward then runs."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    flat = torch.cat([g.reshape(g.shape[0], -1).to(torch.promote_types(g.dtype, torch.float32)) for g in present],
                     dim=1)
    sum_over_ranks(flat, group_name, what)
    sums = iter(flat.split([g[0].numel() for g in present], dim=1))
    return tuple(next(sums).reshape(g.shape).to(g.dtype) if g is not None else None for g in grads)


def combine_pools(pooled, mass, lse, nsf_from: int, nsf_eps: float, group_name: str, what: str):
    """The whole bag's ``(pooled: (B, P, E), mass: (B, P) or None, lse: (B, P))`` from this rank's
    normalized ``pooled`` and ``mass`` (x's dtype) and its log normalizer ``lse: (B, P)``; columns from
    ``nsf_from`` on are NSF's (``nsf_eps`` its epsilon). Differentiable (the reference's path), and used inside
    the kernels' ops with autograd off. It computes in float32, or float64 for float64 inputs."""
    group, work = distributed.resolve(group_name), torch.promote_types(pooled.dtype, torch.float32)
    nsf = torch.arange(lse.shape[1], device=lse.device) >= nsf_from
    shift = lse.detach().to(work).masked_fill(nsf, 0.0)
    distributed.all_reduce(shift, dist.ReduceOp.MAX, group, what)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    scale = torch.exp(lse.to(work) - shift)                    # W_r, or S_r + eps for NSF, against the shift
    weight = scale - nsf_eps * nsf                            # what the shard adds to the normalizer
    present = (scale > 0)[..., None]
    parts = [torch.where(present, pooled.to(work) * scale[..., None], 0.0).flatten(1), weight]
    if mass is not None:
        parts.append(torch.where(present[..., 0], mass.to(work) * scale, 0.0))
    total = SumOfShards.apply(torch.cat(parts, dim=1), group_name, what)
    sums = total.split([pooled.shape[1] * pooled.shape[2], lse.shape[1]] + ([lse.shape[1]] if mass is not None
                                                                            else []), dim=1)
    normalizer = sums[1] + nsf_eps * nsf
    whole = (sums[0].reshape(pooled.shape) / normalizer[..., None]).to(pooled.dtype)
    whole_mass = (sums[2] / normalizer).to(mass.dtype) if mass is not None else None
    return whole, whole_mass, shift + torch.log(normalizer)
