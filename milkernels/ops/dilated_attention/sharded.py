"""Sequence-parallel dilated attention: every bag's N positions split into contiguous shards over the ranks of a
process group (the contract is :mod:`milkernels.distributed`'s).

Rank ``ρ`` holds positions ``[a_ρ, a_(ρ+1))`` of every bag (the bounds come from one all-reduce of the shard sizes).
In branch ``i`` (segments of ``sl_i`` positions, :func:`.reference.segment_spans` of the bag's N; rate ``r_i``;
head ``h`` in group ``g_i(h) = h // ceil(H / r_i)``), the query at position ``p`` of head ``h`` attends, when
``p = g_i(h) (mod r_i)``, to the keys of its segment at the positions ``= g_i(h) (mod r_i)``. So a rank needs from
the others, per branch and head group, 1/r_i of the positions of the segments its queries fall in: the
``(position, head)`` entries of :func:`needed`, each sent once even where several branches need it.

- Forward: one all-to-all sends each rank the k and v entries it needs (with the key mask in exact mode). The rank
  lays them out with its own rows in a window of the positions that its queries' segments span, at their global
  positions, and the single-process kernels run on that window as on a bag of N positions: segment boundaries and
  torchscale's zero-padded keys are the whole bag's (:class:`.triton.Plan`'s ``window``).
- Backward: the kernels give dq of the rank's rows and dk, dv of every key its queries used; one all-to-all sends
  the received entries' dk, dv back to their owners, which add them to their own: the adjoint of the forward's
  exchange, a reduce-scatter of the key gradients.

The reference path makes the same exchange, then runs :mod:`.reference` on a bag of N positions that is zero
outside the window: right, not fast (it computes every position of the bag).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ... import distributed
from . import reference

OP_NAME = "dilated_attention"


@dataclass(frozen=True)
class Window:
    """Rank ``rank``'s view of bags of ``bounds[-1]`` positions sharded at ``bounds`` (W + 1 ints): its queries
    ``[bounds[rank], bounds[rank + 1])``, the keys they reach ``[key_start, key_stop)`` and the positions
    ``[start, stop)`` the kernels may read (the keys' segments, and those of the blocks' last rows)."""

    bounds: tuple
    rank: int
    start: int
    stop: int
    key_start: int
    key_stop: int

    @property
    def queries(self) -> tuple[int, int]:
        return self.bounds[self.rank], self.bounds[self.rank + 1]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def kernel_window(self, bags: int) -> list[int]:
        """The window as :class:`.triton.Plan` takes it."""
        return [bags, self.bounds[-1], self.start, *self.queries, self.key_start, self.key_stop]


def _segments_start(position: int, spans) -> int:
    """The first position of the segments (of every branch) that hold ``position``."""
    return min(position // span * span for span in spans)


def _segments_stop(position: int, spans, length: int) -> int:
    """The end of the segments (of every branch) that hold ``position - 1``, at most ``length``."""
    return max(min(length, -(-position // span) * span) for span in spans)


def window(bounds, rank: int, spans, overshoot: int) -> Window:
    """Rank ``rank``'s :class:`Window` for segment lengths ``spans``; the kernels' blocks may pass the last query or
    key by ``overshoot`` positions (0 for the reference)."""
    first, stop, length = bounds[rank], bounds[rank + 1], bounds[-1]
    if first == stop:
        return Window(tuple(bounds), rank, first, first, first, first)
    key_start, key_stop = _segments_start(first, spans), _segments_stop(stop, spans, length)
    return Window(tuple(bounds), rank, _segments_start(key_start, spans),
                  _segments_stop(min(length, key_stop + overshoot), spans, length), key_start, key_stop)


def needed(positions: Tensor, heads: int, queries: tuple[int, int], spans, rates) -> Tensor:
    """``(P, H)`` bool: which keys ``(positions[p], head h)`` the queries at positions ``[queries[0], queries[1])``
    reach in some branch (segment lengths ``spans``, rates ``rates``)."""
    head = torch.arange(heads, device=positions.device)
    need = torch.zeros(positions.shape[0], heads, dtype=torch.bool, device=positions.device)
    for span, rate in zip(spans, rates):
        group = head // reference.head_group_size(heads, rate)                          # (H,)
        segment_start = positions // span * span                                        # (P,)
        first = segment_start.clamp(min=queries[0])
        stop = (segment_start + span).clamp(max=queries[1])
        first_query = first[:, None] + (group[None, :] - first[:, None]) % rate       # (P, H)
        need |= ((positions % rate)[:, None] == group[None, :]) & (first_query < stop[:, None])
    return need


def shard_bounds(rows: int, group, device) -> list[int]:
    """The shards' boundaries ``[0, n_0, n_0 + n_1, ..., N]`` from each rank's ``rows`` (one all-reduce)."""
    sizes = torch.zeros(group.size(), dtype=torch.float64, device=device)
    sizes[group.rank()] = rows
    sizes = distributed.all_reduce(sizes, dist.ReduceOp.SUM, group, OP_NAME).long().tolist()
    return [0] + [sum(sizes[:rank + 1]) for rank in range(len(sizes))]


class ExchangeRows(torch.autograd.Function):
    """An all-to-all of ``rows: (S, ...)``: ``send[d]`` rows to each rank ``d`` in rank order, ``receive[s]`` rows
    from each rank ``s``; the backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx, rows, send, receive, group_name: str):
        ctx.options = (send, receive, group_name)
        return _all_to_all(rows, send, receive, group_name)

    @staticmethod
    def backward(ctx, grad):
        send, receive, group_name = ctx.options
        return _all_to_all(grad, receive, send, group_name), None, None, None


def _all_to_all(rows: Tensor, send: list[int], receive: list[int], group_name: str) -> Tensor:
    output = rows.new_empty((sum(receive),) + tuple(rows.shape[1:]))
    return distributed.all_to_all(output, rows.contiguous(), receive, send, distributed.resolve(group_name), OP_NAME)


def exchange(local: Tensor, view: Window, spans, rates, group_name: str) -> Tensor:
    """The window ``(B, rows, H, C)`` of this rank's entries ``local: (B, n, H, C)`` and those it needs from the
    other ranks (zero elsewhere), with one :class:`ExchangeRows`."""
    bags, _, heads, channels = local.shape
    bounds, device = view.bounds, local.device
    first, stop = view.queries
    entries = local.permute(1, 2, 0, 3)                                                  # (n, H, B, C)
    own = torch.arange(first, stop, device=device)
    sends = [needed(own, heads, (bounds[d], bounds[d + 1]), spans, rates) if d != view.rank
             else torch.zeros(stop - first, heads, dtype=torch.bool, device=device) for d in range(len(bounds) - 1)]
    positions = torch.arange(view.start, view.stop, device=device)
    receives = needed(positions, heads, view.queries, spans, rates) & ((positions < first) | (positions >= stop))[:, None]
    owners = torch.bucketize(positions, torch.tensor(bounds[1:-1], device=device), right=True)
    send = [int(mask.sum()) for mask in sends]
    receive = torch.zeros(len(bounds) - 1, dtype=torch.long, device=device).index_add_(
        0, owners, receives.sum(1)).tolist()
    received = ExchangeRows.apply(torch.cat([entries[mask] for mask in sends]), send, receive, group_name)
    buffer = local.new_zeros(view.rows, heads, bags, channels)
    buffer[receives] = received
    buffer[first - view.start:stop - view.start] = entries
    return buffer.permute(2, 0, 1, 3)


def attend(q, k, v, mask, segments, rates, scale: float, mode: str, group_name: str, backend: str, bounds,
           window_op):
    """This rank's ``(out: (B, n, H, dh), lse: (B, n, H))`` for its shard ``q, k, v: (B, n, H, dh)`` (``mask: (B,
    n)`` or None, exact mode only) of bags sharded over the ranks of ``group_name`` at ``bounds``
    (:func:`shard_bounds`); the triton path runs ``window_op`` (the custom op
    ``milkernels::dilated_attention_window_forward``) on the window."""
    bags, _, heads, head_dim = q.shape
    group = distributed.resolve(group_name)
    spans = reference.segment_spans(segments, rates, bounds[-1], mode)
    view = window(bounds, group.rank(), spans,
                  _overshoot(backend, head_dim, q.dtype, segments, rates, bounds[-1], mode))
    parts = [k, v] if mask is None else [k, v, mask[..., None, None].ne(0).to(k.dtype).expand(-1, -1, heads, 1)]
    buffer = exchange(torch.cat(parts, dim=-1), view, spans, rates, group_name)
    k_window, v_window = (t.contiguous() for t in buffer[..., :2 * head_dim].split(head_dim, dim=-1))
    valid = None if mask is None else buffer[..., -1].amax(dim=-1) > 0                 # (B, rows)
    first, stop = view.queries
    q_window = F.pad(q, (0, 0, 0, 0, first - view.start, view.stop - stop))
    if backend == "reference":
        return _reference(q_window, k_window, v_window, valid, view, segments, rates, scale, mode)
    out, lse, _ = window_op(*(t.flatten(0, 1) for t in (q_window, k_window, v_window)), view.kernel_window(bags),
                            list(segments), list(rates), None if valid is None else valid.flatten(), scale, mode)
    queries = slice(first - view.start, stop - view.start)
    return out.unflatten(0, (bags, -1))[:, queries], lse.unflatten(0, (bags, -1))[:, queries]


def _overshoot(backend: str, head_dim: int, dtype, segments, rates, length: int, mode: str) -> int:
    """How far past its last row a kernel block may reach on inputs of ``dtype``: the widest block of the period's
    residue class."""
    if backend == "reference":
        return 0
    from . import triton as kernels

    return kernels.widest_block(head_dim, dtype, segments, rates, length, mode) * math.lcm(*rates)


def _reference(q, k, v, valid, view: Window, segments, rates, scale, mode):
    """:func:`attend` on the reference: a bag of N positions, zero outside the window."""
    bags, length = q.shape[0], view.bounds[-1]
    padding = (0, 0, 0, 0, view.start, length - view.stop)
    whole = [F.pad(t, padding).flatten(0, 1) for t in (q, k, v)]
    row_valid = None
    if valid is not None:
        row_valid = valid.new_zeros(bags, length)
        row_valid[:, view.start:view.stop] = valid
        row_valid = row_valid.flatten()
    out, lse = reference.dilated_attention(*whole, [bag * length for bag in range(bags + 1)], segments, rates, scale,
                                           mode, row_valid)
    queries = slice(*view.queries)
    return out.unflatten(0, (bags, length))[:, queries], lse.unflatten(0, (bags, length))[:, queries]


def cleared(rows: Tensor, window: list[int], first: int, stop: int, value: float) -> Tensor:
    """``rows: (bags * window rows, ...)`` with every row outside positions ``[first, stop)`` set to ``value``."""
    per_bag = rows.view(window[0], -1, *rows.shape[1:])
    offset = window[2]
    per_bag[:, :max(first - offset, 0)] = value
    per_bag[:, max(stop - offset, 0):] = value
    return rows
