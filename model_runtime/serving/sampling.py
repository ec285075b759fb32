"""Next-token choice for a whole batch at once: the same tensor operations for every row,
whatever each row's settings, and one device-to-host copy per step.

Each sequence keeps its own settings and its own random generator, so seeded sequences repeat
exactly and concurrent requests never disturb each other's random streams. The distribution is
the one transformers' processors give, in the reference order: repetition penalty, temperature,
top-k, top-p (tests compare the two); temperature 0 means greedy. A row is drawn by the
exponential race, the argmax of p / E with E ~ Exp(1) from the row's generator: it picks token i
with probability p_i, as `torch.multinomial` does, without a host sync per row.
"""
from __future__ import annotations

import secrets
from typing import Optional, Sequence

import torch

from ..protocol import SamplingParams

FAILSAFE_TOKEN = 5  # the reference puts all probability here when logits go NaN/inf
FAILSAFE_LOGIT = 5e4


class SamplingError(ValueError):
    """A row's probabilities are not a distribution (they overflowed): nothing was appended."""


def guard_non_finite(logits: torch.Tensor) -> torch.Tensor:
    """Rows holding NaN or inf become 'always pick FAILSAFE_TOKEN', as in the reference."""
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    failsafe = torch.zeros_like(logits)
    failsafe[:, FAILSAFE_TOKEN % logits.shape[-1]] = FAILSAFE_LOGIT
    return torch.where(bad, failsafe, logits)


class Sampler:
    """One sequence's sampling settings and private random generator."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        params.validate()
        self.params = params
        self.greedy = params.temperature == 0
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)


def penalize_repeats(scores: torch.Tensor, samplers: Sequence[Sampler], seen: Sequence[Sequence[int]]) -> torch.Tensor:
    """transformers' repetition penalty, in place: the scores of the tokens a row has seen are
    divided (if positive) or multiplied (if negative) by the row's penalty."""
    for row, (sampler, tokens) in enumerate(zip(samplers, seen)):
        penalty = sampler.params.repetition_penalty
        if penalty != 1.0:
            ids = torch.tensor(tokens, device=scores.device)
            picked = scores[row].gather(0, ids)
            scores[row].scatter_(0, ids, torch.where(picked < 0, picked * penalty, picked / penalty))
    return scores


def filtered_probabilities(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor) -> torch.Tensor:
    """Softmax of scores / temperature over each row's top-k, then top-p, tokens (the others
    get 0). temperature [B] > 0; top_k [B], 0 for no limit; top_p [B] in (0, 1]."""
    scores = scores / temperature[:, None]
    ordered, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device)
    limit = torch.where(top_k > 0, top_k, scores.shape[-1])
    ordered = ordered.masked_fill(ranks >= limit[:, None], float("-inf"))
    # top-p: a token goes when the tokens ranked above it already hold top_p (the first always
    # stays): what transformers' TopPLogitsWarper removes, counted from the other end.
    probs = ordered.softmax(dim=-1)
    ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], float("-inf"))
    return torch.zeros_like(scores).scatter_(-1, order, ordered.softmax(dim=-1))


def sample(logits: torch.Tensor, samplers: Sequence[Sampler], seen: Sequence[Sequence[int]]) -> list[int]:
    """The next token of every row: logits [B, vocab], seen[row] the row's tokens so far.
    SamplingError if a row's probabilities overflowed (then no row was sampled)."""
    device = logits.device
    scores = penalize_repeats(guard_non_finite(logits.float()), samplers, seen)
    chosen = scores.argmax(dim=-1)
    valid = torch.ones_like(chosen, dtype=torch.bool)
    random_rows = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=device)
        settings = [samplers[row].params for row in random_rows]
        probs = filtered_probabilities(
            scores[rows], torch.tensor([p.temperature for p in settings], device=device),
            torch.tensor([p.top_k for p in settings], device=device),
            torch.tensor([p.top_p for p in settings], device=device))
        races = torch.stack([torch.empty(probs.shape[-1], device=device).exponential_(generator=samplers[row].generator)
                             for row in random_rows])
        chosen[rows] = (probs / races).argmax(dim=-1)
        valid[rows] = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    tokens, ok = torch.stack([chosen, valid.long()]).tolist()  # the step's one host sync
    if not all(ok):
        raise SamplingError(f"the probabilities of row {ok.index(0)} are not finite (the logits overflowed)")
    return tokens
