"""Dilated attention: the reference against lin-mil's real torchscale ``DilatedAttention``, the triton kernels
(interpreter on CPU) against the float64 reference, both modes, checks, custom ops."""

import math

import pytest
import torch
import torch.nn.functional as F

import milkernels
from milkernels.bench import timm_stub
from milkernels.bench.dilated_attention import attended_pairs
from milkernels.ops import dilated_attention
from milkernels.ops.dilated_attention import reference
from milkernels.ops.dilated_attention import triton as kernels

import aot
import kernel_checks
import sharding
from milkernels.bench.traffic import counting

pytestmark = pytest.mark.usefixtures("poisoned_buffers")

SMALL = ([8, 16, 32], [1, 2, 4])
LIN_MIL = ([128, 64, 32], [2, 4, 8])


def make_qkv(shape, dtype=torch.float32, seed=0, scale=1.0):
    """Fresh random ``q, k, v`` of ``shape``, requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=generator) * scale).to(sharding.device(), dtype).requires_grad_()
            for _ in range(3)]


def with_lse(segments, rates, **kwargs):
    return lambda q, k, v: dilated_attention(q, k, v, segments, rates, return_lse=True, **kwargs)


def flash_standin(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """flash-attn's ``(out (b, l, h, d), lse (b, h, l))`` in plain PyTorch, for lin-mil on CPU."""
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * (softmax_scale or q.shape[-1] ** -0.5)
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v), scores.logsumexp(-1)


@pytest.fixture
def upstream(monkeypatch):
    """lin-mil's ``lin_mil.attention.dilated_attention`` module with the flash-attn stand-in."""
    with timm_stub.installed():
        module = pytest.importorskip("lin_mil.attention.dilated_attention")
    monkeypatch.setattr(module, "flash_attn_func", flash_standin)
    return module


@pytest.mark.parametrize("length, heads, branches", [
    (37, 4, SMALL), (100, 3, SMALL), (300, 5, LIN_MIL), (20, 4, ([64, 32], [2, 4])),
    (70, 6, ([12, 20], [3, 8])),  # r does not divide w: torchscale's shifted rows
    (33, 2, ([8], [4])),  # positions no branch reaches
])
def test_reference_is_lin_mils_dilated_attention(upstream, length, heads, branches):
    args = upstream.Dilated_Args()
    args.segment_length, args.dilated_ratio = branches
    layer = upstream.DilatedAttention(args, heads * 8, heads, self_attention=True).double()
    x = torch.randn(2, length, heads * 8, dtype=torch.float64, requires_grad=True)
    expected, _ = layer(x)
    qkv = x.unflatten(-1, (heads, 8))
    with milkernels.use_backend("reference"):
        got = dilated_attention(qkv, qkv, qkv, *branches).flatten(-2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, cotangent)[0], torch.autograd.grad(expected, x, cotangent)[0])


@pytest.mark.parametrize("mode", ["torchscale", "exact"])
@pytest.mark.parametrize("shape, branches", [
    ((1, 1, 2, 16), SMALL), ((2, 37, 4, 8), SMALL), ((1, 170, 3, 20), SMALL), ((1, 300, 5, 16), LIN_MIL),
    ((2, 20, 4, 48), ([64, 32], [2, 4])),  # w > N; GigaPath's dh
])
def test_matches_reference(mode, shape, branches):
    """H not divisible by r, N not a multiple of any w, w > N, dh not a power of two: out, lse and grads."""
    q, k, v = make_qkv(shape, seed=sum(shape))
    kernel_checks.compare(with_lse(*branches, mode=mode), [q, k, v], torch.float32)


@pytest.mark.parametrize("mode", ["torchscale", "exact"])
def test_segment_longer_than_int32(mode):
    """A "global" branch (w = 10**10, beyond int32) is one segment per bag, on the kernels as in the reference."""
    q, k, v = make_qkv((2, 40, 2, 16), seed=16)
    kernel_checks.compare(with_lse([8, 10**10], [1, 2], mode=mode), [q, k, v], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["torchscale", "exact"])
def test_half_precision(mode, dtype):
    q, k, v = make_qkv((1, 90, 4, 24), dtype=dtype, seed=3)
    kernel_checks.compare(lambda *t: dilated_attention(*t, *SMALL, mode=mode), [q, k, v], dtype)


@pytest.mark.parametrize("mode", ["torchscale", "exact"])
@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 48), (torch.float32, 48), (torch.float32, 40)])
def test_head_dim_as_two_tiles(mode, dtype, head_dim, monkeypatch):
    """dh of 33 to 48 in fp16/bf16 on 64-row blocks runs as tiles of 32 and 16 (GigaPath's 48 is 48 columns, not 64);
    fp32 takes them here too, for a tighter comparison, and dh = 40 leaves 8 of the tail's columns masked. Scores
    all negative, and the branch with zero-padded keys second, so those keys raise the running max and rescale
    what the first branch accumulated."""
    if dtype == torch.float32:
        monkeypatch.setattr(kernels, "head_tiles", lambda head_dim, dtype, block: (32, 16))
    q, k, v = make_qkv((2, 130, 2, head_dim), seed=head_dim)
    q, k, v = [t.detach().to(dtype).requires_grad_() for t in (q.abs(), -k.abs(), v)]
    branches = ([256, 128], [2, 1])  # 64-row blocks in both modes: every segment holds 64 positions of each residue
    assert kernels.block_size(head_dim, *branches, 130, mode) == 64
    return_lse = dtype == torch.float32  # compare checks every output in the inputs' dtype; lse is fp32
    kernel_checks.compare(lambda *t: dilated_attention(*t, *branches, mode=mode, return_lse=return_lse), [q, k, v],
                          dtype)


def test_head_tiles_split_only_33_to_48_in_half_precision_on_64_row_blocks():
    for dtype in (torch.float16, torch.bfloat16):
        assert [kernels.head_tiles(head_dim, dtype, 64) for head_dim in (16, 32, 33, 48, 49, 64, 96)] == [
            (32, 0), (32, 0), (32, 16), (32, 16), (64, 0), (64, 0), (128, 0)]
        assert kernels.head_tiles(48, dtype, 32) == (64, 0)
    assert kernels.head_tiles(48, torch.float32, 64) == (64, 0)


def test_exact_padded_bags_with_mask():
    q, k, v = make_qkv((3, 50, 4, 16), seed=4)
    mask = torch.ones(3, 50, dtype=torch.bool, device=sharding.device())
    mask[1, 31:] = False
    mask[2, ::7] = False
    kernel_checks.compare(with_lse(*SMALL, mode="exact", mask=mask), [q, k, v], torch.float32)
    out = dilated_attention(q, k, v, *SMALL, mode="exact", mask=mask)
    assert not out[~mask].any(), "a masked position's output is 0"


def padded_mask(batch: int, length: int) -> torch.Tensor:
    """A mask with the second bag padded from row ``length - 40`` on and every 9th row of the first masked."""
    mask = torch.ones(batch, length, dtype=torch.bool, device=sharding.device())
    mask[0, ::9] = False
    mask[1, length - 40:] = False
    return mask


def compared_kernels(fn, inputs, dtype, key_launches: int | None = None) -> set:
    """:func:`kernel_checks.compare` of ``fn`` on ``inputs``; the Triton kernels its forward and backward launched
    (and, given ``key_launches``, that the key kernel ran that many times)."""
    with kernel_checks.launched() as counts:
        kernel_checks.compare(fn, inputs, dtype)
    if key_launches is not None:
        assert counts.by_kernel["_key_grad_kernel"].launches == key_launches
    return set(counts.by_kernel)


ATOMIC_KERNELS = {"_forward_kernel", "_delta_kernel", "_key_grad_kernel"}
TWO_KERNELS = {"_forward_kernel", "_query_grad_kernel", "_key_grad_kernel"}
WIDE_KEYS = ([256, 512], [1, 2])  # 128 keys of residue period 2 fit in each segment (:func:`kernels.key_launches`)
NARROW_KEYS = ([128, 256], [1, 2])  # 128 keys of residue period 2 fit in the second's segments, of period 1 in both
THREE_LAUNCHES = ([256, 64, 128], [2, 1, 1])  # 128 keys modulo 2 in the first's, modulo 1 in the third's, 64 in the
# second's
GIGAPATH_SPANS = [1024, 5792, 32768, 185363, 1048576]  # Prov-GigaPath's segments at N = 1M, rates 1 to 16


def test_key_launches():
    """The key kernel's launches (keys, queries a step, residue period, branches): one over every branch, or with
    the atomic dq 128 keys a program over the branches whose segments hold them modulo the lcm of the rates left,
    then again over the others; where none does, 64 keys over those that hold 128 at no period (else over all
    left), then again over the others; each launch after the first adding."""
    assert kernels.key_launches(64, False, [1, 2], [128, 256]) == ((64, 64, 2, (0, 1)),)
    assert kernels.key_launches(32, False, [16], [10**6]) == ((32, 32, 16, (0,)),)
    assert kernels.key_launches(64, True, [1, 2], [256, 512]) == ((128, 16, 2, (0, 1)),)
    assert kernels.key_launches(64, True, [1, 2], [128, 256]) == ((128, 16, 2, (1,)), (128, 16, 1, (0,)))
    assert kernels.key_launches(64, True, [1, 2], [256, 128]) == ((128, 16, 2, (0,)), (64, 32, 2, (1,)))
    assert kernels.key_launches(64, True, [16], [1024]) == ((64, 32, 16, (0,)),)
    # 128 keys modulo 16 fit in neither; the branch that holds them at no period takes 64, the other 128 modulo 1
    assert kernels.key_launches(64, True, [1, 16], [1024, 1024]) == ((64, 32, 16, (1,)), (128, 16, 1, (0,)))
    assert kernels.key_launches(64, True, *THREE_LAUNCHES[::-1]) == (
        (128, 16, 2, (0,)), (128, 16, 1, (2,)), (64, 32, 1, (1,)))
    # Prov-GigaPath: 128 keys of a residue modulo 16 span 2048 positions, two of the first branch's segments of
    # 1024, which a second launch takes on 128 keys modulo 1
    assert kernels.key_launches(64, True, [1, 2, 4, 8, 16], GIGAPATH_SPANS) == (
        (128, 16, 16, (1, 2, 3, 4)), (128, 16, 1, (0,)))
    half = torch.zeros(600, 2, 48, dtype=torch.float16)
    assert kernels.Plan(half, [0, 300, 600], *WIDE_KEYS, "exact", None).key_launches == ((128, 16, 2, (0, 1)),)
    assert kernels.Plan(half, [0, 300, 600], *NARROW_KEYS, "exact", None).key_launches == (
        (128, 16, 2, (1,)), (128, 16, 1, (0,)))
    assert kernels.Plan(half, [0, 300, 600], *SMALL, "exact", None).key_launches == ((64, 32, 4, (0, 1, 2)),)
    assert kernels.Plan(half, [0, 300, 600], *WIDE_KEYS, "torchscale", None).key_launches == ((64, 64, 2, (0, 1)),)
    assert kernels.Plan(half, [0, 300, 600], *WIDE_KEYS, "torchscale", None,
                        branch_outputs=True).key_launches == ((128, 16, 2, (0, 1)),)
    assert kernels.Plan(half.float(), [0, 300, 600], *WIDE_KEYS, "exact", None).key_launches == (
        (64, 64, 2, (0, 1)),)


LONG_SEGMENTS = ([384, 1000], [1, 2])  # 128 rows of residue period 2 (256 positions) fit in each segment


def test_forward_tiles():
    """128 query rows a forward program in fp16 / bf16 on 64-row blocks: one part where 128 R positions fit in every
    segment, else two of 64."""
    assert kernels.forward_tiles(torch.bfloat16, 64, 2, 256) == (128, 1)
    assert kernels.forward_tiles(torch.float16, 64, 2, 255) == (64, 2)
    assert kernels.forward_tiles(torch.float32, 64, 2, 256) == (64, 1)
    assert kernels.forward_tiles(torch.float16, 32, 1, 10**6) == (32, 1)
    assert kernels.forward_tiles(torch.bfloat16, 64, 16, 1024) == (64, 2)  # Prov-GigaPath: 128 rows span 2 segments
    half = torch.zeros(917, 3, 40, dtype=torch.float16)
    for mode in ("torchscale", "exact"):
        assert kernels.Plan(half, [0, 600, 917], *LONG_SEGMENTS, mode, None).forward_launches == (
            (128, 1, 2, (0, 1)),)
        assert kernels.Plan(half.float(), [0, 600, 917], *LONG_SEGMENTS, mode, None).forward_launches == (
            (64, 1, 2, (0, 1)),)
    assert kernels.widest_block(40, torch.bfloat16, *LONG_SEGMENTS, 917, "torchscale") == 128
    assert kernels.widest_block(40, torch.float32, *LONG_SEGMENTS, 917, "torchscale") == 64


SPLIT_FORWARD = ([256, 512], [1, 4])  # on 520 rows: 128 rows modulo 4 fit in the second's segments; the first's
# 256 keys a row pay for a second launch


def test_forward_launches(monkeypatch):
    """The forward's launches (rows, parts, residue period, branches): one over every branch, or in fp16 / bf16 on
    64-row blocks 128 rows a program over the branches whose segments hold them modulo the lcm of the rates left,
    then again over the others where they hold 128 rows, their keys a row pay for it and (exact mode) every
    earlier branch's rate divides the period; else they join the first launch (in two parts of 64 where they do
    not hold 128). The last argument: exact mode."""
    bf16 = torch.bfloat16
    assert kernels.forward_launches(bf16, 64, *WIDE_KEYS[::-1], False) == ((128, 1, 2, (0, 1)),)
    assert kernels.forward_launches(bf16, 64, *NARROW_KEYS[::-1], False) == ((64, 2, 2, (0, 1)),)  # 128 keys a row
    assert kernels.forward_launches(bf16, 64, *SPLIT_FORWARD[::-1], False) == ((128, 1, 4, (1,)), (128, 1, 1, (0,)))
    assert kernels.forward_launches(bf16, 64, *THREE_LAUNCHES[::-1], False) == ((64, 2, 2, (0, 1, 2)),)
    assert kernels.forward_launches(bf16, 64, [2, 4, 8], [128, 64, 32], False) == ((64, 2, 8, (0, 1, 2)),)  # LIN_MIL
    assert kernels.forward_launches(bf16, 32, *NARROW_KEYS[::-1], False) == ((32, 1, 2, (0, 1)),)
    assert kernels.forward_launches(torch.float32, 64, *NARROW_KEYS[::-1], False) == ((64, 1, 2, (0, 1)),)
    # Prov-GigaPath: 128 rows of a residue modulo 16 span two of the first branch's segments of 1024; on a bag of
    # 1024 rows, 128 modulo 16 fit in no segment, 128 modulo 8 in every segment but the last branch's
    assert kernels.forward_launches(bf16, 64, [1, 2, 4, 8, 16], GIGAPATH_SPANS, False) == (
        (128, 1, 16, (1, 2, 3, 4)), (128, 1, 1, (0,)))
    assert kernels.forward_launches(bf16, 64, [1, 2, 4, 8, 16], [1024] * 5, True) == (
        (64, 2, 16, (4,)), (128, 1, 8, (0, 1, 2, 3)))
    monkeypatch.setattr(kernels, "FORWARD_SPLIT_KEYS", 0)  # every later launch that holds 128 rows taken
    assert kernels.forward_launches(bf16, 64, *NARROW_KEYS[::-1], False) == ((128, 1, 2, (1,)), (128, 1, 1, (0,)))
    assert kernels.forward_launches(bf16, 64, [1, 2, 4], [128, 256, 512], False) == (
        (128, 1, 4, (2,)), (128, 1, 2, (1,)), (128, 1, 1, (0,)))
    # the branch left on two parts joins the first launch; in exact mode so does one after a branch whose rate (2)
    # does not divide its period (1)
    assert kernels.forward_launches(bf16, 64, [1, 1, 2], [64, 128, 256], True) == (
        (64, 2, 2, (0, 2)), (128, 1, 1, (1,)))
    assert kernels.forward_launches(bf16, 64, *THREE_LAUNCHES[::-1], True) == ((64, 2, 2, (0, 1, 2)),)
    assert kernels.forward_launches(bf16, 64, *THREE_LAUNCHES[::-1], False) == ((64, 2, 2, (0, 1)), (128, 1, 1, (2,)))


# branches, bag rows, forward launches (:func:`kernels.forward_launches`, fp16 / bf16's rule, every later launch that
# holds 128 rows taken): "two": the second merges into the first's rows; "rate-2": the second's branch (r = 2) covers
# half the residues of a head (its blocks of the other residue skip their rows: no read, no write; merging nothing
# would give the same values); "three": modulo 4, 2 then 1;
# "two-parts-first": the first launch takes two parts of 64 rows, the second merges (torchscale takes 32-row blocks
# on the last two's segments, so one launch)
FORWARD_LAUNCHES = {"two": (NARROW_KEYS, 260, 2), "rate-2": (([256, 512], [2, 4]), 520, 2),
                    "three": (([128, 256, 512], [1, 2, 4]), 520, 3),
                    "two-parts-first": (([64, 128, 256], [1, 1, 2]), 260, 2)}
EXACT_ONLY = ("three", "two-parts-first")


@pytest.mark.parametrize("mode, launches", [(mode, launches) for mode in ("torchscale", "exact")
                                            for launches in FORWARD_LAUNCHES
                                            if mode == "exact" or launches not in EXACT_ONLY])
def test_forward_launches_merge(mode, launches, monkeypatch):
    """The fp16 / bf16 forward's launches, forced in fp32 for a tight comparison with the atomic dq (torchscale then
    keeps and merges the branch outputs): each launch after the first merges its branches' softmax into the rows'
    ``out`` and ``lse`` (in exact mode without the pairs an earlier branch gave, whatever launch took it); two bags,
    3 heads of dh 40 (head groups of 2 and 1 at r = 2), torchscale packed (260 or 520 rows, and 197, the last
    segments zero-padded), exact padded with a mask; outputs, lse and every gradient, and the number of forward
    launches. Every later launch that holds 128 rows is taken, whatever keys a row its branches give."""
    half_precision_tiles = kernels.forward_tiles
    monkeypatch.setattr(kernels, "forward_tiles", lambda dtype, *rest: half_precision_tiles(torch.bfloat16, *rest))
    monkeypatch.setattr(kernels, "atomic_dq", lambda dtype: True)
    monkeypatch.setattr(kernels, "FORWARD_SPLIT_KEYS", 0)
    branches, rows, forward_launches = FORWARD_LAUNCHES[launches]
    fn, inputs = two_bags(mode, branches, (rows, 197), (3, 40), seed=37)
    with kernel_checks.launched() as counts:
        kernel_checks.compare(fn, inputs, torch.float32)
    assert counts.by_kernel["_forward_kernel"].launches == forward_launches


@pytest.mark.parametrize("mode", ["torchscale", "exact"])
def test_forward_launches_in_half_precision(mode):
    """fp16 by its own rules: one bag of 520 rows, 2 heads of dh 48, SPLIT_FORWARD's branches, so a second forward
    launch takes the first branch on 128 rows modulo 1 and merges into the rows' out (rounded to fp16) and lse;
    outputs and every gradient within fp16's tolerance."""
    q, k, v = make_qkv((520, 2, 48), dtype=torch.float16, seed=38)
    with kernel_checks.launched() as counts:
        kernel_checks.compare(lambda *t: dilated_attention(*t, *SPLIT_FORWARD, mode=mode), [q, k, v], torch.float16)
    assert counts.by_kernel["_forward_kernel"].launches == 2


def forward_kernel_loads(fn, inputs) -> int:
    """Bytes the forward kernel loads when ``fn`` runs on ``inputs`` on the triton backend, with no grad."""
    with torch.no_grad(), milkernels.use_backend("triton"), counting() as counts:
        fn(*inputs)
    return counts.by_kernel["_forward_kernel"].load_bytes


def two_bags(mode: str, branches, rows: tuple[int, int], heads_dim: tuple[int, int], seed: int) -> tuple:
    """``(fn, [q, k, v])`` on two bags: torchscale on packed bags of ``rows`` (the second's last segments
    zero-padded), exact on two padded bags of ``rows[0]`` with :func:`padded_mask`; ``fn`` returns ``(out, lse)``."""
    if mode == "torchscale":
        inputs = make_qkv((sum(rows), *heads_dim), seed=seed)
        return with_lse(*branches, cu_seqlens=torch.tensor([0, rows[0], sum(rows)], device=sharding.device())), inputs
    inputs = make_qkv((2, rows[0], *heads_dim), seed=seed + 1)
    return with_lse(*branches, mode="exact", mask=padded_mask(2, rows[0])), inputs


@pytest.mark.parametrize("tiles", [(128, 1), (64, 2)], ids=["one-part", "two-parts"])
@pytest.mark.parametrize("mode", ["torchscale", "exact"])
def test_forward_on_128_row_blocks(mode, tiles, monkeypatch):
    """The fp16 / bf16 forward's 128 rows a program (:func:`kernels.forward_tiles`), in one part or two parts of 64
    with their own key ranges, forced in fp32 for a tight comparison, with the atomic dq (so torchscale keeps and
    merges the branch outputs): blocks of 256 positions that straddle the 200-position segments, 3 heads of dh 40
    (head groups of 2 and 1 at r = 2); torchscale on two packed bags (260 and 197 rows, the last segments
    zero-padded), exact on two padded bags with a mask; outputs, lse and every gradient. The forward loads fewer
    bytes than on 64-row blocks (k and v once per 128 rows where they can)."""
    fn, (q, k, v) = two_bags(mode, ([200, 512], [1, 2]), (260, 197), (3, 40), seed=34)
    on_64_rows = forward_kernel_loads(fn, [q, k, v])
    monkeypatch.setattr(kernels, "forward_tiles", lambda dtype, block, period, shortest_segment: tiles)
    monkeypatch.setattr(kernels, "atomic_dq", lambda dtype: True)
    assert forward_kernel_loads(fn, [q, k, v]) < 0.8 * on_64_rows
    assert compared_kernels(fn, [q, k, v], torch.float32) == ATOMIC_KERNELS


@pytest.mark.parametrize("branches", [([40, 200, 512], [1, 2, 4]), ([2, 64], [1, 4])],
                         ids=["segments-across-parts", "segments-between-rows"])
@pytest.mark.parametrize("mode", ["torchscale", "exact"])
def test_two_part_forward_key_ranges(mode, branches, monkeypatch):
    """Two-part forward programs (:func:`kernels.forward_tiles` forced, fp32) where a branch's key ranges of the two
    parts overlap, or not, and start inside a key tile ([40, 200, 512] x [1, 2, 4]: a part spans 256 positions, 6.4
    segments of 40), or skip segments that hold no row of the program ([2, 64] x [1, 4]); torchscale on two packed
    bags (300 and 211 rows: the second's 53 rows a residue leave its blocks' second parts empty), exact on two
    padded bags with a mask; outputs, lse and every gradient."""
    monkeypatch.setattr(kernels, "forward_tiles", lambda dtype, block, period, shortest_segment: (64, 2))
    fn, inputs = two_bags(mode, branches, (300, 211), (2, 24), seed=36)
    kernel_checks.compare(fn, inputs, torch.float32)


def test_keeps_branches_where_the_backward_takes_the_atomic_dq(request):
    """Torchscale mode in fp16 / bf16 on 64-row blocks keeps the branch outputs; not in exact mode, fp32, on 32-row
    blocks (short segments, or dh over 64) or under deterministic mode."""
    half, bounds = torch.zeros(600, 3, 48, dtype=torch.bfloat16), [0, 300, 600]
    assert kernels.keeps_branches(half, bounds, *NARROW_KEYS, "torchscale")
    assert not kernels.keeps_branches(half, bounds, *NARROW_KEYS, "exact")
    assert not kernels.keeps_branches(half.float(), bounds, *NARROW_KEYS, "torchscale")
    assert not kernels.keeps_branches(half, bounds, [64, 256], [1, 2], "torchscale")  # 64 rows span 128 positions
    assert not kernels.keeps_branches(torch.zeros(600, 3, 80, dtype=torch.float16), bounds, *NARROW_KEYS, "torchscale")
    assert kernels.branch_slots(3, [1, 2]) == 3 + 2 and kernels.branch_slots(16, [1, 2, 4, 8, 16]) == 31
    request.getfixturevalue("deterministic")
    assert not kernels.keeps_branches(half, bounds, *NARROW_KEYS, "torchscale")


# branches, key launches; "128-keys-twice": the second launch, 128 keys modulo 1, adds; "both-rate-2": the 64-key
# launch's branch (r = 2) covers half the residues of a head (its blocks of the other residue skip their rows: no
# read, no write; adding nothing would give the same values); "three": 128 keys modulo 2, then 128 modulo 1 and 64
# modulo 1, adding; "64-then-128": 128 keys modulo 2 fit in neither's segments, so 64 for the second (which holds
# 128 at no period), then 128 modulo 1 for the first, adding
TWO_LAUNCHES = {"128-keys": (WIDE_KEYS, 1), "128-keys-twice": (NARROW_KEYS, 2),
                "both-rate-2": (([256, 128], [1, 2]), 2), "64-then-128": (([128, 200], [1, 2]), 2)}
KEY_BLOCKS = {**TWO_LAUNCHES, "64-keys": (SMALL, 1), "three": (THREE_LAUNCHES, 3)}
# torchscale mode on 64-row blocks (SMALL's and THREE_LAUNCHES' segments take 32-row blocks): 64 rows of residue
# period 2 fit in each segment of [128, 200] x [2, 2], 128 in neither
TORCHSCALE_KEY_BLOCKS = {**TWO_LAUNCHES, "64-keys": (([128, 200], [2, 2]), 1)}


@pytest.mark.parametrize("keys", KEY_BLOCKS)
def test_atomic_dq_in_fp32(keys, monkeypatch):
    """Exact mode's backward with the atomic dq (fp16 / bf16 by default) forced in fp32 for a tight comparison: two
    padded bags with a mask, 3 heads of dh 40, one key launch of 128 or 64 keys a program, or two or three, the
    later ones adding (:func:`kernels.key_launches`); outputs and every gradient, and only the delta and key
    kernels run on the backward."""
    branches, key_launches = KEY_BLOCKS[keys]
    monkeypatch.setattr(kernels, "atomic_dq", lambda dtype: True)
    q, k, v = make_qkv((2, 260, 3, 40), seed=30)
    fn = with_lse(*branches, mode="exact", mask=padded_mask(2, 260))
    assert compared_kernels(fn, [q, k, v], torch.float32, key_launches) == ATOMIC_KERNELS


@pytest.mark.parametrize("keys", TORCHSCALE_KEY_BLOCKS)
def test_torchscale_atomic_dq_in_fp32(keys, monkeypatch):
    """Torchscale mode with the branch outputs kept and the atomic dq (fp16 / bf16 by default), forced in fp32: two
    packed bags (260 and 197 rows, the last segments zero-padded), 3 heads of dh 40 (head groups of 2 and 1 at
    r = 2), one key launch of 128 or 64 keys a program, or two, the second adding; outputs and every gradient, and
    only the delta and key kernels run on the backward."""
    branches, key_launches = TORCHSCALE_KEY_BLOCKS[keys]
    monkeypatch.setattr(kernels, "atomic_dq", lambda dtype: True)
    q, k, v = make_qkv((457, 3, 40), seed=33)
    fn = with_lse(*branches, cu_seqlens=torch.tensor([0, 260, 457], device=sharding.device()))
    assert compared_kernels(fn, [q, k, v], torch.float32, key_launches) == ATOMIC_KERNELS


@pytest.mark.parametrize("keys", KEY_BLOCKS)
def test_atomic_dq_in_half_precision(keys):
    """fp16 exact mode takes the atomic dq by default: GigaPath's dh 48 (tiles of 32 and 16), two padded bags with a
    mask, one key launch or several (the later ones add to dk and dv rounded to fp16); outputs and every gradient
    within fp16's tolerance. So does torchscale mode on 64-row blocks (one bag, branch outputs kept); on 32-row
    blocks (SMALL, THREE_LAUNCHES) it keeps the query kernel."""
    branches, key_launches = KEY_BLOCKS[keys]
    q, k, v = make_qkv((2, 260, 2, 48), dtype=torch.float16, seed=31)
    fn = lambda *t: dilated_attention(*t, *branches, mode="exact", mask=padded_mask(2, 260))  # noqa: E731
    assert compared_kernels(fn, [q, k, v], torch.float16, key_launches) == ATOMIC_KERNELS
    torchscale = lambda *t: dilated_attention(*t, *branches)  # noqa: E731
    kernels_run = compared_kernels(torchscale, [t[:1].detach().requires_grad_() for t in (q, k, v)], torch.float16)
    on_32_rows = kernels.block_size(48, *branches, 260, "torchscale") == 32
    assert kernels_run == (TWO_KERNELS if on_32_rows else ATOMIC_KERNELS)


def test_deterministic_mode_runs_the_query_kernel(deterministic):
    """fp16 exact mode under ``torch.use_deterministic_algorithms``: dq from the query kernel, no atomics; outputs
    and every gradient match the reference. (fp32 always takes the query kernel; torchscale mode does under
    deterministic mode too: :func:`test_keeps_branches_where_the_backward_takes_the_atomic_dq`.)"""
    q, k, v = make_qkv((2, 260, 2, 48), dtype=torch.float16, seed=32)
    fn = lambda *t: dilated_attention(*t, *WIDE_KEYS, mode="exact", mask=padded_mask(2, 260))  # noqa: E731
    assert compared_kernels(fn, [q, k, v], torch.float16) == TWO_KERNELS


@pytest.mark.parametrize("mode", ["torchscale", "exact"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_bags_equal_separate_calls(mode, backend):
    q, k, v = make_qkv((117, 3, 16), seed=5)
    lengths = [40, 1, 76]
    cu_seqlens = torch.tensor([0, 40, 41, 117], device=sharding.device())
    with milkernels.use_backend(backend):
        packed = dilated_attention(q, k, v, *SMALL, mode=mode, cu_seqlens=cu_seqlens)
        separate = [dilated_attention(*(t[None, s:s + n] for t in (q, k, v)), *SMALL, mode=mode)[0]
                    for s, n in zip([0, 40, 41], lengths)]
    torch.testing.assert_close(packed, torch.cat(separate))
    kernel_checks.compare(with_lse(*SMALL, mode=mode, cu_seqlens=cu_seqlens), [q, k, v], torch.float32)


@pytest.mark.parametrize("mode", ["torchscale", "exact"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_positions_no_branch_reaches_are_zero_with_lse_minus_inf(mode, backend):
    """One branch of rate 4 and two heads: positions 2 and 3 of every 4 are reached by no head group."""
    q, k, v = make_qkv((1, 33, 2, 16), seed=6)
    with milkernels.use_backend(backend):
        out, lse = dilated_attention(q, k, v, [8], [4], mode=mode, return_lse=True)
        grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    reached = torch.arange(33)[:, None] % 4 == torch.arange(2)  # head h is in group h: positions h mod 4
    assert not out[0][~reached].any() and lse[0][~reached].eq(-math.inf).all()
    assert lse[0][reached].isfinite().all() and all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_exact_with_one_dense_branch_is_softmax_attention(backend):
    q, k, v = make_qkv((2, 45, 3, 16), seed=7)
    with milkernels.use_backend(backend):
        out = dilated_attention(q, k, v, [64], [1], mode="exact")
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_modes_agree_without_padding_or_shared_keys(backend):
    """One branch whose segments tile the bag: no padding, no key counted twice, so both modes are one."""
    q, k, v = make_qkv((1, 64, 4, 16), seed=8)
    with milkernels.use_backend(backend):
        results = [dilated_attention(q, k, v, [16], [2], mode=mode) for mode in ("torchscale", "exact")]
        grads = [torch.autograd.grad(out.square().sum(), [q, k, v]) for out in results]
    torch.testing.assert_close(*results)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_modes_differ_where_branches_share_keys():
    """Two overlapping branches: shared keys count twice in torchscale and once in exact mode (each mode's
    gradient against its reference is in test_matches_reference)."""
    q, k, v = make_qkv((1, 32, 2, 16), seed=9)
    outs = [dilated_attention(q, k, v, [16, 32], [1, 2], mode=mode) for mode in ("torchscale", "exact")]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def bad_input_cases():
    q = torch.randn(2, 10, 2, 8)
    yield "exact mode needs each dilation rate to divide", (q, q, q, [8], [3]), {"mode": "exact"}
    yield "one length", (q, q, q, [8, 16], [1]), {}
    yield "non-empty list", (q, q, q, [], []), {}
    yield "int >= 1", (q, q, q, [0], [1]), {}
    yield "int >= 1", (q, q, q, [8], [0]), {}
    yield "int >= 1", (q, q, q, [8], [True]), {}
    yield "mode must be one of", (q, q, q, [8], [1]), {"mode": "dense"}
    yield "needs mode='exact'", (q, q, q, [8], [1]), {"mask": torch.ones(2, 10)}
    yield "one shape", (q, q[:, :5], q, [8], [1]), {}
    yield "one dtype", (q, q.double(), q, [8], [1]), {}
    yield "dh <= 256", (torch.randn(1, 4, 1, 260),) * 3 + ([8], [1]), {}
    yield "q must be", (torch.randn(4, 8),) * 3 + ([8], [1]), {}
    yield "empty bag", (torch.randn(2, 0, 2, 8),) * 3 + ([8], [1]), {}
    yield "softmax_scale", (q, q, q, [8], [1]), {"softmax_scale": 0.0}
    yield "cu_seqlens must start", (torch.randn(10, 2, 8),) * 3 + ([8], [1]), {"cu_seqlens": torch.tensor([0, 4, 9])}


@pytest.mark.parametrize("message, args, kwargs", list(bad_input_cases()))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_raises_value_error(message, args, kwargs, backend):
    with milkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        dilated_attention(*args, **kwargs)


def test_forced_triton_on_shifted_segments_says_why_and_auto_uses_the_reference():
    q, k, v = make_qkv((1, 70, 6, 8), seed=10)
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="torchscale shifts"):
        dilated_attention(q, k, v, [12, 20], [3, 8])
    with milkernels.use_backend("cuda"), pytest.raises(milkernels.BackendUnavailable, match="no cuda kernel"):
        dilated_attention(q, k, v, *SMALL)
    wide = [t.detach().half() for t in make_qkv((1, 20, 2, 80), seed=10)]
    with milkernels.use_backend("triton"), pytest.raises(milkernels.BackendUnavailable, match="takes dh <= 64"):
        dilated_attention(*wide, *SMALL, mode="exact")
    with milkernels.use_backend("auto"):
        assert dilated_attention(q, k, v, [12, 20], [3, 8]).shape == q.shape  # CPU tensors: the reference


def saved_bytes(fn, inputs) -> int:
    """Bytes that autograd saves for backward beyond the inputs: unique storages."""
    inputs_storage = {t.untyped_storage().data_ptr() for t in inputs}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs_storage:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def test_kernels_save_only_the_output_and_its_lse():
    """The fused op keeps q, k, v (inputs), out and the fp32 lse; the reference keeps every branch's scores."""
    q, k, v = make_qkv((1, 256, 4, 16), seed=11)
    call = lambda *t: dilated_attention(*t, *LIN_MIL)  # noqa: E731
    with milkernels.use_backend("triton"):
        fused = saved_bytes(call, [q, k, v])
    with milkernels.use_backend("reference"):
        composed = saved_bytes(call, [q, k, v])
    assert fused == q.numel() * 4 + 256 * 4 * 4
    assert fused * 4 < composed


def test_torchscale_keeps_the_branch_outputs_when_a_backward_follows(monkeypatch):
    """bf16 torchscale on 64-row blocks also keeps each branch's output for the atomic dq: ``(T, slots, dh)`` with
    ``slots = ceil(4 / 1) + ceil(4 / 2) = 6`` at 4 heads (1.5 outputs' worth), still a small part of what the
    reference keeps; under ``torch.no_grad`` it is not written. Where every rate divides H, the forward writes every
    entry of it."""
    q, k, v = make_qkv((1, 512, 4, 16), dtype=torch.bfloat16, seed=11)
    call = lambda *t: dilated_attention(*t, *NARROW_KEYS)  # noqa: E731
    with milkernels.use_backend("triton"):
        fused = saved_bytes(call, [q, k, v])
    with milkernels.use_backend("reference"):
        composed = saved_bytes(call, [q, k, v])
    assert fused == 512 * 4 * 16 * 2 + 512 * 4 * 4 + 512 * 6 * 16 * 2
    assert fused * 4 < composed
    kept = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *args: kept.append(args[-1]) or forward(*args))
    with milkernels.use_backend("triton"), torch.no_grad():
        call(q, k, v)
    assert kept == [False]
    # every rate divides H: every entry written (the buffer starts NaN-poisoned, not zeroed)
    op_args = [t[0].detach() for t in (q, k, v)] + [[0, 512], *NARROW_KEYS, None, 0.25, "torchscale", True]
    assert not torch.ops.milkernels.dilated_attention_forward(*op_args)[2].isnan().any()


@pytest.mark.parametrize("mode, masked, keep", [("torchscale", False, True), ("exact", True, False)])
def test_opcheck(mode, masked, keep):
    q, k, v = make_qkv((23, 3, 16), seed=12)
    row_valid = torch.rand(23, device=sharding.device()) > 0.3 if masked else None
    options = [[0, 9, 23], [8, 16], [1, 2], row_valid, 0.25, mode]
    kernel_checks.opcheck_attention_ops(torch.ops.milkernels.dilated_attention_forward,
                                        torch.ops.milkernels.dilated_attention_backward, [q, k, v, *options, keep],
                                        options)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_without_graph_break(backend):
    mask = torch.ones(2, 30, dtype=torch.bool, device=sharding.device())
    mask[1, 21:] = False
    fn = lambda q, k, v, m: dilated_attention(q, k, v, *SMALL, mode="exact", mask=m)  # noqa: E731
    kernel_checks.assert_compiles_without_graph_break(fn, [*make_qkv((2, 30, 2, 16), seed=13), mask], backend)
    kernel_checks.assert_compiles_without_graph_break(lambda *t: dilated_attention(*t, *SMALL),
                                                      make_qkv((1, 30, 2, 16), seed=14), backend)


def test_double_backward_raises_on_triton():
    kernel_checks.assert_double_backward_raises(lambda *t: dilated_attention(*t, *SMALL), make_qkv((1, 20, 2, 16)),
                                                "dilated_attention")


def test_double_backward_on_the_reference():
    """Exact mode: true second derivatives. (Torchscale's merge weights take no gradient, so its first
    derivative is not the derivative of a function, and no second derivative can be checked numerically.)"""
    q, k, v = kernel_checks.as_float64(make_qkv((1, 9, 2, 4), seed=15))
    with milkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda *t: dilated_attention(*t, [4, 8], [1, 2], mode="exact"), [q, k, v])


GEMM_FLOPS_PER_BYTE = 80  # issue 12: tl.dot FLOPs per requested byte of a flash kernel in bf16 (H100's L2 bound)
MARGIN = 1.1  # where a budget is not met, how much worse than measured a figure may get before the test fails
RECOMPUTE_BUDGET = 1.3  # issue 12: dot FLOPs over the useful ones
MEASURED_FLOPS_PER_BYTE = {  # dot FLOPs per requested byte at test_traffic_within_budget's shape
    torch.bfloat16: dict(_forward_kernel=98.8, _key_grad_kernel=94.8),
    torch.float32: dict(_forward_kernel=39.3, _query_grad_kernel=73.0, _key_grad_kernel=71.9),
}
MEASURED_RECOMPUTE = {torch.bfloat16: (1.0, 1.25), torch.float32: (4 / 3, 8 / 3)}  # dot over useful FLOPs: fwd, bwd


def bag_traffic(length, segments, rates, dtype=torch.bfloat16, **kwargs):
    """The counts (:func:`counting`) of the triton backend's forward and backward of ``dilated_attention(q, k, v,
    segments, rates, **kwargs)`` on one bag of ``length`` rows, 2 heads of Prov-GigaPath's dh = 48."""
    q, k, v = make_qkv((length, 2, 48), dtype=dtype, seed=21)
    with milkernels.use_backend("triton"):
        with counting() as forward:
            out = dilated_attention(q, k, v, segments, rates, **kwargs)
        with counting() as backward:
            out.backward(torch.randn_like(out))
    return forward, backward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_traffic_within_budget(dtype):
    """Torchscale mode on one bag of 1024 rows, H = 2 heads of Prov-GigaPath's dh = 48, branches [512, 1024] x
    [1, 2] (GigaPath's rule from 512 to 1024).

    Issue 12's budgets, in bf16. Dot FLOPs within 1.3x of the useful 4 dh per attended pair (backward 8 dh):
    forward met, 1.00x (dh = 48 runs as tiles of 32 and 16; as one 64-wide tile, as fp32 still does, 1.33x);
    backward met, 1.25x: the forward keeps each branch's output, so the delta kernel finds each D_i = dout . out_i
    with no products and the key kernel forms 5 products of each tile pair, dq added atomically (fp32 keeps the
    query kernel, which finds D_i from sums over the branch's keys: 8 products, 2.67x with its padding). 80 dot
    FLOPs per requested byte: the forward 98.8, met (128 query rows a program, since 256 positions fit in each
    segment, so k and v are read once per 128 rows; it writes the branch outputs too: 3.06 MB; with 64 rows 55.8
    and 5.42 MB; fp32 39.3, on 64), the key kernel 94.8 (128 keys a program, its atomic adds counted as read and
    written), met (fp32's dq 73.0 and dk/dv 71.9). Where not met, the measured figure is held within 10%. The bf16
    backward requests 8.47 MB (11.23 MB with the query kernel)."""
    length, heads, head_dim, segments, rates = 1024, 2, 48, [512, 1024], [1, 2]
    forward, backward = bag_traffic(length, segments, rates, dtype)
    useful = 4 * head_dim * attended_pairs(length, heads, segments, rates)  # forward: q k^T and p v
    for name, measured in MEASURED_FLOPS_PER_BYTE[dtype].items():
        counts = (forward.by_kernel | backward.by_kernel)[name]
        assert counts.dot_flops >= min(GEMM_FLOPS_PER_BYTE, measured / MARGIN) * counts.requested_bytes, name
    forward_recompute, backward_recompute = MEASURED_RECOMPUTE[dtype]
    assert forward.dot_flops == forward_recompute * useful
    assert backward.dot_flops == backward_recompute * 2 * useful
    if dtype == torch.bfloat16:
        assert forward.dot_flops <= RECOMPUTE_BUDGET * useful and backward.dot_flops <= RECOMPUTE_BUDGET * 2 * useful
        assert backward.requested_bytes <= MARGIN * 8468224


TWO_PART_FORWARD = {"torchscale": 66.5, "exact": 76.4}  # dot FLOPs per requested byte (on 64-row programs 49.4, 54.7)
SPLIT_KEY_BACKWARD = {"torchscale": 6059904, "exact": 5959040}  # bytes requested (8468480, 8367616 on 64 keys)


@pytest.mark.parametrize("mode", TWO_PART_FORWARD)
def test_two_part_traffic(mode):
    """bf16, one bag of 1024 rows, 2 heads of dh 48, branches [128, 1024] x [1, 2]: 128 rows of a residue (256
    positions) do not fit in the first branch's segments of 128 (Prov-GigaPath's first segment of 1024 at R = 16
    is the same case), which keeps this shape under issue 12's 80 dot FLOPs per requested byte (a third of its
    pairs are the first branch's; at GigaPath's N = 1M a tenth). The measured figures are held within 10%.

    - Forward: a program takes two parts of 64 rows (:func:`kernels.forward_tiles`). The second branch's k, v
      tiles are read once for both parts: 66.5 dot FLOPs per requested byte in torchscale mode (49.4 on 64-row
      programs), 76.4 in exact mode (54.7); the first branch's keys are read per part, since its segments divide
      the parts. Dot FLOPs are exactly the useful ones.
    - Backward: the atomic key kernel takes the second branch on 128 keys of a residue modulo 2 a program, then
      the first on 128 keys modulo 1, adding to the first launch's dk and dv (:func:`kernels.key_launches`): 67.9
      dot FLOPs per requested byte, its float32 atomic adds counted as read and written (a program of the first
      branch meets the 128 queries of its segment only), and 6.06 MB requested in torchscale mode, 5.96 MB in
      exact mode (55.9 and 7.26 / 7.16 MB with the first branch on 64 keys modulo 2, 47.4 and 8.47 / 8.37 MB with
      both on 64); 5 products a tile pair."""
    forward, backward = bag_traffic(1024, [128, 1024], [1, 2], mode=mode)
    counts = forward.by_kernel["_forward_kernel"]
    assert counts.dot_flops >= TWO_PART_FORWARD[mode] / MARGIN * counts.requested_bytes
    if mode == "torchscale":
        assert counts.dot_flops == 4 * 48 * attended_pairs(1024, 2, [128, 1024], [1, 2])
    keys = backward.by_kernel["_key_grad_kernel"]
    assert keys.launches == 2 and keys.dot_flops >= 67.9 / MARGIN * keys.requested_bytes
    assert backward.dot_flops * 2 == 5 * forward.dot_flops
    assert backward.requested_bytes <= MARGIN * SPLIT_KEY_BACKWARD[mode]


def test_split_launch_traffic():
    """Torchscale mode (Prov-GigaPath's), bf16, one bag of 2048 rows, 2 heads of dh 48, Prov-GigaPath's first two
    branches at its R = 16, [1024, 2048] x [1, 16]: 128 rows (or keys) modulo 16 span two of the first branch's
    segments, so the forward and the key kernel each take it in a second launch, on 128 rows (keys) modulo 1
    (:func:`kernels.forward_launches`, :func:`kernels.key_launches`). Both meet issue 12's 80 dot FLOPs per
    requested byte: the forward 92.5 (58.6 in one launch of two-part programs, the first branch's k, v read per part
    of 64 rows; exact mode measured 97.1 and 60.4), the key kernel 87.4, its float32 atomic adds counted as read and
    written. Dot FLOPs are exactly the useful ones in the forward, 5 products a tile pair in the backward."""
    forward, backward = bag_traffic(2048, [1024, 2048], [1, 16])
    for counts in (forward.by_kernel["_forward_kernel"], backward.by_kernel["_key_grad_kernel"]):
        assert counts.launches == 2 and counts.dot_flops >= GEMM_FLOPS_PER_BYTE * counts.requested_bytes
    assert forward.dot_flops == 4 * 48 * attended_pairs(2048, 2, [1024, 2048], [1, 16])
    assert backward.dot_flops * 2 == 5 * forward.dot_flops


EXACT_BACKWARD = {  # per deterministic: products a tile pair over the forward's 2, dot FLOPs per requested byte
    False: (5, dict(_key_grad_kernel=94.8)),
    True: (7, dict(_query_grad_kernel=82.0, _key_grad_kernel=105.9)),
}


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_exact_backward_traffic(deterministic_mode, request):
    """Exact mode in bf16 on test_traffic_within_budget's bag and branches (128 keys a program with the atomic dq).
    The atomic dq forms 5 products of each tile pair where the forward forms 2: issue 12's 1.3x budget met (1.25x);
    its key kernel 94.8 dot FLOPs per requested byte with its float32 atomic adds counted as read and written (the
    upper figure). Deterministic: 7 products (1.75x); dq 82.0, dk/dv 105.9. The atomic backward requests fewer
    bytes in all (8.37 MB against 11.23 MB). The forward, 128 rows a program, 109.3 dot FLOPs per requested byte
    (59.0 on 64)."""
    if deterministic_mode:
        request.getfixturevalue("deterministic")
    forward, backward = bag_traffic(1024, [512, 1024], [1, 2], mode="exact")
    products, measured_flops_per_byte = EXACT_BACKWARD[deterministic_mode]
    assert forward.dot_flops >= GEMM_FLOPS_PER_BYTE * forward.requested_bytes
    assert backward.dot_flops * 2 == products * forward.dot_flops
    for name, measured in measured_flops_per_byte.items():
        counts = backward.by_kernel[name]
        assert counts.dot_flops >= min(GEMM_FLOPS_PER_BYTE, measured / MARGIN) * counts.requested_bytes, name
    assert backward.requested_bytes <= MARGIN * (8367104 if not deterministic_mode else 11227136)


test_compiles_for_sm90 = aot.sm90_test(kernels)
