"""Command line: ``python -m milkernels.bench [sweep|complexity] [options]``, also installed as ``milkernels-bench``.

``sweep`` (the default subcommand) times every registered op under every implementation over bag
sizes, prints a table and writes ``results.csv``, ``results.json`` and ``sweep.log`` (the failures'
tracebacks and the implementations' stderr output) into ``--out`` (default
``benchmarks/results/<UTC stamp>-<device>/`` under the current directory). Sizes take ``k`` (1024)
and ``M`` (1024²) suffixes: ``--sizes 1k,100000,1M``. It exits 1 when an implementation failed
with an error, ``torch.compile`` included (skips, out-of-memory and noisy rows are expected
outcomes, exit 0).

``complexity`` sweeps one attention layer per mechanism (softmax, Nystrom, linear, dilated) over
N, forward + backward, until it runs out of memory or time, fits the exponents of latency and peak
memory in N and writes ``complexity.csv``, ``.json``, ``.md`` and ``.png`` (see :mod:`.complexity`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from . import complexity, complexity_report, profile_cli, registry, report, sharded_sweep
from .roofline import device_peak
from .sweep import SweepConfig, dims_text, flop_check, op_dims, run_sweep

GPU_SIZES = (1024, 4096, 16384, 65536, 100000, 262144, 1048576)
CPU_SIZES = (1024, 4096, 16384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUBCOMMANDS = ("sweep", "complexity", "profile")
# GPU budget: a point takes about the budget at most, so a run takes at most about 11 mechanisms x 8 sizes x 5 s
# = 440 s; benchmarks/gpu.sh gives it 450 (COMPLEXITY_TIMEOUT)
COMPLEXITY_GPU = {"sizes": (1024, 4096, 8192, 16384, 32768, 65536, 262144, 1048576), "dims": {"C": 512, "H": 8},
                  "repeats": 10, "warmup": 3, "budget_s": 5.0, "fit_min_n": 16384}
COMPLEXITY_CPU = {"sizes": (256, 512, 1024, 2048, 4096), "dims": {"C": 256, "H": 8}, "repeats": 3, "warmup": 1,
                  "budget_s": 8.0, "fit_min_n": 1024}


def parse_size(text: str) -> int:
    """``"16k"`` -> 16384, ``"1M"`` -> 1048576, ``"100000"`` -> 100000."""
    units = {"k": 2**10, "K": 2**10, "M": 2**20}
    try:
        n = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad bag size {text!r}; use e.g. 1000, 4k or 1M") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"bag size must be positive, got {text!r}")
    return n


def _comma_list(parse):
    return lambda text: tuple(parse(item.strip()) for item in text.split(",") if item.strip())


def _dim(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use NAME=POSITIVE_INT, e.g. L=512")
    return key.strip(), int(value)


def _at_least(lowest: int):
    def check(text: str) -> int:
        if not text.strip().isdigit() or int(text) < lowest:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}")
        return int(text)
    return check


def _choices(allowed):
    def check(name: str) -> str:
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"unknown name {name!r}; expected one of {', '.join(allowed)}")
        return name
    return check


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per subcommand."""
    ops = registry.ops()
    impl_names = tuple(dict.fromkeys(name for op in ops.values() for name in registry.impls(op)))
    parser = argparse.ArgumentParser(prog="milkernels-bench", description="Benchmarks of the milkernels ops.",
                                     epilog="`sweep` is the default subcommand; `milkernels-bench sweep -h` lists "
                                            "its options.")
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="time every op and implementation over bag sizes (default)")
    sweep.add_argument("--ops", type=_comma_list(_choices(tuple(ops))), default=tuple(ops),
                       help=f"comma-separated ops (default: all: {','.join(ops)})")
    sweep.add_argument("--impls", type=_comma_list(_choices(impl_names)), default=impl_names,
                       help=f"comma-separated implementations (default: all: {','.join(impl_names)})")
    sweep.add_argument("--sizes", type=_comma_list(parse_size),
                       help="comma-separated bag sizes N (default: 1k..1M on a GPU, 1k,4k,16k on a CPU)")
    sweep.add_argument("--dims", type=_comma_list(_dim), default=(),
                       help="override op sizes, e.g. L=512,D=128,K=2 (default: "
                            + "; ".join(f"{name} {dims_text(op.gpu_dims)} on a GPU, {dims_text(op.cpu_dims)} on a CPU"
                                        for name, op in ops.items()) + ")")
    sweep.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    sweep.add_argument("--device", help="default: cuda when a GPU is visible, else cpu")
    sweep.add_argument("--repeats", type=_at_least(1), help="timed calls per case (default: 30 on a GPU, 5 on a CPU)")
    sweep.add_argument("--warmup", type=_at_least(0), help="untimed calls first (default: 5 on a GPU, 2 on a CPU)")
    sweep.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<stamp>-<device>/)")
    sweep.add_argument("--no-compile", action="store_true", help="leave out reference_compiled")
    sweep.add_argument("--no-traffic", action="store_true",
                       help="leave out the triton rows' kernel traffic and recompute factors (counted on the CPU)")
    sweep.add_argument("--peak-tflops", type=float, help="matmul peak for the roofline, overriding the table")
    sweep.add_argument("--peak-gbps", type=float, help="memory bandwidth for the roofline, overriding the table")
    sweep.add_argument("--world-size", type=_at_least(1), default=1,
                       help="above 1: the sequence-parallel ops (gated attention, LiteMIL pooling, linear attention, "
                            "dilated attention) with one bag split over this many spawned ranks (one GPU each, else "
                            "gloo on the CPU), their latency and communicated bytes, into sharded.csv")
    sweep.set_defaults(func=sweep_command)
    _add_complexity(commands)
    profile_cli.add_parser(commands, parse_size, DTYPES, default_out)
    return parser


def _add_complexity(commands) -> None:
    """The ``complexity`` subcommand's options."""
    names = tuple(complexity.MECHANISMS)
    gpu, cpu = COMPLEXITY_GPU, COMPLEXITY_CPU
    parser = commands.add_parser("complexity", help="latency and memory against N per attention mechanism, "
                                                    "with fitted exponents, a table and a plot")
    parser.add_argument("--mechanisms", type=_comma_list(_choices(names)), default=names,
                        help=f"comma-separated mechanisms (default: all: {','.join(names)})")
    parser.add_argument("--sizes", type=_comma_list(parse_size),
                        help="comma-separated ascending bag sizes N (default: 1k,4k,8k,16k,32k,64k,256k,1M on a GPU, "
                             "256,512,1k,2k,4k on a CPU)")
    parser.add_argument("--dims", type=_comma_list(_dim), default=(),
                        help=f"C (channels) and H (heads), e.g. C=512,H=8 (default: {dims_text(gpu['dims'])} on a "
                             f"GPU, {dims_text(cpu['dims'])} on a CPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--device", help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--repeats", type=_at_least(1), help=f"timed calls per point at most (default: "
                        f"{gpu['repeats']} on a GPU, {cpu['repeats']} on a CPU; fewer when the budget is short)")
    parser.add_argument("--warmup", type=_at_least(0), help=f"untimed calls after the first (default: "
                        f"{gpu['warmup']} on a GPU, {cpu['warmup']} on a CPU)")
    parser.add_argument("--budget-s", type=float, help=f"seconds one point may take; a mechanism stops after "
                        f"the first point over it or predicted over it (default: {gpu['budget_s']:g} on a GPU, "
                        f"{cpu['budget_s']:g} on a CPU)")
    parser.add_argument("--fit-min-n", type=parse_size, help="fit the exponents over points with N >= this, above "
                        f"launch-overhead floors (default: {report.size_text(gpu['fit_min_n'])} on a GPU, "
                        f"{report.size_text(cpu['fit_min_n'])} on a CPU)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<stamp>-complexity-<device>/)")
    parser.set_defaults(func=complexity_command)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The sweep settings from parsed arguments, device-dependent defaults filled in."""
    known = {key for name in args.ops for key in registry.ops()[name].gpu_dims}
    unknown = sorted(set(dict(args.dims)) - known)
    if unknown:
        raise SystemExit(f"milkernels-bench: --dims names {', '.join(unknown)}, which no selected op has "
                         f"(they have {', '.join(sorted(known))})")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    impls = tuple(name for name in args.impls if not (args.no_compile and name == "reference_compiled"))
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    return SweepConfig(ops=args.ops, impls=impls, sizes=args.sizes or (GPU_SIZES if on_gpu else CPU_SIZES),
                       dtype=DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")], device=device,
                       dims=dict(args.dims), repeats=args.repeats or (30 if on_gpu else 5), warmup=warmup,
                       peak=device_peak(report.device_name(device), args.peak_tflops, args.peak_gbps),
                       traffic=not args.no_traffic)


def _dims_note(op: registry.Op, dims: dict) -> str:
    note = dims_text(dims)
    if dims != op.gpu_dims:
        note += f" (not the GPU default {dims_text(op.gpu_dims)})"
    return note


def default_out(meta: dict, device: torch.device, kind: str = "") -> Path:
    """``benchmarks/results/<UTC stamp>[-<kind>]-<device slug or cpu>`` under the current directory."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = report.slug(meta["device"]) if device.type == "cuda" else "cpu"
    return Path("benchmarks", "results", "-".join(part for part in (stamp, kind, name) if part))


def sweep_command(args: argparse.Namespace, command: str) -> int:
    """Run the sweep, write the results and print the table; 1 if an implementation failed with an error."""
    cfg = config_from_args(args)
    ops = registry.ops()
    dims = {name: op_dims(ops[name], cfg.device, cfg.dims) for name in cfg.ops}
    meta = report.metadata(cfg, {name: _dims_note(ops[name], dims[name]) for name in cfg.ops},
                           {name: flop_check(ops[name], dims[name]) for name in cfg.ops}, command)
    out = args.out or default_out(meta, cfg.device)
    if args.world_size > 1:
        return _sharded_sweep(cfg, args.world_size, meta, out)
    rows = run_sweep(cfg, checkpoint=lambda rows_so_far: report.write_results(out, meta, rows_so_far),
                     log_path=out / report.SWEEP_LOG)
    print(report.format_table(rows, meta))
    print("\n" + report.outcome_text(rows, out))
    return 1 if any(row["status"] == "error" for row in rows) else 0


def _sharded_sweep(cfg: SweepConfig, world_size: int, meta: dict, out: Path) -> int:
    """The sequence-parallel sweep (:mod:`.sharded_sweep`): ``sharded.csv`` and ``.json`` in ``out``, a table;
    1 if a case failed with an error."""
    rows = sharded_sweep.run_sharded_sweep(cfg, world_size)
    report.write_table(out, "sharded", {**meta, "world_size": world_size}, sharded_sweep.COLUMNS, rows)
    for row in rows:
        figures = (f"{row['median_ms']:10.3f} ms {row['comm_bytes']:>12} B" if row["status"] == "ok"
                   else f"{row['status']}: {row['reason']}")
        print(f"{row['op']:24} {row['impl']:10} N={row['n']:<8} {row['pass']:8} W={world_size}  {figures}")
    print(f"\nwrote {out / 'sharded.csv'}")
    return 1 if any(row["status"] == "error" for row in rows) else 0


def complexity_config(args: argparse.Namespace) -> complexity.ComplexityConfig:
    """The complexity settings from parsed arguments, device-dependent defaults filled in."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    defaults = COMPLEXITY_GPU if on_gpu else COMPLEXITY_CPU
    dims = {**defaults["dims"], **dict(args.dims)}
    if set(dims) != {"C", "H"} or dims["C"] % dims["H"]:
        raise SystemExit(f"milkernels-bench complexity: --dims takes C and H with H dividing C, got {dims_text(dims)}")
    sizes = args.sizes or defaults["sizes"]
    if list(sizes) != sorted(set(sizes)):
        raise SystemExit("milkernels-bench complexity: --sizes must be ascending (a mechanism stops at the first "
                         "size it cannot run)")
    given = {key: getattr(args, key) for key in ("repeats", "warmup", "budget_s", "fit_min_n")}
    return complexity.ComplexityConfig(
        mechanisms=args.mechanisms, sizes=tuple(sizes), dims=dims, dtype=DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")],
        device=device, **{key: defaults[key] if value is None else value for key, value in given.items()})


def complexity_command(args: argparse.Namespace, command: str) -> int:
    """Run the complexity sweep, writing the outputs after every point, and print the table with the fits.

    Returns 130 when the run was interrupted (its outputs hold what it measured), else 1 on an error.
    """
    cfg = complexity_config(args)
    dims_note = dims_text(cfg.dims) + ("" if cfg.dims == COMPLEXITY_GPU["dims"]
                                       else f" (not the GPU default {dims_text(COMPLEXITY_GPU['dims'])})")
    meta = {**report.run_metadata(cfg.device, cfg.dtype, command), "mechanisms": list(cfg.mechanisms),
            "sizes": list(cfg.sizes), "dims": dims_note, "repeats": cfg.repeats, "warmup": cfg.warmup,
            "budget_s": cfg.budget_s, "fit_min_n": cfg.fit_min_n}
    out = args.out or default_out(meta, cfg.device, "complexity")
    rows = complexity.run_complexity(
        cfg, progress=lambda text: print(text, file=sys.stderr, flush=True),
        checkpoint=lambda rows_so_far, with_plot: complexity_report.write_outputs(out, meta, rows_so_far,
                                                                                  cfg.fit_min_n, with_plot))
    fit_rows, meta = complexity_report.fitted(rows, meta, cfg.fit_min_n)
    print(complexity_report.format_table(rows, fit_rows, meta))
    print("\nwrote " + ", ".join(str(out / f"complexity.{ext}") for ext in complexity_report.EXTENSIONS))
    if any(row["status"] == "interrupted" for row in rows):
        return 130
    return 1 if any(row["status"] == "error" for row in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m milkernels.bench`` and ``milkernels-bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv.insert(0, "sweep")
    args = build_parser().parse_args(argv)
    return args.func(args, "milkernels-bench " + " ".join(argv))


if __name__ == "__main__":
    sys.exit(main())
