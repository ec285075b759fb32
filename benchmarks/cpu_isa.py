"""Our CPU kernels' code paths side by side (model_runtime/native: AVX-512 and AVX2 + FMA, the
latter forced with CHATGLM_CPU_ISA=avx2 on an AVX-512 machine), against the memory-read ceiling
measured in the same run.

    python -m benchmarks.cpu_isa --kernels-only   # per-layer kernels, about a minute
    python -m benchmarks.cpu_isa                  # and full-size ChatGLM-6B decode (random weights)

1. Kernels: the four Linear shapes of one ChatGLM-6B block (12288x4096, 4096x4096, 16384x4096,
   4096x16384) at 16 (bfloat16), 8 and 4 bits, one activation row (a decode step) on each path;
   "of ceiling" = the kernel's GB/s over the fastest plain read of the same bytes measured right
   before it in the same round (torch's sum over them as int64 words, or our fastest path
   streaming them as a bfloat16 matrix), median of --rounds per-round ratios. Both read enough
   copies of the block to pass twice the CPU's last-level cache, as a whole model does (one INT4
   block is 109 MB: it fits a 260 MiB L3, whose reads ran at 42 GB/s where memory gave 23).
   "in_cache_of_ceiling": the same path on a weight that stays in that cache, over the same
   ceiling: what the path's instructions allow, the most its decode can reach. Then a 512-row
   prefill of the same layers as each path runs it (dequantize, then one GEMM in bfloat16 where
   the CPU multiplies bfloat16 natively and the path may use it, else in float32).
2. Model (unless --kernels-only): benchmarks/quant.py's serving worker, once per path in its own
   process (CHATGLM_CPU_ISA set for the avx2 one), for INT4, INT8 and bfloat16: decode after a
   --prompt and a --long-prompt token prompt against the read ceiling of the model's own weights
   measured before each repeat, and the prefill speed. The quantized checkpoints are the ones
   benchmarks/quant.py saves (made here if missing).
Every figure names this machine's CPU (the JSON's machine.cpu_model); a shared machine is noisy,
so ratios are taken per round, and the load average is printed beside each phase.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import (CACHE, CHATGLM_6B, cpu_summary, fastest_read_gbs, last_level_cache_bytes, print_table,
                               read_paths, report, run_worker, write_random_checkpoint)
from benchmarks.quant import best_time
from model_runtime import native
from model_runtime.quant.backends import KERNELS
from model_runtime.quant.format import quantize_weight

SHAPES = [(3 * 4096, 4096), (4096, 4096), (16384, 4096), (4096, 16384)]  # one ChatGLM-6B block's Linear layers


def plain_read_gbs(weights: list[torch.Tensor], repeats: int = 2) -> float:
    """The fastest read of these tensors' bytes: torch's sum over them as int64 words, or each of
    our paths streaming them as a bfloat16 matrix."""
    words = [w.view(-1).view(torch.int64) for w in weights]
    total = sum(w.nbytes for w in weights)
    reads = [(lambda: [w.sum() for w in words], total)]
    for isa in read_paths(16):
        as_bf16 = [w.view(-1).view(torch.bfloat16).view(-1, 4096) for w in weights]
        x = torch.zeros(1, 4096, dtype=torch.bfloat16)
        reads.append((lambda isa=isa: [native.linear(x, w, None, None, 16, isa) for w in as_bf16], total))
    return fastest_read_gbs(reads, repeats)


def kernel_rows(rounds: int, prefill_rows: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for bits in (4, 8, 16):
        paths = read_paths(bits)
        if not paths:
            continue
        if bits == 16:
            layers = [(torch.randn(n, k, generator=generator).to(torch.bfloat16), None) for n, k in SHAPES]
        else:
            layers = [quantize_weight(torch.randn(n, k, generator=generator) / k ** 0.5, bits) for n, k in SHAPES]
        block_bytes = sum(w.nbytes for w, _ in layers)
        copies = max(1, math.ceil(2 * last_level_cache_bytes() / block_bytes))
        streamed = layers + [(w.clone(), s) for _ in range(copies - 1) for w, s in layers]
        nbytes = copies * block_bytes
        xs = [torch.randn(1, k, generator=generator).to(torch.bfloat16) for _, k in SHAPES] * copies
        cached_weight, cached_scale = cache_resident_weight(bits, generator)
        cached_x = torch.randn(1, 4096, generator=generator).to(torch.bfloat16)
        ratios, speeds, cached_ratios = ({isa: [] for isa in paths} for _ in range(3))
        ceilings = []
        for _ in range(rounds):
            ceilings.append(plain_read_gbs([w for w, _ in streamed]))
            for isa in paths:
                seconds = best_time(lambda: [native.linear(x, w, s, None, bits, isa)
                                                for x, (w, s) in zip(xs, streamed)])
                speeds[isa].append(nbytes / seconds / 1e9)
                ratios[isa].append(speeds[isa][-1] / ceilings[-1])
                seconds = best_time(lambda: native.linear(cached_x, cached_weight, cached_scale, None, bits, isa), 5)
                cached_ratios[isa].append(cached_weight.nbytes / seconds / 1e9 / ceilings[-1])
        del streamed
        for isa in paths:
            row = {"bits": bits, "path": isa, "block_copies": copies, "decode_gbs": round(statistics.median(speeds[isa]), 1),
                   "read_ceiling_gbs": round(statistics.median(ceilings), 1),
                   "decode_of_ceiling": round(statistics.median(ratios[isa]), 2),
                   "in_cache_of_ceiling": round(statistics.median(cached_ratios[isa]), 2),
                   "decode_ms_per_block": round(block_bytes / statistics.median(speeds[isa]) / 1e6, 2)}
            row.update(prefill(bits, isa, layers, prefill_rows, generator))
            row["load_average"] = round(os.getloadavg()[0], 1)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def cache_resident_weight(bits: int, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A weight of 4096 inputs per row that stays in the last-level cache (a quarter of it, at
    most 4096 rows): a path's speed on it is what its instructions allow with memory out of the
    way, the most its decode_of_ceiling can reach (AVX-512 read 80-115 GB/s from a Zen 5's L3,
    more than its memory gives)."""
    row_bytes = 4096 * bits // 8
    rows = max(64, min(4096, last_level_cache_bytes() // 4 // row_bytes // 64 * 64))
    weight = torch.randn(rows, 4096, generator=generator) / 64
    return (weight.to(torch.bfloat16), None) if bits == 16 else quantize_weight(weight, bits)


def prefill(bits, isa, layers, rows, generator) -> dict:
    """A prefill of `rows` rows through the four layers as the path runs it (with the path forced,
    so that its GEMM dtype is the one a CPU without the faster paths gets)."""
    saved = os.environ.get(native.ISA_VARIABLE)
    os.environ[native.ISA_VARIABLE] = isa
    try:
        if bits == 16:
            from model_runtime.native.decode_linear import DecodeLinear
            linears = []
            for w, _ in layers:
                linear = DecodeLinear(w.shape[1], w.shape[0], bias=False, device="meta")
                linear.weight = torch.nn.Parameter(w, requires_grad=False)
                linear.isa, linear.gemm_in_float32 = isa, not native.bf16_arithmetic()
                linears.append(linear)
            gemm = "float32" if linears[0].gemm_in_float32 else "bfloat16"
        else:
            linears = [KERNELS[f"cpu-{isa}"].prepare(w, s, bits) for w, s in layers]
            gemm = str(linears[0].gemm_dtype).removeprefix("torch.")
    finally:
        os.environ.pop(native.ISA_VARIABLE) if saved is None else os.environ.__setitem__(native.ISA_VARIABLE, saved)
    xs = [torch.randn(rows, w.shape[1] * (2 if bits == 4 else 1), generator=generator).to(torch.bfloat16)
          for w, _ in layers]
    with torch.inference_mode():
        seconds = best_time(lambda: [linear(x) for linear, x in zip(linears, xs)], repeats=1)
    return {"prefill_gemm": gemm, f"prefill{rows}_ms_per_block": round(seconds * 1e3, 1),
            f"prefill{rows}_linears_tok_s": round(rows / (CHATGLM_6B["num_layers"] * seconds), 1)}


def serving_checkpoint(bits: int, args) -> Path:
    """What the serving worker loads at this width (args.layers layers): the random float16
    checkpoint for bfloat16, else benchmarks/quant.py's saved quantized one, made from it here
    if missing."""
    checkpoint = write_random_checkpoint(CACHE / f"chatglm-6b-random-{args.layers}l",
                                         dict(CHATGLM_6B, num_layers=args.layers))
    if bits == 16:
        return checkpoint
    saved = CACHE / f"chatglm-6b-random-{args.layers}l-int{bits}"
    if not (saved / "config.json").exists():
        quant_worker("onthefly", bits, args, {}, checkpoint=checkpoint, out=saved)
    return saved


def model_rows(args) -> list[dict]:
    """benchmarks/quant.py's serving worker per width and path (forced paths in their own process)."""
    rows = []
    for bits in args.bits:
        source = serving_checkpoint(bits, args)
        for isa in args.paths:
            row = quant_worker("serve", bits, args, {native.ISA_VARIABLE: isa}, checkpoint=source)
            rows.append({"path": isa, **row})
            print(json.dumps(rows[-1]), flush=True)  # in the log as it comes: the whole run is long
    return rows


def quant_worker(kind: str, bits: int, args, env: dict, **extra) -> dict:
    command = [sys.executable, "-m", "benchmarks.quant", "--worker", kind, "--bits", str(bits), "--prompt",
               str(args.prompt), "--tokens", str(args.tokens), "--long-prompt", str(args.long_prompt),
               "--repeats", str(args.repeats), "--lm-head", "auto"]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        row, error = run_worker(command)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    if row is None:
        raise SystemExit(f"{kind} worker failed:\n{error}")
    print(f"  {kind} {bits}-bit {env}: {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels-only", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true", help="only the model runs")
    parser.add_argument("--rounds", type=int, default=5, help="kernel rounds (ceiling, then every path)")
    parser.add_argument("--prefill-rows", type=int, default=512)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8, 16], help="model widths (16: bfloat16)")
    parser.add_argument("--paths", nargs="+", default=list(native.ISAS), help="model runs: paths to force in turn")
    parser.add_argument("--layers", type=int, default=CHATGLM_6B["num_layers"])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="cpu_isa", help="results/NAME.json")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"{cpu_summary()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    kernels = [] if args.skip_kernels else kernel_rows(args.rounds, args.prefill_rows)
    if kernels:
        print("\nKernels, the four Linear layers of one full-size block, one row (decode) and "
              f"{args.prefill_rows} rows (prefill):")
        print_table(kernels)
    rows = [] if args.kernels_only else model_rows(args)
    extra = {"cpu_model": cpu_summary(), "kernels": kernels, "layers": args.layers, "prompt_tokens": args.prompt,
             "long_prompt_tokens": args.long_prompt, "decode_tokens": args.tokens, "repeats": args.repeats,
             "wall_s": round(time.perf_counter() - started), "load_average_end": round(os.getloadavg()[0], 1)}
    print()
    report(args.name, rows or [{"note": "kernels only"}], extra)


if __name__ == "__main__":
    main()
