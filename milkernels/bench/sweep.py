"""The sweep: every op × implementation × bag size × pass, one row each.

The passes are ``fwd`` (inference: the op under ``torch.no_grad``) and ``fwd_bwd`` (the op with
autograd, then ``backward`` of fixed random output gradients; the input gradients are dropped
after each call). A row's ``status`` is ``ok``; ``skipped`` when the implementation cannot run
here (:class:`~.registry.Skip`, :class:`milkernels.BackendUnavailable`, or an ``ImportError`` of
its module: a backend not built, a peer library not installed); ``oom``; or ``error`` for any
other exception, ``torch.compile``'s failures included. ``reason`` says why in one line; a failed
case never stops the sweep. With a log file, each case's stderr output (inductor's logs, warnings)
and each error's full traceback go there instead of the terminal.

The triton rows also get ``kernel_traffic`` and ``kernel_recompute``: the bytes its Triton kernels request
over ``min_bytes``, and their dot FLOPs over ``flops``, counted once per op and pass under the Triton
interpreter on a bag of :data:`~.traffic.TRAFFIC_ROWS` (:mod:`.traffic`; PyTorch GEMMs around or inside an op
are in neither).

An ok row is ``noisy`` when its p20-p80 spread is over :data:`~.timing.NOISY_SPREAD` of its
median, or when its ``fwd_bwd`` measured faster than its ``fwd`` (both rows); ``reason`` says which.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .._backends import BackendUnavailable, use_backend
from . import registry, traffic
from .registry import first_line
from .roofline import Peak, floor_seconds, roofline_pct
from .timing import NOISY_SPREAD, peak_memory_mib, relative_spread, summarize, time_step

PASSES = ("fwd", "fwd_bwd")
COLUMNS = ("op", "impl", "n", "pass", "dtype", "dims", "status", "reason", "noisy", "median_ms", "p20_ms", "p80_ms",
           "repeats", "peak_mem_mib", "flops", "min_bytes", "tflops", "gbps", "floor_ms", "roofline_pct",
           "speedup_vs_eager", "mem_ratio_vs_eager", "kernel_traffic", "kernel_recompute")


@dataclass(frozen=True)
class SweepConfig:
    """What to run: op and implementation names, bag sizes, dtype, device and timing settings.

    ``dims`` overrides the ops' default sizes (a key applies to every op that has it); ``peak`` is
    None where no roofline is known (a CPU, an unknown GPU). ``traffic``: count the triton rows' kernel
    traffic and recompute factors (:mod:`.traffic`, under the interpreter, at its bag size).
    """

    ops: tuple
    impls: tuple
    sizes: tuple
    dtype: torch.dtype
    device: torch.device
    dims: dict
    repeats: int
    warmup: int
    peak: Peak | None
    traffic: bool = True


def op_dims(op: registry.Op, device: torch.device, overrides: dict) -> dict:
    """The op's sizes on ``device``: its GPU or CPU defaults, with ``overrides`` for the keys it has."""
    dims = dict(op.gpu_dims if device.type == "cuda" else op.cpu_dims)
    dims.update({key: value for key, value in overrides.items() if key in dims})
    return dims


def dims_text(dims: dict) -> str:
    """``{"L": 1024, "D": 256}`` as ``"L=1024 D=256"``."""
    return " ".join(f"{key}={value}" for key, value in dims.items())


def run_sweep(cfg: SweepConfig, checkpoint: Callable[[list[dict]], None] | None = None,
              log_path: Path | None = None) -> list[dict]:
    """Time every case; one row (a dict over :data:`COLUMNS`) per op, implementation, size and pass.

    ``checkpoint(rows)``, when given, gets the rows so far after each bag size (to save them, so
    a run cut short keeps what it measured). ``log_path``, when given, is the log file (written
    anew) that gets each case's stderr output and each error's traceback; else they go to stderr.
    """
    rows = []
    with _open_log(log_path) as log:
        for op_name in cfg.ops:
            op = registry.ops()[op_name]
            makers = {name: maker for name, maker in registry.impls(op).items() if name in cfg.impls}
            dims = op_dims(op, cfg.device, cfg.dims)
            factors = _kernel_factors(op, dims, cfg, log) if cfg.traffic and "triton" in makers else {}
            for n in cfg.sizes:
                rows += _sweep_case(op, n, dims, makers, cfg, log, factors)
                add_ratios(rows)
                flag_noisy(rows)
                if checkpoint is not None:
                    checkpoint(rows)
    return rows


def _kernel_factors(op: registry.Op, dims: dict, cfg: SweepConfig, log: TextIO | None) -> dict:
    """The triton kernels' traffic and recompute factors per pass (:func:`.traffic.factors_in_subprocess` at
    :data:`.traffic.TRAFFIC_ROWS`); empty, the failure logged, if counting fails."""
    try:
        return traffic.factors_in_subprocess(op.name, traffic.TRAFFIC_ROWS, dims, cfg.dtype)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"{op.name}: {first_line(exc)}", file=log or sys.stderr)
        return {}


def _open_log(log_path: Path | None):
    """``log_path`` opened for writing, line-buffered, its folder created; a null context for None."""
    if log_path is None:
        return contextlib.nullcontext()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return open(log_path, "w", buffering=1)


@contextlib.contextmanager
def _stderr_into(log: TextIO | None, title: str):
    """Inside, stderr goes to ``log`` after a ``title`` line; with no log it is left alone.

    Both Python's ``sys.stderr`` and file descriptor 2 (written to by native code, by logging
    handlers made earlier and by child processes started inside) are redirected.
    """
    if log is None:
        yield
        return
    print(f"== {title}", file=log)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stderr(log):
            yield
    finally:
        log.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def _sweep_case(op, n, dims, makers, cfg, log, factors):
    """The rows of one bag size: the inputs built once, then every implementation and pass on them; the triton
    rows get ``factors[pass]``."""
    rows = []
    with _stderr_into(log, f"{op.name} N={n}: building the inputs"):
        try:
            inputs = op.build(n, dims, cfg.dtype, cfg.device)
            grads = grad_outputs(op, inputs)
        except torch.OutOfMemoryError:
            inputs = grads = None
    for impl, maker in makers.items():
        for pass_ in PASSES:
            row = _blank_row(op, impl, n, pass_, dims, cfg.dtype)
            row.update(factors.get(pass_, {}) if impl == "triton" else {})
            with _stderr_into(log, _case_text(row)):
                row.update(_measure(op, maker, inputs, grads, pass_, cfg) if inputs is not None
                           else {"status": "oom", "reason": "building the inputs ran out of memory"})
            if row["status"] == "ok":
                row.update(_rates(row, cfg))
            rows.append(row)
            _progress(row)
    del inputs, grads
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _blank_row(op, impl, n, pass_, dims, dtype) -> dict:
    """A row with the case's names and formula counts filled in, the measurements None."""
    backward = pass_ == "fwd_bwd"
    row = dict.fromkeys(COLUMNS)
    row.update({"op": op.name, "impl": impl, "n": n, "pass": pass_, "dtype": str(dtype).removeprefix("torch."),
                "dims": dims_text(dims), "flops": op.flops(n, dims, backward),
                "min_bytes": op.min_bytes(n, dims, dtype.itemsize, backward)})
    return row


def _measure(op, maker, inputs, grads, pass_, cfg) -> dict:
    """``status`` and, when ok, the latency summary and peak memory of one implementation and pass."""
    try:
        fn = maker(op)
        step = forward_step(fn, inputs) if pass_ == "fwd" else fwd_bwd_step(fn, inputs, grads)
        samples = time_step(step, cfg.device, cfg.repeats, cfg.warmup)
        peak = peak_memory_mib(step, cfg.device)
    except (registry.Skip, BackendUnavailable) as exc:
        return {"status": "skipped", "reason": str(exc)}
    except ImportError as exc:  # a backend module not built or not written yet
        return {"status": "skipped", "reason": f"ImportError: {first_line(exc)}"}
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "reason": first_line(exc)}
    except Exception as exc:  # a broken implementation is recorded and the sweep goes on
        traceback.print_exc()  # into the log, when there is one
        return {"status": "error", "reason": f"{type(exc).__name__}: {first_line(exc)}"}
    finally:
        for tensor in inputs:
            tensor.grad = None
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "repeats": len(samples), "peak_mem_mib": peak, **summarize(samples)}


def _rates(row, cfg) -> dict:
    """Achieved TFLOP/s and GB/s of an ok row, and its roofline floor and % when a peak is known."""
    seconds = row["median_ms"] / 1e3
    rates = {"tflops": row["flops"] / seconds / 1e12, "gbps": row["min_bytes"] / seconds / 1e9}
    floor = floor_seconds(row["flops"], row["min_bytes"], cfg.peak, cfg.dtype) if cfg.peak else None
    if floor is not None:
        rates.update(floor_ms=floor * 1e3, roofline_pct=roofline_pct(floor, seconds))
    return rates


def add_ratios(rows: list[dict]) -> None:
    """Set each row's speedup and memory ratio against the eager reference at the same op, size and pass."""
    eager = {(r["op"], r["n"], r["pass"]): r for r in rows if r["impl"] == "reference" and r["status"] == "ok"}
    for row in rows:
        base = eager.get((row["op"], row["n"], row["pass"]))
        if base is None or row["status"] != "ok":
            continue
        row["speedup_vs_eager"] = base["median_ms"] / row["median_ms"]
        if row["peak_mem_mib"] is not None and base["peak_mem_mib"]:
            row["mem_ratio_vs_eager"] = row["peak_mem_mib"] / base["peak_mem_mib"]


def flag_noisy(rows: list[dict]) -> None:
    """Set ``noisy`` on each ok row, with ``reason`` saying why when it is (see the module doc)."""
    medians = {(r["op"], r["impl"], r["n"], r["pass"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok":
            reasons = _noise_reasons(row, medians)
            row.update(noisy=bool(reasons), reason="; ".join(reasons) or None)


def _noise_reasons(row: dict, medians: dict) -> list[str]:
    """Why an ok row is noisy: its spread, and its fwd_bwd measured faster than its fwd."""
    spread = relative_spread(row)
    reasons = [f"p20-p80 spread {spread:.0%} of the median"] if spread > NOISY_SPREAD else []
    fwd, fwd_bwd = (medians.get((row["op"], row["impl"], row["n"], pass_)) for pass_ in PASSES)
    if fwd is not None and fwd_bwd is not None and fwd_bwd < fwd:
        reasons.append(f"fwd_bwd measured faster than fwd ({fwd_bwd:.3f} < {fwd:.3f} ms)")
    return reasons


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def grad_outputs(op: registry.Op, inputs: tuple) -> list[torch.Tensor]:
    """Random gradients, one per floating output of the op, shaped as the reference's outputs. The shapes come
    from fake tensors where the op runs on them (a real reference run may not fit in memory where the op
    does), else from a real reference run (an op that builds modules inside)."""
    device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
    return [torch.randn(shape, dtype=dtype, device=device) for shape, dtype in _output_shapes(op, inputs)]


def _output_shapes(op: registry.Op, inputs: tuple) -> list:
    """``(shape, dtype)`` of each floating output of ``op.call(*inputs)`` on the reference backend."""
    mode = FakeTensorMode()
    try:
        fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        with mode, torch.no_grad(), use_backend("reference"):
            outputs = _as_tuple(op.call(*fake_inputs))
    except RuntimeError:  # fake tensors cannot build a module's parameters: run it for real
        with torch.no_grad(), use_backend("reference"):
            outputs = _as_tuple(op.call(*inputs))
    return [(out.shape, out.dtype) for out in outputs if out.is_floating_point()]


def forward_step(fn, inputs: tuple):
    """One inference call ``fn(*inputs)`` under ``torch.no_grad``."""

    def step():
        with torch.no_grad():
            fn(*inputs)

    return step


def fwd_bwd_step(fn, inputs: tuple, grads: list[torch.Tensor]):
    """One training call: ``fn(*inputs)``, backward of ``grads``, then the input gradients dropped."""

    def step():
        outputs = [out for out in _as_tuple(fn(*inputs)) if out.is_floating_point()]
        torch.autograd.backward(outputs, grads)
        for tensor in inputs:
            tensor.grad = None

    return step


def flop_check(op: registry.Op, dims: dict, n: int = 128) -> dict:
    """Matmul FLOPs counted by ``FlopCounterMode`` on the eager reference over ``op.flops``, per pass.

    The counter sees matmuls only, as the formula counts; run on the CPU in float32 at ``n``.
    Returns ``{"n": n, "fwd": ratio, "fwd_bwd": ratio}``; 1.0 means they agree.
    """
    inputs = op.build(n, dims, torch.float32, torch.device("cpu"))
    reference = registry.GENERIC_IMPLS["reference"](op)
    steps = {"fwd": forward_step(reference, inputs),
             "fwd_bwd": fwd_bwd_step(reference, inputs, grad_outputs(op, inputs))}
    ratios = {"n": n}
    for pass_, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        ratios[pass_] = counter.get_total_flops() / op.flops(n, dims, pass_ == "fwd_bwd")
    return ratios


def _case_text(row: dict) -> str:
    return f"{row['op']} {row['impl']} N={row['n']} {row['pass']}"


def _progress(row: dict) -> None:
    detail = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
    print(f"  {_case_text(row)}: {detail}", file=sys.stderr, flush=True)
