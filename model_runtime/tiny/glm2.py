"""Tiny ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat checkpoints (one network; GLM-4's tokenizer
is in glm4.py).

- ChatGLM2/3: a SentencePiece BPE `tokenizer.model` trained here with the real file's settings
  (identity normalisation, whitespace kept, dummy prefix, split digits, byte fallback with the
  byte pieces at 3..258, so "\\n" is 13 as in the real file); the special tokens come after it.
- config.json: the published config's fields with tiny sizes (and GLM-4's rope_ratio, epsilon and
  eos list); `_name_or_path` names the family as the published files do.
- Random weights under the official names (float16; GLM-4 bfloat16 as published), as safetensors
  and/or .bin shards with their index.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from ..models.glm2 import ChatGLM2Model, GLM2Config
from ..tokenizers.glm2 import ChatGLM2Tokenizer
from ..tokenizers.glm4 import GLM4Tokenizer
from .corpus import corpus_lines
from .glm4 import TINY_GLM4_NAME, write_tiny_tiktoken
from .weights import random_weights, write_shards

TINY_FAMILIES = ("chatglm2", "chatglm3", "glm4")

_NAMES = {"chatglm2": "tiny-random/chatglm2-6b", "chatglm3": "tiny-random/chatglm3-6b", "glm4": TINY_GLM4_NAME}


def write_tiny_sentencepiece(directory: str | Path, family: str = "chatglm3") -> Path:
    """tokenizer.model + tokenizer_config.json of a tiny ChatGLM2/3 tokenizer (deterministic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {"name_or_path": _NAMES[family], "remove_space": False, "do_lower_case": False,
              "tokenizer_class": "ChatGLMTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory / "tokenizer.model"


@dataclass(frozen=True)
class FamilyTinySize:
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    kv_channels: int = 16
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 128
    seq_length: int = 2048


def tiny_config(family: str, tokenizer, size: FamilyTinySize = FamilyTinySize()) -> dict:
    """config.json of a tiny checkpoint: the published fields, tiny sizes, the family's ids."""
    padded = -(-tokenizer.vocab_size // 64) * 64 + 64  # padded beyond the tokenizer, as published
    raw = GLM2Config(
        padded_vocab_size=padded, hidden_size=size.hidden_size, num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads, kv_channels=size.kv_channels,
        multi_query_group_num=size.multi_query_group_num, ffn_hidden_size=size.ffn_hidden_size,
        seq_length=size.seq_length, family=family,
    ).to_dict()
    del raw["glm_family"]  # as published: the names say which model it is
    raw["_name_or_path"] = _NAMES[family]
    if family == "glm4":
        eos = [tokenizer.special_id(name) for name in ("<|endoftext|>", "<|user|>", "<|observation|>")]
        raw.update(layernorm_epsilon=1.5625e-07, rope_ratio=500, eos_token_id=eos, pad_token_id=eos[0],
                   torch_dtype="bfloat16")
    else:
        raw.pop("rope_ratio")  # absent in the published ChatGLM2/3 configs (= 1)
        raw.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return raw


def random_family_state(config: GLM2Config, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names. Output rows of ids that print nothing (bytes,
    specials other than the stop tokens, padding) are shrunk, so that greedy answers are mostly
    ordinary text that still stops now and then."""
    state = random_weights(ChatGLM2Model(config), torch.Generator().manual_seed(seed))
    quiet = torch.ones(config.padded_vocab_size, dtype=torch.bool)
    if isinstance(tokenizer, GLM4Tokenizer):
        quiet[256:tokenizer.first_special] = False  # merged tokens
    else:
        quiet[259:tokenizer.first_special] = False  # ordinary SentencePiece pieces
    for stop in tokenizer.chat_format.stop_ids(tokenizer):
        quiet[stop] = False
    state["transformer.output_layer.weight"][quiet] *= 0.05
    dtype = torch.bfloat16 if config.family == "glm4" else torch.float16
    return {name: value.to(dtype) for name, value in state.items()}


def write_tiny_family_checkpoint(directory: str | Path, family: str = "chatglm3",
                                 size: FamilyTinySize = FamilyTinySize(), seed: int = 0,
                                 weight_formats: tuple[str, ...] = ("safetensors",), shards: int = 2) -> Path:
    """A complete random ChatGLM2/ChatGLM3/GLM-4 checkpoint directory in the official layout."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    directory = Path(directory)
    if family == "glm4":
        tokenizer = GLM4Tokenizer(write_tiny_tiktoken(directory))
    else:
        tokenizer = ChatGLM2Tokenizer(write_tiny_sentencepiece(directory, family), family)
    raw = tiny_config(family, tokenizer, size)
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    state = random_family_state(GLM2Config.from_dict(raw, family=family), tokenizer, seed)
    for weight_format in weight_formats:
        write_shards(directory, state, shards, weight_format)
    return directory
