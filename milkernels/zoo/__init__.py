"""A model zoo for the profiler: MIL models built from each paper's architecture, randomly initialized.

Every model takes one bag: ``model(features: (N, in_dim), coords: (N, 2) int64 | None = None) -> logits:
(1, n_classes)``, and names in ``model.profile_layers`` the submodules (``model.get_submodule(name)``) that
together hold nearly all of its compute: disjoint, each called once or more per forward, and still there
under the same names after :func:`milkernels.swap`. Each model has its paper's dimensions (and accepts
any ``in_dim``; :func:`default_in_dim` is its paper's); only ``lin_mil`` and ``gigapath_slide_encoder`` have a
``layers`` argument (:func:`has_layers`).

    model = milkernels.zoo.build("clam_sb", 1024)
    logits = model(torch.randn(5000, 1024))
"""

import inspect
from typing import Callable

from torch import nn

from .asmil import ASMIL
from .clam import abmil, clam_mb, clam_sb
from .cma_mil import EMBED_DIM as CMA_MIL_IN_DIM, CMAMILOneBag, CMAMILOneBagLocal
from .gigapath import IN_DIM as GIGAPATH_IN_DIM, GigaPath
from .lin_mil import LinMIL
from .litemil import LiteMIL
from .transmil import TransMIL

MODELS: dict[str, Callable[..., nn.Module]] = {
    "clam_sb": clam_sb,
    "clam_mb": clam_mb,
    "abmil": abmil,
    "lin_mil": LinMIL,
    "litemil": LiteMIL,
    "asmil": ASMIL,
    "transmil": TransMIL,
    "gigapath_slide_encoder": GigaPath,
    "cma_mil": CMAMILOneBag,
    "cma_mil_local": CMAMILOneBagLocal,
}
IN_DIMS = {"gigapath_slide_encoder": GIGAPATH_IN_DIM,  # Prov-GigaPath's tile encoder
           "cma_mil": CMA_MIL_IN_DIM,                  # CMA-MIL's README: --embed_dim 512
           "cma_mil_local": CMA_MIL_IN_DIM}
DEFAULT_IN_DIM = 1024                                   # the others: UNI or truncated ResNet50 features


def _factory(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; the zoo has {', '.join(MODELS)}")
    return MODELS[name]


def default_in_dim(name: str) -> int:
    """The input features model ``name`` takes in its paper (ValueError for an unknown name)."""
    _factory(name)
    return IN_DIMS.get(name, DEFAULT_IN_DIM)


def has_layers(name: str) -> bool:
    """Whether model ``name`` has a ``layers`` argument (ValueError for an unknown name)."""
    return "layers" in inspect.signature(_factory(name)).parameters


def build(name: str, in_dim: int, *, n_classes: int = 2, layers: int | None = None) -> nn.Module:
    """Zoo model ``name`` for ``in_dim`` input features and ``n_classes`` logits, randomly initialized;
    ``layers`` (models with layers only): how many transformer layers, fewer than the paper's for a quick run.
    ValueError for an unknown name or ``layers`` given to a model without layers."""
    factory = _factory(name)
    if layers is None:
        return factory(in_dim, n_classes)
    if not has_layers(name):
        layered = [model for model in MODELS if has_layers(model)]
        raise ValueError(f"zoo model {name!r} has no layers argument (models with layers: {', '.join(layered)})")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be an int >= 1, got {layers!r}")
    return factory(in_dim, n_classes, layers=layers)


__all__ = ["MODELS", "build", "default_in_dim", "has_layers"]
