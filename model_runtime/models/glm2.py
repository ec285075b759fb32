"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat (one network) in plain PyTorch (see shared/docs/glm-family-spec.md).

The later GLM chat models share ChatGLM-6B's embedding, SDPA attention core, static KV-cache slots
(`kv_cache.KVCache`), sampling and generation loop; they differ where their checkpoints differ:

- pre-norm blocks with RMSNorm and plain residuals (no alpha scaling);
- grouped key/value heads (`multi_query_group_num`, 2): query head h reads group h // (heads / groups),
  so the cache holds only the groups' keys and values (16x smaller than ChatGLM-6B's);
- rotary position on the first half of each head's dims, on adjacent pairs, base 10000 * rope_ratio,
  plain positions 0..n-1;
- causal attention (no bidirectional prompt prefix), so a conversation's cache can be reused for its
  next turn: the layout's prefix_len is 0 and `kv_cache.attention_mask` reduces to a causal mask;
- a SwiGLU MLP and an untied output layer.

Parameter names match the published checkpoints (`transformer.embedding.*`, `transformer.encoder.*`,
`transformer.output_layer`). P-tuning v2 prefixes (`pre_seq_len`) are supported: their keys and
values sit in front of every attention call, always visible, without rotary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import GLMModel
from .config import CausalGLMConfig, CheckpointError
from .embedding import unfilled_embedding
from .kv_cache import LayerCache
from .prefix import PrefixEncoder

FAMILIES = ("chatglm2", "chatglm3", "glm4")


@dataclass(frozen=True)
class GLM2Config(CausalGLMConfig):
    """The sizes and ids of a ChatGLM2/ChatGLM3/GLM-4 checkpoint (field names follow config.json).

    `family` is not a field of the published config.json files: `loading.family.read_config` works it out
    from the checkpoint (see there); configs this runtime writes store it as `glm_family`. The
    properties below give the names the shared code (generation loop, engine, loader) uses for
    ChatGLM-6B's config."""

    FAMILIES: ClassVar[tuple[str, ...]] = FAMILIES
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("padded_vocab_size", "hidden_size", "num_layers",
                                                  "num_attention_heads", "ffn_hidden_size", "seq_length",
                                                  "multi_query_group_num")

    padded_vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    kv_channels: Optional[int] = None
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    eos_token_id: Union[int, tuple[int, ...]] = 2
    pad_token_id: int = 0
    rmsnorm: bool = True
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "float16"
    quantization_bit: int = 0
    quantization_embeddings: bool = False  # a ChatGLM-6B variant; never set by these checkpoints
    output_layer_bit: int = 0  # 8: output_layer stored INT8 (this runtime's save_quantized; quant.convert)
    pre_seq_len: Optional[int] = None
    prefix_projection: bool = False
    family: str = field(default="chatglm3", compare=True)

    # ---- names shared with GLMConfig ----------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.seq_length

    @property
    def inner_hidden_size(self) -> int:
        return self.ffn_hidden_size

    def parameter_counts(self) -> tuple[int, int]:
        """(parameters outside the blocks' Linear layers, parameters of those Linear layers): what
        the loader's memory check needs (only the latter are quantized)."""
        h, qkv = self.hidden_size, (self.num_attention_heads + 2 * self.kv_heads) * self.head_dim
        other = 2 * self.padded_vocab_size * h + self.num_layers * (2 * h + qkv) + h
        return other, self.num_layers * self.block_linear_parameters()

    # ---- reading and writing config.json --------------------------------------------------------

    @classmethod
    def _prepared(cls, raw: dict) -> dict:
        if "padded_vocab_size" not in raw and "vocab_size" in raw:
            raw = dict(raw, padded_vocab_size=raw["vocab_size"])
        return raw

    @classmethod
    def _converted(cls, values: dict, raw: dict, source: str) -> dict:
        values = super()._converted(values, raw, source)
        values["rope_ratio"] = float(values.get("rope_ratio", 1.0))
        return values

    def to_dict(self) -> dict:
        raw = super().to_dict()
        raw["glm_family"] = raw.pop("family")
        return raw

    def _check(self, source: str) -> None:
        super()._check(source)
        if self.head_dim % 4:
            raise CheckpointError(f"{source}: kv_channels {self.head_dim} must be a multiple of 4 (rotary pairs)")
        unsupported = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
                       "apply_residual_connection_post_layernorm": False, "original_rope": True}
        for name, wanted in unsupported.items():
            if getattr(self, name) != wanted:
                raise CheckpointError(f"{source}: {name}={getattr(self, name)!r} is not supported "
                                      f"(the published ChatGLM2/3 and GLM-4 checkpoints have {wanted})")
        if self.rope_ratio <= 0:
            raise CheckpointError(f"{source}: rope_ratio must be positive, got {self.rope_ratio!r}")


@dataclass(frozen=True)
class CausalLayout:
    """Positions of a causal GLM sequence: token i sits at position i. prefix_len 0 means 'no
    bidirectional prefix' to `kv_cache.attention_mask` (which then is plain causal)."""

    prefix_len: int = 0

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Positions [end - start] of the tokens at sequence indices start..end-1."""
        return torch.arange(start, end)


CAUSAL = CausalLayout()


class RMSNorm(nn.Module):
    """`w * x * rsqrt(mean(x^2) + eps)`, normalized in float32, returned in the input dtype.

    The references differ in one rounding: ChatGLM2/3 and GLM-4 multiply by the weight in float32
    and round the product; transformers' GLM ports (glm_hf.py, `round_before_weight`) round the
    normalized x to the input dtype first, then multiply (equal in float32)."""

    def __init__(self, size: int, eps: float, round_before_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.round_before_weight = round_before_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.round_before_weight:
            return self.weight * normed.to(x.dtype)
        return (normed * self.weight).to(x.dtype)  # the weight widens inside the product: no float32 copy of it


class RotaryEmbedding(nn.Module):
    """Rotary on the first `rotary_dim` of each head's `head_dim` dims, adjacent pairs, frequencies
    from `base`.

    theta_i = base^(-2i/rotary_dim) for i < rotary_dim / 2. ChatGLM2/3 and GLM-4 rotate half of
    each head (rotary_dim = head_dim / 2) with base 10000 * rope_ratio; transformers' GLM ports
    say the same with `partial_rotary_factor` and `rope_theta` (glm_hf.py). ChatGLM2's reference
    computes theta and the positions in float16 before their product (it ran the published
    float16 weights so); the others in float32. cos/sin are then rounded to the model's dtype,
    as in the references."""

    def __init__(self, rotary_dim: int, base: float = 10000.0, half_precision_angles: bool = False,
                 head_dim: Optional[int] = None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.head_dim = head_dim or rotary_dim
        self.base = base
        self.half_precision_angles = half_precision_angles

    def inv_freq(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=dtype, device=device) / self.rotary_dim
        return 1.0 / (self.base ** exponents)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, head_dim] in dtype, laid out for `apply_rotary_pairs`
        (made once per forward, used by every layer): pair i's cos at dims 2i and 2i+1, its sin
        negated at 2i; cos 1 and sin 0 on the dims past rotary_dim."""
        if self.half_precision_angles and dtype in (torch.float16, torch.bfloat16):
            angles = (positions.to(torch.float16)[..., None] * self.inv_freq(torch.float16, positions.device)).float()
        else:
            angles = positions.to(torch.float32)[..., None] * self.inv_freq(torch.float32, positions.device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        rest = self.head_dim - self.rotary_dim
        cos = F.pad(cos.repeat_interleave(2, dim=-1), (0, rest), value=1.0)
        sin = F.pad(torch.stack([-sin, sin], dim=-1).flatten(-2), (0, rest))
        return cos[:, :, None], sin[:, :, None]


def apply_rotary_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, T, heads, d] by cos, sin from
    `RotaryEmbedding.cos_sin` (dims past its rotary_dim pass through): x * cos + swapped pairs *
    signed sin, four kernels with the references' roundings (x0 cos - x1 sin, x1 cos + x0 sin)."""
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin


class SelfAttention(nn.Module):
    """Grouped-query attention with rotary pairs over the caller's cache. The projections are
    the checkpoint's: here one fused `query_key_value` and `dense`; transformers' layout
    (glm_hf.py) overrides `make_projections`, `projections` and `output` only."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.make_projections(config, self.heads * self.head_dim, self.kv_heads * self.head_dim)
        # P-tuning v2: keys and values [kv_heads, pre_seq_len, head_dim] seen by every query.
        self.prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def make_projections(self, config: GLM2Config, q_size: int, kv_size: int) -> None:
        self.query_key_value = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(q_size, config.hidden_size, bias=config.add_bias_linear)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys [B, T, heads + kv_heads, d] (not rotated yet), values [B, T, kv_heads, d]."""
        # Output rows are laid out [all q | all k | all v], not per head: q and k are one view.
        qkv = self.query_key_value(x).unflatten(-1, (-1, self.head_dim))
        return qkv[:, :, :self.heads + self.kv_heads], qkv[:, :, self.heads + self.kv_heads:]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)

    def project(self, x, cos, sin):
        """Rotated queries [B, T, heads, d] and keys, and values [B, T, kv_heads, d]: queries and
        keys rotate in one go."""
        qk, v = self.projections(x)
        qk = apply_rotary_pairs(qk, cos, sin)
        return qk[:, :, :self.heads], qk[:, :, self.heads:], v

    def attend(self, q, mask, slots, cache: LayerCache):
        """Attention of the rotated queries to the cache (keys already written), projected back."""
        out = cache.read(q, slots, mask, self.prefix_kv)
        return self.output(out.reshape(q.shape[0], q.shape[1], -1))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the halves of a fused projection's output (gate first), as every GLM since
    ChatGLM2 computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: dense_h_to_4h's output halves are gate and up; dense_4h_to_h(silu(gate) * up)."""

    def __init__(self, config: GLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        return self.dense_4h_to_h(swiglu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: GLM2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    @property
    def attention(self) -> SelfAttention:
        """The name ChatGLM-6B's block uses (cache set-up and tools walk layers by it)."""
        return self.self_attention

    def forward(self, x, cos, sin, mask, slots, cache_positions, cache: LayerCache):
        normed, q = self.write_keys(x, cos, sin, slots, cache_positions, cache)
        return self.finish(x, normed, q, mask, slots, cache)

    def write_keys(self, x, cos, sin, slots, cache_positions, cache: LayerCache):
        """The block's first part (see glm6b.Block.write_keys): (normed input, rotated queries)."""
        normed = self.input_layernorm(x)
        q, k, v = self.attention.project(normed, cos, sin)
        cache.write(k, v, slots, cache_positions)
        return normed, q

    def finish(self, x, normed, q, mask, slots, cache: LayerCache):
        """The rest: attention to the cache, MLP, each with its residual."""
        x = x + self.attention.attend(q, mask, slots, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config: GLM2Config):
        super().__init__()
        self.word_embeddings = unfilled_embedding(config.padded_vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: GLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Transformer(nn.Module):
    def __init__(self, config: GLM2Config):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        if config.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)

    # ChatGLM-6B's names, for code that walks either network (the base model, quantization, tools).
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def final_layernorm(self) -> RMSNorm:
        return self.encoder.final_layernorm


class ChatGLM2Model(GLMModel):
    """ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat, with ChatGLM-6B's calling convention (`base.GLMModel`),
    so `serving.decode_batch.DecodeBatch` and the engine drive it unchanged. Causal: its decode
    batches reuse a conversation's keys and values for the next turn."""

    causal = True
    tied_lm_head = False

    def __init__(self, config: GLM2Config):
        super().__init__(config)
        self.transformer = Transformer(config)
        self.rotary = RotaryEmbedding(config.head_dim // 2, 10000.0 * config.rope_ratio,
                                      half_precision_angles=config.family == "chatglm2", head_dim=config.head_dim)

    @property
    def lm_head(self) -> nn.Module:
        return self.transformer.output_layer

    def set_output_layer(self, layer: nn.Module) -> None:
        self.transformer.output_layer = layer

    def layout_for_prompt(self, prompt: list[int]) -> CausalLayout:
        return CAUSAL
