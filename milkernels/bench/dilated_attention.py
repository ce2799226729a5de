"""Benchmark entry for LongNet dilated attention, :func:`milkernels.ops.dilated_attention` (torchscale mode).

One bag ``q, k, v: (1, N, H, dh)`` over the branches ``zip(segments, rates)``; output ``(1, N, H, dh)``.
The semantics are torchscale's ``DilatedAttention`` (:mod:`milkernels.ops.dilated_attention.reference`),
which Prov-GigaPath's slide encoder runs.

The branches follow Prov-GigaPath's rule (``LongNetViT.get_optimal_segment_length``): ``M`` segment
lengths ``int(2 ** linspace(log2 W_min, log2 W_max, M))`` with the dilation rates ``1, 2, 4, ...,
2 ** (M - 1)``. The sizes (``dims``) are ``H``, ``dh``, ``W_min``, ``W_max`` and ``M``: on a GPU
Prov-GigaPath's own, ``H = 16``, ``dh = 48`` (``C = 768``) and the branches ``[1024, 5792, 32768,
185363, 1048576] x [1, 2, 4, 8, 16]``; on a CPU ``H = 4``, ``dh = 16`` and ``[64, 128, 256] x [1, 2,
4]``. A case carries its branches in the shapes of empty tensors, one ``(0, w_i, r_i)`` per branch (as
``asmil_step``'s query carries H), so the inputs are ``(q, k, v, branch_1, ..., branch_M)``; build
marks them static for ``torch.compile``, which then specializes on the branches and keeps N dynamic.

Implementations: ``call`` is milkernels' op. ``reference`` is torchscale's composition in plain
PyTorch: per branch, gather the kept rows of every segment and head group (:func:`gather_rows`),
attend with PyTorch's fused SDPA kernels, which also return the log-sum-exp (:func:`attend_with_lse`),
scatter the outputs and log-sum-exps back (:func:`scatter_rows`), and merge the branches with the
softmax of their log-sum-exps, taken without gradient (:func:`torchscale_attention`). The peer
``sdpa_dense`` is dense softmax attention over the whole bag (``F.scaled_dot_product_attention``), what
full attention would cost; it is skipped where it cannot run (no memory-efficient kernel and no room for
the ``H x N x N`` scores) and past :data:`DENSE_MAX_TFLOP` per forward, where one case of the sweep (35
calls on a GPU) would take minutes (at GigaPath's H and dh, N = 1M is 3378 TFLOP per forward). Its rows
are rated on the dilated count below like every other implementation's, so its TFLOP/s column is the
dilated work per second it would deliver, not its own (``4 * N ** 2 * H * dh`` forward).

FLOPs count the attention products of the attended (query, key) pairs, ``4 * dh`` per pair (``q . k``
and ``p v``), as FlashAttention's benchmarks count attention. In a branch ``(w, r)`` with ``span =
min(w, N)`` and ``Lsp = ceil(span / r)`` kept rows per segment, the head group ``g`` (heads ``[g * G,
(g + 1) * G)``, ``G = ceil(H / r)``) answers the positions ``t < N`` with ``t = g (mod r)`` in
torchscale's layout, ``ceil((N - g) / r)`` queries, and each attends to the ``Lsp`` kept keys of its
segment (padding keys included: torchscale does not mask them, they add ``exp(0)`` to the softmax). So
per branch ``pairs = Lsp * sum_g |heads of g| * ceil((N - g) / r)``, about ``H * N * span / r ** 2``
(:func:`attended_pairs`). The softmax, the scatter and the merge are elementwise and left out.
Forward + backward is 3 x forward: the backward's four products (``dV``, ``dP``, ``dQ``, ``dK``) are
twice the forward's two. A flash-style kernel also recomputes the scores in its backward (FlashAttention
counts 3.5 x); that is its choice of work, not counted, as for the other ops, so
``torch.utils.flop_counter`` on the op's reference backend agrees where no segment is padded (with
padding that backend also computes the rows torchscale drops).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ops import dilated_attention
from ..ops.dilated_attention.reference import UPSTREAM_UNCOVERED_LSE, head_group_size
from .registry import Op, Skip, first_line, register

DENSE_MAX_TFLOP = 64.0  # sdpa_dense's cap: about 0.1 s forward at an H100's or H200's bf16 peak (N = 100k: 31)
FUSED_SDPA = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)


def branches(dims: dict) -> tuple[list[int], list[int]]:
    """``(segments, rates)`` of ``dims`` by Prov-GigaPath's rule: ``M`` segment lengths geometric from
    ``W_min`` to ``W_max`` (truncated to ints, as GigaPath's ``astype(int)``), rates ``1, 2, ..., 2 ** (M - 1)``."""
    exponents = np.linspace(np.log2(dims["W_min"]), np.log2(dims["W_max"]), dims["M"])
    return [int(w) for w in np.power(2.0, exponents).astype(int)], [2 ** i for i in range(dims["M"])]


def branch_markers(segments, rates, device) -> tuple[torch.Tensor, ...]:
    """The empty tensors ``(0, w_i, r_i)``, one per branch, that carry the branches, static under ``torch.compile``."""
    markers = tuple(torch.empty((0, segment, rate), device=device) for segment, rate in zip(segments, rates))
    for marker in markers:
        torch._dynamo.mark_static(marker)
    return markers


def branches_of(markers) -> tuple[list, list]:
    """``(segments, rates)`` from the branch markers ``(0, w_i, r_i)``."""
    return [marker.shape[1] for marker in markers], [marker.shape[2] for marker in markers]


def attend_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q, k, v: (B, H, L, dh)`` with PyTorch's fused SDPA kernels, which also give the
    log-sum-exp (``F.scaled_dot_product_attention`` does not return it, so the kernels it dispatches to
    are called): ``(out: (B, H, L, dh), lse: (B, H, L) float32)``; the gradient flows through ``out``.

    CUDA: FlashAttention for fp16 and bf16 with ``dh`` a multiple of 8, else the memory-efficient kernel
    (whose log-sum-exp is padded to a multiple of 32 rows); CPU: the CPU flash kernel.
    """
    length, head_dim = q.shape[-2:]
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        return out, lse[..., :length]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


def gather_rows(x, span: int, segments: int, rows: int, rate: int) -> torch.Tensor:
    """torchscale's ``dense_to_sparse`` of one branch: ``x: (B, N, H, dh)`` -> ``(B * S, H, Lsp, dh)``.

    The bag is zero-padded to ``S = segments`` segments of ``span`` positions, each zero-padded to ``Lsp *
    r`` rows (``Lsp = rows``); head ``h`` of group ``g = h // G`` keeps the in-segment rows ``j * r + g``.
    """
    batch, length, heads, head_dim = x.shape
    groups = head_group_size(heads, rate)
    x = F.pad(x, (0, 0, 0, 0, 0, segments * span - length)).reshape(batch, segments, span, heads, head_dim)
    x = F.pad(x, (0, 0, 0, groups * rate - heads, 0, rows * rate - span))
    x = x.reshape(batch, segments, rows, rate, rate, groups, head_dim)  # row (j, g'), head (g, h')
    x = torch.diagonal(x, dim1=3, dim2=4)                                # g' = g: (B, S, Lsp, G, dh, r)
    x = x.permute(0, 1, 5, 3, 2, 4).reshape(batch * segments, rate * groups, rows, head_dim)
    return x[:, :heads]


def scatter_rows(x, batch: int, length: int, segments: int, rate: int, fill: float) -> torch.Tensor:
    """torchscale's ``sparse_to_dense`` of one branch: ``x: (B * S, H, Lsp, ...)`` -> ``(B, N, H, ...)``.

    Row ``j`` of head group ``g`` in segment ``s`` goes to position ``s * Lsp * r + j * r + g`` (upstream's
    layout; positions from ``N`` on are dropped); a (position, head) the branch does not reach gets ``fill``.
    """
    heads, rows, tail = x.shape[1], x.shape[2], x.shape[3:]
    groups = head_group_size(heads, rate)
    x = F.pad(x, (0, 0) * len(tail) + (0, 0, 0, groups * rate - heads), value=fill)
    x = x.reshape(batch, segments, rate, groups, rows, *tail).movedim(4, 2)  # (B, S, Lsp, r, G, ...)
    diagonal = torch.eye(rate, dtype=torch.bool, device=x.device).reshape(rate, rate, 1, *(1,) * len(tail))
    x = torch.where(diagonal, x[:, :, :, None], fill)                        # (B, S, Lsp, r', r, G, ...)
    return x.reshape(batch, segments * rows * rate, rate * groups, *tail)[:, :length, :heads]


def torchscale_attention(q, k, v, segments, rates, scale: float | None = None) -> torch.Tensor:
    """torchscale's ``DilatedAttention`` in plain PyTorch on ``q, k, v: (B, N, H, dh)``: ``(B, N, H, dh)``.

    Each branch ``(w, r)`` gathers its rows, attends (:func:`attend_with_lse`) and scatters back; the
    branches merge with the weights ``softmax_i(lse_i)`` computed without gradient (an unreached
    ``lse_i`` counts as upstream's ``-1e8``). ``segments`` and ``rates``: the branches, ints.
    """
    batch, length, _, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    outs, lses = [], []
    for segment, rate in zip(segments, rates):
        span = min(segment, length)
        count, rows = -(-length // span), -(-span // rate)
        out, lse = attend_with_lse(*(gather_rows(t, span, count, rows, rate) for t in (q, k, v)), scale)
        outs.append(scatter_rows(out, batch, length, count, rate, 0.0))
        lses.append(scatter_rows(lse, batch, length, count, rate, UPSTREAM_UNCOVERED_LSE))
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses).clamp_min(UPSTREAM_UNCOVERED_LSE), dim=0)
    return sum(weight[..., None].to(out.dtype) * out for weight, out in zip(weights, outs))


def reference(q, k, v, *markers):
    """The torchscale-style composition (:func:`torchscale_attention`) on a case: ``(1, N, H, dh)``; the
    ``markers: (0, w_i, r_i)`` carry the branches."""
    return torchscale_attention(q, k, v, *branches_of(markers))


def call(q, k, v, *markers):
    """milkernels' :func:`~milkernels.ops.dilated_attention` (torchscale mode) on a case: ``(1, N, H, dh)``."""
    return dilated_attention(q, k, v, *branches_of(markers))


def _free_bytes(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the host's available pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sdpa_dense(q, k, v, *markers):
    """Dense softmax attention over the whole bag, ``F.scaled_dot_product_attention`` on ``q, k, v: (B, N,
    H, dh)`` -> ``(B, N, H, dh)`` (the branches are ignored).

    :class:`Skip` past :data:`DENSE_MAX_TFLOP` per forward. A fused (memory-efficient) SDPA kernel runs it
    when one takes the case; else the math kernel, when its ``B x H x N x N`` scores and probabilities fit
    in the free memory; else :class:`Skip`.
    """
    batch, length, heads, head_dim = q.shape
    tflop = 4 * batch * heads * length * length * head_dim / 1e12
    if tflop > DENSE_MAX_TFLOP:
        raise Skip(f"dense attention at N={length} is {tflop:.0f} TFLOP per forward, over this peer's cap of "
                   f"{DENSE_MAX_TFLOP:g} (DENSE_MAX_TFLOP: one case would take minutes)")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    try:
        with sdpa_kernel(list(FUSED_SDPA)):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    except RuntimeError as exc:
        if not any(text in str(exc) for text in ("No viable backend", "No available kernel")):
            raise
        needed = 2 * batch * heads * length * length * max(q.element_size(), 4)
        free = _free_bytes(q.device)
        if needed > free:
            raise Skip(f"no memory-efficient SDPA kernel takes this case ({first_line(exc)}) and the math kernel's "
                       f"scores need {needed / 2**30:.1f} GiB, over the {free / 2**30:.1f} GiB free") from exc
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def build(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(q, k, v: (1, n, H, dh)`` with ``requires_grad``, then one marker ``(0, w_i, r_i)`` per branch of
    :func:`branches`)."""
    generator = torch.Generator(device=device).manual_seed(n)
    shape = (1, n, dims["H"], dims["dh"])
    qkv = tuple(torch.randn(shape, generator=generator, device=device).to(dtype).requires_grad_() for _ in range(3))
    return (*qkv, *branch_markers(*branches(dims), device))


def attended_pairs(n: int, heads: int, segments, rates) -> int:
    """The (query, key) pairs torchscale's dilated attention attends, over all heads and branches, on a bag
    of ``n`` (module doc): per branch ``ceil(min(w, n) / r) * sum_g |heads of g| * ceil((n - g) / r)``."""
    total = 0
    for segment, rate in zip(segments, rates):
        rows, group_size = -(-min(segment, n) // rate), head_group_size(heads, rate)
        for group in range(min(rate, n)):
            group_heads = max(0, min(group_size, heads - group * group_size))
            total += rows * group_heads * -(-(n - group) // rate)
    return total


def flops(n: int, dims: dict, backward: bool) -> int:
    """Attention FLOPs: ``4 * dh`` per attended pair forward, 3 x that with the backward (module doc)."""
    forward = 4 * dims["dh"] * attended_pairs(n, dims["H"], *branches(dims))
    return 3 * forward if backward else forward


def min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes moved: the forward reads q, k, v once and writes the output (``4 * N * H * dh``).

    The backward reads q, k, v and the output gradient again and writes dq, dk, dv: ``11 * N * H * dh``
    elements in all for forward + backward (a flash-style backward also reads the output and the
    log-sum-exp; that is not the minimum).
    """
    rows = n * dims["H"] * dims["dh"]
    return itemsize * (11 * rows if backward else 4 * rows)


DILATED_ATTENTION = register(Op(
    name="dilated_attention",
    call=call,
    reference=reference,
    build=build,
    flops=flops,
    min_bytes=min_bytes,
    gpu_dims={"H": 16, "dh": 48, "W_min": 1024, "W_max": 1048576, "M": 5},
    cpu_dims={"H": 4, "dh": 16, "W_min": 64, "W_max": 256, "M": 3},
    peers={"sdpa_dense": lambda op: sdpa_dense},
))
