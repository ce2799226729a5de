"""Model surgery: :func:`swap` puts the fused kernels into existing CLAM and torchmil models, in place.

Modules are recognized by structure, whatever their class, then checked by behavior: before a
replacement goes in, the candidate and its replacement run on a small random probe input (eval mode,
no grad, the reference backend, a private random generator; training flags are restored) and must
give the same outputs, so a class with the same children but another ``forward`` stays as it is.

- CLAM's ``Attn_Net_Gated``: children ``attention_a = Sequential(Linear(L, D), Tanh()[, Dropout(p)])``,
  ``attention_b = Sequential(Linear(L, D), Sigmoid()[, Dropout(p)])``, ``attention_c = Linear(D, K)``
  and nothing else; it becomes a :class:`milkernels.nn.GatedAttention`.
- torchmil's ``AttentionPool`` (by class name, torchmil is not imported) with ``act='tanh'``, gated or
  not, its LazyLinear layers initialized; it becomes a :class:`milkernels.nn.TorchmilAttentionPool`.

A replacement holds the very same child modules, so the parameters (and the optimizer state on
them), the ``state_dict`` keys and checkpoints stay as they were, and so do outputs and gradients.
Recognized modules that cannot be swapped stay as they are: torchmil with ``act='relu'`` or
``'gelu'`` or an uninitialized LazyLinear; a module with parameters of its own; a module any of whose
submodules has forward or backward hooks (the fused op would not call them); a pruned, weight-normed
or parametrized Linear (the fused op reads the raw parameters); a ``forward`` that differs on the
probe; CLAM's ungated ``Attn_Net``. :func:`swap_report` lists what is fused and why the others stay.
Hooks or parametrizations added after the swap are not seen by the fused op either.

    model = milkernels.swap(model, verbose=True)   # prints the report
    report = swap_report(model)                    # from milkernels.swap import swap_report
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.parametrize import is_parametrized

from ._backends import use_backend
from .nn.gated_attention import GatedAttention, GatedAttentionPool, TorchmilAttentionPool, branch_dropout_p

FUSED = (GatedAttention, GatedAttentionPool, TorchmilAttentionPool)
CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")
CLAM_CONTRACT = "CLAM's Attn_Net_Gated: forward(x) -> (A_raw, x)"
TORCHMIL_CONTRACT = "torchmil's AttentionPool: forward(X, mask, return_att) -> z or (z, f)"
PROBE_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class SwapReport:
    """Module path (``""`` for the model itself) -> a line about it, in three groups.

    ``fused``: modules running on milkernels (``"<old class> -> <new class>"`` when :func:`swap` made
    them); ``swappable``: modules :func:`swap` would replace; ``skipped``: recognized modules it leaves
    as they are, with the reason.
    """

    fused: dict[str, str] = field(default_factory=dict)
    swappable: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"milkernels.swap: {len(self.fused)} fused, {len(self.swappable)} swappable, "
                 f"{len(self.skipped)} skipped"]
        for group in ("fused", "swappable", "skipped"):
            lines += [f"  {group:<9} {name or '(model)'}: {text}" for name, text in getattr(self, group).items()]
        return "\n".join(lines)


def swap(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replace the recognized attention modules of ``model`` by milkernels modules, in place.

    Returns ``model``, or the replacement when ``model`` itself is such a module. Swapping again is
    a no-op. ``verbose=True`` prints :func:`swap_report` of the result.
    """
    replacements = {}
    for name, module, problem, build in _recognized(model):
        if not problem:
            if id(module) not in replacements:
                replacements[id(module)] = _replacement(module, build)
            model = _put(model, name, replacements[id(module)])
    if verbose:
        print(swap_report(model))
    return model


def swap_report(model: nn.Module) -> SwapReport:
    """What in ``model`` runs on milkernels, what :func:`swap` would replace and what it leaves, and why."""
    report = SwapReport()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FUSED):
            origin = getattr(module, "swapped_from", None)
            report.fused[name] = f"{origin} -> {_fused_name(module)}" if origin else _fused_name(module)
    for name, module, problem, _ in _recognized(model):
        if problem:
            report.skipped[name] = f"{_class_name(module)}: {problem}"
        else:
            report.swappable[name] = _class_name(module)
    return report


def _recognized(model: nn.Module):
    """Yield ``(name, module, problem, build)`` for each module swap knows, fused ones excepted:
    ``problem`` is ``""`` when ``build(module)`` can replace it, else why it stays."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        family = _family(module)
        if family is not None:
            problem, build, probe_calls, contract = family
            reason = problem(module) or _surgery_problem(module)
            if not reason and build is not None:
                reason = _probe_problem(module, build(module), probe_calls(module), contract)
            yield name, module, reason, build


def _family(module: nn.Module):
    """``(problem, build, probe_calls, contract)`` for the kind of attention module ``module`` is, else None."""
    if isinstance(module, FUSED):
        return None
    names = _child_names(module)
    if names == {"attention_a", "attention_b", "attention_c"}:
        return _clam_gated_problem, _gated_attention_from, _clam_probe_calls, CLAM_CONTRACT
    if type(module).__name__ == "AttentionPool" and {"fc1", "fc2", "act_layer"} <= names:
        return _torchmil_problem, _torchmil_pool_from, _torchmil_probe_calls, TORCHMIL_CONTRACT
    if names == {"module"} and _is_clam_ungated(module.module):
        return _clam_ungated_problem, None, None, ""
    return None


def _replacement(module: nn.Module, build) -> nn.Module:
    new = build(module)
    new.training = module.training
    new.swapped_from = _class_name(module)
    return new


def _put(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Set submodule ``name`` of ``model`` to ``new``; return the model (``new`` when ``name`` is empty)."""
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def _child_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _fused_name(module: nn.Module) -> str:
    return f"milkernels.nn.{type(module).__qualname__}"


def _own_problem(module: nn.Module) -> str:
    """Why ``module`` itself, beyond its children, cannot be replaced, or ``""``."""
    if list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
        return "it holds parameters or buffers of its own"
    return ""


def _surgery_problem(module: nn.Module) -> str:
    """Why the fused op, which reads the raw parameters and calls no submodule, would bypass
    something in ``module`` (hooks on any submodule, pruning, weight norm), else ``""``.

    State-dict hooks count on ``module`` only: its children stay, and theirs with them.
    """
    for name, sub in module.named_modules():
        where = name or "it"
        hook_kinds = CALL_HOOKS + (STATE_DICT_HOOKS if sub is module else ())
        hooked = [kind.strip("_").replace("_", " ") for kind in hook_kinds if getattr(sub, kind, None)]
        if hooked:
            return f"{where} has {', '.join(hooked)}, which would not run after the swap"
        problem = _plain_parameters_problem(sub, where)
        if problem:
            return problem
    return ""


def _plain_parameters_problem(module: nn.Module, where: str) -> str:
    """Why ``module.weight`` or ``.bias`` is not its own registered Parameter (or None), or ``""``."""
    params = dict(module.named_parameters(recurse=False))
    for attr in ("weight", "bias"):
        if getattr(module, attr, None) is not params.get(attr):
            return (f"{where}.{attr} is not a plain registered Parameter (pruning or weight_norm?); "
                    "the fused op would bypass what computes it")
    return ""


def _linear_problem(layer: nn.Module, name: str) -> str:
    """Why ``layer`` is not a plain ``nn.Linear`` (a parametrized one computes its weight), or ``""``."""
    if is_parametrized(layer):
        return f"{name} is parametrized (torch.nn.utils.parametrize); the fused op reads raw parameters"
    if type(layer) is not nn.Linear:
        return f"{name} is a {type(layer).__name__}, not a Linear"
    return ""


def _branch_problem(branch: nn.Module, activation: type, name: str) -> str:
    layers = list(branch) if type(branch) is nn.Sequential else []
    if not (len(layers) in (2, 3) and isinstance(layers[0], nn.Linear) and type(layers[1]) is activation
            and all(type(m) is nn.Dropout for m in layers[2:])):
        return f"{name} is not Sequential(Linear, {activation.__name__}[, Dropout])"
    return _linear_problem(layers[0], f"{name}.0")


def _clam_gated_problem(module: nn.Module) -> str:
    a, b, c = module.attention_a, module.attention_b, module.attention_c
    problem = _branch_problem(a, nn.Tanh, "attention_a") or _branch_problem(b, nn.Sigmoid, "attention_b")
    if problem:
        return problem
    problem = _linear_problem(c, "attention_c")
    if problem:
        return problem
    if a[0].weight.shape != b[0].weight.shape or c.in_features != a[0].out_features:
        return (f"the Linear shapes do not match: attention_a {tuple(a[0].weight.shape)}, "
                f"attention_b {tuple(b[0].weight.shape)}, attention_c {tuple(c.weight.shape)}")
    p_a, p_b = branch_dropout_p(a), branch_dropout_p(b)
    if p_a != p_b or p_a >= 1:
        return f"dropout p is {p_a} in attention_a and {p_b} in attention_b; the kernel takes one p in [0, 1)"
    return _own_problem(module)


def _gated_attention_from(module: nn.Module) -> GatedAttention:
    return GatedAttention.from_modules(module.attention_a, module.attention_b, module.attention_c)


def _lazy_linear_problem(wrapper: nn.Module, name: str) -> str:
    """Why torchmil's ``LazyLinear`` ``wrapper`` (a ``.module`` Linear, nothing else) cannot be used, or ``""``."""
    inner = getattr(wrapper, "module", None)
    if _child_names(wrapper) != {"module"} or not isinstance(inner, nn.Linear):
        return f"{name} is not a torchmil LazyLinear around a Linear"
    if is_lazy(inner.weight):
        return f"{name} is not initialized yet (LazyLinear); run one forward pass, then swap"
    return _linear_problem(inner, f"{name}.module") or _own_problem(wrapper)


def _torchmil_problem(module: nn.Module) -> str:
    if type(module.act_layer) is not nn.Tanh:
        return f"act={getattr(module, 'act', None)!r}: the fused kernel has tanh only"
    gated = bool(getattr(module, "gated", False))
    expected = {"fc1", "fc2", "act_layer"} | ({"fc_gated", "act_gated"} if gated else set())
    if _child_names(module) != expected:
        return f"its children are {sorted(_child_names(module))}, expected {sorted(expected)}"
    if gated and type(module.act_gated) is not nn.Sigmoid:
        return "act_gated is not a Sigmoid"
    problem = _lazy_linear_problem(module.fc1, "fc1") or (
        _lazy_linear_problem(module.fc_gated, "fc_gated") if gated else "")
    if problem:
        return problem
    fc1, fc2 = module.fc1.module, module.fc2
    problem = _linear_problem(fc2, "fc2")
    if problem or tuple(fc2.weight.shape) != (1, fc1.out_features):
        return problem or f"fc2 is not a Linear({fc1.out_features}, 1)"
    if gated and module.fc_gated.module.weight.shape != fc1.weight.shape:
        return f"fc_gated {tuple(module.fc_gated.module.weight.shape)} does not match fc1 {tuple(fc1.weight.shape)}"
    return _own_problem(module)


def _torchmil_pool_from(module: nn.Module) -> TorchmilAttentionPool:
    return TorchmilAttentionPool(module.fc1, module.fc2, module.act_layer,
                                 getattr(module, "fc_gated", None), getattr(module, "act_gated", None))


def _clam_probe_calls(module: nn.Module) -> list:
    """``(args, kwargs)`` of the probe calls of a CLAM-style module: one bag of 3 instances."""
    x = _probe_tensor((3, module.attention_a[0].in_features), module.attention_a[0].weight)
    return [((x,), {})]


def _torchmil_probe_calls(module: nn.Module) -> list:
    """``(args, kwargs)`` of the probe calls of a torchmil-style pool: 2 bags of 3, one padded, every
    way torchmil's ``forward`` can be called."""
    weight = module.fc1.module.weight
    X = _probe_tensor((2, 3, weight.shape[1]), weight)
    mask = torch.tensor([[True, True, True], [True, True, False]], device=weight.device)
    return [((X,), {}), ((X,), dict(return_att=True)),
            ((X,), dict(mask=mask)), ((X,), dict(mask=mask, return_att=True))]


def _probe_tensor(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """Random normal values of ``like``'s dtype and device, from a private generator (no RNG side effects)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def _probe_problem(module: nn.Module, new: nn.Module, calls: list, contract: str) -> str:
    """Why ``module`` and its replacement ``new`` disagree on the probe ``calls``, or ``""``.

    Both run in eval mode, without grad, ``new`` on the reference backend; every training flag in
    ``module`` (and ``new``) is restored afterwards.
    """
    weight = next(new.parameters())
    if weight.is_meta:
        return "its parameters are on the meta device, so its forward cannot be checked"
    flags = [(m, m.training) for m in (*module.modules(), new)]
    try:
        module.eval()
        new.eval()
        with torch.no_grad(), use_backend("reference"):
            for args, kwargs in calls:
                try:
                    got = module(*args, **kwargs)
                except Exception as exc:  # any failure of a foreign forward means: leave it alone
                    return f"its forward raised {type(exc).__name__} on a probe input: {exc}"
                if not _same_outputs(got, new(*args, **kwargs), PROBE_TOLERANCE.get(weight.dtype, 1e-2)):
                    return f"forward differs from {contract} on a probe input"
    finally:
        for m, training in flags:
            m.training = training
    return ""


def _same_outputs(got, want, tol: float) -> bool:
    """Whether ``got`` has the structure of ``want`` (a tensor, or a tuple of them) and its values within ``tol``."""
    if isinstance(want, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
                and torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True))
    return (type(got) is type(want) and len(got) == len(want)
            and all(_same_outputs(g, w, tol) for g, w in zip(got, want)))


def _is_clam_ungated(sequence: nn.Module) -> bool:
    """``Sequential(Linear, Tanh[, Dropout], Linear)``: the ``module`` of CLAM's ungated ``Attn_Net``."""
    layers = list(sequence) if type(sequence) is nn.Sequential else []
    return (len(layers) in (3, 4) and type(layers[0]) is nn.Linear and type(layers[1]) is nn.Tanh
            and type(layers[-1]) is nn.Linear)


def _clam_ungated_problem(module: nn.Module) -> str:
    return "CLAM's ungated Attn_Net is left as it is (only Attn_Net_Gated is swapped)"
