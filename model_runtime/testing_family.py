"""Tiny stand-ins for ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat checkpoints (tests, offline demos).

- ChatGLM2/3: a SentencePiece BPE `tokenizer.model` trained here with the real file's settings
  (identity normalisation, whitespace kept, dummy prefix, split digits, byte fallback with the
  byte pieces at 3..258, so "\\n" is 13 as in the real file); the special tokens come after it.
- GLM-4: a tiktoken-format `tokenizer.model` (`base64 rank` lines) of a byte-level BPE trained
  here with GLM-4's pre-tokenizer; single bytes take GPT-2's byte order, so "\\n" is rank 198 as in
  the real file.
- config.json: the published config's fields with tiny sizes (and GLM-4's rope_ratio, epsilon and
  eos list); `_name_or_path` names the family as the published files do.
- Random weights under the official names (float16; GLM-4 bfloat16 as published), as safetensors
  and/or .bin shards with their index.

    python -m model_runtime.testing make-tiny DIR --family chatglm3
"""
from __future__ import annotations

import base64
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from .family_tokenizers import GLM4_PATTERN, ChatGLM2Tokenizer, GLM4Tokenizer
from .glm2 import ChatGLM2Model, GLM2Config

TINY_FAMILIES = ("chatglm2", "chatglm3", "glm4")

_NAMES = {"chatglm2": "tiny-random/chatglm2-6b", "chatglm3": "tiny-random/chatglm3-6b",
          "glm4": "tiny-random/glm-4-9b-chat"}

_CHAT_TEXT = """\
[Round 1]

问：你好

答：你好👋！我是人工智能助手 ChatGLM，很高兴见到你，欢迎问我任何问题。

[Round 2]

问：今天天气怎么样？

答：
You are a helpful assistant. 你是一个乐于助人的助手。
Please answer in English. 请用中文回答。
"""


def _corpus_lines() -> list[str]:
    from .testing import _TINY_CORPUS

    lines = [line for line in (_TINY_CORPUS + "\n" + _CHAT_TEXT).split("\n") if line.strip()]
    return lines


# ---- ChatGLM2/3 SentencePiece ----------------------------------------------------------------


def write_tiny_sentencepiece(directory: str | Path, family: str = "chatglm3") -> Path:
    """tokenizer.model + tokenizer_config.json of a tiny ChatGLM2/3 tokenizer (deterministic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
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


# ---- GLM-4 tiktoken-format BPE --------------------------------------------------------------


def _gpt2_byte_order() -> list[int]:
    """Bytes in GPT-2's (and cl100k's) rank order: printable ones first, then the rest."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    return printable + [b for b in range(256) if b not in printable]


def train_byte_bpe(texts: list[str], merges: int) -> dict[bytes, int]:
    """A byte-level BPE over GLM-4's pre-tokenized chunks: ranks of the 256 bytes, then merges in
    the order learnt (ties broken by the bytes, so the result is deterministic)."""
    import regex

    pattern = regex.compile(GLM4_PATTERN)
    chunks = Counter(piece.encode("utf-8") for text in texts for piece in pattern.findall(text))
    words = {chunk: [bytes([b]) for b in chunk] for chunk in chunks}
    ranks = {bytes([b]): rank for rank, b in enumerate(_gpt2_byte_order())}
    for _ in range(merges):
        pairs = Counter()
        for chunk, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += chunks[chunk]
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if count < 2:
            break
        ranks[a + b] = len(ranks)
        for chunk, parts in words.items():
            i, merged = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            words[chunk] = merged
    return ranks


def write_tiny_tiktoken(directory: str | Path, merges: int = 400) -> Path:
    """tokenizer.model (tiktoken format) + tokenizer_config.json of a tiny GLM-4 tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = "\n".join(_corpus_lines())
    ranks = train_byte_bpe(corpus.split("\n\n") + [corpus], merges)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    (directory / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    config = {"name_or_path": _NAMES["glm4"], "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "ChatGLM4Tokenizer", "remove_space": False, "do_lower_case": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory / "tokenizer.model"


# ---- checkpoints ------------------------------------------------------------------------------


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
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in ChatGLM2Model(config).named_parameters():
        if name.endswith("layernorm.weight"):
            value = 1 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            scale = 3.0 if param.dim() == 2 and "word_embeddings" not in name else 1.0
            value = scale * torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        state[name] = value
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
    from .testing import _write_shards

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
        _write_shards(directory, state, shards, weight_format)
    return directory
