"""Full-size ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat and GLM-4-9B-0414 / GLM-Z1-9B-0414 shapes with
random weights: prefill, decode, and the second turn of a conversation with and without reuse of
the first turn's KV cache. `glm4-0414` is transformers' layout (models/glm_hf.py: q, k and v
stored apart, stacked into one Linear on load; four norms per block) at GLM-4-9B-chat's sizes, so
the two rows compare layouts.

    python -m benchmarks.family                                  # CPU, bfloat16 + INT8/INT4 rows, 4 layers
    python -m benchmarks.family --rows chatglm3:bfloat16 --layers 28 --device cuda   # one full model
    python -m benchmarks.family --device cuda --dtype float16 --layers 28             # a GPU, every member
    python -m benchmarks.family --rows glm4:bfloat16 glm4-0414:bfloat16 glm4:int4 glm4-0414:int4 --report family-glm4-0414

The networks are built on the meta device and only what is measured is materialised: the full
embedding and output layer, and `--layers` of the full-size blocks (default 4: the whole models,
12.5 GB and 18.8 GB in bfloat16, do not fit beside anything else in this machine's 24 GB). Each
timing is split into the part the blocks take and the rest (embedding, final norm, output layer,
sampling), and the blocks' part is scaled to the checkpoint's real layer count
(`*_full` columns); with `--layers` equal to the real count nothing is scaled. Every row runs in
its own process so that peak-memory figures do not mix.

Decode speed is set beside the memory-read ceiling measured in the same run: a decoded token
reads every weight but the embedding table once, plus the KV cache of its context, so tokens/s
cannot exceed bandwidth / bytes-per-token (of the full-size model).

Turn 2: a conversation of `--context` tokens is prefilled and left in its slot (turn 1); the next
prompt is that plus `--new` tokens. `turn2_reuse_ms` is the time to the first token when only the
new tokens are prefilled (what the engine does), `turn2_full_ms` when the whole conversation is
prefilled again (what ChatGLM-6B must do).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks.common import PeakRSS, memory_bandwidth_gbs, randomize, report, run_worker

# The published config.json sizes (shared/docs/glm-family-spec.md).
COMMON = {"hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32,
          "multi_query_group_num": 2}
FULL = {
    "chatglm2": dict(COMMON, padded_vocab_size=65024, num_layers=28, seq_length=32768, layernorm_epsilon=1e-5),
    "chatglm3": dict(COMMON, padded_vocab_size=65024, num_layers=28, seq_length=8192, layernorm_epsilon=1e-5),
    "glm4": dict(COMMON, padded_vocab_size=151552, num_layers=40, seq_length=131072, layernorm_epsilon=1.5625e-7,
                 rope_ratio=500.0),
}
# GLM-4-9B-0414 in transformers' names (its published config.json: GLM-4-9B-chat's sizes).
HF_FULL = {"glm4-0414": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                             num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
                             partial_rotary_factor=0.5, rms_norm_eps=1e-5)}
DEFAULT_ROWS = ["chatglm2:bfloat16", "chatglm3:bfloat16", "chatglm3:int8", "chatglm3:int4", "glm4:bfloat16"]


def config_for(family: str, layers=None):
    """The config of a full-size member, with `layers` blocks (default: its real count)."""
    from model_runtime.models.glm2 import GLM2Config
    from model_runtime.models.glm_hf import HFGLMConfig

    if family in HF_FULL:
        sizes = HF_FULL[family]
        return HFGLMConfig(**dict(sizes, num_hidden_layers=layers or sizes["num_hidden_layers"]), family=family)
    return GLM2Config(**dict(FULL[family], num_layers=layers or FULL[family]["num_layers"]), family=family)


def build(family: str, layers: int, device: str, dtype, bits):
    """A full-size network with `layers` blocks, built on the meta device, then materialised with
    random weights directly in dtype on device (quantized layers quantize their float weight)."""
    import torch

    from model_runtime.loading.family import model_class

    config = config_for(family, layers)
    model = model_class(config).empty(config, torch.device(device), dtype, quantize=bits)
    randomize(model, device)
    return model.eval()


def full_bytes_per_token(family: str, dtype_bytes: int, bits, context: int) -> int:
    """Bytes a decode step of the FULL model reads: every weight but the embedding table, plus the
    KV cache of `context` tokens (per-row float16 scales of quantized layers included)."""
    config = config_for(family)
    other, block_linear = config.parameter_counts()
    embedding = config.vocab_size * config.hidden_size
    h, f, kv_size = config.hidden_size, config.inner_hidden_size, config.kv_heads * config.head_dim
    rows = config.num_layers * ((config.num_attention_heads * config.head_dim + 2 * kv_size) + h + 2 * f + h)
    linear = block_linear * bits / 8 + rows * 2 if bits else block_linear * dtype_bytes
    kv = 2 * config.num_layers * config.kv_heads * config.head_dim * dtype_bytes * context
    return int((other - embedding) * dtype_bytes + linear + kv)


def worker(args) -> dict:
    import torch

    from model_runtime.loading.device import pick_dtype
    from model_runtime.protocol import SamplingParams
    from model_runtime.serving.decode_batch import DecodeBatch, new_sequence

    family, _, kind = args.row.partition(":")
    bits = {"int8": 8, "int4": 4}.get(kind)
    dtype = pick_dtype(torch.device(args.device), None if bits else kind)
    if bits and args.device == "cpu":
        dtype = torch.bfloat16  # the CPU quantized kernels run on bfloat16 activations
    memory = PeakRSS()
    row = {"model": family, "weights": kind, "layers": args.layers, "layers_full": config_for(family).num_layers}
    with memory.phase(row, "build_peak_rss_gib"):
        start = time.perf_counter()
        model = build(family, args.layers, args.device, dtype, bits)
        row["build_s"] = round(time.perf_counter() - start, 1)
    scale = config_for(family).num_layers / args.layers

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    generator = torch.Generator().manual_seed(0)
    vocab = 60000

    def tokens(n):
        return torch.randint(100, vocab, (n,), generator=generator).tolist()

    params = SamplingParams(max_length=1 << 30, temperature=0)
    batch = DecodeBatch(model, slots=2, max_len=args.context + args.new + args.tokens + 8, vocab_size=vocab)

    def sequence(prompt):
        seq = new_sequence(model, prompt, params, cache_salt="benchmark")  # one user: turns reuse
        seq.stop_ids = frozenset()  # random weights: always decode the full count
        return seq

    # Every forward and every sampling step is timed apart, in the same calls: the forward (the
    # blocks, plus the embedding lookup and final norm) scales with depth, the rest (output layer
    # on one row per sequence, sampling) does not.
    spans = {"forward": [], "sample": []}

    def timed(name, run):
        def wrapper(*args):
            sync()
            start = time.perf_counter()
            result = run(*args)
            sync()
            spans[name].append(time.perf_counter() - start)
            return result
        return wrapper

    batch._forward, batch._sample = timed("forward", batch._forward), timed("sample", batch._sample)

    def measure(action) -> tuple[float, float]:
        """(seconds as built, seconds at the full depth): medians over the calls `action` makes."""
        for times in spans.values():
            times.clear()
        action()
        forward, sample = (statistics.median(spans[name]) for name in ("forward", "sample"))
        return forward + sample, forward * scale + sample

    def prefill(seq):
        batch.admit(seq)
        batch.prefill([seq])

    with memory.phase(row, "run_peak_rss_gib"):
        warm = sequence(tokens(16))  # warm-up (allocator, kernels)
        prefill(warm)
        batch.release(warm)
        batch.slot_contents.clear()

        # Turn 1: the conversation so far, prefilled from scratch, then left in its slot.
        first_prompt = tokens(args.context)
        first = sequence(first_prompt)
        _, prefill_s = measure(lambda: prefill(first))
        batch.release(first)
        row["prefill_tok_s_full"] = round(args.context / prefill_s, 1)

        # Turn 2 with reuse: only the new tokens run.
        second_prompt = first_prompt + tokens(args.new)
        second = sequence(second_prompt)
        _, reuse_s = measure(lambda: prefill(second))
        assert second.cached == len(first_prompt), (second.cached, len(first_prompt))
        # Decode on from there: context + new tokens in the cache.
        second.max_length = len(second.tokens) + args.tokens + 2
        batch.step([second])  # warm-up step
        step_s, step_full_s = measure(lambda: [batch.step([second]) for _ in range(args.tokens)])
        batch.release(second)

        # Turn 2 without reuse: the whole conversation again.
        batch.slot_contents.clear()
        again = sequence(second_prompt)
        _, full_s = measure(lambda: prefill(again))
        assert again.cached == 0
        batch.release(again)

    row["decode_tok_s"] = round(1 / step_s, 2)
    row["decode_tok_s_full"] = round(1 / step_full_s, 3)
    row["gb_read_per_token_full"] = round(
        full_bytes_per_token(family, torch.empty((), dtype=dtype).element_size(), bits,
                             args.context + args.new) / 1e9, 2)
    row["turn2_reuse_ms_full"] = round(reuse_s * 1000)
    row["turn2_full_ms_full"] = round(full_s * 1000)
    row["turn2_speedup"] = round(full_s / reuse_s, 1)
    row["dtype"] = str(dtype).removeprefix("torch.")
    memory.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=None,
                        help="MODEL:WEIGHTS pairs, MODEL in chatglm2 chatglm3 glm4 glm4-0414, WEIGHTS a dtype or int8/int4 "
                             f"(default: {' '.join(DEFAULT_ROWS)}; with --dtype: every model in that dtype)")
    parser.add_argument("--dtype", default=None, help="one dtype for every model (e.g. float16 on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4, help="full-size blocks to build (times are scaled)")
    parser.add_argument("--context", type=int, default=512, help="turn-1 conversation length (tokens)")
    parser.add_argument("--new", type=int, default=32, help="new tokens of turn 2")
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed (after one warm-up)")
    parser.add_argument("--report", default="family", help="results/NAME.json to write (default: family)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows_wanted = args.rows or ([f"{m}:{args.dtype}" for m in FULL] if args.dtype else DEFAULT_ROWS)
    bandwidth = memory_bandwidth_gbs()
    rows = []
    for wanted in rows_wanted:
        command = [sys.executable, "-m", __spec__.name, "--worker", "--row", wanted, "--device", args.device,
                   "--layers", str(args.layers), "--context", str(args.context), "--new", str(args.new),
                   "--tokens", str(args.tokens)]
        row, error = run_worker(command)
        if row is None:
            print(f"{wanted}: failed\n{error[-2000:]}", file=sys.stderr)
            continue
        ceiling = bandwidth / row["gb_read_per_token_full"]
        row["ceiling_tok_s_full"] = round(ceiling, 2)
        row["decode_vs_ceiling"] = round(row["decode_tok_s_full"] / ceiling, 2)
        rows.append(row)
    print(f"\nFull-size shapes, random weights, {args.layers} blocks built (times scaled to the real depth), "
          f"{args.device}; turn 1 = {args.context} tokens, turn 2 adds {args.new}; {args.tokens} decode steps. "
          f"Same-run memory read ceiling {bandwidth:.1f} GB/s.\n")
    report(args.report, rows, {"bandwidth_gbs": round(bandwidth, 1), "device": args.device, "layers_built": args.layers,
                            "context_tokens": args.context, "new_tokens": args.new, "decode_tokens": args.tokens})


if __name__ == "__main__":
    main()
