"""Memory the quantized kernels, the loader and the KV cache manage by hand: reused scratch
buffers for dequantized weights, handing freed heap back to the OS, and the C library whose
calls (malloc_trim, madvise, mprotect) do it."""
from __future__ import annotations

import ctypes
import functools
import threading

import torch

_scratch = threading.local()


def scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused per-thread buffer of at least `numel` elements (dequantized weights for prefill):
    on CPU, a fresh allocation of that size per call costs page faults that rival the GEMM."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, str(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # free the old one before allocating the larger one
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are kept between forwards on purpose)."""
    _scratch.__dict__.pop("buffers", None)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc; a no-op elsewhere). Quantizing and repacking
    free many temporaries of a few MB between long-lived tensors; glibc keeps those holes, which
    measured 0.45 GiB of RSS after loading INT4 ChatGLM-6B."""
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=None)
def libc() -> ctypes.CDLL:
    """This process's C library (where there is none, CDLL raises OSError)."""
    return ctypes.CDLL(None, use_errno=True)
