"""Our CPU decode and prefill against chatglm.cpp 0.4.2 on the same random ChatGLM-6B weights:
INT4 against q4_0, INT8 against q8_0, bfloat16 against f16, alternating rounds.

    python -m benchmarks.chatglm_cpp                      # full size: see docs/performance.md
    python -m benchmarks.chatglm_cpp --quick              # 2 layers, 4 tokens, 1 round: does it run?
    python -m benchmarks.chatglm_cpp --isa native --chatglm-cpp /tmp/chatglm-cpp-native --name chatglm_cpp-native

chatglm.cpp is not a dependency: build it from its PyPI sdist into a folder of its own (the
commands are in docs/performance.md) and name that folder with --chatglm-cpp; without it this
benchmark says so and stops. Its converter (chatglm_cpp/convert.py, imported from that folder)
writes the GGML files from our random float16 checkpoint (benchmarks/common.py, the one
benchmarks/quant.py and cpu_isa.py use) and the real ChatGLM-6B tokenizer, without
trust_remote_code; our INT8 / INT4 checkpoints are benchmarks/quant.py's, quantized from the
same float16 weights.

Each round runs, per width, our side then theirs, each in its own process: ours is
benchmarks/quant.py's serving worker (one repeat; our path forced with CHATGLM_CPU_ISA=avx2
unless --isa native), theirs calls chatglm.cpp's generate_next_token the same way: prefill a
--prompt token prompt, one warm-up step, --tokens timed steps, then the same after a
--long-prompt token prompt; greedy, random token ids, the same thread count on both sides
(chatglm.cpp picks its own: every hardware thread up to 4, else half of them; ours is set to
match). Each side measures the memory-read ceiling right before its decodes (ours: the fastest
read of its own weights; theirs: benchmarks/common.py's 1 GiB read) and divides the bytes one
step reads (weights, tied output layer, KV cache at the middle of the decoded stretch) by it.
Reported: medians of per-round ratios ours / theirs, and each side's median fraction of its
ceiling. The CPU, the thread count and the count of AVX-512 (zmm) instructions in chatglm.cpp's
extension are written beside the figures.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import sentencepiece
import torch

from benchmarks.common import CACHE, cpu_summary, memory_bandwidth_gbs, print_table, report, run_worker
from benchmarks.cpu_isa import quant_worker, serving_checkpoint
from model_runtime import native

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "tokenizers" / "chatglm-6b-ice_text.model"  # the published ice_text.model
PEERS = {4: "q4_0", 8: "q8_0", 16: "f16"}  # our width -> the chatglm.cpp type it is set against
OURS = {4: "int4", 8: "int8", 16: "bfloat16"}


def their_threads() -> int:
    """The thread count chatglm.cpp 0.4.2 uses for decode and prefill (get_num_physical_cores over
    std::thread::hardware_concurrency, which ignores CPU affinity): we run ours at the same."""
    count = os.cpu_count() or 4
    return count if count <= 4 else count // 2


def extension(folder: Path) -> Path | None:
    """chatglm.cpp's compiled extension in an install folder, if it was built there."""
    return next(iter(sorted((folder / "chatglm_cpp").glob("_C*.so"))), None)


def zmm_instructions(library: Path) -> int | None:
    """How many instructions of the library touch AVX-512's zmm registers (0: an AVX2-only build)."""
    if shutil.which("objdump") is None:
        return None
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True)
    return sum("%zmm" in line for line in listing.stdout.splitlines())


def special_ids(tokenizer: Path) -> dict:
    """The real ChatGLM-6B tokenizer's ids that a GGML file and a prompt need."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    return {name: sp.piece_to_id(piece) for name, piece in
            (("eos", "<eop>"), ("pad", "<pad>"), ("gmask", "[gMASK]"), ("bos", "<sop>"), ("mask", "[MASK]"))}


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def import_chatglm_cpp(folder: str, module: str = "chatglm_cpp"):
    """chatglm.cpp's package from its own install folder (never from the project's environment)."""
    sys.path.insert(0, folder)
    return importlib.import_module(module)


class FloatWeights(dict):
    """A state dict that hands out float32 tensors: the official converter quantizes the float32
    weights transformers loads, so q4_0 / q8_0 are rounded from the same values here."""

    def __getitem__(self, key):
        return super().__getitem__(key).float()


def convert_worker(args) -> dict:
    """Our random float16 checkpoint to a GGML file of args.ggml_type, by chatglm.cpp's own
    ChatGLM-6B converter (its config, tokenizer and tensor order, its quantizers)."""
    convert = import_chatglm_cpp(args.chatglm_cpp, "chatglm_cpp.convert")
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    weight_map = json.loads((checkpoint / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shards = {name: torch.load(checkpoint / name, mmap=True, weights_only=True) for name in set(weight_map.values())}
    weights = FloatWeights({key: shards[name][key] for key, name in weight_map.items()})
    weights["lm_head.weight"] = weights.get("transformer.word_embeddings.weight")  # tied, as in ChatGLM-6B
    config = SimpleNamespace(**json.loads((checkpoint / "config.json").read_text()))
    config.eos_token_id, config.pad_token_id = args.eos, args.pad  # ours name the tiny tokenizer's ids
    model = SimpleNamespace(config=config, state_dict=lambda: weights)
    # The attribute path their converter reads the sentencepiece model through (the official
    # remote-code tokenizer's); a .model file is that serialized ModelProto.
    proto = Path(args.tokenizer).read_bytes()
    tokenizer = SimpleNamespace(sp_tokenizer=SimpleNamespace(text_tokenizer=SimpleNamespace(
        sp=SimpleNamespace(serialized_model_proto=lambda: proto))))
    start = time.perf_counter()
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as f:
        convert.ChatGLMConverter.convert(f, model, tokenizer, convert.GGMLType[args.ggml_type.upper()])
    partial.rename(out)
    return {"convert_s": round(time.perf_counter() - start, 1), "gib": round(out.stat().st_size / 2**30, 2)}


def theirs_worker(args) -> dict:
    """chatglm.cpp's decode and prefill, measured as benchmarks/quant.py's serving worker measures ours."""
    chatglm_cpp = import_chatglm_cpp(args.chatglm_cpp)
    contexts = (args.prompt, args.long_prompt)
    start = time.perf_counter()
    pipeline = chatglm_cpp.Pipeline(args.model, max_length=max(contexts) + args.tokens + 2)
    model, config = pipeline.model, pipeline.model.config
    greedy = chatglm_cpp._C.GenerationConfig(max_length=config.max_length, do_sample=False)
    # It maps the file: one untimed forward pages the weights in, as our loader reads ours in.
    model.generate_next_token([args.gmask, args.bos], None, greedy, 0, 2)
    row = {"load_s": round(time.perf_counter() - start, 1)}
    generator = torch.Generator().manual_seed(0)
    weight_bytes = Path(args.model).stat().st_size - Path(args.tokenizer).stat().st_size
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.hidden_size * 2  # float16 keys and values

    row["read_ceiling_gbs"] = round(memory_bandwidth_gbs(), 1)
    for context in contexts:
        ids = torch.randint(5, args.mask, (context - 2,), generator=generator).tolist() + [args.gmask, args.bos]
        start = time.perf_counter()
        ids.append(model.generate_next_token(ids, None, greedy, 0, context))
        prefill_s = time.perf_counter() - start
        ids.append(model.generate_next_token(ids, None, greedy, len(ids) - 1, context))  # warm-up step
        start = time.perf_counter()
        for _ in range(args.tokens):
            ids.append(model.generate_next_token(ids, None, greedy, len(ids) - 1, context))
        rate = args.tokens / (time.perf_counter() - start)
        gb_read = (weight_bytes + kv_bytes_per_token * (context + 1 + args.tokens // 2)) / 1e9
        row.update({f"prefill{context}_tok_s": round(context / prefill_s, 2), f"decode{context}_tok_s": round(rate, 2),
                    f"gb_read{context}": round(gb_read, 3),
                    f"decode{context}_vs_ceiling": round(rate * gb_read / row["read_ceiling_gbs"], 2)})
    row["load_average"] = round(os.getloadavg()[0], 1)
    return row


# ---------------------------------------------------------------------------------------------


def worker_command(kind: str, args, **extra) -> list[str]:
    command = [sys.executable, "-m", __spec__.name, "--worker", kind, "--chatglm-cpp", args.chatglm_cpp,
               "--tokenizer", str(args.tokenizer), "--prompt", str(args.prompt), "--long-prompt",
               str(args.long_prompt), "--tokens", str(args.tokens)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    return command


def ggml_file(bits: int, args, ids: dict) -> Path:
    """Their GGML file of our random checkpoint at the type set against `bits` (made if missing)."""
    out = CACHE / f"chatglm-6b-random-{args.layers}l-ggml-{PEERS[bits]}.bin"
    if not out.exists():
        row, error = run_worker(worker_command("convert", args, checkpoint=serving_checkpoint(16, args), out=out,
                                               **{"ggml-type": PEERS[bits], "eos": ids["eos"], "pad": ids["pad"]}))
        if row is None:
            raise SystemExit(f"chatglm.cpp's converter failed:\n{error}")
        print(f"  converted to {PEERS[bits]}: {row}", flush=True)
    return out


def theirs(bits: int, model: Path, args, ids: dict) -> dict:
    start = time.perf_counter()
    row, error = run_worker(worker_command("theirs", args, model=model, gmask=ids["gmask"], bos=ids["bos"],
                                           mask=ids["mask"]))
    if row is None:
        raise SystemExit(f"chatglm.cpp {PEERS[bits]} worker failed:\n{error}")
    print(f"  theirs {PEERS[bits]}: {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    return row


def summary(bits: int, rounds: list[dict], args) -> dict:
    """Medians over rounds of ours / theirs (per-round ratios) and of each side's ceiling fraction."""
    pairs = [(r["ours"], r["theirs"]) for r in rounds if r["bits"] == bits]
    row = {"ours": OURS[bits], "theirs": PEERS[bits], "kernel": pairs[0][0]["kernel"]}

    def median(values):
        return round(statistics.median(values), 2)

    for context in (args.prompt, args.long_prompt):
        key = f"decode{context}_tok_s"
        row[f"decode@{context} ours"] = median(o[key] for o, _ in pairs)
        row[f"decode@{context} theirs"] = median(t[key] for _, t in pairs)
        row[f"decode@{context} ratio"] = median(o[key] / t[key] for o, t in pairs)
        row[f"of ceiling@{context} ours"] = median(o[f"decode{context}_vs_ceiling"] for o, _ in pairs)
        row[f"of ceiling@{context} theirs"] = median(t[f"decode{context}_vs_ceiling"] for _, t in pairs)
    key = f"prefill{args.long_prompt}_tok_s"
    row[f"prefill@{args.long_prompt} ours"] = median(o[key] for o, _ in pairs)
    row[f"prefill@{args.long_prompt} theirs"] = median(t[key] for _, t in pairs)
    row[f"prefill@{args.long_prompt} ratio"] = median(o[key] / t[key] for o, t in pairs)
    row["ceiling GB/s ours / theirs"] = (f"{median(o['read_ceiling_gbs'] for o, _ in pairs)} / "
                                         f"{median(t['read_ceiling_gbs'] for _, t in pairs)}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chatglm-cpp", default="/tmp/chatglm-cpp-avx2",
                        help="the folder chatglm.cpp 0.4.2 was installed into (pip install --target)")
    parser.add_argument("--isa", choices=("avx2", "native"), default="avx2",
                        help="our path: avx2 forces CHATGLM_CPU_ISA=avx2, native lets the CPU pick")
    parser.add_argument("--bits", type=int, nargs="+", choices=sorted(PEERS), default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of ours then theirs, per width")
    parser.add_argument("--layers", type=int, default=28, help="ChatGLM-6B has 28")
    parser.add_argument("--prompt", type=int, default=16, help="short prompt (tokens)")
    parser.add_argument("--long-prompt", type=int, default=512, help="long prompt (tokens); its prefill is timed")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed after each prompt")
    parser.add_argument("--quick", action="store_true", help="2 layers, 4 tokens, 1 round: a check that it runs")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="ChatGLM-6B's ice_text.model")
    parser.add_argument("--name", help="results/NAME.json (chatglm_cpp, or chatglm_cpp-quick with --quick)")
    for hidden in ("worker", "checkpoint", "out", "ggml-type", "model"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    for hidden in ("eos", "pad", "gmask", "bos", "mask"):
        parser.add_argument(f"--{hidden}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"convert": convert_worker, "theirs": theirs_worker}[args.worker](args)))
        return
    if args.quick:
        args.layers, args.tokens, args.rounds = 2, 4, 1
    args.name = args.name or ("chatglm_cpp-quick" if args.quick else "chatglm_cpp")
    library = extension(Path(args.chatglm_cpp))
    if library is None:
        print(f"skipped: chatglm.cpp is not built in {args.chatglm_cpp} (see docs/performance.md for the build, "
              "then pass its folder with --chatglm-cpp)")
        return

    started = time.perf_counter()
    threads = their_threads()
    env = {"OMP_NUM_THREADS": str(threads), **({native.ISA_VARIABLE: "avx2"} if args.isa == "avx2" else {})}
    zmm = zmm_instructions(library)
    print(f"{cpu_summary()}, {threads} threads on both sides, our path {args.isa}, chatglm.cpp {library} "
          f"({zmm} zmm instructions), load average {os.getloadavg()[0]:.1f}", flush=True)
    ids = special_ids(args.tokenizer)
    serve_args = argparse.Namespace(**{**vars(args), "repeats": 1})
    sources = {bits: (serving_checkpoint(bits, serve_args), ggml_file(bits, args, ids)) for bits in args.bits}
    rounds = []
    for number in range(1, args.rounds + 1):
        for bits, (ours_checkpoint, their_model) in sources.items():
            ours = quant_worker("serve", bits, serve_args, env, checkpoint=ours_checkpoint)
            rounds.append({"round": number, "bits": bits, "ours": ours, "theirs": theirs(bits, their_model, args, ids)})
    rows = [summary(bits, rounds, args) for bits in args.bits]
    extra = {"cpu_model": cpu_summary(), "threads": threads, "our_path": args.isa, "chatglm_cpp": str(library),
             "chatglm_cpp_zmm_instructions": zmm, "layers": args.layers, "prompt_tokens": args.prompt,
             "long_prompt_tokens": args.long_prompt, "decode_tokens": args.tokens, "rounds": rounds,
             "wall_s": round(time.perf_counter() - started), "load_average_end": round(os.getloadavg()[0], 1)}
    print(f"\nChatGLM-6B shapes, {args.layers} layers, random weights; medians over {args.rounds} rounds "
          "(ratio: of per-round ours / theirs; of ceiling: decode bytes per step x tok/s / same-run read):\n")
    report(args.name, rows, extra)


if __name__ == "__main__":
    main()
