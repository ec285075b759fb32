"""One config type for every GLM checkpoint, read from its config.json."""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Optional


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt or inconsistent. The message names the
    file (and tensor) at fault and says what to do."""


def read_config_json(path: Path) -> dict:
    """A checkpoint's config.json as a dict, or a CheckpointError naming the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; a checkpoint directory needs its config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


@dataclass(frozen=True)
class GLMConfig:
    """The sizes and special ids of a ChatGLM-6B checkpoint (field names follow config.json)."""

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

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "GLMConfig":
        known = {f.name: f for f in fields(cls)}
        required = [name for name, f in known.items() if f.default is MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
        if raw.get("model_type", "chatglm") != "chatglm":
            raise CheckpointError(f"{source}: model_type {raw['model_type']!r} is not a ChatGLM model")
        values = {name: raw[name] for name in known if name in raw and raw[name] is not None}
        config = cls(**values)
        config._check(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> "GLMConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict:
        raw = {"model_type": "chatglm", "architectures": ["ChatGLMModel"]}
        raw.update({f.name: getattr(self, f.name) for f in fields(self)})
        return raw

    def _check(self, source: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "inner_hidden_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise CheckpointError(
                f"{source}: hidden_size {self.hidden_size} must split into {self.num_attention_heads} "
                "heads whose size is a multiple of 4 (two rotary halves)")
        if not self.position_encoding_2d:
            raise CheckpointError(f"{source}: only position_encoding_2d=true ChatGLM-6B checkpoints are supported")
        if self.quantization_bit not in (0, 4, 8):
            raise CheckpointError(f"{source}: quantization_bit must be 0, 4 or 8, got {self.quantization_bit!r}")
