"""The CUDA kernel of quantized Linear layers (see backends.py for its self-check)."""
from __future__ import annotations

import torch

from .format import pack_int4
from .kernel import DequantKernel, LinearKernel, aten_op_missing, scale_output, unit_scales_and_zeros


class CudaTorchKernel(LinearKernel):
    """CUDA (UNTESTED ON A GPU HERE: this project's machines have none; `choose_kernel` runs a
    self-check against dequant first and falls back with a warning). INT8: torch's fused
    `_weight_int8pack_mm` (CUDA kernel from torch 2.9 on; torch 2.8 falls back to dequant). INT4:
    torch's tinygemm `_weight_int4pack_mm` (bfloat16, sm80+), weights converted once (nibble order
    is the published one; signed -> unsigned is XOR 0x88)."""

    name = "cuda-torch"

    @classmethod
    def unavailable(cls, device, bits, dtype):
        if device.type != "cuda":
            return "runs on CUDA only"
        if bits == 8:
            return aten_op_missing("_weight_int8pack_mm", "cuda")  # torch 2.9+
        if dtype != torch.bfloat16:
            return "INT4 needs bfloat16 activations (torch's tinygemm kernel); load with dtype=bfloat16"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "INT4 needs an sm80+ GPU (torch's tinygemm kernel)"
        return (aten_op_missing("_convert_weight_to_int4pack", "cuda")
                or aten_op_missing("_weight_int4pack_mm", "cuda"))

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
            self.scales_and_zeros = unit_scales_and_zeros(self.in_features // self.group, self.out_features,
                                                           str(weight.device))

    def matmul(self, x, bias):
        if self.bits == 8:
            if x.dtype == torch.float16:  # exact scales, no float16 overflow of x @ q^T
                y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
                return y if bias is None else y + bias
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.ones.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scales_and_zeros)
        return scale_output(y, self.scale32, bias, x.dtype)

    def published(self):
        if self.bits == 8:
            return self.weight, self.scale
        # x = identity rows give back q^T exactly (small integers are exact in bf16).
        columns = []
        for start in range(0, self.in_features, 1024):
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)[start:start + 1024]
            columns.append(torch.ops.aten._weight_int4pack_mm(eye, self.packed, self.group, self.scales_and_zeros))
        return pack_int4(torch.cat(columns).t().round().to(torch.int8)), self.scale
