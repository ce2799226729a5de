"""The benchmark spine: a tiny sweep end to end, its math, and how it records failures."""

import argparse
import csv
import dataclasses
import json
import os
import socket
import sys
import types

import pytest
import torch

from milkernels import BackendUnavailable
from milkernels.bench import registry, traffic
from milkernels.bench.__main__ import build_parser, config_from_args, main, parse_size
from milkernels.bench import linear_attention as bench_linear
from milkernels.bench.gated_attention import GATED_ATTENTION
from milkernels.bench.linear_attention import LIN_MIL_LAYER, LINEAR_ATTENTION_CORE
from milkernels.bench.roofline import device_peak, floor_seconds, math_mode, roofline_pct
from milkernels.bench.report import format_table
from milkernels.bench.sweep import COLUMNS, PASSES, SweepConfig, add_ratios, flag_noisy, flop_check, run_sweep
from milkernels.bench.timing import percentile, relative_spread, summarize

TINY_DIMS = {"L": 32, "D": 16, "K": 1}
TINY_ARGS = ["--sizes", "64", "--dims", "L=32,D=16,K=1", "--repeats", "2", "--warmup", "1"]
METADATA_KEYS = {"date_utc", "device", "torch", "triton", "python", "cuda", "git_sha", "git_dirty", "dtype",
                 "sizes", "dims", "timer", "peak_memory", "roofline", "flop_check"}


def _read_csv(path):
    lines = path.read_text().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    return meta, list(csv.DictReader(line for line in lines if not line.startswith("#")))


def _tiny_config(device, impls, sizes=(64,)):
    return SweepConfig(ops=("gated_attention",), impls=impls, sizes=sizes, dtype=torch.float32, device=device,
                       dims=TINY_DIMS, repeats=2, warmup=1, peak=None)


def test_tiny_sweep_writes_csv_and_json(tmp_path, device):
    code = main(["sweep", "--ops", "gated_attention", *TINY_ARGS, "--impls", "reference,triton",
                 "--device", device.type, "--peak-tflops", "1", "--peak-gbps", "1", "--out", str(tmp_path)])
    assert code == 0
    meta, rows = _read_csv(tmp_path / "results.csv")
    result = json.loads((tmp_path / "results.json").read_text())
    assert METADATA_KEYS <= set(meta) and METADATA_KEYS <= set(result["metadata"])
    assert result["columns"] == list(COLUMNS) and list(rows[0]) == list(COLUMNS)
    assert result["metadata"]["torch"] == torch.__version__
    assert not any("host" in key for key in result["metadata"])
    if len(socket.gethostname()) >= 6:  # a short name such as "vm" can occur in other text by chance
        assert socket.gethostname() not in (tmp_path / "results.csv").read_text()
    by_key = {(r["impl"], r["pass"]): r for r in result["rows"]}
    assert set(by_key) == {(impl, p) for impl in ("reference", "triton") for p in ("fwd", "fwd_bwd")}
    for pass_ in ("fwd", "fwd_bwd"):
        ref = by_key["reference", pass_]
        assert ref["status"] == "ok" and ref["n"] == 64 and ref["dims"] == "L=32 D=16 K=1"
        assert 0 < ref["p20_ms"] <= ref["median_ms"] <= ref["p80_ms"]
        assert ref["speedup_vs_eager"] == 1.0
        assert ref["flops"] == GATED_ATTENTION.flops(64, TINY_DIMS, pass_ == "fwd_bwd")
        assert ref["tflops"] == pytest.approx(ref["flops"] / (ref["median_ms"] * 1e9))
        assert ref["roofline_pct"] == pytest.approx(100 * ref["floor_ms"] / ref["median_ms"])
        assert (ref["peak_mem_mib"] is None) == (device.type == "cpu")
        triton_row = by_key["triton", pass_]
        assert triton_row["status"] == "ok" or (triton_row["status"] == "skipped" and triton_row["reason"])
        assert ref["kernel_traffic"] is None and ref["kernel_recompute"] is None
        assert triton_row["kernel_traffic"] > 1 and 0 < triton_row["kernel_recompute"] <= 1.3, triton_row


def test_kernel_factors_count_the_triton_kernels():
    """The sweep's traffic columns: the gated forward at L = 256, D = 64 requests more than the op's minimum
    (its score kernel re-reads the weights per row block) and its dot FLOPs are the projections' (the
    op's FLOPs also count the small head and pooling products, which run without dots)."""
    factors = traffic.factors_in_subprocess("gated_attention", 512, {"L": 256, "D": 64, "K": 1}, torch.float32)
    projections = 4 * 512 * 256 * 64
    assert factors["fwd"]["kernel_recompute"] == pytest.approx(projections / GATED_ATTENTION.flops(
        512, {"L": 256, "D": 64, "K": 1}, False))
    assert 1 < factors["fwd"]["kernel_traffic"] < 10
    assert set(factors["fwd_bwd"]) == {"kernel_traffic", "kernel_recompute"}


def test_cpu_defaults_have_no_roofline():
    cfg = config_from_args(build_parser().parse_args(["sweep", "--device", "cpu"]))
    assert cfg.peak is None and cfg.dtype == torch.float32 and cfg.sizes == (1024, 4096, 16384)
    assert "reference_compiled" in cfg.impls
    no_compile = config_from_args(build_parser().parse_args(["sweep", "--device", "cpu", "--no-compile"]))
    assert "reference_compiled" not in no_compile.impls
    with pytest.raises(SystemExit, match="names Q, which no selected op has"):
        config_from_args(build_parser().parse_args(["sweep", "--device", "cpu", "--dims", "Q=3"]))


def _raising(exc):
    """An implementation maker whose implementation raises ``exc``."""
    def run(*inputs):
        raise exc
    return lambda op: run


def _fake_op(monkeypatch, **fields):
    """Gated attention registered as ``bench_test_op``, with ``fields`` replaced."""
    op = dataclasses.replace(GATED_ATTENTION, name="bench_test_op", **fields)
    monkeypatch.setitem(registry._OPS, op.name, op)
    return op


def test_unavailable_oom_and_broken_impls_are_recorded_and_the_sweep_goes_on(monkeypatch):
    op = _fake_op(monkeypatch, peers={
        "absent": _raising(BackendUnavailable("absent needs a GPU")),
        "cannot": _raising(registry.Skip("cannot run this case")),
        "uninstalled": _raising(ModuleNotFoundError("No module named 'peer_lib'")),
        "oom": _raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")),
        "broken": _raising(ValueError("bad kernel\nsecond line of the message")),
    })
    impls = ("absent", "cannot", "uninstalled", "oom", "broken", "reference")
    cfg = dataclasses.replace(_tiny_config(torch.device("cpu"), impls, (32, 64)), ops=(op.name,))
    rows = run_sweep(cfg)
    assert len(rows) == 2 * len(impls) * 2
    status = {(r["impl"], r["n"], r["pass"]): (r["status"], r["reason"]) for r in rows}
    for n in (32, 64):
        for pass_ in ("fwd", "fwd_bwd"):
            assert status["absent", n, pass_] == ("skipped", "absent needs a GPU")
            assert status["cannot", n, pass_] == ("skipped", "cannot run this case")
            assert status["uninstalled", n, pass_] == ("skipped", "ImportError: No module named 'peer_lib'")
            assert status["oom", n, pass_][0] == "oom"
            assert status["broken", n, pass_] == ("error", "ValueError: bad kernel")
            assert status["reference", n, pass_][0] == "ok"
    assert all(r["median_ms"] is None and r["speedup_vs_eager"] is None and r["noisy"] is None
               for r in rows if r["impl"] != "reference")


def test_an_error_exits_1_with_its_traceback_and_stderr_in_the_log(monkeypatch, tmp_path, capfd):
    def chatty_broken_kernel(*inputs):
        print("inductor-like log line", file=sys.stderr)
        os.write(2, b"native stderr line\n")
        raise ValueError("bad kernel\nsecond line of the message")

    _fake_op(monkeypatch, peers={"broken": lambda op: chatty_broken_kernel})
    code = main(["sweep", "--ops", "bench_test_op", *TINY_ARGS, "--impls", "reference,broken", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 1
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["impl"], r["status"]) for r in rows} == {("reference", "ok"), ("broken", "error")}
    assert {r["reason"] for r in rows if r["status"] == "error"} == {"ValueError: bad kernel"}
    log = (tmp_path / "sweep.log").read_text()
    assert "== bench_test_op broken N=64 fwd_bwd" in log
    assert log.count("Traceback (most recent call last)") == 2 and "in chatty_broken_kernel" in log
    assert log.count("inductor-like log line") == log.count("native stderr line") == 2
    out, err = capfd.readouterr()
    assert "bench_test_op broken N=64 fwd: error: ValueError: bad kernel" in err
    assert not any(text in err for text in ("Traceback", "second line", "inductor-like", "native stderr"))
    assert f"2 rows failed with an error; their tracebacks are in {tmp_path / 'sweep.log'}" in out


def test_a_compile_failure_is_an_error_with_its_reason(monkeypatch):
    def breaks(*inputs):
        torch._dynamo.graph_break()
        return GATED_ATTENTION.reference(*inputs)

    op = _fake_op(monkeypatch, reference=breaks)
    cfg = dataclasses.replace(_tiny_config(torch.device("cpu"), ("reference_compiled",), (16,)), ops=(op.name,))
    rows = run_sweep(cfg)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all(r["reason"].startswith("Unsupported: ") and "\n" not in r["reason"] for r in rows)


def _timed_row(impl, pass_, median, p20, p80, status="ok"):
    return {**dict.fromkeys(COLUMNS), "op": "op", "impl": impl, "n": 8, "pass": pass_, "status": status,
            "median_ms": median, "p20_ms": p20, "p80_ms": p80}


def test_noisy_rows_are_flagged_with_the_reason():
    rows = [_timed_row("steady", "fwd", 1.0, 0.95, 1.05), _timed_row("steady", "fwd_bwd", 3.0, 2.9, 3.1),
            _timed_row("spread", "fwd", 1.0, 0.8, 1.3), _timed_row("spread", "fwd_bwd", 3.0, 2.9, 3.1),
            _timed_row("inverted", "fwd", 2.0, 1.9, 2.1), _timed_row("inverted", "fwd_bwd", 1.5, 1.4, 1.6),
            {**_timed_row("absent", "fwd", None, None, None, "skipped"), "reason": "needs a GPU"}]
    flag_noisy(rows)
    noisy = {(r["impl"], r["pass"]): (r["noisy"], r["reason"]) for r in rows}
    assert noisy["steady", "fwd"] == noisy["steady", "fwd_bwd"] == noisy["spread", "fwd_bwd"] == (False, None)
    assert noisy["spread", "fwd"] == (True, "p20-p80 spread 50% of the median")
    inverted = (True, "fwd_bwd measured faster than fwd (1.500 < 2.000 ms)")
    assert noisy["inverted", "fwd"] == noisy["inverted", "fwd_bwd"] == inverted
    assert noisy["absent", "fwd"] == (None, "needs a GPU")
    meta = {"device": "cpu", "torch": "t", "triton": "t", "git_sha": "0" * 40, "roofline": "n/a",
            "peak_memory": "n/a", "dims": {"op": "L=1"}, "dtype": "float32", "repeats": 5, "warmup": 2,
            "flop_check": {"op": {"n": 8, "fwd": 1.0, "fwd_bwd": 1.0}}}
    table = format_table(rows, meta).splitlines()
    assert table[-7].endswith("  ok") and table[-5].endswith("  ok noisy: p20-p80 spread 50% of the median")
    assert table[-1].endswith("  skipped: needs a GPU")


def test_reference_matches_the_public_op():
    inputs = GATED_ATTENTION.build(50, {"L": 24, "D": 8, "K": 2}, torch.float32, torch.device("cpu"))
    expected = registry.GENERIC_IMPLS["reference"](GATED_ATTENTION)(*inputs)
    for got, want in zip(GATED_ATTENTION.reference(*inputs), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_percentiles():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 20) == pytest.approx(1.8)
    assert percentile(values, 50) == 3.0
    assert percentile(values, 80) == pytest.approx(4.2)
    assert (percentile(values, 0), percentile(values, 100)) == (1.0, 5.0)
    assert percentile([1.0, 2.0], 50) == 1.5
    assert summarize([7.0]) == {"median_ms": 7.0, "p20_ms": 7.0, "p80_ms": 7.0}
    assert relative_spread(summarize(values)) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_roofline_floor_and_percent():
    peak = device_peak("NVIDIA H100 80GB HBM3", tflops=1000.0, gbps=2000.0)
    compute_bound = floor_seconds(2e12, 1e9, peak, torch.bfloat16)
    assert compute_bound == pytest.approx(2e-3)
    assert roofline_pct(compute_bound, 4e-3) == pytest.approx(50.0)
    assert floor_seconds(1e9, 4e9, peak, torch.bfloat16) == pytest.approx(2e-3)
    assert floor_seconds(1e9, 4e9, peak, torch.float64) is None


def test_device_peaks():
    assert device_peak("NVIDIA H100 80GB HBM3").gbps == 3350
    assert device_peak("NVIDIA H100 80GB HBM3").tflops["bf16"] == pytest.approx(989.4)
    assert device_peak("NVIDIA H100 PCIe").gbps == 2000
    assert device_peak("NVIDIA H200").gbps == 4800
    assert device_peak("NVIDIA A100-SXM4-80GB").tflops["bf16"] == 312
    assert device_peak("cpu (x86_64, 2 cores, 2 torch threads)") is None
    assert device_peak("cpu", tflops=10.0) is None
    assert device_peak("cpu", tflops=10.0, gbps=50.0).tflops == {"bf16": 10.0, "tf32": 10.0, "fp32": 10.0}
    assert device_peak("NVIDIA H200", gbps=4000.0).tflops["bf16"] == pytest.approx(989.4)


def test_math_mode_follows_float32_precision():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert math_mode(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert math_mode(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert math_mode(torch.bfloat16) == math_mode(torch.float16) == "bf16"


@pytest.mark.parametrize("dims", [TINY_DIMS, {"L": 40, "D": 24, "K": 3}])
def test_flop_formula_matches_the_counter(dims):
    assert flop_check(GATED_ATTENTION, dims, n=48) == {"n": 48, "fwd": 1.0, "fwd_bwd": 1.0}


def test_flop_and_byte_formulas():
    forward = 2 * 64 * 32 * 16 * 2 + 2 * 64 * 16 + 2 * 64 * 32
    assert GATED_ATTENTION.flops(64, TINY_DIMS, False) == forward == 137216
    assert GATED_ATTENTION.flops(64, TINY_DIMS, True) == 3 * forward
    x, weights, outputs = 64 * 32, 2 * 16 * 32 + 2 * 16 + 16 + 1, 32 + 64
    assert GATED_ATTENTION.min_bytes(64, TINY_DIMS, 2, False) == 2 * (x + weights + outputs)
    assert GATED_ATTENTION.min_bytes(64, TINY_DIMS, 2, True) == 2 * (3 * x + 3 * weights + 2 * outputs)


def test_ratios_against_eager():
    def row(impl, median, memory, status="ok"):
        return {"op": "op", "n": 8, "pass": "fwd", "impl": impl, "status": status, "median_ms": median,
                "peak_mem_mib": memory, "speedup_vs_eager": None, "mem_ratio_vs_eager": None}

    rows = [row("reference", 4.0, 100.0), row("triton", 2.0, 50.0), row("cuda", None, None, "skipped")]
    add_ratios(rows)
    assert [(r["speedup_vs_eager"], r["mem_ratio_vs_eager"]) for r in rows] == [(1.0, 1.0), (2.0, 0.5), (None, None)]


def test_sizes_parse():
    assert [parse_size(text) for text in ("1k", "16K", "1M", "100000")] == [1024, 16384, 2**20, 100000]
    for bad in ("", "k", "1.5k", "0", "-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


LINEAR_DIMS = {"C": 32, "H": 4}


def test_linear_attention_ops_are_registered_and_swept(tmp_path):
    ops = registry.ops()
    assert {"linear_attention_core", "lin_mil_layer"} <= set(ops)
    assert set(registry.impls(ops["lin_mil_layer"])) >= {"reference", "triton", "lin_mil", "lin_mil_swapped"}
    code = main(["sweep", "--ops", "linear_attention_core,lin_mil_layer", "--impls", "reference,triton,lin_mil",
                 "--sizes", "64", "--dims", "C=32,H=4", "--repeats", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["op"], r["impl"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {("linear_attention_core", impl, p) for impl in ("reference", "triton") for p in PASSES} | \
        {("lin_mil_layer", impl, p) for impl in ("reference", "triton", "lin_mil") for p in PASSES}
    for op in ("linear_attention_core", "lin_mil_layer"):
        assert result["metadata"]["flop_check"][op] == {"n": 128, "fwd": 1.0, "fwd_bwd": 1.0}
        for pass_ in PASSES:
            ref = rows[op, "reference", pass_]
            assert ref["status"] == "ok" and ref["dims"] == "C=32 H=4" and ref["median_ms"] > 0
            assert ref["flops"] == ops[op].flops(64, LINEAR_DIMS, pass_ == "fwd_bwd")
    for key in (("linear_attention_core", "triton"), ("lin_mil_layer", "triton"), ("lin_mil_layer", "lin_mil")):
        row = rows[(*key, "fwd_bwd")]
        assert row["status"] == "ok" or (row["status"] == "skipped" and row["reason"])


def test_linear_attention_formulas():
    dh = 32 // 4
    core = 4 * 64 * 32 * dh + 2 * 64 * 32
    assert LINEAR_ATTENTION_CORE.flops(64, LINEAR_DIMS, False) == core == 69632
    assert LINEAR_ATTENTION_CORE.flops(64, LINEAR_DIMS, True) == 3 * core
    assert LIN_MIL_LAYER.flops(64, LINEAR_DIMS, False) == core + 8 * 64 * 32 * 32
    assert LIN_MIL_LAYER.flops(64, LINEAR_DIMS, True) == 3 * (core + 8 * 64 * 32 * 32)
    n_c = 64 * 32
    assert LINEAR_ATTENTION_CORE.min_bytes(64, LINEAR_DIMS, 2, False) == 2 * (4 * n_c + 4)  # q, k, v in; out
    assert LINEAR_ATTENTION_CORE.min_bytes(64, LINEAR_DIMS, 2, True) == 2 * (11 * n_c + 3 * 4)
    weights = 4 * 32 * 32 + 32 + 4
    assert LIN_MIL_LAYER.min_bytes(64, LINEAR_DIMS, 4, True) == 4 * (5 * n_c + 3 * weights)


@pytest.mark.parametrize("op", [LINEAR_ATTENTION_CORE, LIN_MIL_LAYER], ids=lambda op: op.name)
def test_linear_attention_reference_matches_the_public_op_and_the_counter(op):
    inputs = op.build(40, LINEAR_DIMS, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(op.reference(*inputs), registry.GENERIC_IMPLS["reference"](op)(*inputs))
    assert flop_check(op, {"C": 48, "H": 3}, n=40) == {"n": 40, "fwd": 1.0, "fwd_bwd": 1.0}


def test_lin_mil_peers_run_lin_mil_s_module(monkeypatch):
    class LinearAttention(torch.nn.Module):  # Lin-MIL's signature: (dim, num_heads), returns (x, numerator)
        def __init__(self, dim, num_heads=8):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)
            self.num_heads = num_heads

        def forward(self, x):
            return self.proj(x), x

    fake = types.ModuleType("fake_lin_mil")
    fake.LinearAttention = LinearAttention
    monkeypatch.setitem(sys.modules, "fake_lin_mil", fake)
    monkeypatch.setattr(bench_linear, "LIN_MIL_MODULE", "fake_lin_mil")
    inputs = LIN_MIL_LAYER.build(16, LINEAR_DIMS, torch.float32, torch.device("cpu"))
    out = LIN_MIL_LAYER.peers["lin_mil"](LIN_MIL_LAYER)(*inputs)
    assert out.shape == (1, 16, 32)
    with pytest.raises(registry.Skip, match="does not fuse LinearAttention"):
        LIN_MIL_LAYER.peers["lin_mil_swapped"](LIN_MIL_LAYER)(*inputs)
    monkeypatch.setattr(bench_linear, "LIN_MIL_MODULE", "no_such_lin_mil")
    with pytest.raises(registry.Skip, match="^cannot import no_such_lin_mil"):
        LIN_MIL_LAYER.peers["lin_mil"](LIN_MIL_LAYER)(*inputs)


def test_world_size_sweeps_the_sequence_parallel_ops_on_spawned_ranks(tmp_path):
    """``--world-size 2`` on the CPU: gloo ranks, one bag split across them; every op and pass is ok, with its
    slowest rank's latency and the bytes its collectives moved (the backward's added to the forward's)."""
    ops = "gated_attention,litemil_pool,linear_attention_core,dilated_attention"
    code = main(["sweep", "--world-size", "2", "--ops", ops, "--impls", "reference", "--sizes", "64", "--repeats",
                 "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    meta, rows = _read_csv(tmp_path / "sharded.csv")
    assert meta["world_size"] == "2"
    by_key = {(row["op"], row["pass"]): row for row in rows}
    assert set(by_key) == {(op, p) for op in ops.split(",") for p in ("fwd", "fwd_bwd")}
    for op in ops.split(","):
        forward, both = by_key[op, "fwd"], by_key[op, "fwd_bwd"]
        assert forward["status"] == both["status"] == "ok", (forward, both)
        assert 0 < float(forward["median_ms"]) and 0 < int(forward["comm_bytes"]) < int(both["comm_bytes"])
