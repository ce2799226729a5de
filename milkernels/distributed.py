"""Sequence parallelism on ``torch.distributed``: one bag's rows split across the ranks of a process group.

Each rank holds a contiguous shard of the bag's instances (any size, an empty one included) and calls an op
with ``process_group=group``. The ops that reduce over the instances (gated attention pooling, query
attention, linear attention) reduce each shard with their kernels and combine the shards' partial statistics
with an all-reduce on ``group``, so every rank gets the result of the whole bag:

- pooled outputs (gated and query attention) are the same on every rank;
- per-instance outputs (scores, linear attention's ``out``) are the rank's own rows.

Gradients treat the group as a data-parallel group, as ``DistributedDataParallel`` does: the group's loss is
the mean of the ranks' losses. A loss on the replicated pooled output, computed alike on every rank, is then
the whole bag's loss; a loss term on a rank's own rows should be multiplied by the world size W to count each
instance once. The backward of each cross-rank sum is the sum of the ranks' upstream gradients (the adjoint of
the forward's all-reduce), so the gradient that reaches a rank's rows is W times its share, and **averaging
the parameters' gradients over the group gives every parameter the whole bag's gradient**: wrap the model in
``DistributedDataParallel(model, process_group=group)``, or call :func:`all_reduce_gradients` after the
backward.

Every collective waits at most :data:`COLLECTIVE_TIMEOUT` (the ``MILKERNELS_COLLECTIVE_TIMEOUT`` environment
variable, in seconds; 300 by default) and then raises a ``RuntimeError`` that names the op, so a rank that
never joins (a bag given to one rank only) is an error, not a hang.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("MILKERNELS_COLLECTIVE_TIMEOUT", "300")))
_counters: list[collections.Counter] = []


@contextlib.contextmanager
def counting_communication() -> Iterator[collections.Counter]:
    """Count, inside the block, the bytes of the ops' collectives on this rank: yields a Counter from the op's name
    to bytes: the all-reduced tensors' sizes (a ring all-reduce sends about twice that over the wire) and the
    bytes an all-to-all brings to this rank."""
    counts = collections.Counter()
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)


def group_name(process_group) -> str:
    """The name under which the ops find ``process_group`` (a ``torch.distributed.ProcessGroup``, or
    ``torch.distributed.group.WORLD``); ValueError unless torch.distributed is initialized and it is one."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group given but torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first (torchrun does it for you)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    return process_group.group_name


def resolve(name: str):
    """The process group of :func:`group_name`'s ``name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def all_reduce(tensor: torch.Tensor, op, group, what: str) -> torch.Tensor:
    """All-reduce ``tensor`` in place on ``group`` (``op``: a ``torch.distributed.ReduceOp``), waiting at most
    :data:`COLLECTIVE_TIMEOUT`; ``what`` names the caller in the error. Returns ``tensor``."""
    _count(what, tensor)
    _wait(dist.all_reduce(tensor, op=op, group=group, async_op=True), "an all-reduce", group, what)
    return tensor


def all_to_all(output: torch.Tensor, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
               what: str) -> torch.Tensor:
    """Send ``tensor``'s rows ``input_splits[d]`` (in rank order along dim 0) to rank ``d`` of ``group`` and receive
    into ``output``'s rows ``output_splits[s]`` those of rank ``s``, waiting at most :data:`COLLECTIVE_TIMEOUT`.
    Counted as the bytes this rank receives. Returns ``output``."""
    _count(what, output)
    _wait(dist.all_to_all_single(output, tensor, output_splits, input_splits, group=group, async_op=True),
          "an all-to-all", group, what)
    return output


def _count(what: str, tensor: torch.Tensor) -> None:
    for counts in _counters:
        counts[what] += tensor.numel() * tensor.element_size()


def _wait(work, collective: str, group, what: str) -> None:
    try:
        work.wait(timeout=COLLECTIVE_TIMEOUT)
    except RuntimeError as error:
        raise RuntimeError(
            f"{what}: {collective} on process group {group.group_name!r} ({group.size()} ranks) did not complete "
            f"within {COLLECTIVE_TIMEOUT.total_seconds():.0f} s. Every rank of the group must make the same call "
            "with its shard of the same bags (an empty shard included); set MILKERNELS_COLLECTIVE_TIMEOUT to wait "
            f"longer. ({error})") from error


def check_same_sizes(group, what: str, device: torch.device, **sizes: int) -> None:
    """ValueError on every rank unless every rank of ``group`` gives the same ``sizes`` (named ints); the check's
    all-reduce runs on ``device`` (the data's: NCCL takes CUDA tensors only)."""
    local = torch.tensor(list(sizes.values()), dtype=torch.float64, device=device)
    extremes = all_reduce(torch.cat([local, -local]), dist.ReduceOp.MAX, group, what).tolist()
    largest, smallest = extremes[:len(sizes)], [-value for value in extremes[len(sizes):]]
    differ = [f"{name} from {int(low)} to {int(high)}" for name, low, high in zip(sizes, smallest, largest)
              if low != high]
    if differ:
        raise ValueError(f"{what}: the ranks of process group {group.group_name!r} disagree on {', '.join(differ)}; "
                         "every rank must hold a shard of the same bags, with the same feature sizes and dtype")


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], process_group) -> None:
    """Average the ``.grad`` of ``parameters`` over ``process_group`` (a missing gradient counts as zeros), as
    ``DistributedDataParallel`` does: after a sequence-parallel backward, each then holds the whole bag's
    gradient (see the module doc)."""
    group = resolve(group_name(process_group))
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        all_reduce(parameter.grad, dist.ReduceOp.SUM, group, "all_reduce_gradients")
        parameter.grad /= group.size()


def set_process_group(model: torch.nn.Module, process_group) -> list[str]:
    """Make every sequence-parallel milkernels module in ``model`` (a ``process_group`` attribute: gated attention
    pooling, query attention, linear attention, dilated attention) use ``process_group`` (None: back to whole bags
    on each rank).
    Returns their names in ``model``."""
    if process_group is not None:
        group_name(process_group)
    names = []
    for name, module in model.named_modules():
        if hasattr(type(module), "process_group"):
            module.process_group = process_group
            names.append(name)
    return names


__all__ = ["COLLECTIVE_TIMEOUT", "all_reduce_gradients", "counting_communication", "set_process_group"]
