"""Chunked prefill: how long running streams stall while a long newcomer prompt is read, and
what chunking costs the newcomer, with and without chunks, measured in the same run.

    python -m benchmarks.chunked_prefill                          # ChatGLM-6B and GLM-4 mid-size, CPU
    python -m benchmarks.chunked_prefill --families glm4 --chunks auto 64 --rounds 3

A mid-size random model per family (ChatGLM-6B's shape scaled down as in benchmarks/concurrency.py:
hidden 1024, 8 layers, 16 heads, MLP 4096; the tiny tokenizer's vocabulary), bfloat16 on CPU,
written and loaded like a real checkpoint. For each prefill chunk (0: the whole prompt at
once; auto: the engine's default, paced by measured step times, prompt chunks and decode rows in
one packed forward for the causal families; auto-apart: paced, a prompt step then a decode
step, as before packing) a fresh engine decodes `--streams` greedy answers to short prompts; once each
has `--before` tokens a newcomer with a `--newcomer`-token prompt arrives, and the streams go on
until each has `--after` tokens more than when the newcomer's first token came. A running
stream's tokens are timed where they are made: the end of each step that gave it one (the
benchmark wraps the engine's `DecodeBatch.step` and `prefill_and_step`), so a gap is exactly the time between two of its
tokens. The longest gap is set against the stream's median gap (`worst_gap_ratio`, the issue's
measure) and, stricter, against its median gap before the newcomer came (`worst_gap_vs_before`:
during a long read more than half a short stream's gaps may be chunk steps). What a client sees
can be longer: a token with no printable text yet (the tiny tokenizer has byte pieces) comes in
the next event, so `longest_event_wait_ms` gives the longest wait between a stream's events too.
Settings alternate within each round; the table gives the median over rounds.

What must hold (issue 23): longest gap of a running stream <= 8x its median gap, and the
newcomer's time to its first token within 1.2x of the unchunked one.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from benchmarks.common import report
from model_runtime.loading.loader import load_model
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.serving.engine import Engine
from model_runtime.tiny.checkpoint import write_tiny_checkpoint
from model_runtime.tiny.glm6b import TinySize

MID_SIZE = TinySize(hidden_size=1024, num_layers=8, num_attention_heads=16, inner_hidden_size=4096,
                    max_sequence_length=2048 + 256)
QUESTIONS = ["你好", "今天天气怎么样？", "Tell me a story.", "写一首诗"]


def load_mid_size(family: str, folder: str):
    """(tokenizer, model): a random mid-size checkpoint of the family, loaded in bfloat16."""
    write_tiny_checkpoint(folder, size=MID_SIZE, family=family, weight_formats=("safetensors",), shards=1)
    return load_model(folder, device="cpu", dtype="bfloat16")


def long_text(tokenizer, tokens: int) -> str:
    """A user message of about `tokens` tokens (the chat format adds a few)."""
    piece = "请告诉我明天北京的天气怎么样，还有上海和广州的。"
    text = piece
    while len(tokenizer.encode(text)) < tokens:
        text += piece
    while len(tokenizer.encode(text)) > tokens - 12:
        text = text[:-1]
    return text


def ask(query: str, max_new_tokens: int) -> ChatRequest:
    return ChatRequest(messages=(Message("user", query),),
                       sampling=SamplingParams(max_length=MID_SIZE.max_sequence_length, max_new_tokens=max_new_tokens,
                                               temperature=0))


PACED = ("auto", "auto-apart")  # the engine's default budget; "-apart": prompt and decode steps not packed


def chunk_setting(text: str):
    """A --chunks value: one of PACED (kept as is) or a token count."""
    return text if text in PACED else int(text)


def one_run(tokenizer, model, chunk, args) -> dict:
    """One engine, `args.streams` running answers, one newcomer: gaps and the newcomer's TTFT."""
    engine = Engine(tokenizer, model, slots=args.streams + 1, max_queue=0,
                    context_length=MID_SIZE.max_sequence_length, prefill_chunk=None if chunk in PACED else chunk)
    newcomer_text = long_text(tokenizer, args.newcomer)  # before any stream runs: the client's work, not the server's
    step_ends = []  # (when a step that decodes ended, the sequences it gave a token)
    decode_step, packed_step = engine.batch.step, engine.batch.prefill_and_step

    def timed_step(seqs):
        decode_step(seqs)
        step_ends.append((time.perf_counter(), {id(seq) for seq in seqs}))

    def timed_packed_step(reading, decoding, budget):
        read = packed_step(reading, decoding, budget)
        step_ends.append((time.perf_counter(), {id(seq) for seq in decoding}))
        return read

    engine.batch.step, engine.batch.prefill_and_step = timed_step, timed_packed_step
    if chunk == "auto-apart":
        engine.batch.packs = lambda reading, budget: False  # the baseline: a prompt step, then a decode step
    try:
        list(engine.submit(ask("你好", 4)))  # warm up
        timelines = [[] for _ in range(args.streams)]  # (time, tokens so far) per event
        newcomer_first = threading.Event()
        enough = [threading.Event() for _ in range(args.streams)]
        streams = [engine.submit(ask(QUESTIONS[i % len(QUESTIONS)], 4000)) for i in range(args.streams)]
        stream_seqs = [engine._jobs[stream.request_id].seq for stream in streams]

        ended_early = []

        def follow(index):
            tokens_at_newcomer = None
            event = None
            for event in streams[index]:
                if event.completion_tokens > (timelines[index][-1][1] if timelines[index] else 0):
                    timelines[index].append((time.perf_counter(), event.completion_tokens))
                if event.completion_tokens >= args.before:
                    enough[index].set()
                if newcomer_first.is_set():
                    if tokens_at_newcomer is None:
                        tokens_at_newcomer = event.completion_tokens
                    elif event.completion_tokens >= tokens_at_newcomer + args.after:
                        streams[index].cancel()
            if not enough[index].is_set():  # ended before the newcomer came: say so, never wait forever
                ended_early.append(f"{event.finish_reason} after {event.completion_tokens} tokens ({event.error})")
                enough[index].set()

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(args.streams)]
        for thread in threads:
            thread.start()
        for event in enough:
            event.wait()
        if ended_early:
            raise RuntimeError(f"a running stream ended before the newcomer came: {ended_early[0]}")
        submitted = time.perf_counter()
        newcomer = engine.submit(ask(newcomer_text, 2))
        first = prompt_tokens = None
        for event in newcomer:
            if first is None and event.completion_tokens:
                first = time.perf_counter()
                newcomer_first.set()
            prompt_tokens = event.prompt_tokens
        for thread in threads:
            thread.join()
    finally:
        engine.close()
    longest, medians, before, gaps = [], [], [], []
    for seq in stream_seqs:
        times = [end for end, stepped in step_ends if id(seq) in stepped]
        stream_gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
        longest.append(max(stream_gaps))
        medians.append(statistics.median(stream_gaps))
        before.append(statistics.median([gap for gap, t1 in zip(stream_gaps, times[1:]) if t1 < submitted]))
        gaps += stream_gaps
    waits = [t1 - t0 for timeline in timelines for (t0, _), (t1, _) in zip(timeline, timeline[1:])]
    gaps.sort()
    return {"ttft_s": first - submitted, "prompt_tokens": prompt_tokens,
            "worst_gap_ratio": max(w / m for w, m in zip(longest, medians)),
            "worst_gap_vs_before": max(w / b for w, b in zip(longest, before)),
            "longest_gap_ms": 1e3 * max(longest), "median_gap_ms": 1e3 * statistics.median(medians),
            "gap_before_ms": 1e3 * statistics.median(before),
            "p50_gap_ms": 1e3 * gaps[len(gaps) // 2],
            "p99_gap_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
            "longest_event_wait_ms": 1e3 * max(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["chatglm", "glm4"], choices=["chatglm", "chatglm2",
                                                                                       "chatglm3", "glm4"])
    parser.add_argument("--chunks", type=chunk_setting, nargs="+", default=["auto", "auto-apart", 128],
                        help="prefill chunks to measure: tokens, fixed, or auto (the engine's default, paced by "
                             "time; causal models pack prompt chunks and decode rows into one forward), auto-apart "
                             "(paced, never packed: the earlier way)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--newcomer", type=int, default=2048, help="the newcomer's prompt tokens")
    parser.add_argument("--before", type=int, default=16, help="tokens each stream has when the newcomer comes")
    parser.add_argument("--after", type=int, default=32, help="tokens each stream gets after its first one")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for family in args.families:
        with tempfile.TemporaryDirectory(prefix=f"{family}-mid-") as folder:
            tokenizer, model = load_mid_size(family, folder)
        runs = {chunk: [] for chunk in [0, *args.chunks]}
        for _ in range(args.rounds):
            for chunk in runs:
                runs[chunk].append(one_run(tokenizer, model, chunk, args))
                print(family, chunk, {k: round(v, 3) for k, v in runs[chunk][-1].items()}, flush=True)
        whole_ttft = statistics.median(r["ttft_s"] for r in runs[0])
        for chunk, results in runs.items():
            row = {"family": family, "prefill_chunk": chunk}
            for key in results[0]:
                row[key] = round(statistics.median(r[key] for r in results), 3)
            row["ttft_vs_unchunked"] = round(row["ttft_s"] / whole_ttft, 3)
            row["meets_targets"] = row["worst_gap_ratio"] <= 8 and row["ttft_vs_unchunked"] <= 1.2
            rows.append(row)
        del model
    print(f"\nCPU, bfloat16, {torch.get_num_threads()} threads; mid-size random models; {args.streams} streams "
          f"decoding, a {args.newcomer}-token newcomer; medians of {args.rounds} rounds, settings alternating.\n")
    report("chunked_prefill", rows, {"streams": args.streams, "newcomer_tokens": args.newcomer, "rounds": args.rounds,
                                     "before": args.before, "after": args.after, "size": MID_SIZE.__dict__})


if __name__ == "__main__":
    main()
