"""Gated attention pooling (CLAM, ABMIL, CMA-MIL): public functions, autograd Function, dispatch.

:func:`gated_attention_pool` returns the pooled bag and the raw scores from one fused pass over the
bag; :func:`gated_attention_scores` returns only the raw scores (CLAM's ``Attn_Net_Gated``).
The math is in :mod:`.reference`.
"""

from __future__ import annotations

import torch

from ... import _backends
from .._bags import Bags, autocast_inputs, check_float, check_like, pack_bags
from . import reference

OP_NAME = "gated_attention"


def _check_weights(x, wa, ba, wb, bb, wc, bc):
    """Raise ValueError unless the weights have consistent shapes, x's dtype and device; return (L, D, K)."""
    for name, tensor in dict(wa=wa, wc=wc).items():
        check_float(name, tensor)
    present = check_like(x, "the weights", wa=wa, ba=ba, wb=wb, bb=bb, wc=wc, bc=bc)
    if wa.dim() != 2 or wc.dim() != 2:
        raise ValueError(f"wa must be (D, L) and wc (K, D), got {tuple(wa.shape)} and {tuple(wc.shape)}")
    hidden, features = wa.shape
    heads = wc.shape[0]
    expected = dict(wb=(hidden, features), ba=(hidden,), bb=(hidden,), wc=(heads, hidden), bc=(heads,))
    for name, shape in expected.items():
        if name in present and tuple(present[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match wa {tuple(wa.shape)}, got {tuple(present[name].shape)}")
    if bb is not None and wb is None:
        raise ValueError("bb given without wb")
    if hidden == 0 or heads == 0:
        raise ValueError(f"D and K must be positive, got D={hidden}, K={heads}")
    return features, hidden, heads


def _kernel_reasons(backend, bags: Bags, weights, dropout_p, pool, needs_grad):
    reasons = _backends.kernel_reasons(backend, bags.x2d)
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
    def forward(ctx, x2d, wa, ba, wb, bb, wc, bc, row_valid, plan, pool):
        from . import triton as kernels

        pooled, scores, lse = kernels.forward(x2d, wa, ba, wb, bb, wc, bc, row_valid, plan, pool)
        ctx.save_for_backward(x2d, wa, ba, wb, bb, wc, bc, row_valid, scores, lse, pooled)
        ctx.config = (plan, pool)
        return pooled, scores.to(x2d.dtype)

    @staticmethod
    def backward(ctx, d_pooled, d_scores):
        from . import triton as kernels

        plan, pool = ctx.config
        wanted = ctx.needs_input_grad[:7]
        grads = kernels.backward(*ctx.saved_tensors, plan, pool, d_pooled, d_scores, wanted)
        return (*grads, None, None, None)


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
    from . import triton as kernels

    plan = kernels.Plan.make(bags, wa.shape[0], active_p, _dropout_seed(active_p, True))
    contiguous = [t.contiguous() if t is not None else None for t in (bags.x2d, *weights)]
    return _GatedAttentionFn.apply(*contiguous, bags.row_valid, plan, pool)


def gated_attention_pool(x, wa, ba, wb, bb, wc, bc=None, *, mask=None, cu_seqlens=None,
                         dropout_p: float = 0.0, training: bool = True):
    """Gated attention pooling of a bag (or bags) in one fused pass.

    Args:
        x: one bag ``(N, L)``; padded bags ``(B, N, L)`` with ``mask: (B, N)`` (nonzero = real
            instance); or packed bags ``(T, L)`` with ``cu_seqlens: (B + 1,)``.
        wa, wb: ``(D, L)``; ``ba, bb: (D,)`` or None; ``wb = None`` is the ungated form.
        wc: ``(K, D)``; ``bc: (K,)`` or None. K is the number of attention heads.
        dropout_p: dropout on both branches, active when ``training``.

    x and the weights share one dtype (float32, float16, bfloat16; float64 on the reference); under
    ``torch.autocast`` they are cast to the autocast dtype first.

    Returns:
        ``pooled``: ``(K, L)`` for one bag, else ``(B, K, L)``.
        ``scores``: the raw scores, ``(N, K)``, ``(B, N, K)`` or ``(T, K)``.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    x, wa, ba, wb, bb, wc, bc = autocast_inputs(x, wa, ba, wb, bb, wc, bc)
    features, _, _ = _check_weights(x, wa, ba, wb, bb, wc, bc)
    bags = pack_bags(x, features, mask, cu_seqlens)
    pooled, scores = _run(x, wa, ba, wb, bb, wc, bc, bags, dropout_p, training, pool=True)
    return bags.bags_to_caller(pooled), bags.rows_to_caller(scores)


def gated_attention_scores(x, wa, ba, wb, bb, wc, bc=None, *, dropout_p: float = 0.0, training: bool = True):
    """Raw gated attention scores ``(..., K)`` of instances ``x: (..., L)`` (no softmax, no pooling)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    x, wa, ba, wb, bb, wc, bc = autocast_inputs(x, wa, ba, wb, bb, wc, bc)
    features, _, _ = _check_weights(x, wa, ba, wb, bb, wc, bc)
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"x must end in the feature size L={features}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty bag: x has shape {tuple(x.shape)}")
    rows = x.reshape(-1, features)
    bags = pack_bags(rows, features)
    _, scores = _run(rows, wa, ba, wb, bb, wc, bc, bags, dropout_p, training, pool=False)
    return scores.reshape(*x.shape[:-1], scores.shape[-1])
