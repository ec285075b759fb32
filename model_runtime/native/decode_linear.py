"""Float Linear layers on our bfloat16 decode kernel (decode_matmul.cpp): torch's bfloat16 GEMV
reads the weights at about 20 GB/s on a 2-core Zen 4 where ours reads 30-33 (1.65x at one row,
still faster at 32; at 64 rows they are equal), so a decode step of a bfloat16 model on CPU
spends most of its time in torch's. The swap changes the class only: same parameters (ties
kept), same state_dict."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import IN_FEATURES_MULTIPLE, linear, linear_unavailable

DECODE_ROWS = 32  # input rows up to which our kernel is faster (measured at 1-64 rows, full-size shapes)


class DecodeLinear(nn.Linear):
    """nn.Linear that runs inputs of up to DECODE_ROWS rows through our kernel when they and the
    weight are bfloat16 on CPU without autograd; anything else (a prefill, another device or
    dtype after `model.to`, training) goes to F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (rows <= DECODE_ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16
                and self.weight.is_contiguous() and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            out = linear(x.reshape(rows, self.in_features), self.weight, None, self.bias, 16)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of a bfloat16 CPU model a DecodeLinear where our kernel runs
    here (building it on first use); returns how many were changed (0 where it cannot run)."""
    if linear_unavailable(16):
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.in_features % IN_FEATURES_MULTIPLE[16] == 0:
            module.__class__ = DecodeLinear
            changed += 1
    return changed
