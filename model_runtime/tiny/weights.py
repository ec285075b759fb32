"""Random weights under a network's official tensor names, and writing them as checkpoint shards."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.base import GLMModel


def random_weights(model: GLMModel, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """float32 weights for every parameter of `model` (tied ones under each name), under the
    checkpoint's names (a stacked layer's parts apart: `GLMModel.checkpoint_tensors`).

    Matrices are drawn with 3x the usual 1/sqrt(fan_in) scale, so that the blocks outweigh the
    residual stream (which otherwise makes every token predict itself) and random answers read
    as text; LayerNorm weights are near 1."""
    state = {}
    for name, param in model.checkpoint_tensors(model.named_parameters(remove_duplicate=False)):
        if name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            scale = 3.0 if param.dim() == 2 and "word_embeddings" not in name else 1.0
            value = scale * torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        state[name] = value
    return state


def write_shards(directory: Path, state: dict, shards: int, weight_format: str) -> None:
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
