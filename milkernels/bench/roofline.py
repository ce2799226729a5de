"""Peak numbers by device and the roofline floor.

The floor of a call is ``max(FLOPs / matmul peak, minimal bytes / bandwidth)``, the time no
implementation can beat; ``% of roofline = 100 · floor / measured``. Peaks are the vendors' dense
(no sparsity) figures; measured matmul rates on these chips reach about 80% of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    """Dense matmul TFLOP/s by math mode (``bf16``, ``tf32``, ``fp32``) and memory bandwidth in GB/s."""

    name: str
    tflops: dict
    gbps: float


MODES = ("bf16", "tf32", "fp32")


def _peak(name, bf16, tf32, fp32, gbps):
    return Peak(name, dict(zip(MODES, (bf16, tf32, fp32))), gbps)


# (words that must all appear in the device name, peak); the first match wins.
PEAKS = (
    (("h200", "nvl"), _peak("H200 NVL", 835.5, 417.5, 60.0, 4800)),
    (("h200",), _peak("H200 SXM", 989.4, 494.7, 66.9, 4800)),
    (("h100", "nvl"), _peak("H100 NVL", 835.5, 417.5, 60.0, 3900)),
    (("h100", "pcie"), _peak("H100 PCIe", 756.5, 378.0, 51.2, 2000)),
    (("h100",), _peak("H100 SXM", 989.4, 494.7, 66.9, 3350)),
    (("a100", "80gb", "pcie"), _peak("A100 80GB PCIe", 312.0, 156.0, 19.5, 1935)),
    (("a100", "80gb"), _peak("A100 80GB SXM", 312.0, 156.0, 19.5, 2039)),
    (("a100",), _peak("A100 40GB", 312.0, 156.0, 19.5, 1555)),
)


def device_peak(device_name: str, tflops: float | None = None, gbps: float | None = None) -> Peak | None:
    """The peak of the device called ``device_name`` (e.g. "NVIDIA H100 80GB HBM3"), or None if unknown.

    ``tflops`` (for every math mode) and ``gbps`` override the table; both given describe any device.
    """
    lowered = device_name.lower()
    known = next((peak for words, peak in PEAKS if all(w in lowered for w in words)), None)
    if tflops is None and gbps is None:
        return known
    if known is None and (tflops is None or gbps is None):
        return None
    return Peak(f"{known.name} (overridden)" if known else "given by --peak-tflops/--peak-gbps",
                {mode: tflops for mode in MODES} if tflops is not None else known.tflops,
                gbps if gbps is not None else known.gbps)


def math_mode(dtype: torch.dtype) -> str | None:
    """The matmul mode of ``dtype``: ``bf16`` for 16-bit floats, ``tf32`` or ``fp32`` for float32, else None."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def floor_seconds(flops: float, nbytes: float, peak: Peak, dtype: torch.dtype) -> float | None:
    """``max(flops / matmul peak, nbytes / bandwidth)`` in seconds, or None without a peak for ``dtype``."""
    mode = math_mode(dtype)
    if mode is None:
        return None
    return max(flops / (peak.tflops[mode] * 1e12), nbytes / (peak.gbps * 1e9))


def roofline_pct(floor_s: float, measured_s: float) -> float:
    """How close a measured time is to the floor, in percent (100 = at the roofline)."""
    return 100.0 * floor_s / measured_s
