"""Aggregate decode speed of the engine at 1, 4 and 16 streams, after 128 and 1024 tokens of
context, for this tree and for an earlier commit measured in the same run.

    python -m benchmarks.concurrency                        # mid-size random model on CPU, vs 3aced62
    python -m benchmarks.concurrency --baseline HEAD~3      # any commit (checked out as a git worktree)
    python -m benchmarks.concurrency --baseline none --full --device cuda

Every stream sends its own prompt of about CONTEXT tokens and asks for the same number of greedy
tokens, all at the same moment. "decode tok/s" counts the tokens after each stream's first over
the time all streams decode together (from the last first token to the last token), so that it
measures the decode path, not the prefill; "wall tok/s" counts every answer token over the whole
run. Each (tree, streams, context) runs in a fresh process; the two trees alternate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import CHATGLM_6B, report

ROOT = Path(__file__).resolve().parents[1]
MID_SIZE = dict(CHATGLM_6B, hidden_size=1024, num_layers=8, num_attention_heads=16, inner_hidden_size=4096)
ANSWER_ROOM = 300  # max_length beyond the context: the history budget keeps min(256, max_length/4) free


def load_runtime():
    """The classes the worker needs, from whichever layout the model_runtime on sys.path has (this
    tree's, or an earlier commit's flat modules): the one place that knows both."""
    try:
        from model_runtime.models.glm6b import ChatGLMModel, GLMConfig
        from model_runtime.serving.engine import Engine
        from model_runtime.tiny.glm6b import write_tiny_tokenizer
        from model_runtime.tokenizers.glm6b import ChatGLMTokenizer
    except ImportError:
        from model_runtime.config import GLMConfig
        from model_runtime.engine import Engine
        from model_runtime.model import ChatGLMModel
        from model_runtime.testing import write_tiny_tokenizer
        from model_runtime.tokenizer import ChatGLMTokenizer
    return ChatGLMModel, GLMConfig, Engine, write_tiny_tokenizer, ChatGLMTokenizer


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process: print its JSON."""
    import torch

    from model_runtime.protocol import ChatRequest, Message, SamplingParams

    ChatGLMModel, GLMConfig, Engine, write_tiny_tokenizer, ChatGLMTokenizer = load_runtime()
    folder = tempfile.mkdtemp(prefix="bench-tokenizer-")
    write_tiny_tokenizer(folder)
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    sizes = CHATGLM_6B if args.full else MID_SIZE
    config = GLMConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                       pad_token_id=tokenizer.pad_token_id, **sizes)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cpu" else torch.float16)
    torch.manual_seed(0)
    model = ChatGLMModel.empty(config, torch.device(args.device), dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, param.shape[-1] ** -0.5)
    max_length = args.context + ANSWER_ROOM
    engine = Engine(tokenizer, model, slots=args.streams, max_queue=0, context_length=max_length)

    def prompt(index: int) -> str:
        text = f"第{index}个问题："
        while len(tokenizer.encode(text + "今天天气怎么样？")) < args.context:
            text += "今天天气怎么样？"
        return text

    prompts = [prompt(i) for i in range(args.streams)]
    results = [None] * args.streams
    barrier = threading.Barrier(args.streams + 1)

    def client(index):
        request = ChatRequest(messages=(Message("user", prompts[index]),),
                              sampling=SamplingParams(temperature=0, max_length=max_length, max_new_tokens=args.tokens))
        barrier.wait()
        first = last = None
        for event in engine.submit(request):
            if first is None and event.completion_tokens:
                first = time.perf_counter()
            last = event
        results[index] = (first, time.perf_counter(), last.completion_tokens, last.prompt_tokens, last.finish_reason)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    engine.close()
    decode_start, decode_end = max(r[0] for r in results), max(r[1] for r in results)
    after_first = sum(r[2] - 1 for r in results)
    return {"decode_tok_s": round(after_first / (decode_end - decode_start), 2),
            "wall_tok_s": round(sum(r[2] for r in results) / (decode_end - start), 2),
            "prompt_tokens": round(statistics.mean(r[3] for r in results)),
            "complete": all(r[2] == args.tokens for r in results)}


def measure(tree: Path, args: argparse.Namespace, streams: int, context: int) -> dict:
    """Run the worker (this file) in a fresh process whose model_runtime is `tree`'s."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--streams", str(streams),
               "--context", str(context), "--tokens", str(args.tokens), "--device", args.device]
    command += ["--full"] if args.full else []
    command += ["--dtype", args.dtype] if args.dtype else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"the worker failed on {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def baseline_tree(revision: str) -> Path:
    """A git worktree of `revision` beside the cache (made once, reused)."""
    tree = ROOT / "benchmarks" / ".cache" / f"worktree-{revision.replace('/', '_')}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CPU, float16 on GPUs")
    parser.add_argument("--full", action="store_true", help="full-size ChatGLM-6B shapes instead of mid-size")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024], help="prompt tokens per stream")
    parser.add_argument("--tokens", type=int, default=32, help="answer tokens per stream")
    parser.add_argument("--baseline", default="3aced62", help="earlier commit to measure beside this tree; none: skip")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.streams, args.context = args.streams[0], args.context[0]
        print(json.dumps(worker(args)))
        return
    trees = {"this tree": ROOT}
    if args.baseline != "none":
        trees[args.baseline] = baseline_tree(args.baseline)
    rows = []
    for context in args.context:
        for streams in args.streams:
            row = {"context": context, "streams": streams}
            for name, tree in trees.items():
                result = measure(tree, args, streams, context)
                row[f"{name} decode tok/s"] = result["decode_tok_s"]
                row[f"{name} wall tok/s"] = result["wall_tok_s"]
                row["complete"] = row.get("complete", True) and result["complete"]
            if args.baseline != "none":
                row["decode vs baseline"] = round(row["this tree decode tok/s"] / row[f"{args.baseline} decode tok/s"], 2)
            rows.append(row)
            print(row, flush=True)
    shape = "full-size" if args.full else "mid-size (hidden 1024, 8 layers, ChatGLM-6B vocabulary)"
    print(f"\nEngine on {args.device}, {shape} random model, {args.tokens} greedy tokens per stream, all streams "
          f"submitted together; baseline {args.baseline} measured in the same run.\n")
    report("concurrency", rows, {"device": args.device, "dtype": args.dtype or "default", "full": args.full,
                                 "tokens": args.tokens, "baseline": args.baseline})


if __name__ == "__main__":
    main()
