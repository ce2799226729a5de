"""CMA-MIL (rashikabagri/CMAMIL, ``Model/cma-mil.py``): multi-scale MIL with cross-magnification attention.

Three bags of the same slide, at 5x, 10x and 20x, go through their own ``adaptor`` (``Linear(embed_dim,
dim)`` + ReLU). Three cross-attention blocks (CMA-MIL's ``CrossAttention``, :class:`CrossAttention`) run a
cycle: the 5x instances attend to the 10x ones, 10x to 20x, 20x to 5x; each block's output is the stream of
its query magnification. One CLAM ``Attn_Net_Gated(dim, dim / 2)``, shared by the streams, scores each
stream's instances; with the softmax ``a_n`` of the scores over the stream and the instance scores ``s_n =
classifier(h_n)`` (shared too), the stream's logits are ``sum_n s_n exp(a_n) / sum_n exp(a_n)``. The three
logits are mixed with the softmax of three learned ``logit_weights``, plus ``bias``.

Given a label ``c``, the instance loss: in each stream, the ``k_sample`` instances with the highest and the
lowest attribute scores ``s_n[c] exp(a_n)`` are targets 1 and 0 of ``instance_classifiers[c]`` (``Linear(dim,
2)``), whose scores are multiplied by ``exp(a_n)`` before ``instance_loss_fn``; with ``subtyping`` the other
classes' classifiers take the top and bottom ``k_sample`` by attention ``a_n``, with the same targets (upstream
ignores its ``positive`` flag). The loss is the mean over the three streams.

Written from the README and the upstream file's math; the published code does not run (syntax errors, its
``CrossAttention`` refuses the ``dropout`` the model passes). Differences: ``instance_classifiers`` are
``Linear(dim, 2)`` (upstream's ``Linear(size[1], 2)`` is that at its defaults, and fails otherwise); the
unused ``classifiers`` and ``attention_only`` path are left out. Added: ``coords`` puts the blocks in
milkernels' local mode (each query attends to the keys whose patches overlap its own).
:func:`milkernels.swap` fuses the three blocks (:class:`milkernels.nn.CrossAttention`) and the gated attention.

:class:`CMAMILOneBag` is the zoo's one-bag model: it derives the 10x and 5x bags from a 20x bag.

Shapes: ``N_5x``, ``N_10x``, ``N_20x`` instances, F = ``embed_dim`` input features, E = ``dim``, C classes.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.cross_attention import CrossAttentionLayers
from ..ops.cross_attention.local import LocalNeighbourhood, local_reference, morton_order
from .clam import Attn_Net_Gated

EMBED_DIM, DIM, DROPOUT, K_SAMPLE = 512, 128, 0.2, 8  # the README's --embed_dim, --dim, --drop_out, --k_sample
PATCH_SIZE_20X = 256  # pixels of a 20x patch in the zoo's coords; a 10x patch spans 2 x 2 of them, a 5x 4 x 4


class CrossAttention(CrossAttentionLayers):
    """CMA-MIL's ``CrossAttention`` in plain PyTorch: ``norm(x1 + softmax(Q K^T / sqrt(dim)) V)``, forming the
    ``(N_q, N_k)`` weights; constructor and children of :class:`milkernels.nn.cross_attention.CrossAttentionLayers`
    (args ``dim``: E; ``dropout``: ignored)."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, local: LocalNeighbourhood | None = None) -> torch.Tensor:
        """``x1: (N_q, E)``, ``x2: (N_k, E)`` -> ``(N_q, E)``; ``local``: attend to the neighbours only
        (:func:`~milkernels.ops.cross_attention.local.local_reference`)."""
        q, k, v = self.query(x1), self.key(x2), self.value(x2)
        if local is not None:
            norm = self.norm
            return local_reference(x1, q, k, v, norm.weight, norm.bias, local, softmax_scale=x1.shape[-1] ** -0.5,
                                   eps=norm.eps)
        weights = self.softmax(torch.mm(q, k.t()) / x1.shape[-1] ** 0.5)
        return self.norm(x1 + torch.mm(weights, v))


class CMAMIL(nn.Module):
    """CMA-MIL on the 5x, 10x and 20x bags of one slide (module doc).

    Args: embed_dim: F; n_classes: C; dim: E; dropout: truthy adds ``Dropout(0.25)`` to the gated attention's
    branches (CLAM's rule; the blocks ignore it); k_sample: instances per target of the instance loss;
    subtyping: the other classes' instance classifiers train too; instance_loss_fn: default cross entropy;
    instance_classifiers: False leaves them out (no label then: the zoo's profiling model).
    """

    def __init__(self, embed_dim: int = EMBED_DIM, n_classes: int = 2, dim: int = DIM, dropout: float = DROPOUT,
                 k_sample: int = K_SAMPLE, subtyping: bool = False, instance_loss_fn: nn.Module | None = None,
                 instance_classifiers: bool = True):
        super().__init__()
        self.k_sample, self.subtyping = k_sample, subtyping
        self.instance_loss_fn = instance_loss_fn or nn.CrossEntropyLoss()
        if instance_classifiers:
            self.instance_classifiers = nn.ModuleList(nn.Linear(dim, 2) for _ in range(n_classes))
        self.cross_attn_5x_10x = CrossAttention(dim, dropout=dropout)
        self.cross_attn_10x_20x = CrossAttention(dim, dropout=dropout)
        self.cross_attn_20x_5x = CrossAttention(dim, dropout=dropout)
        self.adaptor_5x = nn.Sequential(nn.Linear(embed_dim, dim), nn.ReLU())
        self.adaptor_10x = nn.Sequential(nn.Linear(embed_dim, dim), nn.ReLU())
        self.adaptor_20x = nn.Sequential(nn.Linear(embed_dim, dim), nn.ReLU())
        self.attention_net = Attn_Net_Gated(L=dim, D=dim // 2, dropout=dropout, n_classes=1)
        self.classifier = nn.Linear(dim, n_classes)
        self.logit_weights = nn.Parameter(torch.ones(3))
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, h_5x: torch.Tensor, h_10x: torch.Tensor, h_20x: torch.Tensor, coords: tuple | None = None,
                label: torch.Tensor | None = None):
        """``h_5x: (N_5x, F)``, ``h_10x: (N_10x, F)``, ``h_20x: (N_20x, F)`` -> ``logits: (1, C)``; with a
        ``label`` (an int or a one-element int tensor), ``(logits, instance loss)``.

        ``coords``: ``((coords_5x, patch_size_5x), (coords_10x, patch_size_10x), (coords_20x, patch_size_20x))``,
        ``coords_m: (N_m, 2)`` integer top-left level-0 pixels and ``patch_size_m`` the patch side in them: the
        blocks then run in the local mode, radius 0. ValueError for coords of a wrong form or row count.
        """
        check_coords(coords, (h_5x, h_10x, h_20x))
        h_5x, h_10x, h_20x = self.adaptor_5x(h_5x), self.adaptor_10x(h_10x), self.adaptor_20x(h_20x)
        local_5x_10x, local_10x_20x, local_20x_5x = cycle_neighbourhoods(coords)
        streams = (self.cross_attn_5x_10x(h_5x, h_10x, local_5x_10x),
                   self.cross_attn_10x_20x(h_10x, h_20x, local_10x_20x),
                   self.cross_attn_20x_5x(h_20x, h_5x, local_20x_5x))
        logits, losses = zip(*(self._stream(h, label) for h in streams))
        weights = torch.softmax(self.logit_weights, dim=0)
        logits = sum(weight * stream_logits for weight, stream_logits in zip(weights, logits)) + self.bias
        return logits if label is None else (logits, sum(losses) / len(losses))

    def _stream(self, h: torch.Tensor, label) -> tuple:
        """One magnification's ``(logits: (1, C), instance loss or None)`` from its stream ``h: (N, E)``."""
        scores, h = self.attention_net(h)
        attention = F.softmax(scores.t(), dim=1)[0]                       # (N,)
        weight = attention.exp()[:, None]                                  # (N, 1)
        attribute = self.classifier(h) * weight                            # (N, C)
        logits = attribute.sum(dim=0, keepdim=True) / weight.sum()
        if label is None:
            return logits, None
        return logits, self._instance_loss(attribute, attention, weight, h, int(label))

    def _instance_loss(self, attribute, attention, weight, h, label: int) -> torch.Tensor:
        """The stream's instance loss: the label's classifier on the top and bottom instances by attribute
        score, with ``subtyping`` the others' by attention; ``attribute: (N, C)``, ``attention: (N,)``,
        ``weight = exp(attention): (N, 1)``, ``h: (N, E)``."""
        loss = h.new_zeros(())
        for index, classifier in enumerate(self.instance_classifiers):
            if index == label:
                loss = loss + self._top_k_loss(attribute[:, index], weight, h, classifier)
            elif self.subtyping:
                loss = loss + self._top_k_loss(attention, weight, h, classifier)
        return loss

    def _top_k_loss(self, ranking, weight, h, classifier) -> torch.Tensor:
        """``instance_loss_fn`` of ``classifier``'s scores times ``weight`` on the ``k`` instances of highest
        ``ranking: (N,)`` (target 1) and the ``k`` of lowest (target 0), ``k = min(k_sample, N)``."""
        k = min(self.k_sample, len(ranking))
        chosen = torch.cat([torch.topk(ranking, k).indices, torch.topk(-ranking, k).indices])
        targets = (torch.arange(2 * k, device=h.device) < k).long()
        return self.instance_loss_fn(classifier(h[chosen]) * weight[chosen], targets)


MAGNIFICATIONS = ("5x", "10x", "20x")


def check_coords(coords, bags: tuple) -> None:
    """ValueError unless ``coords`` is None or three ``(coords_m: (N_m, 2), patch_size_m)`` pairs, one per bag of
    ``bags`` (``(N_m, F)`` each), in the order 5x, 10x, 20x."""
    if coords is None:
        return
    if not isinstance(coords, (tuple, list)) or len(coords) != 3:
        raise ValueError("coords must be None or three (coords, patch_size) pairs, for 5x, 10x and 20x; got "
                         f"{type(coords).__name__} of {len(coords) if isinstance(coords, (tuple, list)) else '?'}")
    for name, pair, bag in zip(MAGNIFICATIONS, coords, bags):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], torch.Tensor):
            raise ValueError(f"coords for {name} missing: need a (coords: (N, 2) tensor, patch_size) pair, got "
                             f"{pair!r:.80}")
        if pair[0].dim() != 2 or pair[0].shape[1] != 2 or len(pair[0]) != len(bag):
            raise ValueError(f"coords for {name} must be ({len(bag)}, 2), one row per {name} patch, got "
                             f"{tuple(pair[0].shape)}")


def cycle_neighbourhoods(coords: tuple | None) -> list:
    """The :class:`LocalNeighbourhood` (radius 0) of the blocks 5x -> 10x, 10x -> 20x, 20x -> 5x from
    :meth:`CMAMIL.forward`'s ``coords``; three None without coords."""
    if coords is None:
        return [None] * 3
    coords = tuple(coords)
    pairs = zip(coords, coords[1:] + coords[:1])
    return [LocalNeighbourhood(query, key, query_size, key_size) for (query, query_size), (key, key_size) in pairs]


def group_means(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(ceil(N / size), F)``: the means of the consecutive groups of ``size`` rows of ``x: (N, F)`` (the last
    group may be short)."""
    groups = -(-len(x) // size)
    sums = F.pad(x, (0, 0, 0, groups * size - len(x))).reshape(groups, size, x.shape[1]).sum(dim=1)
    counts = (len(x) - torch.arange(groups, device=x.device) * size).clamp(max=size)
    return sums / counts[:, None].to(x.dtype)


def coarser_bags(features: torch.Tensor, coords: torch.Tensor | None) -> tuple:
    """``(h_5x: (ceil(N / 16), F), h_10x: (ceil(N / 4), F))`` from the 20x bag ``features: (N, F)``: the means of
    its consecutive groups of 16 and 4 patches along the Z curve of their 256 px grid (``coords: (N, 2)``;
    without coords, in row order). On a full grid these are exactly the 4 x 4 and 2 x 2 blocks from its top-left
    corner, the 5x and 10x patches; where patches are missing, a group holds nearby patches that need not share
    a parent. Not grouped by parent (``coords // 512``): the number of parents depends on the coords' values,
    and the profiler counts the model on fake tensors, which have none; ``N / 4`` and ``N / 16`` are the 10x and
    5x patch counts of the same tissue."""
    if coords is not None:
        features = features[morton_order(coords, PATCH_SIZE_20X)]
    return group_means(features, 16), group_means(features, 4)


class CMAMILOneBag(nn.Module):
    """The zoo's CMA-MIL: one 20x bag, whose 10x and 5x bags are the means of its 2 x 2 and 4 x 4 patch blocks
    (:func:`coarser_bags`), stand-ins for features extracted at those magnifications; the blocks are dense, as
    upstream's. ``model`` is a :class:`CMAMIL` without instance classifiers.

    Args: in_dim: F; n_classes: C.
    """

    profile_layers = ("model.adaptor_5x", "model.adaptor_10x", "model.adaptor_20x", "model.cross_attn_5x_10x",
                      "model.cross_attn_10x_20x", "model.cross_attn_20x_5x", "model.attention_net")

    local = False

    def __init__(self, in_dim: int, n_classes: int = 2):
        super().__init__()
        self.model = CMAMIL(in_dim, n_classes, instance_classifiers=False)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)`` of 20x patches, ``coords: (N, 2)`` their pixels or None -> ``logits: (1, C)``."""
        cycle = coarser_coords(coords) if self.local and coords is not None else None
        return self.model(*coarser_bags(features, coords), features, coords=cycle)


class CMAMILOneBagLocal(CMAMILOneBag):
    """:class:`CMAMILOneBag` with its blocks in the coordinate-local mode (radius 0) when the bag has coords:
    each patch attends to the patches of the other magnification that overlap it (:func:`coarser_coords`)."""

    local = True


def coarser_coords(coords: torch.Tensor) -> tuple:
    """CMA-MIL's ``coords`` argument for :func:`coarser_bags`' bags of the 20x patches at ``coords: (N, 2)``:
    each 5x (10x) group stands at the 1024 (512) px cell that holds the first patch of its group, from the 20x
    patches' smallest corner; on a full grid, exactly the group's parent patch. Shapes do not depend on the
    values (the profiler counts on fake tensors)."""
    origin = coords.amin(dim=0)
    ordered = coords[morton_order(coords, PATCH_SIZE_20X)] - origin
    coarse = [(ordered[::factor * factor] // (PATCH_SIZE_20X * factor) * (PATCH_SIZE_20X * factor) + origin,
               PATCH_SIZE_20X * factor) for factor in (4, 2)]
    return (*coarse, (coords, PATCH_SIZE_20X))
