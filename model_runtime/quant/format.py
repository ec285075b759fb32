"""The published INT8 / INT4 storage format and its reference arithmetic.

Storage, exactly as `THUDM/chatglm-6b-int8` / `-int4` ship it (shared/docs/glm6b-spec.md,
"Quantized weights"): per output row
`weight_scale = max|w_row| / (2**(bits-1) - 1)` as float16 [out] and `q = round(w / scale)`;
INT8 `weight` is int8 [out, in]; INT4 `weight` is int8 [out, in/2], two signed nibbles per byte
with the EVEN element in the HIGH nibble. The bias stays floating point.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BITS = (4, 8)
QUANTIZE_ROWS = 256  # rows quantized (or repacked) at a time: bounds the temporaries


class QuantizationError(ValueError):
    """A quantization mode that cannot run here; the message says what to do instead."""


def check_bits(bits) -> int:
    if bits not in BITS or isinstance(bits, bool):
        raise QuantizationError(
            f"quantize={bits!r} is not supported: ChatGLM-6B quantizes to 8 bits (INT8, about 6.3 GiB "
            "of weights, closest to float) or 4 bits (INT4, about 3.7 GiB); leave quantize unset for "
            "float16/bfloat16")
    return int(bits)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [out, in] -> (weight int8 [out, in * bits / 8], weight_scale float16 [out]).

    Bit-exact with the reference quantizer, which works in float16 arithmetic: the scale is
    max|w_row| / (2**(bits-1) - 1) rounded to float16, and w / scale is rounded to float16 before
    rounding to an integer (half to even). Rows that are all zero get scale 0 and q 0."""
    check_bits(bits)
    out_features, in_features = weight.shape
    if bits == 4 and in_features % 2:
        raise QuantizationError(f"INT4 needs an even number of input features, got {in_features}")
    limit = 2 ** (bits - 1) - 1
    q = torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float16, device=weight.device)
    for start in range(0, out_features, QUANTIZE_ROWS):
        rows = weight[start:start + QUANTIZE_ROWS].to(torch.float32, copy=True)
        row_scale = (torch.linalg.vector_norm(rows, ord=float("inf"), dim=1) / limit).half()
        divisor = torch.where(row_scale == 0, 1.0, row_scale.float())[:, None]
        # w / scale rounded to float16 (the reference's arithmetic), then to an integer, half to even
        values = rows.div_(divisor).half().round_().clamp_(-limit - 1, limit).to(torch.int8)
        q[start:start + QUANTIZE_ROWS] = pack_int4(values) if bits == 4 else values
        scale[start:start + QUANTIZE_ROWS] = row_scale
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values (int8 tensor, [..., 2n], each in [-8, 7]) -> int8 [..., n] with
    byte j = (q[2j] << 4) | (q[2j+1] & 0xF): the even element in the HIGH nibble."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"INT4 packing needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.int8)
    return (q[..., 0::2] << 4) | (q[..., 1::2] & 0xF)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., n] packed as by `pack_int4` -> signed int4 values as int8 [..., 2n]."""
    packed = packed.to(torch.int8)
    high = packed >> 4  # arithmetic shift: sign-extends the high nibble
    low = (packed << 4) >> 4  # the low nibble moved up, then sign-extended back down
    return torch.stack([high, low], dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] a published-format (weight, weight_scale) stands for: q * scale,
    computed in `dtype` (float32 is exact: q has at most 8 and the scale 11 significant bits)."""
    q = unpack_int4(weight) if check_bits(bits) == 4 else weight
    return q.to(dtype) * scale.to(dtype)[:, None]


def reference_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain dequantize-then-matmul in float64: the yardstick every backend is tested against."""
    w = dequantize(weight, scale, bits, torch.float64)
    return F.linear(x.double(), w, None if bias is None else bias.double())
