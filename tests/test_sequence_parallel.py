"""Sequence-parallel ops on a gloo group of 2 and 3 processes: each rank's shard against the whole bag in one
process, for outputs and every gradient, at N not divisible by the world size and with an empty shard (3 ranks).

Every rank builds the same inputs from one seed, runs the op on the whole bags itself, then on its shard with
the group, and backpropagates its part of the whole loss as :mod:`milkernels.distributed` has it: the loss on the
replicated pooled outputs as it is, the per-row terms on its own rows times the world size W. Then the
parameters' gradients, averaged over the group, are the whole bags' gradients, and the gradient of the rank's
rows is W times the whole bag's.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.distributed as dist

import milkernels
from milkernels.distributed import all_reduce_gradients, counting_communication
from milkernels.zoo.gigapath import LongNetArgs
import kernel_checks
from sharding import SHARDS, assert_close, bag_rows, device, run_ranks, shard_rows

BACKENDS = ("reference", "triton")
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "reference" else torch.float32


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _layouts(rank: int, world_size: int, features: int, dtype):
    """``(name, whole, shard, part)`` per layout: the inputs (``x`` and its mask or cu_seqlens) of the whole bags
    and of the rank's shard, and ``part``, which takes the shard's rows of a per-row tensor of the whole bags.

    One bag; two padded bags whose second has no valid row in rank 0's shard; two packed bags with rows of each
    on every rank."""
    rows, mine, dev = bag_rows(world_size), shard_rows(rank, world_size), device()
    one = torch.randn(rows, features, dtype=dtype, device=dev)
    padded = torch.randn(2, rows, features, dtype=dtype, device=dev)
    mask = torch.rand(2, rows, device=dev) > 0.3
    mask[1, shard_rows(0, world_size)] = False
    mask[:, -1] = True
    sizes = [[size + 1 for size in SHARDS[world_size]], [2 + r for r in range(world_size)]]
    firsts = [[sum(bag[:r]) for r in range(world_size + 1)] for bag in sizes]
    ends = torch.tensor([sum(bag) for bag in sizes]).cumsum(0).tolist()
    mine_packed = torch.cat([torch.arange(start + first[rank], start + first[rank + 1])
                             for start, first in zip([0] + ends[:-1], firsts)]).to(dev)
    packed = torch.randn(ends[-1], features, dtype=dtype, device=dev)
    return [
        ("one bag", dict(x=one), dict(x=one[mine]), lambda t: t[mine]),
        ("padded", dict(x=padded, mask=mask), dict(x=padded[:, mine], mask=mask[:, mine]), lambda t: t[:, mine]),
        ("packed", dict(x=packed, cu_seqlens=_cu([sum(bag) for bag in sizes], dev)),
         dict(x=packed[mine_packed], cu_seqlens=_cu([bag[rank] for bag in sizes], dev)), lambda t: t[mine_packed]),
    ]


def _columns(part):
    """``part`` for per-column results, whose rows are the last axis (``(H, Q, N)``, ``(B, H, Q, N)``)."""
    def columns(t):
        axis = 1 if t.dim() == 4 else 0
        return part(t.movedim(-1, axis)).movedim(axis, -1)
    return columns


def _cu(lengths, dev):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)


def _upstream(shape, dtype, dev, seed: int) -> torch.Tensor:
    """A random upstream gradient that every rank draws alike."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(dev)


def check_gated(rank: int, world_size: int, backend: str) -> None:
    torch.manual_seed(0)
    dtype, features, hidden, heads = _dtype(backend), 24, 16, 2
    weights = [torch.randn(hidden, features), torch.randn(hidden), torch.randn(hidden, features), torch.randn(hidden),
               torch.randn(heads, hidden) / 4, torch.randn(heads)]
    weights = [w.to(dtype=dtype, device=device()) for w in weights]
    tolerance = TOLERANCES[dtype]
    for name, whole, shard, part in _layouts(rank, world_size, features, dtype):
        d_scores = _upstream((*whole["x"].shape[:-1], heads), dtype, device(), 2)
        with milkernels.use_backend(backend):
            expected = _gated_run(whole, weights, None, d_scores)
            actual = _gated_run(shard, weights, dist.group.WORLD, part(d_scores) * world_size)
        all_reduce_gradients(actual["weights"], dist.group.WORLD)
        what = f"rank {rank} of {world_size}, {backend}, {name}"
        assert_close(actual["pooled"], expected["pooled"], f"{what}: pooled", **tolerance)
        assert_close(actual["scores"], part(expected["scores"]), f"{what}: scores", **tolerance)
        assert_close(actual["x"] / world_size, part(expected["x"]), f"{what}: d x", **tolerance)
        for i, (got, want) in enumerate(zip(actual["weights"], expected["weights"])):
            assert_close(got.grad, want.grad, f"{what}: d weight {i}", **tolerance)


def _gated_run(inputs: dict, weights, group, d_scores) -> dict:
    """Pool, then backpropagate a loss on the pooled bags and on the scores (upstream gradient ``d_scores``, the
    rows' part of the loss, times W on a shard)."""
    x, *leaves = _leaves(inputs["x"], *weights)
    options = {name: value for name, value in inputs.items() if name != "x"}
    pooled, scores = milkernels.ops.gated_attention_pool(x, *leaves, process_group=group, **options)
    d_pooled = _upstream(pooled.shape, pooled.dtype, pooled.device, 1)
    ((pooled * d_pooled).sum() + (scores * d_scores).sum()).backward()
    return dict(pooled=pooled.detach(), scores=scores.detach(), x=x.grad, weights=leaves)


@pytest.mark.parametrize("world_size", sorted(SHARDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_attention_pool(world_size, backend):
    run_ranks(world_size, check_gated, backend)


def check_query(rank: int, world_size: int, backend: str, normalization: str) -> None:
    torch.manual_seed(0)
    dtype, features, width, heads, count = _dtype(backend), 24, 8, 2, 3
    weights = [torch.randn(count, width), torch.randn(width, features) / 2, torch.randn(width),
               torch.randn(width, features) / 2, torch.randn(width)]
    weights = [w.to(dtype=dtype, device=device()) for w in weights]
    tolerance = TOLERANCES[dtype]
    for name, whole, shard, part in _layouts(rank, world_size, features, dtype):
        with milkernels.use_backend(backend):
            expected = _query_run(whole, weights, None, heads, normalization)
            actual = _query_run(shard, weights, dist.group.WORLD, heads, normalization)
        all_reduce_gradients(actual["weights"], dist.group.WORLD)
        what = f"rank {rank} of {world_size}, {backend}, {normalization}, {name}"
        assert_close(actual["out"], expected["out"], f"{what}: out", **tolerance)
        for result in ("attention", "logits"):
            assert_close(actual[result], _columns(part)(expected[result]), f"{what}: {result}", equal_nan=True,
                         **tolerance)
        assert_close(actual["x"] / world_size, part(expected["x"]), f"{what}: d x", **tolerance)
        for i, (got, want) in enumerate(zip(actual["weights"], expected["weights"])):
            assert_close(got.grad, want.grad, f"{what}: d weight {i}", **tolerance)


def _query_run(inputs: dict, weights, group, heads: int, normalization: str) -> dict:
    """Query attention with its weights and logits, and the backward of a loss on its output."""
    x, *leaves = _leaves(inputs["x"], *weights)
    options = {name: value for name, value in inputs.items() if name != "x"}
    result = milkernels.ops.query_attention(x, *leaves, heads, normalization=normalization, temperature=0.7,
                                            need_weights=True, need_logits=True, process_group=group, **options)
    (result.out * _upstream(result.out.shape, result.out.dtype, result.out.device, 1)).sum().backward()
    return dict(out=result.out.detach(), attention=result.weights.detach(), logits=result.logits.detach(), x=x.grad,
                weights=leaves)


@pytest.mark.parametrize("world_size", sorted(SHARDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ("softmax", "nsf"))
def test_query_attention(world_size, backend, normalization):
    run_ranks(world_size, check_query, backend, normalization)


def check_linear(rank: int, world_size: int, backend: str, projected: bool) -> None:
    torch.manual_seed(0)
    dtype, features, channels, heads = _dtype(backend), 24, 16, 2
    weights = [torch.randn(3 * channels, features) / 4, torch.randn(3 * channels), torch.rand(heads) + 0.5]
    weights = [w.to(dtype=dtype, device=device()) for w in weights]
    tolerance = TOLERANCES[dtype]
    for name, whole, shard, part in _layouts(rank, world_size, features, dtype):
        d_out = _upstream((*whole["x"].shape[:-1], channels), dtype, device(), 1)
        with milkernels.use_backend(backend):
            expected = _linear_run(whole, weights, None, heads, projected, d_out, 1)
            actual = _linear_run(shard, weights, dist.group.WORLD, heads, projected, part(d_out), world_size)
        all_reduce_gradients(actual["weights"], dist.group.WORLD)
        what = f"rank {rank} of {world_size}, {backend}, {'projected' if projected else 'qkv'}, {name}"
        for result in ("out", "map"):
            assert_close(actual[result], part(expected[result]), f"{what}: {result}", **tolerance)
        assert_close(actual["x"] / world_size, part(expected["x"]), f"{what}: d x", **tolerance)
        for i, (got, want) in enumerate(zip(actual["weights"], expected["weights"])):
            assert_close(got.grad, want.grad, f"{what}: d weight {i}", **tolerance)


def _linear_run(inputs: dict, weights, group, heads: int, projected: bool, d_out, scale: int) -> dict:
    """Linear attention (the projection in the op, or before it) with its map, and a backward from ``d_out``
    and the map's sum, per-row terms both, times ``scale``."""
    x, weight, bias, temperature = _leaves(inputs["x"], *weights)
    options = {name: value for name, value in inputs.items() if name != "x"}
    options.update(activation="softplus", temperature=temperature, denominator="eps", return_map=True,
                   process_group=group)
    if projected:
        out, attention_map = milkernels.ops.projected_linear_attention(x, weight, bias, heads, **options)
    else:
        out, attention_map = milkernels.ops.linear_attention(torch.nn.functional.linear(x, weight, bias), heads,
                                                             **options)
    (((out * d_out).sum() + attention_map.sum()) * scale).backward()
    return dict(out=out.detach(), map=attention_map.detach(), x=x.grad, weights=[weight, bias, temperature])


@pytest.mark.parametrize("world_size", sorted(SHARDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projected", (False, True), ids=("qkv", "projected"))
def test_linear_attention(world_size, backend, projected):
    run_ranks(world_size, check_linear, backend, projected)


def check_query_dropout(rank: int, world_size: int, backend: str) -> None:
    """With dropout, the shard's weights (after dropout) are the ones its pooled output used."""
    torch.manual_seed(0)
    dtype, features, width, heads = _dtype(backend), 24, 8, 2
    query, wk, bk, wv, bv = (t.to(dtype=dtype, device=device()) for t in (
        torch.randn(3, width), torch.randn(width, features) / 2, torch.randn(width), torch.randn(width, features),
        torch.randn(width)))
    x = torch.randn(SHARDS[world_size][rank], features, dtype=dtype, device=device())
    with milkernels.use_backend(backend):
        result = milkernels.ops.query_attention(x, query, wk, bk, wv, bv, heads, dropout_p=0.4, need_weights=True,
                                                process_group=dist.group.WORLD)
    values = torch.nn.functional.linear(x, wv, bv).reshape(-1, heads, width // heads)      # (N, H, dh)
    pooled = torch.einsum("hqn,nhd->qhd", result.weights, values).reshape(3, width)
    dist.all_reduce(pooled)
    assert_close(result.out, pooled, f"rank {rank} of {world_size}, {backend}", **TOLERANCES[dtype])
    assert x.shape[0] == 0 or bool((result.weights == 0).any()), "no weight was dropped"


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_attention_dropout(backend):
    run_ranks(3, check_query_dropout, backend)


def _communicated(run) -> int:
    """Bytes this rank put into collectives during ``run()`` (a forward and its backward)."""
    with counting_communication() as counts:
        run()
    return sum(counts.values())


def check_communication(rank: int, world_size: int, backend: str) -> None:
    """Each op's all-reduced bytes per rank, forward and backward, against the minimum: the partial statistics
    of one rank in fp32 and their gradient, a pool and its normalizer per (bag, column) for the pooling ops (the
    pool's gradient in the backward), S and z per (bag, head) for linear attention."""
    torch.manual_seed(0)
    bags, features, heads, width, count, channels = 2, 256, 2, 8, 3, 64
    x = torch.randn(bags, SHARDS[world_size][rank], features, requires_grad=True)
    gated = [torch.randn(32, features), None, torch.randn(32, features), None, torch.randn(heads, 32), None]
    query = [torch.randn(count, width), torch.randn(width, features), None, torch.randn(width, features), None]
    qkv = torch.randn(bags, SHARDS[world_size][rank], 3 * channels, requires_grad=True)
    group = dist.group.WORLD
    head_dim = channels // heads
    runs = {
        "gated": (lambda: milkernels.ops.gated_attention_pool(x, *gated, process_group=group)[0].sum().backward(),
                  bags * heads * (2 * features + 1)),
        "query": (lambda: milkernels.ops.query_attention(x, *query, heads, process_group=group).out.sum().backward(),
                  bags * heads * count * (2 * features + 1)),
        "linear": (lambda: milkernels.ops.linear_attention(qkv, heads, process_group=group).sum().backward(),
                   2 * bags * heads * (head_dim + 1) * head_dim),
    }
    with milkernels.use_backend(backend):
        for name, (run, minimum_floats) in runs.items():
            ratio = _communicated(run) / (4 * minimum_floats)
            assert 1.0 <= ratio <= 1.1, f"rank {rank}, {backend}, {name}: {ratio:.3f}x the minimal bytes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_communicated_bytes_near_the_minimum(backend):
    run_ranks(2, check_communication, backend)


DILATED = ([8, 16, 64], [1, 2, 4])  # segments that cross the shards' bounds, and one (64 > N) over every rank


def check_dilated(rank: int, world_size: int, backend: str, mode: str) -> None:
    """Dilated attention on one bag and on two padded bags (with a key mask in exact mode): the rank's rows of the
    whole bags' out, lse and gradients (its loss times W, as the module doc has it)."""
    torch.manual_seed(0)
    dtype, heads, head_dim, rows = _dtype(backend), 4, 8, shard_rows(rank, world_size)
    for bags in (None, 2):
        shape = (bag_rows(world_size), heads, head_dim) if bags is None else (bags, bag_rows(world_size), heads, head_dim)
        q, k, v, d_out = (torch.randn(shape, dtype=dtype, device=device()) for _ in range(4))
        mask = torch.rand(shape[:2], device=device()) > 0.3 if bags and mode == "exact" else None
        part = (lambda t: t[rows]) if bags is None else (lambda t: t[:, rows])
        whole, mine = _leaves(q, k, v), _leaves(part(q), part(k), part(v))
        with milkernels.use_backend(backend):
            out, lse = milkernels.ops.dilated_attention(*whole, *DILATED, mode=mode, mask=mask, return_lse=True)
            mine_out, mine_lse = milkernels.ops.dilated_attention(
                *mine, *DILATED, mode=mode, mask=None if mask is None else part(mask), return_lse=True,
                process_group=dist.group.WORLD)
        (out * d_out).sum().backward()
        (world_size * mine_out * part(d_out)).sum().backward()
        what, tolerance = f"rank {rank} of {world_size}, {backend}, {mode}, bags {bags}", TOLERANCES[dtype]
        assert_close(mine_out, part(out), f"{what}: out", **tolerance)
        assert_close(mine_lse, part(lse), f"{what}: lse", **tolerance)
        for name, got, want in zip("qkv", mine, whole):
            assert_close(got.grad, world_size * part(want.grad), f"{what}: d{name}", **tolerance)


@pytest.mark.parametrize("world_size", sorted(SHARDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("torchscale", "exact"))
def test_dilated_attention(world_size, backend, mode):
    run_ranks(world_size, check_dilated, backend, mode)


def _dilated_needs(rank: int, world_size: int, heads: int) -> tuple[int, int]:
    """``(over branches, once)``: how many (position, head) keys the rank's queries reach on other ranks in
    torchscale mode with :data:`DILATED`, counted per branch, and each once; from the definition, one by one."""
    length, mine = bag_rows(world_size), range(*shard_rows(rank, world_size).indices(bag_rows(world_size)))
    per_branch, distinct = 0, set()
    for w, r in zip(*DILATED):
        span, group_size = min(w, length), -(-heads // r)
        for position, head in itertools.product(range(length), range(heads)):
            group = head // group_size
            reached = any(query // span == position // span and query % r == group for query in mine)
            if position not in mine and position % r == group and reached:
                per_branch += 1
                distinct.add((position, head))
    return per_branch, len(distinct)


def check_dilated_communication(rank: int, world_size: int, backend: str) -> None:
    """The bytes a rank receives: in the forward, the keys and values its queries reach on other ranks, each once,
    at most 1.5x the minimum (those keys and values per branch) with the agreement check; in the backward, their
    gradients go back, as many bytes over the group."""
    torch.manual_seed(0)
    dtype, heads, head_dim = _dtype(backend), 4, 64
    q, k, v = (torch.randn(SHARDS[world_size][rank], heads, head_dim, dtype=dtype, requires_grad=True)
               for _ in range(3))
    per_branch, distinct = (2 * head_dim * dtype.itemsize * count for count in _dilated_needs(rank, world_size, heads))
    with milkernels.use_backend(backend), counting_communication() as counts:
        out = milkernels.ops.dilated_attention(q, k, v, *DILATED, process_group=dist.group.WORLD)
        forward = counts["dilated_attention"]
        out.sum().backward()
    backward = counts["dilated_attention"] - forward
    checks = forward - distinct
    assert 0 < checks <= 512, f"rank {rank}: {forward} bytes received, {distinct} of them keys and values"
    assert forward <= 1.5 * per_branch, f"rank {rank}, {backend}: {forward / per_branch:.3f}x the minimal bytes"
    totals = torch.tensor([float(backward), float(distinct)], dtype=torch.float64)
    dist.all_reduce(totals)
    assert totals[0] == totals[1], f"the backward returned {totals[0]} bytes of gradients for {totals[1]} of keys"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dilated_communication_near_the_minimum(backend):
    run_ranks(2, check_dilated_communication, backend)


@pytest.mark.parametrize("mode, masked", [("torchscale", False), ("exact", True)])
def test_window_ops_pass_opcheck(mode, masked):
    """The window custom ops on rank 1 of shards (20, 17), two bags: fake, autograd and schema checks."""
    from milkernels.ops.dilated_attention import reference, sharded
    from milkernels.ops.dilated_attention import triton as kernels

    segments, rates = [8, 16], [1, 2]
    spans = reference.segment_spans(segments, rates, 37, mode)
    view = sharded.window([0, 20, 37], 1, spans, kernels.block_size(8, segments, rates, 37, mode) * 2)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2 * view.rows, 3, 8, generator=generator).to(device()).requires_grad_() for _ in range(3))
    row_valid = (torch.rand(2 * view.rows, generator=generator) > 0.3).to(device()) if masked else None
    args = [q, k, v, view.kernel_window(2), segments, rates, row_valid, 0.25, mode]
    kernel_checks.opcheck_attention_ops(torch.ops.milkernels.dilated_attention_window_forward,
                                        torch.ops.milkernels.dilated_attention_window_backward, args)


def check_swapped_seq_parallel(rank: int, world_size: int, backend: str) -> None:
    """lin-mil's DilatedAttention (torchscale's, ``seq_parallel=True``; its flash kernel, and its all-gather, which
    allocates on CUDA, in plain torch) gathers keys across the default group; swapped, it gives each rank the same
    rows, those of the whole bag."""
    from test_dilated_attention_nn import flash_stand_in, lin_mil_attention, upstream

    def all_gather_stand_in(x):
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=upstream.get_data_parallel_group())
        return torch.cat(parts)

    # this process's own copy of lin-mil
    upstream.flash_attn_func, upstream.all_gather_func = flash_stand_in, all_gather_stand_in
    module = lin_mil_attention([8, 32], [1, 2], 16, 4, _dtype(backend))   # branch 32 > a shard: gathered
    assert module.args.seq_parallel
    bag = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(1)).to(_dtype(backend))
    rows = slice(16 * rank, 16 * (rank + 1))
    with milkernels.swap_dilated.without_seq_parallel(module):
        whole = module(bag)[0][:, rows]
    gathered = module(bag[:, rows])[0]
    swapped = milkernels.swap(copy.deepcopy(module))
    assert isinstance(swapped, milkernels.nn.LinMILDilatedAttention) and swapped.args.seq_parallel
    with milkernels.use_backend(backend):
        fused = swapped(bag[:, rows])[0]
    tolerance = TOLERANCES[torch.float32]  # the stand-in computes in float32 at least, the triton path too
    assert_close(gathered, whole, f"rank {rank}: upstream's gathering against the whole bag", **tolerance)
    assert_close(fused, gathered, f"rank {rank}, {backend}: swapped against upstream's gathering", **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_torchscale_seq_parallel_matches_upstream(backend):
    run_ranks(2, check_swapped_seq_parallel, backend)


def check_dilated_refusals(rank: int, world_size: int) -> None:
    q = torch.randn(6, 2, 4, dtype=torch.float64)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="not packed bags"):
        milkernels.ops.dilated_attention(q, q, q, [4], [2], cu_seqlens=torch.tensor([0, 6]), process_group=group)
    with pytest.raises(ValueError, match=r"got \(w=6, r=4\): torchscale moves"):
        milkernels.ops.dilated_attention(q, q, q, [6, 4], [4, 2], process_group=group)
    module = milkernels.nn.DilatedAttention(LongNetArgs([4], [2]), 8, 2, dropout=0.1, self_attention=True,
                                            process_group=group)
    with pytest.raises(ValueError, match="has a process_group, but this call cannot take the fused path"):
        module(q.flatten(1)[None].float(), q.flatten(1)[None].float(), q.flatten(1)[None].float())


def check_dilated_edge_cases(rank: int, world_size: int) -> None:
    group, rows = dist.group.WORLD, shard_rows(rank, world_size)
    q = torch.randn(1, bag_rows(world_size), 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([1.0, -1.0, 0.0, 0.5]).repeat(10)[:bag_rows(world_size)][None].to(torch.float64)
    results = [milkernels.ops.dilated_attention(q[:, rows], q[:, rows], q[:, rows], [8], [2], mode="exact",
                                                mask=mask[:, rows], process_group=group)
               for mask in (weights, weights != 0)]
    assert_close(results[0], results[1], f"rank {rank}: a float mask counts its nonzero entries")
    with pytest.raises(ValueError, match=r"mask must have shape \(B, n\)"):
        milkernels.ops.dilated_attention(q[:, rows], q[:, rows], q[:, rows], [8], [2], mode="exact",
                                         mask=weights[:, :3], process_group=group)
    for empty in (q[:0, rows], q[:, :0]):
        out = milkernels.ops.dilated_attention(empty, empty, empty, [8], [2], process_group=group)
        assert out.shape == empty.shape
    mine = q[:, rows].clone().requires_grad_(rank == 0)
    with pytest.raises(ValueError, match="disagree on grad"):
        milkernels.ops.dilated_attention(mine, mine, mine, [8], [2], process_group=group)


def test_dilated_edge_cases():
    """A float key mask counts its nonzero entries, as without a group; a mask of another shape is a
    ValueError; bags without rows on any rank give empty results; ranks that disagree on taking gradients
    (the backward's exchange is a collective) get a ValueError."""
    run_ranks(2, check_dilated_edge_cases)


def test_dilated_refusals_are_value_errors():
    run_ranks(2, check_dilated_refusals)


@pytest.mark.parametrize("wide_forward", [False, True], ids=["forward-rows-by-rule", "forced-128-row-forward"])
@pytest.mark.parametrize("mode", ("torchscale", "exact"))
def test_dilated_window_holds_every_position_the_kernels_reach(mode, wide_forward, monkeypatch):
    """On random bags, shards and branches: each rank's window holds the segments of every row of its kernels' query,
    forward and key blocks (whose last rows pass the shard; those of every forward and key launch, each modulo its own
    period: the long bags' segments give later launches at smaller periods), and the keys its queries reach lie in its
    key range. "forced-128-row-forward" forces the forward's 128 rows a program in one part (fp16 / bf16 where 128 R
    positions fit in every segment; these segments are shorter) on every block size."""
    from milkernels.ops.dilated_attention import reference, sharded
    from milkernels.ops.dilated_attention import triton as kernels

    if wide_forward:
        monkeypatch.setattr(kernels, "forward_tiles", lambda dtype, block, period, shortest_segment: (128, 1))
    generator = torch.Generator().manual_seed(0)

    def draw(high):
        return int(torch.randint(1, high + 1, (), generator=generator))

    def bags_and_branches():
        for _ in range(40):
            rates = [draw(4) for _ in range(draw(3))]
            yield draw(300), rates, [r * draw(24) for r in rates], (8, 100)[draw(2) - 1]
        for _ in range(10):  # long bags, Prov-GigaPath's rule (segment = rate x the same keys, 64 R to 128 R)
            rates = [1, 2, 4, 8, 16][:2 + draw(3)]
            keys = 64 * rates[-1] + draw(64 * rates[-1])
            yield 600 + draw(1200), rates, [r * keys for r in rates], 8

    later_launches = 0
    for length, rates, segments, head_dim in bags_and_branches():
        world_size, heads = draw(4), draw(8)
        cuts = sorted(torch.randint(0, length + 1, (world_size - 1,), generator=generator).tolist())
        bounds = [0, *cuts, length]
        spans = reference.segment_spans(segments, rates, length, mode)
        block = kernels.block_size(head_dim, segments, rates, length, mode)
        key_block = kernels.widest_block(head_dim, torch.bfloat16, segments, rates, length, mode)  # the widest dtype
        for rank in range(world_size):
            view = sharded.window(bounds, rank, spans, key_block * math.lcm(*rates))
            window = view.kernel_window(1)
            _, query_spans, key_spans = kernels.window_spans(view.rows, window)
            launch_spans = [min(w, length) for w in segments]
            blocks = [(query_spans, block, math.lcm(*rates))]
            atomic = mode == "exact" or block == 64  # the atomic dq where fp16 / bf16 can take it
            forward = kernels.forward_launches(torch.bfloat16, block, rates, launch_spans, mode == "exact")
            keys = {*kernels.key_launches(block, False, rates, launch_spans),
                    *kernels.key_launches(block, atomic, rates, launch_spans)}
            later_launches += sum(launch.period < math.lcm(*rates) for launch in (*forward, *keys))
            blocks += [(query_spans, launch.rows * launch.parts, launch.period) for launch in forward]
            blocks += [(key_spans, launch.keys, launch.period) for launch in keys]
            for spans_of, width, period in blocks:
                _, _, residue, first = kernels.residue_blocks(spans_of, period, width, "cpu")
                positions = residue[:, None] + period * (first[:, None] + torch.arange(width))
                positions = positions[positions < length]
                for span in spans:
                    starts = positions // span * span
                    assert (starts >= view.start).all() and ((starts + span).clamp(max=length) <= view.stop).all()
            queries = sharded.needed(torch.arange(length), heads, view.queries, spans, rates).any(1).nonzero()
            assert ((queries >= view.key_start) & (queries < view.key_stop)).all()
    assert later_launches


class ShardableModel(torch.nn.Module):
    """Lin-MIL's linear attention and LongNet's dilated attention (torchscale's), then gated attention pooling and
    learned queries (LiteMIL's nn.MultiheadAttention) side by side, then a classifier: every sequence-parallel
    module of milkernels.nn."""

    def __init__(self, in_dim: int = 12, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Linear(in_dim, dim)
        self.linear_attention = milkernels.nn.LinearAttention(dim, num_heads=2)
        self.dilated_attention = milkernels.nn.DilatedAttention(LongNetArgs([8, 64], [1, 2]), dim, 2,
                                                                self_attention=True, subln=True)
        self.pool = milkernels.nn.GatedAttentionPool(L=dim, D=8, n_classes=1)
        self.queries = torch.nn.Parameter(torch.randn(1, 2, dim))
        self.query_attention = milkernels.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.classifier = torch.nn.Linear(3 * dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, in_dim)`` -> logits ``(1, 2)``."""
        h = self.embed(x)
        h = (h + self.linear_attention.forward_without_attention(h[None])[0])[None]
        h = h + self.dilated_attention(h, h, h)[0]
        pooled, _ = self.pool(h[0])
        attended, _ = self.query_attention(self.queries, h, h, need_weights=False)
        return self.classifier(torch.cat([pooled.flatten(), attended.flatten()])[None])


def check_model_under_ddp(rank: int, world_size: int, backend: str) -> None:
    """One bag sharded over the group and a DDP model on the group train like the model on the whole bag."""
    torch.manual_seed(0)
    dtype = _dtype(backend)
    whole = ShardableModel().to(dtype)
    sharded = copy.deepcopy(whole)
    assert len(milkernels.distributed.set_process_group(sharded, dist.group.WORLD)) == 4
    sharded = torch.nn.parallel.DistributedDataParallel(sharded, process_group=dist.group.WORLD)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in (whole, sharded)]
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        bag = torch.randn(bag_rows(world_size), 12, generator=generator, dtype=dtype)
        label = torch.randint(0, 2, (1,), generator=generator)
        with milkernels.use_backend(backend):
            for model, rows, optimizer in zip((whole, sharded), (bag, bag[shard_rows(rank, world_size)]), optimizers):
                torch.nn.functional.cross_entropy(model(rows), label).backward()
                optimizer.step()
                optimizer.zero_grad()
    for (name, want), got in zip(whole.named_parameters(), sharded.module.parameters()):
        assert_close(got, want, f"rank {rank} of {world_size}, {backend}: {name}", **TOLERANCES[dtype])


@pytest.mark.parametrize("world_size", sorted(SHARDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_modules_train_under_ddp_like_the_whole_bag(world_size, backend):
    run_ranks(world_size, check_model_under_ddp, backend)


def check_disagreeing_ranks(rank: int, world_size: int) -> None:
    x = torch.randn(5, 24 if rank == 0 else 32, dtype=torch.float64)
    weights = [torch.randn(8, x.shape[1], dtype=torch.float64), None, None, None, torch.randn(1, 8, dtype=torch.float64),
               None]
    with pytest.raises(ValueError, match="disagree on features from 24 to 32"):
        milkernels.ops.gated_attention_pool(x, *weights, process_group=dist.group.WORLD)


def check_bag_on_one_rank(rank: int, world_size: int) -> None:
    if rank == 0:
        x = torch.randn(5, 8, dtype=torch.float64)
        weights = [torch.randn(4, 8, dtype=torch.float64), None, None, None, torch.randn(1, 4, dtype=torch.float64), None]
        with pytest.raises(RuntimeError, match="did not complete within 3 s"):
            milkernels.ops.gated_attention_pool(x, *weights, process_group=dist.group.WORLD)
    else:
        import time

        time.sleep(6)


def test_ranks_that_disagree_get_a_value_error():
    run_ranks(2, check_disagreeing_ranks)


def test_a_rank_that_never_joins_is_an_error_not_a_hang():
    run_ranks(2, check_bag_on_one_rank, env={"MILKERNELS_COLLECTIVE_TIMEOUT": "3"}, timeout=120)


def test_process_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="not initialized"):
        milkernels.ops.gated_attention_pool(torch.randn(4, 8), torch.randn(4, 8), None, None, None,
                                            torch.randn(1, 4), process_group=object())
