"""Which GLM a checkpoint holds, from its own files (no flags): config, tokenizer and network class.

- ChatGLM-6B: config.json has ChatGLM-6B's fields (`inner_hidden_size`, `position_encoding_2d`).
- GLM-4: the later layout with a tiktoken-format tokenizer.model (or a vocabulary of 150k+).
- ChatGLM2 vs ChatGLM3 (same network, same tokenizer.model, different chat formats): the names the
  checkpoint gives itself (`_name_or_path` in config.json, `name_or_path` in tokenizer_config.json),
  then ChatGLM3's role tokens in tokenizer_config.json or in the shipped tokenization_chatglm.py;
  with no hint at all, ChatGLM3 (the one most people run), with a warning in the log.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Union

from .config import CheckpointError, GLMConfig, read_config_json
from .glm2 import ChatGLM2Model, GLM2Config

log = logging.getLogger(__name__)

AnyConfig = Union[GLMConfig, GLM2Config]


def _names(raw: dict, folder: Path) -> list[str]:
    """The names a checkpoint gives itself (config.json's first), lower-case, for family hints."""
    names = [str(raw.get("_name_or_path", "")), str(raw.get("name_or_path", ""))]
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            names.append(str(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("name_or_path", "")))
        except (ValueError, AttributeError):
            pass
    return [name.lower() for name in names if name]


def is_glm6b_config(raw: dict) -> bool:
    return "padded_vocab_size" not in raw and "ffn_hidden_size" not in raw


def detect_family(raw: dict, folder: Path) -> str:
    """"chatglm", "chatglm2", "chatglm3" or "glm4" for a config.json dict and its folder."""
    from .family_tokenizers import is_tiktoken_file

    if raw.get("model_type", "chatglm") == "glm":
        raise CheckpointError(f"{folder / 'config.json'}: model_type 'glm' is transformers' own port of GLM-4 "
                              "(glm-4-9b-chat-hf), which is not supported: use THUDM/glm-4-9b-chat")
    if is_glm6b_config(raw):
        return "chatglm"
    if raw.get("model_type", "chatglm") != "chatglm":
        raise CheckpointError(f"{folder / 'config.json'}: model_type {raw['model_type']!r} is not a ChatGLM model")
    if raw.get("glm_family") in ("chatglm2", "chatglm3", "glm4"):  # written by this runtime
        return raw["glm_family"]
    names = _names(raw, folder)
    if is_tiktoken_file(folder / "tokenizer.model") or raw.get("padded_vocab_size", 0) >= 100_000 \
            or any(re.search(r"glm-?4", name) for name in names):
        return "glm4"
    for name in names:
        if "chatglm3" in name:
            return "chatglm3"
        if "chatglm2" in name:
            return "chatglm2"
    for hint_file in ("tokenizer_config.json", "tokenization_chatglm.py"):
        path = folder / hint_file
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if "<|observation|>" in text or "<|assistant|>" in text:
                return "chatglm3"
            if hint_file == "tokenization_chatglm.py":
                return "chatglm2"  # ChatGLM2's tokenizer code, which has no role tokens
    log.warning("%s names neither ChatGLM2 nor ChatGLM3; using ChatGLM3's chat format", folder)
    return "chatglm3"


def read_config(folder: Union[str, Path]) -> AnyConfig:
    """The config of a checkpoint folder, as the class its family uses."""
    folder = Path(folder)
    path = folder / "config.json"
    raw = read_config_json(path)
    family = detect_family(raw, folder)
    if family == "chatglm":
        return GLMConfig.from_dict(raw, source=str(path))
    return GLM2Config.from_dict(raw, source=str(path), family=family)


def family_of(config: AnyConfig) -> str:
    return getattr(config, "family", "chatglm")


def load_tokenizer(folder: Union[str, Path], config: AnyConfig):
    """The tokenizer of a checkpoint folder, for its family."""
    folder = Path(folder)
    family = family_of(config)
    try:
        if family == "chatglm":
            from .tokenizer import ChatGLMTokenizer
            return ChatGLMTokenizer.from_pretrained(folder)
        from .family_tokenizers import load_family_tokenizer
        tokenizer = load_family_tokenizer(folder, family)
    except (OSError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                              f"padded_vocab_size is {config.vocab_size}")
    return tokenizer


def model_class(config: AnyConfig) -> type:
    """ChatGLMModel for ChatGLM-6B, ChatGLM2Model for the later ones."""
    if family_of(config) == "chatglm":
        from .model import ChatGLMModel
        return ChatGLMModel
    return ChatGLM2Model
