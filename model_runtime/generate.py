"""The generation loop: prefill, then one batched decode step at a time.

`DecodeBatch` owns the model's static KV cache as a set of slots. A `Sequence` takes a slot,
is prefilled, then advances one token per `step()` together with every other live sequence, and
gives its slot back when it finishes. `model.chat`, `stream_chat`, `generate` and the serving
engine all drive this one loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .model import ChatGLMModel, SequenceLayout, attention_mask
from .protocol import SamplingParams
from .sampling import Sampler


@dataclass(eq=False)
class Sequence:
    """One answer being generated: prompt tokens, tokens so far, limits and sampler."""

    prompt: list[int]
    sampler: Sampler
    max_length: int  # prompt plus answer, in tokens
    stop_ids: frozenset[int]
    layout: SequenceLayout
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    finish_reason: Optional[str] = None  # "stop" | "length" once finished

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        """The answer's tokens, without the stop token."""
        answer = self.tokens[len(self.prompt):]
        return answer[:-1] if self.finish_reason == "stop" else answer

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_length:
            self.finish_reason = "length"


def new_sequence(model: ChatGLMModel, prompt: list[int], params: SamplingParams,
                 stop_ids: Iterable[int] = ()) -> Sequence:
    """A sequence whose answer ends at <eop> (or any stop id) or at params' length limits."""
    limit = min(params.max_length, model.config.max_sequence_length)
    if params.max_new_tokens is not None:
        limit = min(limit, len(prompt) + params.max_new_tokens)
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens, which leaves no room for an answer "
                         f"within max_length={limit}")
    stops = frozenset(stop_ids) | {model.config.eos_token_id}
    return Sequence(prompt=list(prompt), sampler=Sampler(params, model.device), max_length=limit,
                    stop_ids=stops, layout=model.layout_for_prompt(prompt))


class DecodeBatch:
    """The KV-cache slots of one model and the batched forward passes over them."""

    def __init__(self, model: ChatGLMModel, slots: int, max_len: int, vocab_size: Optional[int] = None):
        """vocab_size: the tokenizer's; the model's output layer may be padded beyond it
        (130528 vs 130344 for ChatGLM-6B) and those ids must never be sampled."""
        self.model = model
        self.vocab_size = vocab_size
        model.setup_kv_cache(slots, max_len)
        self.max_len = model.cache_len
        self.free_slots = list(range(slots))

    def admit(self, seq: Sequence) -> bool:
        """Give seq a slot; False when none is free."""
        if not self.free_slots:
            return False
        if seq.max_length > self.max_len:
            seq.max_length = self.max_len  # the cache bounds every sequence
        seq.slot = self.free_slots.pop(0)
        return True

    def release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            seq.slot = -1

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> None:
        """Run the prompts of newly admitted sequences (right-padded together) and sample each
        one's first answer token."""
        device = self.model.device
        length = max(len(s.prompt) for s in seqs)
        tokens = torch.full((len(seqs), length), self.model.config.pad_token_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq.prompt)] = torch.tensor(seq.prompt)
        # Padding writes past each prompt's end; those cache cells are overwritten by the next
        # token before any query can see them (a query at p sees only the prefix and j <= p).
        positions = torch.stack([s.layout.positions(0, length) for s in seqs])
        cache_positions = torch.arange(length).expand(len(seqs), length)
        last = torch.tensor([len(s.prompt) - 1 for s in seqs], device=device)
        hidden = self._forward(seqs, tokens, positions, cache_positions, length)
        self._sample(seqs, hidden[torch.arange(len(seqs), device=device), last])

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> None:
        """Feed every sequence's newest token, all in one forward, and sample the next."""
        index = torch.tensor([len(s.tokens) - 1 for s in seqs])
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs])
        positions = torch.stack([s.layout.positions(i, i + 1) for s, i in zip(seqs, index.tolist())])
        hidden = self._forward(seqs, tokens, positions, index[:, None], int(index.max()) + 1)
        self._sample(seqs, hidden[:, -1])

    def _forward(self, seqs, tokens, positions, cache_positions, kv_len):
        device = self.model.device
        prefix_lens = torch.tensor([s.layout.prefix_len for s in seqs])
        mask = attention_mask(prefix_lens, cache_positions, kv_len)
        slots = torch.tensor([s.slot for s in seqs])
        return self.model(tokens.to(device), positions.to(device), cache_positions.to(device),
                          mask.to(device), slots.to(device))

    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        logits = self.model.logits(hidden)[:, :self.vocab_size]
        # Sample every row before appending any: if one sampler raises, no sequence has moved,
        # so the caller may retry the step for each sequence alone.
        chosen = [seq.sampler(logits[row], torch.tensor(seq.tokens, device=logits.device))
                  for row, seq in enumerate(seqs)]
        for seq, token in zip(seqs, chosen):
            seq.append(token)


def generate(model: ChatGLMModel, prompts: list[list[int]], params: SamplingParams,
             vocab_size: Optional[int] = None, stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """Answer tokens for a batch of encoded prompts of any lengths, decoded together."""
    seqs = [new_sequence(model, prompt, params, stop_ids) for prompt in prompts]
    batch = DecodeBatch(model, slots=len(seqs), max_len=max(s.max_length for s in seqs), vocab_size=vocab_size)
    for seq in seqs:
        batch.admit(seq)
    batch.prefill(seqs)
    live = [s for s in seqs if not s.finished]
    while live:
        batch.step(live)
        live = [s for s in live if not s.finished]
    return [s.generated for s in seqs]
