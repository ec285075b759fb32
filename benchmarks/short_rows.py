"""Decode steps of several short answers at once on a CPU without AMX, grouped heads (ChatGLM2/3,
GLM-4): the rows attending in one batched product (`kv_cache.SHORT_ROWS`, the default) against
one `single_query_attention` each (SHORT_ROWS set to 0), alternating in one process.

    python -m benchmarks.short_rows                    # 4 and 8 streams, 4 rounds
    python -m benchmarks.short_rows --streams 2 16 --rounds 6

The mid-size GLM-4 of benchmarks/chunked_prefill.py (hidden 1024, 8 layers, 16 heads, 2 key/value
heads), bfloat16, written and loaded like a checkpoint; stream i's prompt is 20 + 3i tokens, so
the rows have different lengths, all under SHORT_ROWS. Per setting: decode tokens a second over
--steps steps after 3 warm-up steps; medians over rounds and the ratio of the medians.
Results: benchmarks/results/short_rows.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.chunked_prefill import load_mid_size
from benchmarks.common import report
from model_runtime.models import kv_cache
from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, new_sequence

GREEDY = SamplingParams(max_length=400, temperature=0)


def decode_rate(tokenizer, model, streams: int, short_rows: int, steps: int) -> float:
    """Tokens a second of `streams` greedy answers decoded together, with SHORT_ROWS set so."""
    kv_cache.SHORT_ROWS = short_rows
    batch = DecodeBatch(model, slots=streams, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
    seqs = [new_sequence(model, [(7 * i + j) % 500 + 5 for j in range(20 + 3 * i)], GREEDY) for i in range(streams)]
    for seq in seqs:
        seq.stop_ids = frozenset()  # random weights: never stop early
        batch.admit(seq)
    batch.prefill(seqs)
    for _ in range(3):
        batch.step(seqs)
    start = time.perf_counter()
    for _ in range(steps):
        batch.step(seqs)
    return steps * streams / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    batched = kv_cache.SHORT_ROWS
    with tempfile.TemporaryDirectory(prefix="glm4-mid-") as folder:
        tokenizer, model = load_mid_size("glm4", folder)
    if kv_cache.amx_attention():
        print("this CPU has AMX: its decode steps attend in one SDPA call, not by these paths")
    rows = []
    for streams in args.streams:
        rates = {batched: [], 0: []}
        for _ in range(args.rounds):
            for setting in rates:
                rates[setting].append(decode_rate(tokenizer, model, streams, setting, args.steps))
        one_call, by_row = statistics.median(rates[batched]), statistics.median(rates[0])
        longest = 20 + 3 * (streams - 1) + 3 + args.steps  # the longest row's keys at the last step
        rows.append({"streams": streams, "keys": f"20-{longest}",
                     "batched_tok_s": round(one_call, 1), "row_by_row_tok_s": round(by_row, 1),
                     "ratio": round(one_call / by_row, 2)})
    kv_cache.SHORT_ROWS = batched
    print(f"\nCPU, bfloat16, {torch.get_num_threads()} threads; mid-size GLM-4; medians of {args.rounds} rounds.\n")
    report("short_rows", rows, {"rounds": args.rounds, "steps": args.steps, "short_rows": batched})


if __name__ == "__main__":
    main()
