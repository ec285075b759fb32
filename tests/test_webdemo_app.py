"""app.py: flags, their environment variables, Spaces defaults, and the load-failure message."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

import app
from webdemo import hf_spaces

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "--quantize", "--device", "--tiny-random", "--slots", "--host", "--port", "--share", "--auth",
         "--queue-size", "--concurrency", "--step-delay"]
ENV = ["CHATGLM_MODEL", "CHATGLM_QUANTIZE", "CHATGLM_DEVICE", "CHATGLM_TINY_RANDOM", "CHATGLM_SLOTS",
       "CHATGLM_HOST", "CHATGLM_PORT", "CHATGLM_SHARE", "CHATGLM_AUTH", "CHATGLM_QUEUE_SIZE", "CHATGLM_CONCURRENCY",
       "CHATGLM_STEP_DELAY"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV + ["SPACE_ID", "SYSTEM", "SPACES_ZERO_GPU", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"]:
        monkeypatch.delenv(name, raising=False)


def test_help_documents_every_flag_and_its_variable():
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in FLAGS:
        assert flag in text
    for name in ENV:
        assert name in text


def test_defaults():
    args = app.parse_args([])
    assert (args.model, args.quantize, args.device, args.host, args.port) == \
        ("THUDM/chatglm-6b", None, "auto", "127.0.0.1", 7860)
    assert not args.share and args.auth is None and args.tiny_random is None and args.step_delay == 0


def test_environment_variables_set_the_flags(monkeypatch):
    for name, value in {"CHATGLM_MODEL": "/models/glm", "CHATGLM_QUANTIZE": "4", "CHATGLM_DEVICE": "cpu",
                        "CHATGLM_HOST": "0.0.0.0", "CHATGLM_PORT": "8000", "CHATGLM_SHARE": "true",
                        "CHATGLM_AUTH": "ann:s3cret:x", "CHATGLM_QUEUE_SIZE": "5", "CHATGLM_CONCURRENCY": "3",
                        "CHATGLM_TINY_RANDOM": "1", "CHATGLM_SLOTS": "2", "CHATGLM_STEP_DELAY": "0.5"}.items():
        monkeypatch.setenv(name, value)
    args = app.parse_args([])
    assert (args.model, args.quantize, args.device, args.host, args.port) == ("/models/glm", 4, "cpu", "0.0.0.0", 8000)
    assert args.share and args.auth == ("ann", "s3cret:x") and args.queue_size == 5 and args.concurrency == 3
    assert args.tiny_random == "chatglm" and args.slots == 2 and args.step_delay == 0.5
    assert app.parse_args(["--port", "9000"]).port == 9000  # a flag beats its variable


def test_tiny_random_takes_a_family():
    assert app.parse_args(["--tiny-random"]).tiny_random == "chatglm"
    assert app.parse_args(["--tiny-random", "glm4"]).tiny_random == "glm4"


@pytest.mark.parametrize("argv, env", [
    (["--auth", "nopassword"], {}), (["--quantize", "3"], {}), ([], {"CHATGLM_QUANTIZE": "16"}),
    ([], {"CHATGLM_AUTH": "x"}), (["--port", "http"], {}), ([], {"CHATGLM_TINY_RANDOM": "llama"}),
])
def test_bad_values_are_refused(monkeypatch, argv, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(argv)
    assert exit_info.value.code == 2


def test_on_spaces_the_app_binds_all_interfaces(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/chatglm")
    assert app.parse_args([]).host == "0.0.0.0"
    assert hf_spaces.running_on_spaces()


def test_gpu_task_uses_the_spaces_package_on_zero_gpu_only(monkeypatch):
    def answer():
        yield "x"

    calls = []
    spaces = types.ModuleType("spaces")
    spaces.GPU = lambda duration: (lambda fn: calls.append(duration) or fn)
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    assert hf_spaces.gpu_task(answer) is answer and calls == []  # not on Spaces
    monkeypatch.setenv("SPACE_ID", "someone/chatglm")
    assert hf_spaces.gpu_task(answer) is answer and calls == []  # on Spaces, but no ZeroGPU
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    hf_spaces.gpu_task(answer)
    assert calls == [hf_spaces.GPU_DURATION_S]
    monkeypatch.setitem(sys.modules, "spaces", None)  # ZeroGPU without the package: still runs
    assert hf_spaces.gpu_task(answer) is answer


def test_a_model_that_cannot_load_gives_one_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: could not load the model")
    assert "missing" in result.stderr and "--tiny-random" in result.stderr
