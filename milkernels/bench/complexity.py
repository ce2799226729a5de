"""How latency and memory grow with the bag size N, per attention mechanism: ``milkernels-bench complexity``.

Every mechanism is one attention layer on one bag ``x: (1, N, C)``: the qkv projection
``Linear(C, 3C, bias=False)``, the attention with H heads of size C / H, and the output projection
``Linear(C, C)``. Each point is one forward + backward (:func:`.sweep.fwd_bwd_step`): a first call,
timed by the wall clock, with its peak memory (:func:`.timing.peak_memory_mib`, GPU only), then the
warm-up and timed repeats of :func:`.timing.time_step`, as many as fit in the budget.

One point stays within about the budget: a point whose one call is predicted (from the earlier
points) to take longer is not run (``over_budget``); a first call over the budget ends the point
(``over_budget``); past a third of it, a second call is the point's single sample (``repeats`` 1; the first
when two would pass the budget), since a first call includes the kernels' compiles;
else the warm-up and repeats are cut to the calls that fit in the rest of the budget. A mechanism
stops at the first N where it runs out of memory (``oom``), fails (``error``) or goes over the
budget (a whole point over it is kept); the rows after a stop are ``stopped`` with the reason.
Then :func:`fit_exponent` fits ``log latency`` and ``log memory`` against ``log N`` over the
points with ``N >= fit_min_n``.

:func:`run_complexity` hands the rows so far to a checkpoint after every point, so a run cut short
keeps what it measured; a KeyboardInterrupt (Ctrl-C, ``timeout --signal=INT``) ends the run with an
``interrupted`` row where it stopped.

Mechanisms (:data:`MECHANISMS`, :func:`register_mechanism`, run in this order by default): linear
attention (the milkernels kernels, the milkernels reference, Lin-MIL's eager layer) first, so a run
cut short still has them; softmax attention under each SDPA backend, flash-attn and xformers;
Nystrom (the ``nystrom-attention`` package as Lin-MIL and TransMIL use it); dilated attention (LongNet,
torchscale's ``DilatedAttention``: milkernels' op and the torchscale-style composition of
:func:`.dilated_attention.torchscale_attention`, over the branches :data:`DILATED_BRANCHES`). One that
cannot run here is ``skipped`` with the reason.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._backends import BackendUnavailable, use_backend
from ..ops import dilated_attention
from .dilated_attention import torchscale_attention
from .linear_attention import core as linear_core, first_output, lin_mil_module
from .registry import Skip, first_line
from .sweep import fwd_bwd_step
from .timing import peak_memory_mib, summarize, time_step

COLUMNS = ("mechanism", "family", "n", "dims", "dtype", "status", "reason", "median_ms", "p20_ms", "p80_ms",
           "repeats", "peak_mem_mib", "point_s")
FIT_COLUMNS = ("mechanism", "family", "latency_exponent", "memory_exponent", "fit_min_n", "fit_max_n",
               "fit_points", "stop")
OOM_TEXT = ("out of memory", "can't allocate memory")
# the dilated layers' (segment lengths, dilation rates) on a GPU and, scaled down to its sizes, on a CPU: LongNet's
# geometric ladder, segments doubling as the rates do, so the longest branch costs the least per query
DILATED_BRANCHES = {"cuda": ((2048, 4096, 8192, 16384), (1, 2, 4, 8)), "cpu": ((128, 256, 512, 1024), (1, 2, 4, 8))}


@dataclass(frozen=True)
class Mechanism:
    """An attention layer to sweep: ``make(dims, dtype, device)`` returns a callable ``x -> y``, both
    ``(1, N, C)``, or raises :class:`Skip`, :class:`BackendUnavailable` or ``ImportError`` with the reason."""

    name: str
    family: str
    make: Callable


@dataclass(frozen=True)
class ComplexityConfig:
    """What to run: mechanism names, bag sizes (ascending), ``dims`` (``C``, ``H``), timing and stop settings."""

    mechanisms: tuple
    sizes: tuple
    dims: dict
    dtype: torch.dtype
    device: torch.device
    repeats: int
    warmup: int
    budget_s: float
    fit_min_n: int


MECHANISMS: dict[str, Mechanism] = {}


def register_mechanism(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism`` to :data:`MECHANISMS` (replacing one of the same name) and return it."""
    MECHANISMS[mechanism.name] = mechanism
    return mechanism


# --- the layers -------------------------------------------------------------------------------

class SplitHeads(nn.Module):
    """``qkv: (B, N, 3C) -> attend(q, k, v) -> (B, N, C)``; q, k, v are ``(B, H, N, dh)`` views when
    ``heads_first``, else ``(B, N, H, dh)`` (flash-attn's and xformers' layout)."""

    def __init__(self, heads: int, attend: Callable, heads_first: bool = True):
        super().__init__()
        self.heads, self.attend, self.heads_first = heads, attend, heads_first

    def forward(self, qkv):
        batch, n, width = qkv.shape
        q, k, v = qkv.view(batch, n, 3, self.heads, width // 3 // self.heads).unbind(2)
        if self.heads_first:
            out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        else:
            out = self.attend(q, k, v)
        return out.reshape(batch, n, width // 3)


class LinearCore(nn.Module):
    """Lin-MIL's linear attention core (:func:`.linear_attention.core`) with its temperature, on ``backend``."""

    def __init__(self, dims: dict, backend: str):
        super().__init__()
        self.temperature = nn.Parameter(torch.full((dims["H"],), (dims["C"] // dims["H"]) ** -0.5))
        self.backend = backend

    def forward(self, qkv):
        with use_backend(self.backend):
            return linear_core(qkv, self.temperature)


def projected(dims: dict, attention: nn.Module, dtype, device) -> nn.Module:
    """The layer around ``attention``: ``Linear(C, 3C, bias=False)``, ``attention``, ``Linear(C, C)``."""
    channels = dims["C"]
    layer = nn.Sequential(nn.Linear(channels, 3 * channels, bias=False), attention, nn.Linear(channels, channels))
    return layer.to(device=device, dtype=dtype)


def sdpa(backend) -> Callable:
    """``scaled_dot_product_attention`` with only ``backend`` allowed; :class:`Skip` when it cannot run the call."""

    def attend(q, k, v):
        with torch.nn.attention.sdpa_kernel(backend):
            try:
                return F.scaled_dot_product_attention(q, k, v)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                if "No viable backend" in str(exc) or "No available kernel" in str(exc):
                    raise Skip(f"SDPA {backend.name} cannot run here: {first_line(exc)}") from exc
                raise

    return attend


def _import(module: str, package: str):
    """``module`` imported, or :class:`Skip` saying ``package`` is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{package} is not installed ({first_line(exc)})") from exc


def _needs_half_on_gpu(name: str, dtype, device) -> None:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        raise Skip(f"{name} needs a CUDA GPU and fp16 or bf16, got {device.type} and {dtype}")


def make_sdpa(backend_name: str) -> Callable:
    """A maker of the softmax layer on the SDPA backend called ``backend_name`` (FLASH_ATTENTION, ...)."""

    def make(dims, dtype, device):
        backend = getattr(torch.nn.attention.SDPBackend, backend_name)
        return projected(dims, SplitHeads(dims["H"], sdpa(backend)), dtype, device)

    return make


def make_flash_attn(dims, dtype, device):
    """The softmax layer on ``flash_attn.flash_attn_func``; skipped when flash-attn is not installed."""
    flash_attn = _import("flash_attn", "flash-attn")
    _needs_half_on_gpu("flash-attn", dtype, device)
    return projected(dims, SplitHeads(dims["H"], flash_attn.flash_attn_func, heads_first=False), dtype, device)


def make_xformers(dims, dtype, device):
    """The softmax layer on ``xformers.ops.memory_efficient_attention``; skipped when xformers is not installed."""
    xformers_ops = _import("xformers.ops", "xformers")
    _needs_half_on_gpu("xformers", dtype, device)
    return projected(dims, SplitHeads(dims["H"], xformers_ops.memory_efficient_attention, heads_first=False),
                     dtype, device)


def make_nystrom(dims, dtype, device):
    """``nystrom_attention.NystromAttention`` as Lin-MIL and TransMIL build it (256 landmarks, 6 pinv iterations).
    Its pseudo-inverse iteration makes fp32 identity matrices, so in fp16 / bf16 it runs as those models train it:
    fp32 weights under ``torch.autocast`` (a bf16 layer fails on a GPU: "expected scalar type BFloat16")."""
    nystrom = _import("nystrom_attention", "nystrom-attention")
    layer = nystrom.NystromAttention(dim=dims["C"], dim_head=dims["C"] // dims["H"], heads=dims["H"],
                                     num_landmarks=256, pinv_iterations=6, residual=True).to(device)
    if dtype == torch.float32:
        return layer

    def mixed_precision(x):
        with torch.autocast(device.type, dtype=dtype):
            return layer(x)

    return mixed_precision


def make_linear(backend: str) -> Callable:
    """A maker of the linear attention layer on the milkernels op under ``backend``."""

    def make(dims, dtype, device):
        return projected(dims, LinearCore(dims, backend), dtype, device)

    return make


def make_lin_mil(dims, dtype, device):
    """Lin-MIL's eager ``LinearAttention`` layer (its first output); skipped when lin_mil does not import."""
    module = lin_mil_module(dims["C"], dims["H"], dtype, device)
    return lambda x: first_output(module(x))


def make_dilated(backend: str | None) -> Callable:
    """A maker of the dilated attention layer over :data:`DILATED_BRANCHES` for the device: milkernels' op
    under ``backend``, or with ``None`` the torchscale-style composition in PyTorch."""

    def make(dims, dtype, device):
        segments, rates = DILATED_BRANCHES["cuda" if device.type == "cuda" else "cpu"]

        def attend(q, k, v):
            if backend is None:
                return torchscale_attention(q, k, v, segments, rates)
            with use_backend(backend):
                return dilated_attention(q, k, v, list(segments), list(rates))

        return projected(dims, SplitHeads(dims["H"], attend, heads_first=False), dtype, device)

    return make


for _mechanism in (
    Mechanism("linear_milkernels", "linear", make_linear("triton")),
    Mechanism("linear_reference", "linear", make_linear("reference")),
    Mechanism("linear_lin_mil", "linear", make_lin_mil),
    Mechanism("softmax_sdpa_flash", "softmax", make_sdpa("FLASH_ATTENTION")),
    Mechanism("softmax_sdpa_efficient", "softmax", make_sdpa("EFFICIENT_ATTENTION")),
    Mechanism("softmax_sdpa_math", "softmax", make_sdpa("MATH")),
    Mechanism("softmax_flash_attn", "softmax", make_flash_attn),
    Mechanism("softmax_xformers", "softmax", make_xformers),
    Mechanism("nystrom", "nystrom", make_nystrom),
    Mechanism("dilated_milkernels", "dilated", make_dilated("triton")),
    Mechanism("dilated_torchscale", "dilated", make_dilated(None)),
):
    register_mechanism(_mechanism)


# --- the sweep --------------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and a RuntimeError that says it ran out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in OOM_TEXT))


def _outcome(exc: BaseException) -> dict:
    """The row status of an exception: skipped, oom or error, with the reason."""
    if isinstance(exc, (Skip, BackendUnavailable)):
        return {"status": "skipped", "reason": str(exc)}
    if isinstance(exc, ImportError):
        return {"status": "skipped", "reason": f"ImportError: {first_line(exc)}"}
    if is_oom(exc):
        return {"status": "oom", "reason": first_line(exc)}
    return {"status": "error", "reason": f"{type(exc).__name__}: {first_line(exc)}"}


def first_call(step: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """Seconds of one call of ``step`` by the wall clock, and its peak memory in MiB (None on a CPU).

    On a GPU the call is the one :func:`.timing.peak_memory_mib` measures (it synchronizes before
    and after); on a CPU, where that measures nothing and does not call ``step``, it is called here.
    """
    start = time.perf_counter()
    peak = peak_memory_mib(step, device)
    if peak is None:
        step()
    return time.perf_counter() - start, peak


def measure_point(layer: Callable, n: int, cfg: ComplexityConfig) -> dict:
    """Latency summary and peak memory of forward + backward of ``layer`` on one bag of ``n``.

    The first call gives the peak memory and says how many calls fit in the budget: when it alone
    passes the budget, the point is ``over_budget``; when it passes a third of it, a second call is the
    point's only sample (the first one, with its compiles, if two would pass the budget); else warm-up and
    repeats are cut to the calls that fit in the rest.
    """
    generator = torch.Generator(device=cfg.device).manual_seed(n)
    x = torch.randn((1, n, cfg.dims["C"]), generator=generator, device=cfg.device).to(cfg.dtype).requires_grad_()
    grad = torch.randn((1, n, cfg.dims["C"]), generator=generator, device=cfg.device).to(cfg.dtype)
    step = fwd_bwd_step(layer, (x,), [grad])
    start = time.perf_counter()
    first_s, peak = first_call(step, cfg.device)
    if first_s > cfg.budget_s:
        return {"status": "over_budget", "point_s": time.perf_counter() - start,
                "reason": f"one call took {first_s:.1f} s, over the budget of {cfg.budget_s:g} s"}
    if first_s > cfg.budget_s / 3:  # the first call compiles (Triton, torch.compile): a second, if it fits, is timed
        samples = [(first_s if 2 * first_s > cfg.budget_s else first_call(step, cfg.device)[0]) * 1e3]
    else:
        calls_left = int((cfg.budget_s - first_s) / max(first_s, 1e-9))  # at least 2
        warmup = min(cfg.warmup, calls_left // 4)
        samples = time_step(step, cfg.device, min(cfg.repeats, calls_left - warmup), warmup)
    return {"status": "ok", "repeats": len(samples), "peak_mem_mib": peak, "point_s": time.perf_counter() - start,
            **summarize(samples)}


def predicted_call_s(ok_rows: list[dict], n: int) -> float | None:
    """Seconds one call is expected to take at ``n`` after the ``ok`` rows (ascending N); None with none.

    The last row's median scaled by ``(n / its N) ** a``, ``a`` the log-log slope of the last two
    rows clipped to [1, 2] (2, softmax's, with one row).
    """
    if not ok_rows:
        return None
    last = ok_rows[-1]
    slope = fit_exponent([row["n"] for row in ok_rows[-2:]], [row["median_ms"] for row in ok_rows[-2:]])
    exponent = min(2.0, max(1.0, slope["exponent"])) if slope else 2.0
    return last["median_ms"] / 1e3 * (n / last["n"]) ** exponent


def _stop_reason(row: dict, budget_s: float) -> str | None:
    """Why a mechanism goes no further after ``row``, or None."""
    if row["status"] == "over_budget" or (row["status"] == "ok" and row["point_s"] > budget_s):
        return f"over budget at N={row['n']}"
    if row["status"] in ("oom", "error", "interrupted"):
        return f"{row['status']} at N={row['n']}"
    return None


def _blank_row(mechanism: Mechanism, cfg: ComplexityConfig, n: int) -> dict:
    """A row of ``mechanism`` at ``n`` with its names filled in, the measurements None."""
    return {**dict.fromkeys(COLUMNS), "mechanism": mechanism.name, "family": mechanism.family, "n": n,
            "dims": " ".join(f"{key}={value}" for key, value in cfg.dims.items()),
            "dtype": str(cfg.dtype).removeprefix("torch.")}


def sweep_mechanism(mechanism: Mechanism, cfg: ComplexityConfig, progress: Callable = print):
    """Yield one row per size for ``mechanism``: built once, then measured at each N until it stops."""
    try:
        layer = mechanism.make(cfg.dims, cfg.dtype, cfg.device)
    except Exception as exc:  # a mechanism that cannot be built is recorded at every size
        for n in cfg.sizes:
            yield {**_blank_row(mechanism, cfg, n), **_outcome(exc)}
        return
    ok, stop = [], None
    for n in cfg.sizes:
        row = _blank_row(mechanism, cfg, n)
        if stop:
            yield {**row, "status": "stopped", "reason": stop}
            continue
        predicted = predicted_call_s(ok, n)
        if predicted is not None and predicted > cfg.budget_s:
            row.update(status="over_budget", reason=f"one call predicted to take {predicted:.1f} s from N="
                       f"{ok[-1]['n']}, over the budget of {cfg.budget_s:g} s")
        else:
            try:
                row.update(measure_point(layer, n, cfg))
            except Exception as exc:  # recorded; oom and errors stop the mechanism
                row.update(_outcome(exc))
            finally:
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
        if row["status"] == "ok":
            ok.append(row)
        stop = _stop_reason(row, cfg.budget_s)
        progress(_progress_text(row))
        yield row


def run_complexity(cfg: ComplexityConfig, progress: Callable = print,
                   checkpoint: Callable[[list[dict], bool], None] | None = None) -> list[dict]:
    """The rows (dicts over :data:`COLUMNS`) of every mechanism in ``cfg``, in its order, at every size.

    ``checkpoint(rows, mechanism_done)``, when given, gets the rows so far after every point (to
    save them, so a run cut short keeps what it measured); ``mechanism_done`` is True after a
    mechanism's last size and at the end. A KeyboardInterrupt ends the run: the point it cut gets a
    row with status ``interrupted``, and the rows so far are checkpointed and returned.
    """
    rows = []
    save = checkpoint or (lambda rows_so_far, mechanism_done: None)
    try:
        for name in cfg.mechanisms:
            for row in sweep_mechanism(MECHANISMS[name], cfg, progress):
                rows.append(row)
                save(rows, row["n"] == cfg.sizes[-1])
    except KeyboardInterrupt:
        done = {(row["mechanism"], row["n"]) for row in rows}
        cut = [(name, n) for name in cfg.mechanisms for n in cfg.sizes if (name, n) not in done]
        if cut:
            rows.append({**_blank_row(MECHANISMS[cut[0][0]], cfg, cut[0][1]), "status": "interrupted",
                         "reason": "the run was interrupted here (KeyboardInterrupt)"})
            progress(_progress_text(rows[-1]))
        save(rows, True)
    return rows


def _progress_text(row: dict) -> str:
    detail = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
    return f"  {row['mechanism']} N={row['n']}: {detail}"


# --- the fit ----------------------------------------------------------------------------------

def fit_exponent(ns, values, min_n: int = 1) -> dict | None:
    """Least-squares slope of ``log value`` against ``log N`` over the points with ``N >= min_n``.

    Points with a missing or non-positive value are left out. Returns ``{"exponent", "min_n",
    "max_n", "points"}``, or None with fewer than two points of different N.
    """
    points = [(n, value) for n, value in zip(ns, values) if n >= min_n and value is not None and value > 0]
    if len({n for n, _ in points}) < 2:
        return None
    log_n = np.log([n for n, _ in points])
    log_v = np.log([value for _, value in points])
    slope = float(np.polyfit(log_n, log_v, 1)[0])
    return {"exponent": slope, "min_n": min(n for n, _ in points), "max_n": max(n for n, _ in points),
            "points": len(points)}


def fits(rows: list[dict], fit_min_n: int) -> list[dict]:
    """One dict over :data:`FIT_COLUMNS` per mechanism: the latency and memory exponents and the stop."""
    result = []
    for name in dict.fromkeys(row["mechanism"] for row in rows):
        mine = [row for row in rows if row["mechanism"] == name]
        ok = [row for row in mine if row["status"] == "ok"]
        latency = fit_exponent([r["n"] for r in ok], [r["median_ms"] for r in ok], fit_min_n)
        memory = fit_exponent([r["n"] for r in ok], [r["peak_mem_mib"] for r in ok], fit_min_n)
        stops = [r["reason"] for r in mine if r["status"] == "stopped"]
        stops += [_stop_reason(r, float("inf")) for r in mine if r["status"] in ("oom", "error", "over_budget",
                                                                                   "interrupted")]
        skipped = [r["reason"] for r in mine if r["status"] == "skipped"]
        result.append({
            "mechanism": name, "family": mine[0]["family"],
            "latency_exponent": latency and latency["exponent"], "memory_exponent": memory and memory["exponent"],
            "fit_min_n": latency and latency["min_n"], "fit_max_n": latency and latency["max_n"],
            "fit_points": latency["points"] if latency else 0,
            "stop": stops[0] if stops else (f"skipped: {skipped[0]}" if len(skipped) == len(mine) else ""),
        })
    return result

