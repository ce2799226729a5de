"""Benchmark entry for gated attention pooling, :func:`milkernels.ops.gated_attention_pool`.

One bag ``x: (N, L)``, weights ``wa, wb: (D, L)``, ``ba, bb: (D,)``, ``wc: (K, D)``, ``bc: (K,)``;
outputs ``pooled: (K, L)`` and ``scores: (N, K)``.

FLOPs count the matmuls only (the elementwise tanh, sigmoid, gate and softmax are about 10·N·D,
under 0.3% of the total at L = 1024):

- forward: ``2·N·L·D·2`` (the two projections) ``+ 2·N·D·K`` (the scores) ``+ 2·N·K·L`` (pooling);
- backward: ``2 ×`` forward: every product ``C = A·B`` needs two products of its size, ``dA``
  and ``dB`` (``dx`` and ``dWa, dWb``; ``d(gated)`` and ``dWc``; ``dA`` and ``dx`` of pooling).

A fused kernel that recomputes the projections in the backward instead of storing ``(N, D)``
activations does ``4·N·L·D + 2·N·D·K`` more; that is its choice of work, not counted, so every
implementation is rated on the same count (as FlashAttention's benchmarks count attention).
"""

from __future__ import annotations

import torch

from ..ops import gated_attention_pool
from ..ops._bags import pack_bags
from ..ops.gated_attention import reference
from .registry import Op, register


def reference_pool(x, wa, ba, wb, bb, wc, bc):
    """The op's reference path for one bag ``x: (N, L)``: ``(pooled: (K, L), scores: (N, K))``, no dispatch."""
    pooled, scores = reference.gated_attention_pool(x, wa, ba, wb, bb, wc, bc, pack_bags(x, wa.shape[1]))
    return pooled[0], scores


def build(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(x, wa, ba, wb, bb, wc, bc)`` for one bag of ``n`` instances, all with ``requires_grad``."""
    features, hidden, heads = dims["L"], dims["D"], dims["K"]
    generator = torch.Generator(device=device).manual_seed(n)
    shapes_scales = (((n, features), 1.0), ((hidden, features), features ** -0.5), ((hidden,), 0.1),
                     ((hidden, features), features ** -0.5), ((hidden,), 0.1),
                     ((heads, hidden), hidden ** -0.5), ((heads,), 0.1))
    return tuple((torch.randn(shape, generator=generator, device=device) * scale).to(dtype).requires_grad_()
                 for shape, scale in shapes_scales)


def flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs of the forward, or of forward + backward (3 × forward); see the module doc."""
    features, hidden, heads = dims["L"], dims["D"], dims["K"]
    forward = 2 * n * features * hidden * 2 + 2 * n * hidden * heads + 2 * n * heads * features
    return 3 * forward if backward else forward


def min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes moved: the forward reads x and the weights once and writes pooled and scores.

    Forward + backward adds the backward's reads of x, the weights and the output gradients, and
    its writes of ``dx`` and the weight gradients: x is read twice in all.
    """
    features, hidden, heads = dims["L"], dims["D"], dims["K"]
    x = n * features
    weights = 2 * hidden * features + 2 * hidden + heads * hidden + heads
    outputs = heads * features + n * heads
    forward = x + weights + outputs
    backward_only = x + weights + outputs + x + weights
    return itemsize * (forward + backward_only if backward else forward)


GATED_ATTENTION = register(Op(
    name="gated_attention",
    call=gated_attention_pool,
    reference=reference_pool,
    build=build,
    flops=flops,
    min_bytes=min_bytes,
    gpu_dims={"L": 1024, "D": 256, "K": 1},
    cpu_dims={"L": 256, "D": 64, "K": 1},
))
