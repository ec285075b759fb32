"""Tiny ChatGLM-6B checkpoints: tokenizer and random weights in the official layout.

`write_tiny_tokenizer` trains a small SentencePiece model with the same kind of pieces as the real
`ice_text.model`: <unk> <s> </s> <pad> <n> at ids 0..4, then ordinary pieces, then the control
pieces [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>, the user-defined <|tab|> and
<|blank_2|>..<|blank_80|>, and last the 256 byte-fallback pieces; nmt_nfkc normalisation and split
digits as in the real file. Only the ids differ (the vocabulary is ~600 pieces, not 130,344).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from ..models.glm6b import ChatGLMModel, GLMConfig
from ..tokenizers.glm6b import MAX_BLANK, ChatGLMTokenizer, encode_whitespace
from .corpus import TINY_CORPUS
from .weights import random_weights, write_shards

_CONTROL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
_USER_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]
_HEAD_PIECES = ["<unk>", "<s>", "</s>", "<pad>", "<n>"]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the protobuf varint at `pos`."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, raw value, raw bytes of the whole field) of a protobuf message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        else:  # fixed 64 / 32 bit
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        yield key >> 3, value, data[start:pos]


def _piece_rank(piece_message: bytes) -> int:
    """Group of a ModelProto.SentencePiece in the real file's order (see the module docstring)."""
    fields = {number: value for number, value, _ in _fields(piece_message)}
    piece, piece_type = fields[1].decode(), fields.get(3, 1)
    if piece in _HEAD_PIECES:
        return 0
    return {1: 1, 3: 2, 4: 3, 6: 4}[piece_type]  # normal, control, user-defined, byte


def _reorder_like_ice_text(model: bytes) -> bytes:
    """The trainer puts every special piece first; move them where ice_text.model has them.
    Piece ids are positions in ModelProto's repeated field 1, so a stable sort of the raw
    field entries is enough (no protobuf package needed)."""
    pieces, rest = [], []
    for number, value, raw in _fields(model):
        (pieces if number == 1 else rest).append((value, raw))
    pieces.sort(key=lambda entry: _piece_rank(entry[0]))
    return b"".join(raw for _, raw in pieces + rest)


# The official tokenizer_config.json's keys.
_TINY_TOKENIZER_CONFIG = {
    "name_or_path": "tiny-chatglm-6b",
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "num_image_tokens": 0,
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "padding_side": "left",
}


def write_tiny_tokenizer(directory: str | Path) -> None:
    """Write ice_text.model and tokenizer_config.json of a tiny ChatGLM-6B tokenizer.

    Deterministic (one thread, the whole corpus, no sampling): the same bytes on every run.
    The corpus goes through the tokenizer's own whitespace rewriting first, so that the model
    learns pieces next to <n>/<|blank_N|> as the real one did, not folded spaces."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paragraphs = [encode_whitespace(text) for text in TINY_CORPUS.split("\n\n")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs),
        model_writer=model,
        model_type="unigram",
        vocab_size=600,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=_CONTROL_PIECES,
        user_defined_symbols=_USER_PIECES,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "ice_text.model").write_bytes(_reorder_like_ice_text(model.getvalue()))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(_TINY_TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8"
    )


@dataclass(frozen=True)
class TinySize:
    """A small ChatGLM-6B shape: every size the loader reads from config.json, scaled down."""

    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    inner_hidden_size: int = 256
    max_sequence_length: int = 2048


def _tiny_config(tokenizer: ChatGLMTokenizer, size: TinySize) -> dict:
    # The real config's vocab_size (130528) is larger than its tokenizer (130344); keep that gap.
    vocab = -(-tokenizer.vocab_size // 64) * 64 + 64
    return GLMConfig(
        vocab_size=vocab, hidden_size=size.hidden_size, num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads, inner_hidden_size=size.inner_hidden_size,
        max_sequence_length=size.max_sequence_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id,
    ).to_dict()


def random_glm6b_state(config: GLMConfig, seed: int, text_ids: range) -> dict[str, torch.Tensor]:
    """Random float16 weights under the official tensor names (lm_head stored, as published).

    Besides `random_weights`' scale, one choice makes the random answers readable in the demo:
    the embedding rows of pieces that print nothing (control, byte and whitespace pieces, except
    <eop>) are shrunk, so that greedy answers are mostly ordinary text that still stops now and then."""
    state = random_weights(ChatGLMModel(config), torch.Generator().manual_seed(seed))
    embeddings = state["transformer.word_embeddings.weight"]
    quiet = torch.ones(config.vocab_size, dtype=torch.bool)
    quiet[text_ids.start:text_ids.stop] = False
    quiet[config.eos_token_id] = False
    embeddings[quiet] *= 0.05
    state = {name: value.half() for name, value in state.items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    return state


def write_tiny_glm6b_checkpoint(directory: Path, size: TinySize = TinySize(), seed: int = 0,
                                weight_formats: tuple[str, ...] = ("bin", "safetensors"), shards: int = 2) -> Path:
    """A complete random ChatGLM-6B checkpoint directory in the official layout: config.json,
    tokenizer files, and the same weights as .bin shards and/or safetensors shards with indexes."""
    directory = Path(directory)
    write_tiny_tokenizer(directory)
    tokenizer = ChatGLMTokenizer.from_pretrained(directory)
    raw_config = _tiny_config(tokenizer, size)
    (directory / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
    # The tiny vocabulary puts ordinary text pieces between <n> (4) and the first control piece.
    text_ids = range(5, tokenizer.mask_token_id)
    state = random_glm6b_state(GLMConfig.from_dict(raw_config), seed, text_ids)
    for weight_format in weight_formats:
        write_shards(directory, state, shards, weight_format)
    return directory
