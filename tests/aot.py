"""Ahead-of-time compiles of shipped Triton specializations for a real GPU target (sm_90), with no GPU.

The tests run with TRITON_INTERPRET=1, under which kernels cannot be compiled, so the compiles run
in a child process with the interpreter off. A kernel module lists its specializations with
``shipped_specializations()``, yielding ``(kernel, signature, constexprs, num_warps)``.

Usage (what :func:`compile_all` runs): ``python tests/aot.py MODULE`` prints one JSON line per
specialization: ``{"name", "shared", "error"}``.
"""

import concurrent.futures
import functools
import importlib
import json
import os
import subprocess
import sys

import pytest

TARGET_ARCH = 90
SHARED_MEMORY_LIMIT = 227 * 1024


def sm90_test(kernels_module):
    """A test, parametrized over ``kernels_module.shipped_specializations()``, that each compiles for sm_90
    within the shared-memory limit. Assign it to a ``test_...`` name in the op's test module."""
    count = len(list(kernels_module.shipped_specializations()))
    ids = [f"{kernel.__name__}-{i}" for i, (kernel, *_) in enumerate(kernels_module.shipped_specializations())]

    @pytest.mark.parametrize("index", range(count), ids=ids)
    def test_compiles_for_sm90(index):
        results = compile_all(kernels_module.__name__)
        assert len(results) == count
        assert results[index]["error"] is None, results[index]
        assert results[index]["shared"] <= SHARED_MEMORY_LIMIT, results[index]

    return test_compiles_for_sm90


@functools.lru_cache(maxsize=None)
def compile_all(module: str) -> tuple[dict, ...]:
    """Compile every specialization of ``module`` for sm_90 in a child process; one result dict each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, module], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compile of {module} failed:\n{done.stderr[-4000:]}")
    return tuple(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))


def _compile_one(module: str, index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, num_warps = list(importlib.import_module(module).shipped_specializations())[index]
    name = f"{kernel.__name__}{constexprs}"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", TARGET_ARCH, 32), options=dict(num_warps=num_warps))
    except Exception as exc:  # reported per specialization, so one failure names its configuration
        return dict(name=name, shared=None, error=f"{type(exc).__name__}: {exc}"[:2000])
    error = None if "cubin" in compiled.asm else "no cubin produced"
    return dict(name=name, shared=compiled.metadata.shared, error=error)


def _main(module: str) -> None:
    count = len(list(importlib.import_module(module).shipped_specializations()))
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for result in pool.map(_compile_one, [module] * count, range(count)):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
