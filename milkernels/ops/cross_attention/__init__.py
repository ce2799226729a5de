"""Cross-attention with a residual LayerNorm (CMA-MIL's cross-magnification block, H heads): public function,
checks, custom ops, dispatch.

The semantics are in :mod:`.reference`; the fused kernels in :mod:`.triton`, behind the custom ops
``milkernels::cross_attention_forward`` and ``..._backward``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ... import _backends
from .. import _library
from .._bags import autocast_inputs, check_float, check_same_device, check_tensor
from . import reference

OP_NAME = "cross_attention"


def _check_number(name: str, value, allow_none: bool) -> None:
    """Raise ValueError unless ``value`` is a finite real number > 0 (or None where ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got {value!r}")


def _check_inputs(xq, q, k, v, ln_weight, ln_bias, heads, softmax_scale, eps, key_padding_mask, cu_seqlens_q,
                  cu_seqlens_k) -> None:
    """Raise ValueError unless the tensors are of one float dtype and device, shaped as one bag, padded bags or
    packed bags with one E, the LayerNorm parameters are ``(E,)`` in that dtype or float32, ``heads`` divides E and
    the scale and eps are positive."""
    for name, t in dict(xq=xq, q=q, k=k, v=v).items():
        check_float(name, t)
    if not xq.dtype == q.dtype == k.dtype == v.dtype:
        raise ValueError(f"xq, q, k and v must share one dtype, got {xq.dtype}, {q.dtype}, {k.dtype}, {v.dtype}")
    layout = dict(key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    for name, t in layout.items():
        if t is not None:
            check_tensor(name, t)
    if xq.dim() not in (2, 3) or not xq.dim() == q.dim() == k.dim() == v.dim():
        raise ValueError(f"xq, q: (Nq, E) and k, v: (Nk, E), or padded (B, Nq, E) and (B, Nk, E), got shapes "
                         f"{tuple(xq.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != xq.shape or k.shape != v.shape:
        raise ValueError(f"q must have xq's shape and v k's, got xq {tuple(xq.shape)}, q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    width = xq.shape[-1]
    if k.shape[-1] != width or k.shape[:-2] != xq.shape[:-2]:
        raise ValueError(f"k and v must have xq's E (and batch size B), got xq {tuple(xq.shape)} and k "
                         f"{tuple(k.shape)}")
    for name, t in dict(ln_weight=ln_weight, ln_bias=ln_bias).items():
        if t is not None:
            check_float(name, t)
            if tuple(t.shape) != (width,) or t.dtype not in (xq.dtype, torch.float32):
                raise ValueError(f"{name} must be ({width},) in {xq.dtype} or float32, got {tuple(t.shape)} {t.dtype}")
    check_same_device(xq=xq, q=q, k=k, v=v, ln_weight=ln_weight, ln_bias=ln_bias, **layout)
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1 or width % heads:
        raise ValueError(f"heads must be an int >= 1 dividing E={width}, got {heads!r}")
    _check_number("softmax_scale", softmax_scale, allow_none=True)
    _check_number("eps", eps, allow_none=False)


def _bounds(name: str, cu_seqlens: Tensor, total_rows: int) -> tuple:
    """The bag boundaries in ``cu_seqlens: (B + 1,)`` as ints; ValueError unless they run from 0 to
    ``total_rows`` without decreasing (empty bags allowed)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be (B + 1,) int32 or int64 with B >= 1, got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    bounds = tuple(cu_seqlens.cpu().tolist())
    if bounds[0] != 0 or bounds[-1] != total_rows or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"{name} must run from 0 to the row count {total_rows} without decreasing, got {list(bounds)}")
    return bounds


def packed_bags(xq: Tensor, k: Tensor, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """The bags of checked inputs as ``(bounds_q, bounds_k, key_valid)``: B + 1 ints a side, and ``(Tk,)`` bool
    (False = padding) or None. ValueError for a layout the arguments do not fit."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k (packed bags), or neither")
    if cu_seqlens_q is not None:
        if xq.dim() != 2 or key_padding_mask is not None:
            raise ValueError(f"packed bags take 2-D xq, q: (Tq, E) and k, v: (Tk, E) and no key_padding_mask, got "
                             f"xq {tuple(xq.shape)}")
        bounds_q, bounds_k = _bounds("cu_seqlens_q", cu_seqlens_q, xq.shape[0]), _bounds("cu_seqlens_k", cu_seqlens_k,
                                                                                         k.shape[0])
        if len(bounds_q) != len(bounds_k):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count the same bags, got {len(bounds_q) - 1} and "
                             f"{len(bounds_k) - 1}")
        return bounds_q, bounds_k, None
    if xq.dim() == 2:
        if key_padding_mask is not None:
            raise ValueError("a key_padding_mask needs padded bags (B, N, E); one bag (N, E) takes none")
        return (0, xq.shape[0]), (0, k.shape[0]), None
    batch, queries, _ = xq.shape
    keys = k.shape[1]
    if batch == 0:
        raise ValueError(f"padded bags need B >= 1, got xq {tuple(xq.shape)}")
    key_valid = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, keys) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be ({batch}, {keys}) bool (True = padding), got "
                             f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")
        key_valid = ~key_padding_mask.reshape(-1)
    return (tuple(b * queries for b in range(batch + 1)), tuple(b * keys for b in range(batch + 1)), key_valid)


def _reasons(backend: str, xq: Tensor, heads: int) -> list[str]:
    if backend == "reference":
        return []
    reasons = _backends.kernel_reasons(backend, xq)
    if backend == "cuda":
        return reasons + ["no cuda kernel for cross attention (the triton one runs on CUDA tensors)"]
    from .triton import unsupported_shape

    return reasons + unsupported_shape(xq.shape[-1], heads)


def _plan(xq, bounds_q, bounds_k, heads):
    from . import triton as kernels

    return kernels.Plan(xq, bounds_q, bounds_k, heads)


def _vector(t: Optional[Tensor], width: int, fill: float, like: Tensor) -> Tensor:
    """A LayerNorm parameter as the kernels take it: ``(E,)`` float32, ``fill`` where it is None."""
    return like.new_full((width,), fill, dtype=torch.float32) if t is None else t.float().contiguous()


@_library.custom_op("cross_attention_forward")
def _forward_op(xq: Tensor, q: Tensor, k: Tensor, v: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                key_valid: Optional[Tensor], bounds_q: list[int], bounds_k: list[int], heads: int, scale: float,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The triton forward on contiguous packed rows ``xq, q: (Tq, E)``, ``k, v: (Tk, E)``: ``out`` and ``attn = A V``,
    ``(Tq, E)`` in xq's dtype, and float32 ``mean, rstd: (Tq,)`` of ``xq + attn`` and ``lse: (Tq, H)``."""
    from . import triton as kernels

    width = xq.shape[1]
    key_valid = key_valid if key_valid is not None else k.new_ones(k.shape[0], dtype=torch.bool)
    return kernels.forward(xq, q, k, v, key_valid, _vector(ln_weight, width, 1.0, xq), _vector(ln_bias, width, 0.0, xq),
                           _plan(xq, bounds_q, bounds_k, heads), scale, eps)


@_forward_op.register_fake
def _(xq, q, k, v, ln_weight, ln_bias, key_valid, bounds_q, bounds_k, heads, scale, eps):
    rows = xq.shape[0]
    stats = [xq.new_empty(rows, dtype=torch.float32) for _ in range(2)]
    return torch.empty_like(xq), torch.empty_like(xq), *stats, xq.new_empty(rows, heads, dtype=torch.float32)


@_library.custom_op("cross_attention_backward")
def _backward_op(xq: Tensor, q: Tensor, k: Tensor, v: Tensor, ln_weight: Optional[Tensor], key_valid: Optional[Tensor],
                 attn: Tensor, mean: Tensor, rstd: Tensor, lse: Tensor, d_out: Tensor, bounds_q: list[int],
                 bounds_k: list[int], heads: int, scale: float) -> list[Tensor]:
    """``[d_xq, d_q, d_k, d_v]`` in their inputs' shapes and dtype and ``d_ln: (2, E)`` float32 (the LayerNorm
    weight's gradient, then the bias's), from the forward's outputs and ``d_out``."""
    from . import triton as kernels

    key_valid = key_valid if key_valid is not None else k.new_ones(k.shape[0], dtype=torch.bool)
    return list(kernels.backward(xq, q, k, v, key_valid, _vector(ln_weight, xq.shape[1], 1.0, xq), attn, mean, rstd,
                                 lse, d_out.contiguous(), _plan(xq, bounds_q, bounds_k, heads), scale))


@_backward_op.register_fake
def _(xq, q, k, v, ln_weight, key_valid, attn, mean, rstd, lse, d_out, bounds_q, bounds_k, heads, scale):
    return [torch.empty_like(t) for t in (xq, q, k, v)] + [xq.new_empty(2, xq.shape[1], dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    xq, q, k, v, ln_weight, ln_bias, key_valid, bounds_q, bounds_k, heads, scale, eps = inputs
    _, attn, mean, rstd, lse = output
    ctx.save_for_backward(xq, q, k, v, ln_weight, key_valid, attn, mean, rstd, lse)
    ctx.options = (bounds_q, bounds_k, heads, scale)
    ctx.parameter_dtypes = [None if t is None else t.dtype for t in (ln_weight, ln_bias)]
    ctx.mark_non_differentiable(attn, mean, rstd, lse)


def _backward(ctx, d_out, *_):
    *grads, d_ln = _backward_op(*ctx.saved_tensors, d_out, *ctx.options)
    parameter_grads = [None if dtype is None else g.to(dtype) for g, dtype in zip(d_ln, ctx.parameter_dtypes)]
    return (*grads, *parameter_grads, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_library.forbid_double_backward(_backward_op, OP_NAME)


def _pair_flops(width: int, bounds_q, bounds_k) -> int:
    """The reference's forward matmuls: scores and weighted values, 2 E each per (query, key) pair of a bag."""
    return 4 * width * sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:],
                                                                          bounds_k[:-1], bounds_k[1:]))


@_library.flop_formula("cross_attention_forward")
def _forward_flops(xq, q, k, v, ln_weight, ln_bias, key_valid, bounds_q, bounds_k, heads, scale, eps):
    """The reference's score and value products over every bag (the LayerNorm is no matmul)."""
    return _pair_flops(xq[1], bounds_q, bounds_k)


@_library.flop_formula("cross_attention_backward")
def _backward_flops(xq, q, k, v, ln_weight, key_valid, attn, mean, rstd, lse, d_out, bounds_q, bounds_k, heads,
                    scale):
    """Twice the forward: both gradients of each of the reference's two products.

    Counts gradients for q, k and v, which the op always computes; where only some take one, the reference
    skips some of these products, which these arguments cannot tell.
    """
    return 2 * _pair_flops(xq[1], bounds_q, bounds_k)


def _local_launch(xq, k, coords_q, coords_k, patch_size_q, patch_size_k, radius, heads):
    from .local import LocalNeighbourhood
    from .local_triton import LocalLaunch

    return LocalLaunch(xq, k, LocalNeighbourhood(coords_q, coords_k, patch_size_q, patch_size_k, radius), heads)


@_library.custom_op("cross_attention_local_forward")
def _local_forward_op(xq: Tensor, q: Tensor, k: Tensor, v: Tensor, ln_weight: Optional[Tensor],
                      ln_bias: Optional[Tensor], coords_q: Tensor, coords_k: Tensor, patch_size_q: int,
                      patch_size_k: int, radius: int, heads: int, scale: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The block-sparse triton forward of one bag, ``xq, q: (Nq, E)``, ``k, v: (Nk, E)`` contiguous, each query
    attending to its neighbours (``coords_q: (Nq, 2)``, ``coords_k: (Nk, 2)`` integer level-0 corners): the dense
    forward op's five outputs."""
    from . import local_triton

    width = xq.shape[1]
    launch = _local_launch(xq, k, coords_q, coords_k, patch_size_q, patch_size_k, radius, heads)
    return local_triton.forward(xq, q, k, v, _vector(ln_weight, width, 1.0, xq), _vector(ln_bias, width, 0.0, xq),
                                launch, scale, eps)


@_local_forward_op.register_fake
def _(xq, q, k, v, ln_weight, ln_bias, coords_q, coords_k, patch_size_q, patch_size_k, radius, heads, scale, eps):
    return _forward_op(xq, q, k, v, ln_weight, ln_bias, None, [0, xq.shape[0]], [0, k.shape[0]], heads, scale, eps)


@_library.custom_op("cross_attention_local_backward")
def _local_backward_op(xq: Tensor, q: Tensor, k: Tensor, v: Tensor, ln_weight: Optional[Tensor], coords_q: Tensor,
                       coords_k: Tensor, attn: Tensor, mean: Tensor, rstd: Tensor, lse: Tensor, d_out: Tensor,
                       patch_size_q: int, patch_size_k: int, radius: int, heads: int, scale: float) -> list[Tensor]:
    """The dense backward op's five gradients for the local forward."""
    from . import local_triton

    launch = _local_launch(xq, k, coords_q, coords_k, patch_size_q, patch_size_k, radius, heads)
    return list(local_triton.backward(xq, q, k, v, _vector(ln_weight, xq.shape[1], 1.0, xq), attn, mean, rstd, lse,
                                      d_out.contiguous(), launch, scale))


@_local_backward_op.register_fake
def _(xq, q, k, v, ln_weight, coords_q, coords_k, attn, mean, rstd, lse, d_out, patch_size_q, patch_size_k, radius,
      heads, scale):
    return _backward_op(xq, q, k, v, ln_weight, None, attn, mean, rstd, lse, d_out, [0, xq.shape[0]],
                        [0, k.shape[0]], heads, scale)


def _local_setup_context(ctx, inputs, output):
    xq, q, k, v, ln_weight, ln_bias, coords_q, coords_k, patch_size_q, patch_size_k, radius, heads, scale, _ = inputs
    _, attn, mean, rstd, lse = output
    ctx.save_for_backward(xq, q, k, v, ln_weight, coords_q, coords_k, attn, mean, rstd, lse)
    ctx.options = (patch_size_q, patch_size_k, radius, heads, scale)
    ctx.parameter_dtypes = [None if t is None else t.dtype for t in (ln_weight, ln_bias)]
    ctx.mark_non_differentiable(attn, mean, rstd, lse)


def _local_backward(ctx, d_out, *_):
    *grads, d_ln = _local_backward_op(*ctx.saved_tensors, d_out, *ctx.options)
    parameter_grads = [None if dtype is None else g.to(dtype) for g, dtype in zip(d_ln, ctx.parameter_dtypes)]
    return (*grads, *parameter_grads) + (None,) * 8


_local_forward_op.register_autograd(_local_backward, setup_context=_local_setup_context)
_library.forbid_double_backward(_local_backward_op, OP_NAME)
# The neighbouring pairs depend on the coordinates' values, which a FLOP formula (shapes only) cannot see; the
# local reference runs no matmul either, so both backends count 0 for the local attention.
_library.no_matmul_flops("cross_attention_local_forward", "cross_attention_local_backward")


def _local_reasons(backend: str, xq: Tensor, heads: int) -> list[str]:
    if backend == "cuda":
        return _backends.kernel_reasons(backend, xq) + [
            "no cuda kernel for the coordinate-local mode (the triton one runs on CUDA tensors)"]
    return _reasons(backend, xq, heads)


def _check_local(local, xq: Tensor, k: Tensor, key_padding_mask, cu_seqlens_q, cu_seqlens_k) -> None:
    """ValueError unless ``local`` is a LocalNeighbourhood of one bag's queries and keys."""
    from .local import LocalNeighbourhood

    if not isinstance(local, LocalNeighbourhood):
        raise ValueError(f"local must be a milkernels.ops.cross_attention.local.LocalNeighbourhood, got {type(local)}")
    if xq.dim() != 2 or key_padding_mask is not None or cu_seqlens_q is not None or cu_seqlens_k is not None:
        raise ValueError("the coordinate-local mode takes one bag, xq, q: (Nq, E) and k, v: (Nk, E), without "
                         "key_padding_mask or cu_seqlens")
    if local.coords_q.shape[0] != xq.shape[0] or local.coords_k.shape[0] != k.shape[0]:
        raise ValueError(f"local's coords must have one row per query and per key: coords_q "
                         f"{tuple(local.coords_q.shape)} for Nq={xq.shape[0]}, coords_k {tuple(local.coords_k.shape)} "
                         f"for Nk={k.shape[0]}")
    if local.coords_q.device != xq.device:
        raise ValueError(f"local's coords must be on the inputs' device {xq.device}, got {local.coords_q.device}")


def _cross_attention_local(xq, q, k, v, ln_weight, ln_bias, local, heads, softmax_scale, eps):
    """The local mode of :func:`cross_attention` on checked inputs: the reference or the block-sparse kernels."""
    backend = _backends.choose(OP_NAME, xq.device, lambda name: _local_reasons(name, xq, heads))
    if backend == "reference":
        from .local import local_reference

        return local_reference(xq, q, k, v, ln_weight, ln_bias, local, heads=heads, softmax_scale=softmax_scale,
                               eps=eps)
    scale = float(softmax_scale) if softmax_scale is not None else (xq.shape[1] // heads) ** -0.5
    return _local_forward_op(*(t.contiguous() for t in (xq, q, k, v)), ln_weight, ln_bias, local.coords_q,
                             local.coords_k, local.patch_size_q, local.patch_size_k, local.radius, int(heads), scale,
                             float(eps))[0]


def cross_attention(xq, q, k, v, ln_weight=None, ln_bias=None, *, heads: int = 1, softmax_scale=None,
                    eps: float = 1e-5, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, local=None):
    """``out = LayerNorm(xq + softmax(q k^T * scale) v)`` over the last dim E, in ``heads`` heads (CMA-MIL's
    cross-magnification block: ``heads=1``, ``softmax_scale = E ** -0.5``).

    Head ``h`` takes columns ``h * dh .. (h + 1) * dh`` of q, k and v (``dh = E // heads``); the softmax runs in
    at least float32, and the LayerNorm has ``ln_weight`` and ``ln_bias`` (``(E,)`` in the inputs' dtype or float32,
    or None) and ``eps``.

    Args:
        xq, q: the queries' residual and queries, k, v: keys and values, one float dtype. One bag: ``(Nq, E)``
            and ``(Nk, E)``; padded bags: ``(B, Nq, E)`` and ``(B, Nk, E)`` with an optional
            ``key_padding_mask: (B, Nk)`` bool (True = padding, as ``torch.nn.MultiheadAttention``); packed
            bags: ``(Tq, E)`` and ``(Tk, E)`` with ``cu_seqlens_q`` and ``cu_seqlens_k: (B + 1,)`` int32 or int64
            (bag ``b``'s queries attend to bag ``b``'s keys; a bag may be empty). Nq and Nk are free.
        heads: the number of heads, dividing E.
        softmax_scale: the score scale, ``dh ** -0.5`` by default.
        local: a :class:`.local.LocalNeighbourhood` (the queries' and keys' level-0 coordinates and patch sizes,
            and a radius) for one bag: each query attends only to the keys whose patch overlaps its own or lies
            within the radius (:mod:`.local`), in O(N x neighbourhood) time and memory: block-sparse flash
            kernels over the plan of :mod:`.local` (triton), or the PyTorch reference.

    Returns:
        ``out`` in xq's shape and dtype. A query whose bag has no valid key (an empty key bag, or every key
        padded) gets attention 0: ``out = LayerNorm(xq)``, and no NaN (in gradients either).
    """
    _check_inputs(xq, q, k, v, ln_weight, ln_bias, heads, softmax_scale, eps, key_padding_mask, cu_seqlens_q,
                  cu_seqlens_k)
    if local is not None:
        _check_local(local, xq, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
        return _cross_attention_local(*autocast_inputs(xq, q, k, v), ln_weight, ln_bias, local, heads, softmax_scale,
                                      eps)
    bounds_q, bounds_k, key_valid = packed_bags(xq, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    xq, q, k, v = autocast_inputs(xq, q, k, v)
    width = xq.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else (width // heads) ** -0.5
    rows = [t.reshape(-1, width) for t in (xq, q, k, v)]
    backend = _backends.choose(OP_NAME, xq.device, lambda name: _reasons(name, xq, heads))
    if backend == "reference":
        out = reference.cross_attention(*rows, ln_weight, ln_bias, bounds_q, bounds_k, key_valid, heads, scale, eps)
    else:
        out = _forward_op(*(t.contiguous() for t in rows), ln_weight, ln_bias, key_valid, list(bounds_q),
                          list(bounds_k), int(heads), scale, float(eps))[0]
    return out.reshape(xq.shape)
