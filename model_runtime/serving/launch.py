"""One call from a checkpoint name (or "a tiny random model") to a running `Engine`."""
from __future__ import annotations

import tempfile
from typing import Optional, Union

from ..loading.device import free_memory
from ..loading.loader import load_model
from ..tiny.checkpoint import write_tiny_checkpoint
from .engine import Engine

DEFAULT_CONTEXT = 8192


def start_engine(model: str = "THUDM/chatglm-6b", *, device: str = "auto", dtype=None,
                 tiny_random: Union[bool, str] = False, slots: Optional[int] = None, max_queue: int = 64,
                 step_delay: float = 0.0, context_length: Optional[int] = None, **load_kwargs) -> Engine:
    """Load a checkpoint (or build the tiny random one) and start an engine on it.

    tiny_random: True builds a tiny random ChatGLM-6B; "chatglm2", "chatglm3" or "glm4" one of
    those (tiny/); `model` is then ignored.

    slots: concurrent sequences; by default as many as fit (up to 16) in a quarter of the memory
    left after loading the model.
    context_length: tokens per sequence (prompt plus answer); by default the model's own, at most
    DEFAULT_CONTEXT (GLM-4's 128k tokens would take 5 GiB of KV cache per slot)."""
    if tiny_random:
        family = tiny_random if isinstance(tiny_random, str) else "chatglm"
        # Tiny models cost nothing in float32, and only float32 keeps greedy answers identical
        # alone and batched: half-precision kernels round differently for one row than for many.
        dtype = dtype or "float32"
        with tempfile.TemporaryDirectory(prefix=f"{family}-tiny-") as folder:  # everything is in memory after loading
            tokenizer, net = load_model(write_tiny_checkpoint(folder, family=family), device=device, dtype=dtype,
                                        **load_kwargs)
    else:
        tokenizer, net = load_model(model, device=device, dtype=dtype, **load_kwargs)
    context_length = context_length or min(net.config.max_sequence_length, DEFAULT_CONTEXT)
    if slots is None:
        slots = default_slots(net, context_length=context_length)
    tiny_names = {"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b", "glm4": "glm-4-9b-chat"}
    name = f"{tiny_names[family]}-tiny-random" if tiny_random else str(model).rstrip("/").split("/")[-1]
    return Engine(tokenizer, net, slots=slots, max_queue=max_queue, name=name, random_weights=bool(tiny_random),
                  step_delay=step_delay, context_length=context_length)


def default_slots(model, limit: int = 16, context_length: Optional[int] = None) -> int:
    """As many full-length KV-cache rows as fit in a quarter of the free memory (at least 1)."""
    per_slot = model.kv_cache_bytes_per_token() * (context_length or model.config.max_sequence_length)
    return max(1, min(limit, int(free_memory(model.device) * 0.25 // per_slot)))
