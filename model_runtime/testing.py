"""Tiny stand-ins for the published checkpoint files, so that tests and demos run without the
13 GB download.

`write_tiny_tokenizer` trains a small SentencePiece model with the same kind of pieces as the real
`ice_text.model`: <unk> <s> </s> <pad> <n> at ids 0..4, then ordinary pieces, then the control
pieces [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>, the user-defined <|tab|> and
<|blank_2|>..<|blank_80|>, and last the 256 byte-fallback pieces; nmt_nfkc normalisation and split
digits as in the real file. Only the ids differ (the vocabulary is ~600 pieces, not 130,344).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from .config import GLMConfig
from .model import ChatGLMModel
from .tokenizer import MAX_BLANK, ChatGLMTokenizer, encode_whitespace

_CONTROL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
_USER_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]
_HEAD_PIECES = ["<unk>", "<s>", "</s>", "<pad>", "<n>"]

# Our own training text: greetings, weather, chat turns, code, numbers and punctuation.
# Paragraphs (split on blank lines) are the training sentences.
_TINY_CORPUS = """\
你好

你好！我是一个小小的测试模型，很高兴见到你。
Hello! I am a tiny test model. Nice to meet you.

Good morning, how are you today?
早上好，今天你过得怎么样？

[Round 0]
问：你好
答：你好👋！有什么可以帮你的吗？
[Round 1]
问：今天天气怎么样？
答：

今天是晴天，气温大约 25 度，适合出去散步。
The weather is sunny today, about 25 degrees, with a light wind from the east.

Tomorrow it will rain in the afternoon, so please bring an umbrella.
明天下午会下雨，请记得带伞。北京的冬天很冷，上海的夏天很热。
It is cold and windy in winter; summer is hot and humid.

def main():
    print('hello world')\t# greeting
    for i in range(10):
        total = total + i * 2
    return total

if __name__ == "__main__":
    main()

import torch
x = torch.zeros(3, 4)  # a 3x4 matrix

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

{"name": "ChatGLM", "layers": 28, "hidden": 4096}

1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 2048, 130528, 3.14159, -42
一二三四五六七八九十，百千万。
The price is $12.50 (twelve dollars and fifty cents).
Question: what is 7 + 8? Answer: 15.

Punctuation: , . ! ? ; : ' " ( ) [ ] { } < > / \\ | @ # % ^ & * - _ = + ~ `
中文标点：，。！？；：“”‘’（）【】《》、……——

Thank you very much. Goodbye, see you tomorrow!
谢谢你，再见，明天见！

机器学习和自然语言处理是人工智能的重要方向。
Machine learning and natural language processing are important parts of AI.

请用三句话介绍一下你自己。
Please introduce yourself in three sentences.

The quick brown fox jumps over the lazy dog.
我喜欢读书、写代码和听音乐。
I like reading books, writing code and listening to music.
"""


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
    paragraphs = [encode_whitespace(text) for text in _TINY_CORPUS.split("\n\n")]
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


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoints in the official layout


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


def _random_state(config: GLMConfig, seed: int, text_ids: range) -> dict[str, torch.Tensor]:
    """Random float16 weights under the official tensor names (lm_head stored, as published).

    Two choices make the random answers readable in the demo: matrices are drawn with 3x the
    usual 1/sqrt(fan_in) scale, so that the blocks outweigh the residual of the tied embedding
    (which otherwise makes every token predict itself); and the embedding rows of pieces that
    print nothing (control, byte and whitespace pieces, except <eop>) are shrunk, so that greedy
    answers are mostly ordinary text that still stops now and then."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in ChatGLMModel(config).named_parameters(remove_duplicate=False):
        if name.endswith("layernorm.weight"):
            value = 1 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            scale = 3.0 if param.dim() == 2 and "word_embeddings" not in name else 1.0
            value = scale * torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        state[name] = value
    embeddings = state["transformer.word_embeddings.weight"]
    quiet = torch.ones(config.vocab_size, dtype=torch.bool)
    quiet[text_ids.start:text_ids.stop] = False
    quiet[config.eos_token_id] = False
    embeddings[quiet] *= 0.05
    state = {name: value.half() for name, value in state.items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    return state


def _write_shards(directory: Path, state: dict, shards: int, weight_format: str) -> None:
    from safetensors.torch import save_file

    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for number, group in enumerate(groups, 1):
        if weight_format == "bin":
            file_name = f"pytorch_model-{number:05d}-of-{shards:05d}.bin"
            torch.save({name: state[name] for name in group}, directory / file_name)
        else:
            file_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
            save_file({name: state[name].contiguous() for name in group}, directory / file_name,
                      metadata={"format": "pt"})
        for name in group:
            weight_map[name] = file_name
            total += state[name].numel() * state[name].element_size()
    index_name = "pytorch_model.bin.index.json" if weight_format == "bin" else "model.safetensors.index.json"
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_tiny_checkpoint(directory: str | Path, size: TinySize = TinySize(), seed: int = 0,
                          weight_formats: tuple[str, ...] = ("bin", "safetensors"), shards: int = 2,
                          family: str = "chatglm") -> Path:
    """A complete random ChatGLM-6B checkpoint directory in the official layout: config.json,
    tokenizer files, and the same weights as .bin shards and/or safetensors shards with indexes.
    family "chatglm2", "chatglm3" or "glm4" writes one of those instead (testing_family.py)."""
    directory = Path(directory)
    if family != "chatglm":
        from .testing_family import FamilyTinySize, write_tiny_family_checkpoint
        family_size = FamilyTinySize(
            hidden_size=size.hidden_size, num_layers=size.num_layers, num_attention_heads=size.num_attention_heads,
            kv_channels=size.hidden_size // size.num_attention_heads, ffn_hidden_size=size.inner_hidden_size // 2,
            seq_length=size.max_sequence_length)
        return write_tiny_family_checkpoint(directory, family, family_size, seed, weight_formats, shards)
    write_tiny_tokenizer(directory)
    tokenizer = ChatGLMTokenizer.from_pretrained(directory)
    raw_config = _tiny_config(tokenizer, size)
    (directory / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
    # The tiny vocabulary puts ordinary text pieces between <n> (4) and the first control piece.
    text_ids = range(5, tokenizer.mask_token_id)
    state = _random_state(GLMConfig.from_dict(raw_config), seed, text_ids)
    for weight_format in weight_formats:
        _write_shards(directory, state, shards, weight_format)
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_runtime.testing",
                                     description="Tiny random ChatGLM-6B checkpoints for tests and offline demos.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-tiny", help="write a tiny random checkpoint directory")
    make.add_argument("directory")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--layers", type=int, default=TinySize.num_layers)
    make.add_argument("--hidden-size", type=int, default=TinySize.hidden_size)
    make.add_argument("--family", default="chatglm", choices=("chatglm", "chatglm2", "chatglm3", "glm4"),
                      help="which model's layout, tokenizer and chat format (default: ChatGLM-6B)")
    args = parser.parse_args(argv)
    size = TinySize(hidden_size=args.hidden_size, num_layers=args.layers,
                    inner_hidden_size=4 * args.hidden_size)
    print(write_tiny_checkpoint(args.directory, size, seed=args.seed, family=args.family))
    return 0


if __name__ == "__main__":
    sys.exit(main())
