"""Shared measuring tools for the benchmarks: machine ceilings, peak memory, random checkpoints,
and the table/JSON report. Every speed is reported beside a ceiling measured in the same run."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import psutil
import torch

from model_runtime import native
from model_runtime.quant.convert import quantized_linears

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))

# ChatGLM-6B's published config.json sizes.
CHATGLM_6B = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384,
              "vocab_size": 130528, "max_sequence_length": 2048}


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """The fastest read of a large buffer we know here, with torch's thread count: torch's sum
    over it as float32, or our decode kernel's paths streaming it as a bfloat16 weight [rows, 4096]
    (on Zen 4 that reads a third faster than torch's reductions: a ceiling from the sum alone
    would be beaten)."""
    buffer = torch.ones(int(gib * 2**30) // 4)
    reads = [(buffer.sum, buffer.nbytes)]
    weight, x = buffer.view(torch.bfloat16).view(-1, 4096), torch.zeros(1, 4096, dtype=torch.bfloat16)
    reads += [(lambda isa=isa: native.linear(x, weight, None, None, 16, isa), buffer.nbytes) for isa in read_paths(16)]
    return fastest_read_gbs(reads, repeats)


def read_paths(bits: int) -> list[str]:
    """Our kernel's paths this CPU runs at that width, whatever CHATGLM_CPU_ISA says (the op
    checks the CPU only): a read ceiling is the machine's, not the forced path's."""
    if native.build_error():
        return []
    return [isa for isa in native.ISAS if torch.ops.chatglm.linear_supported(bits, isa)]


def fastest_read_gbs(reads, repeats: int) -> float:
    """GB/s of the fastest of `repeats` runs of any (read, bytes it reads) in reads."""
    best = 0.0
    for read, nbytes in reads:
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return best


def weights_read_gbs(model, repeats: int = 2) -> float:
    """The fastest this machine reads a loaded model's weights right now (GB/s), with no extra
    memory: torch's sum over every weight (as int64 words), or our decode kernel streaming the
    largest matrix (faster than torch's reductions on Zen 4). Measured beside the decode it
    bounds, because the bandwidth of a shared machine drifts by a third within minutes."""
    kernels = [layer.kernel for layer in quantized_linears(model).values()]
    tensors = [p.detach() for p in model.parameters()] + [kernel.published()[0] for kernel in kernels]
    words = [t.view(-1).view(torch.int64) for t in tensors if t.is_contiguous() and t.nbytes % 8 == 0]
    total = sum(t.nbytes for t in words)

    def torch_sum():
        for t in words:
            t.sum()

    reads = [(torch_sum, total)]
    largest = max(tensors, key=lambda t: t.nbytes)
    bits = {torch.bfloat16: 16, torch.int8: 8}.get(largest.dtype)
    if largest.dim() == 2 and bits and largest.device.type == "cpu":
        x = torch.zeros(1, largest.shape[1], dtype=torch.bfloat16)
        scale = None if bits == 16 else torch.ones(largest.shape[0])
        reads += [(lambda isa=isa: native.linear(x, largest, scale, None, bits, isa), largest.nbytes)
                  for isa in read_paths(bits)]
    return fastest_read_gbs(reads, repeats)


def gemm_gflops(m: int = 512, k: int = 4096, n: int = 4096, repeats: int = 5) -> float:
    """Best float32 matrix-multiply throughput at a prefill-like shape."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


class PeakRSS:
    """Highest resident memory of this process seen since the last reset (polled every 5 ms)."""

    def __init__(self):
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def reset(self) -> None:
        self.peak = self._process.memory_info().rss

    @contextmanager
    def phase(self, into: dict, key: str):
        """Record the phase's peak RSS (GiB) into `into[key]`."""
        self.reset()
        yield
        into[key] = round(max(self.peak, self._process.memory_info().rss) / 2**30, 2)

    def stop(self) -> None:
        self._stop.set()


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")  # what our paths use


def machine() -> dict:
    """The machine a result came from: the CPU's model name and the features our kernels use."""
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": _cpuinfo("model name"),
            "cpu_flags": _cpu_flags(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "last_level_cache_mib": round(last_level_cache_bytes() / 2**20, 1)}


def cpu_summary() -> str:
    """The CPU's model name and the features our kernels use, for the line above a table."""
    return f"{_cpuinfo('model name') or 'unknown CPU'} ({', '.join(_cpu_flags())})"


def _cpu_flags() -> list[str]:
    return [flag for flag in CPU_FLAGS if flag in native.cpu_flags()]


def last_level_cache_bytes() -> int:
    """The size of the largest cache the first CPU sees (Linux sysfs; 0 where unknown): a
    benchmark whose weights fit in it measures the cache, not the memory a whole model streams from."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


def _cpuinfo(field: str) -> str:
    """A field of the first processor in /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), "")


def write_random_checkpoint(directory: Path, sizes: dict, shards: int = 8, seed: int = 0) -> Path:
    """A random float16 ChatGLM-6B checkpoint of the given sizes in the official .bin shard layout,
    written layer group by layer group so that memory stays at one shard. Tokenizer files come
    from the tiny builder (token ids beyond its vocabulary are simply never produced)."""
    from model_runtime.models.glm6b import GLMConfig
    from model_runtime.tiny.glm6b import write_tiny_tokenizer
    from model_runtime.tokenizers.glm6b import ChatGLMTokenizer

    directory = Path(directory)
    if (directory / "pytorch_model.bin.index.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(directory)
    tokenizer = ChatGLMTokenizer.from_pretrained(directory)
    config = GLMConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                       pad_token_id=tokenizer.pad_token_id, **sizes)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    generator = torch.Generator().manual_seed(seed)
    h, f = config.hidden_size, config.inner_hidden_size

    def randn(*shape):
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).half()

    def layer(i):
        p = f"transformer.layers.{i}."
        return {p + "input_layernorm.weight": torch.ones(h).half(), p + "input_layernorm.bias": torch.zeros(h).half(),
                p + "attention.query_key_value.weight": randn(3 * h, h), p + "attention.query_key_value.bias": randn(3 * h),
                p + "attention.dense.weight": randn(h, h), p + "attention.dense.bias": randn(h),
                p + "post_attention_layernorm.weight": torch.ones(h).half(),
                p + "post_attention_layernorm.bias": torch.zeros(h).half(),
                p + "mlp.dense_h_to_4h.weight": randn(f, h), p + "mlp.dense_h_to_4h.bias": randn(f),
                p + "mlp.dense_4h_to_h.weight": randn(h, f), p + "mlp.dense_4h_to_h.bias": randn(h)}

    groups = [list(range(config.num_layers))[i::shards] for i in range(shards)]
    weight_map = {}
    for number, layers in enumerate(groups, 1):
        name = f"pytorch_model-{number:05d}-of-{shards:05d}.bin"
        state = {}
        if number == 1:
            state["transformer.word_embeddings.weight"] = randn(config.vocab_size, h)
        if number == shards:
            state["transformer.final_layernorm.weight"] = torch.ones(h).half()
            state["transformer.final_layernorm.bias"] = torch.zeros(h).half()
        for i in layers:
            state.update(layer(i))
        torch.save(state, directory / name)
        weight_map.update({key: name for key in state})
        del state
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def run_worker(command: list[str]) -> tuple[Optional[dict], str]:
    """Run one measurement in its own process (so peak-memory figures do not mix): the JSON
    object on its last line of output, or None and its error output when it failed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return None, done.stderr.strip()
    return json.loads(done.stdout.splitlines()[-1]), ""


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def report(name: str, rows: list[dict], extra: dict) -> Path:
    """Print rows as a table and write them, with `extra` (ceilings, machine), to results/NAME.json."""
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **extra, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten {path}")
    return path


def randomize(model, device) -> None:
    """Fill a model built with `empty` with random weights in place, on its device: norms 1,
    biases N(0, 0.02), matrices N(0, 1/fan_in); quantized layers quantize a random float weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif param.dim() == 1:
                param.normal_(0.0, 0.02)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
        for module in quantized_linears(model).values():
            module.load_tensor("weight", torch.randn(module.out_features, module.in_features, device=device)
                               * module.in_features ** -0.5)

