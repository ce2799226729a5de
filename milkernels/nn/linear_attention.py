"""Lin-MIL's attention modules on fused paths, and the Lin-MIL forward that never forms the numerator.

- :class:`LinearAttention` is Lin-MIL's ``LinearAttention`` (``lin_mil.attention.linear_attention``):
  same constructor, same children (so the same ``state_dict`` keys and parameter init), same
  ``forward`` contract ``x -> (out, numerator)``, the core on :func:`milkernels.ops.lin_mil_attention`.
  :meth:`LinearAttention.forward_with_map` gives the attention map instead of the numerator and
  :meth:`LinearAttention.forward_without_attention` neither.
- :class:`SoftmaxAttention` is Lin-MIL's softmax ``Attention`` (the ``attention="softmax"`` ablation):
  its ``forward`` forms and returns the full softmax matrix as the original does;
  :meth:`SoftmaxAttention.forward_without_attention` runs ``F.scaled_dot_product_attention`` (flash or
  memory-efficient kernels) where the matrix is not wanted.
- :class:`FusedLinMIL` is the forward :func:`milkernels.swap` gives a ``Lin_MIL`` model, by changing the
  instance's class to :func:`fused_lin_mil_class` of its own: the last block's attention map comes from
  the map mode and the earlier blocks return no attention, so the ``(B, H, N, dh)`` numerator is never formed.

Shapes: B bags, N instances (tokens), C = ``dim`` features, H heads of dh = C / H features. Bags without
instances (N = 0), which the op refuses, get Lin-MIL's result from plain torch ops.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import lin_mil_attention, lin_mil_projected_attention
from ._empty import no_instances

ACTIVATIONS = {nn.ReLU: "relu", nn.GELU: "gelu", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh",
               nn.Softplus: "softplus"}
IGNORED_SETTINGS = ("training", "inplace")  # inplace changes no value
LIN_MIL_CLAMP_MIN = 100.0  # Lin-MIL's denominator: max(q . sum_n k_n, 100), as lin_mil_attention has it


def _settings(act: nn.Module) -> dict:
    """The public attributes of an activation module that change its values (alpha, beta, approximate...)."""
    return {k: v for k, v in vars(act).items() if not k.startswith("_") and k not in IGNORED_SETTINGS}


DEFAULT_SETTINGS = {cls: _settings(cls()) for cls in ACTIVATIONS}


def activation_problem(act: nn.Module) -> str:
    """Why the fused op cannot apply ``act`` (the op has the default-argument activations only), or ``""``."""
    cls = type(act)
    if cls not in ACTIVATIONS:
        return f"act is a {cls.__name__}; the op has {', '.join(c.__name__ for c in ACTIVATIONS)}"
    if _settings(act) != DEFAULT_SETTINGS[cls]:
        return f"act is {act!r}; the op applies {cls.__name__} with its default arguments only"
    return ""


def activation_name(act: nn.Module) -> str:
    """The op's name of ``act`` (``nn.ReLU()`` -> ``"relu"``); ValueError when the op has no equivalent."""
    problem = activation_problem(act)
    if problem:
        raise ValueError(problem)
    return ACTIVATIONS[type(act)]


class Mul(nn.Module):
    """Lin-MIL's ``Mul`` (``q @ k``): kept as children for identical module trees; the op does the products."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class LinearAttention(nn.Module):
    """Lin-MIL's ``LinearAttention`` on :func:`milkernels.ops.lin_mil_attention`.

    Args (Lin-MIL's): dim: C. num_heads: H. qkv_bias: a bias on ``qkv``. qk_scale: the initial
    temperature (default dh ** -0.5). att_act: the feature map's class, one of ReLU, GELU, ELU,
    LeakyReLU, Tanh, Softplus (instantiated with no arguments). attn_drop: unused, as in Lin-MIL.
    proj_drop: dropout after ``proj``.

    Children and parameters as Lin-MIL's: ``temperature: (H, 1, 1)``, ``qkv = Linear(C, 3C)``,
    ``attn_drop``, ``proj = Linear(C, C)``, ``proj_drop``, ``qk_mul``, ``kv_mul``, ``extra_mul``, ``act``.

    Setting ``process_group`` (:func:`milkernels.distributed.set_process_group`) makes it sequence parallel:
    ``x`` is this rank's shard of the bags, S and z are summed over the group and the outputs are the shard's rows;
    average the gradients over the group (DDP does) for the whole bag's (:mod:`milkernels.distributed`).
    """

    process_group = None

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, att_act=nn.ReLU, attn_drop=0.,
                 proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1) * self.scale)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.qk_mul = Mul()
        self.kv_mul = Mul()
        self.extra_mul = Mul()
        self.act = att_act()
        activation_name(self.act)

    @classmethod
    def from_module(cls, module: nn.Module) -> "LinearAttention":
        """A module holding ``module``'s very ``temperature`` and children, in its order (no new parameters),
        e.g. those of a Lin-MIL ``LinearAttention``; :func:`milkernels.swap` checks the structure. ValueError when
        its ``act`` is one the op lacks (:func:`activation_name`)."""
        activation_name(module.act)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = module.temperature.shape[0]
        new.scale = getattr(module, "scale", None)
        new.temperature = module.temperature
        for name, child in module.named_children():
            setattr(new, name, child)
        return new

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """Lin-MIL's contract: ``x: (B, N, C)`` -> ``(out: (B, N, C), numerator: (B, H, N, dh))``.

        Also one bag ``(N, C)`` (numerator ``(H, N, dh)``), padded bags with ``mask: (B, N)`` (padded rows
        are not keys; their ``out`` is ``proj(0)`` and their numerator 0) or packed bags ``(T, C)`` with
        ``cu_seqlens`` (numerator ``(T, H, dh)``). The ``(B, H, N, dh)`` numerator is contiguous, as Lin-MIL's
        ``attn1`` is (``numerator.view(B, H, -1)`` works).
        """
        out, numerator = self._attend(x, mask, cu_seqlens, return_numerator=True)
        return self._project(out), numerator

    def forward_with_map(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         cu_seqlens: torch.Tensor | None = None):
        """The map mode: ``(out, attention_map)``, the map ``(B, N)`` (``(N,)``, ``(T,)``) being the mean over
        heads and dh of the numerator (what Lin-MIL's model reports), without forming the numerator."""
        out, attention_map = self._attend(x, mask, cu_seqlens, return_map=True)
        return self._project(out), attention_map

    def forward_without_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` alone, in ``x``'s layout: neither the numerator nor the map is formed."""
        return self._project(self._attend(x, mask, cu_seqlens))

    @property
    def activation(self) -> str:
        """The op's name of ``self.act`` (checked by the constructor and ``from_module`` and, in eager mode, at every
        call: torch 2.11's dynamo cannot trace the check's ``vars(act)``, a graph break in the GPU run's compile
        test)."""
        if torch.compiler.is_compiling():
            return ACTIVATIONS[type(self.act)]
        return activation_name(self.act)

    def _attend(self, x, mask, cu_seqlens, return_numerator=False, return_map=False):
        """The op on ``qkv(x)``: the heads' outputs ``(..., C)`` before ``proj``, then the numerator or the map
        where asked. Without the numerator, the projection runs inside the op, which keeps no ``qkv``."""
        if self.process_group is None and cu_seqlens is None and no_instances(x):
            return self._composed(self.qkv(x), return_numerator=return_numerator, return_map=return_map)
        options = dict(activation=self.activation, mask=mask, cu_seqlens=cu_seqlens, return_map=return_map,
                       process_group=self.process_group)
        if return_numerator:
            qkv = self.qkv(x)
            return lin_mil_attention(qkv, self.temperature.to(qkv.dtype), self.num_heads, return_numerator=True,
                                     **options)
        tau = self.temperature.to(x.dtype)
        return lin_mil_projected_attention(x, self.qkv.weight, self.qkv.bias, tau, self.num_heads, **options)

    def _composed(self, qkv: torch.Tensor, return_numerator: bool = False, return_map: bool = False):
        """Lin-MIL's math in plain torch on ``qkv: (..., N, 3C)``, for inputs without instances: the op's
        outputs ``out: (..., N, C)``, then if asked ``numerator: (..., H, N, dh)`` and ``map: (..., N)``."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).movedim(-4, -2).unbind(-4)    # (..., H, N, dh)
        q, k = self.act(q), self.act(k)
        numerator = q @ (k.transpose(-2, -1) @ v * self.temperature.to(qkv.dtype))
        denominator = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), min=LIN_MIL_CLAMP_MIN)
        results = [(numerator / denominator).movedim(-3, -2).flatten(-2)]
        results += [numerator] if return_numerator else []
        results += [numerator.mean(dim=(-3, -1))] if return_map else []
        return results[0] if len(results) == 1 else tuple(results)

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(out))


class SoftmaxAttention(nn.Module):
    """Lin-MIL's softmax ``Attention`` (``lin_mil.attention.softmax_attention``): same constructor, children
    (``attend = Softmax(-1)``, ``to_qkv = Linear(C, 3 * heads * dim_head, bias=False)``, ``to_out``) and
    ``forward``; :meth:`forward_without_attention` is the fused path."""

    def __init__(self, dim=512, heads=8, dim_head=512 // 8, dropout=0.1):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    @classmethod
    def from_module(cls, module: nn.Module) -> "SoftmaxAttention":
        """A module holding ``module``'s very children and its ``heads`` and ``scale``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.heads = module.heads
        new.scale = module.scale
        for name, child in module.named_children():
            setattr(new, name, child)
        return new

    def forward(self, x: torch.Tensor, register_hook: bool = False):
        """Lin-MIL's contract: ``x: (B, N, C)`` -> ``(out: (B, N, C), attn: (B, H, N, N))``; the softmax
        matrix is formed, kept as ``attention_map`` and, with ``register_hook``, its gradient saved."""
        q, k, v = self._heads(x)
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)
        self.save_attention_map(attn)
        if register_hook:
            attn.register_hook(self.save_attn_gradients)
        return self._merge(torch.matmul(attn, v)), attn

    def forward_without_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``out: (B, N, C)`` alone, through ``F.scaled_dot_product_attention``: the matrix is never formed,
        so ``attention_map`` is set to None."""
        q, k, v = self._heads(x)
        self.save_attention_map(None)
        return self._merge(F.scaled_dot_product_attention(q, k, v, scale=self.scale))

    def _heads(self, x):
        """``q, k, v``: each ``(B, H, N, dim_head)``."""
        qkv = self.to_qkv(x).unflatten(-1, (3, self.heads, -1))   # unlike reshape, takes N = 0
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, out):
        """``(B, H, N, dim_head)`` -> ``to_out`` of ``(B, N, H * dim_head)``."""
        return self.to_out(out.transpose(1, 2).flatten(2))

    def save_attn_gradients(self, attn_gradients):
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self):
        return self.attn_gradients

    def save_attention_map(self, attention_map):
        self.attention_map = attention_map

    def get_attention_map(self):
        return self.attention_map

    def get_self_attention(self, x):
        """The softmax matrix ``(B, H, N, N)``."""
        q, k, _ = self._heads(x)
        return self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)


def _head_mean(att: torch.Tensor | None) -> torch.Tensor | None:
    """Lin-MIL's map of a block's attention output: the mean over heads (dim 1), then over the last dim."""
    return att.mean(dim=1).mean(dim=-1) if att is not None else None


def _block_attention(attn: nn.Module, y: torch.Tensor, want_map: bool):
    """A block's attention on ``y: (B, N, C)``: ``(out: (B, N, C), map: (B, N) or None)``."""
    if want_map:
        if isinstance(attn, LinearAttention):
            return attn.forward_with_map(y)
        out, att = attn(y)
        return out, _head_mean(att)
    if isinstance(attn, (LinearAttention, SoftmaxAttention)):
        return attn.forward_without_attention(y), None
    return attn(y)[0], None


def _run_block(block: nn.Module, x: torch.Tensor, want_map: bool):
    """Lin-MIL's ``LinearTransformerBlock`` (and linear/softmax ablation block) forward, with the map in
    place of the block's attention output: ``(x: (B, N, C), map: (B, N) or None)``. A dilated ablation block
    runs its own forward (its attention in float16, no map), whatever its ``attn`` is."""
    if getattr(block, "attention_type", None) == "dilated":
        return block(x)
    y, attention_map = _block_attention(block.attn, block.norm1(x), want_map)
    x = x + block.drop_path(y)
    x = x + block.drop_path(block.mlp(block.norm2(x)))
    return x, attention_map


class FusedLinMIL:
    """The forward of a Lin-MIL model after :func:`milkernels.swap`, as a mixin ahead of the model's own
    class (:func:`fused_lin_mil_class`). Same values and gradients as ``Lin_MIL.forward``; the
    blocks' ``(B, H, N, dh)`` numerators (and the non-last softmax matrices) are never formed."""

    def forward(self, x: torch.Tensor, coords=None):
        """``x: (B, N, input_dim)`` -> ``(logits: (B, num_classes), att: (B, N))``."""
        batch = x.shape[0]
        x = self.projection(x)
        if self.pos_enc is not None:
            x = self.pos_enc(x, coords)
        if self.pool == "cls":
            x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = self.dropout(x)
        last = len(self.transformer) - 1
        for index, block in enumerate(self.transformer):
            x, att = _run_block(block, x, want_map=index == last)
        if self.pool == "mean":
            x = x.mean(dim=1)
        elif self.pool == "cls":
            x = x[:, 0]
            att = att[:, 1:] if att is not None else None
        else:
            raise ValueError(f"Invalid pooling type: {self.pool}")
        return self.mlp_head(self.norm(x)), att

    def __reduce_ex__(self, protocol):
        """Pickle (and deep-copy) as the original class, rebuilt with this forward by :func:`_fused_instance`."""
        reduced = super().__reduce_ex__(protocol)
        return (_fused_instance, (type(self).lin_mil_class,)) + tuple(reduced[2:])


@functools.cache
def fused_lin_mil_class(base: type) -> type:
    """The subclass of ``base`` (a Lin-MIL model class) whose forward is :class:`FusedLinMIL`'s; one per ``base``.

    It keeps ``base``'s name, so ``repr`` and ``isinstance(model, base)`` stay as they were.
    """
    return type(base.__name__, (FusedLinMIL, base),
                dict(__module__=base.__module__, __qualname__=base.__qualname__, lin_mil_class=base))


def _fused_instance(base: type):
    """An empty instance of :func:`fused_lin_mil_class` of ``base``, for unpickling."""
    cls = fused_lin_mil_class(base)
    return cls.__new__(cls)
