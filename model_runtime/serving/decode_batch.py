"""The decode batch: a KV cache of slots, and the batched prefill and decode steps over them.

`DecodeBatch` owns a static KV cache (allocated by the model, passed to its forward) as a set of
slots. A `Sequence` takes a slot, is prefilled, then advances one token per `step()` together
with every other live sequence, and gives its slot back when it finishes. `model.chat`,
`stream_chat`, `generate` and the serving engine all drive this one loop, each on its own batch:
they never share keys and values.

With causal models (ChatGLM2/3, GLM-4: layout prefix_len 0) the batch keeps, in `slot_contents`,
the tokens whose keys and values a free slot still holds, with the `cache_salt` of the sequence
that left them. `admit` gives a new sequence the free slot whose tokens share the longest prefix
with its prompt, among those left with the same non-None salt, and `prefill` then runs only the
rest of the prompt (`Sequence.cached` says how many tokens were reused): a conversation's next
turn prefills only the new text. Keys and values depend only on the tokens before them, so this
computes the same numbers as a full prefill. The salt keeps the reuse, and so the time a prefill
takes, from telling one user what another one sent.

A `token_budget` bounds the tokens the slots may hold together (on the CPU the cache costs the
memory of what it holds: kv_cache.CommittedOnWrite): `admit` reserves a sequence's max_length
(prompt plus answer) against it, dropping free slots' cached turns (least recently released
first) when they are in the way, and refuses while running sequences' reservations leave too
little; a sequence gives its reservation back, and the pages past what its slot keeps, when it
leaves.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol, Sequence as Seq

import torch

from ..models.kv_cache import KVCache, PromptChunk, attention_mask
from ..protocol import SamplingParams
from .layerwise import LayerwisePrefill, attention_share
from .sampling import Sampler, sample


class Layout(Protocol):
    """Where a prompt's tokens go (a model's `layout_for_prompt`): `prefix_len` tokens seen
    bidirectionally (0 for causal models), and positions in the model's own format."""

    prefix_len: int

    def positions(self, start: int, end: int) -> torch.Tensor: ...


class DecodableModel(Protocol):
    """What a decode batch needs of a model (`models.base.GLMModel` has it all)."""

    config: Any
    causal: bool
    weights_version: int
    device: torch.device
    transformer: Any  # word_embeddings, layers (write_keys / finish), final_layernorm: for layerwise.py
    rotary: Any

    def layout_for_prompt(self, prompt: list[int]) -> Layout: ...

    def new_kv_cache(self, slots: int, max_len: int) -> KVCache: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_positions: torch.Tensor,
                 mask: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor: ...


@dataclass(eq=False)
class Sequence:
    """One answer being generated: prompt tokens, tokens so far, limits and sampler."""

    prompt: list[int]
    sampler: Sampler
    max_length: int  # prompt plus answer, in tokens
    stop_ids: frozenset[int]
    layout: Layout
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    cached: int = 0  # prompt tokens whose keys/values were already in the slot (not prefilled)
    kv_len: int = 0  # tokens whose keys/values are in the slot now
    finish_reason: Optional[str] = None  # "stop" | "length" once finished
    cache_salt: Optional[str] = None  # KV reuse only with sequences of the same salt; None: none

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

    @property
    def prefilling(self) -> bool:
        """Its prompt is not read yet (no answer token so far)."""
        return len(self.tokens) == len(self.prompt)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_length:
            self.finish_reason = "length"


def new_sequence(model: DecodableModel, prompt: list[int], params: SamplingParams,
                 stop_ids: Iterable[int] = (), cache_salt: Optional[str] = None) -> Sequence:
    """A sequence whose answer ends at <eop> (or any stop id) or at params' length limits."""
    limit = min(params.max_length, model.config.max_sequence_length)
    if params.max_new_tokens is not None:
        limit = min(limit, len(prompt) + params.max_new_tokens)
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens, which leaves no room for an answer "
                         f"within max_length={limit}")
    stops = frozenset(stop_ids) | set(model.config.eos_token_ids)
    return Sequence(prompt=list(prompt), sampler=Sampler(params, model.device), max_length=limit,
                    stop_ids=stops, layout=model.layout_for_prompt(prompt), cache_salt=cache_salt)


def chunk_cost(start: int, tokens: int, hidden_size: int) -> float:
    """The work of reading prompt tokens start..start+tokens-1 in one chunk, in tokens' worth of
    matrix products: each token also attends to those before it (layerwise.attention_share)."""
    return tokens * (1 + attention_share(start + tokens / 2, hidden_size))


def chunk_size(start: int, todo: int, budget: float, hidden_size: int) -> int:
    """The most of `todo` tokens from start whose chunk_cost fits budget (at least 1)."""
    if chunk_cost(start, todo, hidden_size) <= budget:
        return todo
    a = 6 * hidden_size  # chunk_cost = n * (1 + start / a) + n^2 / (2 * a): solve for n
    b = 1 + start / a
    return max(1, min(todo, int(a * (math.sqrt(b * b + 2 * budget / a) - b) + 1e-6)))  # + rounding


def shared_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    """Length of the common prefix of two token lists, at most limit."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


CUDA_GRAPHS = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}  # torch.compile's options
# "reduce-overhead" compiles on a step's first call, warms up on the next, records its CUDA graph on the third
WARM_UP_STEPS = 3


class DecodeBatch:
    """A KV cache of `slots` rows and the batched forward passes over them.

    A decode step normally runs only the live sequences, each attending to its own slot in place
    (shapes change every step). With `whole_decode` it runs every slot at once instead, with
    fixed shapes: row i is slot i, the mask says which columns each row sees, and rows of free
    slots write into one spare slot, so nothing cached for reuse is touched. That is the form
    a CUDA graph can capture: `compile_options` (e.g. CUDA_GRAPHS) compiles the model's forward
    for it with torch.compile. It attends to the whole cache, so it pays when one step's launch
    overhead outweighs reading the unused columns (GPUs, short contexts, few slots)."""

    def __init__(self, model: DecodableModel, slots: int, max_len: int, vocab_size: Optional[int] = None, *,
                 whole_decode: bool = False, compile_options: Optional[dict] = None,
                 token_budget: Optional[int] = None):
        """vocab_size: the tokenizer's; the model's output layer may be padded beyond it
        (130528 vs 130344 for ChatGLM-6B) and those ids must never be sampled.
        compile_options: torch.compile arguments for the decode step; implies whole_decode.
        token_budget: tokens all slots may hold together (at least one whole context; None:
        every slot its whole context)."""
        self.model = model
        self.vocab_size = vocab_size
        self.whole_decode = whole_decode or compile_options is not None
        self.slots = slots
        self.cache = model.new_kv_cache(slots + 1 if self.whole_decode else slots, max_len)  # + the spare slot
        self.max_len = self.cache.max_len
        self.token_budget = slots * self.max_len if token_budget is None else max(token_budget, self.max_len)
        self.reserved: dict[int, int] = {}  # slot of a running sequence -> tokens reserved for it
        self._decode_forward = model
        if compile_options is not None:
            self.cache.mark_static_addresses()
            self._decode_forward = torch.compile(model, **compile_options)
        self.free_slots = list(range(slots))
        self.reuse = model.causal
        # Free slot -> (salt, tokens whose keys/values it holds); least recently released first.
        self.slot_contents: dict[int, tuple[str, list[int]]] = {}
        self._layerwise: dict[Sequence, LayerwisePrefill] = {}  # prompts part-read a layer at a time
        self._weights_version = model.weights_version if self.reuse else 0

    def warm_up(self, probe: Sequence) -> Optional[str]:
        """Compile the fixed-shape decode step (and record its CUDA graph) now, at start-up, by
        answering `probe` (a throwaway prompt) for a few steps, so that no user's first answer
        waits for the compile (24 s on an H200). Should that fail (no compiler for this GPU, an
        op torch.compile cannot lower), every later step runs eager, per row, instead of failing
        every answer: returns why (None when compiled, or when nothing is to be compiled). The
        probe's slot is given back holding nothing reusable."""
        if self._decode_forward is self.model:
            return None
        probe.cache_salt = None
        self.admit(probe)
        try:
            self.prefill([probe])  # a failure here is no compile's: it is raised
            try:
                for _ in range(WARM_UP_STEPS):
                    self.step([probe])
            except Exception as error:  # noqa: BLE001 - whatever the compiler raised
                self._decode_forward, self.whole_decode = self.model, False  # the next forward sets its own rows
                return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"  # one log line
        finally:
            self.release(probe)
        return None

    def admit(self, seq: Sequence) -> bool:
        """Give seq a slot and reserve its max_length of tokens; False when no slot is free or
        the running sequences leave too little of the token budget."""
        if not self.free_slots:
            return False
        if seq.max_length > self.max_len:
            seq.max_length = self.max_len  # the cache bounds every sequence
        if not self._make_room(seq.max_length):
            return False
        seq.slot, seq.cached = self._choose_slot(seq)
        seq.kv_len = seq.cached
        self.cache.drop_after(seq.slot, seq.cached)  # what an earlier conversation left past the reused turns
        self.free_slots.remove(seq.slot)
        self.reserved[seq.slot] = seq.max_length
        return True

    @property
    def tokens_held(self) -> int:
        """Tokens reserved by running sequences plus those free slots keep for reuse."""
        return sum(self.reserved.values()) + sum(len(tokens) for _, tokens in self.slot_contents.values())

    def _make_room(self, tokens: int) -> bool:
        """Whether `tokens` more fit the budget, after dropping free slots' cached turns (least
        recently released first) as far as needed."""
        while not self.fits(tokens) and self.slot_contents:
            slot = next(iter(self.slot_contents))
            del self.slot_contents[slot]
            self.cache.drop_after(slot, 0)
        return self.fits(tokens)

    def fits(self, tokens: int) -> bool:
        """Whether `tokens` more fit the budget beside what is held now."""
        return self.tokens_held + min(tokens, self.max_len) <= self.token_budget

    MIN_REUSE = 8  # shorter shared prefixes do not evict another conversation's cached turns

    def _choose_slot(self, seq: Sequence) -> tuple[int, int]:
        """(slot, prompt tokens already cached there): the free slot sharing the longest prefix
        with the prompt (same salt only); else an empty slot; else the least recently released."""
        if not self.reuse or seq.layout.prefix_len:  # no reuse across a bidirectional prefix
            return self.free_slots[0], 0
        if self._weights_version != self.model.weights_version:
            for slot in self.slot_contents:  # computed with other weights
                self.cache.drop_after(slot, 0)
            self.slot_contents.clear()
            self._weights_version = self.model.weights_version
        limit = len(seq.prompt) - 1  # the last prompt token must run to give the first logits

        def shared(slot: int) -> int:
            salt, tokens = self.slot_contents.get(slot, (None, ()))
            same_owner = seq.cache_salt is not None and salt == seq.cache_salt
            return shared_prefix(tokens, seq.prompt, limit) if same_owner else 0

        reused = {slot: shared(slot) for slot in self.free_slots}
        best = max(self.free_slots, key=reused.__getitem__)
        if reused[best] < self.MIN_REUSE:
            empty = [slot for slot in self.free_slots if slot not in self.slot_contents]
            if empty:
                return empty[0], 0
            if not reused[best]:
                best = next(slot for slot in self.slot_contents if slot in reused)  # least recently used
        self.slot_contents.pop(best, None)
        return best, reused[best]

    def release(self, seq: Sequence) -> None:
        """Give seq's slot and reservation back; its keys and values stay there for a later prompt
        of the same salt (the rest of the slot's memory goes back to the OS)."""
        if seq.slot < 0:
            return
        kept = 0
        if self.reuse and seq.cache_salt is not None and seq.kv_len and not seq.layout.prefix_len:
            self.slot_contents[seq.slot] = (seq.cache_salt, seq.tokens[:seq.kv_len])
            kept = seq.kv_len
        self.cache.drop_after(seq.slot, kept)
        self.reserved.pop(seq.slot, None)
        self._layerwise.pop(seq, None)  # a prompt cancelled while being read
        self.free_slots.append(seq.slot)
        self.free_slots.sort()
        seq.slot = -1

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], budget: Optional[int] = None) -> list[Sequence]:
        """Read the prompts of admitted sequences, in order, for about `budget` tokens' worth of
        work (None: all of them), and sample the first answer token of each whose prompt is then
        read; returns those. What a budget leaves for later waits for the next call, so the
        engine can run decode steps in between (chunked prefill).

        A prompt goes in chunks of tokens, each attending to the keys and values its slot holds
        plus itself causally; the chunks of all prompts share one packed forward (`_packed`). A
        prompt with a bidirectional prefix (ChatGLM-6B) goes whole, or, when that does not fit
        the budget, a share of a layer at a time (layerwise.py): its budget is tokens x layers.
        Work counts attention too (`chunk_cost`), so that a budget takes about as long late in a
        long prompt as early."""
        self.cache.set_decode_rows(None)
        left = math.inf if budget is None else budget
        layers = self.model.config.num_layers
        chunks: list[tuple[Sequence, int]] = []  # (sequence, where its chunk ends)
        layerwise: list[Sequence] = []  # prompts read a layer at a time, now done
        for seq in seqs:
            if left <= 0:
                break
            chunk = self._next_chunk(seq, left)
            if chunk is not None:
                chunks.append((seq, chunk[0]))
                left -= chunk[1]
                continue
            if seq not in self._layerwise:
                self._layerwise[seq] = LayerwisePrefill(self.model, self.cache, seq.prompt, seq.layout,
                                                        seq.slot, seq.kv_len)
            state = self._layerwise[seq]
            left -= state.advance(left * layers) / layers
            if state.done:
                layerwise.append(seq)
        read, hidden = self._packed(chunks, []) if chunks else ([], None)
        last = [self._layerwise[seq].last_hidden()[None] for seq in layerwise]
        if read or layerwise:
            self._sample(read + layerwise, torch.cat(([hidden] if read else []) + last))  # one sampling call (and host sync)
        for seq, end in chunks:  # only now: a prefill whose sampling raised can run again
            seq.kv_len = end
        for seq in layerwise:
            seq.kv_len = len(seq.prompt)
            del self._layerwise[seq]
        return read + layerwise

    def _next_chunk(self, seq: Sequence, budget: float) -> Optional[tuple[int, float]]:
        """Where seq's next chunk of tokens ends within `budget` (at least one token), and its
        cost; None where seq goes a layer at a time instead: a prompt with a bidirectional prefix
        (ChatGLM-6B) that does not fit whole (a chunk's queries would see keys not written yet),
        or one already begun that way."""
        if seq in self._layerwise:
            return None
        size = chunk_size(seq.kv_len, len(seq.prompt) - seq.kv_len, budget, self.model.config.hidden_size)
        if seq.layout.prefix_len and seq.kv_len + size < len(seq.prompt):
            return None
        return seq.kv_len + size, chunk_cost(seq.kv_len, size, self.model.config.hidden_size)

    def _token_chunks(self, reading: list[Sequence], budget: Optional[int]) -> Optional[list[tuple[Sequence, int]]]:
        """The chunks of tokens (sequence, where its chunk ends) that `budget` reads, in order;
        None if one of those prompts goes a layer at a time (`_next_chunk`)."""
        left = math.inf if budget is None else budget
        chunks: list[tuple[Sequence, int]] = []
        for seq in reading:
            if left <= 0:
                break
            chunk = self._next_chunk(seq, left)
            if chunk is None:
                return None
            chunks.append((seq, chunk[0]))
            left -= chunk[1]
        return chunks

    def packs(self, reading: list[Sequence], budget: Optional[int]) -> bool:
        """Whether `prefill_and_step(reading, ..., budget)` can read these prompts: not beside
        the fixed-shape decode step, and only in chunks of tokens (a prompt that goes a layer at a
        time is read by `prefill`)."""
        return not self.whole_decode and self._token_chunks(reading, budget) is not None

    @torch.inference_mode()
    def prefill_and_step(self, reading: list[Sequence], decoding: list[Sequence],
                         budget: Optional[int]) -> list[Sequence]:
        """`prefill(reading, budget)` and `step(decoding)` in ONE forward (ask `packs` first): the
        prompt chunks and the decode rows' new tokens are packed into one row (`_packed`), so the
        step reads each weight once; one sampling call (one host sync) for all. Returns the
        prompts read whole (their first token sampled). Nothing moves unless all of it ran."""
        chunks = self._token_chunks(reading, budget)
        if chunks is None:
            raise ValueError("a prompt that goes a layer at a time cannot be packed: ask packs() first")
        read, hidden = self._packed(chunks, decoding)
        if read or decoding:
            self._sample(read + decoding, hidden)
        for seq, end in chunks:
            seq.kv_len = end
        for seq in decoding:
            seq.kv_len = len(seq.tokens) - 1  # its newest token was only just sampled
        return read

    def _packed(self, chunks: list[tuple[Sequence, int]], decoding: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """ONE forward over prompt chunks (each sequence's tokens from its first not yet in the
        cache to `end`) and the decode rows' newest tokens, packed into one row with no padding
        (kv_cache.PackedRows: each chunk attends to exactly its own slot). Returns the sequences
        whose prompt it finishes, and the hidden states to sample from: theirs, then the decode rows'."""
        tokens, positions, cache_positions, slots = [], [], [], []
        for seq, end in chunks:
            tokens += seq.prompt[seq.kv_len:end]
            positions.append(seq.layout.positions(seq.kv_len, end))
            cache_positions.append(torch.arange(seq.kv_len, end))
            slots += [seq.slot] * (end - seq.kv_len)
        for seq in decoding:
            index = len(seq.tokens) - 1
            tokens.append(seq.tokens[-1])
            positions.append(seq.layout.positions(index, index + 1))
            cache_positions.append(torch.tensor([index]))
            slots.append(seq.slot)
        self.cache.set_packed([PromptChunk(seq.slot, end, end - seq.kv_len, seq.layout.prefix_len) for seq, end in chunks],
                              [(seq.slot, len(seq.tokens)) for seq in decoding])
        device = self.model.device
        try:
            hidden = self._forward(torch.tensor([tokens]), torch.cat(positions, -1)[None], torch.cat(cache_positions)[None],
                                   None, torch.tensor([slots]))[0]
        finally:
            self.cache.set_decode_rows(None)
        chunk_ends = itertools.accumulate(end - seq.kv_len for seq, end in chunks)  # in the packed row
        read = [(seq, last - 1) for (seq, end), last in zip(chunks, chunk_ends) if end == len(seq.prompt)]
        rows = [row for _, row in read] + list(range(len(tokens) - len(decoding), len(tokens)))
        return [seq for seq, _ in read], hidden[torch.tensor(rows, dtype=torch.long, device=device)]

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> None:
        """Feed every sequence's newest token, all in one forward, and sample the next."""
        if self.whole_decode:
            self._step_whole(seqs)
            return
        index = [len(s.tokens) - 1 for s in seqs]  # host-side lists: no tensor is read back here
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs])
        positions = torch.stack([s.layout.positions(i, i + 1) for s, i in zip(seqs, index)])
        self.cache.set_decode_rows([(s.slot, len(s.tokens)) for s in seqs])  # attention reads each slot in place
        cache_positions = torch.tensor(index)[:, None]
        mask = attention_mask(torch.tensor([s.layout.prefix_len for s in seqs]), cache_positions, max(index) + 1)
        hidden = self._forward(tokens, positions, cache_positions, mask, torch.tensor([s.slot for s in seqs]))
        for seq in seqs:
            seq.kv_len = len(seq.tokens)
        self._sample(seqs, hidden[:, -1])

    def _step_whole(self, seqs: list[Sequence]) -> None:
        """The decode step over every slot, with fixed shapes (see the class docstring)."""
        spare = self.slots
        template = seqs[0].layout.positions(0, 1)
        tokens = torch.full((self.slots, 1), self.model.config.pad_token_id, dtype=torch.long)
        positions = torch.zeros((self.slots, *template.shape), dtype=template.dtype)
        cache_positions = torch.zeros((self.slots, 1), dtype=torch.long)
        writes = torch.full((self.slots,), spare, dtype=torch.long)  # free slots' rows write to the spare
        for seq in seqs:
            index = len(seq.tokens) - 1
            tokens[seq.slot, 0] = seq.tokens[-1]
            positions[seq.slot] = seq.layout.positions(index, index + 1)
            cache_positions[seq.slot, 0] = index
            writes[seq.slot] = seq.slot
        # A new token sees every column up to its own (a bidirectional prefix lies before it).
        mask = (torch.arange(self.max_len) <= cache_positions[:, :, None])[:, None]
        self.cache.set_decode_rows(None, whole=True)
        device = self.model.device
        hidden = self._decode_forward(tokens.to(device), positions.to(device), cache_positions.to(device),
                                      mask.to(device), writes.to(device), self.cache)
        self.cache.set_decode_rows(None)
        for seq in seqs:
            seq.kv_len = len(seq.tokens)
        self._sample(seqs, hidden[torch.tensor([s.slot for s in seqs], device=device), -1])

    def _forward(self, tokens, positions, cache_positions, mask, slots) -> torch.Tensor:
        """The model's forward over this batch's cache, inputs moved to its device: every forward
        but the fixed-shape decode step's goes through here (benchmarks time it)."""
        device = self.model.device
        return self.model(tokens.to(device), positions.to(device), cache_positions.to(device),
                          None if mask is None else mask.to(device), slots.to(device), self.cache)

    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        logits = self.model.logits(hidden)[:, :self.vocab_size]
        # Every row is sampled before any is appended: if sampling raises, no sequence has
        # moved, so the caller may retry the step for each sequence alone.
        chosen = sample(logits, [seq.sampler for seq in seqs], [seq.tokens for seq in seqs])
        for seq, token in zip(seqs, chosen):
            seq.append(token)


def generate(model: DecodableModel, prompts: list[list[int]], params: SamplingParams,
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
