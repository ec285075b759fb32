"""Token (and P-tuning prefix) embeddings, made without nn.Embedding's random start."""
from __future__ import annotations

import torch
from torch import nn


def unfilled_embedding(rows: int, width: int) -> nn.Embedding:
    """An nn.Embedding whose weight is left as allocated: every model here is filled by the
    loader or a state dict. (nn.Embedding's own normal_ init, made on the meta device as
    `GLMModel.empty` makes models, imports torch._dynamo: 1.5 s of every start on 2 cores.)"""
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))
