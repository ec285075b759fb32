"""Which kernel computes the quantized Linear layers on this device, chosen once at load time.

Backends (`KERNELS`):
  dequant             any device, and MPS's path: dequantize per call, then a float matmul.
  cpu-avx512          CPU with AVX-512 (INT4: and AVX512-BF16), bfloat16 activations: our own
                      kernel (native/decode_matmul.cpp, built with g++ on first use), on the published
                      layout as is; the first choice where it builds and the CPU has it.
  cpu-avx2            the same kernel's AVX2 + FMA path, for CPUs without AVX-512 (or with
                      CHATGLM_CPU_ISA=avx2, which turns the avx512 path off).
  cpu-int8pack        CPU, INT8, bfloat16 activations: torch's fused `_weight_int8pack_mm`, on the
                      published int8 layout as is (no second copy).
  cpu-int4pack        CPU, INT4, bfloat16 activations: torch's `_weight_int4pack_mm_for_cpu`, the
                      weights repacked once at load time (the published copy is dropped).
  cpu-fbgemm-dynamic  CPU, opt-in only (never chosen by "auto"): fbgemm int8 x int8, which also
                      quantizes the ACTIVATIONS on every call and so changes the model's numbers.
  cuda-torch          CUDA: torch's fused `_weight_int8pack_mm` (INT8) / `_weight_int4pack_mm`
                      (INT4, bfloat16 on sm80+).
torch's kernels are the fallback where ours cannot build or run. Their private aten ops change
between torch releases (requirements.txt allows 2.8-2.13). Every kernel says why it cannot run
(no compiler, op missing, unknown layout) and passes a self-check on small random shapes before
first use; "auto" takes the next one, and finally dequant, logging the reason.
The CPU kernels switch to "dequantize the layer into a reused scratch buffer, then one GEMM" for
inputs of more than `gemm_above` rows (prompt prefill), which is several times faster there (ours
in float32 where the CPU has no bfloat16 arithmetic).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch

from .cpu_kernels import (CpuAvx2Kernel, CpuAvx512Kernel, CpuFbgemmDynamicKernel, CpuInt4PackKernel,
                          CpuInt8PackKernel)
from .cuda_kernels import CudaTorchKernel
from .format import QuantizationError, check_bits, quantize_weight, reference_linear
from .kernel import DequantKernel, LinearKernel

log = logging.getLogger(__name__)

KERNELS = {kernel.name: kernel for kernel in
           (DequantKernel, CpuAvx512Kernel, CpuAvx2Kernel, CpuInt8PackKernel, CpuInt4PackKernel, CpuFbgemmDynamicKernel,
            CudaTorchKernel)}
_AUTO = {"cpu": ("cpu-avx512", "cpu-avx2", "cpu-int8pack", "cpu-int4pack"), "cuda": ("cuda-torch",)}


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

    backend "auto": the fused kernel for the device where it is available and passes its
    self-check, else "dequant" with a logged reason. A named backend that cannot run here
    raises QuantizationError saying why and what to use instead."""
    if backend != "auto":
        if backend not in KERNELS:
            raise QuantizationError(f"unknown quantization backend {backend!r}: use 'auto' or one of "
                                    f"{', '.join(KERNELS)}")
        reason = KERNELS[backend].unavailable(device, bits, dtype) or _self_check(backend, str(device), bits, dtype)
        if reason:
            raise QuantizationError(f"quantization backend {backend!r} {reason}; use backend='auto' (picks "
                                    "what runs here) or 'dequant' (runs everywhere)")
        return KERNELS[backend]
    passed_over = []
    for name in _AUTO.get(device.type, ()):
        if bits not in KERNELS[name].bit_widths:
            continue
        reason = KERNELS[name].unavailable(device, bits, dtype) or _self_check(name, str(device), bits, dtype)
        if reason is None:
            if passed_over:
                log.info("INT%d on %s: using %s (%s)", bits, device, name, "; ".join(passed_over))
            return KERNELS[name]
        passed_over.append(f"{name} {reason}")
    if passed_over:
        log.warning("INT%d on %s: %s; using dequantize-then-matmul instead", bits, device, "; ".join(passed_over))
    return DequantKernel
