"""What every tokenizer here shares: loading a SentencePiece model, reading a checkpoint's
JSON files, text the C++/Rust side accepts, and the range check of token ids."""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm


def load_sentencepiece(model_file: Path) -> spm.SentencePieceProcessor:
    """A SentencePiece model, or FileNotFoundError / ValueError naming the file."""
    if not model_file.is_file():
        raise FileNotFoundError(f"tokenizer model {model_file} not found")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(model_file))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{model_file} is not a valid SentencePiece model: {error}") from None
    return processor


def without_lone_surrogates(text: str) -> str:
    """text with lone surrogates (which cannot reach the C++/Rust side) as U+FFFD."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def checked_id(token_id, vocab_size: int) -> int:
    """`token_id` as an int (tensors and numpy ints welcome), or ValueError if out of range."""
    token_id = int(token_id)
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return token_id


def json_object_file(path: Path) -> dict:
    """A checkpoint's JSON object file (tokenizer_config.json...), {} when absent; ValueError
    naming it when it is not one."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def token_string(value):
    """tokenizer_config.json stores a token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value
