"""Run a check on 2 or 3 processes of a gloo process group on localhost, and split bags into shards.

:func:`run_ranks` calls ``check(rank, world_size, *args)`` on ``world_size`` processes (``torch.multiprocessing``,
spawn) that have joined a gloo group: a pool of them kept for the session, or new ones when the check needs its own
environment. It raises, in the test, the failing ranks' tracebacks, and stops every rank still running after
``timeout`` seconds (or 20 s after another rank failed), so that a hang is a failure too.
"""

from __future__ import annotations

import atexit
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


def _join_group(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))


def _run_check(rank, world_size, check, args, results) -> None:
    try:
        check(rank, world_size, *args)
        results.put((rank, None))
    except BaseException:  # noqa: BLE001 -- reported to the test
        results.put((rank, traceback.format_exc()))


def _joined(rank, world_size, port, results) -> bool:
    """Join the gloo group; on failure, report it as this rank's result."""
    try:
        _join_group(rank, world_size, port)
        return True
    except BaseException:  # noqa: BLE001 -- reported to the test
        results.put((rank, traceback.format_exc()))
        return False


def _rank_main(rank, world_size, port, check, args, results):
    if _joined(rank, world_size, port, results):
        _run_check(rank, world_size, check, args, results)


def _pool_rank_main(rank, world_size, port, inbox, results):
    """A rank of a :class:`_RankPool`: joins the group once, then runs the checks it is sent until ``None``."""
    if not _joined(rank, world_size, port, results):
        return
    results.put((rank, None))
    for check, args in iter(inbox.get, None):
        _run_check(rank, world_size, check, args, results)


class _RankPool:
    """``world_size`` ranks kept alive across tests, so that each test does not pay for starting processes that
    import torch and Triton (about 4 s each on 2 cores). A pool whose check failed is closed, not reused: its
    ranks may still be inside a collective."""

    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.results = context.Queue()
        self.inboxes = [context.Queue() for _ in range(world_size)]
        port = _free_port()
        self.processes = [context.Process(target=_pool_rank_main, daemon=True,
                                          args=(rank, world_size, port, self.inboxes[rank], self.results))
                          for rank in range(world_size)]
        for process in self.processes:
            process.start()
        self.healthy = not _collect(self.results, world_size, timeout=600.0)

    def run(self, check, args, timeout: float) -> list[str]:
        for inbox in self.inboxes:
            inbox.put((check, args))
        failures = _collect(self.results, self.world_size, timeout)
        self.healthy = not failures
        return failures

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        _stop(self.processes)


_POOLS: dict[int, _RankPool] = {}


def _pool(world_size: int) -> _RankPool:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.healthy:
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _RankPool(world_size)
    return pool


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()


def _stop(processes) -> None:
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


def run_ranks(world_size: int, check, *args, timeout: float = 600.0, env: dict | None = None) -> None:
    """Run ``check(rank, world_size, *args)`` on ``world_size`` ranks; AssertionError with the failing rank's
    traceback if any rank fails or does not finish within ``timeout`` seconds. Without ``env`` the ranks are
    those of a pool kept for the session; with it, new processes that start with ``env`` set."""
    if env is None:
        failures = _pool(world_size).run(check, args, timeout)
    else:
        failures = _run_in_new_processes(world_size, check, args, timeout, env)
    assert not failures, "\n".join(failures)


def _run_in_new_processes(world_size: int, check, args, timeout: float, env: dict) -> list[str]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
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
    _stop(processes)
    return failures


# After a rank fails, how long the others get to finish: they may be waiting in a collective that never comes.
FAILURE_GRACE = 20.0


def _collect(results, world_size: int, timeout: float) -> list[str]:
    failures, finished = [], set()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while len(finished) < world_size:
        left = (deadline - datetime.datetime.now()).total_seconds()
        try:
            rank, failure = results.get(timeout=max(left, 0.1))
        except queue.Empty:
            missing = sorted(set(range(world_size)) - finished)
            waited = f"{FAILURE_GRACE:.0f} s after that failure" if failures else f"{timeout:.0f} s"
            return failures + [f"ranks {missing} did not finish within {waited}"]
        finished.add(rank)
        if failure:
            failures.append(f"rank {rank}:\n{failure}")
            deadline = min(deadline, datetime.datetime.now() + datetime.timedelta(seconds=FAILURE_GRACE))
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
