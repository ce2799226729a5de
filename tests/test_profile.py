"""milkernels.profile and ``python -m milkernels.bench profile``: per-layer rows that add up to the model,
saved bytes against a hand count, the outputs and the command line end to end."""

import json

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import milkernels
from milkernels.bench.__main__ import main
from milkernels.bench.profile import MODEL, REST
from milkernels.bench.profile_report import format_table, write_outputs
from milkernels.zoo import build

N, DIM = 300, 48
FAST = dict(repeats=3, warmup=0, progress=False)


def by_layer(result) -> dict:
    return {row["layer"]: row for row in result.rows}


def test_saved_bytes_against_a_hand_count():
    """Linear -> Tanh -> Linear on (N, DIM): Tanh saves its output (N, 16) float32, which the second Linear
    saves again (the same storage, counted once, for Tanh); the first Linear saves the bag (excluded)."""
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 1))
    rows = by_layer(milkernels.profile(model, torch.randn(N, DIM), swap=False, **FAST))
    assert [rows[name]["given_saved_bytes"] for name in ("0", "1", "2", REST)] == [0, N * 16 * 4, 0, 0]
    assert rows[MODEL]["given_saved_bytes"] == N * 16 * 4
    assert rows["0"]["given_fwd_flops"] == 2 * N * DIM * 16
    assert rows["0"]["given_fwd_bwd_flops"] == 2 * N * DIM * 16 * 2  # no gradient of the bag: dW only


def test_fused_gated_attention_saves_what_its_kernel_keeps():
    """CLAM_SB's gated attention (L = 512, D = 256, K = 1, dropout on) on the ReLU-and-dropout output h (N, L).
    Swapped, the kernel keeps h, the scores (K, N) and the dropout seed (1,) int64, by its setup_context.
    As given, it keeps h and at least tanh's and sigmoid's outputs, both dropped-out branches and their
    product (N, D) each, with the dropout masks."""
    rows = by_layer(milkernels.profile(build("clam_sb", DIM), torch.randn(N, DIM), **FAST))
    layer = rows["attention_net.3"]
    assert layer["swapped_saved_bytes"] == N * 512 * 4 + N * 4 + 8
    assert layer["given_saved_bytes"] >= N * 512 * 4 + 5 * N * 256 * 4
    assert rows[MODEL]["saved_ratio"] < 0.5


@pytest.mark.parametrize("name", ["clam_sb", "litemil"])
def test_layer_rows_add_up_to_the_model(name):
    result = milkernels.profile(build(name, DIM), torch.randn(N, DIM), **FAST)
    rows = by_layer(result)
    layers = [row for row in result.rows if row["layer"] not in (MODEL, REST)]
    for variant in ("given", "swapped"):
        for key in ("saved_bytes", "fwd_flops", "fwd_bwd_flops"):
            whole = rows[MODEL][f"{variant}_{key}"]
            assert sum(row[f"{variant}_{key}"] for row in layers) + rows[REST][f"{variant}_{key}"] == whole
        for key in ("fwd_flops", "fwd_bwd_flops"):  # the glue between the layers has few matmuls; a layer
            # replayed alone takes the path it took in the model (LiteMIL's fused path needs key is value)
            layer_sum = sum(row[f"{variant}_{key}"] for row in layers)
            assert 0.9 * rows[MODEL][f"{variant}_{key}"] <= layer_sum <= rows[MODEL][f"{variant}_{key}"]
        for pass_ in ("fwd", "fwd_bwd"):  # the rest's time is the model's less the layers' (timing is not tested)
            key = f"{variant}_{pass_}_median_ms"
            assert rows[REST][key] == pytest.approx(rows[MODEL][key] - sum(row[key] for row in layers))


def test_counts_only_without_timing():
    """repeats=0: the saved bytes and FLOPs alone, counted on fake tensors, nothing timed."""
    rows_n = 20000
    result = milkernels.profile(build("clam_sb", 1024), torch.randn(rows_n, 1024), repeats=0, progress=False)
    rows = by_layer(result)
    assert rows["attention_net.3"]["swapped_saved_bytes"] == rows_n * (512 * 4 + 4) + 8
    assert rows["attention_net.0"]["given_fwd_flops"] == 2 * rows_n * 1024 * 512
    assert "given_fwd_median_ms" not in rows[MODEL] and rows[MODEL]["noisy"] is None
    assert "not timed" in format_table(result)


class OutOfMemoryInBackward(torch.autograd.Function):
    """Identity whose backward runs out of memory on real tensors (the fake count still goes through)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if not isinstance(grad, FakeTensor):
            raise torch.OutOfMemoryError("out of memory (a test)")
        return grad


class HugeBackward(nn.Module):
    def forward(self, x):
        return OutOfMemoryInBackward.apply(x)


def test_out_of_memory_is_recorded_and_the_rest_still_measured():
    model = nn.Sequential(nn.Linear(DIM, 8), HugeBackward(), nn.Linear(8, 1))
    rows = by_layer(milkernels.profile(model, torch.randn(N, DIM), swap=False, **FAST))
    assert rows["1"]["oom"] == "given fwd_bwd" and rows[MODEL]["oom"] == "given fwd_bwd"
    assert rows["1"]["given_fwd_bwd_median_ms"] is None and rows["1"]["given_fwd_median_ms"] > 0
    assert rows["0"]["oom"] == "" and rows["0"]["given_fwd_bwd_median_ms"] > 0
    assert rows[REST]["given_fwd_bwd_median_ms"] is None
    assert rows["1"]["given_saved_bytes"] == 0 and rows["2"]["given_saved_bytes"] == N * 8 * 4


def test_outputs_written(tmp_path):
    result = milkernels.profile(build("abmil", DIM), torch.randn(N, DIM), **FAST)
    paths = write_outputs(tmp_path, result)
    assert [path.name for path in paths] == ["profile.csv", "profile.json", "profile.md", "profile.png"]
    saved = json.loads(paths[1].read_text())
    assert saved["rows"][0]["layer"] == MODEL and saved["metadata"]["n"] == N
    assert paths[3].stat().st_size > 1000
    assert "kernel latency needs a GPU" in format_table(result)


def test_bad_layers_and_repeats():
    model = build("clam_sb", DIM)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        milkernels.profile(model, torch.randn(N, DIM), layers=["nope"], **FAST)
    with pytest.raises(ValueError, match="inside layer"):
        milkernels.profile(model, torch.randn(N, DIM), layers=["attention_net", "attention_net.3"], **FAST)
    with pytest.raises(ValueError, match="repeats"):
        milkernels.profile(model, torch.randn(N, DIM), repeats=-1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        milkernels.profile(model, torch.randn(2, N, DIM))


def test_command_line_end_to_end(tmp_path, capsys):
    code = main(["profile", "--synthetic", str(N), "--dim", str(DIM), "--model", "clam_sb,abmil", "--repeats", "1",
                 "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    shown = capsys.readouterr().out
    assert "(model)" in shown and "kernel latency needs a GPU" in shown
    for name in ("clam_sb", "abmil"):
        assert (tmp_path / f"{name}-synthetic-{DIM}" / "profile.png").exists()
    assert "clam_sb" in (tmp_path / "summary.md").read_text()


def failing_model(in_dim):
    """A model factory for the command line whose forward raises."""
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(in_dim, 1)

        def forward(self, x):
            raise RuntimeError("broken on purpose\nsecond line")

    return Broken()


def test_command_line_error_is_one_line_and_exit_1(tmp_path, capsys):
    code = main(["profile", "--synthetic", "10", "--dim", "4", "--model", "test_profile:failing_model",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "error: RuntimeError: broken on purpose" in captured.out
    assert "second line" not in captured.out + captured.err and "Traceback" not in captured.out + captured.err
    assert "Traceback" in (tmp_path / "profile.log").read_text()


def test_command_line_needs_one_bag_source(tmp_path):
    with pytest.raises(SystemExit, match="BAG"):
        main(["profile", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown model"):
        main(["profile", "--synthetic", "10", "--model", "nope", "--out", str(tmp_path)])
