"""Decode attention for one query row (one sequence, one new token) against a slot of the KV cache,
as `models.kv_cache.LayerCache` runs it: our kernel (native/decode_attention.cpp, ungrouped heads,
what ChatGLM-6B uses on AVX-512 CPUs), the float32 chunked path (grouped heads), SDPA's choices and
plain matmul paths.

    python -m benchmarks.attention                 # 16 / 512 / 2048 keys, ChatGLM-6B and GLM-4 heads
    python -m benchmarks.attention --layers 1      # one cache, hot in the CPU caches (flatters widening)

Per variant: median and min microseconds per layer-call over passes through --layers 28 separate
caches (as a decode step meets them: each one cold), and the relative error of the output
against a float64 reference (bfloat16 inputs; the SDPA flash path sets the bar).
Results: benchmarks/results/attention.json. Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import report
from model_runtime import native
from model_runtime.models.kv_cache import score_chunk, single_query_attention

SHAPES = {"chatglm-6b": (32, 32, 128), "glm-4 / chatglm2-3": (32, 2, 128)}  # query heads, kv heads, head dim


def sdpa_flash(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=k.shape[1] != q.shape[2]).transpose(1, 2)


def sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_flash(q, k, v)


def bf16_bmm(q, k, v):
    """Scores rounded to bfloat16 by the matmul (fast, but less accurate)."""
    heads, kv_heads, d = q.shape[2], k.shape[1], q.shape[3]
    qg = q[0, 0].view(kv_heads, heads // kv_heads, d)
    scores = torch.bmm(qg, k[0].transpose(1, 2)).float().mul_(d ** -0.5).softmax(-1)
    return torch.bmm(scores.to(v.dtype), v[0]).view(1, 1, heads, d)


def fp32_bmm(q, k, v):
    """Keys and values widened to float32 first: exact scores, but the widening reads and writes them."""
    heads, kv_heads, d = q.shape[2], k.shape[1], q.shape[3]
    qg = q[0, 0].float().view(kv_heads, heads // kv_heads, d)
    scores = torch.bmm(qg, k[0].float().transpose(1, 2)).mul_(d ** -0.5).softmax(-1)
    return torch.bmm(scores, v[0].float()).view(1, 1, heads, d).to(q.dtype)


VARIANTS = {"sdpa-flash": sdpa_flash, "sdpa-math": sdpa_math, "bf16-bmm": bf16_bmm, "fp32-bmm": fp32_bmm}


def reference(q, k, v):
    heads, kv_heads, d = q.shape[2], k.shape[1], q.shape[3]
    qg = q[0, 0].double().view(kv_heads, heads // kv_heads, d)
    scores = torch.bmm(qg, k[0].double().transpose(1, 2)) * d ** -0.5
    return torch.bmm(scores.softmax(-1), v[0].double()).view(1, 1, heads, d)


def measure(fn, q, caches, repeats: int) -> tuple[float, float]:
    """Microseconds per call (median, min) over passes through every (k, v) of caches."""
    for k, v in caches:
        fn(q, k, v)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in caches:
            fn(q, k, v)
        times.append((time.perf_counter() - start) / len(caches))
    return statistics.median(times) * 1e6, min(times) * 1e6


def in_place_kernel(q, k, v):
    """Our kernel on the slot view's whole cache tensor (slot 0, the view's length), as LayerCache calls it."""
    isa, _ = native.first_isa(native.decode_attention_unavailable)
    return native.decode_attention(q[:, 0], k._base, v._base, torch.tensor([0]), torch.tensor([k.shape[2]]),
                                   isa)[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[16, 512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="passes through the layers' caches")
    parser.add_argument("--layers", type=int, default=28, help="separate caches, each cold when its turn comes")
    parser.add_argument("--score-scale", type=float, default=3.0,
                        help="query scale: larger makes the softmax peakier (and bf16 score rounding worse)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape_name, (heads, kv_heads, d) in SHAPES.items():
        for keys in args.keys:
            # Slots of the cache as LayerCache holds them: [1, kv_heads, max_len, d], read up to `keys`.
            caches = [tuple(torch.randn(1, kv_heads, keys + 64, d, generator=generator).to(torch.bfloat16)[:, :, :keys]
                            for _ in "kv") for _ in range(args.layers)]
            k, v = caches[0]
            q = (args.score_scale * torch.randn(1, 1, heads, d, generator=generator)).to(torch.bfloat16)
            expected = reference(q, k, v)
            scratch = torch.empty(score_chunk(kv_heads, d, keys) * kv_heads * d)  # as KVCache holds it
            variants = dict(VARIANTS, **{"single_query_attention": lambda q, k, v: single_query_attention(
                q, k, v, scratch)})
            if heads == kv_heads and native.first_isa(native.decode_attention_unavailable)[0]:
                variants["native decode_attention"] = in_place_kernel
            for name, fn in variants.items():
                with torch.inference_mode():
                    out = fn(q, k, v)
                    median, best = measure(fn, q, caches, args.repeats)
                error = ((out.double() - expected).norm() / expected.norm()).item()
                rows.append({"heads (q/kv)": f"{shape_name} {heads}/{kv_heads}", "keys": keys, "variant": name,
                             "median us": round(median, 1), "min us": round(best, 1), "rel error": f"{error:.2e}"})
    report("attention", rows, {"threads": args.threads, "repeats": args.repeats, "layers": args.layers,
                               "score_scale": args.score_scale})


if __name__ == "__main__":
    main()
