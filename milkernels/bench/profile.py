"""Profile a model on a bag, layer by layer, as given and after :func:`milkernels.swap`, side by side.

:func:`profile` measures, for the whole model and for each of its layers (named submodules):

- **latency** of the forward (under ``torch.no_grad``) and of forward + backward: CUDA events on a GPU
  (each call after an L2 flush), wall clock on a CPU. The model as given and the swapped copy are
  timed in one run, alternating which goes first, ``repeats`` times each; the median and the p20-p80
  spread are reported, and a row whose spread is over 25% of its median, or whose forward + backward
  measured faster than its forward, is flagged ``noisy``. A layer is timed by itself, on the inputs it
  received in the model's forward (captured once by a forward hook), so the whole model's timing
  carries no hook at all; the ``(rest)`` row is the whole model less its layers (the glue between them).
- **peak memory** of forward + backward above what was allocated before (``torch.cuda.max_memory_allocated``;
  GPU only).
- **bytes saved for backward**: the unique storages that autograd saves, less the bag and the parameters
  (:mod:`.saved`), each storage counted for the innermost profiled layer running when it was first saved.
  They and the FLOPs are counted on fake tensors (nothing computed, exact at any N), on the path a GPU
  runs: on a CPU the swapped model's kernels are selected as if on a GPU (the triton backend, whose fake
  implementations say what the kernels save), so a CPU user sees the real memory saving; where fake
  tensors cannot run a model (data-dependent shapes), they are counted on a real run of the device's path.
- **FLOPs** of matmuls, from ``torch.utils.flop_counter.FlopCounterMode``, which counts milkernels' fused
  ops by their registered formulas (the reference's matmul FLOPs, recompute not counted).

Shapes: a bag is ``features: (N, D)`` with optional ``coords: (N, 2)``; the model is called as
``model(features)``, or ``model(features, coords=coords)`` when its forward takes ``coords`` and the bag
has them (the zoo's models do), or by a ``call(model, features, coords)`` of the user's.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .. import swap as swap_model
from .. import swap_report, use_backend
from .bags import Bag, load_bag
from .saved import SavedTensors
from .timing import NOISY_SPREAD, peak_memory_mib, relative_spread, summarize, time_step

PASSES = ("fwd", "fwd_bwd")
VARIANTS = ("given", "swapped")
REST = "(rest)"
MODEL = "(model)"


@dataclass
class Target:
    """What one row times: the whole model, or a layer's calls replayed on their captured inputs."""

    name: str
    steps: dict  # (variant, pass) -> no-argument callable running it once


@dataclass
class ProfileResult:
    """Rows (one per target: the model, each layer, the rest) and the run's metadata.

    Each row holds, per variant (``given``, ``swapped``): ``<variant>_<pass>_ms``, ``_p20_ms``, ``_p80_ms``
    for the passes ``fwd`` and ``fwd_bwd``, ``<variant>_peak_mib`` (GPU), ``<variant>_saved_bytes``,
    ``<variant>_fwd_flops``, ``<variant>_fwd_bwd_flops``; the ratios ``fwd_speedup``, ``fwd_bwd_speedup``
    (given / swapped time) and ``saved_ratio`` (swapped / given bytes); and ``noisy``.
    """

    rows: list[dict]
    metadata: dict = field(default_factory=dict)


def profile(model: nn.Module, bag: Bag | torch.Tensor | str | os.PathLike, *, layers=None,
            call: Callable | None = None, device=None, dtype: torch.dtype | None = None, repeats: int | None = None,
            warmup: int | None = None, swap: bool = True, progress: bool = True) -> ProfileResult:
    """Profile ``model`` on ``bag`` as given and as ``milkernels.swap(copy.deepcopy(model))``.

    ``bag``: a :class:`~milkernels.bench.bags.Bag`, a tensor ``(N, D)`` or a bag file's path. ``layers``:
    names of disjoint submodules to profile (default: ``model.profile_layers`` for the zoo's models, else
    the model's children). ``device``/``dtype``: where and in what to run (default: the model's
    parameters'). ``repeats``/``warmup``: timed and untimed calls per target, variant and pass (default
    20/3 on a GPU, 5/1 on a CPU; ``repeats=0``: no timing, only the saved bytes and FLOPs, which cost no
    compute, for a bag too large to run here). ``swap=False`` profiles the model as given only. The model is used in
    the mode (train or eval) it is in and is not changed. Returns a :class:`ProfileResult`.
    """
    bag = bag if isinstance(bag, Bag) else _as_bag(bag)
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None and param.is_floating_point() else torch.float32)
    on_gpu = device.type == "cuda"
    repeats = repeats if repeats is not None else (20 if on_gpu else 5)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    if repeats < 0 or warmup < 0:
        raise ValueError(f"profile: repeats and warmup must be >= 0, got {repeats} and {warmup}")
    models = {"given": copy.deepcopy(model).to(device, dtype)}
    if swap:
        models["swapped"] = swap_model(copy.deepcopy(models["given"]))
    names = _layer_names(model, layers)
    features = bag.features.to(device, dtype)
    coords = bag.coords.to(device) if bag.coords is not None else None
    run = _runner(call, model)
    counts = {variant: account(net, run, names, features, coords) for variant, net in models.items()}
    timings = {}
    if repeats:
        timings = _time_targets(_targets(models, run, names, features, coords), device, repeats, warmup, progress)
    rows = _rows(names, timings, counts, tuple(models))
    meta = {"model": type(model).__name__, "bag": bag.source, "n": bag.n, "dim": bag.dim, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "warmup": warmup, "layers": names,
            "training": model.training, "counted_on": {v: c["counted_on"] for v, c in counts.items()}}
    if swap:
        meta["swap"] = str(swap_report(models["swapped"]))
    return ProfileResult(rows, meta)


def _as_bag(bag) -> Bag:
    if isinstance(bag, torch.Tensor):
        if bag.dim() != 2:
            raise ValueError(f"profile: a bag tensor must be (N, D), got shape {tuple(bag.shape)}")
        return Bag(features=bag, coords=None, attrs={}, source="tensor")
    return load_bag(bag)


def _layer_names(model: nn.Module, layers) -> list[str]:
    """The layers to profile, checked: submodules of ``model``, none inside another."""
    names = list(layers if layers is not None else getattr(model, "profile_layers", None)
                 or [name for name, _ in model.named_children()])
    known = dict(model.named_modules())
    missing = [name for name in names if name not in known or not name]
    if missing:
        raise ValueError(f"profile: {type(model).__name__} has no submodule {', '.join(map(repr, missing))}")
    nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
    if nested:
        raise ValueError(f"profile: layer {nested[0][1]!r} is inside layer {nested[0][0]!r}; give disjoint layers")
    return names


def _runner(call, model) -> Callable[[nn.Module, torch.Tensor, torch.Tensor | None], Any]:
    """``run(net, features, coords)``: the model's call on the bag (with coords when its forward takes them
    and the bag has them)."""
    if call is not None:
        return call
    if "coords" in inspect.signature(model.forward).parameters:
        return lambda net, x, coords: net(x) if coords is None else net(x, coords=coords)
    return lambda net, x, coords: net(x)


def float_outputs(outputs) -> list[torch.Tensor]:
    """The floating tensors that require grad in a (nested tuple, list or dict of) output(s)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() and outputs.requires_grad else []
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in float_outputs(item)]
    return []


def account(net: nn.Module, run: Callable, layers: list[str], features: torch.Tensor,
            coords: torch.Tensor | None) -> dict:
    """Bytes saved for backward and matmul FLOPs (forward, forward + backward) of ``run(net, features, coords)``,
    in total and per layer: ``{"saved": {owner: bytes}, "fwd_flops": {...}, "fwd_bwd_flops": {...},
    "counted_on": str}``; owner ``""`` is the rest. Fake tensors on the GPU path, else a real run."""
    try:
        with _fake_gpu_path(features.device) as (mode, where):
            return {**_count(net, run, layers, (features, coords), mode), "counted_on": where}
    except Exception as exc:  # data-dependent shapes and other fake-tensor limits: count a real run
        where = f"a real run on {features.device.type} ({type(exc).__name__} on fake tensors)"
        return {**_count(net, run, layers, (features, coords), None), "counted_on": where}


@contextlib.contextmanager
def _fake_gpu_path(device: torch.device):
    """A fake-tensor mode in which milkernels' ops take their GPU path: the device's own choice on a GPU;
    on a CPU the triton backend, allowed on CPU tensors by ``TRITON_INTERPRET=1`` for the duration (no
    kernel runs on fake tensors: each op's fake implementation answers)."""
    if device.type == "cuda":
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode, "fake tensors, the GPU path"
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, use_backend("triton"):
            yield mode, "fake tensors, the GPU (triton) path"
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


class _Call(nn.Module):
    """``run(net, x, coords)`` as a module, so that ``torch.func.functional_call`` can put (fake) state into
    ``net``."""

    def __init__(self, net: nn.Module, run: Callable):
        super().__init__()
        self.net, self.run = net, run

    def forward(self, x, coords):
        return self.run(self.net, x, coords)


def _count(net, run, layers, inputs, mode) -> dict:
    """Saved bytes by owning layer, and FLOPs of the forward and of forward + backward, in total and by
    layer. A layer's forward FLOPs are those counted inside it; its forward + backward FLOPs come from its
    calls replayed alone (the counter cannot tell whose backward runs)."""
    wrapper = _Call(net, run)
    state = {name: (mode.from_tensor(t) if mode else t) for name, t in _state(wrapper).items()}
    inputs = [mode.from_tensor(t) if mode and t is not None else t for t in inputs]
    stack: list[str] = []
    hooks = _owner_hooks(net, layers, stack)
    try:
        with FlopCounterMode(display=False) as forward_counter:
            present = [t for t in inputs if t is not None]
            with SavedTensors(exclude=[*present, *state.values()], owner=lambda: stack[-1] if stack else "") as saved:
                forward = lambda: torch.func.functional_call(wrapper, state, tuple(inputs))  # noqa: E731
                calls, outputs = capture_layer_calls(net, layers, forward)
        with FlopCounterMode(display=False) as backward_counter:
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    finally:
        for hook in hooks:
            hook.remove()
        net.zero_grad(set_to_none=True)
    fwd = _flops_by_layer(forward_counter, layers)
    fwd_bwd = {MODEL: fwd[MODEL] + _total_flops(backward_counter)}
    for name in layers:
        prefix = f"net.{name}."
        layer_state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        fwd_bwd[name] = _replay_flops(net.get_submodule(name), layer_state, calls[name])
    return {"saved": saved.bytes_by_owner(), "fwd_flops": fwd, "fwd_bwd_flops": fwd_bwd}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``module`` by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _owner_hooks(net: nn.Module, layers: list[str], stack: list[str]) -> list:
    """Forward hooks that keep ``stack[-1]`` the innermost profiled layer running."""
    def enter(name):
        def hook(module, args):
            stack.append(name)
        return hook

    def leave(module, args, output):
        stack.pop()

    hooks = []
    for name in layers:
        module = net.get_submodule(name)
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    return hooks


def _total_flops(counter: FlopCounterMode) -> int:
    return sum(counter.get_flop_counts().get("Global", {}).values())


def _flops_by_layer(counter: FlopCounterMode, layers: list[str]) -> dict[str, int]:
    """``{MODEL: total, layer: FLOPs}`` from a counter run on a :class:`_Call` (named ``_Call.net.<layer>``)."""
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    return {MODEL: counts.get("Global", 0), **{name: counts.get(f"_Call.net.{name}", 0) for name in layers}}


def _replay_flops(module: nn.Module, state: dict, calls: list) -> int:
    """FLOPs of ``module``'s captured calls, forward and backward, with ``state`` as its parameters."""
    with FlopCounterMode(display=False) as counter:
        for args, kwargs, grads in calls:
            outputs = float_outputs(torch.func.functional_call(module, state, args, kwargs))
            torch.autograd.backward(outputs, grads[:len(outputs)])
    return _total_flops(counter)


def capture_layer_calls(net: nn.Module, layers: list[str], forward: Callable) -> tuple[dict, list]:
    """Run ``forward()`` (a forward of ``net``, with autograd) once, recording each layer's calls:
    ``({layer: [(args, kwargs, grads)]}, float outputs of the forward)``, the tensors detached (one that
    required grad is a leaf that requires grad), ``grads`` random, one per :func:`float_outputs` of the call."""
    calls = {name: [] for name in layers}

    def record(name):
        def hook(module, args, kwargs, output):
            args, kwargs = _detached((args, kwargs), {})
            calls[name].append((args, kwargs, _random_like(float_outputs(output))))
        return hook

    hooks = [net.get_submodule(name).register_forward_hook(record(name), with_kwargs=True) for name in layers]
    try:
        outputs = float_outputs(forward())
    finally:
        for hook in hooks:
            hook.remove()
    return calls, outputs


def _detached(value, seen: dict):
    """``value`` with its tensors detached, one detached tensor per tensor object (``seen``: id -> copy), so
    a call that passes one tensor twice (``attention(h, h, h)``, whose fused path checks ``key is value``)
    is replayed as it was made."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = value.detach().requires_grad_(value.requires_grad and value.is_floating_point())
        return seen[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(item, seen) for item in value)
    if isinstance(value, dict):
        return {key: _detached(item, seen) for key, item in value.items()}
    return value


def _random_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator(device=tensors[0].device).manual_seed(0) if tensors else None
    return [torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator) for t in tensors]


def _leaves(calls) -> list[torch.Tensor]:
    """The captured tensors that require grad (their ``.grad`` is dropped after each backward)."""
    found = []
    for args, kwargs, _ in calls:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                found.append(value)
    return found


def _steps(module: nn.Module, calls: list, run: Callable | None) -> dict:
    """``{pass: step}`` replaying ``calls`` on ``module`` (the whole model through ``run``)."""
    leaves = _leaves(calls)

    def forward(args, kwargs):
        return run(module, *args) if run is not None else module(*args, **kwargs)

    def fwd():
        with torch.no_grad():
            for args, kwargs, _ in calls:
                forward(args, kwargs)

    def fwd_bwd():
        for args, kwargs, grads in calls:
            outputs = float_outputs(forward(args, kwargs))
            torch.autograd.backward(outputs, grads[:len(outputs)])
        module.zero_grad(set_to_none=True)
        for leaf in leaves:
            leaf.grad = None

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def _targets(models: dict, run: Callable, layers: list[str], features: torch.Tensor,
             coords: torch.Tensor | None) -> list[Target]:
    """The whole model and each layer, with steps per variant and pass on inputs captured from the swapped
    model where there is one (it fits where the model as given may not; the layers take the same inputs)."""
    net = models.get("swapped", models["given"])
    calls, outputs = capture_layer_calls(net, layers, lambda: run(net, features, coords))
    calls[MODEL] = [((features, coords), {}, _random_like(outputs))]
    del outputs
    targets = []
    for name in [MODEL, *layers]:
        steps = {}
        for variant, net in models.items():
            module, via = (net, run) if name == MODEL else (net.get_submodule(name), None)
            for pass_, step in _steps(module, calls[name], via).items():
                steps[variant, pass_] = step
        targets.append(Target(name, steps))
    return targets


def _time_targets(targets: list[Target], device: torch.device, repeats: int, warmup: int, progress: bool) -> dict:
    """``{(target, variant, pass): {"samples": [ms...], "peak_mib": float | None, "oom": bool}}``: per target
    and pass, the variants' steps warmed up, then timed ``repeats`` times in alternating order. A variant
    that runs out of memory stops there (``oom``, its samples so far dropped); the other goes on."""
    from tqdm.auto import tqdm

    results = {}
    cases = [(target, pass_) for target in targets for pass_ in PASSES]
    variants = sorted({variant for target in targets for variant, _ in target.steps})
    with tqdm(total=len(cases) * repeats * len(variants), desc="profile", unit="call", disable=not progress,
              leave=False) as bar:
        for target, pass_ in cases:
            steps = {variant: target.steps[variant, pass_] for variant in variants}
            samples = {variant: [] for variant in variants}
            fits = {variant: _fits(lambda: time_step(step, device, 0, warmup), device)
                    for variant, step in steps.items()}
            for repeat in range(repeats):
                order = variants if repeat % 2 == 0 else variants[::-1]
                for variant in order:
                    fits[variant] = fits[variant] and _fits(
                        lambda: samples[variant].extend(time_step(steps[variant], device, 1, 0)), device)
                    bar.update()
            for variant, step in steps.items():
                peak = []
                if pass_ == "fwd_bwd" and fits[variant]:
                    fits[variant] = _fits(lambda: peak.append(peak_memory_mib(step, device)), device)
                results[target.name, variant, pass_] = {"samples": samples[variant] if fits[variant] else [],
                                                        "peak_mib": peak[0] if peak else None, "oom": not fits[variant]}
    return results


def _fits(run: Callable[[], Any], device: torch.device) -> bool:
    """Call ``run()``; False when it ran out of memory (the cache then released)."""
    try:
        run()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False
    return True


def _rows(layers: list[str], timings: dict, counts: dict, variants) -> list[dict]:
    """One row per target: the model, each layer and the rest (the model less its layers); without
    ``timings`` (``repeats=0``), the counts only."""
    rows = []
    for name in [MODEL, *layers]:
        row = {"layer": name}
        for variant in variants:
            if timings:
                row.update(_timed(timings, name, variant))
            row.update({f"{variant}_{key}": value for key, value in _counted(counts[variant], name).items()})
        row["noisy"] = _noisy(row, variants) if timings else None
        row["oom"] = _out_of_memory(timings, name, variants) if timings else None
        rows.append(_with_ratios(row, variants))
    rows.append(_rest(rows, variants))
    return rows


def _timed(timings: dict, name: str, variant: str) -> dict:
    """A target's median, p20 and p80 per pass (None where it ran out of memory) and its peak memory, keys
    prefixed with the variant."""
    row = {}
    for pass_ in PASSES:
        samples = timings[name, variant, pass_]["samples"]
        stats = summarize(samples) if samples else dict.fromkeys(("median_ms", "p20_ms", "p80_ms"))
        row.update({f"{variant}_{pass_}_{key}": value for key, value in stats.items()})
    row[f"{variant}_peak_mib"] = timings[name, variant, "fwd_bwd"]["peak_mib"]
    return row


def _out_of_memory(timings: dict, name: str, variants) -> str:
    """``"given fwd_bwd, ..."``: the variants and passes of a target that ran out of memory."""
    return ", ".join(f"{variant} {pass_}" for variant in variants for pass_ in PASSES
                     if timings[name, variant, pass_]["oom"])


def _counted(counts: dict, name: str) -> dict:
    """A target's saved bytes and FLOPs from :func:`account`'s counts, keys without the variant yet."""
    saved = counts["saved"]
    return {"saved_bytes": sum(saved.values()) if name == MODEL else saved.get(name, 0),
            "fwd_flops": counts["fwd_flops"][name], "fwd_bwd_flops": counts["fwd_bwd_flops"][name]}


def _noisy(row: dict, variants) -> bool:
    """A p20-p80 spread over :data:`~.timing.NOISY_SPREAD` of a median, or forward + backward measured faster
    than forward (passes that ran out of memory left out)."""
    for variant in variants:
        stats = {pass_: {key: row[f"{variant}_{pass_}_{key}"] for key in ("median_ms", "p20_ms", "p80_ms")}
                 for pass_ in PASSES if row[f"{variant}_{pass_}_median_ms"] is not None}
        if len(stats) == 2 and stats["fwd_bwd"]["median_ms"] < stats["fwd"]["median_ms"]:
            return True
        if any(relative_spread(found) > NOISY_SPREAD for found in stats.values()):
            return True
    return False


def _rest(rows: list[dict], variants) -> dict:
    """The model less its layers: median times, saved bytes and FLOPs (no spread, no peak)."""
    model, layers = rows[0], rows[1:]
    timed = model["noisy"] is not None
    rest = {"layer": REST, "noisy": any(row["noisy"] for row in rows) if timed else None,
            "oom": "" if timed else None}
    for variant in variants:
        keys = [f"{variant}_{pass_}_median_ms" for pass_ in PASSES] if timed else []
        keys += [f"{variant}_{what}" for what in ("saved_bytes", "fwd_flops", "fwd_bwd_flops")]
        rest.update({key: _less(model[key], [row[key] for row in layers]) for key in keys})
    return _with_ratios(rest, variants)


def _with_ratios(row: dict, variants) -> dict:
    """``row`` with ``fwd_speedup``, ``fwd_bwd_speedup`` (given / swapped median, when timed) and
    ``saved_ratio`` (swapped / given saved bytes) when both variants ran and the divisor is positive."""
    if "swapped" not in variants:
        return row
    for pass_ in PASSES:
        if f"given_{pass_}_median_ms" in row:
            row[f"{pass_}_speedup"] = _ratio(row[f"given_{pass_}_median_ms"], row[f"swapped_{pass_}_median_ms"])
    row["saved_ratio"] = _ratio(row["swapped_saved_bytes"], row["given_saved_bytes"])
    return row


def _less(whole: float | None, parts: list) -> float | None:
    """``whole`` less the sum of ``parts``, None when any is missing (ran out of memory)."""
    return None if whole is None or None in parts else whole - sum(parts)


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom is not None and bottom > 0 else None
