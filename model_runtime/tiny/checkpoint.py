"""A tiny random checkpoint of any GLM family, in the official layout."""
from __future__ import annotations

from pathlib import Path

from .glm2 import FamilyTinySize, write_tiny_family_checkpoint
from .glm6b import TinySize, write_tiny_glm6b_checkpoint
from .glm_hf import TINY_HF, write_tiny_hf_checkpoint

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4") + tuple(TINY_HF)


def write_tiny_checkpoint(directory: str | Path, size: TinySize = TinySize(), seed: int = 0,
                          weight_formats: tuple[str, ...] = ("bin", "safetensors"), shards: int = 2,
                          family: str = "chatglm") -> Path:
    """A complete random ChatGLM-6B checkpoint directory in the official layout: config.json,
    tokenizer files, and the same weights as .bin shards and/or safetensors shards with indexes.
    family "chatglm2", "chatglm3" or "glm4" writes one of those instead (glm2.py); "glm4-0414",
    "z1" or "glm4-hf" one in transformers' layout (glm_hf.py, safetensors only)."""
    directory = Path(directory)
    if family in TINY_HF:
        return write_tiny_hf_checkpoint(
            directory, family, seed, shards, hidden_size=size.hidden_size, num_layers=size.num_layers,
            num_attention_heads=size.num_attention_heads, head_dim=size.hidden_size // size.num_attention_heads,
            intermediate_size=size.inner_hidden_size // 2)
    if family != "chatglm":
        family_size = FamilyTinySize(
            hidden_size=size.hidden_size, num_layers=size.num_layers, num_attention_heads=size.num_attention_heads,
            kv_channels=size.hidden_size // size.num_attention_heads, ffn_hidden_size=size.inner_hidden_size // 2,
            seq_length=size.max_sequence_length)
        return write_tiny_family_checkpoint(directory, family, family_size, seed, weight_formats, shards)
    return write_tiny_glm6b_checkpoint(directory, size, seed, weight_formats, shards)
