"""Full-size ChatGLM-6B speed and memory with random weights: load, prefill, decode.

    python -m benchmarks.decode                      # CPU bfloat16 (the default CPU dtype)
    python -m benchmarks.decode --dtype float32 bfloat16 --tokens 16
    python -m benchmarks.decode --device cuda --dtype float16

Each configuration runs in its own process, so peak-memory figures do not mix. Decode speed is
compared with the memory-read ceiling: every decoded token reads all block weights, the lm_head
and the KV cache once, so tokens/s can not exceed bandwidth / bytes-per-token. On CPU the
bandwidth is the fastest read of the loaded weights just before and after the decode
(common.weights_read_gbs), since it drifts on a shared machine; elsewhere the start-of-run probe.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.common import CACHE, CHATGLM_6B, PeakRSS, gemm_gflops, memory_bandwidth_gbs, report, weights_read_gbs


def bytes_read_per_token(model, context: int) -> int:
    """Weights every decode step reads (all but the embedding table, which is only indexed,
    though lm_head shares it) plus the KV cache of the context."""
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters())
    return weights + model.kv_cache_bytes_per_token() * context


def worker(args) -> dict:
    """Load, prefill a prompt, decode; return measurements (runs in a child process)."""
    import torch

    from model_runtime.loading.loader import load_model
    from model_runtime.protocol import SamplingParams
    from model_runtime.serving.decode_batch import DecodeBatch, new_sequence

    memory = PeakRSS()
    row = {"device": args.device, "dtype": args.dtype}
    with memory.phase(row, "load_peak_rss_gib"):
        start = time.perf_counter()
        tokenizer, model = load_model(args.checkpoint, device=args.device, dtype=args.dtype)
        row["load_s"] = round(time.perf_counter() - start, 1)
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(5, tokenizer.mask_token_id, (args.prompt - 2,), generator=generator).tolist()
    prompt = text_ids + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    params = SamplingParams(max_length=args.prompt + args.tokens + 1, temperature=0)
    seq = new_sequence(model, prompt, params)
    seq.stop_ids = frozenset()  # random weights: always decode the full count
    with memory.phase(row, "generate_peak_rss_gib"):
        batch = DecodeBatch(model, slots=1, max_len=model.config.max_sequence_length, vocab_size=tokenizer.vocab_size)
        batch.admit(seq)
        start = time.perf_counter()
        batch.prefill([seq])
        sync(model)
        row["prefill_tok_s"] = round(args.prompt / (time.perf_counter() - start), 2)
        batch.step([seq])  # warm-up step
        before = weights_read_gbs(model) if model.device.type == "cpu" else None
        start = time.perf_counter()
        for _ in range(args.tokens):
            batch.step([seq])
        sync(model)
        row["decode_tok_s"] = round(args.tokens / (time.perf_counter() - start), 2)
    row["gb_read_per_token"] = round(bytes_read_per_token(model, len(seq.tokens)) / 1e9, 2)
    if before is not None:  # the read ceiling beside the decode (the bandwidth drifts): the faster of before / after
        row["weights_read_gbs"] = round(max(before, weights_read_gbs(model)), 1)
    memory.stop()
    return row


def sync(model) -> None:
    import torch
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens to prefill")
    parser.add_argument("--tokens", type=int, default=16, help="tokens to decode (after one warm-up step)")
    parser.add_argument("--layers", type=int, default=CHATGLM_6B["num_layers"], help="fewer for a quick look")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.dtype = args.dtype[0]
        print(json.dumps(worker(args)))
        return

    from benchmarks.common import run_worker, write_random_checkpoint

    sizes = dict(CHATGLM_6B, num_layers=args.layers)
    checkpoint = write_random_checkpoint(CACHE / f"chatglm-6b-random-{args.layers}l", sizes)
    bandwidth, gflops = memory_bandwidth_gbs(), gemm_gflops()
    rows = []
    for dtype in args.dtype:
        command = [sys.executable, "-m", __spec__.name, "--worker", "--checkpoint", str(checkpoint),
                   "--device", args.device, "--dtype", dtype, "--prompt", str(args.prompt),
                   "--tokens", str(args.tokens)]
        row, error = run_worker(command)
        if row is None:  # e.g. float32 weights do not fit: report the loader's message
            rows.append({"device": args.device, "dtype": dtype, "error": error.splitlines()[-1]})
            continue
        ceiling = row.get("weights_read_gbs", bandwidth) / row["gb_read_per_token"]
        row["bandwidth_ceiling_tok_s"] = round(ceiling, 2)
        row["decode_vs_ceiling"] = round(row["decode_tok_s"] / ceiling, 2)
        rows.append(row)
    print(f"ChatGLM-6B shapes, {args.layers} layers, random weights, {args.prompt}-token prompt, "
          f"{args.tokens} decoded tokens. Same-run ceilings: memory read {bandwidth:.1f} GB/s, "
          f"fp32 GEMM {gflops:.0f} GFLOP/s.\n")
    report("decode", rows, {"bandwidth_gbs": round(bandwidth, 1), "gemm_gflops": round(gflops, 1),
                            "prompt_tokens": args.prompt, "decode_tokens": args.tokens, "layers": args.layers})


if __name__ == "__main__":
    main()
