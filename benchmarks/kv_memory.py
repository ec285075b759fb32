"""What the KV cache costs in memory on the CPU: reserved (slots x context, as allocated) against
resident (what the OS holds: kv_cache.CommittedOnWrite commits pages as tokens are written),
for full-size key/value shapes with many streams at a long context.

    python -m benchmarks.kv_memory                       # ChatGLM-6B and GLM-4-9B shapes, 16 streams
    python -m benchmarks.kv_memory --streams 32 --tokens 256

Per model: a `KVCache` of --slots slots of its --context (the engine's default context: 2048
for ChatGLM-6B, 8192 for GLM-4), bfloat16; --streams streams each write --tokens tokens of keys
and values through the attention layers' own write (`LayerCache.write`, a prompt's shape), then
every stream decodes --steps tokens (one write per step). Measured: the cache's resident bytes
(/proc/self/smaps of its mapping) and the process's RSS growth (psutil), against the bytes the
tokens need (tokens x `kv_cache_bytes_per_token`): the ideal is 1.0, pages round it up; then
every slot is given back (`drop_after`) and the resident bytes read again.
Results: benchmarks/results/kv_memory.json.
"""
from __future__ import annotations

import argparse
import time

import psutil
import torch

from benchmarks.common import report
from model_runtime.models.kv_cache import KVCache

SHAPES = {  # layers, key/value heads, head dim, the engine's default context (serving.launch)
    "chatglm-6b": (28, 32, 128, 2048),
    "glm-4-9b": (40, 2, 128, 8192),
}


def measure(model: str, slots: int, streams: int, tokens: int, steps: int) -> dict:
    layers, heads, head_dim, context = SHAPES[model]
    rss_before = psutil.Process().memory_info().rss
    cache = KVCache(layers, slots, heads, context, head_dim, torch.bfloat16, "cpu")
    reserved = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)
    per_token = 2 * layers * heads * head_dim * 2
    keys = torch.randn(1, tokens, heads, head_dim).to(torch.bfloat16)
    started = time.perf_counter()
    for layer in cache.layers:
        for slot in range(streams):
            layer.write(keys, keys, torch.tensor([slot]), torch.arange(tokens)[None])
    prompts_s = time.perf_counter() - started
    one = keys[:, :1]
    for step in range(steps):
        position = torch.tensor([[tokens + step]])
        for layer in cache.layers:
            for slot in range(streams):
                layer.write(one, one, torch.tensor([slot]), position)
    held = streams * (tokens + steps)
    resident, rss_growth = cache.resident_bytes, psutil.Process().memory_info().rss - rss_before
    for slot in range(slots):
        cache.drop_after(slot, 0)
    return {"model": model, "slots": slots, "context": context, "streams": streams, "tokens_each": tokens + steps,
            "reserved_gib": round(reserved / 2**30, 3), "needed_gib": round(held * per_token / 2**30, 3),
            "resident_gib": round(resident / 2**30, 3), "rss_growth_gib": round(rss_growth / 2**30, 3),
            "resident_vs_needed": round(resident / (held * per_token), 3),
            "resident_vs_reserved": round(resident / reserved, 3),
            "resident_after_release_gib": round(cache.resident_bytes / 2**30, 3),
            "prompt_writes_s": round(prompts_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=500, help="prompt tokens each stream writes")
    parser.add_argument("--steps", type=int, default=12, help="decode steps after the prompts")
    args = parser.parse_args()
    rows = [measure(model, args.slots, min(args.streams, args.slots), args.tokens, args.steps) for model in args.models]
    report("kv_memory", rows, {"dtype": "bfloat16", "page_bytes": 4096})


if __name__ == "__main__":
    main()
