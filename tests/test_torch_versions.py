"""The torch range (requirements.txt allows 2.8-2.13): the quantized kernels lean on private aten
ops whose presence, signatures and layouts change between releases, so each fused kernel must
either work or give way to "dequant" with a logged reason. Another torch cannot be installed
here, so these tests make this one look like a different release (an op missing, a changed
signature, a changed layout, a wrong answer). The dependency files must agree on the range."""
import logging
import re
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from model_runtime import native
from model_runtime.quant import backends, cpu_kernels
from model_runtime.quant.backends import choose_kernel
from model_runtime.quant.format import QuantizationError
from model_runtime.quant.kernel import aten_op_missing

ROOT = Path(__file__).resolve().parent.parent
REAL_ATEN = torch.ops.aten


class _AtenAsIn:
    """torch.ops.aten as another torch release would have it: each op in `changes` is missing
    (None) or replaced by the given function; every other op is this torch's own."""

    def __init__(self, changes):
        self._changes = changes

    def __getattr__(self, name):
        if name in self._changes:
            if self._changes[name] is None:
                raise AttributeError(f"'_OpNamespace' 'aten' object has no attribute '{name}'")
            return self._changes[name]
        return getattr(REAL_ATEN, name)


@pytest.fixture
def aten_as_in(monkeypatch):
    """Installs an `_AtenAsIn`, with the kernel choice (cached once per process) recomputed under
    it and again after it is gone. Our own CPU kernel (cpu-avx512 / cpu-avx2, first in the "auto" order, no
    aten op involved) is switched off meanwhile: these tests are about torch's kernels behind it."""
    caches = (backends._choose_kernel, backends._self_check, cpu_kernels.int4pack_block_rows)

    def install(**changes):
        for cache in caches:
            cache.cache_clear()
        monkeypatch.setattr(torch.ops, "aten", _AtenAsIn(changes))
        monkeypatch.setattr(native, "linear_unavailable", lambda bits, isa: "is switched off by this test")

    yield install
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()


def _fallback_reason(caplog, bits):
    """choose_kernel("auto") on CPU for bfloat16: the kernel must be dequant; returns the logged reason."""
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert choose_kernel("cpu", bits, torch.bfloat16) is backends.DequantKernel
    warnings = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert len(warnings) == 1, warnings
    assert "using dequantize-then-matmul instead" in warnings[0]
    return warnings[0]


def test_this_torch_gets_the_fused_cpu_kernels(aten_as_in):
    aten_as_in()  # nothing changed: the baseline the other tests depart from
    assert choose_kernel("cpu", 8, torch.bfloat16).name == "cpu-int8pack"
    assert choose_kernel("cpu", 4, torch.bfloat16).name == "cpu-int4pack"


@pytest.mark.parametrize("bits, op", [(8, "_weight_int8pack_mm"), (4, "_weight_int4pack_mm_for_cpu")])
def test_a_missing_op_falls_back_to_dequant_and_says_which(aten_as_in, caplog, bits, op):
    aten_as_in(**{op: None})
    reason = _fallback_reason(caplog, bits)
    assert f"needs torch.ops.aten.{op}, which torch {torch.__version__} does not have" in reason
    with pytest.raises(QuantizationError, match=f"needs torch.ops.aten.{op}.*'dequant'"):
        choose_kernel("cpu", bits, torch.bfloat16, backend=f"cpu-int{bits}pack")


def test_a_missing_int4_converter_means_no_known_layout(aten_as_in, caplog):
    aten_as_in(_convert_weight_to_int4pack_for_cpu=None)
    assert "does not recognise the int4 weight layout of torch" in _fallback_reason(caplog, 4)


def test_a_changed_int4_layout_is_detected_at_load_time(aten_as_in, caplog):
    real = REAL_ATEN._convert_weight_to_int4pack_for_cpu
    aten_as_in(_convert_weight_to_int4pack_for_cpu=lambda q, tiles: real(q.flip(0), tiles))  # rows reordered
    assert cpu_kernels.int4pack_block_rows() is None
    assert "does not recognise the int4 weight layout of torch" in _fallback_reason(caplog, 4)


def test_a_changed_signature_fails_the_self_check(aten_as_in, caplog):
    def three_arguments(x, packed, group):  # e.g. a release that folded scales into the packed weight
        raise AssertionError("never reached: the call with four arguments is a TypeError")

    aten_as_in(_weight_int4pack_mm_for_cpu=three_arguments)
    assert "failed its self-check (TypeError" in _fallback_reason(caplog, 4)


@pytest.mark.parametrize("bits, op", [(8, "_weight_int8pack_mm"), (4, "_weight_int4pack_mm_for_cpu")])
def test_an_op_that_computes_something_else_fails_the_self_check(aten_as_in, caplog, bits, op):
    real = getattr(REAL_ATEN, op)
    aten_as_in(**{op: lambda *args: real(*args) * 2})  # e.g. scales now applied inside the op
    assert re.search(r"failed its self-check \(relative error 1(\.0+)?\)", _fallback_reason(caplog, bits))
    with pytest.raises(QuantizationError, match="failed its self-check"):
        choose_kernel("cpu", bits, torch.bfloat16, backend=f"cpu-int{bits}pack")


def test_an_op_without_a_kernel_for_the_device_is_reported_as_such():
    assert aten_op_missing("_weight_int4pack_mm_for_cpu", "cpu") is None
    # tinygemm's op exists in every build of the range but has no CPU kernel in any of them
    assert aten_op_missing("_weight_int4pack_mm", "cpu") == \
        f"needs torch.ops.aten._weight_int4pack_mm on cpu, which torch {torch.__version__} does not have"


def test_cuda_int8_on_a_torch_without_its_cuda_kernel_falls_back(aten_as_in, monkeypatch, caplog):
    """torch 2.8 (ZeroGPU Spaces run it) has `_weight_int8pack_mm` for CPU only; 2.9 added CUDA."""
    real = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    aten_as_in()
    monkeypatch.setattr(torch._C, "_dispatch_has_computed_kernel_for_dispatch_key",
                        lambda op, key: key != "CUDA" and real(op, key))
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert choose_kernel("cuda", 8, torch.float16) is backends.DequantKernel  # no GPU needed: no self-check
    assert "cuda-torch needs torch.ops.aten._weight_int8pack_mm on cuda" in caplog.text


# ---------------------------------------------------------------------------------------------
# The dependency files

def _requirements(path: Path) -> dict[str, Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    requirements = [Requirement(line) for line in lines if line]
    return {canonicalize_name(r.name): r for r in requirements}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requirements_and_pyproject_list_the_same_dependencies():
    from_pyproject = {canonicalize_name(r.name): r for r in map(Requirement, _pyproject()["dependencies"])}
    from_requirements = _requirements(ROOT / "requirements.txt")
    assert {name: str(r) for name, r in from_pyproject.items()} == \
           {name: str(r) for name, r in from_requirements.items()}


def test_the_torch_range_is_the_one_deployments_run():
    torch_range = _requirements(ROOT / "requirements.txt")["torch"].specifier
    for version in ("2.8.0", "2.9.1", "2.10.0", "2.11.0", "2.13.0"):  # ZeroGPU Spaces, lent GPUs, CI
        assert torch_range.contains(version), version
    for version in ("2.7.1", "2.14.0"):
        assert not torch_range.contains(version), version


def test_requires_python_covers_the_spaces_pythons():
    supported = SpecifierSet(_pyproject()["requires-python"])
    for version in ("3.10.13", "3.11.7", "3.12.12"):
        assert supported.contains(version), version


def test_constraints_pin_every_requirement_inside_its_range():
    required = {**_requirements(ROOT / "requirements.txt"), **_requirements(ROOT / "requirements-dev.txt")}
    pins = _requirements(ROOT / "constraints.txt")
    assert set(required) <= set(pins), f"not pinned: {sorted(set(required) - set(pins))}"
    for name, pin in pins.items():
        (specifier,) = pin.specifier
        assert specifier.operator == "==", f"{pin} is not a pin"
        if name in required:
            assert required[name].specifier.contains(specifier.version), f"{pin} is outside {required[name]}"


def test_ci_runs_the_readme_install_command_with_the_constraints():
    ci_install = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install"))
    assert " -c constraints.txt " in f"{ci_install} "
    assert ci_install.replace(" -q", "") in (ROOT / "README.md").read_text()  # the README's, quietly
