"""CUDA takes at most 65535 programs on grid axes 1 and 2 (axis 0 takes 2^31 - 1); the interpreter has no limit.
Calls on 70,000 packed bags of 2 rows, forward and backward, record every Triton launch's grid (the launches do
not run, so the values are meaningless): no axis past 0 exceeds the limit, whatever the op's split count."""

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import milkernels
from milkernels.ops import cross_attention, dilated_attention, gated_attention_pool, linear_attention, query_attention

CUDA_GRID_YZ = 65535
BAGS = 70_000


@pytest.fixture
def grids(monkeypatch):
    """The ``(kernel name, grid)`` of every launch; the launches themselves are skipped."""
    seen = []

    def record(kernel, grid):
        def launch(*args, **kwargs):
            seen.append((kernel.fn.__name__, tuple(grid(kwargs) if callable(grid) else grid)))
        return launch

    monkeypatch.setattr(InterpretedFunction, "__getitem__", record)
    return seen


def _rows(*width, dtype=torch.float32):
    return torch.randn(2 * BAGS, *width, dtype=dtype, requires_grad=True)


CU_SEQLENS = torch.arange(0, 2 * BAGS + 1, 2)


def _gated():
    weights = [torch.randn(*shape, requires_grad=True) for shape in ((8, 16), (8,), (8, 16), (8,), (1, 8), (1,))]
    return gated_attention_pool(_rows(16), *weights, cu_seqlens=CU_SEQLENS)


def _query(dtype):
    def call():
        weights = [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in ((16, 16), (16,), (16, 16), (16,))]
        query = torch.randn(BAGS, 2, 16, dtype=dtype, requires_grad=True)  # a query set per bag: per-bag du
        return query_attention(_rows(16, dtype=dtype), query, *weights, 2, cu_seqlens=CU_SEQLENS).out
    return call


CALLS = {
    "gated_attention": _gated,
    "query_attention_two_passes": _query(torch.float32),
    "query_attention_one_pass": _query(torch.bfloat16),
    "linear_attention": lambda: linear_attention(_rows(48), 2, cu_seqlens=CU_SEQLENS),
    "dilated_attention": lambda: dilated_attention(_rows(2, 16), _rows(2, 16), _rows(2, 16), [4], [1],
                                                   cu_seqlens=CU_SEQLENS),
    "cross_attention": lambda: cross_attention(_rows(16), _rows(16), _rows(16), _rows(16), cu_seqlens_q=CU_SEQLENS,
                                               cu_seqlens_k=CU_SEQLENS),
}


@pytest.mark.parametrize("op", CALLS)
def test_no_grid_axis_past_0_exceeds_cudas_limit(op, grids):
    with milkernels.use_backend("triton"):
        out = CALLS[op]()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
    assert grids, "no launch recorded"
    too_wide = [(name, grid) for name, grid in grids if any(size > CUDA_GRID_YZ for size in grid[1:])]
    assert not too_wide
    assert any(grid[0] >= BAGS for _, grid in grids)  # the bags' programs are on axis 0
