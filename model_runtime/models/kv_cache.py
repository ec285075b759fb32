"""What attention reads besides the new tokens: the static, pre-allocated KV cache of every layer
(slots of a fixed length, owned by whoever decodes) and which of its columns a query may see.

Visibility follows GLM's rule for one sequence: a query at cache position p sees column j when
j < prefix_len (ChatGLM-6B's bidirectional prompt, up to and including [gMASK]) or j <= p
(causal); the causal models have prefix_len 0, so the rule reduces to a causal mask.
"""
from __future__ import annotations

import torch


def attention_mask(prefix_lens: torch.Tensor, cache_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean visibility [B, 1, T, kv_len] for queries at cache_positions [B, T]."""
    columns = torch.arange(kv_len, device=cache_positions.device)
    causal = columns <= cache_positions[:, :, None]
    prefix = columns < prefix_lens.to(cache_positions.device)[:, None, None]
    return (causal | prefix)[:, None]


class LayerCache:
    """One layer's keys and values of every slot: [slots, heads, max_len, head_dim] each."""

    def __init__(self, shape: tuple[int, ...], dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, slots: torch.Tensor, cache_positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, heads, d] at (slot, position) and return the first kv_len columns of
        the rows' caches as [B, heads, kv_len, d]."""
        rows = slots[:, None]
        self.k[rows, :, cache_positions] = k
        self.v[rows, :, cache_positions] = v
        # index_select on the kv_len-column view copies only what attention reads (plain
        # advanced indexing is several times slower on CPU).
        return (self.k[:, :, :kv_len].index_select(0, slots), self.v[:, :, :kv_len].index_select(0, slots))


class KVCache:
    """The static, pre-allocated KV cache of every layer: `slots` rows of up to `max_len` tokens.

    It belongs to whoever decodes (a `serving.decode_batch.DecodeBatch`), not to the model: the model's
    forward reads and writes the cache it is given, in place, so that the serving engine and a
    `model.chat` on the same weights never touch each other's keys and values."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.slots, self.max_len = slots, max_len
        self.layers = [LayerCache((slots, heads, max_len, head_dim), dtype, device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
