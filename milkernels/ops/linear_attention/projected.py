"""Linear attention with its ``qkv`` projection in the op: the ``(T, 3C)`` projection output is never kept.

:func:`projected_linear_attention` is ``linear_attention(x @ weight^T + bias, ...)`` (its ``out`` and, if asked,
its map). On the triton backend one custom op makes ``qkv`` inside the forward, runs the kernels and lets
``qkv`` go: what it keeps for the backward is ``x`` (the caller's), the weights and the per-bag state
``(B, H, dh + 1, dh)``. The backward makes ``qkv`` again (one GEMM, where the unfused layer kept ``T x 3C``),
runs the gradient kernels and takes the projection's gradients from ``d_qkv``. In Lin-MIL's layer (the
``proj`` after it keeps its own input, ``T x C``) that leaves about a seventh of what Lin-MIL's own layer
keeps, and 1/4 of the unfused op's ``qkv`` plus ``out``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _library
from .._bags import autocast_inputs, check_float, check_same_device
from . import (OP_NAME, _plan, _state_and_normalizer_flops, check_options, prepare_call, reference, reference_sum,
               sum_shards)


@_library.custom_op("linear_attention_projected_forward")
def _forward_op(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: Optional[Tensor],
                bounds: list[int], row_valid: Optional[Tensor], num_heads: int, activation: str, denominator: str,
                clamp_min: float, eps: float, want_map: bool, group_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """``(out: (T, C), map: (T,) or empty, state: (B, H, dh + 1, dh) float32)`` of packed rows ``x2d: (T, L)``
    through ``qkv = x2d weight^T + bias`` (``weight: (3C, L)``), made here and not returned; with ``group_name``,
    the state is summed over the ranks (sequence parallelism)."""
    from . import triton as kernels

    qkv2d = F.linear(x2d, weight, bias)
    plan = _plan(qkv2d, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps)
    out, _, attention_map, (state,) = kernels.forward(qkv2d, temperature, row_valid, plan, False, want_map,
                                                      sum_shards(group_name))
    return tuple(_library.owned([out, attention_map, state], x2d))


@_forward_op.register_fake
def _(x2d, weight, bias, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps,
      want_map, group_name):
    rows, channels = x2d.shape[0], weight.shape[0] // 3
    head_dim = channels // num_heads
    attention_map = x2d.new_empty(rows) if want_map else _library.absent(x2d)
    state = x2d.new_empty(len(bounds) - 1, num_heads, head_dim + 1, head_dim, dtype=torch.float32)
    return x2d.new_empty(rows, channels), attention_map, state


@_library.custom_op("linear_attention_projected_backward")
def _backward_op(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: Optional[Tensor],
                 bounds: list[int], row_valid: Optional[Tensor], num_heads: int, activation: str, denominator: str,
                 clamp_min: float, eps: float, state: Tensor, d_out: Optional[Tensor],
                 d_map: Optional[Tensor], group_name: Optional[str]) -> list[Tensor]:
    """``[d_x2d, d_weight, d_bias, d_temperature]`` (the last two empty where absent), ``qkv`` made again."""
    from . import triton as kernels

    qkv2d = F.linear(x2d, weight, bias)
    plan = _plan(qkv2d, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps)
    d_qkv, d_temperature = kernels.backward(qkv2d, temperature, row_valid, (state,), plan, d_out, None, d_map,
                                            sum_shards(group_name))
    del qkv2d
    d_bias = d_qkv.sum(0) if bias is not None else None
    return _library.owned([d_qkv @ weight, d_qkv.t() @ x2d, d_bias, d_temperature], x2d)


@_backward_op.register_fake
def _(x2d, weight, bias, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min, eps, state,
      d_out, d_map, group_name):
    present = [t if t is not None else _library.absent(x2d) for t in (bias, temperature)]
    return [torch.empty_like(x2d), torch.empty_like(weight)] + [torch.empty_like(t) for t in present]


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, temperature, bounds, row_valid, *options, _, group_name = inputs
    ctx.save_for_backward(x2d, weight, bias, temperature, row_valid, output[2])
    ctx.options = (bounds, *options)
    ctx.group_name = group_name
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, d_out, d_map, d_state):
    x2d, weight, bias, temperature, row_valid, state = ctx.saved_tensors
    bounds, *options = ctx.options
    grads = _backward_op(x2d, weight, bias, temperature, bounds, row_valid, *options, state, d_out, d_map,
                         ctx.group_name)
    present = [grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)]
    return (*present, *[None] * 9)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_library.forbid_double_backward(_backward_op, OP_NAME)


def _projection_flops(x2d, weight) -> int:
    """The projection's matmul: ``2 T L 3C``."""
    return 2 * x2d[0] * x2d[1] * weight[0]


@_library.flop_formula("linear_attention_projected_forward")
def _forward_flops(x2d, weight, bias, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min,
                   eps, want_map, group_name):
    """The projection and the attention's forward (``linear_attention_forward``'s count on ``qkv``)."""
    return _projection_flops(x2d, weight) + sum(_state_and_normalizer_flops((x2d[0], weight[0]), num_heads))


@_library.flop_formula("linear_attention_projected_backward")
def _backward_flops(x2d, weight, bias, temperature, bounds, row_valid, num_heads, activation, denominator, clamp_min,
                    eps, state, d_out, d_map, group_name):
    """Both gradients of the projection and the attention's backward (the projection made again is not
    counted, as no kernel's recompute is)."""
    products, normalizer = _state_and_normalizer_flops((x2d[0], weight[0]), num_heads)
    return 2 * _projection_flops(x2d, weight) + 2 * products + (2 * normalizer if d_out is not None else 0)


def _check_projection(x, weight, bias) -> None:
    """ValueError unless ``x: (..., L)``, ``weight: (3C, L)`` and ``bias: (3C,)`` or None share a float dtype and
    a device, ``x`` being one bag, padded bags or packed rows."""
    check_float("x", x)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, L), (B, N, L) or packed (T, L), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (3C, L) with L = x's last size {x.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},) or None, got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"x, weight and bias must share one dtype, got {sorted(map(str, dtypes))}")
    check_same_device(x=x, weight=weight, bias=bias)


def projected_linear_attention(x, weight, bias, num_heads, *, activation="relu", temperature=None,
                               denominator="eps", clamp_min: float = 100.0, eps: float = 1e-6, mask=None,
                               cu_seqlens=None, return_map: bool = False, process_group=None):
    """:func:`~milkernels.ops.linear_attention` of ``qkv = x weight^T + bias``, keeping no ``qkv`` for the backward.

    Args:
        x: one bag ``(N, L)``, padded bags ``(B, N, L)`` with an optional ``mask: (B, N)``, or packed rows
            ``(T, L)`` with ``cu_seqlens``; ``weight: (3C, L)`` and ``bias: (3C,)`` or None, the projection
            (Lin-MIL's ``qkv`` Linear), in x's dtype (under ``torch.autocast``, cast to its dtype).
        The other arguments as :func:`~milkernels.ops.linear_attention`'s.

    Returns:
        ``out`` (``(N, C)``, ``(B, N, C)`` or ``(T, C)``, before the output projection) and, with ``return_map``,
        the attention map (``(N,)``, ``(B, N)`` or ``(T,)``). No numerator: for it, project and call
        :func:`~milkernels.ops.linear_attention`.
    """
    x, weight, bias, temperature = autocast_inputs(x, weight, bias, temperature)
    _check_projection(x, weight, bias)
    check_options(weight.shape[0], num_heads, activation, temperature, denominator, x)
    shard, group_name, tau, options, backend = prepare_call(
        x, mask, cu_seqlens, temperature, process_group, channels=weight.shape[0] // 3, num_heads=num_heads,
        activation=activation, denominator=denominator, clamp_min=clamp_min, eps=eps)
    bags = shard.bags
    if backend == "reference":
        out, _, attention_map = reference.linear_attention(F.linear(bags.x2d, weight, bias), bags, temperature=tau,
                                                           sum_shards=reference_sum(group_name), **options)
    else:
        out, attention_map, _ = _forward_op(bags.x2d.contiguous(), weight.contiguous(),
                                            bias.contiguous() if bias is not None else None,
                                            tau.contiguous() if tau is not None else None, list(bags.bounds),
                                            bags.row_valid, *options.values(), return_map, group_name)
    out = shard.rows_to_caller(out)
    return (out, shard.rows_to_caller(attention_map)) if return_map else out


def lin_mil_projected_attention(x, weight, bias, temperature, num_heads, *, activation="relu", mask=None,
                                cu_seqlens=None, return_map=False, process_group=None):
    """Lin-MIL's ``LinearAttention`` from its input ``x`` (before ``proj``): :func:`projected_linear_attention`
    with the temperature and the denominator clamped at 100, as :func:`~milkernels.ops.lin_mil_attention`."""
    return projected_linear_attention(x, weight, bias, num_heads, activation=activation, temperature=temperature,
                                      denominator="clamp", clamp_min=100.0, mask=mask, cu_seqlens=cu_seqlens,
                                      return_map=return_map, process_group=process_group)
