"""A stand-in for the one piece of ``timm`` that Lin-MIL imports (``from timm.models.layers import DropPath``).

timm needs a torchvision built for the installed torch, which a CPU-only machine or a GPU box
often lacks, and lin-mil uses nothing else of it. :func:`installed` puts modules ``timm``,
``timm.models`` and ``timm.models.layers`` holding :class:`DropPath` into ``sys.modules`` for the
duration of a ``with`` block (the real timm, when importable, is used instead), so importing
``lin_mil`` inside the block binds this ``DropPath`` and nothing else sees a fake timm afterwards.
"""

import contextlib
import importlib.util
import sys
import types

import torch
from torch import nn

MODULES = ("timm", "timm.models", "timm.models.layers")


def drop_path(x: torch.Tensor, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    """timm's stochastic depth: each sample (dim 0) of ``x`` is zeroed with probability ``drop_prob`` and
    the others scaled by 1 / (1 - drop_prob); ``x`` itself in eval mode or when ``drop_prob`` is 0."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm's ``DropPath`` (timm.layers.drop): :func:`drop_path` per sample, in training mode only."""

    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def _real_timm_imports() -> bool:
    """True when an installed timm imports (one built against another torchvision fails on import)."""
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        importlib.import_module("timm.models.layers")
    except Exception:  # a broken timm, whatever it raises, is replaced by the stand-in
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
        return False
    return True


@contextlib.contextmanager
def installed():
    """Inside the block, ``import timm.models.layers`` gives :class:`DropPath`, unless a working timm imports."""
    if _real_timm_imports():
        yield
        return
    stubs = {name: types.ModuleType(name) for name in MODULES}
    stubs["timm.models.layers"].DropPath = DropPath
    stubs["timm"].models = stubs["timm.models"]
    stubs["timm.models"].layers = stubs["timm.models.layers"]
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in MODULES:
            sys.modules.pop(name, None)
