"""Our C++ CPU kernels, for the two places where torch's own are far from the memory bandwidth in
a decode step: Linear layers with few input rows, bfloat16 or quantized (decode_matmul.cpp), and
one-query-row attention to the KV cache (decode_attention.cpp). Both need AVX-512 (and
AVX512-BF16 for bfloat16 and INT4 weights), checked at run time.

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

SOURCES = [Path(__file__).with_name(name) for name in ("decode_matmul.cpp", "decode_attention.cpp")]
EXTENSION = "chatglm_native_kernels"
IN_FEATURES_MULTIPLE = {16: 32, 8: 16, 4: 64}  # what `linear`'s loads assume, per weight width
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


def linear_unavailable(bits: int) -> Optional[str]:
    """None when `linear` with weights of this width (16: bfloat16, 8 / 4: quantized) runs here
    (loading the extension), else why not."""
    reason = build_error()
    if reason is None and not torch.ops.chatglm.linear_supported(bits):
        reason = "needs a CPU with AVX-512" + ("" if bits == 8 else " and AVX512-BF16")
    return reason


def linear(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           bits: int) -> torch.Tensor:
    """x @ w^T (* scale) + bias, summed in float32, in x's dtype (x: [rows, in_features]). bits 16:
    a bfloat16 weight, no scale; 8 / 4: the published quantized layout (quant/format.py) and its
    per-row scale. Ask `linear_unavailable(bits)` first: it loads the extension."""
    return torch.ops.chatglm.linear(x, weight, scale, bias, bits)


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
