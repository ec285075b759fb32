import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The tests see that no answer is mixed up with another by batched float32 answers equalling the
# same conversations alone, bit for bit. On some CPUs (an Intel Xeon with AVX-512 here) MKL's
# float32 GEMM sums a row differently for different batch sizes (F.linear of 1 row against the
# same row among 2-9: not equal), so a near-tie of random tiny weights could flip a greedy token;
# MKL's strict reproducibility mode makes a row's result independent of the batch (servers the
# tests start inherit it). The product's bfloat16 and quantized paths run our own kernels.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Under CI, a skip fails the run unless its reason names hardware this machine lacks: a broken
# install or a missing browser must not pass as a green run with fewer tests.
HARDWARE_SKIP_WORDS = ("CUDA", "GPU", "AVX-512", "AVX512", "AVX2", "AMX", "fbgemm")
_skip_reasons: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _skip_reasons.append(str(report.longrepr[2]))


def pytest_sessionfinish(session, exitstatus):
    undeclared = sorted({reason for reason in _skip_reasons if not any(word in reason for word in HARDWARE_SKIP_WORDS)})
    if os.environ.get("CI") and undeclared and session.exitstatus == 0:
        print("\nskips not declared for missing hardware (CI fails on them):\n  " + "\n  ".join(undeclared))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Timing budgets in tests (tests marked `timing`) are what a quiet machine needs, times this slack:
# CI shares 2 cores with browsers and servers, so it gets 4x unless CHATGLM_TEST_TIME_SLACK says.
TIME_SLACK = float(os.environ.get("CHATGLM_TEST_TIME_SLACK") or (4 if os.environ.get("CI") else 1))


def budget(seconds: float) -> float:
    """A timing bound for a `timing` test: `seconds` on a quiet machine, times TIME_SLACK."""
    return seconds * TIME_SLACK


DATA_DIR = Path(__file__).resolve().parent / "data"  # reference outputs and tokenizer files: see its README


def reference_arrays(name: str):
    """A reader of a reference file's raw little-endian arrays, in order: take(shape, numpy dtype)
    -> tensor; take.remaining() is the number of bytes not yet read."""
    import numpy as np
    import torch

    data = reference_file(name).read_bytes()
    offset = 0

    def take(shape, dtype):
        nonlocal offset
        count = int(np.prod(shape))
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += array.nbytes
        return torch.from_numpy(array.copy())

    take.remaining = lambda: len(data) - offset
    return take


def reference_file(name: str) -> Path:
    """A file of tests/data (part of the repository, so a fresh clone runs every test)."""
    return DATA_DIR / name


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random ChatGLM-6B checkpoint in the official layout (.bin and safetensors)."""
    from model_runtime.tiny.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chatglm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(tokenizer, model) in float32, loaded through load_model like the real checkpoint."""
    from model_runtime.loading.loader import load_model

    return load_model(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_family_checkpoints(tmp_path_factory) -> dict:
    """Tiny random ChatGLM2, ChatGLM3 and GLM-4 checkpoints: family -> folder."""
    from model_runtime.tiny.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-family")
    return {family: write_tiny_checkpoint(root / family, family=family) for family in ("chatglm2", "chatglm3", "glm4")}


@pytest.fixture(scope="session")
def tiny_glm4(tiny_family_checkpoints):
    """(tokenizer, model) of the tiny GLM-4 in float32: a causal model, with KV-cache reuse."""
    from model_runtime.loading.loader import load_model

    return load_model(tiny_family_checkpoints["glm4"], device="cpu", dtype="float32")


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """Each code path of our CPU kernels in turn (model_runtime/native), forced with
    CHATGLM_CPU_ISA, with the cached kernel choices recomputed under it and again after; skipped
    where this CPU lacks it for the test's `bits` parameter (8 when it has none)."""
    from model_runtime import native
    from model_runtime.quant import backends
    from tests.test_quant import cpu_paths

    bits = request.node.callspec.params.get("bits", 8)
    if request.param not in cpu_paths(bits):  # the reason names the CPU feature missing (a hardware skip under CI)
        reason = native.linear_unavailable(bits, request.param) or "is not taken here"
        pytest.skip(f"our {request.param} path at {bits} bits {reason}")
    caches = (backends._choose_kernel, backends._self_check)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setenv("CHATGLM_CPU_ISA", request.param)
    yield request.param
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()
