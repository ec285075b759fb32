"""Which GLM a checkpoint holds, from its own files (no flags): config, tokenizer and network class.

- transformers' own GLM layouts, by `architectures` / `model_type`: `Glm4ForCausalLM` / "glm4"
  (GLM-4-0414, GLM-Z1) and `GlmForCausalLM` / "glm" (glm-4-9b-chat-hf), with a tokenizer.json
  and a Jinja chat template (models/glm_hf.py, tokenizers/hf_json.py).
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

from ..models.base import GLMModel
from ..models.config import CheckpointError, read_config_json
from ..models.glm2 import ChatGLM2Model, GLM2Config
from ..models.glm6b import ChatGLMModel, GLMConfig
from ..models.glm_hf import HF_FAMILIES, HFGLMConfig, HFGLMModel
from ..tokenizers.glm2 import ChatGLM2Tokenizer
from ..tokenizers.glm4 import GLM4Tokenizer, is_tiktoken_file
from ..tokenizers.glm6b import ChatGLMTokenizer
from ..tokenizers.hf_json import JSONTokenizer

log = logging.getLogger(__name__)

AnyConfig = Union[GLMConfig, GLM2Config, HFGLMConfig]
AnyTokenizer = Union[ChatGLMTokenizer, ChatGLM2Tokenizer, GLM4Tokenizer, JSONTokenizer]


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


def hf_family(raw: dict) -> str | None:
    """"glm4-0414" or "glm4-hf" for transformers' own GLM layouts (architectures first, then
    model_type), None for the others."""
    architectures = raw.get("architectures") or []
    for family, (model_type, architecture) in HF_FAMILIES.items():
        if architecture in architectures:
            return family
    return next((family for family, (model_type, _) in HF_FAMILIES.items() if raw.get("model_type") == model_type), None)


def detect_family(raw: dict, folder: Path) -> str:
    """"chatglm", "chatglm2", "chatglm3", "glm4", "glm4-0414" or "glm4-hf" for a config.json dict
    and its folder."""
    family = hf_family(raw)
    if family:
        return family
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
    if family in HF_FAMILIES:
        return HFGLMConfig.from_dict(raw, source=str(path), family=family)
    return GLM2Config.from_dict(raw, source=str(path), family=family)


def load_tokenizer(folder: Union[str, Path], config: AnyConfig):
    """The tokenizer of a checkpoint folder, for its family."""
    folder = Path(folder)
    try:
        if config.family == "chatglm":
            return ChatGLMTokenizer.from_pretrained(folder)
        if config.family in HF_FAMILIES:
            tokenizer = JSONTokenizer(folder, config.family)
        else:
            tokenizer = _load_later_tokenizer(folder, config.family)
    except (OSError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                              f"padded_vocab_size is {config.vocab_size}")
    return tokenizer


def _load_later_tokenizer(folder: Path, family: str):
    """The tokenizer of a ChatGLM2/ChatGLM3/GLM-4 checkpoint folder."""
    folder = Path(folder)
    vocab_file = "tokenizer.model"
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            vocab_file = json.loads(config_file.read_text(encoding="utf-8")).get("vocab_file", vocab_file)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    path = folder / vocab_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a {family} checkpoint needs its tokenizer.model")
    if family == "glm4":
        return GLM4Tokenizer(path)
    return ChatGLM2Tokenizer(path, family)


def model_class(config: AnyConfig) -> type[GLMModel]:
    """ChatGLMModel for ChatGLM-6B, HFGLMModel for transformers' layouts, ChatGLM2Model for the others."""
    if config.family in HF_FAMILIES:
        return HFGLMModel
    return ChatGLMModel if config.family == "chatglm" else ChatGLM2Model
