"""A GPU check in one run: decode speed with and without CUDA graphs against the HBM ceiling, and
the ZeroGPU path (a model kept in CPU memory, moved to the GPU inside the call).

    python -m benchmarks.cuda_check                       # on a CUDA machine, about 3 minutes
    python -m benchmarks.cuda_check --device cpu --layers 2 --contexts 16 64   # a dry run on CPU

1. HBM ceiling: the best of a few 2 GiB device-to-device copies (read + write) in this run.
2. Full-size ChatGLM-6B shapes (`--layers` of them) with random weights, bfloat16 and INT4, built on
   the GPU. Decode tok/s for (streams, context) pairs, eager (the per-row in-place attention) and
   with CUDA graphs (`DecodeBatch(compile_options=...)`: the whole-cache step compiled by
   torch.compile's "cudagraphs" backend, and once with the engine's own CUDA_GRAPHS, inductor's
   "reduce-overhead"); the warm-up (compile) time; each figure against the
   ceiling: weights read once per step plus the KV each step reads (per-row: what the rows hold;
   whole-cache: every slot's full length).
3. ZeroGPU's path: the tiny ChatGLM-6B in INT4 and bfloat16, loaded on the CPU, answers through
   `PerCallBackend(device="cuda")` (the model moves in the call, its INT4 layers re-pack for CUDA);
   the kernels it ends up with and its greedy tokens beside the CPU's; then how long moving the
   full-size bfloat16 weights (12 GB) from CPU memory to the GPU takes.
Writes benchmarks/results/cuda_check.json and prints one table; stops starting new measurements
after --budget-s seconds.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import CHATGLM_6B, randomize, report
from model_runtime.models.glm6b import ChatGLMModel, GLMConfig
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.quant.convert import quantized_linears
from model_runtime.serving.decode_batch import CUDA_GRAPHS, DecodeBatch, new_sequence
from model_runtime.serving.per_call import PerCallBackend
from model_runtime.loading.loader import load_model
from model_runtime.tiny.checkpoint import write_tiny_checkpoint

SPECIAL_IDS = dict(bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3)
STEPS = 24


def hbm_gbs(device: str) -> float:
    source = torch.empty(2**31, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best / 1e9


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def glm6b_config(layers: int) -> GLMConfig:
    return GLMConfig(**dict(CHATGLM_6B, num_layers=layers), **SPECIAL_IDS)


def build(layers: int, device: str, dtype, bits):
    """Random ChatGLM-6B weights made straight on the device (quantized layers quantize theirs)."""
    model = ChatGLMModel.empty(glm6b_config(layers), torch.device(device), dtype, quantize=bits)
    randomize(model, device)
    return model.eval()


def weight_bytes(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(layer.kernel.nbytes() for layer in quantized_linears(model).values())


def decode_rate(model, streams: int, context: int, compile_options, device: str) -> dict:
    """tok/s of `streams` sequences decoding together after `context`-token prompts."""
    config = model.config
    max_len = context + STEPS + 8
    generator = torch.Generator().manual_seed(streams * 10007 + context)
    greedy = SamplingParams(max_length=max_len, temperature=0)
    seqs = []
    for _ in range(streams):
        text = torch.randint(5, 130000, (context - 2,), generator=generator).tolist()
        seq = new_sequence(model, text + [config.gmask_token_id, config.bos_token_id], greedy)
        seq.stop_ids = frozenset()
        seqs.append(seq)
    batch = DecodeBatch(model, streams, max_len, compile_options=compile_options)
    for seq in seqs:
        batch.admit(seq)
    batch.prefill(seqs)
    sync(device)
    start = time.perf_counter()
    for _ in range(3):  # the first steps compile and capture
        batch.step(seqs)
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(STEPS):
        batch.step(seqs)
    sync(device)
    seconds = time.perf_counter() - start
    kv_per_token = model.kv_cache_bytes_per_token()
    kv_read = kv_per_token * (streams * max_len if batch.whole_decode else sum(len(s.tokens) for s in seqs))
    return {"tok_s": round(streams * STEPS / seconds, 1), "step_ms": round(1000 * seconds / STEPS, 2),
            "warmup_s": round(warm_s, 1), "gb_per_step": round((weight_bytes(model) + kv_read) / 1e9, 2)}


def zerogpu_path(device: str) -> dict:
    """The tiny model through PerCallBackend: loaded on the CPU, moved to `device` in the call."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, cpu_model = load_model(write_tiny_checkpoint(folder), device="cpu", dtype="bfloat16", quantize=4)
        _, moving = load_model(folder, device="cpu", dtype="bfloat16", quantize=4)
    request = ChatRequest((Message("user", "你好"),), SamplingParams(max_length=64, temperature=0))
    on_cpu = list(PerCallBackend(tokenizer, cpu_model, device="cpu").submit(request))[-1]
    start = time.perf_counter()
    moved = list(PerCallBackend(tokenizer, moving, device=device).submit(request))[-1]
    kernels = sorted({layer.kernel.name for layer in quantized_linears(moving).values()})
    return {"finish": moved.finish_reason, "error": moved.error, "tokens": moved.completion_tokens,
            "first_call_s": round(time.perf_counter() - start, 2), "device_after": str(moving.device),
            "kernels_after": kernels, "same_text_as_cpu": moved.text == on_cpu.text,
            "common_prefix_chars": next((i for i, (a, b) in enumerate(zip(moved.text, on_cpu.text)) if a != b),
                                        min(len(moved.text), len(on_cpu.text)))}


def move_seconds(layers: int, device: str) -> dict:
    """Moving full-size bfloat16 weights from CPU memory to the device (a fresh ZeroGPU worker's
    first call does this)."""
    model = ChatGLMModel.empty(glm6b_config(layers), torch.device("cpu"), torch.bfloat16)
    sync(device)
    start = time.perf_counter()
    model.to(device)
    sync(device)
    seconds = time.perf_counter() - start
    gb = weight_bytes(model) / 1e9
    del model
    return {"gb": round(gb, 2), "seconds": round(seconds, 2), "gb_per_s": round(gb / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=CHATGLM_6B["num_layers"])
    parser.add_argument("--contexts", type=int, nargs=2, default=(16, 1024), metavar=("SHORT", "LONG"))
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=200.0)
    args = parser.parse_args()
    began = time.monotonic()
    cuda = torch.device(args.device).type == "cuda"
    static = {"fullgraph": True, "dynamic": False}
    # cudagraphs: dynamo's capture replayed as CUDA graphs, no code generation (compiles in seconds);
    # CUDA_GRAPHS (the engine's --cuda-graphs): inductor's reduce-overhead, once at the end.
    graphs = dict(static, backend="cudagraphs") if cuda else dict(static, backend="eager")
    ceiling = hbm_gbs(args.device) if cuda else None
    rows, extra = [], {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                       "hbm_gbs": round(ceiling, 1) if ceiling else None, "layers": args.layers}
    short, long = args.contexts
    plan = [("bfloat16", None, 1, short, "eager", None), ("bfloat16", None, 1, short, "cudagraphs", graphs),
            ("bfloat16", None, 1, long, "eager", None), ("bfloat16", None, 1, long, "cudagraphs", graphs),
            ("bfloat16", None, args.streams, long, "eager", None),
            ("bfloat16", None, args.streams, long, "cudagraphs", graphs),
            ("int4", 4, 1, short, "eager", None), ("int4", 4, 1, short, "cudagraphs", graphs),
            ("bfloat16", None, 1, short, "reduce-overhead", CUDA_GRAPHS if cuda else graphs)]
    models = {}
    for weights, bits, streams, context, mode, options in plan:
        row = {"weights": weights, "streams": streams, "context": context, "mode": mode}
        if time.monotonic() - began > args.budget_s:
            rows.append(dict(row, error="skipped: time budget spent"))
            continue
        if weights not in models:
            models.clear()
            if cuda:
                torch.cuda.empty_cache()
            models[weights] = build(args.layers, args.device, torch.bfloat16, bits)
        try:
            row.update(decode_rate(models[weights], streams, context, options, args.device))
            if ceiling:
                row["vs_ceiling"] = round(row["gb_per_step"] / (ceiling * row["step_ms"] / 1000), 2)
        except Exception as error:  # noqa: BLE001 - the table says what failed; the run goes on
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print(row, flush=True)
    models.clear()
    try:
        extra["zerogpu_path"] = zerogpu_path(args.device)
    except Exception as error:  # noqa: BLE001
        extra["zerogpu_path"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    if cuda:
        try:
            extra["move_full_bf16"] = move_seconds(CHATGLM_6B["num_layers"], args.device)
        except Exception as error:  # noqa: BLE001
            extra["move_full_bf16"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    extra["seconds"] = round(time.monotonic() - began, 1)
    print(f"{extra['device']}, torch {extra['torch']}, HBM copy ceiling {extra['hbm_gbs']} GB/s, "
          f"{args.layers} layers of ChatGLM-6B, random weights.\n")
    report("cuda_check", rows, extra)


if __name__ == "__main__":
    main()
