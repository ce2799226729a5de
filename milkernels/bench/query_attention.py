"""Benchmark entries for learned-query attention: an ASMIL training step and LiteMIL's pooling.

``asmil_step``: ASMIL's FEAT-token block on one bag ``x: (N, D)``: T tokens, each with its own
H-head cross-attention module (q, k, v, out projections and a LayerNorm), the EMA anchor's logits
(NSF at temperature 0.5) and the stabilization loss ``L_kd``. Inputs ``(x, query, wq, bq, wk, bk, wv,
bv, wo, bo, ln_w, ln_b, awq, abq, awk, abk)``: ``query: (T, H, dh)`` (the learned tokens, split per
head so that the case carries H), the online weights stacked over tokens (``(T, D, D)`` and
``(T, D)``) and the anchor's q and k projections (the anchor needs no others; no ``requires_grad``:
the anchor is a stop-gradient target). Outputs ``(tokens: (T, D), loss)``. ``call`` runs
:class:`milkernels.nn.anchor.AnchoredQueryAttention` on those weights (a folded pass over x for
the online columns that scores the anchor's too, without gradient); ``reference`` is ASMIL's
eager composition, which projects the whole bag with every token's ``k_proj`` and ``v_proj`` and the
anchor's ``k_proj``. Dropout is 0 and no token is dropped, so both compute the same numbers; the
anchor's EMA update (once per optimizer step, independent of N) is not part of the step. The peer
``online_only`` runs the same module without the anchor and the loss (the online tokens alone): the
anchor's extra cost is its time over ``online_only``'s.

``litemil_pool``: LiteMIL's pooling: ``nn.MultiheadAttention(D, H, batch_first=True)`` from one
learned query to a bag ``x: (1, N, D)``. Inputs ``(x, query, in_proj_weight, in_proj_bias,
out_proj_weight, out_proj_bias)``: ``query: (1, 1, D)``, LiteMIL's learned query expanded over the
batch of one bag, and ``in_proj_bias: (3, H, dh)``, torch's ``(3·D,)`` bias split per projection and
head so that the case carries H; output ``(1, 1, D)``. ``call`` is
:class:`milkernels.nn.query_attention.MultiheadAttention`; the peer ``torch_mha`` is
``torch.nn.MultiheadAttention`` on the same weights.

FLOPs count the matmuls of the folded form (:mod:`milkernels.ops.query_attention.reference`), the
fewest any implementation needs; the eager compositions, which form keys and values (about
``4·N·D²`` per attention module), are rated on the same count. With J columns of scores and P of
them pooled (both ``J = P = H`` for LiteMIL; ``P = T·H`` online and ``J = 2·T·H`` with the
anchor's for ASMIL):

- the bag: ``2·N·D·J`` (scores ``z = x u^T``) ``+ 2·N·D·P`` (pooling ``p^T x``);
- per attention module, independent of N: ``2·D²`` each for the query projection, the folding
  ``u = Wk_h^T q_h`` and the value projection of the pooled rows ``Wv_h pooled_h``, ``2·D`` for the
  offsets ``q_h . bk_h`` and ``2·D²`` for ``out_proj``; the anchor's modules only project and fold.
- backward: ``2 ×`` the forward of every product with an operand that needs a gradient: all but the
  anchor's (its projections, folding and scores).

So LiteMIL: forward ``4·N·D·H + 8·D² + 2·D``, fwd+bwd 3 × that; ASMIL: forward
``6·N·D·T·H + T·(12·D² + 4·D)``, fwd+bwd ``14·N·D·T·H + T·(28·D² + 8·D)``. The elementwise work
(softmax, NSF, the loss, LayerNorm; about 10·N·T·H) is left out.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..nn.anchor import AnchoredQueryAttention
from ..nn.query_attention import LAYER_NORM_EPS
from ..ops.query_attention.reference import NSF_EPS
from .registry import Op, register

ANCHOR_TEMPERATURE = 0.5
ONLINE_PARAMETERS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
                     "v_proj.bias", "out_proj.weight", "out_proj.bias", "layer_norm.weight", "layer_norm.bias")
ANCHOR_PARAMETERS = ONLINE_PARAMETERS[:4]


def _randn(generator, shape, scale, dtype, device, requires_grad=True):
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype).requires_grad_(requires_grad)


def _head_logits(x, query, wq, bq, wk, bk):
    """One token's logits ``(H, N)``: ``q_proj(query) . k_proj(x) / sqrt(dh)`` per head; ``query: (H, dh)``."""
    heads, head_dim = query.shape
    q = F.linear(query.reshape(1, -1), wq, bq).reshape(heads, head_dim)
    k = F.linear(x, wk, bk).reshape(-1, heads, head_dim)
    return torch.einsum("hd,nhd->hn", q, k) * head_dim ** -0.5


def reference_step(x, query, wq, bq, wk, bk, wv, bv, wo, bo, ln_w, ln_b, awq, abq, awk, abk):
    """ASMIL's eager step, token by token: ``(tokens: (T, D), L_kd)``; shapes as in the module doc."""
    heads, head_dim = query.shape[1:]
    tokens, logits, anchor_logits = [], [], []
    for t in range(query.shape[0]):
        scores = _head_logits(x, query[t], wq[t], bq[t], wk[t], bk[t])
        values = F.linear(x, wv[t], bv[t]).reshape(-1, heads, head_dim)
        out = torch.einsum("hn,nhd->hd", scores.softmax(-1), values).reshape(1, -1)
        tokens.append(F.layer_norm(F.linear(out, wo[t], bo[t]), out.shape[1:], ln_w[t], ln_b[t], LAYER_NORM_EPS))
        logits.append(scores)
        with torch.no_grad():
            anchor_logits.append(_head_logits(x, query[t], awq[t], abq[t], awk[t], abk[t]))
    anchor = torch.sigmoid(torch.stack(anchor_logits) / ANCHOR_TEMPERATURE)
    anchor = anchor / (anchor.sum(-1, keepdim=True) + NSF_EPS)
    loss = -(anchor * torch.stack(logits).log_softmax(-1)).mean()
    return torch.cat(tokens), loss


@functools.cache
def _anchored_module(tokens: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device):
    """The module whose forward :func:`anchored_step` runs (its weights are replaced by the inputs)."""
    module = AnchoredQueryAttention(dim, heads, tokens, temperature=ANCHOR_TEMPERATURE, dropout=0.0)
    return module.to(device=device, dtype=dtype)


def anchored_step(x, query, *weights, with_anchor: bool = True):
    """:class:`~milkernels.nn.anchor.AnchoredQueryAttention` on the inputs' weights: ``(tokens: (T, D), L_kd)``;
    ``with_anchor=False`` runs it in eval mode, the online tokens alone: ``tokens``."""
    tokens, heads, head_dim = query.shape
    module = _anchored_module(tokens, heads, heads * head_dim, x.dtype, x.device).train(with_anchor)
    online, anchor = weights[:len(ONLINE_PARAMETERS)], weights[len(ONLINE_PARAMETERS):]
    state = {"query": query.reshape(tokens, -1)}
    for prefix, names, stacked in (("tokens", ONLINE_PARAMETERS, online), ("anchor.module", ANCHOR_PARAMETERS, anchor)):
        state.update({f"{prefix}.{t}.{name}": tensor[t] for name, tensor in zip(names, stacked) for t in range(tokens)})
    out = functional_call(module, state, (x,))
    return (out.tokens, out.loss) if with_anchor else out.tokens


def build_step(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """The ``asmil_step`` inputs for one bag of ``n`` instances (module doc); online ones with ``requires_grad``."""
    dim, tokens, heads = dims["D"], dims["T"], dims["H"]
    generator = torch.Generator(device=device).manual_seed(n)
    matrix, vector = (tokens, dim, dim), (tokens, dim)
    online = [_randn(generator, shape, scale, dtype, device)
              for shape, scale in ((matrix, dim ** -0.5), (vector, 0.1)) * 4 + ((vector, 0.1), (vector, 0.1))]
    online[-2] = (1 + online[-2].detach()).requires_grad_()  # the LayerNorm weight, about 1
    anchor = [_randn(generator, shape, scale, dtype, device, requires_grad=False)
              for shape, scale in ((matrix, dim ** -0.5), (vector, 0.1)) * 2]
    return (_randn(generator, (n, dim), 1.0, dtype, device),
            _randn(generator, (tokens, heads, dim // heads), 1.0, dtype, device), *online, *anchor)


def _module_flops(dim: int) -> int:
    """Matmul FLOPs of one attention module, independent of N: q_proj, folding, value projection, out_proj."""
    return 8 * dim * dim + 2 * dim


def step_flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs of ``asmil_step`` (module doc): the online columns' products over the bag and the online
    modules (× 3 with the backward), and the anchor's projections, folding and scores."""
    dim, tokens, heads = dims["D"], dims["T"], dims["H"]
    columns = tokens * heads
    trained = 2 * (2 * n * dim * columns) + tokens * _module_flops(dim)
    anchor = tokens * (4 * dim * dim + 2 * dim) + 2 * n * dim * columns
    return (3 if backward else 1) * trained + anchor


def step_min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes of ``asmil_step``: x, the query and the weights in, the tokens and the loss out.

    The backward reads x, the query, the online weights and the output gradients again and writes
    dx, the query's and the online weights' gradients: x is read twice in all. The anchor's weights
    are read once.
    """
    dim, tokens = dims["D"], dims["T"]
    x = n * dim
    trainable = tokens * (4 * dim * dim + 6 * dim) + tokens * dim
    anchor = tokens * (2 * dim * dim + 2 * dim)
    outputs = tokens * dim + 1
    forward = x + trainable + anchor + outputs
    backward_only = x + trainable + outputs + x + trainable
    return itemsize * (forward + backward_only if backward else forward)


def reference_pool(x, query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias):
    """LiteMIL's pooling in plain PyTorch, keys and values formed: ``(B, 1, D)``; shapes as in the module doc."""
    heads, head_dim = in_proj_bias.shape[1:]
    (wq, wk, wv), (bq, bk, bv) = in_proj_weight.chunk(3), in_proj_bias.flatten(1)
    q = F.linear(query[0], wq, bq).reshape(heads, head_dim)
    k = F.linear(x, wk, bk).unflatten(-1, (heads, head_dim))
    v = F.linear(x, wv, bv).unflatten(-1, (heads, head_dim))
    weights = (torch.einsum("hd,bnhd->bhn", q, k) * head_dim ** -0.5).softmax(-1)
    out = torch.einsum("bhn,bnhd->bhd", weights, v).reshape(x.shape[0], 1, -1)
    return F.linear(out, out_proj_weight, out_proj_bias)


@functools.cache
def _mha_module(cls: type, dim: int, heads: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``cls(D, H, batch_first=True)``, whose forward :func:`_mha_pool` runs on the inputs' weights."""
    return cls(dim, heads, batch_first=True).to(device=device, dtype=dtype)


def _mha_pool(cls: type, x, query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, process_group=None):
    """``cls``'s forward from the learned query to the bag ``x: (1, N, D)``: ``(1, 1, D)`` (with a
    ``process_group``, milkernels' module, sequence parallel: ``x`` is this rank's shard)."""
    module = _mha_module(cls, x.shape[-1], in_proj_bias.shape[1], x.dtype, x.device)
    if process_group is not None:
        module.process_group = process_group
    state = {"in_proj_weight": in_proj_weight, "in_proj_bias": in_proj_bias.flatten(),
             "out_proj.weight": out_proj_weight, "out_proj.bias": out_proj_bias}
    return functional_call(module, state, (query, x, x), {"need_weights": False})[0]


def litemil_pool(*inputs, process_group=None):
    """:class:`milkernels.nn.query_attention.MultiheadAttention` on the inputs (imported on the first call)."""
    from ..nn.query_attention import MultiheadAttention

    return _mha_pool(MultiheadAttention, *inputs, process_group=process_group)


def build_pool(n: int, dims: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """The ``litemil_pool`` inputs for one bag of ``n`` instances (module doc), all with ``requires_grad``."""
    dim, heads = dims["D"], dims["H"]
    generator = torch.Generator(device=device).manual_seed(n)
    shapes_scales = (((1, n, dim), 1.0), ((1, 1, dim), 1.0), ((3 * dim, dim), dim ** -0.5),
                     ((3, heads, dim // heads), 0.1), ((dim, dim), dim ** -0.5), ((dim,), 0.1))
    return tuple(_randn(generator, shape, scale, dtype, device) for shape, scale in shapes_scales)


def pool_flops(n: int, dims: dict, backward: bool) -> int:
    """Matmul FLOPs of ``litemil_pool``: ``4·N·D·H + 8·D² + 2·D`` forward, 3 × that with the backward."""
    dim, heads = dims["D"], dims["H"]
    forward = 4 * n * dim * heads + _module_flops(dim)
    return 3 * forward if backward else forward


def pool_min_bytes(n: int, dims: dict, itemsize: int, backward: bool) -> int:
    """Fewest bytes of ``litemil_pool``: x, the query and the weights in, the pooled ``(1, D)`` out; the
    backward reads them and the output gradient again and writes their gradients."""
    dim = dims["D"]
    x, out = n * dim, dim
    weights = 4 * dim * dim + 4 * dim + dim
    forward = x + weights + out
    backward_only = x + weights + out + x + weights
    return itemsize * (forward + backward_only if backward else forward)


ASMIL_STEP = register(Op(
    name="asmil_step",
    call=anchored_step,
    reference=reference_step,
    build=build_step,
    flops=step_flops,
    min_bytes=step_min_bytes,
    gpu_dims={"D": 512, "T": 8, "H": 8},
    cpu_dims={"D": 64, "T": 4, "H": 4},
    peers={"online_only": lambda op: functools.partial(anchored_step, with_anchor=False)},
))

LITEMIL_POOL = register(Op(
    name="litemil_pool",
    call=litemil_pool,
    reference=reference_pool,
    build=build_pool,
    flops=pool_flops,
    min_bytes=pool_min_bytes,
    gpu_dims={"D": 256, "H": 4},
    cpu_dims={"D": 64, "H": 4},
    peers={"torch_mha": lambda op: functools.partial(_mha_pool, nn.MultiheadAttention)},
))
