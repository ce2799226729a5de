"""How the kernel paths become ``torch.library`` custom ops, shared by every op.

Each op's kernel path is a pair of custom ops in the ``milkernels`` namespace: a forward and a
backward, whose arguments are tensors, ints, floats, bools and strings only (launch plans are rebuilt
inside the ops). The forward registers a fake implementation and its autograd (which calls the
backward op); the backward op registers an autograd formula that raises, so a second derivative
through a kernel is a clear error instead of a silently wrong gradient. ``torch.compile`` sees each
op as one opaque node; the backend choice and the input checks around it are plain Python it traces.
Each op also registers a FLOP formula, so ``torch.utils.flop_counter.FlopCounterMode`` counts the kernel
paths as it counts the reference.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import register_flop_formula

NAMESPACE = "milkernels"


def custom_op(name: str):
    """Decorator: a pure (non-mutating) custom op ``milkernels::name``."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


def flop_formula(name: str):
    """Decorator: the formula that ``torch.utils.flop_counter.FlopCounterMode`` counts for ``milkernels::name``.

    The formula takes the op's arguments, each tensor as its shape (None stays None, the rest as given), and
    returns the matmul FLOPs that the op's plain-PyTorch reference performs for the same call: a forward op
    the reference's forward matmuls, a backward op the reference's backward matmuls (a kernel's recompute is
    not counted). So a model counts the same FLOPs whichever backend runs it.
    """

    def register(formula):
        @functools.wraps(formula)
        def without_output_shape(*args, out_shape=None, **kwargs):
            return formula(*args, **kwargs)

        register_flop_formula(getattr(getattr(torch.ops, NAMESPACE), name))(without_output_shape)
        return formula

    return register


def no_matmul_flops(*names: str) -> None:
    """Register a FLOP formula of 0 for each op ``milkernels::name``: ops whose reference runs no matmul."""

    def no_matmul(*args):
        return 0

    for name in names:
        flop_formula(name)(no_matmul)


def forbid_double_backward(backward_op, public_name: str) -> None:
    """Make differentiating ``backward_op``'s outputs raise an error naming ``public_name``.

    That is what a gradient of a gradient (``create_graph=True``, a gradient penalty) reaches on a
    kernel path.
    """

    def second_derivative(ctx, *grads):
        raise RuntimeError(
            f"milkernels.{public_name}: double backward (a gradient of a gradient, e.g. a gradient penalty "
            "with create_graph=True) is not supported by the fused kernels; run this part of the model "
            "under milkernels.use_backend('reference'), whose plain PyTorch path supports it")

    backward_op.register_autograd(second_derivative)


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a custom op returns where an output is not asked for: an empty tensor of ``like``'s
    dtype and device (an op cannot return None)."""
    return like.new_empty(0)


def owned(tensors, like: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` as a custom op may return them: None as :func:`absent`, and views or tensors sharing a
    storage with an earlier one as copies, since an op's outputs may not alias its inputs or each other.

    The storage check matters where ``_base`` is not set, as under ``torch.library.opcheck``'s schema check.
    """
    result, storages = [], set()
    for t in tensors:
        if t is None:
            t = absent(like)
        elif t._base is not None or t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


def dropout_seed(active: bool) -> torch.Tensor | None:
    """A Philox seed ``(1,)`` int64 drawn from torch's default generator (so ``torch.manual_seed`` fixes the
    dropout), as a tensor that the ops read inside; None when no dropout is active."""
    return torch.randint(0, 2**31 - 1, (1,)) if active else None


def seed_value(seed: torch.Tensor | None) -> int:
    """The int inside :func:`dropout_seed`'s tensor (0 without dropout); called inside the ops."""
    return 0 if seed is None else int(seed.item())
