"""Non-causal linear attention in plain PyTorch: the oracle for the kernels and the CPU path.

Packed rows ``qkv: (T, 3C)`` hold ``[q | k | v]`` with the H heads of size dh = C / H contiguous in
each. Per bag and head h, with phi the feature map (activation):

    q = phi(q), k = phi(k)                 masked rows: k = 0, v = 0 (they are not keys)
    S_h = tau_h * sum_m k_m v_m^T          (dh, dh);  z_h = sum_m k_m  (dh,)
    numerator_n = q_n S_h
    out_n = numerator_n / max(q_n . z_h, clamp_min)      "clamp" (Lin-MIL), or
    out_n = numerator_n / (q_n . z_h + eps)              "eps" (the standard normalized form)
    map_n = mean over h and d of numerator_n = q_n . mean_d(S_h), averaged over h

Outputs at masked rows are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
}


def linear_attention(qkv, bags, num_heads, activation="relu", temperature=None, denominator="clamp",
                     clamp_min=100.0, eps=1e-6, sum_shards=None):
    """``(out: (T, C), numerator: (T, H, dh), attention_map: (T,))`` for the packed rows of ``bags``.

    ``temperature: (H,)`` or None (1); ``denominator`` is ``"clamp"`` or ``"eps"``. ``sum_shards`` (sequence
    parallelism) sums the per-bag states ``(B, H, dh + 1, dh)`` (S, then z) over the ranks, differentiably.
    """
    total, width = qkv.shape
    head_dim = width // 3 // num_heads
    q, k, v = qkv.reshape(total, 3, num_heads, head_dim).transpose(0, 2).unbind(1)  # each (H, T, dh)
    phi = ACTIVATIONS[activation]
    q, k = phi(q), phi(k)
    if bags.row_valid is not None:
        k = torch.where(bags.row_valid[:, None], k, 0.0)
        v = torch.where(bags.row_valid[:, None], v, 0.0)
    tau = temperature.reshape(num_heads, 1, 1) if temperature is not None else 1.0
    spans = list(zip(bags.bounds[:-1], bags.bounds[1:]))
    states = [torch.cat([tau * (k[:, start:stop].transpose(1, 2) @ v[:, start:stop]),  # (H, dh, dh)
                         k[:, start:stop].sum(1)[:, None]], dim=1) for start, stop in spans]
    states = torch.stack(states)  # (B, H, dh + 1, dh)
    if sum_shards is not None:
        states = sum_shards(states)
    numerator = torch.cat([q[:, start:stop] @ state[:, :head_dim] for (start, stop), state in zip(spans, states)],
                          dim=1)
    q_dot_z = torch.cat([q[:, start:stop] @ state[:, head_dim, :, None] for (start, stop), state in zip(spans, states)],
                        dim=1)  # (H, T, 1)
    denom = q_dot_z.clamp_min(clamp_min) if denominator == "clamp" else q_dot_z + eps
    out = numerator / denom
    if bags.row_valid is not None:
        out = torch.where(bags.row_valid[:, None], out, 0.0)
        numerator = torch.where(bags.row_valid[:, None], numerator, 0.0)
    numerator = numerator.transpose(0, 1)  # (T, H, dh)
    return out.transpose(0, 1).reshape(total, -1), numerator, numerator.mean(dim=(1, 2))
