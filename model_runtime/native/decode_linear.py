"""Float Linear layers on our bfloat16 decode kernel (decode_matmul.cpp): torch's bfloat16 GEMV
reads the weights at about 20 GB/s on a 2-core Zen 4 where ours reads 30-33 (1.65x at one row,
still faster at 32; at 64 rows they are equal), so a decode step of a bfloat16 model on CPU
spends most of its time in torch's. The swap changes the class only: same parameters (ties
kept), same state_dict. Prefill-sized inputs go to torch's GEMM, in float32 where the CPU has
no bfloat16 arithmetic (torch's bfloat16 GEMM converts every element there and is several
times slower: benchmarks/cpu_isa.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import IN_FEATURES_MULTIPLE, bf16_arithmetic, first_isa, linear, linear_unavailable, log_fallback_once

DECODE_ROWS = 32  # input rows up to which our kernel is faster (measured at 1-64 rows, full-size shapes)


class DecodeLinear(nn.Linear):
    """nn.Linear that runs inputs of up to DECODE_ROWS rows through our kernel (its code path
    `isa`) when they and the weight are bfloat16 on CPU without autograd; anything else (a
    prefill, another device or dtype after `model.to`, training) goes to torch."""

    isa = "avx512"
    gemm_in_float32 = False  # prefill: torch's GEMM in float32 rather than bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16
                and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            if rows <= DECODE_ROWS and self.weight.is_contiguous():
                out = linear(x.reshape(rows, self.in_features), self.weight, None, self.bias, 16, self.isa)
                return out.view(*x.shape[:-1], self.out_features)
            if self.gemm_in_float32:
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of a bfloat16 CPU model a DecodeLinear on the fastest path of
    our kernel that runs here (building it on first use; nothing is built where none can run);
    returns how many were changed (0 where it cannot run, saying why once)."""
    isa, passed_over = first_isa(lambda isa: linear_unavailable(16, isa))
    if isa is None:
        log_fallback_once("bfloat16 Linear layers", passed_over)
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.in_features % IN_FEATURES_MULTIPLE[16] == 0:
            module.__class__ = DecodeLinear
            module.isa = isa
            module.gemm_in_float32 = not bf16_arithmetic()
            changed += 1
    return changed
