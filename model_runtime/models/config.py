"""What the config of every GLM family shares: reading config.json, the common checks, and the
error a checkpoint that cannot be used raises."""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import ClassVar


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
