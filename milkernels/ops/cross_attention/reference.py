"""Cross-attention with a residual LayerNorm (CMA-MIL's cross-magnification block) in plain PyTorch: the oracle
for the kernels and the CPU path.

Packed bags: queries ``xq, q: (Tq, E)`` in bags ``bounds_q``, keys ``k, v: (Tk, E)`` in bags ``bounds_k`` (B + 1
ints each); bag ``b``'s queries attend to bag ``b``'s keys. With ``H`` heads of ``dh = E // H`` columns::

    out = LayerNorm(xq + A V),   A V[:, h] = softmax(q_h k_h^T * scale) v_h   (h = columns h*dh .. (h+1)*dh)

over the valid keys (``key_valid`` False: padding, left out), in at least float32. A query whose bag has no
valid key (an empty key bag, or every key padded) gets ``A V = 0``, so ``out = LayerNorm(xq)``; no NaN arises,
in gradients either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bag_attention(q, k, v, heads: int, scale: float, key_valid=None):
    """``A V: (Nq, E)`` of one bag, ``q: (Nq, E)``, ``k, v: (Nk, E)``, ``key_valid: (Nk,)`` bool or None.

    Zero where the bag has no valid key (Nk = 0 or all padded).
    """
    q_heads, k_heads, v_heads = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    scores = torch.einsum("qhd,khd->hqk", q_heads, k_heads) * scale                   # (H, Nq, Nk)
    if key_valid is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        has_key = key_valid.any()
        # rows without a valid key get finite scores (a uniform softmax), then weights 0
        scores = scores.masked_fill(~key_valid, -math.inf).masked_fill(~has_key, 0.0)
        weights = torch.softmax(scores, dim=-1) * has_key
    return torch.einsum("hqk,khd->qhd", weights, v_heads).flatten(1)


def cross_attention(xq, q, k, v, ln_weight, ln_bias, bounds_q, bounds_k, key_valid, heads: int, scale: float,
                    eps: float):
    """``out: (Tq, E)`` in xq's dtype for packed bags (see the module doc).

    ``xq, q: (Tq, E)``, ``k, v: (Tk, E)``, ``ln_weight, ln_bias: (E,)`` or None, ``bounds_q``, ``bounds_k``: B + 1
    ints, ``key_valid: (Tk,)`` bool or None.
    """
    compute_dtype = torch.promote_types(xq.dtype, torch.float32)
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    bags = zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:])
    attention = torch.cat([bag_attention(q[q0:q1], k[k0:k1], v[k0:k1], heads, scale,
                                         None if key_valid is None else key_valid[k0:k1])
                           for q0, q1, k0, k1 in bags])
    weight, bias = (None if t is None else t.to(compute_dtype) for t in (ln_weight, ln_bias))
    out = F.layer_norm(xq.to(compute_dtype) + attention, xq.shape[-1:], weight, bias, eps)
    return out.to(xq.dtype)
