"""The CPU kernels of quantized Linear layers (see backends.py for which runs when)."""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .. import native
from .format import QUANTIZE_ROWS, pack_int4, unpack_int4
from .kernel import DequantKernel, LinearKernel, aten_op_missing, scale_output, unit_scales_and_zeros
from .memory import scratch_buffer


def _cpu_bf16_only(device, dtype) -> Optional[str]:
    if device.type != "cpu":
        return "runs on CPU only"
    if dtype != torch.bfloat16:
        return (f"needs bfloat16 activations (its {str(dtype).removeprefix('torch.')} path is 10-20x slower "
                "than dequantize-then-matmul); load with dtype=bfloat16")
    return None


class CpuNativeKernel(DequantKernel):
    """INT8 and INT4 on x86-64 CPUs: our own fused kernel (native/decode_matmul.cpp, built on
    first use) on the published layout as is, with no second copy, on the code path `isa`.
    Decode-sized inputs read each weight byte once at close to the memory bandwidth (torch's
    int8pack / int4pack kernels are compute-bound there: benchmarks/quant.py). Many rows:
    dequantize into the scratch buffer, then one GEMM, in bfloat16 where the CPU multiplies it
    natively, else in float32 (torch's bfloat16 GEMM converts every element there and is several
    times slower: benchmarks/cpu_isa.py)."""

    isa = ""
    gemm_above_rows: dict[int, int] = {}  # by bits: rows above which dequantize + GEMM is faster

    @classmethod
    def unavailable(cls, device, bits, dtype):
        return _cpu_bf16_only(device, dtype) or native.linear_unavailable(bits, cls.isa)

    @classmethod
    def prepare(cls, weight, scale, bits):
        if (weight.shape[1] * 8 // bits) % native.IN_FEATURES_MULTIPLE[bits]:
            return DequantKernel(weight, scale, bits)  # shapes the kernel does not cover: tiny models only
        return cls(weight, scale, bits)

    def __init__(self, weight, scale, bits):
        super().__init__(weight, scale, bits)
        reason = native.linear_unavailable(bits, self.isa)
        if reason:
            raise RuntimeError(f"{self.name} {reason}")
        self.gemm_above = self.gemm_above_rows[bits]
        self.gemm_dtype = native.dequantized_gemm_dtype()

    def matmul(self, x, bias):
        if x.shape[0] <= self.gemm_above:
            return native.linear(x, self.weight, self.scale32, bias, self.bits, self.isa)
        y = F.linear(x.to(self.gemm_dtype), self._q_into(self.gemm_dtype))
        return scale_output(y, self.scale32, bias, x.dtype)


class CpuAvx512Kernel(CpuNativeKernel):
    """CpuNativeKernel's AVX-512 path (INT4: also AVX512-BF16)."""

    name = "cpu-avx512"
    isa = "avx512"
    gemm_above_rows = {8: 32, 4: 128}  # measured at 1-64 rows, full-size shapes, against a bfloat16 GEMM


class CpuAvx2Kernel(CpuNativeKernel):
    """CpuNativeKernel's AVX2 + FMA path: most laptops, desktops and cloud VMs without AVX-512."""

    name = "cpu-avx2"
    isa = "avx2"
    # against dequantize + float32 GEMM, 16384x4096 at 8-128 rows (2-core Zen 4, forced): the kernel
    # is still faster at 128 rows (INT8 0.79 against 0.91 s, INT4 0.99 against 1.31 s)
    gemm_above_rows = {8: 128, 4: 128}


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
        return _cpu_bf16_only(device, dtype) or aten_op_missing("_weight_int8pack_mm", "cpu")

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
        return scale_output(y, self.scale32, bias, x.dtype)

    def published(self):
        return self.weight, self.scale


@functools.lru_cache(maxsize=None)
def int4pack_block_rows() -> Optional[int]:
    """Rows per block of torch's CPU int4 layout on this CPU (64 with AVX-512, 32 with AVX2), found
    by packing probes and comparing with the layout we can unpack; None if it is neither."""
    if aten_op_missing("_convert_weight_to_int4pack_for_cpu", "cpu"):
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
        reason = _cpu_bf16_only(device, dtype) or aten_op_missing("_weight_int4pack_mm_for_cpu", "cpu")
        if reason is None and int4pack_block_rows() is None:
            return f"does not recognise the int4 weight layout of torch {torch.__version__} on this CPU"
        return reason

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
        step = max(self.block, 2 * QUANTIZE_ROWS // self.block * self.block)
        for start in range(0, n, step):
            stored = weight[start:start + step].view(torch.uint8)
            unsigned = torch.empty(stored.shape[0], k, dtype=torch.uint8)
            torch.bitwise_xor(stored >> 4, 8, out=unsigned[:, 0::2])
            torch.bitwise_xor(stored & 0xF, 8, out=unsigned[:, 1::2])
            self.packed[start:start + step] = _blocked_int4(unsigned, self.block)
        self.scales_and_zeros = unit_scales_and_zeros(k // self.group, n)

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
        return scale_output(y, self.scale32, bias, x.dtype)

    def published(self):
        n, half, block = self.out_features, self.in_features // 2, self.block
        stored = torch.empty(n, half, dtype=torch.uint8)
        step = max(block, 2 * QUANTIZE_ROWS // block * block)
        for start in range(0, n, step):
            packed = self.packed[start:start + step].view(-1, self.in_features, block // 2)
            unsigned = torch.cat([packed & 0xF, packed >> 4], dim=2).transpose(1, 2)  # [blocks, block, k]
            stored[start:start + step].view(-1, block, half).copy_(
                ((unsigned[..., 0::2] ^ 8) << 4) | (unsigned[..., 1::2] ^ 8))
        return stored.view(torch.int8), self.scale


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
