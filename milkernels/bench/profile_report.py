"""The profiler's outputs: a terminal table, ``profile.csv``, ``profile.json``, ``profile.md`` and
``profile.png`` (per-layer bars of forward + backward time and of memory, the model as given against
swapped)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .profile import MODEL, VARIANTS, ProfileResult

EXTENSIONS = ("csv", "json", "md", "png")
MIB = 2**20


def columns(result: ProfileResult) -> list[str]:
    """Every key of the rows, in first-seen order."""
    return list(dict.fromkeys(key for row in result.rows for key in row))


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pair(row: dict, key: str, fmt, scale: float = 1.0) -> str:
    """``given -> swapped`` of ``<variant>_<key>`` (the given value alone without a swapped variant)."""
    values = [row[f"{variant}_{key}"] for variant in VARIANTS if f"{variant}_{key}" in row]
    return " -> ".join(fmt(None if value is None else value / scale) for value in values)


def table_rows(result: ProfileResult) -> list[list[str]]:
    """The table as text cells, a header first (the time columns only when timed, peak memory on a GPU)."""
    timed = bool(result.metadata["repeats"])
    on_gpu = any(row.get("given_peak_mib") is not None for row in result.rows)
    cells = [["layer"] + (["fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x"] if timed else [])
             + ["saved MiB", "saved ratio", "GFLOP fwd+bwd"] + (["peak MiB"] if on_gpu else []) + ["flags"]]
    for row in result.rows:
        line = [row["layer"]]
        if timed:
            line += [_pair(row, "fwd_median_ms", _ms), _times(row.get("fwd_speedup")),
                     _pair(row, "fwd_bwd_median_ms", _ms), _times(row.get("fwd_bwd_speedup"))]
        line += [_pair(row, "saved_bytes", _ms, MIB), _times(row.get("saved_ratio")),
                 _pair(row, "fwd_bwd_flops", _ms, 1e9)]
        if on_gpu:
            line.append(_pair(row, "peak_mib", _ms))
        line.append(_flags(row))
        cells.append(line)
    return cells


def _flags(row: dict) -> str:
    """``noisy`` and ``oom: <variant> <pass>, ...`` where they apply."""
    flags = ["noisy"] if row.get("noisy") else []
    return " ".join(flags + ([f"oom: {row['oom']}"] if row.get("oom") else []))


def format_table(result: ProfileResult) -> str:
    """The terminal table with a header line naming the model, bag, device and what the columns mean."""
    meta = result.metadata
    cells = table_rows(result)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = [f"{meta['model']} on {meta['bag']} (N={meta['n']}, D={meta['dim']}), {meta['device']} "
             f"{meta['dtype']}, " + (f"median of {meta['repeats']}" if meta["repeats"] else "not timed")
             + "; given -> swapped, x = given / swapped time"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.append(f"saved MiB: bytes saved for backward, counted on {meta['counted_on'].get('swapped') or meta['counted_on']['given']}")
    if meta["device"].startswith("cpu") and meta["repeats"]:
        lines.append("times are CPU times of the PyTorch paths: kernel latency needs a GPU")
    return "\n".join(lines)


def format_markdown(result: ProfileResult) -> str:
    """The table as markdown, with the metadata above it."""
    cells = table_rows(result)
    meta = {key: value for key, value in result.metadata.items() if key != "swap"}
    lines = [f"- {key}: {value}" for key, value in meta.items()] + [""]
    lines += ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(line) + " |" for line in cells[1:]]
    if "swap" in result.metadata:
        lines += ["", "```", result.metadata["swap"], "```"]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: ProfileResult, stem: str = "profile") -> list[Path]:
    """Write ``<stem>.csv`` (``# key: value`` metadata lines, then the rows), ``.json``, ``.md`` and
    ``.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in EXTENSIONS]
    keys = columns(result)
    with open(paths[0], "w", newline="") as handle:
        for key, value in result.metadata.items():
            if key != "swap":
                handle.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(handle, keys)
        writer.writeheader()
        writer.writerows(result.rows)
    paths[1].write_text(json.dumps({"metadata": result.metadata, "columns": keys, "rows": result.rows}, indent=1))
    paths[2].write_text(format_markdown(result))
    plot(result, paths[3])
    return paths


def plot(result: ProfileResult, path: Path) -> None:
    """Per-layer bars: forward + backward median time and memory (peak on a GPU, else saved for
    backward), the model as given beside swapped."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = [row for row in result.rows if row["layer"] != MODEL]
    on_gpu = any(row.get("given_peak_mib") is not None for row in rows)
    memory_key, memory_label = ("peak_mib", "peak MiB (fwd+bwd)") if on_gpu else ("saved_bytes", "saved for backward, MiB")
    variants = [variant for variant in VARIANTS if f"{variant}_saved_bytes" in result.rows[0]]
    figure, axes = pyplot.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2.5))
    width = 0.8 / len(variants)
    positions = range(len(rows))
    for index, variant in enumerate(variants):
        shift = [p + (index - (len(variants) - 1) / 2) * width for p in positions]
        times = [row.get(f"{variant}_fwd_bwd_median_ms") or 0 for row in rows]
        memory = [(row.get(f"{variant}_{memory_key}") or 0) / (1 if on_gpu else MIB) for row in rows]
        axes[0].barh(shift, times, height=width, label=variant)
        axes[1].barh(shift, memory, height=width, label=variant)
    for axis, label in zip(axes, ("forward + backward, ms", memory_label)):
        axis.set_yticks(list(positions), [row["layer"] for row in rows])
        axis.invert_yaxis()
        axis.set_xlabel(label)
        axis.legend()
    meta = result.metadata
    figure.suptitle(f"{meta['model']}, N={meta['n']}, D={meta['dim']}, {meta['device']} {meta['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
