"""Which device and dtype a model runs in, and whether it fits there."""
from __future__ import annotations

from typing import Optional, Union

import psutil
import torch

from ..models.config import CheckpointError, ModelConfig

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def pick_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """'auto' is CUDA, then Apple MPS, then CPU."""
    if str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                                  "(use --device cpu, or install a CUDA build of torch)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CheckpointError("--device mps was asked for, but Apple MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """The default: bfloat16 on CPUs and on GPUs that compute in it (compute capability 8.0
    and later: A100, RTX 30xx, H100...; its range never overflows, and the CUDA INT4 kernel
    takes only bfloat16), float16 on older GPUs and on Apple MPS."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: the GPU's own memory on CUDA, the system's elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(config: ModelConfig, device: torch.device, dtype: torch.dtype,
               quantize: Optional[int] = None) -> None:
    """Refuse up front, with advice, a model larger than the memory left on the device."""
    element = torch.empty((), dtype=dtype).element_size()
    h, f, layers = config.hidden_size, config.inner_hidden_size, config.num_layers
    linear_bytes = quantize / 8 if quantize else element
    needed = config.vocab_size * h * element + layers * (4 * h * h + 2 * h * f) * linear_bytes
    if hasattr(config, "parameter_counts"):  # ChatGLM2/3, GLM-4: grouped KV, SwiGLU, untied output
        other, block_linear = config.parameter_counts()
        needed = other * element + block_linear * linear_bytes
    if device.type not in ("cuda", "cpu"):
        return
    free = free_memory(device)
    if needed > free:
        raise CheckpointError(
            f"the model needs about {needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} but only "
            f"{free / 2**30:.1f} GiB is free on {device}: load it quantized (--quantize 8 or 4) or on "
            "another device")
