"""Causal softmax attention with rotary position embeddings, full or sliding-window, with a KV cache; grouped-query
attention (Llama 2/3) when keys and values have fewer heads than queries.

The Transformer++ token mixer (Llama-style) and Hope-Attention's mixer (paper §8.3: "replace the self-modifying
Titans with softmax global attention"). Attention is the non-parametric level of period 1 (paper §7).

    b batch, h query heads, g key-value heads, t new tokens, s cached + new tokens, d head width
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AttentionConfig

__all__ = ["Attention", "rope"]


def rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary position embedding (RoFormer), rotating pairs (x_i, x_{i+d/2}). x: (b, h, t, d); positions: (t,)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) / (d // 2))  # (d/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (t, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head causal attention through `scaled_dot_product_attention`.

    State: {"k": (b, g, s, d), "v": (b, g, s, d), "pos": int}, the keys and values seen so far (the last `window`
    of them for sliding-window attention, so that decoding memory stays constant) and the next position.
    `qkv` is one projection whose output is [q (h·d) | k (g·d) | v (g·d)]; query head i reads key-value head
    i // (h / g), as Llama's `repeat_kv`.
    """

    def __init__(self, dim: int, num_heads: int, config: AttentionConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.config = num_heads, dim // num_heads, config
        self.kv_heads = config.kv_heads or num_heads
        self.qkv = nn.Linear(dim, (num_heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        empty = torch.zeros(batch_size, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def forward(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        b, t, _ = x.shape
        h, g, d = self.num_heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([h * d, g * d, g * d], dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)  # (b, h, t, d)
        k, v = k.view(b, t, g, d).transpose(1, 2), v.view(b, t, g, d).transpose(1, 2)  # (b, g, t, d)
        pos0 = state["pos"]
        positions = torch.arange(pos0, pos0 + t, device=x.device)
        q, k = rope(q, positions, self.config.rope_base), rope(k, positions, self.config.rope_base)
        k_all = torch.cat([state["k"], k], dim=2)  # (b, h, s, d)
        v_all = torch.cat([state["v"], v], dim=2)
        s = k_all.shape[2]
        window = self.config.window
        gqa = {"enable_gqa": True} if g != h else {}
        if s == t and window is None:
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, **gqa)
        else:
            # query i sits at position pos0 + i, key j at pos0 + t − s + j; allow key ≤ query (and within window)
            qpos = positions[:, None]
            kpos = torch.arange(pos0 + t - s, pos0 + t, device=x.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, **gqa)
        if window is not None:  # the next token sees at most window − 1 earlier ones: keep only those
            keep = max(0, s - (window - 1))
            k_all, v_all = k_all[:, :, keep:], v_all[:, :, keep:]
        y = y.transpose(1, 2).reshape(b, t, -1)  # (b, t, h·d)
        return self.proj(y), {"k": k_all, "v": v_all, "pos": pos0 + t}
