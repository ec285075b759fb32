"""Quantizing whole models: in place after loading, or empty ones the loader fills.

Only the four Linear layers of every block are quantized (`QUANTIZED_LAYERS`); embeddings, lm_head
and LayerNorms stay in floating point. Opt-in, `quantize_lm_head` computes ChatGLM-6B's logits from
an INT8 copy of the tied embedding (`QuantizedOutputLayer`; the embedding itself stays float).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from ..models.config import CheckpointError
from .backends import choose_kernel
from .format import QuantizationError, check_bits
from .linear import QuantizedLinear, QuantizedOutputLayer
from .memory import trim_heap

QUANTIZED_LAYERS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_lm_head(model: nn.Module) -> nn.Module:
    """Make a loaded ChatGLM-6B compute its logits with `QuantizedOutputLayer` (opt-in: the logits
    change by the INT8 weight error; the embedding lookup stays exact). Returns the model."""
    lm_head = getattr(model, "lm_head", None)
    embedding = model.transformer.word_embeddings
    if isinstance(lm_head, QuantizedOutputLayer):
        return model
    if not isinstance(lm_head, nn.Linear) or lm_head.weight is not embedding.weight:
        raise QuantizationError("quantize_lm_head is for ChatGLM-6B, whose lm_head is tied to the word "
                                "embeddings; this model's output layer is not")
    model.lm_head = QuantizedOutputLayer(embedding)
    return model


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def _block_linears(model: nn.Module):
    for index, layer in enumerate(model.transformer.layers):
        for path in QUANTIZED_LAYERS:
            parent_path, _, leaf = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            yield f"transformer.layers.{index}.{path}", parent, leaf, getattr(parent, leaf)


def resolve_quantization(config, quantize: Optional[int]) -> Optional[int]:
    """The bit width to load a checkpoint with: its own `quantization_bit`, or `quantize`.
    Raises for an unsupported width, a conflicting request, or quantized embeddings."""
    if quantize is not None and quantize != 0:
        check_bits(quantize)
    stored = config.quantization_bit or None
    if stored and quantize and quantize != stored:
        raise QuantizationError(
            f"this checkpoint is already INT{stored} (config.json quantization_bit {stored}); load it with "
            f"quantize=None or {stored}, or quantize the float checkpoint (THUDM/chatglm-6b) to INT{quantize}")
    if config.quantization_embeddings:
        raise CheckpointError(
            "checkpoints with quantized embeddings (config.json quantization_embeddings, e.g. "
            "THUDM/chatglm-6b-int4-qe) are not supported; use THUDM/chatglm-6b-int4, or quantize=4 on "
            "THUDM/chatglm-6b")
    return stored or quantize or None


def replace_linears(model: nn.Module, bits: int, device: Union[str, torch.device],
                    backend: str = "auto") -> None:
    """Put empty QuantizedLinear modules in place of the blocks' Linear layers of a model built on
    the meta device (the loader fills them shard by shard; float weights never all exist)."""
    bits = check_bits(bits)
    dtype = model.transformer.final_layernorm.weight.dtype
    choose_kernel(device, bits, dtype, backend)  # fail now, before loading, if it cannot run
    for _, parent, leaf, linear in _block_linears(model):
        setattr(parent, leaf, QuantizedLinear(linear.in_features, linear.out_features, bits,
                                              linear.bias is not None, device="meta", dtype=dtype,
                                              backend=backend))
    model.config = replace(model.config, quantization_bit=bits)


def quantize_model(model: nn.Module, bits: int, backend: str = "auto") -> nn.Module:
    """Quantize a loaded float model in place, layer by layer (the seed's `model.quantize(bits)`).
    Peak memory: the float model plus one layer's temporaries. Returns the model."""
    bits = check_bits(bits)
    if model.config.quantization_bit:
        if model.config.quantization_bit == bits:
            return model
        raise QuantizationError(f"the model is already INT{model.config.quantization_bit}; load the float "
                                f"checkpoint again to quantize it to INT{bits}")
    choose_kernel(model.device, bits, model.dtype, backend)
    for _, parent, leaf, linear in _block_linears(model):
        setattr(parent, leaf, QuantizedLinear.from_linear(linear, bits, backend))
        del linear
    model.config = replace(model.config, quantization_bit=bits)
    trim_heap()
    return model
