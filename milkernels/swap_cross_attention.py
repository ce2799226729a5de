"""What :func:`milkernels.swap` knows of CMA-MIL's cross-magnification attention: its ``CrossAttention``,
replaced by :class:`milkernels.nn.CrossAttention`.

A module is recognized by its children, exactly ``query``, ``key``, ``value``, ``softmax`` and ``norm``,
whatever its class. It is swapped when ``query``, ``key`` and ``value`` are ``Linear(dim, dim)``,
``softmax`` a ``Softmax`` over the last dim and ``norm`` a ``LayerNorm(dim)``, and its forward agrees with
the replacement's on the probe: ``forward(x1: (3, dim), x2: (5, dim))`` and ``forward(x1: (1, dim), x2:
(2, dim))``, in the parameters' dtype and device. Else it stays, with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

CHILDREN = {"query", "key", "value", "softmax", "norm"}
CONTRACT = "CMA-MIL's CrossAttention: forward(x1, x2) -> norm(x1 + softmax(Q K^T / sqrt(dim)) V)"
PROBE_ROWS = ((3, 5), (1, 2))  # (N_q, N_k) of each probe call


def is_cross_attention(module: nn.Module) -> bool:
    """Whether ``module`` has exactly CMA-MIL's ``CrossAttention`` children."""
    return {name for name, _ in module.named_children()} == CHILDREN


def problem(module: nn.Module) -> str:
    """Why a module with CMA-MIL's ``CrossAttention`` children cannot be replaced, or ``""`` (its own
    parameters, hooks and parametrizations are checked by :mod:`milkernels.swap`)."""
    norm = module.norm
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        return "norm is not a LayerNorm over the last dim"
    dim = norm.normalized_shape[0]
    for name in ("query", "key", "value"):
        layer = getattr(module, name)
        if not isinstance(layer, nn.Linear) or (layer.in_features, layer.out_features) != (dim, dim):
            return f"{name} is not a Linear({dim}, {dim}) (dim from norm = LayerNorm({dim}))"
    if type(module.softmax) is not nn.Softmax or module.softmax.dim not in (-1, 1):
        return "softmax is not Softmax(dim=-1)"
    return ""


def probe_calls(module: nn.Module) -> list:
    """``(args, kwargs)`` of the probe calls: ``x1: (N_q, dim)``, ``x2: (N_k, dim)`` for each of
    :data:`PROBE_ROWS`, random normal from a private generator, in the parameters' dtype and device."""
    weight = module.query.weight
    generator = torch.Generator().manual_seed(0)
    calls = []
    for rows in PROBE_ROWS:
        x1, x2 = (torch.randn(n, weight.shape[1], generator=generator, dtype=torch.float64).to(weight)
                  for n in rows)
        calls.append(((x1, x2), {}))
    return calls
