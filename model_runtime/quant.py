"""Weight-only INT8 / INT4 quantization of ChatGLM-6B, in the published THUDM storage format.

Only the four Linear layers of every block are quantized (`QUANTIZED_LAYERS`); embeddings, lm_head
and LayerNorms stay in floating point. Opt-in, `quantize_lm_head` computes ChatGLM-6B's logits from
an INT8 copy of the tied embedding (`QuantizedOutputLayer`; the embedding itself stays float).
Storage, exactly as `THUDM/chatglm-6b-int8` / `-int4` ship it (shared/docs/glm6b-spec.md,
"Quantized weights"): per output row
`weight_scale = max|w_row| / (2**(bits-1) - 1)` as float16 [out] and `q = round(w / scale)`;
INT8 `weight` is int8 [out, in]; INT4 `weight` is int8 [out, in/2], two signed nibbles per byte
with the EVEN element in the HIGH nibble. The bias stays floating point.

A `QuantizedLinear` keeps its weight inside a `LinearKernel`, the matmul backend chosen once per
(device, bits, activation dtype) at load time by `choose_kernel`. A kernel may hold the weight in
its own layout; `published()` always gives the storage format back (state_dict, saving).

Backends (`KERNELS`):
  dequant             any device, and MPS's path: dequantize per call, then a float matmul.
  cpu-int8pack        CPU, INT8, bfloat16 activations: torch's fused `_weight_int8pack_mm`, on the
                      published int8 layout as is (no second copy).
  cpu-int4pack        CPU, INT4, bfloat16 activations: torch's `_weight_int4pack_mm_for_cpu`, the
                      weights repacked once at load time (the published copy is dropped).
  cpu-fbgemm-dynamic  CPU, opt-in only (never chosen by "auto"): fbgemm int8 x int8, which also
                      quantizes the ACTIVATIONS on every call and so changes the model's numbers.
  cuda-torch          CUDA: torch's fused `_weight_int8pack_mm` (INT8) / `_weight_int4pack_mm`
                      (INT4, bfloat16 on sm80+). NOT TESTED ON A GPU HERE: a self-check on small
                      random shapes runs before first use and falls back to dequant on mismatch.
The CPU kernels switch to "dequantize the layer into a reused scratch buffer, then one bf16 GEMM"
for inputs of more than `gemm_above` rows (prompt prefill), which is several times faster there.

Numerics: for bfloat16 / float32 activations every kernel computes (x @ q^T) * scale + bias with
the scale and bias applied in float32 to the matmul output: the same maths as x @ (q * scale)^T,
without rounding q * scale to bfloat16 first (q itself is exact in bf16). For float16 activations
the weight is dequantized to float16 before the matmul (as the reference does), because x @ q^T
alone can overflow float16.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import shutil
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import CheckpointError

log = logging.getLogger(__name__)

BITS = (4, 8)
QUANTIZED_LAYERS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_QUANTIZE_ROWS = 256  # rows quantized (or repacked) at a time: bounds the temporaries


class QuantizationError(ValueError):
    """A quantization mode that cannot run here; the message says what to do instead."""


def check_bits(bits) -> int:
    if bits not in BITS or isinstance(bits, bool):
        raise QuantizationError(
            f"quantize={bits!r} is not supported: ChatGLM-6B quantizes to 8 bits (INT8, about 6.3 GiB "
            "of weights, closest to float) or 4 bits (INT4, about 3.7 GiB); leave quantize unset for "
            "float16/bfloat16")
    return int(bits)


# ---------------------------------------------------------------------------------------------
# The published format


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
    for start in range(0, out_features, _QUANTIZE_ROWS):
        rows = weight[start:start + _QUANTIZE_ROWS].to(torch.float32, copy=True)
        row_scale = (torch.linalg.vector_norm(rows, ord=float("inf"), dim=1) / limit).half()
        divisor = torch.where(row_scale == 0, 1.0, row_scale.float())[:, None]
        # w / scale rounded to float16 (the reference's arithmetic), then to an integer, half to even
        values = rows.div_(divisor).half().round_().clamp_(-limit - 1, limit).to(torch.int8)
        q[start:start + _QUANTIZE_ROWS] = pack_int4(values) if bits == 4 else values
        scale[start:start + _QUANTIZE_ROWS] = row_scale
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


# ---------------------------------------------------------------------------------------------
# Matmul backends


_scratch = threading.local()


def scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused per-thread buffer of at least `numel` elements (dequantized weights for prefill):
    on CPU, a fresh allocation of that size per call costs page faults that rival the GEMM."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, str(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # free the old one before allocating the larger one
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
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _scale_output(y: torch.Tensor, scale32: torch.Tensor, bias: Optional[torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """y * scale + bias, in float32, back to dtype (y is x @ q^T)."""
    if bias is None:
        return (y.float() * scale32).to(dtype)
    return torch.addcmul(bias.float(), y.float(), scale32).to(dtype)


class LinearKernel:
    """One quantized Linear's matmul: y = x @ (q * scale)^T + bias.

    `prepare(weight, scale, bits)` builds the kernel from the published format, once, at load time
    (it may repack and drop the given tensors); `kernel(x, bias)` runs it; `published()` gives the
    published (weight, weight_scale) back. Subclasses say where they run with `unavailable`."""

    name = "base"
    bit_widths = (4, 8)
    opt_in = False  # True: never chosen by "auto" (changes the numbers beyond weight quantization)

    @classmethod
    def unavailable(cls, device: torch.device, bits: int, dtype: torch.dtype) -> Optional[str]:
        """None when this backend can run here, else the reason why not."""
        return None

    @classmethod
    def prepare(cls, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> "LinearKernel":
        return cls(weight, scale, bits)

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bits: int):
        self.bits = bits
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1] * 8 // bits
        self.scale = scale.to(torch.float16).contiguous()
        self.scale32 = self.scale.float()

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return self.matmul(rows, bias).view(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def published(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes this kernel keeps (what a decode step reads)."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    @property
    def device(self) -> torch.device:
        return self.scale.device


class DequantKernel(LinearKernel):
    """Dequantize per call, then a float matmul: runs on every device (MPS's path), and is the
    fallback wherever no fused kernel fits. Keeps only the published tensors."""

    name = "dequant"

    def __init__(self, weight, scale, bits):
        super().__init__(weight, scale, bits)
        self.weight = weight.contiguous()

    def _q_into(self, dtype: torch.dtype) -> torch.Tensor:
        """q as a [out, in] float tensor (exact), in the CPU scratch buffer or a fresh one."""
        shape = (self.out_features, self.in_features)
        if self.weight.device.type == "cpu":
            out = scratch_buffer(shape[0] * shape[1], dtype, self.weight.device).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype, device=self.weight.device)
        if self.bits == 8:
            return out.copy_(self.weight)
        halves = out.view(shape[0], shape[1] // 2, 2)
        halves[..., 0].copy_(self.weight >> 4)
        halves[..., 1].copy_((self.weight << 4) >> 4)
        return out

    def matmul(self, x, bias):
        if x.dtype == torch.float16:  # x @ q^T could overflow float16: scale the weight first
            w = self._q_into(torch.float16).mul_(self.scale[:, None])
            return F.linear(x, w, bias)
        return _scale_output(F.linear(x, self._q_into(x.dtype)), self.scale32, bias, x.dtype)

    def published(self):
        return self.weight, self.scale


def _cpu_bf16_only(device, dtype) -> Optional[str]:
    if device.type != "cpu":
        return "runs on CPU only"
    if dtype != torch.bfloat16:
        return (f"needs bfloat16 activations (its {str(dtype).removeprefix('torch.')} path is 10-20x slower "
                "than dequantize-then-matmul); load with dtype=bfloat16")
    return None


class CpuInt8PackKernel(LinearKernel):
    """INT8 on CPU: torch's fused `_weight_int8pack_mm` (int8 weight, bfloat16 activations) reads
    the published [out, in] int8 layout directly. Many rows: one bf16 GEMM on the weight copied
    into the scratch buffer (int8 -> bf16 is exact)."""

    name = "cpu-int8pack"
    bit_widths = (8,)
    gemm_above = 12  # rows: above, copy-to-bf16 + one GEMM is faster (measured at 1-512 rows)

    @classmethod
    def unavailable(cls, device, bits, dtype):
        if bits != 8:
            return "is INT8 only"
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return f"needs torch.ops.aten._weight_int8pack_mm (torch >= 2.4; this is {torch.__version__})"
        return _cpu_bf16_only(device, dtype)

    def __init__(self, weight, scale, bits):
        super().__init__(weight, scale, bits)
        self.weight = weight.contiguous()
        self.ones = torch.ones(self.out_features, dtype=torch.bfloat16)

    def matmul(self, x, bias):
        if x.shape[0] <= self.gemm_above:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.ones)
        else:
            w = scratch_buffer(self.weight.numel(), x.dtype, x.device).view(self.weight.shape)
            y = F.linear(x, w.copy_(self.weight))
        return _scale_output(y, self.scale32, bias, x.dtype)

    def published(self):
        return self.weight, self.scale


@functools.lru_cache(maxsize=None)
def int4pack_block_rows() -> Optional[int]:
    """Rows per block of torch's CPU int4 layout on this CPU (64 with AVX-512, 32 with AVX2), found
    by packing probes and comparing with the layout we can unpack; None if it is neither."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 16, shape, dtype=torch.int32, generator=generator) for shape in ((128, 64), (64, 256))]
    for block in (64, 32):
        if all(torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), _blocked_int4(q, block))
               for q in probes):
            return block
    return None


def _blocked_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """Our model of torch's CPU int4 layout: rows in blocks of `block`; within a block, for each
    input column k, `block/2` bytes whose low nibble is row r and high nibble row r + block/2."""
    n, k = q.shape
    columns = q.view(n // block, block, k).transpose(1, 2)
    return (columns[..., :block // 2] | (columns[..., block // 2:] << 4)).to(torch.uint8).reshape(n, k // 2)


class CpuInt4PackKernel(LinearKernel):
    """INT4 on CPU: torch's `_weight_int4pack_mm_for_cpu` (bfloat16 activations). The weight is
    repacked once at load time into torch's layout (unsigned nibbles q + 8, rows blocked), with
    group scales 1 and zero points 0 so that the kernel returns x @ q^T exactly as q is stored;
    the float16 per-row scale is applied to the output (see the module docstring). Many rows:
    unpack into the scratch buffer, then one bf16 GEMM."""

    name = "cpu-int4pack"
    bit_widths = (4,)
    gemm_above = 128  # rows: above, unpack-to-bf16 + one GEMM is faster (measured at 1-512 rows)

    @classmethod
    def unavailable(cls, device, bits, dtype):
        if bits != 4:
            return "is INT4 only"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"needs torch.ops.aten._weight_int4pack_mm_for_cpu (torch >= 2.5; this is {torch.__version__})"
        if int4pack_block_rows() is None:
            return "does not recognise torch's int4 weight layout on this CPU"
        return _cpu_bf16_only(device, dtype)

    @classmethod
    def prepare(cls, weight, scale, bits):
        block = int4pack_block_rows()
        if weight.shape[0] % block or (weight.shape[1] * 2) % 32:
            return DequantKernel(weight, scale, bits)  # shapes the layout does not cover: tiny models only
        return cls(weight, scale, bits)

    def __init__(self, weight, scale, bits):
        super().__init__(weight, scale, bits)
        n, k = self.out_features, self.in_features
        self.block = int4pack_block_rows()
        self.group = next(g for g in (256, 128, 64, 32) if k % g == 0)
        # Repacked with our model of torch's layout (`_blocked_int4`, checked against torch's own
        # converter by `int4pack_block_rows`), in byte arithmetic: 2-3x faster than the converter.
        # Signed nibble -> unsigned q + 8 is XOR 8; block-aligned row chunks pack independently.
        self.packed = torch.empty(n, k // 2, dtype=torch.uint8)
        step = max(self.block, 2 * _QUANTIZE_ROWS // self.block * self.block)
        for start in range(0, n, step):
            stored = weight[start:start + step].view(torch.uint8)
            unsigned = torch.empty(stored.shape[0], k, dtype=torch.uint8)
            torch.bitwise_xor(stored >> 4, 8, out=unsigned[:, 0::2])
            torch.bitwise_xor(stored & 0xF, 8, out=unsigned[:, 1::2])
            self.packed[start:start + step] = _blocked_int4(unsigned, self.block)
        self.scales_and_zeros = _unit_scales_and_zeros(k // self.group, n)

    def _unsigned_into(self, out: torch.Tensor) -> torch.Tensor:
        """q + 8 of every weight, unpacked from torch's layout into out [n, k] (any dtype): the
        nibbles go to a [blocks, k, block] byte buffer without moving across k (fast), then one
        transposing copy puts rows back in order."""
        n, k, block = self.out_features, self.in_features, self.block
        packed = self.packed.view(n // block, k, block // 2)
        nibbles = scratch_buffer(n * k, torch.uint8, packed.device).view(n // block, k, block)
        torch.bitwise_and(packed, 0xF, out=nibbles[..., :block // 2])
        torch.bitwise_right_shift(packed, 4, out=nibbles[..., block // 2:])
        out.view(n // block, block, k).copy_(nibbles.transpose(1, 2))
        return out

    def matmul(self, x, bias):
        if x.shape[0] <= self.gemm_above:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)
        else:
            w = scratch_buffer(self.out_features * self.in_features, x.dtype, x.device)
            w = self._unsigned_into(w.view(self.out_features, self.in_features)).sub_(8)
            y = F.linear(x, w)
        return _scale_output(y, self.scale32, bias, x.dtype)

    def published(self):
        n, half, block = self.out_features, self.in_features // 2, self.block
        stored = torch.empty(n, half, dtype=torch.uint8)
        step = max(block, 2 * _QUANTIZE_ROWS // block * block)
        for start in range(0, n, step):
            packed = self.packed[start:start + step].view(-1, self.in_features, block // 2)
            unsigned = torch.cat([packed & 0xF, packed >> 4], dim=2).transpose(1, 2)  # [blocks, block, k]
            stored[start:start + step].view(-1, block, half).copy_(
                ((unsigned[..., 0::2] ^ 8) << 4) | (unsigned[..., 1::2] ^ 8))
        return stored.view(torch.int8), self.scale


@functools.lru_cache(maxsize=None)
def _unit_scales_and_zeros(groups: int, n: int, device: str = "cpu") -> torch.Tensor:
    """[groups, n, 2] bfloat16 of (scale 1, zero point 0): shared by every layer of that shape."""
    values = torch.zeros(groups, n, 2, dtype=torch.bfloat16, device=device)
    values[..., 0] = 1
    return values


class CpuFbgemmDynamicKernel(LinearKernel):
    """OPT-IN ONLY. fbgemm's dynamic int8 Linear: the weight is int8 per row (INT4 is widened to
    int8), and the ACTIVATIONS are quantized to int8 on every call too, so the outputs differ from
    the weight-only model by more than the weight quantization (tests and benchmarks/quant.py
    measure by how much). Fast on CPUs whose weight-only kernels are slow (AVX2)."""

    name = "cpu-fbgemm-dynamic"
    opt_in = True

    @classmethod
    def unavailable(cls, device, bits, dtype):
        if device.type != "cpu":
            return "runs on CPU only"
        if "fbgemm" not in torch.backends.quantized.supported_engines and \
                "x86" not in torch.backends.quantized.supported_engines:
            return "needs a torch build with fbgemm"
        return None

    def __init__(self, weight, scale, bits):
        super().__init__(weight, scale, bits)
        q = unpack_int4(weight) if bits == 4 else weight
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch deprecates quantized tensors; this opt-in path needs one
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(q.contiguous(), self.scale.double(), zeros, 0)
        self.packed_params = torch.ops.quantized.linear_prepack(quantized, None)

    def matmul(self, x, bias):
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed_params, True)
        return (y if bias is None else y + bias.float()).to(x.dtype)

    def published(self):
        weight, _ = torch.ops.quantized.linear_unpack(self.packed_params)
        q = weight.int_repr()
        return (pack_int4(q) if self.bits == 4 else q), self.scale

    def nbytes(self):
        return self.out_features * self.in_features + self.scale.numel() * 6


class CudaTorchKernel(LinearKernel):
    """CUDA (UNTESTED ON A GPU HERE: this project's machines have none; `choose_kernel` runs a
    self-check against dequant first and falls back with a warning). INT8: torch's fused
    `_weight_int8pack_mm`. INT4: torch's tinygemm `_weight_int4pack_mm` (bfloat16, sm80+), weights
    converted once (nibble order is the published one; signed -> unsigned is XOR 0x88)."""

    name = "cuda-torch"

    @classmethod
    def unavailable(cls, device, bits, dtype):
        if device.type != "cuda":
            return "runs on CUDA only"
        if bits == 8:
            if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                return f"needs torch.ops.aten._weight_int8pack_mm (this is torch {torch.__version__})"
            return None
        if dtype != torch.bfloat16:
            return "INT4 needs bfloat16 activations (torch's tinygemm kernel); load with dtype=bfloat16"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "INT4 needs an sm80+ GPU (torch's tinygemm kernel)"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return f"needs torch.ops.aten._weight_int4pack_mm (this is torch {torch.__version__})"
        return None

    @classmethod
    def prepare(cls, weight, scale, bits):
        if bits == 4 and ((weight.shape[1] * 2) % 128 or weight.shape[0] % 8):
            return DequantKernel(weight, scale, bits)  # shapes tinygemm's layout does not cover
        return cls(weight, scale, bits)

    def __init__(self, weight, scale, bits):
        super().__init__(weight, scale, bits)
        if bits == 8:
            self.weight = weight.contiguous()
            self.ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=weight.device)
        else:
            self.group = next(g for g in (128, 64, 32) if self.in_features % g == 0)
            unsigned = (weight.view(torch.uint8) ^ 0x88).contiguous()
            self.packed = torch.ops.aten._convert_weight_to_int4pack(unsigned, 8)
            self.scales_and_zeros = _unit_scales_and_zeros(self.in_features // self.group, self.out_features,
                                                           str(weight.device))

    def matmul(self, x, bias):
        if self.bits == 8:
            if x.dtype == torch.float16:  # exact scales, no float16 overflow of x @ q^T
                y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
                return y if bias is None else y + bias
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.ones.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scales_and_zeros)
        return _scale_output(y, self.scale32, bias, x.dtype)

    def published(self):
        if self.bits == 8:
            return self.weight, self.scale
        # x = identity rows give back q^T exactly (small integers are exact in bf16).
        columns = []
        for start in range(0, self.in_features, 1024):
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)[start:start + 1024]
            columns.append(torch.ops.aten._weight_int4pack_mm(eye, self.packed, self.group, self.scales_and_zeros))
        return pack_int4(torch.cat(columns).t().round().to(torch.int8)), self.scale


KERNELS = {kernel.name: kernel for kernel in
           (DequantKernel, CpuInt8PackKernel, CpuInt4PackKernel, CpuFbgemmDynamicKernel, CudaTorchKernel)}
_AUTO = {"cpu": ("cpu-int8pack", "cpu-int4pack"), "cuda": ("cuda-torch",)}


@functools.lru_cache(maxsize=None)
def _self_check(name: str, device: str, bits: int, dtype: torch.dtype) -> Optional[str]:
    """Run a backend once on small random shapes against the float64 reference; None when it
    agrees, else what went wrong (a kernel missing from this build, a wrong answer)."""
    generator = torch.Generator().manual_seed(0)
    weight, scale = quantize_weight(torch.randn(128, 256, generator=generator), bits)
    x = torch.randn(3, 256, generator=generator)
    expected = reference_linear(x, weight, scale, bits)
    try:
        kernel = KERNELS[name].prepare(weight.to(device), scale.to(device), bits)
        got = kernel(x.to(device, dtype)).double().cpu()
    except Exception as error:  # noqa: BLE001 - any failure means "do not use it here"
        return f"failed its self-check ({type(error).__name__}: {error})"
    error = ((got - expected).norm() / expected.norm()).item()
    return None if error < 0.02 else f"failed its self-check (relative error {error:.3g})"


def choose_kernel(device: Union[str, torch.device], bits: int, dtype: torch.dtype,
                  backend: str = "auto") -> type[LinearKernel]:
    return _choose_kernel(torch.device(device), check_bits(bits), dtype, backend)


@functools.lru_cache(maxsize=None)
def _choose_kernel(device: torch.device, bits: int, dtype: torch.dtype, backend: str) -> type[LinearKernel]:
    """The backend for quantized Linear layers on this device, chosen once at load time.

    backend "auto": the fused kernel for the device where it is available (and, on CUDA, passes
    a self-check), else "dequant" with a logged reason. A named backend that cannot run here
    raises QuantizationError saying why and what to use instead."""
    if backend != "auto":
        if backend not in KERNELS:
            raise QuantizationError(f"unknown quantization backend {backend!r}: use 'auto' or one of "
                                    f"{', '.join(KERNELS)}")
        reason = KERNELS[backend].unavailable(device, bits, dtype)
        if reason is None and device.type == "cuda":
            reason = _self_check(backend, str(device), bits, dtype)
        if reason:
            raise QuantizationError(f"quantization backend {backend!r} {reason}; use backend='auto' (picks "
                                    "what runs here) or 'dequant' (runs everywhere)")
        return KERNELS[backend]
    for name in _AUTO.get(device.type, ()):
        if bits not in KERNELS[name].bit_widths:
            continue
        reason = KERNELS[name].unavailable(device, bits, dtype)
        if reason is None and device.type == "cuda":
            reason = _self_check(name, str(device), bits, dtype)
        if reason is None:
            return KERNELS[name]
        log.warning("INT%d on %s: %s %s; using dequantize-then-matmul instead", bits, device, name, reason)
    return DequantKernel


# ---------------------------------------------------------------------------------------------
# The module


class QuantizedLinear(nn.Module):
    """A Linear layer with an INT8 / INT4 weight in the published format, computed by the backend
    kernel chosen for its device and compute dtype. `weight` and `weight_scale` read back the
    published tensors (the kernel may keep another layout); `state_dict()` and `load_state_dict()`
    use the published names, and `model.to(device / dtype)` re-prepares the kernel."""

    STORED = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, *,
                 device=None, dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        super().__init__()
        self.bits = check_bits(bits)
        if self.bits == 4 and in_features % 2:
            raise QuantizationError(f"INT4 needs an even number of input features, got {in_features}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        # Follows the module through .to()/to_empty(): where and in which dtype the kernel must run.
        self.register_buffer("_anchor", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.kernel: Optional[LinearKernel] = None
        self._pending: dict[str, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, backend: str = "auto") -> "QuantizedLinear":
        """Quantize a float nn.Linear (its weight is not kept)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bits, linear.bias is not None,
                     device=weight.device, dtype=weight.dtype, backend=backend)
        with torch.no_grad():
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
            module.load_tensor("weight", weight.detach())
        return module

    @property
    def ready(self) -> bool:
        return self.kernel is not None

    def load_tensor(self, leaf: str, tensor: torch.Tensor) -> None:
        """Take one checkpoint tensor: a float `weight` [out, in] (quantized here, on the spot), or
        a published-format `weight` / `weight_scale`. Raises ValueError when it does not fit."""
        device = self._anchor.device
        if leaf == "weight" and tensor.is_floating_point():
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise ValueError(f"has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{(self.out_features, self.in_features)}")
            source = tensor.to(device) if device.type == "cuda" else tensor  # quantize where it is fast
            self._prepare(*(t.to(device) for t in quantize_weight(source, self.bits)))
            return
        if leaf == "weight":
            shape = (self.out_features, self.in_features * self.bits // 8)
            if tensor.dtype not in (torch.int8, torch.uint8) or tuple(tensor.shape) != shape:
                found = f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"
                raise ValueError(f"is {found}, an INT{self.bits} weight of this layer is int8 {shape} (or a float weight "
                                 f"{(self.out_features, self.in_features)} to quantize)")
            self._pending["weight"] = tensor.view(torch.int8).to(device, copy=True)
        elif leaf == "weight_scale":
            if not tensor.is_floating_point() or tuple(tensor.shape) != (self.out_features,):
                raise ValueError(f"is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, expected "
                                 f"float16 ({self.out_features},)")
            self._pending["weight_scale"] = tensor.to(device, torch.float16, copy=True)
        else:
            raise ValueError(f"is not a tensor of a quantized Linear (expected {' or '.join(self.STORED)})")
        if len(self._pending) == 2:
            self._prepare(self._pending.pop("weight"), self._pending.pop("weight_scale"))

    def _prepare(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        kernel_class = choose_kernel(self._anchor.device, self.bits, self._anchor.dtype, self.backend)
        self.kernel = None  # drop an old kernel before building the new one
        self.kernel = kernel_class.prepare(weight, scale, self.bits)

    @property
    def weight(self) -> torch.Tensor:
        return self._published()[0]

    @property
    def weight_scale(self) -> torch.Tensor:
        return self._published()[1]

    def _published(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is None:
            raise RuntimeError(f"{self}: its weights were never loaded")
        return self.kernel.published()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{self}: its weights were never loaded")
        return self.kernel(x, self.bias)

    def _apply(self, fn, recurse=True):
        before = (self._anchor.device, self._anchor.dtype)
        super()._apply(fn, recurse)
        if self.kernel is not None and (self._anchor.device, self._anchor.dtype) != before:
            weight, scale = self.kernel.published()
            self._prepare(weight.to(self._anchor.device), scale.to(self._anchor.device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:
            weight, scale = self.kernel.published()
            destination[prefix + "weight"], destination[prefix + "weight_scale"] = weight, scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {prefix + leaf for leaf in self.STORED}
        rest = {key: value for key, value in state_dict.items() if key not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for leaf in self.STORED:
            if prefix + leaf in state_dict:
                try:
                    self.load_tensor(leaf, state_dict[prefix + leaf])
                except ValueError as error:
                    error_msgs.append(f"{prefix + leaf} {error}")
        if strict and self.kernel is None:
            missing_keys.extend(prefix + leaf for leaf in self.STORED if prefix + leaf not in state_dict)

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel is not None else "not loaded"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, kernel={kernel}")


class QuantizedOutputLayer(QuantizedLinear):
    """OPT-IN: ChatGLM-6B's output layer (lm_head, tied to the word embeddings) computed from an
    INT8 per-row copy of the embedding matrix, for decode speed: a decode step reads 0.53 GB
    instead of 1.07 GB of bfloat16 there. The embedding lookup keeps reading the exact bfloat16
    rows (model inputs do not change); only the logits carry the weight-quantization error
    (tests/test_quant.py bounds it; about 0.9% relative on random hidden states at full size).
    Costs the int8 copy in memory (+0.5 GiB at full size). Derived at load time, so it is never
    saved: checkpoints keep the tied float weight, and its state_dict is empty."""

    def __init__(self, embedding: nn.Embedding):
        weight = embedding.weight
        super().__init__(weight.shape[1], weight.shape[0], 8, bias=False, device=weight.device, dtype=weight.dtype)
        kernel_class = choose_kernel(weight.device, 8, weight.dtype)
        if kernel_class not in (CpuInt8PackKernel, CudaTorchKernel):
            raise QuantizationError(
                f"an INT8 lm_head needs a fused int8 kernel (CPU with bfloat16, or CUDA); on {weight.device} in "
                f"{str(weight.dtype).removeprefix('torch.')} it would be slower than the float one: leave it off")
        with torch.no_grad():
            self.load_tensor("weight", weight.detach())
        trim_heap()

    def _prepare(self, weight, scale):
        super()._prepare(weight, scale)
        # Always the fused kernel, at every batch size: its "many rows" path would dequantize
        # the whole 130528-row matrix into a 1 GiB scratch buffer.
        self.kernel.gemm_above = float("inf")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # derived from the embedding, which the state_dict holds

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        pass


# ---------------------------------------------------------------------------------------------
# Whole models


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


# ---------------------------------------------------------------------------------------------
# Saving


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
            from safetensors.torch import save_file
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
    """(name, getter, stored bytes) in the official order; getters return (cpu tensor, exact)."""
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
        if name.startswith("lm_head"):  # tied to the embeddings (also when computed by QuantizedOutputLayer)
            continue
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
