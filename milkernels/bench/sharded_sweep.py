"""``milkernels-bench sweep --world-size W``: the sequence-parallel ops on W ranks, one bag split across them.

Each op of :data:`SHARDED` runs on every rank with ``process_group=`` the group of W processes spawned here (NCCL
with one GPU per rank on a machine with W GPUs, else gloo on the CPU), each rank holding a contiguous shard of
the sweep's bag (``torch.tensor_split`` of the rows). A row per op, implementation, bag size and pass: the
slowest rank's median latency, and ``comm_bytes``, the most bytes one rank's collectives moved in one call
(:func:`milkernels.distributed.counting_communication`: all-reduced tensors' sizes, the bytes an all-to-all
brings to the rank). A failed case is an ``error`` row with its reason; the other cases go on.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import distributed
from .._backends import BackendUnavailable, use_backend
from ..ops import dilated_attention, gated_attention_pool, lin_mil_attention
from . import registry
from .dilated_attention import branches_of
from .query_attention import litemil_pool
from .sweep import PASSES, SweepConfig, dims_text, fwd_bwd_step, forward_step, grad_outputs, op_dims
from .timing import summarize, time_step

COLUMNS = ("op", "impl", "n", "pass", "world_size", "dtype", "dims", "status", "reason", "median_ms", "p20_ms",
           "p80_ms", "comm_bytes")
IMPLS = ("reference", "triton")


def _gated(inputs, group):
    return gated_attention_pool(*inputs, process_group=group)


def _linear(inputs, group):
    qkv, temperature = inputs
    return lin_mil_attention(qkv, temperature, temperature.numel(), process_group=group)


def _dilated(inputs, group):
    q, k, v, *markers = inputs
    return dilated_attention(q, k, v, *branches_of(markers), process_group=group)


def _litemil(inputs, group):
    return litemil_pool(*inputs, process_group=group)


SHARDED: dict[str, tuple[dict, Callable]] = {
    # op: ({input index: its row axis}, the op on a rank's inputs with a process group)
    "gated_attention": ({0: 0}, _gated),
    "litemil_pool": ({0: 1}, _litemil),
    "linear_attention_core": ({0: 1}, _linear),
    "dilated_attention": ({0: 1, 1: 1, 2: 1}, _dilated),
}


def run_sharded_sweep(cfg: SweepConfig, world_size: int, timeout_s: float = 3600.0) -> list[dict]:
    """Rows over :data:`COLUMNS` for the ops of ``cfg.ops`` in :data:`SHARDED` and the implementations of
    ``cfg.impls`` in :data:`IMPLS`, on ``world_size`` spawned ranks; ValueError for a GPU run with fewer GPUs."""
    if cfg.device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"--world-size {world_size} needs as many GPUs, this machine has {torch.cuda.device_count()}")
    context = mp.get_context("spawn")
    results = context.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, cfg, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        rows = results.get(timeout=timeout_s)
    except queue.Empty:
        rows = [_row("all", "all", 0, "all", world_size, cfg, status="error",
                     reason=f"the ranks did not finish within {timeout_s:.0f} s")]
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return rows


def _rank_main(rank: int, world_size: int, port: int, cfg: SweepConfig, results) -> None:
    """One rank: every case, then rank 0 puts the rows (or one error row) on ``results``."""
    try:
        device = torch.device("cuda", rank) if cfg.device.type == "cuda" else cfg.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))
        rows = [row for name in cfg.ops if name in SHARDED for n in cfg.sizes
                for row in _cases(registry.ops()[name], n, cfg, device)]
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 -- reported as a row
        traceback.print_exc()
        rows = [_row("all", "all", 0, "all", world_size, cfg, status="error", reason=f"rank {rank}: {exc}")]
    if rank == 0:
        results.put(rows)


def _cases(op: registry.Op, n: int, cfg: SweepConfig, device: torch.device) -> list[dict]:
    """The rows of one op and bag size on this rank (rank 0's are the ones kept)."""
    rows_axes, call = SHARDED[op.name]
    dims = op_dims(op, device, cfg.dims)
    inputs = _shard(op.build(n, dims, cfg.dtype, device), rows_axes)
    grads = grad_outputs(op, inputs)
    rows = []
    for impl in (name for name in IMPLS if name in cfg.impls):
        for pass_ in PASSES:
            row = _row(op.name, impl, n, pass_, dist.get_world_size(), cfg, dims=dims_text(dims))
            row.update(_measure(call, impl, inputs, grads, pass_, cfg, device))
            rows.append(row)
    return rows


def _shard(inputs: tuple, rows_axes: dict) -> tuple:
    """This rank's inputs: each per-row input cut to its contiguous shard, a leaf that takes gradients."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return tuple(torch.tensor_split(t.detach(), world_size, dim=rows_axes[i])[rank].contiguous().requires_grad_()
                 if i in rows_axes else t for i, t in enumerate(inputs))


def _measure(call, impl: str, inputs, grads, pass_: str, cfg: SweepConfig, device) -> dict:
    """Time one case on every rank; the slowest rank's latency, the most bytes a rank moved, or the first
    failure's reason (a failed rank's collectives time out on the others, which then fail too)."""
    group = dist.group.WORLD

    def fn(*tensors):
        with use_backend(impl):
            return call(tensors, group)

    reason = ""
    try:
        step = forward_step(fn, inputs) if pass_ == "fwd" else fwd_bwd_step(fn, inputs, grads)
        with distributed.counting_communication() as counts:
            step()
        summary = summarize(time_step(step, device, cfg.repeats, cfg.warmup))
    except BackendUnavailable as exc:
        reason, summary, counts = f"skipped: {exc}", {}, {}
    except Exception as exc:  # noqa: BLE001 -- a failed case is a row
        traceback.print_exc()
        reason, summary, counts = f"error: {type(exc).__name__}: {registry.first_line(exc)}", {}, {}
    finally:
        for tensor in inputs:
            tensor.grad = None
    return _agree(reason, summary, sum(counts.values()), device)


def _agree(reason: str, summary: dict, comm_bytes: int, device) -> dict:
    """The ranks' results combined: the largest of each figure, and a failure if any rank failed."""
    figures = [float(bool(reason)), summary.get("median_ms", 0.0), summary.get("p20_ms", 0.0),
               summary.get("p80_ms", 0.0), float(comm_bytes)]
    combined = torch.tensor(figures, dtype=torch.float64, device=device)
    dist.all_reduce(combined, op=dist.ReduceOp.MAX)
    failed, median, p20, p80, most_bytes = combined.tolist()
    if failed:
        status, _, why = (reason or "error: on another rank").partition(": ")
        return {"status": status, "reason": why}
    return {"status": "ok", "median_ms": median, "p20_ms": p20, "p80_ms": p80, "comm_bytes": int(most_bytes)}


def _row(op: str, impl: str, n: int, pass_: str, world_size: int, cfg: SweepConfig, **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(op=op, impl=impl, n=n, world_size=world_size, dtype=str(cfg.dtype).removeprefix("torch."),
               **{"pass": pass_}, **values)
    return row
