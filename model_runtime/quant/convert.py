"""Quantizing whole models: in place after loading, or empty ones the loader fills.

The Linear layers of every block are quantized to the requested width (the network's
`quantized_layers`);
embeddings and norms stay in floating point. The output layer (logits) goes INT8 by default with
quantized blocks where a fused int8 kernel runs (`output_layer_in_int8`, `QuantizedOutputLayer`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from ..models.config import CheckpointError
from .backends import choose_kernel
from .cpu_kernels import CpuAvx512Kernel, CpuInt8PackKernel
from .cuda_kernels import CudaTorchKernel
from .format import QuantizationError, check_bits
from .linear import QuantizedLinear, QuantizedOutputLayer
from .memory import trim_heap


LM_HEADS = ("auto", "int8", "float")
FUSED_INT8 = (CpuAvx512Kernel, CpuInt8PackKernel, CudaTorchKernel)  # where an INT8 output layer is faster than a float one


def output_layer_in_int8(lm_head: str, config, bits: Optional[int], device: Union[str, torch.device],
                         dtype: torch.dtype) -> bool:
    """Whether the output layer computes the logits in INT8 (`QuantizedOutputLayer`).

    lm_head "auto": when the blocks are quantized (bits) and a fused int8 kernel runs on this
    device and dtype (CPU in bfloat16, CUDA); "int8": always (raises where no fused kernel runs);
    "float": never. A checkpoint whose output layer is stored in INT8 (config.json
    `output_layer_bit: 8`, saved by `save_quantized`) is INT8 whatever the kernel."""
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
    stored = getattr(config, "output_layer_bit", 0) == 8
    if stored and lm_head == "float":
        raise QuantizationError("this checkpoint stores its output layer in INT8 (config.json output_layer_bit 8): "
                                "load it with lm_head='auto' or 'int8', or load the float checkpoint")
    if stored or lm_head == "float" or (lm_head == "auto" and not bits):
        return stored  # no kernel to ask about (asking logs why a fused one cannot run)
    fused = choose_kernel(device, 8, dtype) in FUSED_INT8
    if lm_head == "int8" and not fused:
        raise QuantizationError(
            f"an INT8 output layer needs a fused int8 kernel (CPU with bfloat16, or CUDA); on {torch.device(device)} "
            f"in {str(dtype).removeprefix('torch.')} it would be slower than the float one: use lm_head='float'")
    return lm_head == "int8" or fused


def quantize_lm_head(model: nn.Module) -> nn.Module:
    """Make a loaded ChatGLM-6B compute its logits with an INT8 copy of the tied embedding
    (`QuantizedOutputLayer.tied_to`; the embedding lookup stays exact). Returns the model."""
    lm_head = getattr(model, "lm_head", None)
    embedding = model.transformer.word_embeddings
    if isinstance(lm_head, QuantizedOutputLayer):
        return model
    if not isinstance(lm_head, nn.Linear) or lm_head.weight is not embedding.weight:
        raise QuantizationError("quantize_lm_head is for ChatGLM-6B, whose lm_head is tied to the word "
                                "embeddings; give an untied output layer to replace_output_layer")
    model.lm_head = QuantizedOutputLayer.tied_to(embedding)
    return model


def replace_output_layer(model: nn.Module) -> None:
    """Put an empty `QuantizedOutputLayer` in place of the untied output layer of a model built
    on the meta device (ChatGLM2/3, GLM-4), for the loader to fill: a float weight is quantized
    as it arrives, a stored INT8 one taken as is."""
    linear = model.lm_head
    model.set_output_layer(QuantizedOutputLayer(linear.in_features, linear.out_features, device="meta",
                                                dtype=linear.weight.dtype))
    model.config = replace(model.config, output_layer_bit=8)


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def _block_linears(model: nn.Module):
    for index, layer in enumerate(model.transformer.layers):
        for path in model.quantized_layers:
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
