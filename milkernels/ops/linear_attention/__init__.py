"""Non-causal linear attention (Lin-MIL's ``LinearAttention`` and the standard normalized form).

:func:`linear_attention` reads the packed ``qkv`` projection output directly (no permute copies),
reduces the per-head state ``S = sum k v^T`` and ``z = sum k`` over each bag in parallel, and
applies it per block of queries. :func:`lin_mil_attention` is Lin-MIL's exact form (temperature,
denominator clamped at 100). The math is in :mod:`.reference`.
"""

from __future__ import annotations

import torch

from ... import _backends
from .._bags import autocast_inputs, check_float, check_same_device, check_tensor, pack_bags
from . import reference

OP_NAME = "linear_attention"
ACTIVATIONS = tuple(reference.ACTIVATIONS)
DENOMINATORS = ("clamp", "eps")


class _LinearAttentionFn(torch.autograd.Function):
    """Fused forward and backward on the triton kernels."""

    @staticmethod
    def forward(ctx, qkv2d, temperature, row_valid, plan, want_numerator, want_map):
        from . import triton as kernels

        out, numerator, attention_map, (state,) = kernels.forward(qkv2d, temperature, row_valid, plan,
                                                                  want_numerator, want_map)
        ctx.save_for_backward(qkv2d, temperature, row_valid, state)
        ctx.plan = plan
        return out, numerator, attention_map

    @staticmethod
    def backward(ctx, d_out, d_numerator, d_map):
        from . import triton as kernels

        qkv2d, temperature, row_valid, state = ctx.saved_tensors
        d_qkv, d_temperature = kernels.backward(qkv2d, temperature, row_valid, (state,), ctx.plan, d_out, d_numerator,
                                                d_map)
        return d_qkv, d_temperature if ctx.needs_input_grad[1] else None, None, None, None, None


def _check(qkv, num_heads, activation, temperature, denominator):
    check_float("qkv", qkv)
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() not in (2, 3):
        raise ValueError(f"qkv must be (N, 3C), (B, N, 3C) or packed (T, 3C), got rank {qkv.dim()} shape {tuple(qkv.shape)}")
    if qkv.shape[-1] % (3 * num_heads) != 0 or qkv.shape[-1] == 0:
        raise ValueError(f"qkv's last size must be 3C with C divisible by num_heads={num_heads}, got {qkv.shape[-1]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be 'clamp' or 'eps', got {denominator!r}")
    if temperature is not None:
        check_tensor("temperature", temperature)
        check_same_device(qkv=qkv, temperature=temperature)
        if temperature.numel() != num_heads:
            raise ValueError(f"temperature must hold one value per head ({num_heads}), got shape {tuple(temperature.shape)}")
        if temperature.dtype != qkv.dtype:
            raise ValueError(f"temperature is {temperature.dtype} but qkv is {qkv.dtype}: give them one dtype")


def linear_attention(qkv, num_heads, *, activation="relu", temperature=None, denominator="eps",
                     clamp_min: float = 100.0, eps: float = 1e-6, mask=None, cu_seqlens=None,
                     return_numerator: bool = False, return_map: bool = False):
    """Non-causal linear attention over bags, from the packed projection ``qkv = [q | k | v]``.

    Args:
        qkv: one bag ``(N, 3C)``; padded bags ``(B, N, 3C)`` with an optional ``mask: (B, N)``
            (nonzero = real instance); or packed bags ``(T, 3C)`` with ``cu_seqlens: (B + 1,)``.
            The heads are contiguous in each of q, k and v.
        num_heads: H; the head size is dh = C / H.
        activation: the feature map phi on q and k: relu, gelu, elu, leaky_relu, tanh or softplus.
        temperature: ``(H,)`` (any shape with H values) scaling S per head, or None.
        denominator: ``"eps"``: q.z + eps (the standard form); ``"clamp"``: max(q.z, clamp_min) (Lin-MIL).

    qkv and the temperature share one dtype; under ``torch.autocast`` both are cast to its dtype first.

    Returns:
        ``out``: ``(N, C)``, ``(B, N, C)`` or ``(T, C)``, the heads concatenated (before the output
        projection); then, if asked, ``numerator``: ``(H, N, dh)``, ``(B, H, N, dh)`` (Lin-MIL's second
        output) or ``(T, H, dh)``; and ``attention_map``: ``(N,)``, ``(B, N)`` or ``(T,)``, the mean over heads and dh of the numerator,
        computed as q . mean_d(S) without forming the numerator. Masked rows give 0.
    """
    qkv, temperature = autocast_inputs(qkv, temperature)
    _check(qkv, num_heads, activation, temperature, denominator)
    bags = pack_bags(qkv, qkv.shape[-1], mask, cu_seqlens)
    tau = temperature.reshape(num_heads) if temperature is not None else None
    options = dict(num_heads=num_heads, activation=activation, denominator=denominator,
                   clamp_min=float(clamp_min), eps=float(eps))
    backend = _backends.choose(OP_NAME, qkv.device, lambda name: [] if name == "reference" else (
        _backends.kernel_reasons(name, qkv) + (["no cuda kernel for linear attention"] if name == "cuda" else [])))
    if backend == "reference":
        out, numerator, attention_map = reference.linear_attention(bags.x2d, bags, temperature=tau, **options)
    else:
        from . import triton as kernels

        plan = kernels.Plan.make(bags, **options)
        out, numerator, attention_map = _LinearAttentionFn.apply(
            bags.x2d.contiguous(), tau.contiguous() if tau is not None else None, bags.row_valid, plan,
            return_numerator, return_map)
    results = [bags.rows_to_caller(out)]
    if return_numerator:
        results.append(_numerator_to_caller(bags, numerator))
    if return_map:
        results.append(bags.rows_to_caller(attention_map))
    return results[0] if len(results) == 1 else tuple(results)


def _numerator_to_caller(bags, numerator):
    """``(T, H, dh)`` rows in Lin-MIL's head-major order, contiguous as Lin-MIL's: ``(B, H, N, dh)`` for
    padded bags, ``(H, N, dh)`` for one bag; packed bags keep ``(T, H, dh)``."""
    if bags.layout == "padded":
        return bags.rows_to_caller(numerator).permute(0, 2, 1, 3).contiguous()
    if bags.layout == "single":
        return numerator.permute(1, 0, 2).contiguous()
    return numerator


def lin_mil_attention(qkv, temperature, num_heads, *, activation="relu", mask=None, cu_seqlens=None,
                      return_numerator=False, return_map=False):
    """Lin-MIL's ``LinearAttention`` core: :func:`linear_attention` with its temperature ``(H, 1, 1)``
    and the denominator clamped at 100: the reference's math, equal to it up to floating-point rounding."""
    return linear_attention(qkv, num_heads, activation=activation, temperature=temperature, denominator="clamp",
                            clamp_min=100.0, mask=mask, cu_seqlens=cu_seqlens,
                            return_numerator=return_numerator, return_map=return_map)
