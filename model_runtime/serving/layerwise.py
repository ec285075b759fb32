"""A prompt read a layer at a time, a share of a layer per engine step: chunked prefill that is
exact for any attention pattern, for ChatGLM-6B's bidirectional prompt.

A prompt chunked by tokens needs causal attention: a later chunk's keys must never be seen by an
earlier one. ChatGLM-6B's prompt (everything before <sop>) is seen whole by each of its queries,
so its chunks go the other way: through the layers. At a layer, the keys and values of every
prompt token are written first (`Block.write_keys`, a range of tokens at a time, keeping the
rotated queries), then the rows' attention and MLP run (`Block.finish`, a range at a time) and
give the next layer's input. Each query sees exactly the keys, values and mask it sees in one
full forward, so the logits agree up to the rounding of matrix products of other shapes. Between
engine steps the prompt's hidden states wait here, per sequence ([tokens, hidden]: 8 MiB for
2048 tokens of ChatGLM-6B in bfloat16, and as much again for the queries).
"""
from __future__ import annotations

from typing import Any

import torch

from ..models.kv_cache import KVCache, PromptChunk

# What writing keys costs, as a share of a layer's matrix products per token: the query/key/value
# projection is 3 of the about 12 hidden^2 multiply-adds per token of a block in every GLM family
# (the MLP 8, the output projection 1). The rows' part is the rest, plus their attention.
KEYS_SHARE = 0.25
MIN_RANGE = 16  # tokens: a smaller range would pay a layer's weight read for next to no work


def attention_share(kv_len: float, hidden_size: int) -> float:
    """What attending to kv_len keys adds to a token's work in a layer, as a share of the layer's
    matrix products: 2 x kv_len x hidden multiply-adds against 12 x hidden^2. It makes a budget
    of work take about the same time early and late in a long prompt (at 2048 keys and hidden
    1024 attention is a third of the work: in a profile, 3.9 of 10.7 s)."""
    return kv_len / (6 * hidden_size)


class LayerwisePrefill:
    """The state of one prompt being read layer by layer (see the module docstring): `advance`
    does a budget's worth of it; once `done`, `last_hidden` gives the state to sample from."""

    def __init__(self, model: Any, cache: KVCache, prompt: list[int], layout: Any, slot: int, start: int = 0):
        """The prompt's tokens from `start` on (its keys and values before it are in the slot)."""
        self.model = model
        self.cache = cache
        device = model.device
        tokens = torch.tensor(prompt[start:], device=device)[None]
        self.hidden = model.transformer.word_embeddings(tokens)  # [1, n, hidden]: the current layer's input
        self.output = torch.empty_like(self.hidden)  # its output, filled a range at a time
        self.queries = None  # [1, n, heads, d]: its rotated queries, once their keys are written
        self.cos, self.sin = model.rotary.cos_sin(layout.positions(start, len(prompt))[None].to(device),
                                                  self.hidden.dtype)
        self.cache_positions = torch.arange(start, len(prompt), device=device)[None]
        self.first = start  # the cache position of the first token read here
        self.prefix_len = layout.prefix_len
        self.slot = slot
        self.slots = torch.tensor([slot], device=device)
        self.length = len(prompt)
        self.layer = 0
        self.keys_written = 0  # tokens whose keys and values the current layer has written
        self.rows_done = 0  # tokens whose output the current layer has given

    @property
    def done(self) -> bool:
        return self.layer == len(self.model.transformer.layers)

    def advance(self, budget: float) -> float:
        """Run ranges of tokens through a layer's parts until about `budget` token-layers of
        work are spent (at least one range; see attention_share); returns what was spent. A
        range is as long as the budget allows (a step's budget of B tokens x layers is B x layers
        rows of one layer), never capped at a causal chunk's size: with ranges capped at a causal
        chunk's size (32 / 128 tokens) a 2034-token prompt of a mid-size model took 1.8x / 1.3x
        the time of one forward, uncapped 1.2x / 1.1x (benchmarks/chunked_prefill.py's model,
        alone). The state moves only after each range has run, so a range that raises can be
        run again."""
        layers = self.model.transformer.layers
        n = self.hidden.shape[1]
        spent = 0.0
        row_cost = 1 - KEYS_SHARE + attention_share(self.length, self.hidden.shape[-1])
        while not self.done and spent < budget:
            layer, cache = layers[self.layer], self.cache.layers[self.layer]
            writing_keys = self.keys_written < n
            tokens_left = (budget - spent) / (KEYS_SHARE if writing_keys else row_cost)
            if spent and tokens_left < MIN_RANGE:
                break  # a sliver of a range would cost a pass over the part's weights: the next step takes it
            if writing_keys:
                start = self.keys_written
                end = _range_end(start, n, tokens_left)
                _, queries = layer.write_keys(self.hidden[:, start:end], self.cos[:, start:end], self.sin[:, start:end],
                                              self.slots, self.cache_positions[:, start:end], cache)
                if self.queries is None:
                    self.queries = queries.new_empty((1, n, *queries.shape[2:]))
                self.queries[:, start:end] = queries
                self.keys_written = end
                spent += (end - start) * KEYS_SHARE
                continue
            start, end = self.rows_done, _range_end(self.rows_done, n, tokens_left)
            rows = self.hidden[:, start:end]
            # the rows' attention: a chunk of the prompt that sees all of its columns (written before
            # the layer's first range: the later ones read the same keys)
            self.cache.set_packed([PromptChunk(self.slot, self.first + end, end - start, self.prefix_len, self.length)],
                                  [], same_keys=start > 0)
            try:
                self.output[:, start:end] = layer.finish(rows, layer.input_layernorm(rows), self.queries[:, start:end],
                                                         None, self.slots, cache)
            finally:
                self.cache.set_decode_rows(None)
            self.rows_done = end
            spent += (end - start) * row_cost
            if end == n:  # the layer is read: its output is the next one's input
                self.hidden, self.output = self.output, self.hidden
                self.layer, self.keys_written, self.rows_done = self.layer + 1, 0, 0
        return spent

    def last_hidden(self) -> torch.Tensor:
        """The prompt's last token's final-normed hidden state [hidden] (once done)."""
        return self.model.transformer.final_layernorm(self.hidden[0, -1])


def _range_end(start: int, n: int, tokens: float) -> int:
    """The end of the next range from start: `tokens` of them, at least MIN_RANGE, and to n when
    fewer than MIN_RANGE would be left after it (no sliver at a layer's end either)."""
    end = start + max(MIN_RANGE, int(tokens))
    return n if n - end < MIN_RANGE else end
