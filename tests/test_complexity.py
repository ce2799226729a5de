"""The complexity sweep: outputs, the exponent fit, the stop logic and the skips."""

import csv
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import torch

from milkernels import BackendUnavailable
from milkernels.bench import complexity, timm_stub
from milkernels.bench.__main__ import COMPLEXITY_GPU, build_parser, complexity_config, main
from milkernels.bench.complexity import COLUMNS, FIT_COLUMNS, ComplexityConfig, Mechanism, fit_exponent, fits, is_oom

TINY = {"C": 32, "H": 4}
GPU_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


@pytest.fixture(autouse=True, scope="module")
def warm_autograd():
    """Pays the process's first backward (up to a second on a busy CPU), which the small budgets below must not."""
    x = torch.ones(1, 2, 4, requires_grad=True)
    complexity.fwd_bwd_step(lambda y: y * 2, (x,), [torch.ones(1, 2, 4)])()


def _config(mechanisms, sizes, budget_s=60.0, repeats=2, device="cpu"):
    return ComplexityConfig(mechanisms=tuple(mechanisms), sizes=tuple(sizes), dims=TINY, dtype=torch.float32,
                            device=torch.device(device), repeats=repeats, warmup=0, budget_s=budget_s, fit_min_n=1)


def _fake(monkeypatch, name, forward):
    """Register a mechanism whose layer is ``forward(x)``; returns the list of N it was called at."""
    calls = []

    def make(dims, dtype, device):
        def layer(x):
            calls.append(x.shape[1])
            return forward(x)
        return layer

    monkeypatch.setitem(complexity.MECHANISMS, name, Mechanism(name, "fake", make))
    return calls


def test_tiny_sweep_writes_csv_json_png_and_md(tmp_path):
    mechanisms = ("softmax_sdpa_math", "linear_reference", "dilated_torchscale")
    code = main(["complexity", "--mechanisms", ",".join(mechanisms), "--sizes", "32,64,128", "--dims", "C=32,H=4",
                 "--repeats", "2", "--warmup", "0", "--fit-min-n", "32", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "complexity.json").read_text())
    assert result["columns"] == list(COLUMNS)
    meta = result["metadata"]
    assert {"device", "torch", "triton", "git_sha", "dtype", "sizes", "dims", "budget_s", "fit_min_n", "fit"} <= set(meta)
    assert meta["torch"] == torch.__version__ and meta["sizes"] == [32, 64, 128]
    lines = (tmp_path / "complexity.csv").read_text().splitlines()
    assert any(line.startswith("# git_sha: ") for line in lines)
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 3 * 3
    status = {(r["mechanism"], int(r["n"])): r["status"] for r in rows}
    assert all(status[name, n] == "ok" for name in mechanisms for n in (32, 64, 128))
    fitted = {fit["mechanism"]: fit for fit in result["fits"]}
    assert list(result["fits"][0]) == list(FIT_COLUMNS) and set(fitted) == set(mechanisms)
    for name in mechanisms:
        assert fitted[name]["fit_points"] == 3 and fitted[name]["fit_min_n"] == 32
        assert isinstance(fitted[name]["latency_exponent"], float) and fitted[name]["memory_exponent"] is None
    assert (tmp_path / "complexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "complexity.md").read_text()
    assert "| mechanism | N=32 | N=64 | N=128 | time exp | mem exp | stop / skip |" in markdown
    assert all(f"| {name} |" in markdown for name in mechanisms)


@pytest.mark.parametrize("exponent", [1.0, 2.0, 0.5])
def test_fit_recovers_known_exponents(exponent):
    sizes = [1024, 4096, 16384, 65536]
    fit = fit_exponent(sizes, [3e-4 * n ** exponent for n in sizes])
    assert fit["exponent"] == pytest.approx(exponent)
    assert (fit["min_n"], fit["max_n"], fit["points"]) == (1024, 65536, 4)


def test_fit_leaves_out_the_floor_and_missing_points():
    sizes = [64, 256, 1024, 4096, 16384]
    floored = [max(5.0, 1e-3 * n) for n in sizes]  # a launch-overhead floor up to N = 5000
    assert fit_exponent(sizes, floored)["exponent"] < 0.7
    fit = fit_exponent(sizes + [65536], floored + [None], min_n=8192)
    assert fit is None  # one point left at N >= 8k
    assert fit_exponent([1024, 16384, 65536], [None, 2.0, 8.0])["exponent"] == pytest.approx(1.0)
    assert fit_exponent([], []) is None


def test_oom_stops_the_mechanism(monkeypatch):
    def forward(x):
        if x.shape[1] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return x * 2
    calls = _fake(monkeypatch, "fake_oom", forward)
    rows = complexity.run_complexity(_config(["fake_oom"], (8, 16, 64, 128)), progress=lambda text: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "oom", "stopped"]
    assert rows[3]["reason"] == "oom at N=64" and rows[3]["median_ms"] is None
    assert 128 not in calls and 64 in calls
    assert fits(rows, 1)[0]["stop"] == "oom at N=64"


def test_a_runtime_error_saying_out_of_memory_is_an_oom(monkeypatch):
    def forward(x):
        if x.shape[1] >= 16:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
        return x * 2
    _fake(monkeypatch, "fake_cpu_oom", forward)
    rows = complexity.run_complexity(_config(["fake_cpu_oom"], (8, 16, 32)), progress=lambda text: None)
    assert [r["status"] for r in rows] == ["ok", "oom", "stopped"]
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_oom(ValueError("out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_a_point_predicted_over_budget_is_not_run(monkeypatch):
    def forward(x):
        time.sleep(x.shape[1] * 5e-4)  # 4 ms at N = 8, 8 ms at N = 16, 128 ms at N = 256
        return x * 2
    calls = _fake(monkeypatch, "fake_slow", forward)
    rows = complexity.run_complexity(_config(["fake_slow"], (8, 16, 256, 512), budget_s=0.05, repeats=3),
                                     progress=lambda text: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "over_budget", "stopped"]
    assert rows[2]["reason"].startswith("one call predicted to take") and rows[3]["reason"] == "over budget at N=256"
    assert 256 not in calls and 512 not in calls  # 8 ms x 16 (at least linear) > 50 ms
    assert rows[1]["repeats"] >= 1 and rows[1]["median_ms"] >= 8


def test_prediction_scales_the_last_point_by_the_local_slope_clipped_to_one_and_two():
    def ok(n, ms):
        return {"n": n, "median_ms": ms}
    assert complexity.predicted_call_s([], 1024) is None
    assert complexity.predicted_call_s([ok(1024, 10.0)], 4096) == pytest.approx(0.16)  # quadratic with one point
    assert complexity.predicted_call_s([ok(1024, 10.0), ok(4096, 40.0)], 16384) == pytest.approx(0.16)  # linear
    assert complexity.predicted_call_s([ok(1024, 10.0), ok(4096, 10.0)], 16384) == pytest.approx(0.04)  # a floor: at least linear
    assert complexity.predicted_call_s([ok(1024, 1.0), ok(2048, 8.0)], 4096) == pytest.approx(0.032)  # at most quadratic


def test_a_first_call_over_the_budget_ends_the_point_and_the_mechanism(monkeypatch):
    def forward(x):
        time.sleep(0.06)
        return x * 2
    calls = _fake(monkeypatch, "fake_slow_start", forward)
    rows = complexity.run_complexity(_config(["fake_slow_start"], (8, 16), budget_s=0.05), progress=lambda text: None)
    assert [r["status"] for r in rows] == ["over_budget", "stopped"]
    assert rows[0]["reason"].startswith("one call took") and calls == [8]


def test_a_first_call_over_half_the_budget_is_the_only_sample(monkeypatch):
    def forward(x):
        time.sleep(0.15)
        return x * 2
    calls = _fake(monkeypatch, "fake_steady", forward)
    cfg = _config(["fake_steady"], (8,), budget_s=0.25, repeats=5)
    row, = complexity.run_complexity(cfg, progress=lambda text: None)
    assert calls == [8] and row["status"] == "ok" and row["repeats"] == 1
    assert row["median_ms"] >= 150 and row["point_s"] < 0.25


def test_a_slow_first_call_is_timed_again_when_a_second_fits(monkeypatch):
    """A first call over a third of the budget (it compiles the kernels) is followed by a second, the sample."""
    def forward(x):
        time.sleep(0.2 if len(calls) == 1 else 0.025)
        return x * 2
    calls = _fake(monkeypatch, "fake_compiling", forward)
    cfg = _config(["fake_compiling"], (8,), budget_s=0.5, repeats=5)
    row, = complexity.run_complexity(cfg, progress=lambda text: None)
    assert calls == [8, 8] and row["status"] == "ok" and row["repeats"] == 1
    assert 25 <= row["median_ms"] < 200


def test_the_peak_memory_is_that_of_the_first_call_and_the_repeats_fit_the_budget(monkeypatch):
    calls = _fake(monkeypatch, "fake_fast", lambda x: x * 2)
    peaks = []

    def peak_memory_mib(step, device):  # stands in for the GPU's: measures the call it makes
        step()
        peaks.append(len(calls))
        return 42.0
    monkeypatch.setattr(complexity, "peak_memory_mib", peak_memory_mib)
    rows = complexity.run_complexity(_config(["fake_fast"], (8, 16), repeats=3), progress=lambda text: None)
    assert [r["peak_mem_mib"] for r in rows] == [42.0, 42.0] and [r["repeats"] for r in rows] == [3, 3]
    assert calls == [8] * 4 + [16] * 4 and peaks == [1, 5]  # the first call of each point, then 3 repeats


def test_a_point_that_ran_over_the_budget_is_kept_and_the_next_ones_are_not_run(monkeypatch):
    def forward(x):  # the first call is quick, the next ones are not
        time.sleep(0.015 if calls[1:] else 0.001)
        return x * 2
    calls = _fake(monkeypatch, "fake_slowing", forward)
    rows = complexity.run_complexity(_config(["fake_slowing"], (8, 16), budget_s=0.04, repeats=3),
                                     progress=lambda text: None)
    assert [r["status"] for r in rows] == ["ok", "stopped"]  # 1 ms, then 3 x 15 ms > 40 ms
    assert rows[0]["point_s"] > 0.04 and rows[1]["reason"] == "over budget at N=8" and 16 not in calls


def test_the_outputs_are_written_after_every_point(monkeypatch, tmp_path):
    seen = []

    def forward(x):  # what the files hold when each point starts
        files = {ext: tmp_path / f"complexity.{ext}" for ext in ("csv", "json", "md", "png")}
        json_rows = [(r["mechanism"], r["n"]) for r in json.loads(files["json"].read_text())["rows"]] \
            if files["json"].exists() else []
        csv_rows = files["csv"].read_text().count("\nfake_") if files["csv"].exists() else 0
        md_rows = files["md"].read_text().count("\n| fake_") if files["md"].exists() else 0
        seen.append((x.shape[1], json_rows, csv_rows, md_rows, files["png"].exists()))
        return x * 2
    for name in ("fake_a", "fake_b"):
        _fake(monkeypatch, name, forward)
    args = ["complexity", "--mechanisms", "fake_a,fake_b", "--sizes", "8,16", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    firsts = seen[::2]  # each point's first call (then one repeat)
    assert [(n, rows) for n, rows, *_ in firsts] == [
        (8, []), (16, [("fake_a", 8)]), (8, [("fake_a", 8), ("fake_a", 16)]),
        (16, [("fake_a", 8), ("fake_a", 16), ("fake_b", 8)])]
    assert [(csv_rows, md_rows) for _, _, csv_rows, md_rows, _ in firsts] == [(0, 0), (1, 1), (2, 1), (3, 2)]
    assert [png for *_, png in firsts] == [False, False, True, True]  # the plot after each mechanism
    assert "| fake_b |" in (tmp_path / "complexity.md").read_text()


def test_an_interrupt_keeps_the_rows_so_far_and_fails_the_command(monkeypatch, tmp_path):
    def forward(x):
        if x.shape[1] == 16:
            raise KeyboardInterrupt
        return x * 2
    _fake(monkeypatch, "fake_cut", forward)
    calls = _fake(monkeypatch, "fake_after", lambda x: x * 2)
    args = ["complexity", "--mechanisms", "fake_cut,fake_after", "--sizes", "8,16,32", "--repeats", "1",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 130
    result = json.loads((tmp_path / "complexity.json").read_text())
    assert [(r["mechanism"], r["n"], r["status"]) for r in result["rows"]] == [("fake_cut", 8, "ok"),
                                                                               ("fake_cut", 16, "interrupted")]
    assert result["fits"][0]["stop"] == "interrupted at N=16" and calls == []
    assert (tmp_path / "complexity.png").exists() and "| fake_cut | " in (tmp_path / "complexity.md").read_text()


def test_an_error_stops_the_mechanism_and_fails_the_command(monkeypatch, tmp_path):
    def forward(x):
        raise ValueError("bad kernel")
    _fake(monkeypatch, "fake_broken", forward)
    args = ["complexity", "--mechanisms", "fake_broken", "--sizes", "8,16", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 1
    rows = json.loads((tmp_path / "complexity.json").read_text())["rows"]
    assert [(r["status"], r["reason"]) for r in rows] == [("error", "ValueError: bad kernel"),
                                                          ("stopped", "error at N=8")]


def test_unavailable_mechanisms_are_skipped_with_reasons(monkeypatch):
    def unavailable(dims, dtype, device):
        raise BackendUnavailable("needs a GPU")
    monkeypatch.setitem(complexity.MECHANISMS, "fake_absent", Mechanism("fake_absent", "fake", unavailable))
    names = ["fake_absent", "softmax_flash_attn", "softmax_xformers"]
    rows = complexity.run_complexity(_config(names, (8, 16)), progress=lambda text: None)
    reason = {(r["mechanism"], r["n"]): (r["status"], r["reason"]) for r in rows}
    for n in (8, 16):
        assert reason["fake_absent", n] == ("skipped", "needs a GPU")
        for name, module in (("softmax_flash_attn", "flash_attn"), ("softmax_xformers", "xformers")):
            if importlib.util.find_spec(module) is None:
                assert reason[name, n][0] == "skipped" and "is not installed" in reason[name, n][1]
            else:  # installed: on the CPU it still cannot run
                assert reason[name, n][0] == "skipped" and "CUDA GPU" in reason[name, n][1]
    assert {fit["mechanism"]: fit["stop"] for fit in fits(rows, 1)}["fake_absent"] == "skipped: needs a GPU"


def test_nystrom_lin_mil_and_milkernels_run_at_tiny_sizes(device):
    """Under the test set-up (conftest) the Triton kernels run: interpreted on the CPU, natively on a GPU."""
    pytest.importorskip("nystrom_attention")
    with timm_stub.installed():
        pytest.importorskip("lin_mil", reason="lin-mil is not importable even with the timm stand-in")
    names = ("linear_milkernels", "linear_lin_mil", "nystrom")
    rows = complexity.run_complexity(_config(names, (64, 128), repeats=1, device=device.type),
                                     progress=lambda text: None)
    assert [(r["mechanism"], r["n"], r["status"], r["reason"]) for r in rows] == [
        (name, n, "ok", None) for name in names for n in (64, 128)]
    assert all(r["median_ms"] > 0 and r["repeats"] == 1 for r in rows)


def test_nystrom_layer_runs_forward_and_backward():
    pytest.importorskip("nystrom_attention")
    layer = complexity.make_nystrom(TINY, torch.float32, torch.device("cpu"))
    x = torch.randn(1, 300, 32, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (1, 300, 32) and x.grad is not None
    assert layer.num_landmarks == 256 and layer.pinv_iterations == 6 and layer.residual


def test_nystrom_layer_runs_in_bf16_under_autocast():
    """A bf16 NystromAttention fails in its pseudo-inverse (fp32 identity); the mechanism runs it mixed."""
    pytest.importorskip("nystrom_attention")
    layer = complexity.make_nystrom(TINY, torch.bfloat16, torch.device("cpu"))
    x = torch.randn(1, 300, 32, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.float().sum().backward()
    assert out.shape == (1, 300, 32) and out.dtype == torch.bfloat16 and x.grad is not None


def test_softmax_layer_matches_attention_by_hand():
    layer = complexity.make_sdpa("MATH")(TINY, torch.float64, torch.device("cpu"))
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    q, k, v = layer[0](x).view(1, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
    torch.testing.assert_close(layer(x), layer[2](by_hand.transpose(1, 2).reshape(1, 10, 32)))


def test_linear_mechanisms_run_first_by_default():
    names = build_parser().parse_args(["complexity"]).mechanisms
    assert names[:3] == ("linear_milkernels", "linear_reference", "linear_lin_mil")
    assert {complexity.MECHANISMS[name].family for name in names[3:]} == {"softmax", "nystrom", "dilated"}


def test_gpu_defaults_fit_two_points_past_the_fit_start_and_the_gpu_script_time_limit():
    cfg = complexity_config(build_parser().parse_args(["complexity", "--device", "cuda"]))
    assert cfg.sizes == (1024, 4096, 8192, 16384, 32768, 65536, 262144, 1048576)
    assert len([n for n in cfg.sizes if cfg.fit_min_n <= n < 65536]) >= 2  # for softmax that runs out of memory at 64k
    worst_s = len(cfg.mechanisms) * len(cfg.sizes) * cfg.budget_s  # each point takes about the budget at most
    limit_s = int(re.search(r"COMPLEXITY_TIMEOUT:-(\d+)", GPU_SH.read_text()).group(1))
    assert worst_s <= limit_s <= 8 * 60 and cfg.budget_s == COMPLEXITY_GPU["budget_s"]


def test_cpu_defaults_and_bad_options():
    cfg = complexity_config(build_parser().parse_args(["complexity", "--device", "cpu"]))
    assert cfg.sizes == (256, 512, 1024, 2048, 4096) and cfg.dims == {"C": 256, "H": 8}
    assert cfg.dtype == torch.float32 and cfg.fit_min_n == 1024 and cfg.budget_s > 0
    assert set(cfg.mechanisms) == set(complexity.MECHANISMS)
    for bad in (["--sizes", "4k,1k"], ["--dims", "C=30,H=4"], ["--dims", "L=3"]):
        with pytest.raises(SystemExit):
            complexity_config(build_parser().parse_args(["complexity", "--device", "cpu", *bad]))
