"""GLM-4-0414 / GLM-Z1 (`Glm4ForCausalLM`) and glm-4-9b-chat-hf (`GlmForCausalLM`): the GLM
networks transformers ships itself, under its tensor names (`model.embed_tokens`,
`model.layers.N.self_attn.{q,k,v,o}_proj`, `mlp.gate_up_proj`, `mlp.down_proj`, `model.norm`,
`lm_head`). Reference: transformers' models/glm/modeling_glm.py and models/glm4/modeling_glm4.py.

What they share with ChatGLM2/3 and GLM-4-9B-chat (glm2.py), and take from there: RMSNorm,
grouped key/value heads, rotary on adjacent pairs of the first `head_dim * partial_rotary_factor`
dims of each head (transformers' "interleaved" GLM rotary: cos/sin repeat_interleave'd, pairs
(x[2i], x[2i+1]); the other dims pass through), SwiGLU with the gate first, causal attention
over the caller's cache, the calling convention of `base.GLMModel`. What differs:

- q, k and v are separate projections in the checkpoint (bias when `attention_bias`), stacked
  into one `qkv_proj` here as glm2's `query_key_value` is; the output one `o_proj`;
- GLM-4-0414 has four RMSNorms per block: `post_self_attn_layernorm` on the attention output and
  `post_mlp_layernorm` on the MLP output, each before its residual add; glm-4-9b-chat-hf has the
  usual two;
- the output layer may be tied to the embeddings (`tie_word_embeddings`);
- RMSNorm rounds to the input dtype before the weight multiplies (transformers' order; the same
  in float32: glm2.RMSNorm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from .base import GLMModel
from .config import CausalGLMConfig, CheckpointError
from .embedding import unfilled_embedding
from . import glm2
from .glm2 import CAUSAL, CausalLayout, RMSNorm, RotaryEmbedding, SelfAttention, swiglu

# family -> (model_type, architecture)
HF_FAMILIES = {"glm4-0414": ("glm4", "Glm4ForCausalLM"), "glm4-hf": ("glm", "GlmForCausalLM")}


@dataclass(frozen=True)
class HFGLMConfig(CausalGLMConfig):
    """config.json of a transformers-native GLM (field names as written there). `family` says which
    network (HF_FAMILIES); `loading.family` reads it from `architectures` / `model_type`."""

    FAMILIES: ClassVar[tuple[str, ...]] = tuple(HF_FAMILIES)
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                                  "head_dim", "max_position_embeddings")

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: Optional[int] = None  # None: as many as the query heads
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads
    max_position_embeddings: int = 131072
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    eos_token_id: Union[int, tuple[int, ...]] = (151329, 151336, 151338)
    pad_token_id: int = 151329
    torch_dtype: str = "bfloat16"
    quantization_bit: int = 0  # written by this runtime's save_quantized
    output_layer_bit: int = 0
    family: str = "glm4-0414"

    pre_seq_len: ClassVar[None] = None  # no P-tuning v2 prefix for these layouts
    quantization_embeddings: ClassVar[bool] = False

    # ---- the names the shared code uses -----------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def inner_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def layernorm_epsilon(self) -> float:
        return self.rms_norm_eps

    @property
    def rotary_dim(self) -> int:
        """transformers: int(head_dim * partial_rotary_factor) dims carry the rotation."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def post_norms(self) -> bool:
        """GLM-4-0414's extra norms on the attention and MLP outputs."""
        return self.family == "glm4-0414"

    def parameter_counts(self) -> tuple[int, int]:
        """(parameters outside the blocks' Linear layers, parameters of those layers)."""
        h, qkv = self.hidden_size, (self.num_attention_heads + 2 * self.kv_heads) * self.head_dim
        norms = (4 if self.post_norms else 2) * h + (qkv if self.attention_bias else 0)
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * h + self.num_layers * norms + h, self.num_layers * self.block_linear_parameters()

    # ---- reading and writing config.json --------------------------------------------------------------

    @classmethod
    def _prepared(cls, raw: dict) -> dict:
        """transformers 5 keeps rope_theta and partial_rotary_factor in `rope_parameters` and writes
        `dtype`; the published configs have them at the top level and `torch_dtype`."""
        rope = raw.get("rope_parameters") or {}
        flat = {key: rope[key] for key in ("rope_theta", "partial_rotary_factor") if key in rope}
        if "dtype" in raw and "torch_dtype" not in raw:
            flat["torch_dtype"] = raw["dtype"]
        return dict(raw, **flat)

    @classmethod
    def _converted(cls, values: dict, raw: dict, source: str) -> dict:
        rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
        if raw.get("rope_scaling") or rope_type != "default":
            raise CheckpointError(f"{source}: rope scaling ({raw.get('rope_scaling') or rope_type}) is not supported")
        values = super()._converted(values, raw, source)
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
        for name in ("rope_theta", "partial_rotary_factor", "rms_norm_eps"):
            if name in values:
                values[name] = float(values[name])
        return values

    def to_dict(self) -> dict:
        model_type, architecture = HF_FAMILIES[self.family]
        raw = {"model_type": model_type, "architectures": [architecture]}
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "partial_rotary_factor",
                     "rope_theta", "rms_norm_eps", "attention_bias", "hidden_act", "tie_word_embeddings",
                     "pad_token_id", "torch_dtype", "quantization_bit", "output_layer_bit"):
            raw[name] = getattr(self, name)
        raw["eos_token_id"] = list(self.eos_token_ids)
        return raw

    def _check(self, source: str) -> None:
        super()._check(source)
        if self.rotary_dim % 2 or self.head_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise CheckpointError(f"{source}: partial_rotary_factor {self.partial_rotary_factor} of head_dim "
                                  f"{self.head_dim} must give an even number of rotary dims (of an even head_dim)")
        if self.hidden_act != "silu":
            raise CheckpointError(f"{source}: hidden_act {self.hidden_act!r} is not supported (GLM uses silu)")
        if self.rope_theta <= 0:
            raise CheckpointError(f"{source}: rope_theta must be positive, got {self.rope_theta!r}")


def rms_norm(config: HFGLMConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps, round_before_weight=True)


class Attention(SelfAttention):
    """glm2.SelfAttention under transformers' names: the checkpoint's q_proj, k_proj and v_proj
    stacked by rows into one `qkv_proj` (one product per step instead of three; the loader
    stacks them, the saver splits them: `HFGLMModel.stacked_parts`), the output `o_proj`."""

    def make_projections(self, config: HFGLMConfig, q_size: int, kv_size: int) -> None:
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    @property
    def query_key_value(self) -> nn.Module:
        """The name glm2's `projections` reads the stacked layer by."""
        return self.qkv_proj

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x)


class MLP(nn.Module):
    def __init__(self, config: HFGLMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class Block(glm2.Block):
    """glm2.Block (its forward in two parts) under transformers' names, with GLM-4-0414's two
    extra norms after attention and after the MLP (identities for glm-4-9b-chat-hf)."""

    def __init__(self, config: HFGLMConfig):
        nn.Module.__init__(self)
        self.input_layernorm = rms_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = rms_norm(config)
        self.mlp = MLP(config)
        if config.post_norms:
            self.post_self_attn_layernorm = rms_norm(config)
            self.post_mlp_layernorm = rms_norm(config)
        else:
            self.post_self_attn_layernorm = self.post_mlp_layernorm = nn.Identity()

    @property
    def attention(self) -> Attention:
        """The name the shared code walks layers by."""
        return self.self_attn

    def finish(self, x, normed, q, mask, slots, cache):
        x = x + self.post_self_attn_layernorm(self.self_attn.attend(q, mask, slots, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """transformers' `model.*`, with the names the shared code uses (`word_embeddings`,
    `final_layernorm`) as aliases."""

    def __init__(self, config: HFGLMConfig):
        super().__init__()
        self.embed_tokens = unfilled_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = rms_norm(config)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    @property
    def final_layernorm(self) -> RMSNorm:
        return self.norm


class HFGLMModel(GLMModel):
    """Glm4ForCausalLM / GlmForCausalLM on the shared calling convention, so the decode batch,
    engine, quantization and the decode kernels drive it unchanged. Causal: a conversation's
    keys and values are reused for its next turn."""

    causal = True
    quantized_layers = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

    def __init__(self, config: HFGLMConfig):
        super().__init__(config)
        self.tied_lm_head = config.tie_word_embeddings
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tied_lm_head:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, head_dim=config.head_dim)

    @property
    def transformer(self) -> Decoder:
        """The name the shared code reaches the embeddings, blocks and final norm by."""
        return self.model

    def _after_to_empty(self, device: torch.device) -> None:
        if self.tied_lm_head and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight  # to_empty unties

    def stacked_parts(self) -> dict[str, tuple[tuple[str, int], ...]]:
        q_size, kv_size = self.config.num_attention_heads * self.config.head_dim, self.config.kv_heads * self.config.head_dim
        return {"self_attn.qkv_proj": (("self_attn.q_proj", q_size), ("self_attn.k_proj", kv_size),
                                       ("self_attn.v_proj", kv_size))}

    def layout_for_prompt(self, prompt: list[int]) -> CausalLayout:
        return CAUSAL
