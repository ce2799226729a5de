"""The dilated attention benchmark entry (Prov-GigaPath's shape) and the complexity comparison's dilated layers."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend

from milkernels.bench import complexity, dilated_attention as bench
from milkernels.bench import registry
from milkernels.bench.__main__ import main
from milkernels.bench.dilated_attention import DILATED_ATTENTION, attended_pairs, branch_markers, branches
from milkernels.bench.sweep import PASSES, flop_check
from milkernels.ops.dilated_attention import reference as semantics

TINY = {"H": 4, "dh": 8, "W_min": 16, "W_max": 64, "M": 3}   # segments [16, 32, 64] x rates [1, 2, 4]
# (N, H, dh, segments, rates): padding at the bag's end, rates that do not divide their segments (upstream's
# shifted layout), heads that do not split evenly into groups, a segment longer than the bag
ODD_CASES = [(77, 5, 8, [10, 24, 50], [1, 3, 4]), (300, 3, 8, [7, 64], [2, 5]), (40, 6, 4, [128, 16], [4, 2])]


def _case(n, heads, head_dim, segments, rates, dtype=torch.float64):
    generator = torch.Generator().manual_seed(n)
    qkv = [torch.randn((1, n, heads, head_dim), generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]
    return (*qkv, *branch_markers(segments, rates, "cpu"))


def _brute_pairs(n, heads, segments, rates):
    """The attended (query, key) pairs, enumerated on torchscale's padded layout position by position."""
    total = 0
    for segment, rate in zip(segments, rates):
        span = min(segment, n)
        rows = -(-span // rate)
        group_size = -(-heads // rate)
        for head in range(heads):
            group = head // group_size
            for start in range(0, n, span):  # one segment, padded to rows * rate positions
                kept = [j * rate + group for j in range(rows)]
                placed = [start // span * rows * rate + row for row in kept]
                total += sum(position < n for position in placed) * len(kept)
    return total


def test_op_is_registered_at_prov_gigapath_s_shape():
    ops = registry.ops()
    assert ops["dilated_attention"] is DILATED_ATTENTION
    assert branches(DILATED_ATTENTION.gpu_dims) == ([1024, 5792, 32768, 185363, 1048576], [1, 2, 4, 8, 16])
    assert (DILATED_ATTENTION.gpu_dims["H"], DILATED_ATTENTION.gpu_dims["dh"]) == (16, 48)
    assert branches(DILATED_ATTENTION.cpu_dims) == ([64, 128, 256], [1, 2, 4])
    assert branches(TINY) == ([16, 32, 64], [1, 2, 4])
    assert set(registry.impls(DILATED_ATTENTION)) >= {"reference", "reference_compiled", "triton", "sdpa_dense"}
    q, k, v, *markers = DILATED_ATTENTION.build(10, DILATED_ATTENTION.gpu_dims, torch.bfloat16, "cpu")
    assert q.shape == (1, 10, 16, 48) and q.dtype == torch.bfloat16 and q.requires_grad
    assert [marker.shape for marker in markers] == [(0, 1024, 1), (0, 5792, 2), (0, 32768, 4), (0, 185363, 8),
                                                    (0, 1048576, 16)]


@pytest.mark.parametrize("case", [(100, 4, 8, [16, 32, 64], [1, 2, 4])] + ODD_CASES, ids=str)
def test_reference_matches_the_op_in_fp64(case):
    inputs = _case(*case)
    want = registry.GENERIC_IMPLS["reference"](DILATED_ATTENTION)(*inputs)
    got = DILATED_ATTENTION.reference(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, inputs[:3], grad),
                               torch.autograd.grad(want, inputs[:3], grad), rtol=1e-10, atol=1e-12)


def test_reference_traces_whole_with_dynamic_n():
    """The sweep's reference_compiled: fullgraph, dynamic; two bag sizes on one graph, forward and backward."""
    compiled = torch.compile(DILATED_ATTENTION.reference, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (100, 150):
        inputs = DILATED_ATTENTION.build(n, TINY, torch.float64, torch.device("cpu"))
        got, want = compiled(*inputs), DILATED_ATTENTION.reference(*inputs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), inputs[:3]),
                                   torch.autograd.grad(want.sum(), inputs[:3]))


@pytest.mark.parametrize("case", [(n, 4, 8, [16, 32, 64], [1, 2, 4]) for n in (1, 5, 16, 50, 64, 100)] + ODD_CASES,
                         ids=str)
def test_flop_formula_counts_the_attended_pairs(case):
    n, heads, head_dim, segments, rates = case
    pairs = _brute_pairs(n, heads, segments, rates)
    assert attended_pairs(n, heads, segments, rates) == pairs
    # the same count from the semantics' own layout (reference.branch_rows): kept rows placed in the bag x keys
    from_layout = 0
    for segment, rate in zip(segments, rates):
        group_size = semantics.head_group_size(heads, rate)
        for group in range(rate):
            group_heads = max(0, min(group_size, heads - group * group_size))
            source, real, target = semantics.branch_rows(n, segment, rate, group, "cpu")
            from_layout += group_heads * int((target < n).sum()) * source.shape[1]
    assert from_layout == pairs


def test_flop_formula_matches_the_counter_and_the_byte_formula():
    dims, n = TINY, 128  # every segment full and every rate dividing it: no padding, no row computed and dropped
    assert flop_check(DILATED_ATTENTION, dims, n=n) == {"n": n, "fwd": 1.0, "fwd_bwd": 1.0}
    pairs = 4 * (128 * 16 + 128 * 32 // 4 + 128 * 64 // 16)  # H x N x span / r^2 per branch
    assert DILATED_ATTENTION.flops(n, dims, False) == 4 * 8 * pairs
    assert DILATED_ATTENTION.flops(n, dims, True) == 3 * 4 * 8 * pairs
    assert DILATED_ATTENTION.min_bytes(n, dims, 2, False) == 2 * 4 * n * 4 * 8
    assert DILATED_ATTENTION.min_bytes(n, dims, 2, True) == 2 * 11 * n * 4 * 8


def test_cpu_sweep_runs_end_to_end(tmp_path):
    impls = ("reference", "triton", "sdpa_dense")
    code = main(["sweep", "--ops", "dilated_attention", "--impls", ",".join(impls), "--sizes", "50,128",
                 "--dims", "H=4,dh=8,W_min=16,W_max=64,M=3", "--repeats", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(tmp_path), "--no-traffic"])  # the traffic columns: tests/test_bench.py (2 min here)
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["metadata"]["flop_check"]["dilated_attention"] == {"n": 128, "fwd": 1.0, "fwd_bwd": 1.0}
    rows = {(r["impl"], r["n"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {(impl, n, p) for impl in impls for n in (50, 128) for p in PASSES}
    for (impl, n, pass_), row in rows.items():
        assert row["dims"] == "H=4 dh=8 W_min=16 W_max=64 M=3"
        assert row["flops"] == DILATED_ATTENTION.flops(n, TINY, pass_ == "fwd_bwd")
        if impl == "triton":  # interpreted on the CPU once the kernel exists, else skipped with the reason
            assert row["status"] == "ok" or (row["status"] == "skipped" and row["reason"])
        else:
            assert row["status"] == "ok" and row["median_ms"] > 0, row


def test_sdpa_dense_is_dense_attention_and_skips_what_it_cannot_run(monkeypatch):
    q, k, v, *markers = _case(33, 2, 8, [8], [2])
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * 8 ** -0.5, dim=-1)
    torch.testing.assert_close(bench.sdpa_dense(q, k, v, *markers), torch.einsum("bhnm,bmhd->bnhd", weights, v))
    monkeypatch.setattr(bench, "FUSED_SDPA", (SDPBackend.CUDNN_ATTENTION,))  # no fused kernel on the CPU
    torch.testing.assert_close(bench.sdpa_dense(q, k, v, *markers), torch.einsum("bhnm,bmhd->bnhd", weights, v))
    monkeypatch.setattr(bench, "_free_bytes", lambda device: 1024)
    with pytest.raises(registry.Skip, match=r"^no memory-efficient SDPA kernel .* over the 0.0 GiB free"):
        bench.sdpa_dense(q, k, v, *markers)
    monkeypatch.setattr(bench, "DENSE_MAX_TFLOP", 1e-9)
    with pytest.raises(registry.Skip, match=r"^dense attention at N=33 is 0 TFLOP per forward, over this peer's cap"):
        bench.sdpa_dense(q, k, v, *markers)


def test_complexity_has_dilated_rows_on_the_cpu():
    cfg = complexity.ComplexityConfig(mechanisms=("dilated_torchscale", "dilated_milkernels"), sizes=(32, 64),
                                      dims={"C": 32, "H": 4}, dtype=torch.float32, device=torch.device("cpu"),
                                      repeats=1, warmup=0, budget_s=60.0, fit_min_n=1)
    rows = complexity.run_complexity(cfg, progress=lambda text: None)
    status = {(r["mechanism"], r["n"]): (r["status"], r["reason"]) for r in rows}
    assert all(status["dilated_torchscale", n] == ("ok", None) for n in (32, 64))
    for n in (32, 64):  # the Triton kernel, interpreted, once it exists
        assert status["dilated_milkernels", n][0] == "ok" or (status["dilated_milkernels", n][0] == "skipped"
                                                              and status["dilated_milkernels", n][1])
    fit = {f["mechanism"]: f for f in complexity.fits(rows, 1)}["dilated_torchscale"]
    assert fit["family"] == "dilated" and isinstance(fit["latency_exponent"], float)


def test_complexity_dilated_layers_agree():
    """The torchscale-style layer and milkernels' op (reference backend) on the same weights and bag."""
    torch.manual_seed(0)
    dims, device = {"C": 32, "H": 4}, torch.device("cpu")
    ours = complexity.make_dilated("reference")(dims, torch.float64, device)
    theirs = complexity.make_dilated(None)(dims, torch.float64, device)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 300, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    assert complexity.DILATED_BRANCHES["cpu"] == ((128, 256, 512, 1024), (1, 2, 4, 8))
