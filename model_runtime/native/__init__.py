"""Our C++ CPU kernels, for the places where torch's own are far from what the CPU can do: in a
decode step, Linear layers with few input rows, bfloat16 or quantized (decode_matmul.cpp), and
one-query-row attention to the KV cache (decode_attention.cpp), both bound by memory; in a
prefill, a prompt's attention to its slot (prefill_attention.cpp), bound by arithmetic.

One build holds a code path per instruction set (`ISAS`, fastest first): "avx512" (AVX-512; for
bfloat16 and INT4 weights also AVX512-BF16) and "avx2" (AVX2 + FMA: Intel Core since Haswell,
AMD since Zen). The environment variable CHATGLM_CPU_ISA=avx512|avx2|none caps the path (to test
or compare the lower ones on one machine; "none": torch's kernels only).

Start-up: everything that can be decided without the compiler is decided first (the OS, the
CPU's flags, CHATGLM_CPU_ISA): where no path runs, nothing is built. Otherwise the extension is
built with torch's extension builder the first time a process asks for it (about 15 s with g++
and ninja) into a folder named by a hash of the torch version, the sources and the flags (a
torch upgrade or an edited kernel never loads a stale build), and later processes load it.
`build_in_background()` lets the build run while a model loads; `python -m model_runtime.native`
(or `chatglm-webdemo --build-kernels`) builds it ahead, at install time. The compiler runs only in
a child process (the server loads the finished library, never runs ninja), whose TMPDIR is a
folder of the build's own, so its scratch files (assembly, linker tables) never appear in the
server's temp folder, which holds users' exports. Builds hold an OS file lock, which the child
shares: it is released when both are gone, so a build that outlives a killed server is waited
for, never doubled, and torch's own lock file found while holding ours was left by a killed
build (torch would wait on it forever) and is removed. A model that only stays in CPU memory and
computes elsewhere (ZeroGPU: on the GPU inside each call) loads under `switched_off`, which builds
nothing. Everything degrades to a reason string: callers then use torch's kernels and log why,
once."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils import cpp_extension

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("decode_matmul.cpp", "decode_attention.cpp", "prefill_attention.cpp")]
CFLAGS = ["-O3", "-fopenmp"]
ISA_VARIABLE = "CHATGLM_CPU_ISA"
ISAS = ("avx512", "avx2")  # our code paths, fastest first
ISA_FLAGS = {"avx512": {"avx512f", "avx512bw"}, "avx2": {"avx2", "fma"}}  # as /proc/cpuinfo names them
BF16_FLAG = "avx512_bf16"  # the avx512 path's `vdpbf16ps` (bfloat16 and INT4 weights)
IN_FEATURES_MULTIPLE = {16: 32, 8: 16, 4: 64}  # what `linear`'s loads assume, per weight width
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # what decode_attention is built for
PREFILL_HEAD_DIM_MULTIPLE = {"avx512": 16, "avx2": 8}  # prefill_attention: head sizes up to 256 in these steps
BUILD_TIMEOUT_S = 900  # a build takes 15-60 s; a hung compiler must not hang every later start
COMPILE = ("import sys\nfrom torch.utils import cpp_extension\n"  # what the child process runs
           "cpp_extension.load(name=sys.argv[1], extra_cflags=sys.argv[2].split(), sources=sys.argv[3:],"
           " is_python_module=False, verbose=False)")

_build_lock = threading.Lock()
_logged: set[str] = set()
_switched_off: list[str] = []  # reasons of the `switched_off` blocks running now


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where it does not)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next((line for line in cpuinfo if line.startswith("flags")), ":").split(":")[1].split())
    except OSError:
        return frozenset()


def forced_isa() -> Optional[str]:
    """CHATGLM_CPU_ISA when set (an ISAS name or "none"), else None."""
    value = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if value and value not in (*ISAS, "none"):
        raise ValueError(f"{ISA_VARIABLE}={value!r}: use one of {', '.join(ISAS)}, none")
    return value or None


@contextmanager
def switched_off(reason: str) -> Iterator[None]:
    """No path of ours (and no build) inside this block, for `reason`: for loading a model that
    computes elsewhere. Decisions made inside stay made (kernel choices are cached per process)."""
    _switched_off.append(reason)
    try:
        yield
    finally:
        _switched_off.remove(reason)


def bf16_arithmetic() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16) and the avx512 path is allowed:
    otherwise torch's bfloat16 GEMMs convert every element and float32 ones are faster."""
    return BF16_FLAG in cpu_flags() and path_unavailable("avx512") is None


def dequantized_gemm_dtype() -> torch.dtype:
    """The dtype quantized layers dequantize into for a prefill-sized GEMM: bfloat16 only where
    the CPU multiplies it natively AND it measured faster than float32 here (once, about 0.05 s),
    since the flag does not settle it: a ChatGLM-6B block's GEMMs ran at 330-370 GFLOPS in
    bfloat16 on an AMD EPYC (Zen 4), but at 152 against float32's 239 on an Intel Xeon with
    AVX512-BF16 and no AMX (2 cores each), where a whole INT4 / INT8 model's 512-token prefill ran
    9.6 / 10.7 tokens a second through bfloat16 and 12.6 / 16.3 through float32. (A bfloat16
    model keeps the flag's rule: its weights would be widened on every call, 2.3x slower.)"""
    return torch.bfloat16 if bf16_arithmetic() and _bf16_gemm_measured_faster() else torch.float32


@functools.lru_cache(maxsize=None)
def _bf16_gemm_measured_faster() -> bool:
    faster = gemm_seconds(torch.bfloat16) < gemm_seconds(torch.float32)
    log.info("quantized layers' prefill GEMMs in %s (measured faster here)", "bfloat16" if faster else "float32")
    return faster


def gemm_seconds(dtype: torch.dtype, rows: int = 128, size: int = 2048, repeats: int = 3) -> float:
    """The best of `repeats` timings of a [rows, size] x [size, size] product in dtype (after one
    untimed run)."""
    x, w = torch.randn(rows, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best


def path_unavailable(isa: str, bits: Optional[int] = None) -> Optional[str]:
    """Why our `isa` path cannot run here (for `linear` at `bits`; None: any kernel), from what is
    known without building: the platform, CHATGLM_CPU_ISA and the CPU's flags; None if it can."""
    if _switched_off:
        return f"is not used: {_switched_off[-1]}"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "is built for Linux on x86-64 only"
    forced = forced_isa()
    if forced is not None and (forced == "none" or ISAS.index(isa) < ISAS.index(forced)):
        return f"is turned off by {ISA_VARIABLE}={forced}"
    needs = ISA_FLAGS[isa] | ({BF16_FLAG} if isa == "avx512" and bits in (16, 4) else set())
    missing = sorted(needs - cpu_flags())
    return f"needs a CPU with {', '.join(flag.upper() for flag in missing)}" if missing else None


def extension_name() -> str:
    """The extension's name and build folder: a hash of the torch version, sources and flags."""
    digest = hashlib.sha256(torch.__version__.encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return f"chatglm_native_{digest.hexdigest()[:12]}"


@functools.lru_cache(maxsize=None)
def _build() -> Optional[str]:
    name = extension_name()
    folder = Path(cpp_extension._get_build_directory(name, False))
    library = folder / f"{name}.so"
    log.info("loading %s (built once per machine and torch version with g++, about 15 s)", name)
    try:
        with open(folder.with_name(folder.name + ".flock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released once this process and its compiler are gone
            stale = folder / "lock"  # torch's lock: we hold the only right to build, so it is stale
            if stale.exists():
                log.warning("removing %s, left by a build that was killed", stale)
                stale.unlink()
            if not library.exists():
                _compile(name, folder, guard)
            try:
                torch.ops.load_library(str(library))
            except OSError:  # a library cut short by a kill during linking: build it again, once
                log.warning("%s does not load; building it again", library)
                library.unlink()
                _compile(name, folder, guard)
                torch.ops.load_library(str(library))
    except Exception as error:  # noqa: BLE001 - a missing compiler or ninja, a failed build
        detail = getattr(error, "stderr", None) or getattr(error, "output", None) or str(error)
        first_line = next((line for line in str(detail).strip().splitlines()  # not a traceback's indented lines
                           if "rror" in line and not line.startswith(" ")),
                          str(detail).strip().splitlines()[0] if str(detail).strip() else "")
        return f"could not be built ({type(error).__name__}: {first_line}; it needs g++ and ninja)"
    return None


def _compile(name: str, folder: Path, guard) -> None:
    """Build into `folder` in a child process: the only place the compiler ever runs (this process
    only loads the library), with TMPDIR inside `folder`, since g++ and the linker keep scratch
    files (for seconds) in TMPDIR and this process's TMPDIR is the users' export root. The child
    inherits the lock `guard`, so a build that outlives a killed server still holds it and the
    next start waits for that build instead of starting a second one beside it."""
    scratch = folder / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", COMPILE, name, " ".join(CFLAGS), *map(str, SOURCES)],
                   env={**os.environ, "TMPDIR": str(scratch)}, check=True, capture_output=True, text=True,
                   timeout=BUILD_TIMEOUT_S, pass_fds=(guard.fileno(),))


def build_error() -> Optional[str]:
    """None once the extension is loaded into this process (building it if needed), else why it
    cannot be. Never invokes the compiler where no path of ours runs on this CPU."""
    reasons = [path_unavailable(isa) for isa in ISAS]
    if all(reasons):
        return "; ".join(f"{isa} {reason}" for isa, reason in zip(ISAS, reasons))
    with _build_lock:  # one build per process, even with build_in_background running
        return _build()


def build_in_background() -> None:
    """Start loading (or building) the extension in a thread, for a start-up that has other work
    (reading a checkpoint); whoever needs it next waits for the build. No thread, and no
    compiler, where no path of ours runs here."""
    if not all(path_unavailable(isa) for isa in ISAS):
        threading.Thread(target=build_error, name="native-kernel-build", daemon=True).start()


def log_fallback_once(what: str, reasons: str) -> None:
    """Say once per process why `what` runs on torch's kernels instead of ours."""
    message = f"{what}: torch's kernels ({reasons})"
    if message not in _logged:
        _logged.add(message)
        log.info("%s", message)


def first_isa(unavailable: Callable[[str], Optional[str]]) -> tuple[Optional[str], str]:
    """The fastest path for which unavailable(isa) is None (or None), and why the faster ones
    were passed over."""
    reasons = []
    for isa in ISAS:
        reason = unavailable(isa)
        if reason is None:
            return isa, "; ".join(reasons)
        reasons.append(f"{isa} {reason}")
    return None, "; ".join(reasons)


def _kernel_unavailable(path_reason: Optional[str], supported: Callable[[], bool]) -> Optional[str]:
    """Why a kernel's path cannot run here: `path_reason` (path_unavailable's), the build's error
    (loading the extension), or the extension's own check, `supported` (asked only once loaded)."""
    reason = path_reason or build_error()
    if reason is None and not supported():
        reason = "is not supported by this CPU (the extension's own check)"
    return reason


def linear_unavailable(bits: int, isa: str) -> Optional[str]:
    """None when `linear` with weights of this width (16: bfloat16, 8 / 4: quantized) runs on
    the `isa` path here (loading the extension), else why not."""
    return _kernel_unavailable(path_unavailable(isa, bits), lambda: torch.ops.chatglm.linear_supported(bits, isa))


def linear(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           bits: int, isa: str) -> torch.Tensor:
    """x @ w^T (* scale) + bias, summed in float32, in x's dtype (x: [rows, in_features]). bits 16:
    a bfloat16 weight, no scale; 8 / 4: the published quantized layout (quant/format.py) and its
    per-row scale. Ask `linear_unavailable(bits, isa)` first: it loads the extension."""
    return torch.ops.chatglm.linear(x, weight, scale, bias, bits, isa)


def decode_attention_unavailable(isa: str) -> Optional[str]:
    """None when `decode_attention` runs on the `isa` path here (loading the extension), else why not."""
    return _kernel_unavailable(path_unavailable(isa), lambda: torch.ops.chatglm.decode_attention_supported(isa))


def prefill_attention_unavailable(isa: str) -> Optional[str]:
    """None when `prefill_attention` runs on the `isa` path here (loading the extension), else why not."""
    return _kernel_unavailable(path_unavailable(isa), lambda: torch.ops.chatglm.prefill_attention_supported(isa))


def prefill_attention_keys(k: torch.Tensor, slot: int, columns: int, isa: str) -> torch.Tensor:
    """The first `columns` keys of slot `slot` of k [slots, kv_heads, max_len, d] (bfloat16) laid out
    for `prefill_attention` on the `isa` path (transposed per block of keys; d a multiple of
    PREFILL_HEAD_DIM_MULTIPLE[isa], at most 256). Ask `prefill_attention_unavailable(isa)` first."""
    return torch.ops.chatglm.prefill_attention_keys(k, slot, columns, isa)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, slot: int, start: int, columns: int,
                      prefix_len: int, isa: str) -> torch.Tensor:
    """Prompt rows q [T, heads, d] at cache positions start .. start + T - 1 of slot `slot`, each
    seeing the first `columns` columns j with j < prefix_len or j <= its position: keys from
    `prefill_attention_keys(k, slot, columns, isa)`, values v [slots, kv_heads, max_len, d]
    (bfloat16, read in place; heads a multiple of kv_heads). [T, heads, d] in q's dtype, computed
    in float32."""
    return torch.ops.chatglm.prefill_attention(q, keys, v, slot, start, columns, prefix_len, isa)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, isa: str) -> torch.Tensor:
    """One query row per sequence, q [rows, heads, d], attending to the first lengths[i] positions
    of cache slot slots[i] of k, v [slots, heads, max_len, d] (bfloat16, read in place; as many
    key/value heads as query heads; d in ATTENTION_HEAD_DIMS): [rows, heads, d] in q's dtype.
    Ask `decode_attention_unavailable(isa)` first."""
    return torch.ops.chatglm.decode_attention(q, k, v, slots, lengths, isa)
