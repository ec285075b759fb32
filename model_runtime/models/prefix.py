"""P-tuning v2 (every GLM family): learnt keys and values in front of every layer's attention.

The original ChatGLM-6B / ChatGLM2 / ChatGLM3 code keeps a `transformer.prefix_encoder` whose
`pre_seq_len` rows, viewed as [pre_seq_len, num_layers * 2, kv_heads, head_dim], are every layer's
prefix keys (2i) and values (2i + 1). They sit in front of the sequence's own keys and values as a
"past", so: no rotary on them, every query sees them (ChatGLM-6B's bidirectional prompt mask and the
causal mask only cover the sequence's own columns), and the sequence's positions still start at 0.
They are not part of the KV cache: a slot holds only its own tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .embedding import unfilled_embedding


class PrefixEncoder(nn.Module):
    """pre_seq_len learnt rows -> every layer's prefix keys and values [P, layers * 2 * kv_heads * head_dim].

    With prefix_projection the rows pass through the original's two-layer MLP, and the width of
    the rows it takes is where the families differ: `projected_width` (ChatGLM-6B: hidden_size),
    by default full key/value rows (ChatGLM2/3)."""

    def __init__(self, config, projected_width: Optional[int] = None):
        super().__init__()
        kv_size = config.num_layers * 2 * config.kv_heads * config.head_dim
        self.prefix_projection = config.prefix_projection
        if config.prefix_projection:
            width = projected_width or kv_size
            self.embedding = unfilled_embedding(config.pre_seq_len, width)
            self.trans = nn.Sequential(nn.Linear(width, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, kv_size))
        else:
            self.embedding = unfilled_embedding(config.pre_seq_len, kv_size)

    def forward(self) -> torch.Tensor:
        rows = self.embedding.weight
        return self.trans(rows) if self.prefix_projection else rows


def prefix_layers(rows: torch.Tensor, config) -> torch.Tensor:
    """The encoder's rows [P, layers * 2 * kv_heads * d] as [layers * 2, kv_heads, P, d], the
    original's `get_prompt` layout (layer i's keys at 2i, its values at 2i + 1)."""
    return rows.view(config.pre_seq_len, config.num_layers * 2, config.kv_heads, config.head_dim).permute(1, 2, 0, 3)


def with_prefix(prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]], keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's keys and values [B, heads, kv_len, d] and mask [B, 1, T, kv_len] with the
    prefix's [1, heads, P, d] in front, visible to every query (unchanged without a prefix)."""
    if prefix_kv is None:
        return keys, values, mask
    batch = keys.shape[0]
    prefix_k, prefix_v = (t.expand(batch, -1, -1, -1) for t in prefix_kv)
    visible = mask.new_ones(mask.shape[:-1] + (prefix_k.shape[2],))
    return (torch.cat([prefix_k, keys], dim=2), torch.cat([prefix_v, values], dim=2),
            torch.cat([visible, mask], dim=-1))
