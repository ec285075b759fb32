"""Writing a quantized model as a checkpoint in the published format."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file
from torch import nn

from .convert import quantized_linears
from .format import QuantizationError
from .linear import QuantizedLinear

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def save_quantized(model: nn.Module, tokenizer, out_dir: Union[str, Path], *,
                   weight_format: str = "safetensors", max_shard_bytes: int = 2**30,
                   float_dtype: torch.dtype = torch.float16) -> Path:
    """Write a quantized model as a checkpoint in the published format, for `load_model` to reload
    quickly and identically: config.json (with quantization_bit), the tokenizer files (tokenizer:
    a ChatGLMTokenizer or a checkpoint directory), and weight shards of at most max_shard_bytes
    with their index (`weight_format` "safetensors" or "bin"). Quantized layers are stored as
    int8 `weight` + float16 `weight_scale`; other tensors in float_dtype (float16, as published).
    .bin files also hold `lm_head.weight` (sharing the embedding's storage), as published ones do."""
    bits = model.config.quantization_bit
    if not bits or not quantized_linears(model):
        raise QuantizationError("the model is not quantized: load it with quantize=4 or 8, or call "
                                "model.quantize(bits), before save_quantized")
    if weight_format not in ("safetensors", "bin"):
        raise ValueError(f"weight_format must be 'safetensors' or 'bin', got {weight_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(tokenizer, out_dir)
    config = model.config.to_dict()
    config.update(quantization_bit=bits, torch_dtype=str(float_dtype).removeprefix("torch."))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # Plan the shards from sizes alone, then materialise one shard at a time.
    entries = list(_checkpoint_entries(model, float_dtype))
    shards, current, size = [], [], 0
    for name, get, nbytes in entries:
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, get))
        size += nbytes
    shards.append(current)
    total = sum(nbytes for _, _, nbytes in entries)
    weight_map, inexact = {}, []
    for number, shard in enumerate(shards, 1):
        if weight_format == "bin":
            file_name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        else:
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        state = {}
        for name, get in shard:
            tensor, exact = get()
            state[name] = tensor
            if not exact:
                inexact.append(name)
        if weight_format == "bin":
            if "transformer.word_embeddings.weight" in state:  # published .bin files hold lm_head too
                state["lm_head.weight"] = state["transformer.word_embeddings.weight"]  # same storage
            torch.save(state, out_dir / file_name)
        else:
            save_file(state, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in state})
        del state
    index_name = "pytorch_model.bin.index.json" if weight_format == "bin" else "model.safetensors.index.json"
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if inexact:
        log.warning("%d tensor(s) (first: %s) do not convert exactly to %s; pass float_dtype=%s for an "
                    "identical reload", len(inexact), inexact[0], float_dtype, model.dtype)
    return out_dir


def _checkpoint_entries(model, float_dtype):
    """(name, getter, stored bytes) in the official order, under the checkpoint's names (a stacked
    layer's tensors split into its parts: `GLMModel.tensor_parts`); getters return (cpu
    tensor, exact)."""
    for name, get, nbytes in _model_entries(model, float_dtype):
        parts = model.tensor_parts(name)
        if parts is None:
            yield name, get, nbytes
            continue
        total = sum(rows for _, _, rows in parts)
        for part, start, rows in parts:
            yield part, _rows_of(get, start, rows), nbytes * rows // total


def _rows_of(get, start: int, rows: int):
    def get_rows():
        tensor, exact = get()
        return tensor[start:start + rows].clone(), exact
    return get_rows


def _model_entries(model, float_dtype):
    """(name, getter, stored bytes) of the model's own tensors; getters return (cpu tensor, exact)."""
    def float_tensor(tensor):
        def get():
            stored = tensor.detach().to("cpu", float_dtype).contiguous()
            if tensor.dtype == float_dtype:
                return stored, True
            return stored, bool(torch.equal(stored.to(tensor.dtype), tensor.detach().cpu()))
        return get

    def quantized_tensor(module, index):
        def get():
            return module.kernel.published()[index].detach().to("cpu").contiguous(), True
        return get

    element = torch.empty((), dtype=float_dtype).element_size()
    for name, module in model.named_modules():
        if name.startswith("lm_head") and model.tied_lm_head:  # the embeddings' matrix (also when computed by
            continue                                            # a QuantizedOutputLayer)
        if isinstance(module, QuantizedLinear):
            out, inp = module.out_features, module.in_features
            yield f"{name}.weight", quantized_tensor(module, 0), out * inp * module.bits // 8
            yield f"{name}.weight_scale", quantized_tensor(module, 1), out * 2
            if module.bias is not None:
                yield f"{name}.bias", float_tensor(module.bias), out * element
            continue
        for leaf, param in module.named_parameters(recurse=False):
            yield f"{name}.{leaf}", float_tensor(param), param.numel() * element


def _copy_tokenizer(tokenizer, out_dir: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        source = Path(tokenizer)
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
        vocab = source / config.get("vocab_file", "ice_text.model")
    else:
        vocab = Path(tokenizer.model_file)
        source = vocab.parent
    if not vocab.is_file():
        raise FileNotFoundError(f"tokenizer model {vocab} not found")
    if vocab.resolve() != (out_dir / vocab.name).resolve():
        shutil.copyfile(vocab, out_dir / vocab.name)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(source / name, out_dir / name)
