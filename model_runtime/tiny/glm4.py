"""Tiny GLM-4 tokenizer: a tiktoken-format `tokenizer.model` (`base64 rank` lines) of a byte-level
BPE trained here with GLM-4's pre-tokenizer; single bytes take GPT-2's byte order, so "\\n" is
rank 198 as in the real file."""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import regex

from ..tokenizers.glm4 import GLM4_PATTERN
from .corpus import corpus_lines

TINY_GLM4_NAME = "tiny-random/glm-4-9b-chat"


def _gpt2_byte_order() -> list[int]:
    """Bytes in GPT-2's (and cl100k's) rank order: printable ones first, then the rest."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    return printable + [b for b in range(256) if b not in printable]


def train_byte_bpe(texts: list[str], merges: int) -> dict[bytes, int]:
    """A byte-level BPE over GLM-4's pre-tokenized chunks: ranks of the 256 bytes, then merges in
    the order learnt (ties broken by the bytes, so the result is deterministic)."""
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
    corpus = "\n".join(corpus_lines())
    ranks = train_byte_bpe(corpus.split("\n\n") + [corpus], merges)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    (directory / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    config = {"name_or_path": TINY_GLM4_NAME, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "ChatGLM4Tokenizer", "remove_space": False, "do_lower_case": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory / "tokenizer.model"
