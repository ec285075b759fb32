"""What attention reads besides the new tokens: the static, pre-allocated KV cache of every layer
(slots of a fixed length, owned by whoever decodes) and which of its columns a query may see.

Visibility follows GLM's rule for one sequence: a query at cache position p sees column j when
j < prefix_len (ChatGLM-6B's bidirectional prompt, up to and including [gMASK]) or j <= p
(causal); the causal models have prefix_len 0, so the rule reduces to a causal mask.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .prefix import with_prefix


def attention_mask(prefix_lens: torch.Tensor, cache_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean visibility [B, 1, T, kv_len] for queries at cache_positions [B, T]."""
    columns = torch.arange(kv_len, device=cache_positions.device)
    causal = columns <= cache_positions[:, :, None]
    prefix = columns < prefix_lens.to(cache_positions.device)[:, None, None]
    return (causal | prefix)[:, None]


class LayerCache:
    """One layer's keys and values of every slot: [slots, kv_heads, max_len, head_dim] each.

    Attention reads it in place where it can. In a decode step (`decode_rows` set by the decode
    batch: each row's slot and length) every row attends to views of its own slot, so a step
    reads the keys and values its rows hold and copies nothing, whatever the other slots hold.
    Otherwise (a prefill, or a P-tuning prefix in front) the rows' first kv_len columns are
    gathered and attended to under the visibility mask."""

    def __init__(self, shape: tuple[int, ...], dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.decode_rows: Optional[Sequence[tuple[int, int]]] = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
               cache_positions: torch.Tensor, mask: torch.Tensor,
               prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Write k, v [B, T, kv_heads, d] at (slot, position), then attend q [B, T, heads, d] to
        the cache (mask [B, 1, T, kv_len] from `attention_mask`): [B, T, heads, d]."""
        rows = slots[:, None]
        self.k[rows, :, cache_positions] = k
        self.v[rows, :, cache_positions] = v
        if self.decode_rows is not None and prefix_kv is None:
            return self._attend_in_place(q, self.decode_rows)
        # index_select on the kv_len-column view copies only what attention reads (plain
        # advanced indexing is several times slower on CPU).
        kv_len = mask.shape[-1]
        keys, values = self.k[:, :, :kv_len].index_select(0, slots), self.v[:, :, :kv_len].index_select(0, slots)
        keys, values, mask = with_prefix(prefix_kv, keys, values, mask)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=keys.shape[1] != q.shape[2])
        return out.transpose(1, 2)

    def _attend_in_place(self, q: torch.Tensor, rows: Sequence[tuple[int, int]]) -> torch.Tensor:
        """One new token per row: it sees every cached column of its slot up to its own (GLM's
        bidirectional prefix lies before it too), so no mask is needed."""
        out = torch.empty_like(q)
        for row, (slot, kv_len) in enumerate(rows):
            keys, values = self.k[slot:slot + 1, :, :kv_len], self.v[slot:slot + 1, :, :kv_len]
            out[row] = F.scaled_dot_product_attention(q[row:row + 1].transpose(1, 2), keys, values,
                                                      enable_gqa=keys.shape[1] != q.shape[2])[0].transpose(0, 1)
        return out


class KVCache:
    """The static, pre-allocated KV cache of every layer: `slots` rows of up to `max_len` tokens.

    It belongs to whoever decodes (a `serving.decode_batch.DecodeBatch`), not to the model: the model's
    forward reads and writes the cache it is given, in place, so that the serving engine and a
    `model.chat` on the same weights never touch each other's keys and values."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.slots, self.max_len = slots, max_len
        self.layers = [LayerCache((slots, heads, max_len, head_dim), dtype, device) for _ in range(layers)]

    def set_decode_rows(self, rows: Optional[Sequence[tuple[int, int]]]) -> None:
        """(slot, length) of each row of the next forward when it decodes one token per row (its
        attention then reads each slot in place); None for any other forward."""
        for layer in self.layers:
            layer.decode_rows = rows

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
