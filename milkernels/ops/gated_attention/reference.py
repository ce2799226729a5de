"""Gated attention pooling in plain PyTorch: the oracle for the kernels and the CPU path.

For packed bags (rows ``x: (T, L)``, bag boundaries ``cu_seqlens: (B + 1,)``) and K heads:

    a = tanh(x Wa^T + ba)            (T, D), then dropout
    b = sigmoid(x Wb^T + bb)         (T, D), then dropout; b = 1 when ungated (wb is None)
    s = (a * b) Wc^T + bc            (T, K), the raw scores
    A = softmax of s over the rows of each bag, per head; masked rows get weight 0
    pooled[bag] = A[bag]^T x[bag]    (B, K, L)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_scores(x, wa, ba, wb, bb, wc, bc, dropout_p=0.0, training=True, dropout_masks=None):
    """Raw scores ``s: (T, K)`` of rows ``x: (T, L)``.

    ``wa, wb: (D, L)``, ``ba, bb: (D,)``, ``wc: (K, D)``, ``bc: (K,)``; ``wb = None`` is the ungated
    form (b = 1); a bias may be None. Dropout follows ``torch.nn.functional.dropout`` unless
    ``dropout_masks = (keep_a, keep_b)``, boolean ``(T, D)`` masks, replace its random draw.
    """
    a = torch.tanh(F.linear(x, wa, ba))
    b = torch.sigmoid(F.linear(x, wb, bb)) if wb is not None else None
    if dropout_p > 0 and training:
        if dropout_masks is None:
            a = F.dropout(a, dropout_p)
            b = F.dropout(b, dropout_p) if b is not None else None
        else:
            a = a * dropout_masks[0] / (1 - dropout_p)
            b = b * dropout_masks[1] / (1 - dropout_p) if b is not None else None
    gated = a * b if b is not None else a
    return F.linear(gated, wc, bc)


def _bag_exponentials(scores, bag_index, num_bags, row_valid):
    """``(bag_max: (B, K), weights: (T, K), bag_sum: (B, K))``: ``weights = exp(scores - bag_max)`` summed per bag,
    with rows where ``row_valid`` is False left out; a bag with no valid row has max 0 and sum 0."""
    if row_valid is not None:
        scores = scores.masked_fill(~row_valid[:, None], float("-inf"))
    index = bag_index[:, None].expand_as(scores)
    fill = torch.full((num_bags, scores.shape[1]), float("-inf"), dtype=scores.dtype, device=scores.device)
    bag_max = fill.scatter_reduce(0, index, scores.detach(), "amax").nan_to_num(neginf=0.0)
    weights = torch.exp(scores - bag_max[bag_index])
    return bag_max, weights, torch.zeros_like(fill).scatter_add(0, index, weights)


def segment_softmax(scores, bag_index, num_bags, row_valid=None):
    """Softmax of ``scores: (T, K)`` over the rows of each bag; ``bag_index: (T,)`` names each row's bag.

    Rows where ``row_valid: (T,)`` is False get weight 0. A bag with no valid row gets NaN (0 / 0).
    """
    _, weights, bag_sum = _bag_exponentials(scores, bag_index, num_bags, row_valid)
    return weights / bag_sum[bag_index]


def segment_logsumexp(scores, bag_index, num_bags, row_valid=None):
    """``(B, K)``: the log of the sum of ``exp(scores)`` over each bag's valid rows; -inf for a bag without one."""
    bag_max, _, bag_sum = _bag_exponentials(scores, bag_index, num_bags, row_valid)
    return bag_max + torch.log(bag_sum)


def pool(x, weights, bag_index, num_bags, row_valid=None):
    """``pooled: (B, K, L)``, the sum over each bag's rows of ``weights: (T, K)`` times ``x: (T, L)``.

    Rows where ``row_valid`` is False are left out entirely, so their contents (NaN included) never
    reach the result.
    """
    if row_valid is not None:
        x = x.masked_fill(~row_valid[:, None], 0.0)
    empty = torch.zeros(num_bags, x.shape[1], dtype=x.dtype, device=x.device)
    heads = [empty.index_add(0, bag_index, weights[:, k, None] * x) for k in range(weights.shape[1])]
    return torch.stack(heads, dim=1)


def gated_attention_pool(x, wa, ba, wb, bb, wc, bc, bags, dropout_p=0.0, training=True, dropout_masks=None):
    """``(pooled: (B, K, L), scores: (T, K))`` for the packed rows of ``bags`` (see :mod:`milkernels.ops._bags`).

    One bag takes the direct PyTorch composition (softmax and a matmul), as a user would write it.
    """
    scores = gated_scores(x, wa, ba, wb, bb, wc, bc, dropout_p, training, dropout_masks)
    softmax_scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if bags.num_bags == 1 and bags.row_valid is None:
        weights = torch.softmax(softmax_scores, dim=0).to(scores.dtype)
        return (weights.t() @ x)[None], scores
    bag_index = bags.bag_index()
    weights = segment_softmax(softmax_scores, bag_index, bags.num_bags, bags.row_valid).to(scores.dtype)
    return pool(x, weights, bag_index, bags.num_bags, bags.row_valid), scores
