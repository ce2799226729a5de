"""The learned-query benchmark entries: ASMIL's training step and LiteMIL's pooling."""

import json

import pytest
import torch

from milkernels.bench import registry
from milkernels.bench.__main__ import main
from milkernels.bench.query_attention import ASMIL_STEP, LITEMIL_POOL
from milkernels.bench.sweep import PASSES, flop_check

STEP_DIMS = {"D": 32, "T": 2, "H": 4}
POOL_DIMS = {"D": 32, "H": 4}


def _as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def test_ops_are_registered_with_their_defaults_and_peers():
    ops = registry.ops()
    assert ops["asmil_step"] is ASMIL_STEP and ops["litemil_pool"] is LITEMIL_POOL
    assert ASMIL_STEP.gpu_dims == {"D": 512, "T": 8, "H": 8} and LITEMIL_POOL.gpu_dims == {"D": 256, "H": 4}
    assert set(registry.impls(LITEMIL_POOL)) >= {"reference", "reference_compiled", "triton", "torch_mha"}


def test_tiny_cpu_sweep_records_every_row(tmp_path):
    code = main(["sweep", "--ops", "asmil_step,litemil_pool", "--impls", "reference,triton,torch_mha",
                 "--sizes", "48", "--dims", "D=32,T=2,H=4", "--repeats", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["op"], r["impl"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {("asmil_step", impl, p) for impl in ("reference", "triton") for p in PASSES} | \
        {("litemil_pool", impl, p) for impl in ("reference", "triton", "torch_mha") for p in PASSES}
    for op, dims, text in (("asmil_step", STEP_DIMS, "D=32 T=2 H=4"), ("litemil_pool", POOL_DIMS, "D=32 H=4")):
        assert result["metadata"]["flop_check"][op] == {"n": 128, "fwd": 1.0, "fwd_bwd": 1.0}
        for pass_ in PASSES:
            ref = rows[op, "reference", pass_]
            assert ref["status"] == "ok" and ref["dims"] == text and ref["median_ms"] > 0
            assert ref["flops"] == registry.ops()[op].flops(48, dims, pass_ == "fwd_bwd")
            triton_row = rows[op, "triton", pass_]
            assert triton_row["status"] == "ok" or (triton_row["status"] == "skipped" and triton_row["reason"])
    assert all(rows["litemil_pool", "torch_mha", p]["status"] == "ok" for p in PASSES)


@pytest.mark.parametrize("op, dims", [(ASMIL_STEP, STEP_DIMS), (ASMIL_STEP, {"D": 24, "T": 3, "H": 2}),
                                      (LITEMIL_POOL, POOL_DIMS), (LITEMIL_POOL, {"D": 24, "H": 3})],
                         ids=lambda value: getattr(value, "name", None))
def test_reference_and_peers_match_the_public_path_and_the_counter(op, dims):
    inputs = op.build(40, dims, torch.float64, torch.device("cpu"))
    want = _as_tuple(op.reference(*inputs))
    for got, expected in zip(_as_tuple(registry.GENERIC_IMPLS["reference"](op)(*inputs)), want, strict=True):
        torch.testing.assert_close(got, expected)
    for maker in op.peers.values():
        torch.testing.assert_close(maker(op)(*inputs), want[0])
    assert flop_check(op, dims, n=40) == {"n": 40, "fwd": 1.0, "fwd_bwd": 1.0}


def test_step_formulas():
    n, (dim, tokens, heads) = 64, STEP_DIMS.values()
    bag = 2 * (2 * n * dim * tokens * heads)                                  # the online scores, pooling
    online = tokens * (8 * dim * dim + 2 * dim)                               # q_proj, fold, values, out_proj
    anchor = tokens * (4 * dim * dim + 2 * dim) + 2 * n * dim * tokens * heads  # q_proj, fold, its scores
    assert ASMIL_STEP.flops(n, STEP_DIMS, False) == bag + online + anchor == 6 * n * dim * tokens * heads + \
        tokens * (12 * dim * dim + 4 * dim)
    assert ASMIL_STEP.flops(n, STEP_DIMS, True) == 3 * (bag + online) + anchor
    x, trainable = n * dim, tokens * (4 * dim * dim + 7 * dim)
    anchor_weights, outputs = tokens * (2 * dim * dim + 2 * dim), tokens * dim + 1
    assert ASMIL_STEP.min_bytes(n, STEP_DIMS, 2, False) == 2 * (x + trainable + anchor_weights + outputs)
    assert ASMIL_STEP.min_bytes(n, STEP_DIMS, 2, True) == \
        2 * (3 * x + 3 * trainable + anchor_weights + 2 * outputs)


def test_pool_formulas():
    n, dim, heads = 64, 32, 4
    forward = 4 * n * dim * heads + 8 * dim * dim + 2 * dim
    assert LITEMIL_POOL.flops(n, POOL_DIMS, False) == forward == 41024
    assert LITEMIL_POOL.flops(n, POOL_DIMS, True) == 3 * forward
    x, weights, out = n * dim, 4 * dim * dim + 5 * dim, dim
    assert LITEMIL_POOL.min_bytes(n, POOL_DIMS, 4, False) == 4 * (x + weights + out)
    assert LITEMIL_POOL.min_bytes(n, POOL_DIMS, 4, True) == 4 * (3 * x + 3 * weights + 2 * out)
