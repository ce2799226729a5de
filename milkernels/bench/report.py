"""Run metadata, the CSV and JSON files, and the printed table.

``results.csv`` starts with ``# key: value`` metadata lines (values JSON-encoded; read the table
with ``pandas.read_csv(path, comment="#")``) then one row per :data:`~.sweep.COLUMNS`;
``results.json`` holds ``{"metadata": ..., "columns": [...], "rows": [...]}``; ``sweep.log`` beside
them the failures' tracebacks and what the implementations wrote to stderr. No host name is
recorded.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .. import __version__
from .._backends import backends, triton_interpreted
from .roofline import math_mode
from .sweep import COLUMNS, SweepConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SWEEP_LOG = "sweep.log"
RESULT_FILES = ("results.csv", "results.json", SWEEP_LOG)


def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or ``cpu (<arch>, <n> cores, <t> torch threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def slug(text: str) -> str:
    """``text`` lower-cased with runs of other characters than letters and digits as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_state() -> tuple[str, bool | None]:
    """``(sha, dirty)`` of the checkout holding this package; dirty means tracked files differ from HEAD.

    Without git or a commit the sha is ``$MILKERNELS_GIT_SHA`` (for copies of the tree without
    ``.git``) or ``"unknown"``, and dirty is None.
    """
    def git(*args):
        return subprocess.run(("git", *args), cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    fallback = os.environ.get("MILKERNELS_GIT_SHA", "unknown"), None
    if not (REPO_ROOT / ".git").exists():  # an installed copy, or a tree copied without .git
        return fallback
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return fallback


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def run_metadata(device: torch.device, dtype: torch.dtype, command: str) -> dict:
    """What every benchmark records: date, device, versions, git state, backends, dtype and how it measures."""
    sha, dirty = git_state()
    on_gpu = device.type == "cuda"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "milkernels": __version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "backends": backends(),
        "triton_interpret": triton_interpreted(),
        "command": command,
        "dtype": str(dtype).removeprefix("torch."),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "timer": "CUDA events, L2 flushed before each call" if on_gpu else "time.perf_counter",
        "peak_memory": "torch.cuda.max_memory_allocated above the allocation before the call" if on_gpu
        else "not measured on CPU",
    }


def metadata(cfg: SweepConfig, dims_notes: dict, flop_checks: dict, command: str) -> dict:
    """The sweep's metadata: :func:`run_metadata` plus its sizes, timing settings, roofline and FLOP check."""
    return {
        **run_metadata(cfg.device, cfg.dtype, command),
        "sizes": list(cfg.sizes),
        "dims": dims_notes,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "roofline": {"device": cfg.peak.name, "tflops": cfg.peak.tflops, "gbps": cfg.peak.gbps,
                     "mode": math_mode(cfg.dtype)} if cfg.peak
        else "n/a (no peak known for this device; --peak-tflops and --peak-gbps give one)",
        "flop_check": flop_checks,
    }


def write_table(out_dir: Path, stem: str, meta: dict, columns: tuple, rows: list[dict], **extra) -> None:
    """Write (or overwrite) ``<stem>.csv`` and ``<stem>.json`` in ``out_dir``, created if need be.

    The CSV has ``# key: value`` metadata lines, then the header and the rows; the JSON holds
    ``{"metadata", "columns", "rows"}`` and the ``extra`` keys.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{stem}.csv", "w", newline="") as handle:
        for key, value in meta.items():
            handle.write(f"# {key}: {value if isinstance(value, str) else json.dumps(value)}\n")
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    result = {"metadata": meta, "columns": list(columns), "rows": rows, **extra}
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")


def write_results(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    """Write (or overwrite) the sweep's ``results.csv`` and ``results.json`` in ``out_dir``."""
    write_table(out_dir, "results", meta, COLUMNS, rows)


def outcome_text(rows: list[dict], out_dir: Path) -> str:
    """What the sweep wrote, its count of rows per status (and of noisy rows), and where the tracebacks are."""
    statuses = [row["status"] for row in rows]
    counts = ", ".join(f"{statuses.count(status)} {status}" for status in dict.fromkeys(statuses))
    noisy = sum(bool(row["noisy"]) for row in rows)
    lines = ["wrote " + ", ".join(str(out_dir / name) for name in RESULT_FILES),
             f"rows: {counts}" + (f" ({noisy} noisy, marked in the table)" if noisy else "")]
    if "error" in statuses:
        lines.append(f"{statuses.count('error')} rows failed with an error; their tracebacks are in "
                     f"{out_dir / SWEEP_LOG}")
    return "\n".join(lines)


def size_text(n: int) -> str:
    """A bag size as the command line takes it: ``1M``, ``16k`` or the plain number."""
    for suffix, unit in (("M", 2**20), ("k", 2**10)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


# (title, width, row key, format spec) of each table column
TABLE = (("impl", 18, "impl", ""), ("N", 6, "n", ""), ("pass", 7, "pass", ""), ("median ms", 10, "median_ms", ".3f"),
         ("p20", 9, "p20_ms", ".3f"), ("p80", 9, "p80_ms", ".3f"), ("TFLOP/s", 8, "tflops", ".3g"),
         ("GB/s", 8, "gbps", ".3g"), ("roofl %", 7, "roofline_pct", ".1f"), ("x eager", 7, "speedup_vs_eager", ".2f"),
         ("peak MiB", 9, "peak_mem_mib", ".1f"), ("mem x eager", 11, "mem_ratio_vs_eager", ".2f"))


def _cell(row: dict, key: str, spec: str) -> str:
    value = row[key]
    if key == "n":
        return size_text(value)
    return "-" if value is None else format(value, spec)


def _status_text(row: dict) -> str:
    """``ok``, ``ok noisy: <why>`` or ``<status>: <reason>``, cut at 100 characters."""
    status = row["status"] + (" noisy" if row["noisy"] else "")
    return (f"{status}: {row['reason']}" if row["reason"] else status)[:100]


def _roofline_text(roofline) -> str:
    if isinstance(roofline, str):
        return "n/a"
    mode = roofline["mode"]
    return f"{roofline['device']} ({mode} {roofline['tflops'].get(mode, 0):g} TFLOP/s, {roofline['gbps']:g} GB/s)"


def format_table(rows: list[dict], meta: dict) -> str:
    """The rows as a fixed-width table per op, with the device, versions and the op's sizes above it."""
    lines = [f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | git {meta['git_sha'][:12]}",
             f"roofline: {_roofline_text(meta['roofline'])} | peak memory: {meta['peak_memory']}"]
    for op in dict.fromkeys(r["op"] for r in rows):
        check = meta["flop_check"][op]
        lines += ["", f"{op}: {meta['dims'][op]}, {meta['dtype']}, {meta['repeats']} timed calls after "
                      f"{meta['warmup']} warm-up; FlopCounterMode / formula (matmuls, N={check['n']}): "
                      f"fwd {check['fwd']:.4f}, fwd_bwd {check['fwd_bwd']:.4f}",
                  "  ".join(title.rjust(width) for title, width, _, _ in TABLE) + "  status"]
        for row in (r for r in rows if r["op"] == op):
            lines.append("  ".join(_cell(row, key, spec).rjust(width) for _, width, key, spec in TABLE) + "  "
                         + _status_text(row))
    return "\n".join(lines)
