"""Our decode-step matmul (model_runtime/native/decode_matmul.cpp), quantized and bfloat16, on
every code path this CPU runs (AVX-512, AVX2; CHATGLM_CPU_ISA forces each in turn): its
arithmetic against the float64 reference at every row count and awkward shape, that it reads the
published weight in place, that bfloat16 models' Linear layers use it only where it applies,
that a machine where it cannot be built falls back to torch's kernels and says why, and that a
start where it cannot help never invokes the compiler."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_runtime.loading.loader import load_model
from model_runtime import native
from model_runtime.native import decode_linear
from model_runtime.native.decode_linear import DECODE_ROWS, DecodeLinear
from model_runtime.quant import backends
from model_runtime.quant.backends import KERNELS, choose_kernel
from model_runtime.quant.convert import quantized_linears
from model_runtime.quant.format import quantize_weight, reference_linear
from model_runtime.serving.launch import start_per_call
from tests.test_quant import cpu_paths, relative_error

KERNEL_CACHES = (backends._choose_kernel, backends._self_check)

# (out, in) shapes: a row count that is not a whole block of 4, in_features with a half chunk left
# over (INT4 reads 128 inputs per 64-byte load, INT8 16 per load), and full-size ChatGLM-6B rows.
SHAPES = {8: [(4097, 48), (13, 16), (512, 4096)], 4: [(4097, 64), (13, 192), (512, 4096)]}


@pytest.mark.parametrize("bits", [8, 4])
def test_matches_the_reference_at_every_row_count_and_shape(bits, isa):
    assert native.linear_unavailable(bits, isa) is None  # builds (g++ and ninja are requirements) and runs here
    generator = torch.Generator().manual_seed(bits)
    for out_features, in_features in SHAPES[bits]:
        weight, scale = quantize_weight(torch.randn(out_features, in_features, generator=generator), bits)
        bias = torch.randn(out_features, generator=generator)
        for rows in (1, 2, 3, 4, 5, 8, 9):  # activation rows go in groups of up to 4
            # bfloat16 values (INT4 multiplies in bfloat16), given in float32 to see the float32 sums:
            # the products are exact, only the order of the float32 sums differs from the reference
            x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16).float()
            assert relative_error(native.linear(x, weight, scale, bias, bits, isa),
                                  reference_linear(x, weight, scale, bits, bias)) < 1e-6, (out_features, rows)
            # bfloat16 activations (the model's): only the output is rounded to bfloat16
            xb = x.to(torch.bfloat16)
            got = native.linear(xb, weight, scale, bias.to(torch.bfloat16), bits, isa)
            assert got.dtype == torch.bfloat16
            assert relative_error(got, reference_linear(xb, weight, scale, bits, bias.to(torch.bfloat16))) < 4e-3


@pytest.mark.parametrize("bf16_measured_faster", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_reads_the_published_weight_in_place_and_switches_to_a_gemm_for_prefill(bits, isa, bf16_measured_faster,
                                                                                 monkeypatch):
    monkeypatch.setattr(native, "_bf16_gemm_measured_faster", lambda: bf16_measured_faster)
    weight, scale = quantize_weight(torch.randn(256, 512), bits)
    kernel = KERNELS[f"cpu-{isa}"].prepare(weight, scale, bits)
    assert kernel.name == f"cpu-{isa}"
    # the prefill GEMM in bfloat16 only where the CPU multiplies it natively, the path may use it,
    # and it measured faster than float32 here
    assert kernel.gemm_dtype == (torch.bfloat16 if isa == "avx512" and "avx512_bf16" in native.cpu_flags()
                                 and bf16_measured_faster else torch.float32)
    assert kernel.weight.data_ptr() == weight.data_ptr()  # no second copy of the weights
    assert kernel.nbytes() == weight.numel() + scale.numel() * (2 + 4)  # + float16 and float32 scales
    assert all(torch.equal(a, b) for a, b in zip(kernel.published(), (weight, scale)))
    for rows in (kernel.gemm_above, kernel.gemm_above + 1):  # the last fused call and the first GEMM
        x = torch.randn(rows, 512, dtype=torch.bfloat16)
        assert relative_error(kernel(x), reference_linear(x, weight, scale, bits)) < 6e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_model_runs_on_it(tiny_checkpoint, bits, isa):
    _, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=bits)
    assert {layer.kernel.name for layer in quantized_linears(model).values()} == {f"cpu-{isa}"}


def test_a_machine_that_cannot_build_it_gets_torchs_kernels_and_the_reason(monkeypatch, caplog, tmp_path):
    """No build yet and no ninja on PATH: the real build fails in its child process, and the
    reason reaches the log and the kernel's error."""
    caches = (native._build, *KERNEL_CACHES)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger=backends.__name__):
            assert choose_kernel("cpu", 8, torch.bfloat16).name == "cpu-int8pack"
        assert "could not be built (CalledProcessError: RuntimeError: Ninja is required" in caplog.text
        with pytest.raises(RuntimeError, match="cpu-avx2 could not be built"):
            KERNELS["cpu-avx2"](*quantize_weight(torch.randn(8, 64), 8), 8)
    finally:
        monkeypatch.undo()
        for cache in caches:
            cache.cache_clear()
    assert choose_kernel("cpu", 8, torch.bfloat16).name == f"cpu-{cpu_paths(8)[0]}"  # the real build is back


@pytest.mark.parametrize("bits", [16])
def test_bfloat16_weights_match_the_reference_as_closely_as_torch(bits, isa):
    assert native.linear_unavailable(bits, isa) is None
    generator = torch.Generator().manual_seed(16)
    for out_features, in_features in ((4097, 32), (13, 96), (512, 4096)):
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        bias = torch.randn(out_features, generator=generator).to(torch.bfloat16)
        for rows in (1, 3, 4, 5, 9):
            x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
            expected = F.linear(x.double(), weight.double(), bias.double())
            got = native.linear(x, weight, None, bias, 16, isa)
            assert got.dtype == torch.bfloat16
            assert relative_error(got, expected) <= 1.1 * relative_error(F.linear(x, weight, bias), expected) + 1e-6


@pytest.mark.parametrize("bits", [16])
def test_a_bfloat16_model_decodes_through_it_and_prefills_through_torch(tiny_checkpoint, monkeypatch, bits, isa):
    _, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16")
    _, reference = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    swapped = [name for name, module in model.named_modules() if type(module) is DecodeLinear]
    plain = [name for name, module in reference.named_modules() if type(module) is nn.Linear]
    assert swapped == plain and swapped  # every float Linear (in_features are multiples of 32 here)
    assert {model.get_submodule(name).isa for name in swapped} == {isa}
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # the tie survives
    assert list(model.state_dict()) == list(reference.state_dict())
    layer = model.transformer.layers[0].mlp.dense_h_to_4h
    calls = []
    monkeypatch.setattr(decode_linear, "linear", lambda *args: calls.append(args[0].shape) or native.linear(*args))
    with torch.inference_mode():
        for rows in (1, DECODE_ROWS, DECODE_ROWS + 1):
            x = torch.randn(1, rows, layer.in_features).to(torch.bfloat16)
            expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            assert relative_error(layer(x), expected) < 4e-3
    assert calls == [(1, layer.in_features), (DECODE_ROWS, layer.in_features)]  # not the 33-row prefill
    x = torch.randn(2, layer.in_features).to(torch.bfloat16)
    layer(x).float().sum().backward()  # with autograd: torch's path, so gradients flow
    assert layer.weight.grad is not None and len(calls) == 2


@pytest.mark.parametrize("why", ["a CPU without AVX2", "CHATGLM_CPU_ISA=none", "a model that computes on the GPU"])
def test_a_start_where_our_kernels_cannot_help_never_invokes_the_compiler(tiny_checkpoint, monkeypatch, caplog, why,
                                                                           tmp_path):
    """Decided before building: no compiler, torch's kernels everywhere, and the reason logged once."""
    builds = []
    monkeypatch.setattr(native, "_compile", lambda name, folder, guard: builds.append(name))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))  # no build to load: one would compile
    monkeypatch.setattr(native, "_logged", set())
    for cache in (native._build, *KERNEL_CACHES):
        cache.cache_clear()
    if why == "a CPU without AVX2":
        monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "f16c"}))
    elif why == "CHATGLM_CPU_ISA=none":
        monkeypatch.setenv(native.ISA_VARIABLE, "none")
    try:
        with caplog.at_level(logging.INFO):
            if why == "a model that computes on the GPU":  # ZeroGPU: the model waits in CPU memory between calls
                model = start_per_call(tiny_random=True, dtype="bfloat16", quantize=8, device="cuda").runner.model
                cache = None  # made on the GPU, inside a call
            else:
                _, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=8)
                cache = model.new_kv_cache(2, 64)
    finally:
        for cache_ in (native._build, *KERNEL_CACHES):
            cache_.cache_clear()
    assert builds == []
    assert {layer.kernel.name for layer in quantized_linears(model).values()} == {"cpu-int8pack"}
    assert not any(isinstance(module, DecodeLinear) for module in model.modules())
    if cache is not None:
        assert cache.layers[0].native_decode is None
        assert caplog.text.count("decode attention: torch's kernels (avx512 ") == 1
        assert caplog.text.count("bfloat16 Linear layers: torch's kernels (avx512 ") == 1


def test_a_build_leaves_nothing_in_tmpdir_and_a_killed_server_never_blocks_or_doubles_the_next(tmp_path):
    """Real builds, as `python -m model_runtime.native` runs them, into an extensions folder that
    holds the lock file a build killed long ago left behind (torch would wait on it forever). The
    first start is killed while its compiler runs; the second waits for that orphaned build and
    loads it: every object compiled exactly once (ninja's log), no compiler in the second
    process, and nothing ever in TMPDIR, which the server shares with users' exports (polled all
    along: g++'s assembly and the linker's tables live there for seconds otherwise)."""
    extensions, scratch = tmp_path / "extensions", tmp_path / "tmp"
    scratch.mkdir()
    folder = extensions / native.extension_name()
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    seen = set()

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "model_runtime.native"], cwd=Path(__file__).parents[1],
                                env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "TMPDIR": str(scratch)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    killed = start()
    while not (folder / "build.ninja").exists():  # written by the compiler's process just before ninja runs
        assert killed.poll() is None, killed.stdout.read()
        seen.update(path.name for path in scratch.iterdir())
        time.sleep(0.002)
    killed.kill()
    killed.wait()
    build = start()
    while build.poll() is None:
        seen.update(path.name for path in scratch.iterdir())
        time.sleep(0.002)
    output = build.stdout.read()
    assert build.returncode == 0, output
    assert "decode attention: avx" in output and (folder / f"{folder.name}.so").exists()
    assert not (folder / "lock").exists()
    built = [line.split("\t")[3] for line in (folder / ".ninja_log").read_text().splitlines()[1:]]
    assert sorted(built) == sorted([f"{folder.name}.so", *(source.with_suffix(".o").name for source in native.SOURCES)])
    assert seen == set() and not any(scratch.iterdir())


def test_the_build_folder_is_keyed_by_torch_and_the_sources(monkeypatch):
    """A torch upgrade or an edited kernel never loads a stale build: each gets its own folder."""
    name = native.extension_name()
    monkeypatch.setattr(native.torch, "__version__", "9.9.9")
    assert native.extension_name() != name


def test_bfloat16_gemms_are_measured_only_where_the_cpu_multiplies_bfloat16(monkeypatch):
    def measured():
        raise AssertionError("measured without AVX512-BF16")
    monkeypatch.setattr(native, "_bf16_gemm_measured_faster", measured)
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert native.dequantized_gemm_dtype() == torch.float32
    assert native.gemm_seconds(torch.float32, rows=4, size=64, repeats=1) > 0
