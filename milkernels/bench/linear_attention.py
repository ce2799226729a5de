"""Benchmark entries for linear attention: the core op and a Lin-MIL attention layer.

``linear_attention_core``: :func:`milkernels.ops.lin_mil_attention` (Lin-MIL's form: relu
features, a temperature per head, the denominator clamped at 100) on one bag ``qkv: (1, N, 3C)``
with ``temperature: (H,)``; output ``(1, N, C)``. Its roofline target: read q, k and v once and
write the output once.

``lin_mil_layer``: the whole layer ``x: (1, N, C) -> qkv = x W_qkv^T (no bias) -> core ->
out W_out^T + b_out``, inputs ``(x, w_qkv, temperature, w_out, b_out)``. Its peers are Lin-MIL's own
eager ``LinearAttention`` and the same module after :func:`milkernels.swap`; both are skipped
with the reason when ``lin_mil`` does not import (it is not a dependency of milkernels).

FLOPs count the matmuls only, as for every op (dh = C / H):

- core forward: ``2·N·C·dh`` (the state ``S = k^T v`` per head) ``+ 2·N·C·dh`` (the numerator
  ``q S``) ``+ 2·N·C`` (the denominator ``q . z``). The elementwise work (the feature map, ``z = sum
  k``, the temperature, the clamp and the division, about 4·N·C) is left out: under 2% at dh = 64.
- layer forward: the core ``+ 2·N·C·3C`` (the qkv projection) ``+ 2·N·C·C`` (the output projection).
- backward: ``2 ×`` forward (two products of each product's size), so fwd+bwd = 3 × fwd.
"""

from __future__ import annotations

import copy
import importlib

import torch
import torch.nn.functional as F

from ..ops import lin_mil_attention
from ..ops._bags import pack_bags
from ..ops.linear_attention import reference
from . import timm_stub
from .registry import Op, Skip, register

# Lin-MIL's eager layer, built as LinearAttention(dim=C, num_heads=H); lin_mil imports timm's DropPath,
# which :mod:`.timm_stub` provides when timm is not installed
LIN_MIL_MODULE, LIN_MIL_CLASS = "lin_mil.attention.linear_attention", "LinearAttention"
CLAMP_MIN = 100.0


def _randn(generator, shape, scale, dtype, device):
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype).requires_grad_()


def _temperature(generator, dims, dtype, device):
    """``(H,)`` around ``dh ** -0.5``, where Lin-MIL initializes it."""
    scale = (dims["C"] // dims["H"]) ** -0.5
    return (scale * (1 + 0.1 * torch.rand(dims["H"], generator=generator, device=device))).to(dtype).requires_grad_()


def reference_core(qkv, temperature):
    """The core's reference path, no dispatch: ``(1, N, C)`` from ``qkv: (1, N, 3C)`` and ``temperature: (H,)``."""
    bags = pack_bags(qkv, qkv.shape[-1])
    out, _, _ = reference.linear_attention(bags.x2d, bags, temperature.numel(), temperature=temperature,
                                           denominator="clamp", clamp_min=CLAMP_MIN)
    return bags.rows_to_caller(out)


def core(qkv, temperature):
    """The public op in Lin-MIL's form, the number of heads taken from ``temperature``."""
    return lin_mil_attention(qkv, temperature, temperature.numel())


def build_core(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(qkv: (1, n, 3C), temperature: (H,))``, both with ``requires_grad``."""
    generator = torch.Generator(device=device).manual_seed(n)
    return (_randn(generator, (1, n, 3 * dims["C"]), 1.0, dtype, device),
            _temperature(generator, dims, dtype, device))


def core_flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs of the core: ``4·N·C·dh + 2·N·C`` forward, 3 × that with the backward."""
    channels = dims["C"]
    forward = 4 * n * channels * (channels // dims["H"]) + 2 * n * channels
    return 3 * forward if backward else forward


def core_min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes: the forward reads q, k, v (3·N·C) and the temperature and writes the output (N·C).

    The backward reads q, k, v and the output gradient again and writes their gradients: 11·N·C
    elements in all for forward + backward (plus 3·H for the temperature and its gradient).
    """
    qkv, out, heads = 3 * n * dims["C"], n * dims["C"], dims["H"]
    forward = qkv + heads + out
    backward_only = qkv + heads + out + qkv + heads
    return itemsize * (forward + backward_only if backward else forward)


def layer(x, w_qkv, temperature, w_out, b_out, attention=core):
    """The Lin-MIL layer as a function: the qkv projection, ``attention`` and the output projection."""
    return F.linear(attention(F.linear(x, w_qkv), temperature), w_out, b_out)


def reference_layer(x, w_qkv, temperature, w_out, b_out):
    """:func:`layer` on the core's reference path, no dispatch."""
    return layer(x, w_qkv, temperature, w_out, b_out, attention=reference_core)


def build_layer(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(x: (1, n, C), w_qkv: (3C, C), temperature: (H,), w_out: (C, C), b_out: (C,))``, all with ``requires_grad``."""
    channels = dims["C"]
    generator = torch.Generator(device=device).manual_seed(n)
    return (_randn(generator, (1, n, channels), 1.0, dtype, device),
            _randn(generator, (3 * channels, channels), channels ** -0.5, dtype, device),
            _temperature(generator, dims, dtype, device),
            _randn(generator, (channels, channels), channels ** -0.5, dtype, device),
            _randn(generator, (channels,), 0.1, dtype, device))


def layer_flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs of the layer: the core's plus ``8·N·C²`` for the projections (× 3 with the backward)."""
    projections = 8 * n * dims["C"] ** 2
    return core_flops(n, dims, backward) + (3 * projections if backward else projections)


def layer_min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes of a fully fused layer: x and the weights in, the output out (qkv never stored).

    The backward reads x, the weights and the output gradient again and writes dx and the weight
    gradients.
    """
    channels, heads = dims["C"], dims["H"]
    x = out = n * channels
    weights = 4 * channels * channels + channels + heads
    forward = x + weights + out
    backward_only = x + weights + out + x + weights
    return itemsize * (forward + backward_only if backward else forward)


def lin_mil_class():
    """Lin-MIL's eager ``LinearAttention`` class; :class:`Skip` with the reason when it does not import."""
    try:
        with timm_stub.installed():
            module = importlib.import_module(LIN_MIL_MODULE)
    except ImportError as exc:
        raise Skip(f"cannot import {LIN_MIL_MODULE}: {exc}") from exc
    if not hasattr(module, LIN_MIL_CLASS):
        raise Skip(f"{LIN_MIL_MODULE} has no {LIN_MIL_CLASS}")
    return getattr(module, LIN_MIL_CLASS)


def lin_mil_module(channels: int, heads: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``lin_mil.LinearAttention(dim=C, num_heads=H)`` on ``device`` in ``dtype``; :class:`Skip` if it cannot be built."""
    cls = lin_mil_class()
    try:
        module = cls(dim=channels, num_heads=heads)
    except TypeError as exc:
        raise Skip(f"cannot build {LIN_MIL_MODULE}.{LIN_MIL_CLASS}(dim={channels}, num_heads={heads}): {exc}") from exc
    return module.to(device=device, dtype=dtype)


def swapped(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` after :func:`milkernels.swap`; :class:`Skip` when swap fuses nothing in it."""
    from ..swap import swap, swap_report

    fused = swap(copy.deepcopy(module))
    if not swap_report(fused).fused:
        raise Skip(f"milkernels.swap does not fuse {type(module).__name__} (yet)")
    return fused


def first_output(outputs):
    """The first tensor of a module's outputs (Lin-MIL's layer may also return its numerator)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _lin_mil_peer(swap: bool):
    """A peer running Lin-MIL's module (swapped or not) on ``x``; built on the first call, per device and dtype."""

    def maker(op):
        modules = {}

        def run(x, w_qkv, temperature, *rest):
            key = (x.device, x.dtype)
            if key not in modules:
                module = lin_mil_module(x.shape[-1], temperature.numel(), x.dtype, x.device)
                modules[key] = swapped(module) if swap else module
            return first_output(modules[key](x))

        return run

    return maker


LINEAR_ATTENTION_CORE = register(Op(
    name="linear_attention_core",
    call=core,
    reference=reference_core,
    build=build_core,
    flops=core_flops,
    min_bytes=core_min_bytes,
    gpu_dims={"C": 512, "H": 8},
    cpu_dims={"C": 128, "H": 4},
))

LIN_MIL_LAYER = register(Op(
    name="lin_mil_layer",
    call=layer,
    reference=reference_layer,
    build=build_layer,
    flops=layer_flops,
    min_bytes=layer_min_bytes,
    gpu_dims={"C": 512, "H": 8},
    cpu_dims={"C": 128, "H": 4},
    peers={"lin_mil": _lin_mil_peer(swap=False), "lin_mil_swapped": _lin_mil_peer(swap=True)},
))
