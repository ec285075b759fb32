"""One call from a checkpoint name (or "a tiny random model") to a running backend: the
continuous-batching `Engine`, or `PerCallBackend` for hosts that lend a GPU per call."""
from __future__ import annotations

import tempfile
from contextlib import nullcontext
from typing import Optional, Union

import torch

from .. import native
from ..loading.device import free_memory, pick_device
from ..loading.loader import load_model
from ..models.kv_cache import CommittedOnWrite
from ..tiny.checkpoint import write_tiny_checkpoint
from .engine import Engine
from .per_call import GpuCall, PerCallBackend, no_host

DEFAULT_CONTEXT = 8192
TINY_NAMES = {"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b", "glm4": "glm-4-9b-chat",
              "glm4-0414": "glm-4-9b-0414", "z1": "glm-z1-9b-0414", "glm4-hf": "glm-4-9b-chat-hf"}


def load_for_serving(model: str = "THUDM/chatglm-6b", *, device: str = "auto", dtype=None,
                     tiny_random: Union[bool, str] = False, **load_kwargs):
    """(tokenizer, model, served name): a checkpoint, or with tiny_random the tiny random
    ChatGLM-6B (True) or family "chatglm2", "chatglm3", "glm4", "glm4-0414", "z1", "glm4-hf" (tiny/);
    `model` is then ignored."""
    if not tiny_random:
        tokenizer, net = load_model(model, device=device, dtype=dtype, **load_kwargs)
        return tokenizer, net, str(model).rstrip("/").split("/")[-1]
    family = tiny_random if isinstance(tiny_random, str) else "chatglm"
    # Tiny models cost nothing in float32, and only float32 keeps greedy answers identical
    # alone and batched: half-precision kernels round differently for one row than for many.
    with tempfile.TemporaryDirectory(prefix=f"{family}-tiny-") as folder:  # everything is in memory after loading
        tokenizer, net = load_model(write_tiny_checkpoint(folder, family=family), device=device,
                                    dtype=dtype or "float32", **load_kwargs)
    return tokenizer, net, f"{TINY_NAMES[family]}-tiny-random"


def start_engine(model: str = "THUDM/chatglm-6b", *, device: str = "auto", dtype=None,
                 tiny_random: Union[bool, str] = False, slots: Optional[int] = None, max_queue: int = 64,
                 step_delay: float = 0.0, context_length: Optional[int] = None, cuda_graphs: Optional[bool] = None,
                 prefill_chunk: Optional[int] = None, **load_kwargs) -> Engine:
    """Load a checkpoint (or build a tiny random one, see load_for_serving) and start an engine on it.

    slots: concurrent sequences; by default `default_capacity`'s (up to 16 sharing a quarter of the
    memory left after loading the model).
    context_length: tokens per sequence (prompt plus answer); by default the model's own, at most
    DEFAULT_CONTEXT (GLM-4's 128k tokens would take 5 GiB of KV cache per slot).
    prefill_chunk: prompt tokens read per engine step (0: each prompt whole); by default the
    engine's for the device.
    cuda_graphs: the compiled fixed-shape decode step; None: on a CUDA GPU (Engine)."""
    if pick_device(device).type == "cpu":
        native.build_in_background()  # our CPU kernels (if this CPU runs them) build while the weights load
    tokenizer, net, name = load_for_serving(model, device=device, dtype=dtype, tiny_random=tiny_random, **load_kwargs)
    context_length = context_length or min(net.config.max_sequence_length, DEFAULT_CONTEXT)
    token_budget = None
    if slots is None:
        slots, token_budget = default_capacity(net, context_length)
    return Engine(tokenizer, net, slots=slots, max_queue=max_queue, name=name, random_weights=bool(tiny_random),
                  step_delay=step_delay, context_length=context_length, cuda_graphs=cuda_graphs,
                  prefill_chunk=prefill_chunk, token_budget=token_budget)


def start_per_call(model: str = "THUDM/chatglm-6b", *, gpu_call: GpuCall = no_host, device: str = "auto",
                   dtype=None, tiny_random: Union[bool, str] = False, context_length: Optional[int] = None,
                   max_gpu_s: int = 120, max_active: int = 8, step_delay: float = 0.0,
                   **load_kwargs) -> PerCallBackend:
    """Load the model into this process's memory (CPU: the GPU exists only inside calls) and
    serve each answer as one `gpu_call` (per_call.py); `device` is where calls compute ("auto":
    CUDA when the call has it). dtype defaults to bfloat16 (every GPU ZeroGPU lends computes in it).
    Where calls compute on a GPU, the CPU copy gets none of our CPU kernels (nothing is built)."""
    on_gpu = device not in ("auto", "cpu") or (device == "auto" and (gpu_call is not no_host or torch.cuda.is_available()))
    with native.switched_off("the model computes on the GPU inside calls") if on_gpu else nullcontext():
        tokenizer, net, name = load_for_serving(model, device="cpu",
                                                dtype=dtype or (None if tiny_random else "bfloat16"),
                                                tiny_random=tiny_random, **load_kwargs)
    return PerCallBackend(tokenizer, net, gpu_call=gpu_call, device=device, name=name,
                          random_weights=bool(tiny_random), max_gpu_s=max_gpu_s, max_active=max_active,
                          context_length=context_length or min(net.config.max_sequence_length, DEFAULT_CONTEXT),
                          step_delay=step_delay)


def default_capacity(model, context_length: int, limit: int = 16) -> tuple[int, Optional[int]]:
    """(slots, token budget) that fit a quarter of the free memory. On a GPU, whose cache is
    reserved whole, as many whole-context slots as fit (at least 1), no budget beyond them; on the
    CPU, whose cache costs what it holds (kv_cache.CommittedOnWrite), `limit` slots sharing that
    quarter as a token budget (at least one whole context): short answers run side by side where
    whole contexts would not fit."""
    tokens = int(free_memory(model.device) * 0.25 // model.kv_cache_bytes_per_token())
    if model.device.type == "cpu" and CommittedOnWrite.available():
        return limit, max(tokens, context_length)
    return max(1, min(limit, tokens // context_length)), None
