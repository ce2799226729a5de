"""Model surgery: :func:`swap` puts the fused kernels into existing CLAM, torchmil, Lin-MIL, LiteMIL, ASMIL and
CMA-MIL models, in place (a replaceable layer passed by itself is not changed: its replacement is returned).

Modules are recognized by structure, whatever their class, then checked by behavior: before a
replacement goes in, the candidate and its replacement run on a small random probe input (eval mode,
no grad, the reference backend, a private random generator; training flags are restored; a Lin-MIL
model with a ``pos_enc`` gets random ``coords: (B, N, 2)`` too) and must give the same outputs, so a
class with the same children but another ``forward`` stays as it is.

- CLAM's ``Attn_Net_Gated``: children ``attention_a = Sequential(Linear(L, D), Tanh()[, Dropout(p)])``,
  ``attention_b = Sequential(Linear(L, D), Sigmoid()[, Dropout(p)])``, ``attention_c = Linear(D, K)``
  and nothing else; it becomes a :class:`milkernels.nn.GatedAttention`.
- torchmil's ``AttentionPool`` (by class name, torchmil is not imported) with ``act='tanh'``, gated or
  not, its LazyLinear layers initialized; it becomes a :class:`milkernels.nn.TorchmilAttentionPool`.
- Lin-MIL's ``LinearAttention``: ``temperature: (H, 1, 1)``, ``qkv = Linear(C, 3C)``, ``proj =
  Linear(C, C)``, Dropouts ``attn_drop`` and ``proj_drop``, ``qk_mul``, ``kv_mul``, ``extra_mul``
  (``Mul``) and ``act``, a default-argument ReLU, GELU, ELU, LeakyReLU, Tanh or Softplus; it becomes
  a :class:`milkernels.nn.LinearAttention`.
- Lin-MIL's softmax ``Attention`` (the ``attention="softmax"`` ablation): ``attend = Softmax(-1)``,
  ``to_qkv``, ``to_out``; it becomes a :class:`milkernels.nn.SoftmaxAttention`, whose ``forward`` still
  forms the softmax matrix it returns; only the Lin-MIL forward below takes its SDPA path.
- Lin-MIL's model (class name ``Lin_MIL``): ``projection``, ``dropout``, a ``transformer`` ModuleList of
  blocks (``norm1``, ``attn``, ``drop_path``, ``norm2``, ``mlp``; linear, softmax or dilated attention),
  ``norm``, ``mlp_head``, ``pool`` 'cls' (with ``cls_token``) or 'mean'. It stays the same object: its
  class becomes :func:`milkernels.nn.fused_lin_mil_class` of its class, a subclass whose forward
  (:class:`milkernels.nn.FusedLinMIL`) takes the last block's attention map from the map mode and no
  attention output from the other blocks, so no ``(B, H, N, dh)`` numerator and no softmax matrix
  but the last block's (which the model returns) is formed; dilated blocks run their own forward
  (float16 dilated attention, no map). It pickles and deep-copies as such. Lin-MIL's ``nystrom``
  ablation blocks (and models holding them) stay as they are.
- LongNet dilated attention (:mod:`milkernels.swap_dilated`): torchscale's ``DilatedAttention``
  (Prov-GigaPath's slide encoder, ``forward(query, key, value, ...)``) and Lin-MIL's copy (the ``dilated``
  ablation, ``forward(x, ...)``), recognized by a ``DilatedAttention`` class name in the MRO, the children
  ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``dropout_module`` (``inner_attn_ln``) and an ``args``
  with ``segment_length`` and ``dilated_ratio``; they become a :class:`milkernels.nn.DilatedAttention` /
  :class:`milkernels.nn.LinMILDilatedAttention` sharing their children, fused on every call but those
  (``incremental_state``, ``is_causal``, ``attn_mask``, seq-parallel gathering...) that run
  upstream's own forward. Probed on 2 bags of a
  few tokens, without and with a ``key_padding_mask`` (which upstream ignores), and on 1 bag of 1.
- ``torch.nn.MultiheadAttention`` (or a subclass of it, LiteMIL's learned-query pooling among them): it
  becomes a :class:`milkernels.nn.MultiheadAttention` (a subclass sharing its Parameters and
  ``out_proj``), whose forward is fused for a few queries attending to a bag and PyTorch's otherwise.
  Probed with 2 queries on 2 bags of 3 (``key is value``), without and with a ``key_padding_mask``
  (head-averaged and per-head weights).
- ASMIL's multi-head attention: children exactly ``q_proj``, ``k_proj``, ``v_proj = Linear(E, I)``,
  ``out_proj = Linear(I, E)``, ``layer_norm = LayerNorm``, ``dropout = Dropout``, an int ``num_heads``
  dividing I, a bool ``softmax`` (missing: True; False is NSF), ``forward(q, k, v) -> (out, logits)``
  for one bag; it becomes a :class:`milkernels.nn.QueryAttention`. Probed with ``q: (1, 3, E)``, ``k = v:
  (1, 5, E)``.
- CMA-MIL's ``CrossAttention`` (:mod:`milkernels.swap_cross_attention`): children exactly ``query``, ``key``,
  ``value = Linear(dim, dim)``, ``softmax = Softmax(-1)``, ``norm = LayerNorm(dim)``, ``forward(x1, x2)`` for
  one bag; it becomes a :class:`milkernels.nn.CrossAttention`. Probed with ``x1: (3, dim)``, ``x2: (5, dim)``
  and ``x1: (1, dim)``, ``x2: (2, dim)``.

A replacement holds the very same child modules (and a MultiheadAttention's very Parameters), so the
parameters (and the optimizer state on them), the ``state_dict`` keys and checkpoints stay as they
were, and so do outputs and gradients. Recognized modules that cannot be swapped stay as they are:
torchmil with ``act='relu'`` or ``'gelu'`` or an uninitialized LazyLinear; a module with parameters
of its own (beyond MultiheadAttention's projections); a module any of whose submodules has forward or
backward hooks (the fused op would not call them); a pruned, weight-normed or parametrized Linear or
MultiheadAttention (the fused op reads the raw parameters); a ``forward`` that differs on the probe;
CLAM's ungated ``Attn_Net``; a MultiheadAttention with ``add_bias_kv``, ``add_zero_attn`` or ``kdim !=
vdim`` (its fused path would never run); a Lin-MIL ``act`` with non-default arguments
(``LeakyReLU(0.2)``, ``ELU(alpha=0.5)``, ``GELU('tanh')``...) or of another class; a ``Lin_MIL`` with a
hooked submodule (its blocks' attention is still swapped), another ``pool``, a ``nystrom`` block or a
dilated block whose upstream attention cannot be run by the probe here (no ``flash_attn_func``); a dilated
attention with ``xpos``, ``dropout > 0``, or whose upstream kernel (``flash_attn_func``) is missing here
(:mod:`milkernels.swap_dilated`; hooks on its children do not count, it calls them; ``args.seq_parallel``
keeps none: the replacement shards the bag over the default group, as upstream does). :func:`swap_report` lists what is fused, what is replaced but fused on
some calls only (and when), and why the others stay. Hooks or parametrizations added after the swap are
not seen by the fused op either.

    model = milkernels.swap(model, verbose=True)   # prints the report, once
    report = swap_report(model)                    # returns it (print(report) for the text); prints nothing
    layer = milkernels.swap(layer)                 # a bare layer: use the returned replacement
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.parametrize import is_parametrized

from . import swap_cross_attention, swap_dilated
from ._backends import use_backend
from .nn.cross_attention import CrossAttention
from .nn.dilated_attention import DilatedAttention, LinMILDilatedAttention
from .nn.gated_attention import GatedAttention, GatedAttentionPool, TorchmilAttentionPool, branch_dropout_p
from .nn.linear_attention import (FusedLinMIL, LinearAttention, SoftmaxAttention, activation_problem,
                                  fused_lin_mil_class)
from .nn.query_attention import MultiheadAttention, QueryAttention, fused_path_problem

FUSED = (GatedAttention, GatedAttentionPool, TorchmilAttentionPool, LinearAttention, SoftmaxAttention, FusedLinMIL,
         MultiheadAttention, QueryAttention, LinMILDilatedAttention, DilatedAttention, CrossAttention)
CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")
CLAM_CONTRACT = "CLAM's Attn_Net_Gated: forward(x) -> (A_raw, x)"
TORCHMIL_CONTRACT = "torchmil's AttentionPool: forward(X, mask, return_att) -> z or (z, f)"
LINEAR_CONTRACT = "Lin-MIL's LinearAttention: forward(x) -> (out, numerator)"
SOFTMAX_CONTRACT = "Lin-MIL's Attention: forward(x) -> (out, softmax matrix)"
LIN_MIL_CONTRACT = "Lin-MIL's Lin_MIL: forward(x, coords=None) -> (logits, attention map)"
MHA_CONTRACT = "torch.nn.MultiheadAttention: forward(query, key, value, ...) -> (attn_output, attn_weights)"
ASMIL_CONTRACT = "ASMIL's attention: forward(q, k, v) -> (out, pre-normalization logits) for one bag"
ASMIL_CHILDREN = {"q_proj", "k_proj", "v_proj", "out_proj", "layer_norm", "dropout"}
MHA_OUT_PROJ_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
LINEAR_CHILDREN = {"qkv", "attn_drop", "proj", "proj_drop", "qk_mul", "kv_mul", "extra_mul", "act"}
BLOCK_CHILDREN = {"norm1", "attn", "drop_path", "norm2", "mlp"}
FUSED_BLOCK_TYPES = ("linear", "softmax", "dilated")
PROBE_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class SwapReport:
    """Module path (``""`` for the model itself) -> a line about it, in four groups.

    ``fused``: milkernels modules whose every call runs the fused path (``"<old class> -> <new class>"``
    when :func:`swap` made them); ``replaced``: milkernels modules that run the fused path on some calls
    only, the line saying on which (or, if on none, why); ``swappable``: modules :func:`swap` would
    replace; ``skipped``: recognized modules it leaves as they are, with the reason. ``str(report)`` is
    the text :func:`swap` prints with ``verbose=True``.
    """

    fused: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    swappable: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"milkernels.swap: {len(self.fused)} fused, {len(self.swappable)} swappable, "
                 f"{len(self.skipped)} skipped, {len(self.replaced)} replaced but fused on some calls only"]
        for group in ("fused", "replaced", "swappable", "skipped"):
            lines += [f"  {group:<9} {name or '(model)'}: {text}" for name, text in getattr(self, group).items()]
        return "\n".join(lines)


def swap(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replace the recognized attention modules of ``model`` by milkernels modules, in place.

    Returns ``model``. When ``model`` is itself a replaceable layer (an ``Attn_Net_Gated``, an
    ``nn.MultiheadAttention``...), nothing can replace it in the caller's hands: the replacement is
    returned and ``model`` is left as it was, so use the result, ``layer = milkernels.swap(layer)``.
    (A ``Lin_MIL`` model is the exception: it changes class in place and is returned.) Swapping again
    is a no-op. ``verbose=True`` prints :func:`swap_report` of the result, once; calling
    :func:`swap_report` as well and printing it prints the report a second time.
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
    """What in ``model`` runs on milkernels, what :func:`swap` would replace and what it leaves, and why.

    Returns the :class:`SwapReport` (``print`` it for the text); prints nothing.
    """
    report = SwapReport()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FUSED):
            group, line = _fused_entry(module)
            getattr(report, group)[name] = line
    for name, module, problem, _ in _recognized(model):
        if problem:
            report.skipped[name] = f"{_class_name(module)}: {problem}"
        else:
            report.swappable[name] = _class_name(module)
    return report


class Family(NamedTuple):
    """How swap treats one kind of module.

    ``problem(module)``: why it stays, or ``""``; ``build(module)``: the replacement that the probe
    ``probe_calls(module)`` checks against ``contract`` (None: never swapped), inside
    ``probe_context(module)`` if given; ``commit(module)``: the swap itself when it is not ``build`` (an
    in-place change, whose ``build`` is a throw-away view). ``calls_children``: the replacement calls the
    module's children as modules (their hooks and parametrizations still run), so only the module's own
    hooks stand in the way.
    """

    problem: Callable
    build: Callable | None = None
    probe_calls: Callable | None = None
    contract: str = ""
    commit: Callable | None = None
    probe_context: Callable | None = None
    calls_children: bool = False


def _recognized(model: nn.Module):
    """Yield ``(name, module, problem, replace)`` for each module swap knows, fused ones excepted:
    ``problem`` is ``""`` when ``replace(module)`` can replace it, else why it stays."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        family = _family(module)
        if family is not None:
            reason = family.problem(module) or _surgery_problem(module, family.calls_children)
            if not reason and family.build is not None:
                context = family.probe_context(module) if family.probe_context else contextlib.nullcontext()
                reason = _probe_problem(module, family.build(module), family.probe_calls(module), family.contract,
                                        context)
            yield name, module, reason, family.commit or family.build


def _family(module: nn.Module) -> Family | None:
    """The :class:`Family` of the kind of attention module ``module`` is, else None."""
    if isinstance(module, FUSED):
        return None
    if isinstance(module, nn.MultiheadAttention):
        return Family(_mha_problem, MultiheadAttention.from_module, _mha_probe_calls, MHA_CONTRACT)
    names = _child_names(module)
    if names == ASMIL_CHILDREN:
        return Family(_asmil_problem, QueryAttention.from_module, _asmil_probe_calls, ASMIL_CONTRACT)
    if names == {"attention_a", "attention_b", "attention_c"}:
        return Family(_clam_gated_problem, _gated_attention_from, _clam_probe_calls, CLAM_CONTRACT)
    if type(module).__name__ == "AttentionPool" and {"fc1", "fc2", "act_layer"} <= names:
        return Family(_torchmil_problem, _torchmil_pool_from, _torchmil_probe_calls, TORCHMIL_CONTRACT)
    if names == {"module"} and _is_clam_ungated(module.module):
        return Family(_clam_ungated_problem)
    if {"qkv", "proj", "act", "qk_mul", "kv_mul", "extra_mul"} <= names:
        return Family(_linear_attention_problem, LinearAttention.from_module, _tokens_probe_calls("qkv"),
                      LINEAR_CONTRACT)
    if {"attend", "to_qkv", "to_out"} <= names:
        return Family(_softmax_attention_problem, SoftmaxAttention.from_module, _tokens_probe_calls("to_qkv"),
                      SOFTMAX_CONTRACT)
    if swap_cross_attention.is_cross_attention(module):
        return Family(_cross_attention_problem, CrossAttention.from_module, swap_cross_attention.probe_calls,
                      swap_cross_attention.CONTRACT)
    if swap_dilated.is_dilated_attention(module):
        return Family(_dilated_problem, swap_dilated.replacement, swap_dilated.probe_calls,
                      swap_dilated.contract(module), probe_context=swap_dilated.probe_context, calls_children=True)
    if type(module).__name__ == "Lin_MIL" and {"projection", "transformer", "mlp_head"} <= names:
        return Family(_lin_mil_problem, _lin_mil_view, _lin_mil_probe_calls, LIN_MIL_CONTRACT, _fuse_lin_mil,
                      probe_context=swap_dilated.without_seq_parallel)
    if BLOCK_CHILDREN <= names and _block_type(module) not in FUSED_BLOCK_TYPES:
        return Family(_block_type_problem)
    return None


def _replacement(module: nn.Module, build) -> nn.Module:
    origin = _class_name(module)
    new = build(module)
    new.training = module.training
    new.swapped_from = origin
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
    """``milkernels.nn.<class>``, the first milkernels class ``module`` is an instance of."""
    fused = next(cls for cls in type(module).__mro__ if cls in FUSED)
    return f"milkernels.nn.{fused.__qualname__}"


def _fused_entry(module: nn.Module) -> tuple[str, str]:
    """The report group of milkernels module ``module`` and its line: ``"fused"`` when its fused path runs
    on every call; ``"replaced"`` when only on some (its ``fused_when`` says which) or on none (its
    ``fused_path_possible`` is False: a MultiheadAttention built with ``add_bias_kv``...)."""
    origin = getattr(module, "swapped_from", None)
    line = f"{origin} -> {_fused_name(module)}" if origin else _fused_name(module)
    if isinstance(module, MultiheadAttention) and not module.fused_path_possible:
        return "replaced", f"{line}; never fused: {fused_path_problem(module)}"
    when = getattr(type(module), "fused_when", "")
    if when:
        otherwise = getattr(type(module), "unfused_path", "PyTorch's path")
        return "replaced", f"{line}; fused only when {when}, {otherwise} otherwise"
    return "fused", line


def _own_problem(module: nn.Module, allowed: tuple = ()) -> str:
    """Why ``module`` itself, beyond its children, cannot be replaced, or ``""``: it holds parameters other
    than the plain registered ones named in ``allowed``, or buffers."""
    names = {name for name, _ in module.named_parameters(recurse=False)}
    if names - set(allowed) or list(module.buffers(recurse=False)):
        return "it holds parameters or buffers of its own"
    for name in allowed:
        if name not in names or getattr(module, name) is not module._parameters[name]:
            return f"{name} is not a plain registered Parameter (parametrized?); the fused op reads it raw"
    return ""


def _surgery_problem(module: nn.Module, calls_children: bool = False) -> str:
    """Why the fused op, which reads the raw parameters and calls no submodule, would bypass
    something in ``module`` (hooks on any submodule, pruning, weight norm), else ``""``; with
    ``calls_children`` (a replacement that calls them), hooks on ``module`` itself only.

    State-dict hooks count on ``module`` only: its children stay, and theirs with them.
    """
    for name, sub in module.named_modules():
        if calls_children and sub is not module:
            continue
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


def _linear_problem(layer: nn.Module, name: str, types: tuple = (nn.Linear,)) -> str:
    """Why ``layer`` is not a plain Linear of one of ``types`` (a parametrized one computes its weight), or ``""``."""
    if is_parametrized(layer):
        return f"{name} is parametrized (torch.nn.utils.parametrize); the fused op reads raw parameters"
    if type(layer) not in types:
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


def _probe_tensor(shape: tuple, like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random normal values of ``like``'s dtype and device, from a private generator seeded with ``seed``
    (no RNG side effects)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def _probe_problem(module: nn.Module, new: nn.Module, calls: list, contract: str,
                   context=contextlib.nullcontext()) -> str:
    """Why ``module`` and its replacement ``new`` disagree on the probe ``calls``, or ``""``.

    Both run in eval mode, without grad, inside ``context``, ``new`` on the reference backend; every
    training flag in ``module`` (and ``new``) is restored afterwards.
    """
    if any(p.is_meta for p in new.parameters()):
        return "its parameters are on the meta device, so its forward cannot be checked"
    flags = [(m, m.training) for m in (*module.modules(), new)]
    try:
        module.eval()
        new.eval()
        with torch.no_grad(), use_backend("reference"), context:
            for args, kwargs in calls:
                try:
                    got = module(*args, **kwargs)
                except Exception as exc:  # any failure of a foreign forward means: leave it alone
                    return f"its forward raised {type(exc).__name__} on a probe input: {exc}"
                if not _same_outputs(got, new(*args, **kwargs)):
                    return f"forward differs from {contract} on a probe input"
    finally:
        for m, training in flags:
            m.training = training
    return ""


def _same_outputs(got, want) -> bool:
    """Whether ``got`` has the structure of ``want`` (a tensor, None, or a tuple of them) and its values
    within the ``PROBE_TOLERANCE`` of their dtype."""
    if isinstance(want, torch.Tensor):
        tol = PROBE_TOLERANCE.get(want.dtype, 1e-2)
        return (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
                and torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True))
    if want is None:
        return got is None
    return (type(got) is type(want) and len(got) == len(want)
            and all(_same_outputs(g, w) for g, w in zip(got, want)))


def _is_clam_ungated(sequence: nn.Module) -> bool:
    """``Sequential(Linear, Tanh[, Dropout], Linear)``: the ``module`` of CLAM's ungated ``Attn_Net``."""
    layers = list(sequence) if type(sequence) is nn.Sequential else []
    return (len(layers) in (3, 4) and type(layers[0]) is nn.Linear and type(layers[1]) is nn.Tanh
            and type(layers[-1]) is nn.Linear)


def _clam_ungated_problem(module: nn.Module) -> str:
    return "CLAM's ungated Attn_Net is left as it is (only Attn_Net_Gated is swapped)"


def _tokens_probe_calls(first_linear: str):
    """The probe calls of a module taking tokens ``(B, N, C)``, C being the ``in_features`` of its
    ``first_linear``: two bags of 3 tokens, then one bag of 1."""

    def calls(module: nn.Module) -> list:
        weight = getattr(module, first_linear).weight
        return [((_probe_tensor(shape + (weight.shape[1],), weight),), {}) for shape in ((2, 3), (1, 1))]

    return calls


def _lin_mil_probe_calls(module: nn.Module) -> list:
    """The token probe calls of a Lin-MIL model; with a ``pos_enc``, which Lin-MIL calls as
    ``pos_enc(x, coords)``, each call also passes random ``coords: (B, N, 2)``."""
    calls = _tokens_probe_calls("projection")(module)
    if getattr(module, "pos_enc", None) is None:
        return calls
    weight = module.projection.weight
    return [((x, _probe_tensor(x.shape[:2] + (2,), weight, seed=1)), kwargs) for (x,), kwargs in calls]


def _linear_attention_problem(module: nn.Module) -> str:
    """Why a module with Lin-MIL's ``LinearAttention`` children cannot be swapped, or ``""``."""
    names = _child_names(module)
    if names != LINEAR_CHILDREN:
        return f"its children are {sorted(names)}, expected {sorted(LINEAR_CHILDREN)}"
    qkv, proj = module.qkv, module.proj
    problem = _linear_problem(qkv, "qkv") or _linear_problem(proj, "proj")
    if problem:
        return problem
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or proj.in_features != dim:
        return f"qkv {tuple(qkv.weight.shape)} and proj {tuple(proj.weight.shape)} are not Linear(C, 3C), Linear(C, .)"
    temperature = getattr(module, "temperature", None)
    heads = temperature.shape[0] if isinstance(temperature, torch.Tensor) and temperature.dim() == 3 else 0
    if not heads or temperature.shape[1:] != (1, 1) or dim % heads or getattr(module, "num_heads", heads) != heads:
        return f"temperature is not a (num_heads, 1, 1) parameter with num_heads dividing C = {dim}"
    return activation_problem(module.act) or _own_problem(module, ("temperature",))


def _softmax_attention_problem(module: nn.Module) -> str:
    """Why a module with Lin-MIL's softmax ``Attention`` children cannot be swapped, or ``""``."""
    names = _child_names(module)
    if names != {"attend", "to_qkv", "to_out"}:
        return f"its children are {sorted(names)}, expected ['attend', 'to_out', 'to_qkv']"
    if type(module.attend) is not nn.Softmax or module.attend.dim not in (-1, 3):
        return "attend is not Softmax(dim=-1)"
    heads, scale = getattr(module, "heads", None), getattr(module, "scale", None)
    if not isinstance(heads, int) or heads <= 0 or not isinstance(scale, float):
        return "it lacks the int heads and float scale of Lin-MIL's Attention"
    problem = _linear_problem(module.to_qkv, "to_qkv")
    if problem or module.to_qkv.out_features % (3 * heads):
        return problem or f"to_qkv's {module.to_qkv.out_features} outputs are not 3 x heads ({heads}) x dim_head"
    return _own_problem(module)


def _dilated_problem(module: nn.Module) -> str:
    """Why a recognized dilated attention module stays as it is (:func:`swap_dilated.problem`, then
    parameters or buffers of its own), or ``""``."""
    return swap_dilated.problem(module) or _own_problem(module)


def _cross_attention_problem(module: nn.Module) -> str:
    """Why a module with CMA-MIL's ``CrossAttention`` children stays as it is (:func:`swap_cross_attention.problem`,
    then parameters or buffers of its own), or ``""``."""
    return swap_cross_attention.problem(module) or _own_problem(module)


def _block_type(block: nn.Module) -> str:
    """A Lin-MIL block's attention: its ``attention_type`` (ablation blocks), else ``"linear"``."""
    return getattr(block, "attention_type", "linear")


def _block_type_problem(block: nn.Module) -> str:
    return (f"attention_type={_block_type(block)!r}: milkernels has no fused kernel for it "
            f"(only {', '.join(map(repr, FUSED_BLOCK_TYPES))} blocks are)")


def _lin_mil_problem(module: nn.Module) -> str:
    """Why a ``Lin_MIL`` model cannot take :class:`FusedLinMIL`'s forward, or ``""``."""
    expected = {"projection", "dropout", "transformer", "norm", "mlp_head"}
    if isinstance(getattr(module, "pos_enc", None), nn.Module):
        expected.add("pos_enc")
    if _child_names(module) != expected:
        return f"its children are {sorted(_child_names(module))}, expected {sorted(expected)}"
    pool = getattr(module, "pool", None)
    if pool not in ("cls", "mean"):
        return f"pool={pool!r}; Lin-MIL pools with 'cls' or 'mean'"
    blocks = module.transformer
    if type(blocks) is not nn.ModuleList or len(blocks) == 0:
        return "transformer is not a non-empty ModuleList of blocks"
    for index, block in enumerate(blocks):
        if _child_names(block) != BLOCK_CHILDREN:
            return f"transformer.{index} is not a Lin-MIL block (children {sorted(BLOCK_CHILDREN)})"
        if _block_type(block) not in FUSED_BLOCK_TYPES:
            return f"transformer.{index} has {_block_type_problem(block)}"
        if _block_type(block) == "dilated" and not isinstance(block.attn, FUSED):
            problem = swap_dilated.unprobed_problem(block.attn)
            if problem:
                return f"transformer.{index}.attn: {problem}"
    return _own_problem(module, ("cls_token",) if pool == "cls" else ())


def _lin_mil_view(module: nn.Module) -> nn.Module:
    """A throw-away instance of the fused class sharing ``module``'s state: what the probe runs."""
    cls = fused_lin_mil_class(type(module))
    view = cls.__new__(cls)
    view.__dict__.update(module.__dict__)
    return view


def _fuse_lin_mil(module: nn.Module) -> nn.Module:
    """``module`` itself, its class now :func:`fused_lin_mil_class` of its class (parameters, children,
    ``state_dict`` and identity unchanged)."""
    module.__class__ = fused_lin_mil_class(type(module))
    return module


def _mha_problem(module: nn.MultiheadAttention) -> str:
    """Why an ``nn.MultiheadAttention`` cannot take :class:`MultiheadAttention`'s fused path, or ``""``."""
    problem = fused_path_problem(module)
    if problem:
        return f"{problem}, so the fused path would never run"
    if is_parametrized(module):
        return "it is parametrized (torch.nn.utils.parametrize); the fused op reads raw parameters"
    problem = _linear_problem(module.out_proj, "out_proj", MHA_OUT_PROJ_TYPES)
    if problem:
        return problem
    weights = ("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return _own_problem(module, weights + (("in_proj_bias",) if module.in_proj_bias is not None else ()))


def _mha_probe_calls(module: nn.MultiheadAttention) -> list:
    """2 queries on 2 bags of 3 instances (``key is value``), in the module's layout: plain, with a
    ``key_padding_mask: (2, 3)`` (True = padding) and with per-head weights."""
    weight = module.out_proj.weight
    query = _probe_tensor((2, 2, module.embed_dim), weight)
    x = _probe_tensor((2, 3, module.kdim), weight, seed=1)
    if not module.batch_first:
        query, x = query.transpose(0, 1), x.transpose(0, 1)
    padding = torch.tensor([[False, False, False], [False, False, True]], device=weight.device)
    return [((query, x, x), {}), ((query, x, x), dict(key_padding_mask=padding)),
            ((query, x, x), dict(key_padding_mask=padding, average_attn_weights=False))]


def _asmil_problem(module: nn.Module) -> str:
    """Why a module with ASMIL's attention children cannot become a :class:`QueryAttention`, or ``""``."""
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for name in projections:
        problem = _linear_problem(getattr(module, name), name)
        if problem:
            return problem
    if type(module.layer_norm) is not nn.LayerNorm or type(module.dropout) is not nn.Dropout:
        return "layer_norm and dropout are not a LayerNorm and a Dropout"
    shapes = {name: tuple(getattr(module, name).weight.shape) for name in projections}
    width = shapes["q_proj"][0]
    if not shapes["q_proj"] == shapes["k_proj"] == shapes["v_proj"] or shapes["out_proj"][1] != width:
        return f"the projections are not Linear(E, I) x 3 and Linear(I, E): {shapes}"
    heads = getattr(module, "num_heads", None)
    if type(heads) is not int or heads <= 0 or width % heads:
        return f"num_heads={heads!r} is not an int dividing the projection width {width}"
    if type(getattr(module, "softmax", True)) is not bool:
        return f"softmax={module.softmax!r} is not a bool (True: softmax, False: NSF)"
    return _own_problem(module)


def _asmil_probe_calls(module: nn.Module) -> list:
    """One bag: ``q: (1, 3, E)`` and ``k = v: (1, 5, E)``."""
    weight = module.k_proj.weight
    x = _probe_tensor((1, 5, weight.shape[1]), weight, seed=1)
    return [((_probe_tensor((1, 3, module.q_proj.in_features), weight), x, x), {})]
