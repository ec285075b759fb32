"""A GPU check in one run: the engine's default decode step (compiled into CUDA graphs) and the
lean eager step against the HBM ceiling, the engine's answers equal to eager, the bf16 Linear at
one row three ways, and the ZeroGPU path (a model kept in CPU memory, moved to the GPU inside the call).

    python -m benchmarks.cuda_check             # on a CUDA machine: about 4 minutes (under 8 on an H100)
    python -m benchmarks.cuda_check --dry-run   # on CPU, tiny shapes: every step runs, no figure means anything

1. HBM ceiling: the best of a few 2 GiB device-to-device copies (read + write) in this run.
2. Full-size ChatGLM-6B shapes (`--layers` of them) with random weights, bfloat16 and INT4, built on
   the GPU. Decode tok/s for (streams, context) pairs: "default" is what the engine runs with no
   flag (`DecodeBatch(compile_options=CUDA_GRAPHS)`: the whole-cache step, inductor's
   "reduce-overhead"), "eager" what --no-cuda-graphs runs; warmup_s is the first three steps
   (the compile, paid at start-up); each figure against the ceiling: the bytes the weights take
   (INT4: packed weights and scales) plus the KV each step reads (eager: what the rows hold;
   whole-cache: every slot's full length).
3. `linear_one_row`: each ChatGLM-6B Linear at one input row in bfloat16, as F.linear with its bias
   (cuBLAS's fused-bias addmm), as a matmul and a separate bias add, and as the INT4 kernel: the
   bf16 eager step once took 68.7 ms where INT4's took 18 (H200), and this says whether the fused
   bias is where the time went.
4. `engine_equal`: the tiny model's engine answers, default (compiled) against --no-cuda-graphs, with
   the default engine's start-up (where it compiles) and its first answer timed apart.
5. ZeroGPU's path: the tiny ChatGLM-6B in INT4 and bfloat16, loaded on the CPU, answers through
   `PerCallBackend(device="cuda")` (the model moves in the call, its INT4 layers re-pack for CUDA);
   the kernels it ends up with and its greedy tokens beside the CPU's; then how long moving the
   full-size bfloat16 weights (12 GB) from CPU memory to the GPU takes.
Writes benchmarks/results/cuda_check.json and prints one table; stops starting new measurements
after --budget-s seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

from benchmarks.common import CHATGLM_6B, print_table, randomize, report
from model_runtime import native
from model_runtime.models.glm6b import ChatGLMModel, GLMConfig
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.quant.convert import quantized_linears
from model_runtime.serving.decode_batch import CUDA_GRAPHS, DecodeBatch, new_sequence
from model_runtime.serving.engine import Engine
from model_runtime.serving.launch import load_for_serving
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


def linear_one_row(device: str, repeats: int = 50) -> list[dict]:
    """Milliseconds per call of each ChatGLM-6B Linear at one bfloat16 row: F.linear with its bias,
    matmul + bias add, and the INT4 kernel (with its bias)."""
    from model_runtime.quant.linear import QuantizedLinear

    h, f = CHATGLM_6B["hidden_size"], CHATGLM_6B["inner_hidden_size"]
    rows = []
    for name, (n_in, n_out) in {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, f),
                                "dense_4h_to_h": (f, h)}.items():
        layer = torch.nn.Linear(n_in, n_out, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, n_in, device=device, dtype=torch.bfloat16)
        int4 = QuantizedLinear.from_linear(layer, 4)
        ways = {"fused_bias_ms": lambda: torch.nn.functional.linear(x, layer.weight, layer.bias),
                "matmul_then_bias_ms": lambda: (x @ layer.weight.t()).add_(layer.bias),
                "int4_ms": lambda: int4(x)}
        row = {"layer": name, "in": n_in, "out": n_out}
        for way, call in ways.items():
            call()
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            sync(device)
            row[way] = round(1000 * (time.perf_counter() - start) / repeats, 4)
        rows.append(row)
    return rows


def engine_equal(device: str, compile_options: dict) -> dict:
    """The tiny model's greedy answers from the engine's default step and from the eager one,
    with the default engine's start (the compile, paid there) and its first answer timed apart."""
    tokenizer, model, _ = load_for_serving(device=device, dtype="bfloat16" if device != "cpu" else None,
                                           tiny_random="glm4")
    request = ChatRequest((Message("user", "你好"),), SamplingParams(max_length=64, temperature=0))

    def answer(engine: Engine) -> str:
        try:
            return list(engine.submit(request))[-1].text
        finally:
            engine.close()

    start = time.perf_counter()
    engine = Engine(tokenizer, model, slots=2) if device != "cpu" else dry_run_engine(tokenizer, model, compile_options)
    ready = time.perf_counter()
    compiled = answer(engine)
    answered = time.perf_counter()
    eager = answer(Engine(tokenizer, model, slots=2, cuda_graphs=False))
    return {"equal": compiled == eager, "chars": len(eager), "engine_start_s": round(ready - start, 1),
            "first_answer_s": round(answered - ready, 2)}


def dry_run_engine(tokenizer, model, compile_options) -> Engine:
    """--dry-run: the engine with CPU-safe compile options, warmed up as on CUDA (Engine compiles
    on CUDA only)."""
    engine = Engine(tokenizer, model, slots=2, cuda_graphs=False)
    engine.batch = DecodeBatch(model, 2, engine.batch.max_len, vocab_size=tokenizer.vocab_size,
                               compile_options=compile_options)
    engine.compile_decode_step()
    return engine


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
    parser.add_argument("--budget-s", type=float, default=360.0, help="no new measurement starts after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, one layer, short contexts, 2 streams; "
                        "prints the table, writes nothing")
    args = parser.parse_args()
    if args.dry_run:  # with none of our CPU kernels (dynamo cannot trace them): the path a GPU runs
        args.device, args.layers, args.contexts, args.streams = "cpu", 1, (16, 64), 2
    with native.switched_off("a dry run of the GPU check") if args.dry_run else contextlib.nullcontext():
        check(args)


def check(args) -> None:
    """Every measurement of the module docstring, in order, within args.budget_s."""
    began = time.monotonic()
    cuda = torch.device(args.device).type == "cuda"
    # The engine's default on CUDA; on CPU (--dry-run) the same trace without code generation.
    default = CUDA_GRAPHS if cuda else {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    ceiling = hbm_gbs(args.device) if cuda else None
    rows, extra = [], {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                       "hbm_gbs": round(ceiling, 1) if ceiling else None, "layers": args.layers}
    short, long = args.contexts
    plan = [("bfloat16", None, 1, short, "default", default), ("bfloat16", None, 1, short, "eager", None),
            ("bfloat16", None, args.streams, long, "default", default),
            ("bfloat16", None, args.streams, long, "eager", None),
            ("int4", 4, 1, short, "default", default), ("int4", 4, 1, short, "eager", None)]
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
        if options is not None:
            torch._dynamo.reset()  # each compiled batch starts from a clean slate
        try:
            row.update(decode_rate(models[weights], streams, context, options, args.device))
            if ceiling:
                row["vs_ceiling"] = round(row["gb_per_step"] / (ceiling * row["step_ms"] / 1000), 2)
        except Exception as error:  # noqa: BLE001 - the table says what failed; the run goes on
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print(row, flush=True)
    models.clear()
    for name, measure in (("linear_one_row", lambda: linear_one_row(args.device, 50 if cuda else 2)),
                          ("engine_equal", lambda: engine_equal(args.device, default))):
        try:
            extra[name] = measure()
        except Exception as error:  # noqa: BLE001
            extra[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(name, extra[name], flush=True)
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
    if args.dry_run:
        print_table(rows)
    else:
        report("cuda_check", rows, extra)


if __name__ == "__main__":
    main()
