"""Prov-GigaPath's slide encoder (``gigapath_slide_enc12l768d``: ``LongNetViT`` on torchscale's LongNet
encoder) with a linear classification head, as its ``ClassificationHead`` on the last layer.

``patch_embed`` (``Linear(1536, 768)``) embeds the tiles, the 2D sin-cos position embedding of their grid cell
(``coords // 256``) is added when ``coords`` are given, a class token is prepended; the LongNet ``encoder``:
embedding dropout, 12 pre-LayerNorm layers (dilated self-attention with ``subln``'s inner LayerNorm, and a GELU
FFN of width 3072 with ``subln``'s LayerNorm, each with dropout 0.25 and stochastic depth up to 0.1), a final
LayerNorm; then ``norm`` and the class token to ``classifier``. The dilated attention has 16 heads and the
branches Prov-GigaPath picks for slides of up to 262144 px in 256 px tiles: segment lengths
:data:`SEGMENT_LENGTHS`, dilation rates :data:`DILATED_RATIOS`.

:class:`DilatedAttention` has torchscale's structure, so :func:`milkernels.swap` replaces it by
:class:`milkernels.nn.DilatedAttention`; its own forward computes torchscale's attention with the plain-PyTorch
oracle (upstream's needs flash-attn).

Shapes: B bags, N tiles, F input features, E = ``dim`` features, H heads of E / H.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..bench.timm_stub import DropPath
from ..ops.dilated_attention import reference

IN_DIM, DIM, LAYERS, HEADS, MLP_RATIO = 1536, 768, 12, 16, 4
SEGMENT_LENGTHS = [1024, 5792, 32768, 185363, 1048576]  # 2 ** linspace(10, 20, 5), cut to ints
DILATED_RATIOS = [1, 2, 4, 8, 16]
DROPOUT, DROP_PATH_RATE = 0.25, 0.1                     # LongNetViT's defaults
LAYERNORM_EPS, NORM_EPS = 1e-5, 1e-6                    # torchscale's layers, LongNetViT's final norm
TILE_SIZE = 256
CLS_TOKEN_STD = 0.02


@dataclass
class LongNetArgs:
    """The fields of torchscale's ``EncoderConfig`` that its dilated attention reads."""

    segment_length: list
    dilated_ratio: list
    layernorm_eps: float = LAYERNORM_EPS
    flash_attention: bool = True
    seq_parallel: bool = False


class DilatedAttention(nn.Module):
    """torchscale's ``DilatedAttention`` as Prov-GigaPath builds it (self-attention, ``subln``, no attention
    dropout): children ``k_proj``, ``v_proj``, ``q_proj``, ``out_proj = Linear(E, E)``, ``inner_attn_ln``,
    ``dropout_module``; the branches ``zip(args.segment_length, args.dilated_ratio)``."""

    def __init__(self, args: LongNetArgs, embed_dim: int, num_heads: int):
        super().__init__()
        self.args = args
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = 0.0
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=args.layernorm_eps)
        self.dropout_module = nn.Dropout(self.dropout)
        self.xpos = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, incremental_state=None,
                key_padding_mask=None, attn_mask=None, rel_pos=None, is_first_step: bool = False,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """``query, key, value: (B, N, E)`` -> ``(attn: (B, N, E), None)``, torchscale's flash path in plain
        PyTorch: ``key_padding_mask`` is ignored, as there; incremental decoding, ``attn_mask``, ``rel_pos`` and
        ``is_causal`` are not implemented."""
        if incremental_state is not None or attn_mask is not None or rel_pos is not None or is_causal:
            raise NotImplementedError("the zoo's DilatedAttention takes plain encoder self-attention only")
        batch, length, _ = query.shape
        q, k, v = (proj(x).reshape(batch * length, self.num_heads, self.head_dim)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        bounds = [bag * length for bag in range(batch + 1)]
        attn, _ = reference.dilated_attention(q, k, v, bounds, self.args.segment_length, self.args.dilated_ratio,
                                              self.head_dim ** -0.5, "torchscale")
        return self.out_proj(self.inner_attn_ln(attn.reshape(query.shape))), None


class FeedForwardNetwork(nn.Module):
    """torchscale's FFN with ``subln``: ``dropout_module(fc2(ffn_layernorm(gelu(fc1(x)))))``."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.dropout_module = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, N, E)`` -> ``(B, N, E)``."""
        return self.dropout_module(self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """torchscale's pre-LayerNorm encoder layer with LongNet's dilated self-attention."""

    def __init__(self, args: LongNetArgs, dim: int, heads: int, dropout: float, drop_path: float):
        super().__init__()
        self.self_attn = DilatedAttention(args, dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=args.layernorm_eps)
        self.dropout_module = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        self.ffn = FeedForwardNetwork(dim, dim * MLP_RATIO, dropout, args.layernorm_eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=args.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, N, E)`` -> ``(B, N, E)``."""
        h = self.self_attn_layer_norm(x)
        x = x + self.drop_path(self.dropout_module(self.self_attn(h, h, h)[0]))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class LongNetEncoder(nn.Module):
    """torchscale's ``Encoder`` on token embeddings: dropout, ``layers`` (stochastic depth rising linearly from
    0 to ``DROP_PATH_RATE``), the output ``layer_norm``."""

    def __init__(self, args: LongNetArgs, dim: int, heads: int, layers: int):
        super().__init__()
        self.dropout_module = nn.Dropout(DROPOUT)
        drop_paths = torch.linspace(0, DROP_PATH_RATE, layers).tolist()
        self.layers = nn.ModuleList(EncoderLayer(args, dim, heads, DROPOUT, p) for p in drop_paths)
        self.layer_norm = nn.LayerNorm(dim, eps=args.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, N, E)`` -> ``(B, N, E)``."""
        x = self.dropout_module(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's 1D sin-cos embedding: ``positions: (...)`` -> ``(..., dim)``, sines then cosines of
    ``positions / 10000 ** (j / (dim / 2))``, ``j < dim / 2``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64)[..., None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def position_embedding(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Prov-GigaPath's position embedding of tiles at ``coords: (..., 2)`` (x, y in px) -> ``(..., dim)``
    float64: MAE's 2D sin-cos embedding of the grid cell ``(x // 256, y // 256)``, the first half from y's
    cell, the second from x's (its lookup table, computed for any cell rather than stored for 1000 x 1000)."""
    cells = torch.div(coords, TILE_SIZE, rounding_mode="floor")
    return torch.cat([sincos_1d(cells[..., 1], dim // 2), sincos_1d(cells[..., 0], dim // 2)], dim=-1)


class SlideEncoder(nn.Module):
    """Prov-GigaPath's ``LongNetViT`` (``global_pool=False``): ``(B, N, F)`` tiles -> ``(B, E)`` class token."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int, args: LongNetArgs):
        super().__init__()
        self.patch_embed = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = LongNetEncoder(args, dim, heads, layers)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=CLS_TOKEN_STD)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``x: (B, N, F)``, ``coords: (B, N, 2)`` or None (no position embedding) -> ``(B, E)``."""
        x = self.patch_embed(x)
        if coords is not None:
            x = x + position_embedding(coords, x.shape[-1]).to(x.dtype)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.norm(self.encoder(x))[:, 0]


def _init_weights(module: nn.Module) -> None:
    """LongNetViT's init: Xavier-uniform Linear weights, zero biases (LayerNorms keep ones and zeros)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class GigaPath(nn.Module):
    """The slide encoder and ``classifier = Linear(E, n_classes)`` on one bag.

    Args: in_dim: F; n_classes: logits; layers: encoder layers; dim: E; heads: H; args: the branches
    (default: Prov-GigaPath's).
    """

    def __init__(self, in_dim: int = IN_DIM, n_classes: int = 2, layers: int = LAYERS, dim: int = DIM,
                 heads: int = HEADS, args: LongNetArgs | None = None):
        super().__init__()
        args = args or LongNetArgs(list(SEGMENT_LENGTHS), list(DILATED_RATIOS))
        self.slide_encoder = SlideEncoder(in_dim, dim, heads, layers, args)
        self.classifier = nn.Linear(dim, n_classes)
        self.profile_layers = ("slide_encoder.patch_embed",
                               *(f"slide_encoder.encoder.layers.{i}.{part}" for i in range(layers)
                                 for part in ("self_attn", "ffn")))

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """``features: (N, F)``, ``coords: (N, 2)`` int64 px or None -> ``logits: (1, n_classes)``."""
        return self.classifier(self.slide_encoder(features[None], None if coords is None else coords[None]))
