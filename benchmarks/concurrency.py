"""Aggregate decode speed and time to first token of the engine at 1, 2, 4, 8 and 16 streams.

    python -m benchmarks.concurrency                     # mid-size random model on CPU
    python -m benchmarks.concurrency --full --device cuda --dtype float16

Every stream asks for the same number of tokens, greedy, at the same moment; aggregate tok/s is
all answer tokens over the wall time, per-stream tok/s is each stream's own tokens over its own
decode time. The baseline is the single stream measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from benchmarks.common import CHATGLM_6B, report
from model_runtime.models.glm6b import ChatGLMModel, GLMConfig
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.serving.engine import Engine
from model_runtime.tiny.glm6b import write_tiny_tokenizer
from model_runtime.tokenizers.glm6b import ChatGLMTokenizer

MID_SIZE = dict(CHATGLM_6B, hidden_size=1024, num_layers=8, num_attention_heads=16, inner_hidden_size=4096)


def random_model(sizes: dict, device: str, dtype: torch.dtype):
    folder = tempfile.mkdtemp(prefix="bench-tokenizer-")
    write_tiny_tokenizer(folder)
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    config = GLMConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                       pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(0)
    model = ChatGLMModel.empty(config, torch.device(device), dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, param.shape[-1] ** -0.5)
    return tokenizer, model


def run_streams(engine: Engine, streams: int, tokens: int) -> dict:
    results = [None] * streams
    barrier = threading.Barrier(streams + 1)

    def client(index):
        request = ChatRequest(messages=(Message("user", f"第{index}个问题：今天天气怎么样？"),),
                              sampling=SamplingParams(temperature=0, max_new_tokens=tokens))
        barrier.wait()
        start = time.perf_counter()
        first = None
        for event in engine.submit(request):
            if first is None and event.completion_tokens:
                first = time.perf_counter()
            last = event
        end = time.perf_counter()
        results[index] = (first - start, last.completion_tokens, end - first, last.finish_reason)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    generated = sum(r[1] for r in results)
    return {"streams": streams, "aggregate_tok_s": round(generated / wall, 1),
            "per_stream_tok_s": round(statistics.mean((r[1] - 1) / r[2] for r in results), 1),
            "ttft_mean_s": round(statistics.mean(r[0] for r in results), 3),
            "ttft_max_s": round(max(r[0] for r in results), 3),
            "complete": all(r[1] == tokens or r[3] == "stop" for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CPU, float16 on GPUs")
    parser.add_argument("--full", action="store_true", help="full-size ChatGLM-6B shapes instead of mid-size")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=48, help="answer tokens per stream")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cpu" else torch.float16)
    sizes = CHATGLM_6B if args.full else MID_SIZE
    tokenizer, model = random_model(sizes, args.device, dtype)
    engine = Engine(tokenizer, model, slots=max(args.streams), max_queue=0, context_length=512)
    run_streams(engine, 2, 4)  # warm-up
    rows = [run_streams(engine, n, args.tokens) for n in args.streams]
    base = rows[0]
    for row in rows:
        row["aggregate_vs_1"] = round(row["aggregate_tok_s"] / base["aggregate_tok_s"], 2)
        row["per_stream_vs_1"] = round(row["per_stream_tok_s"] / base["per_stream_tok_s"], 2)
    engine.close()
    shape = "full-size" if args.full else "mid-size (hidden 1024, 8 layers, ChatGLM-6B vocabulary)"
    print(f"Engine on {args.device} {str(dtype).removeprefix('torch.')}, {shape} random model, "
          f"{args.tokens} greedy tokens per stream, all streams submitted together.\n")
    report("concurrency", rows, {"device": args.device, "dtype": str(dtype), "sizes": sizes, "tokens": args.tokens})


if __name__ == "__main__":
    main()
