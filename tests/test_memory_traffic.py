"""The memory traffic counter (milkernels/bench/traffic.py) on hand-written kernels with known bytes, FLOPs and launches."""

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from milkernels.bench.traffic import counting

pytestmark = pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="counts under the Triton interpreter only")

SWAPPED = [(interpreter.InterpreterBuilder, name) for name in (
    "create_masked_load", "create_masked_store", "create_dot", "create_atomic_rmw", "create_atomic_cas",
    "create_dot_scaled")] + [(interpreter.GridExecutor, "__call__")]
SIZES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int32: 4, torch.int64: 8, torch.bool: 1}


@triton.jit
def masked_copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    tl.store(dst + offsets, tl.load(src + offsets, mask=in_range), mask=in_range)


@triton.jit
def copy_kernel(src, dst, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst + offsets, tl.load(src + offsets))


@triton.jit
def dots_kernel(a, b, c, a3, b3, c3):
    r16 = tl.arange(0, 16)
    r32 = tl.arange(0, 32)
    x = tl.load(a + r32[:, None] * 16 + r16[None, :])
    y = tl.load(b + r16[:, None] * 32 + r32[None, :])
    tl.store(c + r32[:, None] * 32 + r32[None, :], tl.dot(x, y))
    tiles = tl.arange(0, 2)[:, None, None] * 256 + r16[None, :, None] * 16 + r16[None, None, :]
    tl.store(c3 + tiles, tl.dot(tl.load(a3 + tiles), tl.load(b3 + tiles)))


@triton.jit
def atomic_add_kernel(dst, n):
    offsets = tl.arange(0, 4)
    tl.atomic_add(dst + offsets, 1.0, mask=offsets < n, sem="relaxed")


@triton.jit
def compare_and_swap_kernel(dst):
    tl.atomic_cas(dst, 0.0, 1.0)


def masked_copy(src, dst, block):
    """Copy ``src`` into ``dst`` (same length) with one program per ``block`` elements."""
    masked_copy_kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), BLOCK=block)


def installed():
    """The interpreter methods that counting() swaps, as they stand now."""
    return [vars(owner)[name] for owner, name in SWAPPED]


def test_masked_lanes_excluded_at_each_pointers_element_size():
    src = torch.randn(100)
    dst = torch.zeros(100, dtype=torch.bfloat16)
    with counting() as counts:
        masked_copy(src, dst, block=128)
    assert (counts.load_bytes, counts.store_bytes, counts.requested_bytes) == (100 * 4, 100 * 2, 100 * 6)
    assert (counts.launches, counts.dot_flops) == (1, 0)
    torch.testing.assert_close(dst, src.bfloat16())  # the interpreter rounds toward zero, torch to nearest


@pytest.mark.parametrize("dtype", list(SIZES))
def test_unmasked_accesses_count_every_lane_once(dtype):
    src = torch.arange(16).to(dtype)
    dst = torch.zeros(16, dtype=dtype)
    with counting() as counts:
        copy_kernel[(1,)](src, dst, BLOCK=16)
    assert (counts.load_bytes, counts.store_bytes) == (16 * SIZES[dtype], 16 * SIZES[dtype])
    assert torch.equal(dst, src)


def test_grid_sums_over_programs():
    src = torch.arange(300, dtype=torch.int64)
    dst = torch.zeros(300, dtype=torch.int32)
    with counting() as counts:
        masked_copy(src, dst, block=64)  # 5 programs, the last one 44 lanes
    assert (counts.load_bytes, counts.store_bytes, counts.launches) == (300 * 8, 300 * 4, 1)
    assert torch.equal(dst, src.int())


def test_dot_flops_2d_and_batched():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 16, generator=generator), torch.randn(16, 32, generator=generator)
    a3, b3 = torch.randn(2, 16, 16, generator=generator), torch.randn(2, 16, 16, generator=generator)
    c, c3 = torch.zeros(32, 32), torch.zeros(2, 16, 16)
    with counting() as counts:
        dots_kernel[(1,)](a, b, c, a3, b3, c3)
    assert counts.dot_flops == 2 * 32 * 32 * 16 + 2 * 2 * 16 * 16 * 16
    assert counts.load_bytes == (32 * 16 * 2 + 2 * 16 * 16 * 2) * 4
    assert counts.store_bytes == (32 * 32 + 2 * 16 * 16) * 4
    torch.testing.assert_close(c, a @ b)
    torch.testing.assert_close(c3, a3 @ b3)


def test_counts_per_kernel_add_up_to_the_total():
    src, dst = torch.arange(300, dtype=torch.int64), torch.zeros(300, dtype=torch.int32)
    with counting() as counts:
        masked_copy(src, dst, block=64)
        masked_copy(src[:100], dst[:100], block=64)
        copy_kernel[(1,)](src, dst, BLOCK=16)
    masked = counts.by_kernel["masked_copy_kernel"]
    assert (masked.launches, masked.load_bytes, masked.store_bytes) == (2, 400 * 8, 400 * 4)
    copied = counts.by_kernel["copy_kernel"]
    assert (copied.launches, copied.load_bytes, copied.store_bytes) == (1, 16 * 8, 16 * 4)
    assert counts.requested_bytes == masked.requested_bytes + copied.requested_bytes and not counts.running


def test_repeated_blocks_count_apart_and_restore_the_methods():
    before = installed()
    src, dst = torch.randn(8), torch.zeros(8)
    with counting() as first:
        masked_copy(src, dst, block=8)
    assert installed() == before
    with counting() as second:
        masked_copy(src, dst, block=8)
        masked_copy(src, dst, block=8)
    masked_copy(src, dst, block=8)
    assert (first.launches, first.load_bytes, second.launches, second.load_bytes) == (1, 32, 2, 64)
    assert installed() == before


def test_nested_blocks_count_inner_work_in_both():
    before = installed()
    src, dst = torch.randn(8), torch.zeros(8)
    with counting() as outer:
        masked_copy(src, dst, block=8)
        with counting() as inner:
            masked_copy(src, dst, block=8)
        masked_copy(src, dst, block=8)
    assert (outer.launches, outer.store_bytes, inner.launches, inner.store_bytes) == (3, 96, 1, 32)
    assert installed() == before


def test_methods_restored_after_an_exception():
    before = installed()
    src, dst = torch.randn(8), torch.zeros(8)
    with pytest.raises(ValueError, match="inside the block"):
        with counting() as counts:
            masked_copy(src, dst, block=8)
            raise ValueError("inside the block")
    assert installed() == before
    masked_copy(src, dst, block=8)
    assert (counts.launches, counts.load_bytes) == (1, 32)


def test_atomic_adds_count_their_lanes_read_and_written():
    dst = torch.zeros(4)
    with counting() as counts:
        atomic_add_kernel[(2,)](dst, 3)
    assert (counts.load_bytes, counts.store_bytes, counts.launches) == (2 * 3 * 4, 2 * 3 * 4, 1)
    assert torch.equal(dst, torch.tensor([2.0, 2.0, 2.0, 0.0]))


def test_compare_and_swap_refused_rather_than_miscounted():
    dst = torch.zeros(1)
    with pytest.raises(Exception, match="cannot count create_atomic_cas"):
        with counting():
            compare_and_swap_kernel[(1,)](dst)
    compare_and_swap_kernel[(1,)](dst)
    assert torch.equal(dst, torch.ones(1))


def test_refuses_to_count_without_the_interpreter(monkeypatch):
    before = installed()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with counting():
            pass
    assert installed() == before
