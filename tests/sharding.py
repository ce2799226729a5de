"""Run a check on 2 or 3 processes of a gloo process group on localhost, and split bags into shards.

:func:`run_ranks` spawns ``world_size`` processes (``torch.multiprocessing``, spawn), each of which joins a gloo
group and calls ``check(rank, world_size, *args)``; it raises, in the test, the first rank's failure with its
traceback, and kills every rank still running after ``timeout`` seconds, so that a hang is a failure too.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Rows per rank for a bag of N rows: uneven, and on 3 ranks one empty shard.
SHARDS = {2: (20, 17), 3: (13, 0, 24)}


def device() -> torch.device:
    """The device of the kernel tests (see conftest.py)."""
    return torch.device("cuda" if os.environ.get("MILKERNELS_TEST_GPU") == "1" else "cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, check, args, results):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        check(rank, world_size, *args)
        results.put((rank, None))
    except BaseException:  # noqa: BLE001 -- reported to the test
        results.put((rank, traceback.format_exc()))


def run_ranks(world_size: int, check, *args, timeout: float = 600.0, env: dict | None = None) -> None:
    """Run ``check(rank, world_size, *args)`` on ``world_size`` ranks; AssertionError with the failing rank's
    traceback if any rank fails or does not finish within ``timeout`` seconds."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    saved = {name: os.environ.get(name) for name in (env or {})}
    os.environ.update(env or {})
    try:
        processes = [context.Process(target=_rank_main, args=(rank, world_size, port, check, args, results))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    failures = _collect(results, world_size, timeout)
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    assert not failures, "\n".join(failures)


def _collect(results, world_size: int, timeout: float) -> list[str]:
    failures, finished = [], set()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while len(finished) < world_size:
        left = (deadline - datetime.datetime.now()).total_seconds()
        try:
            rank, failure = results.get(timeout=max(left, 0.1))
        except queue.Empty:
            missing = sorted(set(range(world_size)) - finished)
            return failures + [f"ranks {missing} did not finish within {timeout:.0f} s"]
        finished.add(rank)
        if failure:
            failures.append(f"rank {rank}:\n{failure}")
    return failures


def shard_rows(rank: int, world_size: int) -> slice:
    """The rows of a bag of ``sum(SHARDS[world_size])`` rows that ``rank`` holds."""
    sizes = SHARDS[world_size]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def bag_rows(world_size: int) -> int:
    """N of the bags that :data:`SHARDS` splits."""
    return sum(SHARDS[world_size])


def assert_close(actual, expected, what: str, **tolerances) -> None:
    """``torch.testing.assert_close`` in float64 with ``what`` in the message."""
    torch.testing.assert_close(actual.double(), expected.double(), msg=lambda message: f"{what}: {message}",
                               **tolerances)
