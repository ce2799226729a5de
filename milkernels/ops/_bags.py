"""Input checks and the one internal layout every op works on: packed bags.

A call takes one of three layouts, and :func:`pack_bags` turns each into rows ``x2d: (T, L)``, bag
boundaries ``bounds`` (B + 1 Python ints, as ``cu_seqlens``) and an optional ``row_valid: (T,)`` bool:

- one bag ``x: (N, L)``;
- padded bags ``x: (B, N, L)`` with an optional ``mask: (B, N)`` (nonzero or True = a real
  instance, as in torchmil; padded rows are never read for pooling);
- packed bags ``x: (T, L)`` with ``cu_seqlens: (B + 1,)``, bag ``b`` being rows
  ``cu_seqlens[b]:cu_seqlens[b + 1]``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Bags:
    """Packed bags: rows ``x2d: (T, L)``, their boundaries ``bounds`` (``cu_seqlens``, B + 1 ints) and
    ``row_valid: (T,)`` bool or None.

    ``bounds`` is a tuple of Python ints, so kernels plan their launches without a device sync, and
    ``torch.compile`` traces one bag or padded bags with no data-dependent step. ``layout`` is ``"single"``,
    ``"padded"`` or ``"packed"`` and ``shape`` the caller's ``x.shape``, so results can be put back in the
    caller's layout.
    """

    x2d: torch.Tensor
    bounds: tuple
    row_valid: torch.Tensor | None
    layout: str
    shape: tuple

    @property
    def num_bags(self) -> int:
        return len(self.bounds) - 1

    def bag_index(self) -> torch.Tensor:
        """``(T,)`` int64: the bag of each row (on the rows' device; a CUDA device copies the bounds there)."""
        cu_seqlens = torch.tensor(self.bounds, device=self.x2d.device)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        return torch.repeat_interleave(torch.arange(self.num_bags, device=lengths.device), lengths,
                                       output_size=self.x2d.shape[0])

    def rows_to_caller(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row results ``(T, ...)`` in the caller's layout: ``(N, ...)``, ``(B, N, ...)`` or ``(T, ...)``."""
        if self.layout == "padded":
            return rows.reshape(self.shape[0], self.shape[1], *rows.shape[1:])
        return rows

    def bags_to_caller(self, per_bag: torch.Tensor) -> torch.Tensor:
        """Per-bag results ``(B, ...)`` in the caller's layout: ``(...)`` for one bag, else ``(B, ...)``."""
        return per_bag[0] if self.layout == "single" else per_bag


def autocast_inputs(*tensors):
    """Under ``torch.autocast`` the float tensors cast to its dtype, as ``F.linear`` would; else as given.

    The device is the first argument's; anything that is not a tensor passes through unchanged.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def fp32_under_autocast(*tensors):
    """Under ``torch.autocast`` the float16/bfloat16 tensors cast to float32, as autocast runs softmax and
    log_softmax; else as given. The device is the first argument's; non-tensors pass through."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)


def check_temperature(temperature) -> float:
    """``temperature`` as a float; ValueError unless it is a finite real number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_tensor(name: str, tensor) -> None:
    """Raise ValueError unless ``tensor`` is a torch.Tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError unless ``tensor`` is a floating-point tensor of a supported dtype."""
    check_tensor(name, tensor)
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError unless all given tensors (None ignored) are on one device; return it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return devices.pop()


def check_like(x: torch.Tensor, what: str, **tensors: torch.Tensor | None) -> dict:
    """Raise ValueError unless ``x`` and every given tensor (None ignored) are float tensors of x's dtype on
    x's device; ``what`` names the others in the message. Returns the given tensors by name, None left out."""
    check_float("x", x)
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, tensor in present.items():
        check_float(name, tensor)
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} is {tensor.dtype} but x is {x.dtype}: give x and {what} one dtype")
    check_same_device(x=x, **present)
    return present


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total_rows: int) -> tuple:
    """Raise ValueError unless ``cu_seqlens`` bounds non-empty bags of ``total_rows`` rows; its values."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (B + 1,) with B >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    host = cu_seqlens.cpu()
    lengths = host[1:] - host[:-1]
    if host[0] != 0 or host[-1] != total_rows:
        raise ValueError(f"cu_seqlens must start at 0 and end at the row count {total_rows}, got {host.tolist()}")
    if bool((lengths <= 0).any()):
        raise ValueError(f"every bag needs at least one instance; cu_seqlens {host.tolist()} has an empty bag")
    return tuple(host.tolist())


def check_bag_shape(x: torch.Tensor, feature_dim: int) -> None:
    """Raise ValueError unless ``x`` is ``(N, L)`` or ``(B, N, L)`` with L = ``feature_dim`` (N may be 0 here)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, L), (B, N, L) or packed (T, L), got rank {x.dim()} shape {tuple(x.shape)}")
    if x.shape[-1] != feature_dim:
        raise ValueError(f"x has feature size L={x.shape[-1]} but the weights expect L={feature_dim}")


def pack_bags(x: torch.Tensor, feature_dim: int, mask: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None) -> Bags:
    """Check ``x`` (one bag, padded bags or packed bags, see the module doc) and pack it.

    ``feature_dim`` is the L the weights expect. Raises ValueError naming the problem.
    """
    check_float("x", x)
    for name, tensor in dict(mask=mask, cu_seqlens=cu_seqlens).items():
        if tensor is not None:
            check_tensor(name, tensor)
    check_same_device(x=x, mask=mask, cu_seqlens=cu_seqlens)
    check_bag_shape(x, feature_dim)
    if x.shape[-2] == 0 or (x.dim() == 3 and x.shape[0] == 0):
        raise ValueError(f"empty bag: x has shape {tuple(x.shape)}")
    if mask is not None and cu_seqlens is not None:
        raise ValueError("give either mask (padded bags) or cu_seqlens (packed bags), not both")
    if cu_seqlens is not None:
        if x.dim() != 2:
            raise ValueError(f"packed bags need x of shape (T, L), got {tuple(x.shape)}")
        bounds = _check_cu_seqlens(cu_seqlens, x.shape[0])
        return _bags(x, bounds, None, "packed", tuple(x.shape))
    if x.dim() == 2:
        if mask is not None:
            raise ValueError("a mask needs padded bags x: (B, N, L); one bag (N, L) takes no mask")
        return _bags(x, (0, x.shape[0]), None, "single", tuple(x.shape))
    batch, length, _ = x.shape
    row_valid = None
    if mask is not None:
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"mask must have shape (B, N) = {(batch, length)}, got {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            row_valid = (mask != 0).reshape(-1).contiguous()
        else:
            row_valid = mask.reshape(-1).bool().contiguous()
    bounds = tuple(bag * length for bag in range(batch + 1))
    return _bags(x.reshape(batch * length, -1), bounds, row_valid, "padded", tuple(x.shape))


def _bags(x2d, bounds, row_valid, layout, shape) -> Bags:
    return Bags(x2d, tuple(bounds), row_valid, layout, shape)


def bags_in_op(x2d: torch.Tensor, bounds, row_valid: torch.Tensor | None) -> Bags:
    """The packed bags that a custom op's arguments describe (rows ``x2d: (T, L)``, ``bounds`` as a list of
    B + 1 ints, ``row_valid: (T,)`` or None), rebuilt inside the op, where launches are planned."""
    return _bags(x2d, bounds, row_valid, "packed", tuple(x2d.shape))
