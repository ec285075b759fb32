"""Prompt attention, one layer: a prompt's query rows against their slot of the KV cache, as a
prefill runs it (`models.kv_cache.LayerCache._attend_packed`): SDPA under the visibility mask
(what every prompt took before our kernel), our kernel (native/prefill_attention.cpp) on each code
path this CPU has, and SDPA told `is_causal` (no mask to read; only a whole causal prompt can
say so) for reference.

    python -m benchmarks.prefill_attention          # mid-size and full-size heads, 512 / 2048 tokens

Cases: a whole causal prompt (GLM-4: grouped heads), a ChatGLM-6B prompt (every row sees every
column), and a late chunk of a causal prompt (256 rows after 1792 cached tokens, what chunked
prefill reads). Per variant: the best of --repeats, its ratio to masked SDPA's time in the same
run, and its error against float64 attention over a sample of rows (bfloat16 inputs).
Results: benchmarks/results/prefill_attention.json.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import cpu_summary, print_table, report
from benchmarks.quant import best_time
from model_runtime import native
from model_runtime.models.kv_cache import PackedRows, PromptChunk

HEADS = {"mid-size glm-4": (16, 2, 64), "mid-size chatglm-6b": (16, 16, 64), "glm-4": (32, 2, 128),
         "chatglm-6b": (32, 32, 128)}  # query heads, key/value heads, head size


def cases(tokens: int) -> list[tuple[str, str, PromptChunk]]:
    """(heads, what, chunk) for a prompt of `tokens` tokens in slot 0."""
    late = PromptChunk(0, tokens, min(256, tokens // 4))
    return [(heads, what, chunk) for heads in HEADS for what, chunk in (
        ("whole, causal", PromptChunk(0, tokens, tokens)) if "glm-4" in heads
        else ("whole, every column seen", PromptChunk(0, tokens, tokens, tokens - 1)),
        ("late chunk, causal", late))]


def run_case(heads_name: str, chunk: PromptChunk, paths: list[str], repeats: int, generator) -> list[dict]:
    heads, kv_heads, d = HEADS[heads_name]
    k, v = (torch.randn(1, kv_heads, chunk.seen, d, generator=generator).to(torch.bfloat16) for _ in range(2))
    q = (3 * torch.randn(chunk.length, heads, d, generator=generator)).to(torch.bfloat16)
    mask = PackedRows([chunk], [], k).mask(chunk)
    start = chunk.end - chunk.length
    grouped = heads != kv_heads
    variants = {"sdpa, masked": lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask,
                                                                        enable_gqa=grouped)[0].transpose(0, 1)}
    if start == 0 and not chunk.prefix_len:
        variants["sdpa, is_causal"] = lambda: F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k, v, is_causal=True, enable_gqa=grouped)[0].transpose(0, 1)
    for isa in paths:
        variants[f"ours, {isa}"] = lambda isa=isa: native.prefill_attention(
            q, native.prefill_attention_keys(k, 0, chunk.seen, isa), v, 0, start, chunk.seen, chunk.prefix_len, isa)
    sample = torch.arange(0, chunk.length, max(1, chunk.length // 64))  # rows checked against float64
    keys, values = (t[0].double().repeat_interleave(heads // kv_heads, 0) for t in (k, v))
    expected = F.scaled_dot_product_attention(q[sample].double().transpose(0, 1), keys, values,
                                              attn_mask=mask[0, :, sample]).transpose(0, 1)
    rows, baseline = [], None
    for name, fn in variants.items():
        seconds = best_time(fn, repeats)
        baseline = baseline or seconds
        error = ((fn()[sample].double() - expected).norm() / expected.norm()).item()
        rows.append({"heads": heads_name, "rows": chunk.length, "columns": chunk.seen, "variant": name,
                     "ms": round(seconds * 1e3, 1), "vs_sdpa_masked": round(baseline / seconds, 2),
                     "error": float(f"{error:.2g}")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="prefill_attention", help="results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = [isa for isa in native.ISAS if native.prefill_attention_unavailable(isa) is None]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for tokens in args.tokens:
        for heads_name, what, chunk in cases(tokens):
            for row in run_case(heads_name, chunk, paths, args.repeats, generator):
                rows.append({"case": what, **row})
                print(rows[-1], flush=True)
    print(f"\n{cpu_summary()}, {args.threads} threads: one layer's prompt attention")
    print_table(rows)
    report(args.name, rows, {"threads": args.threads, "paths": paths})


if __name__ == "__main__":
    main()
