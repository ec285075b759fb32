"""INT8 / INT4 ChatGLM-6B at full size with random weights, on CPU: the matmul kernels, then memory
while loading and serving, and decode speed after a short and a long prompt against the
memory-read ceiling measured in the same run.

    python -m benchmarks.quant                    # everything: about 15 minutes on 2 cores
    python -m benchmarks.quant --bits 8 --layers 4 --skip-kernels   # a quick look
    python -m benchmarks.quant --kernels-only     # the kernel table alone (about 2 minutes)
    python -m benchmarks.quant --lm-head both     # serving with the INT8 and the float output layer

1. Kernels: every CPU backend of model_runtime/quant/ on the four Linear shapes of one block
   (12288x4096, 4096x4096, 16384x4096, 4096x16384), 1 row (a decode step) and 512 rows (a
   prefill), best of 3; "tok/s" = rows / (layers x block time): the blocks' Linear layers only.
   The opt-in fbgemm backend quantizes activations too: its error against the exact
   dequantize-then-matmul result is measured on plain random activations and on activations with
   outlier channels (1% of channels 30x larger, as LLM activations have).
2. A random float16 checkpoint in the official .bin layout (benchmarks/common.py, shared with
   decode.py, cached in benchmarks/.cache; about 12 GB for 28 layers).
3. Per width, each step in a fresh process so that peaks do not mix:
   a. on the fly: load_model(fp16 checkpoint, quantize=N) -> peak RSS and time; save_quantized;
   b. serving: load_model(saved checkpoint) (its default lm_head: INT8 with quantized blocks) ->
      peak RSS; then --repeats 5 times: the read ceiling, then per context (--prompt 16 and
      --long-prompt 512 tokens, alternating) prefill, one warm-up step, decode --tokens 16 ->
      tok/s; median, min and min/median.
Peak RSS is the kernel's high-water mark (VmHWM, reset per phase) where Linux allows it.
Ceiling: every decode step reads the quantized block weights, the output layer (its INT8 copy,
or the float tied embedding), norms and biases, and the context's KV cache once; tok/s cannot
exceed the read bandwidth / those bytes. The bandwidth is the fastest read of the model's own
weights measured just before each repeat (common.weights_read_gbs: torch's sum over them, or our
kernel streaming the largest matrix), because it drifts by a third within minutes on a shared
machine; "vs ceiling" and "@512 / @16" (decode speed after the long
prompt over after the short one) are medians of per-repeat ratios. On a shared machine the figures are noisy: the
load average is printed beside each phase. The chatglm.cpp / original-implementation figures of
issue 8 (same model, their machine) are printed beside ours for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import (CACHE, CHATGLM_6B, PeakRSS, gemm_gflops, memory_bandwidth_gbs,
                               print_table, report, run_worker, weights_read_gbs, write_random_checkpoint)

GIB = 2**30

# Issue 8's reference table (ChatGLM-6B on CPU; measured on the issue's machine, not in this run).
REFERENCE = [
    {"mode": "chatglm.cpp 0.4.2 q4_0", "decode_tok_s": 4.59, "prefill_tok_s": 6.3, "peak_rss_gib": 4.56},
    {"mode": "chatglm.cpp 0.4.2 q8_0", "decode_tok_s": 3.48, "prefill_tok_s": 7.1, "peak_rss_gib": 7.4},
    {"mode": "original implementation INT4", "decode_tok_s": 0.33, "prefill_tok_s": 8.6, "peak_rss_gib": 7.7},
    {"mode": "original implementation INT8", "decode_tok_s": 0.40, "prefill_tok_s": 8.8, "peak_rss_gib": 10.3},
]


# ---------------------------------------------------------------------------------------------
# Peak memory of one phase


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


class PhasePeak:
    """Peak RSS per phase: the kernel's exact high-water mark (VmHWM), reset between phases by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0); elsewhere common.PeakRSS's 5 ms polling."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.poller = None
        except OSError:
            self.poller = PeakRSS()

    @contextmanager
    def phase(self, into: dict, key: str):
        """Peak RSS of the block in into[key] (the larger one where the key is measured again)."""
        seen = {}
        if self.poller is not None:
            with self.poller.phase(seen, key):
                yield
        else:
            Path("/proc/self/clear_refs").write_text("5")
            yield
            seen[key] = round(_status_kib("VmHWM") * 1024 / GIB, 2)
        into[key] = max(into.get(key, 0.0), seen[key])

    @staticmethod
    def current_gib() -> float:
        import psutil
        return round(psutil.Process().memory_info().rss / GIB, 2)


# ---------------------------------------------------------------------------------------------
# 1. Kernels


def best_time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def kernels_worker(args) -> dict:
    import torch

    from model_runtime.quant.backends import KERNELS
    from model_runtime.quant.format import quantize_weight, reference_linear

    h, f = CHATGLM_6B["hidden_size"], CHATGLM_6B["inner_hidden_size"]
    shapes = [(3 * h, h), (h, h), (f, h), (h, f)]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for bits in args.bits:
        layers = [quantize_weight(torch.randn(n, k, generator=generator) / k ** 0.5, bits) for n, k in shapes]
        biases = [torch.zeros(n, dtype=torch.bfloat16) for n, _ in shapes]
        candidates = [("cpu-avx512", torch.bfloat16), ("cpu-avx2", torch.bfloat16), ("cpu-int8pack" if bits == 8 else "cpu-int4pack", torch.bfloat16),
                      ("dequant", torch.bfloat16), ("dequant", torch.float32), ("cpu-fbgemm-dynamic", torch.bfloat16)]
        for name, dtype in candidates:
            if KERNELS[name].unavailable(torch.device("cpu"), bits, dtype):
                continue
            kernels = [KERNELS[name].prepare(q, s, bits) for q, s in layers]
            row = {"bits": bits, "kernel": name, "activations": str(dtype).removeprefix("torch."),
                   "opt_in": KERNELS[name].opt_in}
            for m in (1, 512):
                xs = [torch.randn(m, k, generator=generator).to(dtype) for _, k in shapes]
                seconds = sum(best_time(lambda: kernel(x, b.to(dtype))) for kernel, x, b in zip(kernels, xs, biases))
                row[f"ms_per_block_{m}"] = round(seconds * 1e3, 1)
                row[f"linears_tok_s_{m}"] = round(m / (CHATGLM_6B["num_layers"] * seconds), 2)
            # Error against the exact (float64) dequantize-then-matmul, on the largest layer.
            (q, s), kernel = layers[2], kernels[2]
            plain = torch.randn(16, h, generator=generator)
            outliers = plain.clone()
            outliers[:, torch.randperm(h, generator=generator)[:h // 100]] *= 30
            for label, x in (("random", plain), ("outliers", outliers)):
                x = x.to(dtype)
                expected = reference_linear(x, q, s, bits)
                error = ((kernel(x).double() - expected).norm() / expected.norm()).item()
                row[f"rel_error_{label}"] = float(f"{error:.2g}")
            rows.append(row)
            del kernels
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------
# 2.-3. Loading, serving


def bytes_read_per_token(model, context: int) -> int:
    from model_runtime.quant.convert import quantized_linears
    from model_runtime.quant.linear import QuantizedOutputLayer

    floats = sum(p.numel() * p.element_size() for p in model.parameters())  # lm_head = embedding, once
    if isinstance(model.lm_head, QuantizedOutputLayer):  # the embedding: one row read, not the matrix
        embedding = model.transformer.word_embeddings.weight
        floats -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    packed = sum(m.kernel.nbytes() for m in quantized_linears(model).values())
    return floats + packed + model.kv_cache_bytes_per_token() * context


def onthefly_worker(args) -> dict:
    from model_runtime.loading.loader import load_model
    from model_runtime.quant.saving import save_quantized

    peak = PhasePeak()
    row = {"mode": f"int{args.bits[0]} on the fly from fp16", "rss_before_gib": peak.current_gib()}
    with peak.phase(row, "load_peak_rss_gib"):
        start = time.perf_counter()
        tokenizer, model = load_model(args.checkpoint, device="cpu", quantize=args.bits[0])
        row["load_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    save_quantized(model, tokenizer, args.out)
    row["save_s"] = round(time.perf_counter() - start, 1)
    row["saved_gib"] = round(sum(p.stat().st_size for p in Path(args.out).iterdir()) / GIB, 2)
    return row


def serve_worker(args) -> dict:
    import statistics

    import torch

    from model_runtime.loading.loader import load_model
    from model_runtime.protocol import SamplingParams
    from model_runtime.quant.convert import quantized_linears
    from model_runtime.quant.linear import QuantizedOutputLayer
    from model_runtime.serving.decode_batch import DecodeBatch, new_sequence

    peak = PhasePeak()
    row = {"mode": "bfloat16" if args.bits[0] == 16 else f"int{args.bits[0]}", "rss_before_gib": peak.current_gib()}
    with peak.phase(row, "load_peak_rss_gib"):
        start = time.perf_counter()
        tokenizer, model = load_model(args.checkpoint, device="cpu", lm_head=args.lm_head)
        row["load_s"] = round(time.perf_counter() - start, 1)
    row["lm_head"] = "int8" if isinstance(model.lm_head, QuantizedOutputLayer) else "float"
    layer = model.transformer.layers[0].mlp.dense_h_to_4h  # bfloat16 (--bits 16): DecodeLinear, or nn.Linear
    row["kernel"] = layer.kernel.name if hasattr(layer, "kernel") else f"{type(layer).__name__} {getattr(layer, 'isa', '')}"
    row["rss_loaded_gib"] = peak.current_gib()
    generator = torch.Generator().manual_seed(0)
    contexts = (args.prompt, args.long_prompt) if args.long_prompt else (args.prompt,)
    batch = DecodeBatch(model, slots=1, max_len=max(contexts) + args.tokens + 2, vocab_size=tokenizer.vocab_size)

    def prefilled(length):
        ids = torch.randint(5, tokenizer.mask_token_id, (length - 2,), generator=generator).tolist()
        prompt = ids + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
        seq = new_sequence(model, prompt, SamplingParams(max_length=length + args.tokens + 2, temperature=0))
        seq.stop_ids = frozenset()  # random weights: always decode the full count
        batch.admit(seq)
        start = time.perf_counter()
        batch.prefill([seq])
        return seq, time.perf_counter() - start

    # Contexts alternate within each repeat, and each repeat measures the read ceiling just before
    # its decodes: this machine's memory bandwidth drifts by a third within minutes, so ratios are
    # taken per repeat, then their median.
    rates = {context: [] for context in contexts}
    ratios = {context: [] for context in contexts}
    gb_read = {context: bytes_read_per_token(model, context + 1 + args.tokens // 2) / 1e9 for context in contexts}
    ceilings, prefill_s = [], {context: [] for context in contexts}
    for _ in range(args.repeats):
        ceilings.append(weights_read_gbs(model))
        with peak.phase(row, "serve_peak_rss_gib"):
            for context in contexts:
                seq, seconds = prefilled(context)
                prefill_s[context].append(seconds)
                batch.step([seq])  # warm-up step
                start = time.perf_counter()
                for _ in range(args.tokens):
                    batch.step([seq])
                rates[context].append(args.tokens / (time.perf_counter() - start))
                batch.release(seq)
        for context in contexts:
            ratios[context].append(rates[context][-1] * gb_read[context] / ceilings[-1])
    row["read_ceiling_gbs"] = round(statistics.median(ceilings), 1)
    row["read_ceiling_gbs_min_max"] = [round(min(ceilings), 1), round(max(ceilings), 1)]
    for context in contexts:
        median = statistics.median(rates[context])
        row[f"decode{context}_tok_s"] = round(median, 2)
        row[f"decode{context}_min"] = round(min(rates[context]), 2)
        row[f"decode{context}_min/median"] = round(min(rates[context]) / median, 2)
        # Bytes of one step at the middle of the decoded stretch (weights, output layer, KV).
        row[f"gb_read{context}"] = round(gb_read[context], 3)
        row[f"prefill{context}_tok_s"] = round(context / statistics.median(prefill_s[context]), 1)
        row[f"decode{context}_vs_ceiling"] = round(statistics.median(ratios[context]), 2)
    if len(contexts) == 2:
        short, long = contexts
        row[f"decode{long}/decode{short}"] = round(statistics.median(
            b / a for a, b in zip(rates[short], rates[long])), 2)
    row["load_average"] = round(os.getloadavg()[0], 1)
    return row


# ---------------------------------------------------------------------------------------------


def summary(row: dict, args) -> dict:
    """The issue's "what must show" view of one serving row."""
    out = {"mode": f"{row['mode']}, {row['lm_head']} lm_head", "load/serve peak RSS GiB":
           f"{row['load_peak_rss_gib']} / {row['serve_peak_rss_gib']}"}
    for context in (args.prompt, args.long_prompt) if args.long_prompt else (args.prompt,):
        out[f"decode@{context} tok/s"] = (f"{row[f'decode{context}_tok_s']} [{row[f'decode{context}_min']}] "
                                          f"{row[f'decode{context}_min/median']}")
        out[f"vs ceiling@{context}"] = row[f"decode{context}_vs_ceiling"]
    if args.long_prompt:
        key = f"decode{args.long_prompt}/decode{args.prompt}"
        out[f"@{args.long_prompt} / @{args.prompt}"] = row[key]
        out[f"prefill@{args.long_prompt} tok/s"] = row[f"prefill{args.long_prompt}_tok_s"]
    return out


def measure(kind: str, args, **extra) -> dict:
    """One of this benchmark's workers (kernels, onthefly, serve), timed; exits if it fails."""
    command = [sys.executable, "-m", __spec__.name, "--worker", kind, "--bits", *map(str, args.bits), "--prompt",
               str(args.prompt), "--tokens", str(args.tokens), "--long-prompt", str(args.long_prompt),
               "--repeats", str(args.repeats)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    result, error = run_worker(command)
    if result is None:
        sys.stderr.write(error + "\n")
        raise SystemExit(f"{kind} worker failed")
    print(f"  {kind} int{'/'.join(map(str, args.bits))}: {time.perf_counter() - start:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--layers", type=int, default=CHATGLM_6B["num_layers"], help="fewer for a quick look")
    parser.add_argument("--prompt", type=int, default=16, help="short context: prompt tokens before decoding")
    parser.add_argument("--long-prompt", type=int, default=512, help="long context: prompt tokens (0: skip)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per repeat (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=5, help="prefill + decode repeats per context")
    parser.add_argument("--kernels-only", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true", help="only the loading/serving runs")
    parser.add_argument("--lm-head", choices=("auto", "float", "int8", "both"), default="auto",
                        help="load_model's lm_head (auto: INT8 with quantized blocks), or float and int8 in turn")
    parser.add_argument("--skip-onthefly", action="store_true", help="reuse the saved quantized checkpoints")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"kernels": kernels_worker, "onthefly": onthefly_worker, "serve": serve_worker}[args.worker]
        print(json.dumps(worker(args)))
        return

    started = time.perf_counter()
    bandwidth, gflops = memory_bandwidth_gbs(), gemm_gflops()
    print(f"memory read {bandwidth:.1f} GB/s, fp32 GEMM {gflops:.0f} GFLOP/s, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    kernel_rows = [] if args.skip_kernels else measure("kernels", args)["rows"]
    if kernel_rows:
        print("\nKernels, the four Linear layers of one full-size block (tok/s: blocks' Linear layers only):")
        print_table(kernel_rows)
    extra = {"bandwidth_gbs": round(bandwidth, 1), "gemm_fp32_gflops": round(gflops, 1), "layers": args.layers,
             "prompt_tokens": args.prompt, "decode_tokens": args.tokens, "long_prompt_tokens": args.long_prompt,
             "kernels": kernel_rows, "reference_issue_8": REFERENCE}
    rows = []
    if not args.kernels_only:
        sizes = dict(CHATGLM_6B, num_layers=args.layers)
        checkpoint = write_random_checkpoint(CACHE / f"chatglm-6b-random-{args.layers}l", sizes)
        for bits in args.bits:
            one = argparse.Namespace(**{**vars(args), "bits": [bits]})
            saved = CACHE / f"chatglm-6b-random-{args.layers}l-int{bits}"
            if not (args.skip_onthefly and (saved / "config.json").exists()):
                rows.append(measure("onthefly", one, checkpoint=checkpoint, out=saved))
            for lm_head in (("int8", "float") if args.lm_head == "both" else (args.lm_head,)):
                rows.append(measure("serve", one, checkpoint=saved, **{"lm-head": lm_head}))
        extra["bandwidth_gbs_end"] = round(memory_bandwidth_gbs(), 1)
    extra["load_average_end"] = round(os.getloadavg()[0], 1)
    extra["wall_s"] = round(time.perf_counter() - started)
    print(f"\nChatGLM-6B shapes, {args.layers} layers, random weights, CPU bfloat16 activations. Same-run "
          f"memory read ceiling {bandwidth:.1f} GB/s (end of run: {extra.get('bandwidth_gbs_end', '-')}).\n")
    report("quant", rows or [{"note": "kernels only"}], extra)
    serve_rows = [summary(row, args) for row in rows if "lm_head" in row]
    if serve_rows:
        print(f"\nDecode over {args.repeats} repeats of {args.tokens} tokens (median tok/s [min], min/median), "
              "and its ratio to the memory-read ceiling (block weights + output layer + KV read per step):")
        print_table(serve_rows)
    print("\nFor reference, issue 8's table (their machine, not measured here):")
    print_table(REFERENCE)


if __name__ == "__main__":
    main()
