"""The ChatGLM-6B network in plain PyTorch (see shared/docs/glm6b-spec.md).

One forward serves every use: a prompt prefill, one decode step for a batch, or a mix. Every row
of a batch lives in its own slot of a static, pre-allocated KV cache and says where its tokens go
(`cache_positions`), so rows of different lengths never need padding inside the cache, and the
serving engine can add and drop rows at any step.

Attention visibility follows GLM's rule for one sequence: a query at cache position p sees column j
when j < prefix_len (the bidirectional prompt, up to and including [gMASK]) or j <= p (causal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import GLMConfig


@dataclass(frozen=True)
class SequenceLayout:
    """Where GLM puts a prompt's tokens: 2D positions and the bidirectional prefix.

    For prompt `t1..tn [gMASK] <sop>`: prefix_len is the index of <sop> (everything before it is
    seen bidirectionally) and mask_pos the index of [gMASK]; tokens from <sop> on share position
    mask_pos and count up in the second (block) dimension.
    """

    prefix_len: int
    mask_pos: int

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Positions [2, end - start] of the tokens at sequence indices start..end-1."""
        index = torch.arange(start, end)
        in_prefix = index < self.prefix_len
        first = torch.where(in_prefix, index, torch.full_like(index, self.mask_pos))
        block = torch.where(in_prefix, torch.zeros_like(index), index - self.prefix_len + 1)
        return torch.stack([first, block])


def layout_for_prompt(prompt: list[int], config: GLMConfig) -> SequenceLayout:
    """Find [gMASK] (or [MASK]) and <sop> in an encoded prompt."""
    mask_id = config.gmask_token_id if config.gmask_token_id in prompt else config.mask_token_id
    if mask_id not in prompt or config.bos_token_id not in prompt:
        raise ValueError("a ChatGLM-6B prompt must contain [gMASK] (or [MASK]) and <sop>: "
                         "encode it with add_special_tokens=True")
    return SequenceLayout(prefix_len=prompt.index(config.bos_token_id), mask_pos=prompt.index(mask_id))


def attention_mask(prefix_lens: torch.Tensor, cache_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean visibility [B, 1, T, kv_len] for queries at cache_positions [B, T]."""
    columns = torch.arange(kv_len, device=cache_positions.device)
    causal = columns <= cache_positions[:, :, None]
    prefix = columns < prefix_lens.to(cache_positions.device)[:, None, None]
    return (causal | prefix)[:, None]


class RotaryEmbedding2D(nn.Module):
    """GLM's 2D rotary: half of each head rotates with the position, half with the block position."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.rotary_dim = head_dim // 2
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        # The checkpoint was trained with inv_freq rounded to float16; keep that rounding.
        inv_freq = (1.0 / 10000 ** exponents).half().float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, 2, T] -> cos, sin [B, T, 1, head_dim] (both halves side by side)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, 2, T, d/4]
        angles = torch.cat([angles, angles], dim=-1)  # [B, 2, T, rotary_dim]
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)[:, :, None]  # [B, T, 1, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate each rotary_dim-wide chunk of x [B, T, heads, head_dim] by halves (not pairs)."""
    chunks = x.unflatten(-1, (-1, 2, rotary_dim // 2))  # [..., chunk, half, d/4]
    rotated = torch.stack([-chunks[..., 1, :], chunks[..., 0, :]], dim=-2).flatten(-3)
    return x * cos + rotated * sin


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

    It belongs to whoever decodes (a `generate.DecodeBatch`), not to the model: the model's
    forward reads and writes the cache it is given, in place, so that the serving engine and a
    `model.chat` on the same weights never touch each other's keys and values."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.slots, self.max_len = slots, max_len
        self.layers = [LayerCache((slots, heads, max_len, head_dim), dtype, device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)


class Attention(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, mask, slots, cache_positions, cache: LayerCache):
        batch, length, _ = x.shape
        # Rows are packed per head as q_h | k_h | v_h.
        q, k, v = self.query_key_value(x).view(batch, length, self.heads, 3 * self.head_dim).chunk(3, dim=-1)
        q = apply_rotary(q, cos, sin, self.head_dim // 2)
        k = apply_rotary(k, cos, sin, self.head_dim // 2)
        keys, values = cache.update(slots, cache_positions, k, v, mask.shape[-1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


# The original code's GLMBlock takes num_layers=28 as a default argument that its model never
# overrides, so every checkpoint, whatever its depth, scales residuals by sqrt(2 * 28). Using the
# config's depth instead would change every model that is not 28 layers deep.
RESIDUAL_SCALE = math.sqrt(2 * 28)


class Block(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.alpha = RESIDUAL_SCALE
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, slots, cache_positions, cache: LayerCache):
        # GLM's residual adds the *normed* input, scaled by alpha.
        normed = self.input_layernorm(x)
        x = normed * self.alpha + self.attention(normed, cos, sin, mask, slots, cache_positions, cache)
        normed = self.post_attention_layernorm(x)
        return normed * self.alpha + self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLMModel(nn.Module):
    """ChatGLM-6B. Parameter names match the official checkpoint (`transformer.*`, `lm_head`)."""

    causal = False  # the prompt is a bidirectional prefix: no KV reuse across turns

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.rotary = RotaryEmbedding2D(config.head_dim)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight  # tied

    @classmethod
    def empty(cls, config: GLMConfig, device: torch.device, dtype: torch.dtype,
              quantize: Optional[int] = None, quant_backend: str = "auto") -> "ChatGLMModel":
        """An uninitialised model allocated straight in dtype on device (no float32 detour), for
        the loader to fill tensor by tensor. With quantize=4|8 the blocks' Linear layers are empty
        QuantizedLinear modules (see quant.py) that quantize float weights as they arrive."""
        with torch.device("meta"):
            model = cls(config).to(dtype)
        if quantize:
            from .quant import replace_linears
            replace_linears(model, quantize, device, quant_backend)
        model.to_empty(device=device)
        model.lm_head.weight = model.transformer.word_embeddings.weight  # to_empty unties
        model.rotary = RotaryEmbedding2D(config.head_dim).to(device)  # buffers are not in checkpoints
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.final_layernorm.weight.dtype

    def quantize(self, bits: int, backend: str = "auto") -> "ChatGLMModel":
        """Quantize the blocks' Linear layers to INT8 or INT4 in place, as in the seed's
        `model.quantize(bits)`; returns the model (see quant.py)."""
        from .quant import quantize_model
        return quantize_model(self, bits, backend)

    def layout_for_prompt(self, prompt: list[int]) -> SequenceLayout:
        return layout_for_prompt(prompt, self.config)

    def new_kv_cache(self, slots: int, max_len: int) -> KVCache:
        """A static KV cache for `slots` sequences of up to max_len tokens (at most the model's
        maximum sequence length), for the caller to pass to `forward`."""
        return KVCache(self.config.num_layers, slots, self.config.num_attention_heads,
                       min(max_len, self.config.max_sequence_length), self.config.head_dim, self.dtype, self.device)

    def kv_cache_bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.config.num_layers * self.config.hidden_size * element

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache_positions: torch.Tensor,
                mask: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (apply `lm_head` for logits).

        tokens [B, T]; positions [B, 2, T]; cache_positions [B, T]: where each token's key and value
        go in its slot; mask [B, 1, T, kv_len] from `attention_mask`; slots [B]: cache row per row
        of `cache` (from `new_kv_cache`), which is written in place.
        """
        x = self.transformer.word_embeddings(tokens)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, layer_cache in zip(self.transformer.layers, cache.layers, strict=True):
            x = layer(x, cos, sin, mask, slots, cache_positions, layer_cache)
        return self.transformer.final_layernorm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for hidden states (only the rows the caller needs: lm_head is large)."""
        return self.lm_head(hidden).float()

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """The seed's `response, history = model.chat(tokenizer, query, history, ...)`."""
        from .chat import chat
        return chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        """The seed's `for response, history in model.stream_chat(tokenizer, query, history, ...)`."""
        from .chat import stream_chat
        return stream_chat(self, tokenizer, query, history, **kwargs)
