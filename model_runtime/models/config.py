"""What the config of every GLM family shares: reading config.json, the common checks, and the
error a checkpoint that cannot be used raises."""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import ClassVar, Optional


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
class ModelConfig:
    """Base of the per-family config dataclasses, whose field names follow config.json.

    `from_dict` refuses a config that lacks a required field or fails `_check`, with a message
    naming the file; the two hooks let a family adapt the raw dict (`_prepared`) and the values
    (`_converted`) to its fields."""

    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ()  # sizes that must be positive integers

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        raw = cls._prepared(raw)
        known = {f.name: f for f in fields(cls)}
        required = [name for name, f in known.items() if f.default is MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
        values = {name: raw[name] for name in known if name in raw and raw[name] is not None}
        config = cls(**cls._converted(values, raw, source))
        config._check(source)
        return config

    @classmethod
    def from_file(cls, path: Path, **options) -> "ModelConfig":
        return cls.from_dict(read_config_json(path), source=str(path), **options)

    @classmethod
    def _prepared(cls, raw: dict) -> dict:
        """The raw dict as the fields expect it (before the required fields are looked for)."""
        return raw

    @classmethod
    def _converted(cls, values: dict, raw: dict, source: str) -> dict:
        """The constructor's arguments from the fields' raw values."""
        return values

    def to_dict(self) -> dict:
        raw = {"model_type": "chatglm", "architectures": ["ChatGLMModel"]}
        for f in fields(self):
            value = getattr(self, f.name)
            raw[f.name] = list(value) if isinstance(value, tuple) else value
        return raw

    def _check(self, source: str) -> None:
        for name in self.POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.quantization_bit not in (0, 4, 8):
            raise CheckpointError(f"{source}: quantization_bit must be 0, 4 or 8, got {self.quantization_bit!r}")


@dataclass(frozen=True)
class CausalGLMConfig(ModelConfig):
    """What the configs of the causal GLMs with grouped key/value heads share (ChatGLM2/3 and
    GLM-4-9B-chat in glm2.py, transformers' GLM layouts in glm_hf.py): the family, which the
    loader works out (`loading.family`) or configs this runtime writes store as `glm_family`;
    an eos id or list; the grouping check; the parameter count of the blocks' Linear layers.
    Subclasses have `family`, `eos_token_id`, `hidden_size`, `num_attention_heads` and
    `output_layer_bit` fields and the `head_dim`, `kv_heads`, `inner_hidden_size` names."""

    FAMILIES: ClassVar[tuple[str, ...]] = ()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def causal(self) -> bool:
        return True

    def block_linear_parameters(self) -> int:
        """Parameters of one block's Linear layers (q, k, v, output, gate+up, down): what quantizes."""
        h, f, d = self.hidden_size, self.inner_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.kv_heads * d
        return h * (q + 2 * kv) + q * h + h * 2 * f + f * h

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json", family: Optional[str] = None) -> "CausalGLMConfig":
        """family: which of FAMILIES; by default config.json's `glm_family`."""
        return super().from_dict(dict(raw, glm_family=family) if family else raw, source)

    @classmethod
    def _converted(cls, values: dict, raw: dict, source: str) -> dict:
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        if raw.get("glm_family") is not None:
            values["family"] = raw["glm_family"]
        return values

    def _check(self, source: str) -> None:
        super()._check(source)
        if self.family not in self.FAMILIES:
            raise CheckpointError(f"{source}: unknown GLM family {self.family!r}")
        if self.num_attention_heads % self.kv_heads:
            raise CheckpointError(f"{source}: {self.num_attention_heads} attention heads do not split into "
                                  f"{self.kv_heads} key/value groups")
        if self.output_layer_bit not in (0, 8):
            raise CheckpointError(f"{source}: output_layer_bit must be 0 or 8, got {self.output_layer_bit!r}")
