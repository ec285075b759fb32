"""`load_model`: a GLM checkpoint (local directory or Hugging Face id) ready for inference."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from ..models.base import GLMModel
from ..quant.convert import output_layer_in_int8, quantize_lm_head, resolve_quantization
from .checkpoint import resolve_checkpoint, weight_files
from .device import check_fits, pick_device, pick_dtype
from .family import AnyTokenizer, load_tokenizer, model_class, read_config
from .adapters import read_adapter
from .ptuning import PREFIX, load_prefix, read_ptuning_checkpoint, with_prefix_config
from .weights import load_weights

log = logging.getLogger(__name__)


def load_model(name_or_path: Union[str, Path], device: Union[str, torch.device] = "auto",
               dtype: Union[None, str, torch.dtype] = None, weight_format: Optional[str] = None,
               revision: Optional[str] = None, quantize: Optional[int] = None,
               quant_backend: str = "auto", lm_head: Literal["auto", "int8", "float"] = "auto",
               ptuning_checkpoint: Union[None, str, Path] = None, pre_seq_len: Optional[int] = None,
               adapter: Union[None, str, Path] = None) -> tuple[AnyTokenizer, GLMModel]:
    """Load a GLM checkpoint (local directory or Hugging Face id) for inference: ChatGLM-6B,
    ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat, as its own files say (family.py).

    device: "auto" | "cuda" | "cpu" | "mps"; dtype: None picks float16 on GPUs, bfloat16 on CPU;
    weight_format: "safetensors" or "bin" (default: whichever the folder has, safetensors first).
    quantize: 4 or 8 quantizes the blocks' Linear layers while loading, shard by shard (the float
    model never sits in memory whole); checkpoints with config quantization_bit load as stored.
    quant_backend: "auto" or a name from quant.backends.KERNELS (the matmul kernel of quantized layers).
    lm_head: the output layer's weights. "auto": INT8 when the blocks are quantized and a fused int8
    kernel runs here (CPU in bfloat16, CUDA), else float; "int8" / "float" force it. INT8 halves
    what a decode step reads there; the logits move by ~0.9% (quant.linear.QuantizedOutputLayer).
    ChatGLM-6B keeps its float embedding beside the INT8 copy (+0.5 GiB); the later models'
    untied output layer is quantized while it loads (less memory).
    ptuning_checkpoint: a P-tuning v2 checkpoint folder (transformer.prefix_encoder.* only) to put in
    front of every attention call (ptuning.py); pre_seq_len, if given, must match its prefix length.
    adapter: a PEFT LoRA adapter (folder or Hugging Face id) merged into the float weights while
    they load, before quantizing (adapters.py). `model.fine_tunes` then names what was loaded.
    Raises CheckpointError with a message that names the file (and tensor) at fault.
    """
    if pre_seq_len is not None and ptuning_checkpoint is None:
        raise ValueError("pre_seq_len only says how long the prefix of a P-tuning checkpoint is: "
                         "give the checkpoint too (ptuning_checkpoint=DIR, --ptuning-checkpoint DIR)")
    folder = resolve_checkpoint(name_or_path, revision)
    config = read_config(folder)  # ChatGLM-6B, ChatGLM2/3 or GLM-4: see family.py
    prefix = read_ptuning_checkpoint(ptuning_checkpoint, pre_seq_len) if ptuning_checkpoint is not None else None
    if prefix is not None:
        config = with_prefix_config(config, prefix)
    lora = read_adapter(adapter) if adapter is not None else None
    if lora is not None:
        lora.check_fits(config)  # before any memory is taken
    tokenizer = load_tokenizer(folder, config)
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    files = weight_files(folder, weight_format)
    bits = resolve_quantization(config, quantize)
    check_fits(config, device, dtype, bits)
    int8_head = output_layer_in_int8(lm_head, config, bits, device, dtype)
    model = model_class(config).empty(config, device, dtype, quantize=bits, quant_backend=quant_backend,
                                      int8_output_layer=int8_head)
    load_weights(model, files, adapter=lora, provided_elsewhere=(PREFIX,) if prefix is not None else ())
    if prefix is not None:
        load_prefix(model, prefix)
    elif config.pre_seq_len:
        model.refresh_prefix()  # P-tuning v2: prefix keys and values from the loaded prefix encoder
    model.fine_tunes = tuple(part.description for part in (lora, prefix) if part is not None)
    if int8_head and model.tied_lm_head:
        quantize_lm_head(model)
    log.info("loaded %s on %s in %s%s%s%s", folder, device, dtype, f", INT{bits}" if bits else "",
             ", INT8 output layer" if int8_head else "", "".join(f", {part}" for part in model.fine_tunes))
    return tokenizer, model
