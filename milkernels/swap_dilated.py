"""What :func:`milkernels.swap` knows of LongNet dilated attention: torchscale's ``DilatedAttention``
(Prov-GigaPath's slide encoder) and Lin-MIL's copy of it, each replaced by
:class:`milkernels.nn.DilatedAttention` / :class:`milkernels.nn.LinMILDilatedAttention`.

A module is recognized when a class of its MRO is named ``DilatedAttention``, it has torchscale's children
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``dropout_module``, and maybe ``inner_attn_ln``, ``xpos``)
and an ``args`` with ``segment_length`` and ``dilated_ratio``; its ``forward`` signature says which contract
it has: ``(query, key, value, ...)`` (torchscale) or ``(x, ...)`` (Lin-MIL). The probe calls it as its
callers do (plainly, and with a ``key_padding_mask`` holding padding, which upstream ignores), on a short
bag and a bag of one token, in its parameters' dtype and device (float16 on the GPU, else the CPU, for
Lin-MIL's parameterless copy, which Lin-MIL calls in float16), under float16 autocast where the parameters
are float32 on the GPU (flash-attention takes 16-bit inputs only).

It stays as it is, with the reason, when: ``xpos`` is set (the op has no XPOS); ``dropout > 0`` (upstream's
flash path drops attention weights on every call, eval mode included, and the op has no dropout);
``args.flash_attention`` is False (upstream asserts it); upstream's attention kernel is missing
(``flash_attn_func`` is None where it was defined: no flash-attn or xformers, or no CUDA), so its forward
cannot run, let alone be checked; the branches or heads are outside what the op takes. A ``Lin_MIL``
holding a dilated block whose attention cannot be probed (a missing kernel) stays too, as its own probe would
run that attention. ``args.seq_parallel`` does not keep a module: the probes run with it off
(:func:`without_seq_parallel`), on one process, and the replacement keeps its meaning (upstream's gathering
across the default group, as the sequence-parallel op). What cannot be
known at swap time (``incremental_state``, ``is_causal``, ``attn_mask``, shards that upstream's seq-parallel
gathering does not line up with) is decided per call by the replacement, which runs upstream's own forward for
such calls (:mod:`milkernels.nn.dilated_attention`).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from .nn.dilated_attention import DilatedAttention, LinMILDilatedAttention
from .ops.dilated_attention import MAX_HEAD_DIM, check_branches

REQUIRED_CHILDREN = {"q_proj", "k_proj", "v_proj", "out_proj", "dropout_module"}
OPTIONAL_CHILDREN = {"inner_attn_ln", "xpos"}
CONTRACTS = {
    DilatedAttention: "torchscale's DilatedAttention: forward(query, key, value, ...) -> (attn, None)",
    LinMILDilatedAttention: "Lin-MIL's DilatedAttention: forward(x, ...) -> (attn, None)",
}
PROBE_MAX_LENGTH = 67  # the probe bag: min(shortest segment + 3, this) tokens


def is_dilated_attention(module: nn.Module) -> bool:
    """Whether ``module`` looks like torchscale's (or Lin-MIL's) ``DilatedAttention``: the class name in
    its MRO, the projection children and an ``args`` with ``segment_length`` and ``dilated_ratio``."""
    args = getattr(module, "args", None)
    return (any(cls.__name__ == "DilatedAttention" for cls in type(module).__mro__)
            and REQUIRED_CHILDREN <= {name for name, _ in module.named_children()}
            and hasattr(args, "segment_length") and hasattr(args, "dilated_ratio"))


def replacement_class(module: nn.Module) -> type | None:
    """The milkernels class with ``module``'s forward contract (by its signature), else None."""
    try:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    if names[:3] == ["query", "key", "value"]:
        return DilatedAttention
    if names[:1] == ["x"]:
        return LinMILDilatedAttention
    return None


def contract(module: nn.Module) -> str:
    """The contract the probe checks ``module``'s replacement against."""
    return CONTRACTS.get(replacement_class(module), "")


def replacement(module: nn.Module) -> DilatedAttention:
    """The milkernels module sharing ``module``'s children and state (:meth:`DilatedAttention.from_module`)."""
    return replacement_class(module).from_module(module)


def unprobed_problem(module: nn.Module) -> str:
    """Why ``module``'s own forward cannot be run by a probe here, or ``""``: its attention kernel is missing."""
    attention_ops = getattr(type(module), "attention_ops", None)
    namespace = getattr(attention_ops, "__globals__", {})
    if "flash_attn_func" in namespace and namespace["flash_attn_func"] is None:
        return (f"flash_attn_func is None in {namespace.get('__name__', 'its module')} (no flash-attn or xformers, or "
                "no CUDA), so its forward cannot run here, nor be checked against the fused op; swap where it runs, "
                f"or replace it with milkernels.nn.{replacement_class(module).__name__}.from_module")
    return ""


def problem(module: nn.Module) -> str:
    """Why a recognized dilated attention module stays as it is, or ``""`` (its own parameters and hooks
    are checked by :mod:`milkernels.swap`)."""
    if replacement_class(module) is None:
        return "its forward takes neither torchscale's (query, key, value, ...) nor Lin-MIL's (x, ...)"
    names = {name for name, _ in module.named_children()}
    if not names <= REQUIRED_CHILDREN | OPTIONAL_CHILDREN:
        return f"its children are {sorted(names)}, expected {sorted(REQUIRED_CHILDREN)} and maybe inner_attn_ln, xpos"
    if getattr(module, "xpos", None) is not None:
        return "xpos is set (args.xpos_rel_pos): the op has no XPOS rotary embedding"
    dropout = getattr(module, "dropout", 0.0)
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return (f"dropout={dropout!r}: upstream's flash path drops attention weights on every call (eval mode "
                "too) and the op has no dropout")
    args = module.args
    if not getattr(args, "flash_attention", True):
        return "args.flash_attention is False: upstream's DilatedAttention asserts it is True"
    try:
        check_branches(args.segment_length, args.dilated_ratio, "torchscale")
    except ValueError as exc:
        return f"args.segment_length and args.dilated_ratio: {exc}"
    heads, dim = getattr(module, "num_heads", None), getattr(module, "embed_dim", None)
    if type(heads) is not int or type(dim) is not int or heads <= 0 or dim % heads or dim // heads > MAX_HEAD_DIM:
        return f"num_heads={heads!r} and embed_dim={dim!r}: the op needs H dividing E and E / H <= {MAX_HEAD_DIM}"
    return unprobed_problem(module)


def _probe_like(module: nn.Module) -> tuple:
    """``(dtype, device)`` of the probe input: the parameters', else float16 on the GPU if any, else the CPU."""
    tensor = next(module.parameters(), None)
    if tensor is not None:
        return tensor.dtype, tensor.device
    return torch.float16, torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def probe_context(module: nn.Module):
    """float16 autocast where the parameters are float32 on the GPU (flash-attention wants 16-bit inputs), and
    :func:`without_seq_parallel`; entered by the ``with`` that takes it, not before."""
    dtype, device = _probe_like(module)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda" and dtype == torch.float32:
            stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        stack.enter_context(without_seq_parallel(module))
        yield


@contextlib.contextmanager
def without_seq_parallel(model: nn.Module):
    """``args.seq_parallel`` False, inside the block, on every dilated attention of ``model``: a probe compares one
    process's results, and must not start a collective that the other processes are not in."""
    args = [module.args for module in model.modules() if is_dilated_attention(module)]
    saved = [getattr(a, "seq_parallel", False) for a in args]
    for a in args:
        a.seq_parallel = False
    try:
        yield
    finally:
        for a, value in zip(args, saved):
            a.seq_parallel = value


def probe_calls(module: nn.Module) -> list:
    """``(args, kwargs)`` of the probe calls: 2 bags of ``min(shortest segment + 3, 67)`` tokens, plainly and
    with a ``key_padding_mask: (2, N)`` (True = padding, the second bag's last 2 tokens), then 1 bag of 1."""
    dtype, device = _probe_like(module)
    generator = torch.Generator().manual_seed(0)
    length = min(min(module.args.segment_length) + 3, PROBE_MAX_LENGTH)
    x, one = (torch.randn(shape + (module.embed_dim,), generator=generator, dtype=torch.float64).to(device, dtype)
              for shape in ((2, length), (1, 1)))
    padding = torch.zeros(2, length, dtype=torch.bool, device=device)
    padding[1, -2:] = True
    if replacement_class(module) is LinMILDilatedAttention:
        return [((x,), {}), ((x,), dict(key_padding_mask=padding)), ((one,), {})]
    return [((x, x, x), {}), ((), dict(query=x, key=x, value=x, key_padding_mask=padding)), ((one, one, one), {})]
