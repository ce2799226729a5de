"""Learnable-query attention (LiteMIL, ASMIL) in plain PyTorch: the oracle for the kernels and the CPU path.

For packed bags (rows ``x: (T, Ein)``, see :mod:`milkernels.ops._bags`), projected queries ``q: (Q, E)``
(one set for all bags, or one per bag), H heads of ``dh = E / H`` and a temperature ``tau``:

    k = x Wk^T + bk,  v = x Wv^T + bv                 (T, E), split into heads (T, H, dh)
    s[h, q, n] = q_h . k_h[n] / sqrt(dh)              the logits
    p = softmax or NSF of s / tau over the rows n of each bag, per (h, q); masked rows get weight 0;
        NSF(z)[n] = sigmoid(z[n]) / (sum_m sigmoid(z[m]) + 1e-8); then dropout on p
    out[q, h] = sum_n p[h, q, n] v_h[n]               (Q, E)

The folded form gives the same numbers without forming k or v. Column ``j = h * Q + q``:

    u[j] = Wk_h^T q_h / (sqrt(dh) tau),  c[j] = q_h . bk_h / (sqrt(dh) tau)     (J, Ein), (J,)
    z = x u^T + c = s / tau                                                      (T, J)
    pooled[j] = sum_n p[n, j] x[n],  mass[j] = sum_n p[n, j]                      (J, Ein), (J,)
    out[q, h] = Wv_h pooled[j] + bv_h mass[j]

:func:`folded_attention` computes ``(pooled, mass, z)``; its columns from ``nsf_from`` on use NSF (the
others softmax) and only the first ``num_pooled`` columns are pooled (the rest are scores only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..gated_attention.reference import segment_logsumexp, segment_softmax

NSF_EPS = 1e-8


def fold_queries(query, wk, bk, num_heads: int, temperature: float):
    """The folded queries ``u: (Bq, J, Ein)`` and offsets ``c: (Bq, J)`` of ``query: (Bq, Q, E)``.

    ``wk: (E, Ein)``, ``bk: (E,)`` or None; column ``j = h * Q + q``; both are divided by
    ``sqrt(dh) * temperature``.
    """
    batch, count, width = query.shape
    head_dim = width // num_heads
    scale = 1.0 / (math.sqrt(head_dim) * temperature)
    heads = query.reshape(batch, count, num_heads, head_dim).transpose(1, 2)          # (Bq, H, Q, dh)
    u = torch.einsum("bhqd,hde->bhqe", heads, wk.reshape(num_heads, head_dim, -1)) * scale
    if bk is None:
        c = torch.zeros(batch, num_heads, count, dtype=query.dtype, device=query.device)
    else:
        c = torch.einsum("bhqd,hd->bhq", heads, bk.reshape(num_heads, head_dim)) * scale
    return u.reshape(batch, num_heads * count, -1), c.reshape(batch, num_heads * count)


def unfold_values(pooled, mass, wv, bv, num_heads: int):
    """``out: (B, Q, E)`` from ``pooled: (B, J, Ein)`` and ``mass: (B, J)``; ``wv: (E, Ein)``, ``bv: (E,)`` or None."""
    batch, columns, _ = pooled.shape
    count = columns // num_heads
    head_dim = wv.shape[0] // num_heads
    heads = pooled.reshape(batch, num_heads, count, -1)
    out = torch.einsum("bhqe,hde->bqhd", heads, wv.reshape(num_heads, head_dim, -1))
    if bv is not None:
        out = out + mass.reshape(batch, num_heads, count).transpose(1, 2)[..., None] * bv.reshape(num_heads, head_dim)
    return out.reshape(batch, count, num_heads * head_dim)


def _sigmoid_sums(z, bag_index, num_bags, row_valid):
    """``(sig: (T, J), sums: (B, J))``: ``sigmoid(z)`` (0 where ``row_valid`` is False) and its sum per bag."""
    sig = torch.sigmoid(z)
    if row_valid is not None:
        sig = sig.masked_fill(~row_valid[:, None], 0.0)
    return sig, torch.zeros(num_bags, z.shape[1], dtype=z.dtype, device=z.device).index_add(0, bag_index, sig)


def segment_nsf(z, bag_index, num_bags, row_valid=None):
    """NSF of ``z: (T, J)`` over the rows of each bag (``bag_index: (T,)``); rows where ``row_valid`` is False get 0."""
    sig, sums = _sigmoid_sums(z, bag_index, num_bags, row_valid)
    return sig / (sums + NSF_EPS)[bag_index]


def normalize(z, bags, nsf_from: int):
    """Attention weights ``p: (T, J)`` of ``z: (T, J)``: softmax over each bag's rows for columns before
    ``nsf_from``, NSF from there on; computed in at least float32."""
    work = z.to(torch.promote_types(z.dtype, torch.float32))
    bag_index = bags.bag_index()
    parts = [work[:, :0]]  # no column at all: (T, 0)
    if nsf_from > 0:
        parts.append(segment_softmax(work[:, :nsf_from], bag_index, bags.num_bags, bags.row_valid))
    if nsf_from < z.shape[1]:
        parts.append(segment_nsf(work[:, nsf_from:], bag_index, bags.num_bags, bags.row_valid))
    return torch.cat(parts, dim=1).to(z.dtype)


def log_normalizer(z, bags, nsf_from: int):
    """``lse: (B, J)`` of ``z: (T, J)`` over each bag's valid rows: ``log sum exp(z)`` for columns before
    ``nsf_from`` (-inf without a valid row), ``log(sum sigmoid(z) + 1e-8)`` from there on; at least float32."""
    work = z.to(torch.promote_types(z.dtype, torch.float32))
    bag_index = bags.bag_index()
    softmax = segment_logsumexp(work[:, :nsf_from], bag_index, bags.num_bags, bags.row_valid)
    _, sums = _sigmoid_sums(work[:, nsf_from:], bag_index, bags.num_bags, bags.row_valid)
    return torch.cat([softmax, torch.log(sums + NSF_EPS)], dim=1)


def weights_from_lse(z, lse, bags, nsf_from: int):
    """The weights ``p: (T, P)`` of ``z: (T, J)`` given each bag's ``lse: (B, P)`` (:func:`log_normalizer`'s, possibly
    over more rows than these): ``exp(z - lse)`` before ``nsf_from``, ``sigmoid(z) exp(-lse)`` after; masked rows 0."""
    work = z[:, :lse.shape[1]].to(lse.dtype)
    row_lse = lse[bags.bag_index()]
    nsf = torch.arange(lse.shape[1], device=z.device) >= nsf_from
    weights = torch.where(nsf, torch.sigmoid(work) * torch.exp(-row_lse), torch.exp(work - row_lse))
    return weights if bags.row_valid is None else weights.masked_fill(~bags.row_valid[:, None], 0.0)


def apply_dropout(weights, dropout_p: float, training: bool, keep=None):
    """Dropout on ``weights: (T, J)``: ``F.dropout``, or the boolean ``keep: (T, J)`` mask when given."""
    if dropout_p == 0 or not training:
        return weights
    if keep is None:
        return F.dropout(weights, dropout_p)
    return weights * keep / (1 - dropout_p)


def bag_rows(bags):
    """``(bag, first row, end row)`` of each bag, from the CPU boundaries."""
    bounds = bags.bounds
    return [(b, start, end) for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))]


def folded_attention(x, u, c, bags, nsf_from: int, num_pooled: int, dropout_p=0.0, training=True, keep=None):
    """``(pooled: (B, P, Ein), mass: (B, P), z: (T, J), weights: (T, P))`` in the folded form (module doc).

    ``x: (T, Ein)`` rows of ``bags``; ``u: (Bu, J, Ein)``, ``c: (Bu, J)`` with Bu = 1 (shared) or B;
    P = ``num_pooled``; dropout acts on the pooled columns' weights; ``keep: (T, P)`` replaces its draw.
    Masked rows are read as zeros: their z is c, with no gradient, so nothing of theirs reaches a result or a
    gradient.
    """
    x = mask_rows(x, bags)
    z = torch.cat([x[start:end] @ u[b % u.shape[0]].t() + c[b % u.shape[0]] for b, start, end in bag_rows(bags)])
    if bags.row_valid is not None:
        z = torch.where(bags.row_valid[:, None], z, z.detach())
    weights = apply_dropout(normalize(z[:, :num_pooled], bags, nsf_from), dropout_p, training, keep)
    pooled = torch.stack([weights[start:end].t() @ x[start:end] for _, start, end in bag_rows(bags)])
    mass = torch.stack([weights[start:end].sum(0) for _, start, end in bag_rows(bags)])
    return pooled, mass, z, weights


def mask_rows(x, bags):
    """``x: (T, Ein)`` with the masked rows of ``bags`` set to zero."""
    return x if bags.row_valid is None else x.masked_fill(~bags.row_valid[:, None], 0.0)


def query_attention_unfolded(x, query, wk, bk, wv, bv, num_heads, bags, normalization="softmax", temperature=1.0,
                             dropout_p=0.0, training=True, keep=None):
    """The definition, with k and v formed: ``(out: (B, Q, E), logits: (T, J), weights: (T, J))``.

    ``query: (Bq, Q, E)`` with Bq = 1 or B; ``keep: (T, J)`` replaces the dropout draw.
    """
    count, width = query.shape[1:]
    head_dim = width // num_heads
    x = mask_rows(x, bags)
    keys = F.linear(x, wk, bk).reshape(-1, num_heads, head_dim)
    values = F.linear(x, wv, bv).reshape(-1, num_heads, head_dim)
    logits = []
    for b, start, end in bag_rows(bags):
        heads = query[b % query.shape[0]].reshape(count, num_heads, head_dim)
        logits.append(torch.einsum("qhd,nhd->nhq", heads, keys[start:end]).reshape(end - start, -1) / math.sqrt(head_dim))
    logits = torch.cat(logits)
    nsf_from = 0 if normalization == "nsf" else logits.shape[1]
    weights = apply_dropout(normalize(logits / temperature, bags, nsf_from), dropout_p, training, keep)
    out = [torch.einsum("nhq,nhd->qhd", weights[start:end].reshape(-1, num_heads, count), values[start:end])
           for _, start, end in bag_rows(bags)]
    return torch.stack(out).reshape(bags.num_bags, count, width), logits, weights
