"""The calling convention every GLM network shares, written once.

A family's network (glm6b.py, glm2.py) builds `self.transformer` with `word_embeddings`,
`layers` and `final_layernorm`, a `self.rotary` whose `cos_sin(positions, dtype)` feeds its
blocks, an `lm_head`, and says where a prompt's tokens go (`layout_for_prompt`). Everything else
is here: allocation straight on the device (`empty`), quantization, the KV cache's size, the
P-tuning v2 prefix (`set_prefix`, prefix.py), the forward over a caller's cache, the logits, and
the seed's `model.chat` / `model.stream_chat`.
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from ..chat import stream
from ..native.decode_linear import use_decode_linears
from ..quant.convert import quantize_model, replace_linears, replace_output_layer
from .kv_cache import KVCache
from .prefix import prefix_layers


class GLMModel(nn.Module):
    """Base of the GLM networks (see the module docstring).

    `causal`: a slot's keys and values depend only on the tokens before them, so a decode batch
    may reuse them for a later prompt with the same prefix. `weights_version` changes whenever the
    keys and values the weights compute change (quantization, a new P-tuning prefix): cached ones
    from before are then stale."""

    causal = False
    tied_lm_head = False  # True: lm_head shares the word embeddings' matrix (ChatGLM-6B)
    # The Linear layers of every block that quantize(bits) replaces, by their path in a block.
    quantized_layers: tuple[str, ...] = ("attention.query_key_value", "attention.dense",
                                         "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    fine_tunes: tuple[str, ...] = ()  # what the loader put on top of the base weights (adapter, prefix)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weights_version = 0

    @classmethod
    def empty(cls, config, device: torch.device, dtype: torch.dtype, quantize: Optional[int] = None,
              quant_backend: str = "auto", int8_output_layer: bool = False) -> "GLMModel":
        """An uninitialised model allocated straight in dtype on device (no float32 detour), for
        the loader to fill tensor by tensor. With quantize=4|8 the blocks' Linear layers are empty
        QuantizedLinear modules (see quant/) that quantize float weights as they arrive; with
        int8_output_layer an untied output layer is an INT8 `QuantizedOutputLayer` filled the same
        way (a tied one is derived from the loaded embedding: `quant.convert.quantize_lm_head`).
        On CPU in bfloat16 the float Linear layers become `native.decode_linear.DecodeLinear`."""
        with torch.device("meta"):
            model = cls(config).to(dtype)
        if quantize:
            replace_linears(model, quantize, device, quant_backend)
        if int8_output_layer and not model.tied_lm_head:
            replace_output_layer(model)
        model.to_empty(device=device)
        model._after_to_empty(device)
        if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
            use_decode_linears(model)  # the float Linear layers' decode steps on our kernel
        return model.eval()

    def set_output_layer(self, layer: nn.Module) -> None:
        """Put `layer` where the logits are computed (an INT8 output layer: quant.convert)."""
        self.lm_head = layer

    def _after_to_empty(self, device: torch.device) -> None:
        """Restore what `to_empty` loses (tied weights, buffers that are not in checkpoints)."""

    def quantize(self, bits: int, backend: str = "auto") -> "GLMModel":
        """Quantize the blocks' Linear layers to INT8 or INT4 in place, as in the seed's
        `model.quantize(bits)`; returns the model (see quant/)."""
        quantize_model(self, bits, backend)
        self.weights_version += 1  # cached keys/values came from the float weights
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.final_layernorm.weight.dtype

    @torch.no_grad()
    def refresh_prefix(self) -> None:
        """Compute the P-tuning v2 prefix from `transformer.prefix_encoder` (see prefix.py)."""
        self.set_prefix(prefix_layers(self.transformer.prefix_encoder(), self.config))

    def set_prefix(self, kv: Optional[torch.Tensor]) -> None:
        """P-tuning v2 prefix keys and values [num_layers * 2, kv_heads, P, head_dim] (layer i's
        keys at 2i, its values at 2i + 1), or None for no prefix."""
        for i, layer in enumerate(self.transformer.layers):
            layer.attention.prefix_kv = None if kv is None else (
                kv[2 * i][None].to(self.device, self.dtype), kv[2 * i + 1][None].to(self.device, self.dtype))
        self.weights_version += 1

    def _apply(self, fn, recurse=True):
        """`.to(device / dtype)` moves the P-tuning prefix too: it is no parameter (it is computed
        from one), and a model moved into a GPU call (ZeroGPU) must take it along."""
        super()._apply(fn, recurse)
        for layer in self.transformer.layers:
            if layer.attention.prefix_kv is not None:
                layer.attention.prefix_kv = tuple(fn(t) for t in layer.attention.prefix_kv)
        return self

    def stacked_parts(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Linear layers this network keeps stacked in one while its checkpoints store them apart,
        by their path in a block: {stacked layer: ((checkpoint layer, its rows), ...) in row order}.
        One product instead of several per step (glm_hf.py's q, k and v). None here."""
        return {}

    @functools.cached_property
    def checkpoint_parts(self) -> dict[str, list[tuple[str, int, int]]]:
        """`stacked_parts` of every block by full name: {stacked layer: [(checkpoint layer, first
        row, rows), ...]}. Worked out once (blocks never change); `tensor_parts` asks it per tensor."""
        pieces = self.stacked_parts()
        if not pieces:
            return {}
        blocks = next(name for name, module in self.named_modules() if module is self.transformer.layers)
        parts = {}
        for index in range(len(self.transformer.layers)):
            for stacked, layers in pieces.items():
                starts = [sum(rows for _, rows in layers[:i]) for i in range(len(layers))]
                parts[f"{blocks}.{index}.{stacked}"] = [(f"{blocks}.{index}.{layer}", start, rows)
                                                        for (layer, rows), start in zip(layers, starts)]
        return parts

    def tensor_parts(self, name: str) -> Optional[list[tuple[str, int, int]]]:
        """The checkpoint's tensors that make up this model tensor, (name, first row, rows) each,
        when its layer is stacked; None when the checkpoint holds it as it is. The one translation
        the loader, the saver, the adapter check and the tiny writer use."""
        owner, _, leaf = name.rpartition(".")
        parts = self.checkpoint_parts.get(owner)
        return None if parts is None else [(f"{layer}.{leaf}", start, rows) for layer, start, rows in parts]

    def checkpoint_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs of this model under the checkpoint's names: a stacked layer's
        tensors split into its parts' rows (views)."""
        for name, tensor in tensors:
            parts = self.tensor_parts(name)
            if parts is None:
                yield name, tensor
            else:
                yield from ((part, tensor[start:start + rows]) for part, start, rows in parts)

    def layout_for_prompt(self, prompt: list[int]):
        """Where the prompt's tokens go: `.prefix_len` and `.positions(start, end)`."""
        raise NotImplementedError

    def new_kv_cache(self, slots: int, max_len: int) -> KVCache:
        """A static KV cache for `slots` sequences of up to max_len tokens (at most the model's
        maximum sequence length; only the key/value heads are stored), for the caller to pass to
        `forward`."""
        return KVCache(self.config.num_layers, slots, self.config.kv_heads,
                       min(max_len, self.config.max_sequence_length), self.config.head_dim, self.dtype, self.device,
                       query_heads=self.config.num_attention_heads)

    def kv_cache_bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.config.num_layers * self.config.kv_heads * self.config.head_dim * element

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache_positions: torch.Tensor,
                mask: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (apply `logits` for logits).

        tokens [B, T]; positions from the layout ([B, 2, T] for ChatGLM-6B, [B, T] for the causal
        models); cache_positions [B, T]: where each token's key and value go in its slot; mask
        [B, 1, T, kv_len] from `kv_cache.attention_mask`; slots [B]: cache row per row of `cache`
        (from `new_kv_cache`), which is written in place.
        """
        x = self.transformer.word_embeddings(tokens)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, layer_cache in zip(self.transformer.layers, cache.layers, strict=True):
            x = layer(x, cos, sin, mask, slots, cache_positions, layer_cache)
        return self.transformer.final_layernorm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for hidden states (only the rows the caller needs: lm_head is large)."""
        return self.lm_head(hidden).float()

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """The seed's `response, history = model.chat(tokenizer, query, history, ...)`."""
        return stream.chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        """The seed's `for response, history in model.stream_chat(tokenizer, query, history, ...)`."""
        return stream.stream_chat(self, tokenizer, query, history, **kwargs)
