"""Non-causal linear attention (Lin-MIL's ``LinearAttention`` and the standard normalized form).

:func:`linear_attention` reads the packed ``qkv`` projection output directly (no permute copies),
reduces the per-head state ``S = sum k v^T`` and ``z = sum k`` over each bag in parallel, and
applies it per block of queries. :func:`lin_mil_attention` is Lin-MIL's exact form (temperature,
denominator clamped at 100). The math is in :mod:`.reference`.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from ... import _backends
from .. import _library, _sharded
from .._bags import autocast_inputs, bags_in_op, check_float, check_same_device, check_tensor, pack_bags
from . import reference

OP_NAME = "linear_attention"
ACTIVATIONS = tuple(reference.ACTIVATIONS)
DENOMINATORS = ("clamp", "eps")


def _plan(qkv2d, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps):
    from . import triton as kernels

    return kernels.Plan.make(bags_in_op(qkv2d, bounds, row_valid), num_heads, activation, denominator, clamp_min, eps)


@_library.custom_op("linear_attention_forward")
def _forward_op(qkv2d: Tensor, temperature: Optional[Tensor], bounds: list[int], row_valid: Optional[Tensor],
                num_heads: int, activation: str, denominator: str, clamp_min: float, eps: float, want_numerator: bool,
                want_map: bool, group_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The triton forward on packed rows ``qkv2d: (T, 3C)`` with bag ``bounds`` (B + 1 ints).

    Returns ``out: (T, C)``, ``numerator: (T, H, dh)`` and ``map: (T,)`` in qkv's dtype (the last two
    empty unless asked for), and ``state: (B, H, dh + 1, dh)`` float32 (S and z per bag and head). With
    ``group_name`` (sequence parallelism), ``qkv2d`` is a rank's shard and the state is summed over the ranks.
    """
    from . import triton as kernels

    plan = _plan(qkv2d, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps)
    out, numerator, attention_map, (state,) = kernels.forward(qkv2d, temperature, row_valid, plan, want_numerator,
                                                              want_map, sum_shards(group_name))
    return tuple(_library.owned([out, numerator, attention_map, state], qkv2d))


@_forward_op.register_fake
def _(qkv2d, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps, want_numerator,
      want_map, group_name):
    rows, channels = qkv2d.shape[0], qkv2d.shape[1] // 3
    head_dim = channels // num_heads
    numerator = qkv2d.new_empty(rows, num_heads, head_dim) if want_numerator else _library.absent(qkv2d)
    attention_map = qkv2d.new_empty(rows) if want_map else _library.absent(qkv2d)
    state = qkv2d.new_empty(len(bounds) - 1, num_heads, head_dim + 1, head_dim, dtype=torch.float32)
    return qkv2d.new_empty(rows, channels), numerator, attention_map, state


@_library.custom_op("linear_attention_backward")
def _backward_op(qkv2d: Tensor, temperature: Optional[Tensor], bounds: list[int], row_valid: Optional[Tensor],
                 num_heads: int, activation: str, denominator: str, clamp_min: float, eps: float, state: Tensor,
                 d_out: Optional[Tensor], d_numerator: Optional[Tensor], d_map: Optional[Tensor],
                 group_name: Optional[str]) -> list[Tensor]:
    """``[d_qkv: (T, 3C), d_temperature: (H,)]`` (the latter empty without a temperature) from the upstream
    gradients of out, numerator and map (any may be None); ``state`` is the forward's. With ``group_name``, the
    state's gradient is summed over the ranks, and the temperature's is the rank's share."""
    from . import triton as kernels

    plan = _plan(qkv2d, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps)
    grads = kernels.backward(qkv2d, temperature, row_valid, (state,), plan, d_out, d_numerator, d_map,
                             sum_shards(group_name))
    return _library.owned(grads, qkv2d)


@_backward_op.register_fake
def _(qkv2d, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps, state, d_out,
      d_numerator, d_map, group_name):
    return [torch.empty_like(qkv2d), torch.empty_like(temperature) if temperature is not None else _library.absent(qkv2d)]


def _setup_context(ctx, inputs, output):
    qkv2d, temperature, bounds, row_valid, *options, _, _, group_name = inputs
    ctx.save_for_backward(qkv2d, temperature, row_valid, output[3])
    ctx.options = (bounds, *options)
    ctx.group_name = group_name
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)


def _backward(ctx, d_out, d_numerator, d_map, d_state):
    qkv2d, temperature, row_valid, state = ctx.saved_tensors
    bounds, *options = ctx.options
    d_qkv, d_temperature = _backward_op(qkv2d, temperature, bounds, row_valid, *options, state, d_out, d_numerator,
                                        d_map, ctx.group_name)
    return (d_qkv, d_temperature if ctx.needs_input_grad[1] else None, *[None] * 10)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_library.forbid_double_backward(_backward_op, OP_NAME)


def sum_shards(group_name: Optional[str]):
    """What the kernels call to sum a per-bag state (or its gradient) over the ranks of process group
    ``group_name`` in place; None without one."""
    if group_name is None:
        return None
    return lambda state: _sharded.sum_over_ranks(state, group_name, OP_NAME)


def _state_and_normalizer_flops(qkv2d, num_heads) -> tuple[int, int]:
    """The reference's forward matmuls over all bags and heads: ``k^T v`` and ``q S`` together (2 n dh^2 each),
    and ``q . z`` (2 n dh)."""
    rows, channels = qkv2d[0], qkv2d[1] // 3
    return 4 * rows * channels * (channels // num_heads), 2 * rows * channels


@_library.flop_formula("linear_attention_forward")
def _forward_flops(qkv2d, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps,
                   want_numerator, want_map, group_name):
    """``k^T v``, ``q S`` and ``q . z``; the reference forms the numerator and the map whether asked for or not."""
    return sum(_state_and_normalizer_flops(qkv2d, num_heads))


@_library.flop_formula("linear_attention_backward")
def _backward_flops(qkv2d, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps, state,
                    d_out, d_numerator, d_map, group_name):
    """Both gradients of ``k^T v`` and ``q S`` (any output's gradient reaches them) and of ``q . z`` (out's does).

    Counts a gradient for qkv, which the op always computes: where only the temperature takes one, the
    reference differentiates ``q S`` for S alone, ``2 T C dh`` FLOPs, which these arguments cannot tell.
    """
    products, normalizer = _state_and_normalizer_flops(qkv2d, num_heads)
    any_gradient = d_out is not None or d_numerator is not None or d_map is not None
    return (2 * products if any_gradient else 0) + (2 * normalizer if d_out is not None else 0)


def _check(qkv, num_heads, activation, temperature, denominator):
    check_float("qkv", qkv)
    if qkv.dim() not in (2, 3):
        raise ValueError(f"qkv must be (N, 3C), (B, N, 3C) or packed (T, 3C), got rank {qkv.dim()} shape {tuple(qkv.shape)}")
    check_options(qkv.shape[-1], num_heads, activation, temperature, denominator, qkv)


def check_options(width: int, num_heads, activation, temperature, denominator, like: Tensor) -> None:
    """ValueError unless ``width`` (3C) splits into q, k and v of ``num_heads`` heads and the activation,
    the denominator and the temperature (a number, or a tensor of one value or one per head on ``like``'s
    device in its dtype) are ones the op takes."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if width % (3 * num_heads) != 0 or width == 0:
        raise ValueError(f"qkv's last size must be 3C with C divisible by num_heads={num_heads}, got {width}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be 'clamp' or 'eps', got {denominator!r}")
    if temperature is not None and not isinstance(temperature, numbers.Real):
        check_tensor("temperature", temperature)
        check_same_device(qkv=like, temperature=temperature)
        if temperature.numel() not in (1, num_heads):
            raise ValueError(f"temperature must be a number, or a tensor of one value or one per head ({num_heads}) "
                             f"such as (H,) or (H, 1, 1), got shape {tuple(temperature.shape)}")
        if temperature.dtype != like.dtype:
            raise ValueError(f"temperature is {temperature.dtype} but qkv is {like.dtype}: give them one dtype")
    if isinstance(temperature, bool):
        raise ValueError("temperature must be a number or a tensor, got a bool")


def per_head(temperature, num_heads: int, like: torch.Tensor):
    """The temperature as ``(H,)`` in ``like``'s dtype and device: a number is filled in, one value is
    expanded (its gradient summed back), H values are reshaped; None stays None."""
    if temperature is None:
        return None
    if isinstance(temperature, numbers.Real):
        return torch.full((num_heads,), float(temperature), dtype=like.dtype, device=like.device)
    return temperature.reshape(-1).expand(num_heads) if temperature.numel() == 1 else temperature.reshape(num_heads)


def linear_attention(qkv, num_heads, *, activation="relu", temperature=None, denominator="eps",
                     clamp_min: float = 100.0, eps: float = 1e-6, mask=None, cu_seqlens=None,
                     return_numerator: bool = False, return_map: bool = False, process_group=None):
    """Non-causal linear attention over bags, from the packed projection ``qkv = [q | k | v]``.

    Args:
        qkv: one bag ``(N, 3C)``; padded bags ``(B, N, 3C)`` with an optional ``mask: (B, N)``
            (nonzero = real instance); or packed bags ``(T, 3C)`` with ``cu_seqlens: (B + 1,)``.
            The heads are contiguous in each of q, k and v.
        num_heads: H; the head size is dh = C / H.
        activation: the feature map phi on q and k: relu, gelu, elu, leaky_relu, tanh or softplus.
        temperature: scales S per head: a number, a tensor of one value (0-d) or of H values (``(H,)``,
            Lin-MIL's ``(H, 1, 1)``, any shape), or None (no scaling).
        denominator: ``"eps"``: q.z + eps (the standard form); ``"clamp"``: max(q.z, clamp_min) (Lin-MIL).
        process_group: sequence parallelism (:mod:`milkernels.distributed`): ``qkv`` is this rank's shard of the
            bags (N may be 0; a packed bag needs a row on every rank); S and z are summed over the ranks, and the
            outputs are the shard's rows.

    qkv and the temperature share one dtype; under ``torch.autocast`` both are cast to its dtype first.

    Returns:
        ``out``: ``(N, C)``, ``(B, N, C)`` or ``(T, C)``, the heads concatenated (before the output
        projection); then, if asked, ``numerator``: ``(H, N, dh)``, ``(B, H, N, dh)`` (Lin-MIL's second
        output) or ``(T, H, dh)``; and ``attention_map``: ``(N,)``, ``(B, N)`` or ``(T,)``, the mean over heads and dh of the numerator,
        computed as q . mean_d(S) without forming the numerator. Masked rows give 0.
    """
    qkv, temperature = autocast_inputs(qkv, temperature)
    _check(qkv, num_heads, activation, temperature, denominator)
    shard, group_name, tau, options, backend = prepare_call(
        qkv, mask, cu_seqlens, temperature, process_group, channels=qkv.shape[-1] // 3, num_heads=num_heads,
        activation=activation, denominator=denominator, clamp_min=clamp_min, eps=eps)
    bags = shard.bags
    if backend == "reference":
        out, numerator, attention_map = reference.linear_attention(bags.x2d, bags, temperature=tau,
                                                                   sum_shards=reference_sum(group_name), **options)
    else:
        out, numerator, attention_map, _ = _forward_op(
            bags.x2d.contiguous(), tau.contiguous() if tau is not None else None, list(bags.bounds), bags.row_valid,
            *options.values(), return_numerator, return_map, group_name)
    results = [shard.rows_to_caller(out)]
    if return_numerator:
        results.append(shard.cut(_numerator_to_caller(bags, numerator), axis=-2))
    if return_map:
        results.append(shard.rows_to_caller(attention_map))
    return results[0] if len(results) == 1 else tuple(results)


def prepare_call(rows, mask, cu_seqlens, temperature, process_group, *, channels: int, num_heads: int,
                 activation: str, denominator: str, clamp_min: float, eps: float) -> tuple:
    """``(shard, group_name, tau, options, backend)`` for a call on ``rows`` (``(N, W)``, ``(B, N, W)`` or ``(T, W)``)
    whose q, k and v have ``channels`` (C) columns each: its packed bags as a :class:`~milkernels.ops._sharded.Shard`,
    the name of its process group (None without one), the per-head temperature (:func:`per_head`), the kernel options as
    the custom ops take them (``num_heads, activation, denominator, clamp_min, eps``, in that order) and the backend to
    run."""
    shard, group_name = _sharded.shard_call(OP_NAME, rows, rows.shape[-1], mask, cu_seqlens, process_group,
                                            heads=num_heads, activations=ACTIVATIONS.index(activation),
                                            denominators=DENOMINATORS.index(denominator))
    tau = per_head(temperature, num_heads, rows)
    options = dict(num_heads=num_heads, activation=activation, denominator=denominator, clamp_min=float(clamp_min),
                   eps=float(eps))
    head_dim = channels // num_heads
    backend = _backends.choose(OP_NAME, rows.device, lambda name: backend_reasons(name, rows, head_dim))
    return shard, group_name, tau, options, backend


def reference_sum(group_name: Optional[str]):
    """The reference's differentiable sum of the per-bag states over the ranks of ``group_name``; None without."""
    if group_name is None:
        return None
    return lambda states: _sharded.SumOfShards.apply(states, group_name, OP_NAME)


MAX_KERNEL_HEAD_DIM = 64
"""The largest head size the Triton kernels take: a program holds a head's ``(dh, dh)`` fp32 state (and in the
backward its gradient), padded to a power of two. Past 64 it does not fit an sm_90 SM: in bf16 the query-gradient
kernel at dh 256 asks for 320 KiB of shared memory and the apply kernel at 512 for 576 KiB (227 KiB an SM); the
fp32 gradient kernels have tiles up to 64 only (:data:`.triton.FP32_GRADIENT_ROWS`)."""


def backend_reasons(name: str, like: Tensor, head_dim: int) -> list[str]:
    """Why backend ``name`` cannot run the op on tensors like ``like`` with heads of ``head_dim`` features."""
    if name == "reference":
        return []
    reasons = _backends.kernel_reasons(name, like)
    if name == "cuda":
        reasons.append("no cuda kernel for linear attention")
    if head_dim > MAX_KERNEL_HEAD_DIM:
        reasons.append(f"heads of dh={head_dim} features: the {name} kernels hold a head's (dh x dh) state in one "
                       f"program and take dh <= {MAX_KERNEL_HEAD_DIM} (more heads of fewer features run on them)")
    return reasons


def _numerator_to_caller(bags, numerator):
    """``(T, H, dh)`` rows in Lin-MIL's head-major order, contiguous as Lin-MIL's: ``(B, H, N, dh)`` for
    padded bags, ``(H, N, dh)`` for one bag; packed bags keep ``(T, H, dh)``."""
    if bags.layout == "padded":
        return bags.rows_to_caller(numerator).permute(0, 2, 1, 3).contiguous()
    if bags.layout == "single":
        return numerator.permute(1, 0, 2).contiguous()
    return numerator


def lin_mil_attention(qkv, temperature, num_heads, *, activation="relu", mask=None, cu_seqlens=None,
                      return_numerator=False, return_map=False, process_group=None):
    """Lin-MIL's ``LinearAttention`` core: :func:`linear_attention` with a temperature (Lin-MIL's ``(H, 1, 1)``
    parameter, a number, a 0-d tensor or ``(H,)``) and the denominator clamped at 100: the reference's math,
    equal to it up to floating-point rounding."""
    return linear_attention(qkv, num_heads, activation=activation, temperature=temperature, denominator="clamp",
                            clamp_min=100.0, mask=mask, cu_seqlens=cu_seqlens,
                            return_numerator=return_numerator, return_map=return_map, process_group=process_group)


from .projected import lin_mil_projected_attention, projected_linear_attention  # noqa: E402  (uses the above)
