"""``python -m milkernels.bench profile``: profile models of the zoo (or the user's) on bags, layer by layer.

    python -m milkernels.bench profile slides/            # every .h5/.pt bag in a folder, CLAM_SB
    python -m milkernels.bench profile bag.h5 --model clam_sb,litemil
    python -m milkernels.bench profile --synthetic 100000 --model all
    python -m milkernels.bench profile bag.pt --model mypackage.models:build_model

Each model and bag gets a folder ``<out>/<model>[-<bag>]/`` with ``profile.csv``, ``.json``, ``.md`` and
``.png``; ``<out>/summary.md`` and ``summary.csv`` hold the whole-model rows of all of them, and
``<out>/profile.log`` the tracebacks of failed runs. A model that cannot run here (a package not
installed) is skipped with the reason; one that fails is an ``error``, and the exit code is then 1.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import inspect
import sys
import traceback
from pathlib import Path

import torch

from .bags import BagError, iter_bags, synthetic_bag
from .profile import profile
from .profile_report import format_table, write_outputs
from .registry import first_line

DEFAULT_MODEL = "clam_sb"


def add_parser(commands, parse_size, dtypes: dict, default_out) -> None:
    """The ``profile`` subcommand's options (``parse_size`` reads ``100000``, ``4k``, ``1M``; ``dtypes`` maps
    ``--dtype`` names to dtypes; ``default_out(meta, device, kind)`` is the output folder without ``--out``)."""
    from .. import zoo

    parser = commands.add_parser("profile", help="latency, memory, saved bytes and FLOPs of a model on a bag, per "
                                                 "layer, as given against milkernels.swap")
    parser.add_argument("bag", nargs="?", type=Path, help="a .h5 (CLAM/TRIDENT) or .pt bag file, or a folder of them")
    parser.add_argument("--synthetic", type=parse_size, metavar="N", help="a random bag of N patches instead of BAG")
    parser.add_argument("--dim", type=int, help="the synthetic bag's feature size (default: each model's own)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"comma-separated zoo models ({', '.join(zoo.MODELS)}) or 'all', or module:factory "
                             f"for your own (factory(in_dim) or factory() returns an nn.Module) (default: {DEFAULT_MODEL})")
    parser.add_argument("--layers", type=int, help="encoder layers of the models that have them (gigapath_slide_encoder)")
    parser.add_argument("--dtype", choices=tuple(dtypes), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--device", help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--repeats", type=int, help="timed calls per layer, variant and pass (default: 20 on a GPU, 5 on "
                                                    "a CPU; 0: saved bytes and FLOPs only, counted without compute)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: 3 on a GPU, 1 on a CPU)")
    parser.add_argument("--eval", action="store_true", help="profile in eval mode (default: train mode, dropout on)")
    parser.add_argument("--no-swap", action="store_true", help="the model as given only")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<stamp>-profile-<device>/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=functools.partial(profile_command, default_out=default_out), dtypes=dtypes)


def model_names(text: str) -> list[str]:
    """The models asked for: zoo names (``all`` = every one), or one ``module:factory``."""
    from .. import zoo

    if ":" in text:
        return [text]
    names = list(zoo.MODELS) if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in zoo.MODELS]
    if unknown:
        raise SystemExit(f"milkernels-bench profile: unknown model {', '.join(unknown)}; the zoo has "
                         f"{', '.join(zoo.MODELS)}, or give module:factory")
    return names


def build_model(name: str, in_dim: int, layers: int | None) -> torch.nn.Module:
    """A zoo model (``layers`` deep where it has layers), or ``factory(in_dim)`` (``factory()`` when it takes
    no argument) of ``module:factory``."""
    from .. import zoo

    if ":" not in name:
        return zoo.build(name, in_dim, layers=layers if zoo.has_layers(name) else None)
    module_name, _, attribute = name.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    return factory(in_dim) if inspect.signature(factory).parameters else factory()


def in_dim(name: str, args: argparse.Namespace) -> int:
    """The feature size of a synthetic bag for model ``name``: ``--dim``, else the model's own (1024 for a
    ``module:factory``)."""
    from .. import zoo

    return args.dim or (zoo.default_in_dim(name) if ":" not in name else 1024)


def runs(args: argparse.Namespace, names: list[str]):
    """``(model name, bag label, bag)`` to profile: each model on its synthetic bag (one per feature size),
    or each model on each bag file, the files read one at a time."""
    if args.synthetic is not None:
        bags = {}
        for name in names:
            dim = in_dim(name, args)
            bags.setdefault(dim, synthetic_bag(args.synthetic, dim))
            yield name, f"synthetic-{dim}", bags[dim]
        return
    for bag in iter_bags(args.bag, progress=not args.no_progress):
        for name in names:
            yield name, Path(bag.source).stem, bag


def profile_command(args: argparse.Namespace, command: str, default_out) -> int:
    """Profile every model on every bag; write the outputs; 1 when a run failed with an error."""
    if (args.bag is None) == (args.synthetic is None):
        raise SystemExit("milkernels-bench profile: give a BAG (file or folder) or --synthetic N, not both")
    names = model_names(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtypes[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    out = args.out or default_out({"device": _device_name(device)}, device, "profile")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "profile.log"
    summary, failed = [], False
    try:
        for name, label, bag in runs(args, names):
            row, error = _profile_one(name, label, bag, args, device, dtype, out, log)
            summary.append(row)
            failed |= error
    except BagError as exc:
        raise SystemExit(f"milkernels-bench profile: {exc}") from None
    _write_summary(out, summary, command)
    print(f"\nwrote {out}/summary.md and one folder per model and bag" + (f"; tracebacks in {log}" if failed else ""))
    if device.type == "cpu":
        print("On a CPU both variants run PyTorch code: the times compare PyTorch paths, and kernel latency "
              "needs a GPU; the saved-for-backward bytes are those of the GPU path, exactly.")
    return 1 if failed else 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _profile_one(name, label, bag, args, device, dtype, out, log) -> tuple[dict, bool]:
    """Profile one model on one bag; its summary row and whether it failed with an error."""
    title = f"{name} on {label} (N={bag.n}, D={bag.dim})"
    print(f"\n== {title}", file=sys.stderr, flush=True)
    try:
        model = build_model(name, bag.dim, args.layers)
        model.train(not args.eval)
        result = profile(model, bag, device=device, dtype=dtype, repeats=args.repeats, warmup=args.warmup,
                         swap=not args.no_swap, progress=not args.no_progress)
    except ImportError as exc:
        print(f"skipped: {exc}", flush=True)
        return {"model": name, "bag": label, "n": bag.n, "status": "skipped", "reason": str(exc)}, False
    except torch.OutOfMemoryError as exc:  # out of memory outside the timed calls (which record it per row)
        reason = first_line(exc)
        print(f"oom: {reason}", flush=True)
        return {"model": name, "bag": label, "n": bag.n, "status": "oom", "reason": reason}, False
    except Exception as exc:  # a failing model is recorded, the others still run
        with open(log, "a") as handle:
            handle.write(f"== {title}\n{traceback.format_exc()}\n")
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        print(f"error: {reason}", flush=True)
        return {"model": name, "bag": label, "n": bag.n, "status": "error", "reason": reason}, True
    print(format_table(result), flush=True)
    write_outputs(out / f"{name.replace(':', '.')}-{label}", result)
    return {"model": name, "bag": label, "n": bag.n, "status": "ok", "reason": "", **result.rows[0]}, False


def _write_summary(out: Path, rows: list[dict], command: str) -> None:
    """``summary.csv`` and ``summary.md``: the whole-model row of every model and bag."""
    keys = list(dict.fromkeys(key for row in rows for key in row if key != "layer"))
    with open(out / "summary.csv", "w", newline="") as handle:
        handle.write(f"# command: {command}\n")
        writer = csv.DictWriter(handle, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = ["model", "bag", "n", "status", "given_fwd_bwd_median_ms", "swapped_fwd_bwd_median_ms", "fwd_bwd_speedup",
             "given_saved_bytes", "swapped_saved_bytes", "saved_ratio", "reason"]
    lines = [f"`{command}`", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in shown) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
