"""Gated attention pooling (CLAM, ABMIL, CMA-MIL): public functions, autograd Function, dispatch.

:func:`gated_attention_pool` returns the pooled bag and the raw scores from one fused pass over the
bag; :func:`gated_attention_scores` returns only the raw scores (CLAM's ``Attn_Net_Gated``).
The math is in :mod:`.reference`.
"""

from __future__ import annotations

import torch

from ... import _backends
from .._bags import Bags, check_float, check_same_device, pack_bags
from . import reference

OP_NAME = "gated_attention"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_weights(x, wa, ba, wb, bb, wc, bc):
    """Raise ValueError unless the weights have consistent shapes and dtypes; return (L, D, K)."""
    for name, tensor in dict(wa=wa, wc=wc).items():
        check_float(name, tensor)
    for name, tensor in dict(ba=ba, wb=wb, bb=bb, bc=bc).items():
        if tensor is not None:
            check_float(name, tensor)
    check_same_device(x=x, wa=wa, ba=ba, wb=wb, bb=bb, wc=wc, bc=bc)
    if wa.dim() != 2 or wc.dim() != 2:
        raise ValueError(f"wa must be (D, L) and wc (K, D), got {tuple(wa.shape)} and {tuple(wc.shape)}")
    hidden, features = wa.shape
    heads = wc.shape[0]
    expected = dict(wb=(hidden, features), ba=(hidden,), bb=(hidden,), wc=(heads, hidden), bc=(heads,))
    given = dict(wb=wb, ba=ba, bb=bb, wc=wc, bc=bc)
    for name, shape in expected.items():
        if given[name] is not None and tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match wa {tuple(wa.shape)}, got {tuple(given[name].shape)}")
    if bb is not None and wb is None:
        raise ValueError("bb given without wb")
    if hidden == 0 or heads == 0:
        raise ValueError(f"D and K must be positive, got D={hidden}, K={heads}")
    return features, hidden, heads


def _kernel_reasons(backend, bags: Bags, weights, dropout_p, pool, needs_grad):
    reasons = _backends.device_reasons(backend, bags.x2d.device)
    dtypes = {bags.x2d.dtype} | {w.dtype for w in weights if w is not None}
    if len(dtypes) > 1:
        reasons.append(f"the {backend} kernels need one dtype for x and the weights, got {sorted(map(str, dtypes))}")
    if bags.x2d.dtype not in KERNEL_DTYPES:
        reasons.append(f"the {backend} kernels take float32, float16 or bfloat16, not {bags.x2d.dtype}")
    if backend == "cuda":
        reasons += _cuda_reasons(bags, weights, dropout_p, pool, needs_grad)
    return reasons


def _cuda_reasons(bags, weights, dropout_p, pool, needs_grad):
    from . import cuda

    reasons = cuda.not_supported_reasons(bags.x2d, *weights)
    if needs_grad:
        reasons.append("the cuda backend has the forward only; use the triton backend for training")
    if dropout_p > 0:
        reasons.append("the cuda backend has no dropout; use the triton backend")
    return reasons


def _dropout_seed(dropout_p: float, training: bool) -> int:
    """A Philox seed drawn from torch's default generator, so ``torch.manual_seed`` fixes dropout."""
    if dropout_p > 0 and training:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return 0


class _GatedAttentionFn(torch.autograd.Function):
    """Fused forward and backward on the triton kernels."""

    @staticmethod
    def forward(ctx, x2d, wa, ba, wb, bb, wc, bc, bags, dropout_p, seed, pool):
        from . import triton as kernels

        pooled, scores, lse = kernels.forward(x2d, wa, ba, wb, bb, wc, bc, bags, dropout_p, seed, pool)
        ctx.save_for_backward(x2d, wa, ba, wb, bb, wc, bc, scores, lse, pooled)
        ctx.config = (bags, dropout_p, seed, pool)
        return pooled, scores.to(x2d.dtype)

    @staticmethod
    def backward(ctx, d_pooled, d_scores):
        from . import triton as kernels

        bags, dropout_p, seed, pool = ctx.config
        grads = kernels.backward(*ctx.saved_tensors, bags, dropout_p, seed, pool, d_pooled, d_scores)
        return (*grads, None, None, None, None)


def _run(x, wa, ba, wb, bb, wc, bc, bags: Bags, dropout_p, training, pool):
    """Dispatch one call; returns ``(pooled (B, K, L) or None, scores (T, K))``."""
    weights = (wa, ba, wb, bb, wc, bc)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
    active_p = dropout_p if training else 0.0
    backend = _backends.choose(
        OP_NAME, bags.x2d.device,
        lambda name: [] if name == "reference" else _kernel_reasons(name, bags, weights, active_p, pool, needs_grad))
    if backend == "reference" and pool:
        return reference.gated_attention_pool(bags.x2d, *weights, bags, dropout_p, training)
    if backend == "reference":
        return None, reference.gated_scores(bags.x2d, *weights, dropout_p, training)
    if backend == "cuda":
        from . import cuda

        return cuda.forward(bags, *weights, pool)
    x2d = bags.x2d.contiguous()
    return _GatedAttentionFn.apply(x2d, *weights, bags, active_p, _dropout_seed(active_p, True), pool)


def gated_attention_pool(x, wa, ba, wb, bb, wc, bc=None, *, mask=None, cu_seqlens=None,
                         dropout_p: float = 0.0, training: bool = True):
    """Gated attention pooling of a bag (or bags) in one fused pass.

    Args:
        x: one bag ``(N, L)``; padded bags ``(B, N, L)`` with ``mask: (B, N)`` (nonzero = real
            instance); or packed bags ``(T, L)`` with ``cu_seqlens: (B + 1,)``.
        wa, wb: ``(D, L)``; ``ba, bb: (D,)`` or None; ``wb = None`` is the ungated form.
        wc: ``(K, D)``; ``bc: (K,)`` or None. K is the number of attention heads.
        dropout_p: dropout on both branches, active when ``training``.

    Returns:
        ``pooled``: ``(K, L)`` for one bag, else ``(B, K, L)``.
        ``scores``: the raw scores, ``(N, K)``, ``(B, N, K)`` or ``(T, K)``.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    features, _, _ = _check_weights(x, wa, ba, wb, bb, wc, bc)
    bags = pack_bags(x, features, mask, cu_seqlens)
    pooled, scores = _run(x, wa, ba, wb, bb, wc, bc, bags, dropout_p, training, pool=True)
    return bags.bags_to_caller(pooled), bags.rows_to_caller(scores)


def gated_attention_scores(x, wa, ba, wb, bb, wc, bc=None, *, dropout_p: float = 0.0, training: bool = True):
    """Raw gated attention scores ``(..., K)`` of instances ``x: (..., L)`` (no softmax, no pooling)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    features, _, _ = _check_weights(x, wa, ba, wb, bb, wc, bc)
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"x must end in the feature size L={features}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty bag: x has shape {tuple(x.shape)}")
    rows = x.reshape(-1, features)
    bags = pack_bags(rows, features)
    _, scores = _run(rows, wa, ba, wb, bb, wc, bc, bags, dropout_p, training, pool=False)
    return scores.reshape(*x.shape[:-1], scores.shape[-1])
