"""Our C++ CPU kernels, for the two places where torch's own are far from the memory bandwidth in
a decode step: quantized Linear layers (quant_matmul.cpp) and one-query-row attention to the KV
cache (decode_attention.cpp). Both need AVX-512, checked at run time.

They are built with torch's extension builder the first time a process asks for them on a machine
(about 15 s with g++ and ninja; later processes load the cached build) and registered as
`torch.ops.chatglm`. Everything here degrades to a reason string (another OS or CPU, no compiler,
a failed build): the callers then use torch's kernels and log why."""
from __future__ import annotations

import functools
import logging
import platform
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils import cpp_extension

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("quant_matmul.cpp", "decode_attention.cpp")]
EXTENSION = "chatglm_native_kernels"
QUANT_IN_FEATURES_MULTIPLE = {8: 16, 4: 64}  # what quant_linear's loads assume
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # what decode_attention is built for


@functools.lru_cache(maxsize=None)
def build_error() -> Optional[str]:
    """None once the extension is loaded into this process, else why it cannot be."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "is built for Linux on x86-64 only"
    log.info("loading %s (built once per machine with g++, about 15 s)", EXTENSION)
    try:
        cpp_extension.load(name=EXTENSION, sources=[str(path) for path in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - a missing compiler or ninja, a failed build
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"could not be built ({type(error).__name__}: {first_line}; it needs g++ and ninja)"
    return None


def quant_linear_unavailable(bits: int) -> Optional[str]:
    """None when `quant_linear` of this width runs here (loading the extension), else why not."""
    reason = build_error()
    if reason is None and not torch.ops.chatglm.quant_linear_supported(bits):
        reason = "needs a CPU with AVX-512" + (" and AVX512-BF16" if bits == 4 else "")
    return reason


def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 bits: int) -> torch.Tensor:
    """(x @ q^T) * scale + bias in float32, returned in x's dtype (x: [rows, in_features]; the
    weight in the published layout, quant/format.py). Ask `quant_linear_unavailable` first."""
    return torch.ops.chatglm.quant_linear(x, weight, scale, bias, bits)


@functools.lru_cache(maxsize=None)
def decode_attention_unavailable() -> Optional[str]:
    """None when `decode_attention` runs here (loading the extension), else why not."""
    reason = build_error()
    if reason is None and not torch.ops.chatglm.decode_attention_supported():
        reason = "needs a CPU with AVX-512"
    return reason


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """One query row per sequence, q [rows, heads, d], attending to the first lengths[i] positions
    of cache slot slots[i] of k, v [slots, heads, max_len, d] (bfloat16, read in place; as many
    key/value heads as query heads; d in ATTENTION_HEAD_DIMS): [rows, heads, d] in q's dtype.
    Ask `decode_attention_unavailable` first."""
    return torch.ops.chatglm.decode_attention(q, k, v, slots, lengths)
