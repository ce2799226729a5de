"""Ahead-of-time compiles of shipped Triton specializations for a real GPU target (sm_90), with no GPU.

The tests run with TRITON_INTERPRET=1, under which kernels cannot be compiled, so the compiles run
in a child process with the interpreter off. A kernel module lists its specializations with
``shipped_specializations()``, yielding ``(kernel, signature, constexprs, launch)`` or
``(kernel, signature, constexprs, launch, aligned)``: ``launch`` is the number of warps, or a dict of the
launch's compile options (``num_warps``, ``num_stages``); ``aligned`` names the integer arguments that are
multiples of 16 at the sizes the specialization stands for.

Each compiles with the hints a real launch adds (Triton specializes on them at launch): every pointer
16-byte aligned and the ``aligned`` integers divisible by 16 (``tt.divisibility = 16``). The registers,
the spill stores and loads (bytes of STL / LDL in the SASS) and the shared memory of each come from the
cubin (``cuobjdump``). The test fails on a spill in an fp16 or bf16 specialization; an fp32 one that
spills only warns (they are listed in the README). The tests carry the ``aot`` marker: they take about
half an hour on two cores, and a GPU run deselects them (``-m "not aot"``).

Usage (what :func:`compile_all` runs): ``python tests/aot.py MODULE`` prints one JSON line per
specialization: ``{"name", "kernel", "constexprs", "dtype", "num_warps", "num_stages", "aligned", "shared",
"regs", "stack", "spills", "spill_loads", "error"}`` (spills in bytes; ``num_stages`` None for Triton's
default). ``python tests/aot.py --table MODULE...`` prints a markdown table of them (fast once the Triton
cache holds the compiles).
"""

import concurrent.futures
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

import pytest

TARGET_ARCH = 90
SHARED_MEMORY_LIMIT = 227 * 1024


def sm90_test(kernels_module):
    """A test, parametrized over ``kernels_module.shipped_specializations()``, that each compiles for sm_90
    within the shared-memory limit and, for fp16 and bf16, without spills; marked ``aot``. Assign it to a
    ``test_...`` name in the op's test module."""
    count = len(list(kernels_module.shipped_specializations()))
    ids = [f"{kernel.__name__}-{i}" for i, (kernel, *_) in enumerate(kernels_module.shipped_specializations())]

    @pytest.mark.aot
    @pytest.mark.parametrize("index", range(count), ids=ids)
    def test_compiles_for_sm90(index):
        results = compile_all(kernels_module.__name__)
        assert len(results) == count
        result = results[index]
        assert result["error"] is None, result
        assert result["shared"] <= SHARED_MEMORY_LIMIT, result
        if result["spills"] or result["spill_loads"]:
            assert result["dtype"] == "fp32", f"an {result['dtype']} specialization spills: {result}"
            warnings.warn(f"fp32 specialization spills (allowed, listed in the README): {result}")

    return test_compiles_for_sm90


@functools.lru_cache(maxsize=None)
def compile_all(module: str) -> tuple[dict, ...]:
    """Compile every specialization of ``module`` for sm_90 in a child process; one result dict each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, module], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compile of {module} failed:\n{done.stderr[-4000:]}")
    return tuple(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))


def _launch_attrs(kernel, signature: dict, aligned, backend) -> dict:
    """The argument attributes of a real launch, in ``ASTSource``'s form ``{(index,): [[name, value]]}``: the
    launcher's ``"D"`` (divisible by 16) for every pointer and for the ``aligned`` integers.

    ``backend.parse_attr`` turns the launcher's specialization string into attributes, as ``JITFunction``
    does (Triton 3.3 and later, 3.6 on the GPU machine included; earlier versions took an AttrsDescriptor).
    """
    unknown = [name for name in aligned if not signature.get(name, "").startswith(("i", "u"))]
    if unknown:
        raise ValueError(f"aligned names no integer argument of {kernel.__name__}: {unknown}")
    hinted = [name for name, ty in signature.items() if ty.startswith("*") or name in aligned]
    return {(kernel.arg_names.index(name),): backend.parse_attr("D") for name in hinted}


def _dtype(signature: dict) -> str:
    """The data type a specialization is for: fp16 or bf16 when a pointer has it, else fp32."""
    types = set(signature.values())
    return next((dtype for dtype in ("fp16", "bf16") if f"*{dtype}" in types), "fp32")


_LOCAL_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _local_bytes(sass: str, opcode: str) -> int:
    """Bytes moved by the ``opcode`` (STL or LDL) instructions of ``sass``, as ptxas counts spill bytes."""
    total = 0
    for suffix in re.findall(rf"\b{opcode}((?:\.\w+)*)\s", sass):
        total += next((_LOCAL_WIDTHS[part] for part in suffix.split(".") if part in _LOCAL_WIDTHS), 4)
    return total


def _resource_usage(cubin: bytes, kernel_name: str) -> dict:
    """``regs``, ``stack`` and spill store / load bytes of ``kernel_name`` in ``cubin``.

    One ``cuobjdump --dump-resource-usage``; only a kernel with a stack frame (Triton kernels have no local
    arrays, so spills) is disassembled to count its STL / LDL bytes.
    """
    import triton

    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # Triton before 3.4: no knobs; the CUDA toolkit's
        cuobjdump = "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], check=True, capture_output=True,
                               text=True).stdout
        functions = dict(re.findall(r"Function ([\w$.]+):\s*\n\s*(REG:.*)", usage))
        fields = dict(re.findall(r"(\w+):(\d+)", functions.get(kernel_name, next(iter(functions.values())))))
        result = dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), spills=0, spill_loads=0)
        if result["stack"] or int(fields.get("LOCAL", 0)):
            sass = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True, text=True).stdout
            result.update(spills=_local_bytes(sass, "STL"), spill_loads=_local_bytes(sass, "LDL"))
    return result


def _compile_one(module: str, index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    specializations = list(importlib.import_module(module).shipped_specializations())
    kernel, signature, constexprs, launch, *rest = specializations[index]
    options = launch if isinstance(launch, dict) else dict(num_warps=launch)
    aligned = sorted(rest[0]) if rest else []
    result = dict(name=f"{kernel.__name__}{constexprs}", kernel=kernel.__name__, constexprs=constexprs,
                  dtype=_dtype(signature), num_warps=options["num_warps"], num_stages=options.get("num_stages"),
                  aligned=aligned,
                  shared=None, regs=None, stack=None, spills=None, spill_loads=None, error=None)
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    try:
        attrs = _launch_attrs(kernel, signature, aligned, make_backend(target))
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options)
        if "cubin" not in compiled.asm:
            return dict(result, error="no cubin produced")
        result.update(shared=compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"], kernel.__name__))
    except Exception as exc:  # reported per specialization, so one failure names its configuration
        result.update(error=f"{type(exc).__name__}: {exc}"[:2000])
    return result


def _results(module: str):
    count = len(list(importlib.import_module(module).shipped_specializations()))
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        yield from pool.map(_compile_one, [module] * count, range(count))


_DTYPE_FLAGS = ("DOT_FP32", "FP32_PRECISION")  # follow from the dtype column


def _table(modules) -> str:
    """A markdown table of every specialization of ``modules``: registers, spills and shared memory."""
    lines = ["| module | kernel | dtype | warps | constexprs | aligned ints | regs | spill st/ld (B) | shared (B) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for module in modules:
        for result in _results(module):
            constexprs = " ".join(f"{k}={v}" for k, v in result["constexprs"].items() if k not in _DTYPE_FLAGS)
            spills = "error" if result["error"] else f"{result['spills']}/{result['spill_loads']}"
            stages = f" ({result['num_stages']} stages)" if result["num_stages"] else ""
            lines.append(f"| {module.split('.')[-2]} | {result['kernel']} | {result['dtype']} | "
                         f"{result['num_warps']}{stages} | {constexprs} | {' '.join(result['aligned'])} | "
                         f"{result['regs']} | {spills} | {result['shared']} |")
    return "\n".join(lines)


def _main(args: list[str]) -> None:
    if args[0] == "--table":
        print(_table(args[1:]))
        return
    for result in _results(args[0]):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
