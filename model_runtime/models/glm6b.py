"""ChatGLM-6B in plain PyTorch (see shared/docs/glm6b-spec.md).

One forward serves every use: a prompt prefill, one decode step for a batch, or a mix. Every row
of a batch lives in its own slot of a static, pre-allocated KV cache and says where its tokens go
(`cache_positions`), so rows of different lengths never need padding inside the cache, and the
serving engine can add and drop rows at any step.

The prompt, up to and including [gMASK], is a bidirectional prefix (`SequenceLayout.prefix_len`,
see `kv_cache.attention_mask`); positions are GLM's 2D ones. A P-tuning v2 prefix (`pre_seq_len`,
prefix.py) puts learnt keys and values in front of every attention call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import GLMModel
from .config import CheckpointError, ModelConfig
from .embedding import unfilled_embedding
from .kv_cache import LayerCache
from .prefix import PrefixEncoder


@dataclass(frozen=True)
class GLMConfig(ModelConfig):
    """The sizes and special ids of a ChatGLM-6B checkpoint (field names follow config.json)."""

    family: ClassVar[str] = "chatglm"
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                                                  "inner_hidden_size", "max_sequence_length")

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    inner_hidden_size: int
    max_sequence_length: int
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int
    gmask_token_id: int
    pad_token_id: int = 3
    layernorm_epsilon: float = 1e-5
    position_encoding_2d: bool = True
    torch_dtype: str = "float16"
    quantization_bit: int = 0
    quantization_embeddings: bool = False
    pre_seq_len: Optional[int] = None
    prefix_projection: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Every attention head has its own keys and values."""
        return self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @classmethod
    def _converted(cls, values: dict, raw: dict, source: str) -> dict:
        if raw.get("model_type", "chatglm") != "chatglm":
            raise CheckpointError(f"{source}: model_type {raw['model_type']!r} is not a ChatGLM model")
        return values

    def _check(self, source: str) -> None:
        super()._check(source)
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise CheckpointError(
                f"{source}: hidden_size {self.hidden_size} must split into {self.num_attention_heads} "
                "heads whose size is a multiple of 4 (two rotary halves)")
        if not self.position_encoding_2d:
            raise CheckpointError(f"{source}: only position_encoding_2d=true ChatGLM-6B checkpoints are supported")


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


class RotaryEmbedding2D(nn.Module):
    """GLM's 2D rotary: half of each head rotates with the position, half with the block position."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.rotary_dim = head_dim // 2

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Made per forward (a few elements), not kept as a buffer: a buffer made as `GLMModel.empty`
        makes models, on the meta device, would need remaking, and arange there imports
        torch._dynamo (1.5 s of every start)."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        # The checkpoint was trained with inv_freq rounded to float16; keep that rounding.
        return (1.0 / 10000 ** exponents).half().float()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, 2, T] -> cos, sin [B, T, 1, head_dim] (both halves side by side), laid out
        for `apply_rotary` (made once per forward, used by every layer): sin negated on the first
        half of each rotary_dim-wide chunk."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq(positions.device)  # [B, 2, T, d/4]
        angles = torch.cat([angles, angles], dim=-1)  # [B, 2, T, rotary_dim]
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)[:, :, None]  # [B, T, 1, head_dim]
        sin = angles.sin().to(dtype).unflatten(-1, (-1, 2, self.rotary_dim // 2))
        signs = torch.tensor([-1.0, 1.0], dtype=dtype, device=sin.device)[:, None]
        return angles.cos().to(dtype), (sin * signs).flatten(-3)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate each rotary_dim-wide chunk of x [..., head_dim] by halves (not pairs): x * cos +
    the chunk's halves swapped * signed sin (`RotaryEmbedding2D.cos_sin`), four kernels with the
    reference's roundings (x * cos + [-second half, first half] * sin)."""
    return x * cos + x.unflatten(-1, (-1, 2, rotary_dim // 2)).flip(-2).flatten(-3) * sin


class Attention(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        # P-tuning v2: keys and values [1, heads, pre_seq_len, head_dim] seen by every query.
        self.prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def project(self, x, cos, sin):
        """Rotated queries and keys, and values, [B, T, heads, head_dim] each: queries and keys
        rotate in one go."""
        batch, length, _ = x.shape
        # Rows are packed per head as q_h | k_h | v_h.
        qkv = self.query_key_value(x).view(batch, length, self.heads, 3, self.head_dim)
        qk = apply_rotary(qkv[..., :2, :], cos[..., None, :], sin[..., None, :], self.head_dim // 2)
        return qk[..., 0, :], qk[..., 1, :], qkv[..., 2, :]

    def attend(self, q, mask, slots, cache: LayerCache):
        """Attention of the rotated queries to the cache (keys already written), projected back."""
        out = cache.read(q, slots, mask, self.prefix_kv)
        return self.dense(out.reshape(q.shape[0], q.shape[1], -1))


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
        normed, q = self.write_keys(x, cos, sin, slots, cache_positions, cache)
        return self.finish(x, normed, q, mask, slots, cache)

    def write_keys(self, x, cos, sin, slots, cache_positions, cache: LayerCache):
        """The block's first part, apart so that a prompt read a layer at a time (serving/layerwise.py)
        can write every key before any query reads them: (normed input, rotated queries)."""
        normed = self.input_layernorm(x)
        q, k, v = self.attention.project(normed, cos, sin)
        cache.write(k, v, slots, cache_positions)
        return normed, q

    def finish(self, x, normed, q, mask, slots, cache: LayerCache):
        """The rest: attention to the cache, MLP. GLM's residual adds the *normed* input, scaled by alpha."""
        x = normed * self.alpha + self.attention.attend(q, mask, slots, cache)
        normed = self.post_attention_layernorm(x)
        return normed * self.alpha + self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = unfilled_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if config.pre_seq_len:  # P-tuning v2; ChatGLM-6B's projection MLP takes hidden_size rows
            self.prefix_encoder = PrefixEncoder(config, projected_width=config.hidden_size)


class ChatGLMModel(GLMModel):
    """ChatGLM-6B. Parameter names match the official checkpoint (`transformer.*`, `lm_head`)."""

    causal = False  # the prompt is a bidirectional prefix: no KV reuse across turns
    tied_lm_head = True

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.transformer = Transformer(config)
        self.rotary = RotaryEmbedding2D(config.head_dim)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight  # tied

    def _after_to_empty(self, device: torch.device) -> None:
        self.lm_head.weight = self.transformer.word_embeddings.weight  # to_empty unties

    def layout_for_prompt(self, prompt: list[int]) -> SequenceLayout:
        return layout_for_prompt(prompt, self.config)
