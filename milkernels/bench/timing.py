"""Timing and peak memory of one step (a no-argument callable that runs the work once).

On a GPU the step is timed with CUDA events, each call after a write of 256 MiB that flushes the
L2 cache (50-60 MB on Hopper), so that a bag that fits in L2 is not read from it; on a CPU with
``time.perf_counter``. Peak memory is measured on a GPU only. A summary whose p20-p80 spread is
over :data:`NOISY_SPREAD` of its median is noisy.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

FLUSH_BYTES = 256 * 2**20
NOISY_SPREAD = 0.25


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) of ``values``, interpolating linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples_ms: list[float]) -> dict:
    """``{"median_ms", "p20_ms", "p80_ms"}`` of the samples."""
    return {"median_ms": percentile(samples_ms, 50), "p20_ms": percentile(samples_ms, 20),
            "p80_ms": percentile(samples_ms, 80)}


def relative_spread(summary: dict) -> float:
    """The p20-p80 spread of a :func:`summarize` result over its median (0 for a zero median)."""
    median = summary["median_ms"]
    return (summary["p80_ms"] - summary["p20_ms"]) / median if median else 0.0


def time_step(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``step``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        return _time_cuda(step, device, repeats)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _time_cuda(step, device, repeats):
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for start, end in events:
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """MiB allocated at the peak of one call of ``step`` above what was allocated before it; None on a CPU.

    ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` taken just before
    the call, when the inputs are built and nothing of an earlier call is held.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
