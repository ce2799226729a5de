"""Dilated attention (LongNet) in plain PyTorch: the oracle for the kernels and the CPU path.

One bag: ``q, k, v: (N, H, dh)``; branches ``i`` are pairs (segment length ``w_i``, dilation rate ``r_i``).

Branch ``i`` (torchscale's ``DilatedAttention``, which Prov-GigaPath and Lin-MIL run):

- ``sl = min(w_i, N)``; the bag is zero-padded at the end to a multiple of ``sl`` and cut into segments
  of ``sl`` positions, each zero-padded to a multiple of ``r = r_i`` (``Lsp = ceil(sl / r)`` kept rows).
- Heads are split into ``r`` groups of ``G = ceil(H / r)`` contiguous heads: head ``h`` is in group
  ``h // G``. In each segment, group ``g`` keeps the in-segment positions ``j * r + g`` (``j < Lsp``), as
  queries and as keys.
- Each kept query attends, with softmax at scale ``softmax_scale`` (``dh ** -0.5``), to the kept keys of
  its segment. ``"torchscale"`` mode does not mask padding: a padded key has ``k = v = 0``, so it adds a
  score of 0 and a value of 0. It places the result of in-segment row ``j * r + g`` of segment ``s`` at
  position ``s * Lsp * r + j * r + g``, as upstream does: the segment's own position when ``r`` divides
  ``sl``, a shifted one otherwise (upstream's layout; positions from ``N`` on are dropped).
- A (position, head) that branch ``i`` does not reach gets ``out_i = 0`` and ``lse_i = -inf``.

``"torchscale"`` merges the branches with ``out = sum_i w_i out_i``, ``w = softmax_i(lse_i)`` computed
without gradient (upstream's ``torch.no_grad()``; an ``lse_i`` of ``-inf`` counts as upstream's
``-1e8``), so a key two branches share counts twice. ``"exact"`` is softmax attention over the union of
the branches' key sets, each key once, padding and the key ``mask`` left out, gradient through
everything. Both return the merged log-sum-exp ``lse = log sum_keys exp(score)`` (``-inf`` where no key
is reached; ``out`` is 0 there).
"""

from __future__ import annotations

import math

import torch

UPSTREAM_UNCOVERED_LSE = -1e8  # torchscale's lse of a (position, head) a branch does not reach
EXACT_QUERY_CHUNK = 256  # query rows per dense score block of the exact mode


def head_group_size(heads: int, rate: int) -> int:
    """G = ceil(H / r): heads ``[g * G, (g + 1) * G)`` form group ``g`` (the last groups may be short or empty)."""
    return -(-heads // rate)


def branch_rows(length: int, segment: int, rate: int, group: int, device) -> tuple:
    """The kept rows of head group ``group`` in one branch of a bag of ``length`` positions, as upstream
    lays them out: ``(source, real, target)``, each ``(S, Lsp)`` over segments ``S`` and kept rows.

    ``source``: the bag position a row reads (clamped into the bag); ``real``: whether that row is a real
    position (not padding); ``target``: the position its output goes to (may be ``>= length``: dropped).
    """
    span = min(segment, length)
    rows = -(-span // rate)
    segments = -(-length // span)
    in_segment = torch.arange(rows, device=device) * rate + group                       # (Lsp,)
    starts = torch.arange(segments, device=device)[:, None]                             # (S, 1)
    source = starts * span + in_segment
    real = (in_segment < span) & (source < length)
    target = starts * (rows * rate) + in_segment
    return source.clamp(max=length - 1), real, target


def segment_spans(segments, rates, length: int, mode: str) -> list[int]:
    """The segment lengths as the kernels take them on bags of at most ``length`` rows: each ``w`` longer than
    ``length`` cut to one segment of ``length`` (torchscale's ``min(w, N)``), a multiple of ``r`` in exact mode;
    the result is the same."""
    if mode == "exact":
        return [min(w, r * -(-length // r)) for w, r in zip(segments, rates)]
    return [min(w, length) for w in segments]


def _gather(x, source, real, heads):
    """``x[source, heads]`` with padding rows zeroed: ``(S, Lsp, Hg, dh)``."""
    return x[source][:, :, heads] * real[..., None, None].to(x.dtype)


def _branch(q, k, v, segment: int, rate: int, scale: float, compute_dtype):
    """One torchscale branch on one bag: ``out_i: (N, H, dh)`` in ``compute_dtype`` and ``lse_i: (N, H)``
    (``-inf`` where the branch does not reach)."""
    length, heads, head_dim = q.shape
    group_size = head_group_size(heads, rate)
    outs, lses = [], []
    for group in range(rate):
        head_slice = slice(group * group_size, min((group + 1) * group_size, heads))
        if head_slice.start >= heads:
            break
        source, real, target = branch_rows(length, segment, rate, group, q.device)
        qs, ks, vs = (_gather(t.to(compute_dtype), source, real, head_slice) for t in (q, k, v))
        scores = torch.einsum("slhd,smhd->shlm", qs, ks) * scale                      # (S, Hg, Lsp, Lsp)
        lse = torch.logsumexp(scores, dim=-1)                                           # (S, Hg, Lsp)
        out = torch.einsum("shlm,smhd->slhd", torch.exp(scores - lse[..., None]), vs)  # (S, Lsp, Hg, dh)
        # every (segment, row) has its own target; those from ``length`` on are dropped by the slice (upstream
        # also places padded rows when r does not divide sl)
        span, hg = target.numel() * rate, head_slice.stop - head_slice.start
        placed = out.new_zeros(span, hg, head_dim).index_put((target.flatten(),), out.flatten(0, 1))
        placed_lse = lse.new_full((span, hg), -math.inf).index_put((target.flatten(),),
                                                                   lse.transpose(1, 2).flatten(0, 1))
        outs.append(placed[:length])
        lses.append(placed_lse[:length])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _torchscale(q, k, v, segments, rates, scale, compute_dtype):
    """The torchscale merge of every branch on one bag: ``(out: (N, H, dh), lse: (N, H))``."""
    outs, lses = zip(*(_branch(q, k, v, w, r, scale, compute_dtype) for w, r in zip(segments, rates)))
    lses = torch.stack(lses)                                                            # (m, N, H)
    with torch.no_grad():
        weights = torch.softmax(lses.clamp_min(UPSTREAM_UNCOVERED_LSE), dim=0)
    out = sum(w[..., None] * o for w, o in zip(weights, outs))
    return out, torch.logsumexp(lses, dim=0).detach()


def allowed_keys(length: int, heads: int, segments, rates, queries: slice, device) -> torch.Tensor:
    """``(Q, N, H)`` bool: which keys each query of ``queries`` reaches in the exact mode (the union of the
    branches' key sets; each ``w_i`` a multiple of ``r_i``)."""
    query_pos = torch.arange(length, device=device)[queries][:, None, None]
    key_pos = torch.arange(length, device=device)[None, :, None]
    head = torch.arange(heads, device=device)[None, None, :]
    allowed = torch.zeros(query_pos.shape[0], length, heads, dtype=torch.bool, device=device)
    for segment, rate in zip(segments, rates):
        group = head // head_group_size(heads, rate)
        same_segment = query_pos // segment == key_pos // segment
        allowed |= same_segment & (query_pos % rate == group) & (key_pos % rate == group)
    return allowed


def _exact(q, k, v, segments, rates, scale, compute_dtype, key_valid):
    """Softmax attention over the union of the branches' key sets on one bag, in query chunks: ``(out, lse)``."""
    length, heads, _ = q.shape
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    outs, lses = [], []
    for start in range(0, length, EXACT_QUERY_CHUNK):
        chunk = slice(start, min(start + EXACT_QUERY_CHUNK, length))
        allowed = allowed_keys(length, heads, segments, rates, chunk, q.device)
        if key_valid is not None:
            allowed &= key_valid[None, :, None]
        scores = torch.einsum("qhd,khd->qkh", q[chunk], k) * scale
        scores = scores.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(scores, dim=1)                                            # (Q, H)
        weights = torch.exp(scores - lse[:, None]).nan_to_num(0.0)  # no key reached: lse -inf, weights 0
        outs.append(torch.einsum("qkh,khd->qhd", weights, v))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).detach()


def dilated_attention(q, k, v, bounds, segments, rates, scale: float, mode: str, row_valid=None):
    """Packed bags ``q, k, v: (T, H, dh)`` with bag ``bounds`` (B + 1 ints): ``(out: (T, H, dh), lse: (T, H))``.

    ``out`` in q's dtype, ``lse`` float32 (float64 for float64 input); ``row_valid: (T,)`` (exact mode
    only): False rows are not keys, and their own outputs are 0 with ``lse = -inf``.
    """
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        bag = [t[start:stop] for t in (q, k, v)]
        if mode == "torchscale":
            out, lse = _torchscale(*bag, segments, rates, scale, compute_dtype)
        else:
            valid = None if row_valid is None else row_valid[start:stop]
            out, lse = _exact(*bag, segments, rates, scale, compute_dtype, valid)
            if valid is not None:
                out = out * valid[:, None, None]
                lse = lse.masked_fill(~valid[:, None], -math.inf)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
