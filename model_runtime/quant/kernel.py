"""The interface of a quantized Linear's matmul, and the kernel that runs everywhere.

A `QuantizedLinear` keeps its weight inside a `LinearKernel`, the matmul backend chosen once per
(device, bits, activation dtype) at load time by `choose_kernel`. A kernel may hold the weight in
its own layout; `published()` always gives the storage format back (state_dict, saving).

Numerics: for bfloat16 / float32 activations every kernel computes (x @ q^T) * scale + bias with
the scale and bias applied in float32 to the matmul output: the same maths as x @ (q * scale)^T,
without rounding q * scale to bfloat16 first (q itself is exact in bf16). For float16 activations
the weight is dequantized to float16 before the matmul (as the reference does), because x @ q^T
alone can overflow float16.

"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .memory import scratch_buffer


def scale_output(y: torch.Tensor, scale32: torch.Tensor, bias: Optional[torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """y * scale + bias, in float32, back to dtype (y is x @ q^T)."""
    if bias is None:
        return (y.float() * scale32).to(dtype)
    return torch.addcmul(bias.float(), y.float(), scale32).to(dtype)


def aten_op_missing(op: str, device_type: str) -> Optional[str]:
    """Why `torch.ops.aten.<op>` cannot run on this device type with this torch, None if it can.
    These private ops come and go, and gain backends, between releases: `_weight_int8pack_mm`
    has a CUDA kernel only from torch 2.9 on, for example."""
    if not hasattr(torch.ops.aten, op):
        return f"needs torch.ops.aten.{op}, which torch {torch.__version__} does not have"
    if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"aten::{op}", device_type.upper()):
        return f"needs torch.ops.aten.{op} on {device_type}, which torch {torch.__version__} does not have"
    return None


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
        return scale_output(F.linear(x, self._q_into(x.dtype)), self.scale32, bias, x.dtype)

    def published(self):
        return self.weight, self.scale


@functools.lru_cache(maxsize=None)
def unit_scales_and_zeros(groups: int, n: int, device: str = "cpu") -> torch.Tensor:
    """[groups, n, 2] bfloat16 of (scale 1, zero point 0): shared by every layer of that shape."""
    values = torch.zeros(groups, n, 2, dtype=torch.bfloat16, device=device)
    values[..., 0] = 1
    return values
