"""Next-token choice for one sequence: its own settings and its own random generator.

The logits processors are transformers' own (repetition penalty, temperature, top-k, top-p),
applied in the order the reference generation used. Temperature 0 means greedy.
"""
from __future__ import annotations

import secrets
from typing import Optional

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..protocol import SamplingParams

FAILSAFE_TOKEN = 5  # the reference puts all probability here when logits go NaN/inf
FAILSAFE_LOGIT = 5e4


def guard_non_finite(logits: torch.Tensor) -> torch.Tensor:
    """Rows holding NaN or inf become 'always pick FAILSAFE_TOKEN', as in the reference."""
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bad.any():
        logits = logits.clone()
        logits[bad] = 0.0
        logits[bad, FAILSAFE_TOKEN % logits.shape[-1]] = FAILSAFE_LOGIT
    return logits


class Sampler:
    """Picks the next token of one sequence. Seeded samplers repeat exactly."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        params.validate()
        self.greedy = params.temperature == 0
        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not self.greedy:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        # A private generator: concurrent requests never disturb each other's random streams.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> int:
        """logits [vocab] (float32) and the sequence so far [n] -> the next token id."""
        scores = guard_non_finite(logits[None])
        scores = self.processors(tokens[None], scores)
        if self.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
