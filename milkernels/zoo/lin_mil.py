"""Lin-MIL (the ``lin-mil`` package's ``Lin_MIL``) with its default ``Config``: latent 512, 4 linear
attention blocks of 8 heads, ReLU kernel, class-token pooling. :func:`milkernels.swap` fuses the whole
model in place (its blocks' ``LinearAttention`` and the model's forward).

Shapes: N instances, F input features, C = 512.
"""

import torch
from torch import nn

from ..bench import timm_stub

HEADS = 8


def _lin_mil():
    """The ``lin_mil`` package, imported with the timm stand-in; ImportError saying what is missing."""
    try:
        with timm_stub.installed():
            import lin_mil
    except ImportError as exc:
        raise ImportError(f"the lin_mil zoo model needs the lin-mil package (pip install lin-mil): {exc}") from exc
    return lin_mil


class LinMIL(nn.Module):
    """``Lin_MIL`` on one bag: the package's model as child ``model``.

    Args: in_dim: F; n_classes: logits; layers: transformer blocks (the Config's 4 by default).
    ``profile_layers`` is the whole ``model``: after :func:`milkernels.swap` its forward calls neither its
    blocks nor their attention as modules, so no finer name would see its calls.
    """

    profile_layers = ("model",)

    def __init__(self, in_dim: int, n_classes: int = 2, layers: int | None = None):
        super().__init__()
        lin_mil = _lin_mil()
        config = lin_mil.Config()
        if layers is not None:
            config.transformer_depth = layers
        self.model = lin_mil.Lin_MIL(num_classes=n_classes, input_dim=in_dim, config=config, heads=HEADS)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)``, ``coords: (N, 2)`` or None (read only with a ``pos_enc``) -> ``logits: (1,
        n_classes)``."""
        logits, _ = self.model(features[None], None if coords is None else coords[None])
        return logits
