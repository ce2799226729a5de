"""The complexity sweep's outputs: the printed table, ``complexity.csv/.json/.md/.png``.

``complexity.csv`` and ``complexity.json`` are written as the sweep's results are
(:func:`.report.write_table`); the JSON also holds the fits. ``complexity.md`` holds the same
tables in markdown, for the README; ``complexity.png`` plots latency and peak memory against N,
log-log, one line per mechanism. :func:`write_outputs` is the sweep's checkpoint: the tables after
every point, the plot after every mechanism.
"""

from __future__ import annotations

from pathlib import Path

from . import report
from .complexity import COLUMNS, fits

CELLS = {"oom": "oom", "over_budget": "budget", "stopped": "-", "skipped": "skip", "error": "error",
         "interrupted": "int"}
EXTENSIONS = ("csv", "json", "md", "png")


def _cell(row: dict, key: str) -> str:
    if row["status"] != "ok":
        return CELLS.get(row["status"], row["status"])
    value = row[key]
    return "n/a" if value is None else f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _exponent(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def grid(rows: list[dict], fit_rows: list[dict], key: str) -> tuple[list[str], list[list[str]]]:
    """A header and one line of cells per mechanism: ``key`` at each N, the exponents and the stop."""
    sizes = list(dict.fromkeys(row["n"] for row in rows))
    header = ["mechanism", *(f"N={report.size_text(n)}" for n in sizes), "time exp", "mem exp", "stop / skip"]
    lines = []
    for fit in fit_rows:
        by_n = {row["n"]: row for row in rows if row["mechanism"] == fit["mechanism"]}
        lines.append([fit["mechanism"], *(_cell(by_n[n], key) if n in by_n else "" for n in sizes),
                      _exponent(fit["latency_exponent"]), _exponent(fit["memory_exponent"]), fit["stop"][:90]])
    return header, lines


def _memory_measured(rows: list[dict]) -> bool:
    return any(row["peak_mem_mib"] is not None for row in rows)


def fit_text(fit_rows: list[dict], fit_min_n: int) -> str:
    """How the exponents were fitted, and over which N."""
    fitted = [fit for fit in fit_rows if fit["fit_points"]]
    if not fitted:
        return f"no mechanism has two points with N >= {report.size_text(fit_min_n)}"
    top = max(fit["fit_max_n"] for fit in fitted)
    return f"least squares of log value on log N over the ok points with N >= {report.size_text(fit_min_n)} " \
           f"(up to {report.size_text(top)})"


def caption(meta: dict) -> str:
    """One line: what a point is, the sizes, the dtype, the budget and the fit range."""
    return (f"one attention layer (qkv projection, attention, output projection), forward + backward, {meta['dims']}, "
            f"B=1, {meta['dtype']}, budget {meta['budget_s']:g} s per point; fit: {meta['fit']}")


def _tables(rows, fit_rows):
    """(title, header, lines) of the latency table and, when measured, the memory table."""
    tables = [("latency, ms (median)", *grid(rows, fit_rows, "median_ms"))]
    if _memory_measured(rows):
        tables.append(("peak memory, MiB", *grid(rows, fit_rows, "peak_mem_mib")))
    return tables


def format_table(rows: list[dict], fit_rows: list[dict], meta: dict) -> str:
    """The fixed-width tables, with the device, versions and :func:`caption` above them."""
    lines = [f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | git {meta['git_sha'][:12]}",
             caption(meta), f"peak memory: {meta['peak_memory']}"]
    for title, header, cells in _tables(rows, fit_rows):
        widths = [max(len(text) for text in column) for column in zip(header, *cells)]
        lines += ["", title, "  ".join(text.rjust(width) for text, width in zip(header[:-1], widths)) + "  " + header[-1]]
        lines += ["  ".join(text.rjust(width) for text, width in zip(line[:-1], widths)) + "  " + line[-1]
                  for line in cells]
    return "\n".join(lines)


def markdown(rows: list[dict], fit_rows: list[dict], meta: dict) -> str:
    """The tables in markdown, for the README."""
    parts = [f"Measured on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"git {meta['git_sha'][:12]}: {caption(meta)}. `time exp` and `mem exp` are the fitted exponents "
             "a in latency ~ N^a and memory ~ N^a; `oom`: out of memory, `budget`: over the time budget, "
             "`-`: not run after a stop, `skip`: cannot run here, `int`: the run was interrupted here."]
    for title, header, cells in _tables(rows, fit_rows):
        parts += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(parts) + "\n"


def _legend_label(fit: dict) -> str:
    memory = f", memory ~ N^{_exponent(fit['memory_exponent'])}" if fit["memory_exponent"] is not None else ""
    stop = f"; {fit['stop']}" if fit["stop"] else ""
    return f"{fit['mechanism']}: time ~ N^{_exponent(fit['latency_exponent'])}{memory}{stop}"


def plot(rows: list[dict], fit_rows: list[dict], meta: dict, path: Path) -> None:
    """Save latency and peak memory against N, log-log, one line per mechanism that ran, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 6))
    for axis, key, label in zip(axes, ("median_ms", "peak_mem_mib"), ("latency, ms (fwd+bwd)", "peak memory, MiB")):
        for fit in fit_rows:
            points = [(r["n"], r[key]) for r in rows
                      if r["mechanism"] == fit["mechanism"] and r["status"] == "ok" and r[key] is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=_legend_label(fit))
        axis.set(xscale="log", yscale="log", xlabel="N (instances in the bag)", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            sizes = sorted({row["n"] for row in rows})
            axis.set_xticks(sizes, [report.size_text(n) for n in sizes], minor=False)
            axis.set_xticks([], minor=True)
        else:
            axis.set(xticks=[], yticks=[])
            axis.minorticks_off()
            axis.grid(False, which="both")
            axis.text(0.5, 0.5, meta["peak_memory"] if key == "peak_mem_mib" else "no points",
                      ha="center", va="center", transform=axis.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"{meta['device']}, {meta['dims']}, B=1, {meta['dtype']}, forward+backward", fontsize=10)
    figure.tight_layout(rect=(0, 0.17, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def fitted(rows: list[dict], meta: dict, fit_min_n: int) -> tuple[list[dict], dict]:
    """The fits of ``rows`` (:func:`.complexity.fits`) and ``meta`` with ``"fit"`` (:func:`fit_text`) added."""
    fit_rows = fits(rows, fit_min_n)
    return fit_rows, {**meta, "fit": fit_text(fit_rows, fit_min_n)}


def write_outputs(out_dir: Path, meta: dict, rows: list[dict], fit_min_n: int, with_plot: bool = True) -> None:
    """Write (or overwrite) ``complexity.csv``, ``.json`` (with the fits), ``.md`` and, when ``with_plot``,
    ``.png`` of ``rows`` into ``out_dir``, created if need be."""
    fit_rows, meta = fitted(rows, meta, fit_min_n)
    report.write_table(out_dir, "complexity", meta, COLUMNS, rows, fits=fit_rows)
    (out_dir / "complexity.md").write_text(markdown(rows, fit_rows, meta))
    if with_plot:
        plot(rows, fit_rows, meta, out_dir / "complexity.png")
