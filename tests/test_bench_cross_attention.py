"""The cross-magnification benchmark entries: CMA-MIL's block 10x -> 20x, dense and coordinate-local."""

import json

import pytest
import torch

from milkernels.bench import registry
from milkernels.bench.__main__ import main
from milkernels.bench.cross_attention import CROSS_MAGNIFICATION, CROSS_MAGNIFICATION_LOCAL, neighbourhood, queries
from milkernels.bench.sweep import PASSES, flop_check
from milkernels.nn import CrossAttention
from milkernels.ops.cross_attention.local import neighbour_mask

DIMS = {"D": 24}


def test_op_is_registered_at_cma_mil_s_shape():
    assert registry.ops()["cross_magnification"] is CROSS_MAGNIFICATION
    assert CROSS_MAGNIFICATION.gpu_dims == CROSS_MAGNIFICATION.cpu_dims == {"D": 128}
    assert set(registry.impls(CROSS_MAGNIFICATION)) >= {"reference", "reference_compiled", "triton", "sdpa"}
    x_10x, x_20x, *weights = CROSS_MAGNIFICATION.build(4096, {"D": 128}, torch.bfloat16, torch.device("cpu"))
    assert x_10x.shape == (1024, 128) and x_20x.shape == (4096, 128) and len(weights) == 8
    assert all(t.dtype == torch.bfloat16 and t.requires_grad for t in (x_10x, x_20x, *weights))
    assert [queries(n) for n in (1, 3, 4, 4097)] == [1, 1, 1, 1024]


@pytest.mark.parametrize("n", [1, 7, 64])
def test_reference_and_peer_match_the_public_path_and_the_module(n):
    inputs = CROSS_MAGNIFICATION.build(n, DIMS, torch.float64, torch.device("cpu"))
    want = CROSS_MAGNIFICATION.reference(*inputs)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, inputs, grad)
    for got in (registry.GENERIC_IMPLS["reference"](CROSS_MAGNIFICATION)(*inputs),
                CROSS_MAGNIFICATION.peers["sdpa"](CROSS_MAGNIFICATION)(*inputs)):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, inputs, grad), want_grads)
    block = CrossAttention(DIMS["D"]).double()
    with torch.no_grad():
        for name, tensor in zip(("query", "key", "value", "norm"), (inputs[2:4], inputs[4:6], inputs[6:8], inputs[8:])):
            getattr(block, name).weight.copy_(tensor[0])
            getattr(block, name).bias.copy_(tensor[1])
    torch.testing.assert_close(block(*inputs[:2]), want)


def test_flop_formula_matches_the_counter_and_the_byte_formula():
    n, dim = 64, DIMS["D"]
    assert flop_check(CROSS_MAGNIFICATION, DIMS, n=n) == {"n": n, "fwd": 1.0, "fwd_bwd": 1.0}
    projections, attention = 2 * dim * dim * (16 + 2 * 64), 4 * 16 * 64 * dim
    assert CROSS_MAGNIFICATION.flops(n, DIMS, False) == projections + attention == 264192
    assert CROSS_MAGNIFICATION.flops(n, DIMS, True) == 3 * (projections + attention)
    bags, weights, out = (16 + 64) * dim, 3 * dim * dim + 5 * dim, 16 * dim
    assert CROSS_MAGNIFICATION.min_bytes(n, DIMS, 2, False) == 2 * (bags + weights + out)
    assert CROSS_MAGNIFICATION.min_bytes(n, DIMS, 2, True) == 2 * (3 * bags + 3 * weights + 2 * out)


def test_cpu_sweep_runs_end_to_end(tmp_path):
    impls = ("reference", "triton", "sdpa")
    code = main(["sweep", "--ops", "cross_magnification", "--impls", ",".join(impls), "--sizes", "40,96",
                 "--dims", "D=24", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["metadata"]["flop_check"]["cross_magnification"] == {"n": 128, "fwd": 1.0, "fwd_bwd": 1.0}
    rows = {(r["impl"], r["n"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {(impl, n, p) for impl in impls for n in (40, 96) for p in PASSES}
    for (impl, n, pass_), row in rows.items():
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["dims"] == "D=24", row
        assert row["flops"] == CROSS_MAGNIFICATION.flops(n, DIMS, pass_ == "fwd_bwd")


def test_local_op_builds_a_slide_of_parents_and_their_four_children():
    assert registry.ops()["cross_magnification_local"] is CROSS_MAGNIFICATION_LOCAL
    *features, coords_10x, coords_20x = CROSS_MAGNIFICATION_LOCAL.build(4096, {"D": 128}, torch.bfloat16,
                                                                        torch.device("cpu"))
    assert features[0].shape == (1024, 128) and features[1].shape == (4096, 128)
    assert coords_10x.shape == (1024, 2) and coords_20x.shape == (4096, 2) and not coords_20x.requires_grad
    assert [t.shape[0] for t in CROSS_MAGNIFICATION_LOCAL.build(4099, DIMS, torch.float32, torch.device("cpu"))[:2]] \
        == [1024, 4096]
    mask = neighbour_mask(neighbourhood(coords_10x, coords_20x))
    assert (mask.sum(1) == 4).all() and (mask.sum(0) == 1).all()
    assert not torch.equal(coords_20x, coords_20x[coords_20x[:, 1].argsort(stable=True)])  # shuffled rows


@pytest.mark.parametrize("n", [4, 30, 101])
def test_local_reference_and_peer_match_the_public_path(n):
    inputs = CROSS_MAGNIFICATION_LOCAL.build(n, DIMS, torch.float64, torch.device("cpu"))
    differentiable = inputs[:-2]
    want = CROSS_MAGNIFICATION_LOCAL.reference(*inputs)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, differentiable, grad)
    for backend in ("reference", "triton"):
        public = registry.GENERIC_IMPLS[backend](CROSS_MAGNIFICATION_LOCAL)
        run = public if backend == "reference" else lambda *t: public(*(x.float() for x in t[:-2]), *t[-2:])
        got = run(*inputs)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close([g.double() for g in torch.autograd.grad(got, differentiable, grad.to(got.dtype))],
                                   list(want_grads), rtol=1e-4, atol=1e-4)
    peer = CROSS_MAGNIFICATION_LOCAL.peers["local_reference"](CROSS_MAGNIFICATION_LOCAL)(*inputs)
    torch.testing.assert_close(peer, want)


def test_local_flop_formula_matches_the_counter():
    assert flop_check(CROSS_MAGNIFICATION_LOCAL, DIMS, n=64) == {"n": 64, "fwd": 1.0, "fwd_bwd": 1.0}


def test_local_cpu_sweep_runs_end_to_end(tmp_path):
    impls = ("reference", "reference_compiled", "triton", "local_reference")
    code = main(["sweep", "--ops", "cross_magnification_local", "--impls", ",".join(impls), "--sizes", "40,96",
                 "--dims", "D=24", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == len(impls) * 2 * len(PASSES)
    assert all(row["status"] == "ok" for row in rows), [row for row in rows if row["status"] != "ok"]
