"""app.py: flags, their environment variables, Spaces defaults, and the load-failure message."""
import gc
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import openai
import pytest

import app
import webdemo.server
from tests.browser.app_server import AppServer
from webdemo import hf_spaces, limits, settings

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "--quantize", "--device", "--tiny-random", "--slots", "--host", "--port", "--share", "--auth",
         "--queue-size", "--concurrency", "--step-delay", "--require-api-key", "--cors-origin", "--max-body-bytes",
         "--request-timeout", "--drain-seconds", "--prefill-chunk"]
ENV = ["CHATGLM_MODEL", "CHATGLM_QUANTIZE", "CHATGLM_DEVICE", "CHATGLM_TINY_RANDOM", "CHATGLM_SLOTS",
       "CHATGLM_HOST", "CHATGLM_PORT", "CHATGLM_SHARE", "CHATGLM_AUTH", "CHATGLM_QUEUE_SIZE", "CHATGLM_CONCURRENCY",
       "CHATGLM_STEP_DELAY", "CHATGLM_REQUIRE_API_KEY", "CHATGLM_CORS_ORIGINS", "CHATGLM_MAX_BODY_BYTES",
       "CHATGLM_REQUEST_TIMEOUT", "CHATGLM_DRAIN_SECONDS", "CHATGLM_PREFILL_CHUNK"]


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
    assert args.prefill_chunk is None  # the engine's default
    assert args.require_api_key is None and args.cors_origin == () and args.drain_seconds == 10
    assert (args.max_body_bytes, args.request_timeout) == (limits.MAX_BODY_BYTES, limits.DEFAULT_REQUEST_TIMEOUT_S)


def test_environment_variables_set_the_flags(monkeypatch):
    for name, value in {"CHATGLM_MODEL": "/models/glm", "CHATGLM_QUANTIZE": "4", "CHATGLM_DEVICE": "cpu",
                        "CHATGLM_HOST": "0.0.0.0", "CHATGLM_PORT": "8000", "CHATGLM_SHARE": "true",
                        "CHATGLM_AUTH": "ann:s3cret:x", "CHATGLM_QUEUE_SIZE": "5", "CHATGLM_CONCURRENCY": "3",
                        "CHATGLM_TINY_RANDOM": "1", "CHATGLM_SLOTS": "2", "CHATGLM_STEP_DELAY": "0.5",
                        "CHATGLM_REQUIRE_API_KEY": "k", "CHATGLM_CORS_ORIGINS": "https://a.example, https://b.example",
                        "CHATGLM_MAX_BODY_BYTES": "2048", "CHATGLM_REQUEST_TIMEOUT": "30",
                        "CHATGLM_DRAIN_SECONDS": "3", "CHATGLM_PREFILL_CHUNK": "0"}.items():
        monkeypatch.setenv(name, value)
    args = app.parse_args([])
    assert (args.model, args.quantize, args.device, args.host, args.port) == ("/models/glm", 4, "cpu", "0.0.0.0", 8000)
    assert args.share and args.auth == ("ann", "s3cret:x") and args.queue_size == 5 and args.concurrency == 3
    assert args.tiny_random == "chatglm" and args.slots == 2 and args.step_delay == 0.5
    assert args.require_api_key == "k" and args.cors_origin == ("https://a.example", "https://b.example")
    assert (args.max_body_bytes, args.request_timeout, args.drain_seconds) == (2048, 30, 3)
    assert args.prefill_chunk == 0
    assert app.parse_args(["--port", "9000"]).port == 9000  # a flag beats its variable


def test_tiny_random_takes_a_family():
    assert app.parse_args(["--tiny-random"]).tiny_random == "chatglm"
    assert app.parse_args(["--tiny-random", "glm4"]).tiny_random == "glm4"


@pytest.mark.parametrize("argv, env", [
    (["--auth", "nopassword"], {}), (["--quantize", "3"], {}), ([], {"CHATGLM_QUANTIZE": "16"}),
    ([], {"CHATGLM_AUTH": "x"}), (["--port", "http"], {}), ([], {"CHATGLM_TINY_RANDOM": "llama"}),
    (["--require-api-key", ""], {}), ([], {"CHATGLM_REQUIRE_API_KEY": ""}), (["--cors-origin", "*"], {}),
    (["--max-body-bytes", "0"], {}), (["--drain-seconds", "-1"], {}), (["--request-timeout", "nan"], {}),
    (["--prefill-chunk", "-1"], {}), ([], {"CHATGLM_PREFILL_CHUNK": "lots"}),
    (["--header-timeout", "0"], {}), (["--body-timeout", "inf"], {}), ([], {"CHATGLM_KEEP_ALIVE": "-1"}),
    (["--max-connections", "0"], {}), ([], {"CHATGLM_MAX_CONNECTIONS_PER_CLIENT": "-1"}),
])
def test_bad_values_are_refused(monkeypatch, argv, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(argv)
    assert exit_info.value.code == 2


def test_whose_forwarded_for_is_believed(monkeypatch):
    """Nobody's by default (a direct client could name any address); the share tunnel's, which
    connects from loopback, with --share; any peer's behind Spaces' proxy; or the flag's."""
    assert app.parse_args([]).forwarded_allow_ips == ()
    shared = app.parse_args(["--share", "--auth", "me:pw", "--require-api-key", "k"])
    assert shared.forwarded_allow_ips == ("127.0.0.1", "::1")
    assert app.parse_args(["--forwarded-allow-ips", "10.0.0.2, 10.0.0.3"]).forwarded_allow_ips == ("10.0.0.2", "10.0.0.3")
    monkeypatch.setenv("SPACE_ID", "someone/chatglm")
    assert app.parse_args([]).forwarded_allow_ips == ("*",)


def test_on_spaces_the_app_binds_all_interfaces(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/chatglm")
    assert app.parse_args([]).host == "0.0.0.0"
    assert hf_spaces.running_on_spaces()


def test_zerogpu_mode_is_chosen_on_zerogpu_hardware_with_its_own_limits(monkeypatch):
    args = app.parse_args([])
    assert not args.zerogpu and (args.concurrency, args.queue_size) == (settings.CONCURRENCY[False], settings.QUEUE_SIZE[False])
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not app.parse_args([]).zerogpu  # not on Spaces
    monkeypatch.setenv("SPACE_ID", "someone/chatglm")
    args = app.parse_args([])
    assert args.zerogpu and (args.concurrency, args.queue_size) == (settings.CONCURRENCY[True], settings.QUEUE_SIZE[True])
    assert not app.parse_args(["--zerogpu", "off"]).zerogpu
    assert app.parse_args(["--concurrency", "2"]).concurrency == 2
    assert not app.parse_args(["--backend", "openai", "--api-base", "http://x/v1"]).zerogpu  # no model here


def test_zerogpu_on_with_a_remote_backend_is_refused():
    result = subprocess.run([sys.executable, "app.py", "--zerogpu", "on", "--backend", "openai", "--api-base",
                             "http://127.0.0.1:9/v1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "choose one" in result.stderr


def test_zerogpu_call_wraps_each_answer_in_spaces_gpu_with_its_duration(monkeypatch):
    asked = []
    spaces = types.ModuleType("spaces")
    spaces.GPU = lambda duration: (lambda fn: asked.append(duration) or fn)
    monkeypatch.setitem(sys.modules, "spaces", spaces)

    def run(job):
        yield job

    def duration(job):
        return 42

    assert hf_spaces.zerogpu_call()(run, duration) is run and asked == [duration]
    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: a clear ImportError
    with pytest.raises(ImportError):
        hf_spaces.zerogpu_call()


def test_a_model_that_cannot_load_gives_one_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: could not load the model")
    assert "missing" in result.stderr and "--tiny-random" in result.stderr


@pytest.mark.parametrize("argv", [["--auth", "me:secret", "--share"], ["--auth", "me:secret", "--host", "0.0.0.0"]])
def test_a_login_alone_on_a_reachable_server_is_refused_saying_what_to_add(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(argv)
    assert exit_info.value.code == 2
    assert "add --require-api-key KEY" in capsys.readouterr().err
    assert app.parse_args(argv + ["--require-api-key", "k"]).auth == ("me", "secret")


def test_start_up_objects_are_frozen_out_of_garbage_collection_before_serving(monkeypatch):
    """A full collection walks every tracked object holding the GIL (about 0.2 s over what the
    page and the model leave behind): app.main freezes them before the server takes requests."""
    seen = {}

    class Served:
        def __init__(self, backend):
            self.backend = backend

        def shutdown(self, drain_s):
            self.backend.close()
            seen["shut down"] = True

    def start_server(page, backend, **settings):
        seen["frozen"] = gc.get_freeze_count()
        return Served(backend)

    monkeypatch.setattr(webdemo.server, "start_server", start_server)
    monkeypatch.setattr(app.StopRequests, "wait", lambda self: None)  # asked to stop at once
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    gc.unfreeze()
    try:
        assert app.main(["--tiny-random"]) == 0
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 100_000 and seen["shut down"]


def test_sigterm_mid_answer_drains_cuts_off_honestly_and_exits_0():
    server = AppServer("--step-delay", "0.05", "--drain-seconds", "1")
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(model="chatglm-6b-tiny-random", stream=True, max_tokens=2000,
                                                temperature=0,  # greedy: a sampled answer may stop early
                                                messages=[{"role": "user", "content": "你好"}])
        chunks = iter(stream)
        next(chunks)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "v1/models", timeout=5).status_code != 503:  # stopped accepting
            assert time.monotonic() < deadline, "still accepting requests after SIGTERM"
            time.sleep(0.02)
        assert httpx.get(server.url + "health", timeout=5).json() == {"status": "unhealthy"}
        finish_reasons = []
        with pytest.raises(openai.APIError, match="shut|cut|clos"):
            for chunk in chunks:
                finish_reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        assert finish_reasons == []  # never "stop": the answer was cut off
        assert server.process.wait(timeout=1 + 10) == 0
        assert time.monotonic() - signalled < 1 + 10
    finally:
        server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()


def test_request_timeout_reaches_the_page_and_the_api():
    """--request-timeout bounds an answer on the page's API and on /v1 alike, as an error."""
    server = AppServer("--request-timeout", "1", "--step-delay", "0.2")
    try:
        with pytest.raises(Exception, match="time limit of 1 s"):
            server.client.submit("hello", [], 2048, 0.7, 0.0, api_name="/chat").result(timeout=30)
        response = httpx.post(server.url + "v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 500, "temperature": 0})
        assert response.status_code == 500 and "time limit of 1 s" in response.json()["error"]["message"]
    finally:
        server.stop()


# Hugging Face's Spaces configuration reference (the README front matter), the keys this README uses.
SPACE_KEYS = {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "python_version", "app_file",
              "suggested_hardware", "startup_duration_timeout", "models", "preload_from_hub",
              "short_description", "pinned", "license", "tags"}
SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
ZEROGPU_PYTHONS = {"3.10", "3.12"}


def test_the_readme_front_matter_configures_a_zerogpu_space():
    import yaml
    from importlib.metadata import version

    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert set(front) <= SPACE_KEYS, set(front) - SPACE_KEYS
    assert front["sdk"] == "gradio" and front["sdk_version"] == version("gradio")  # the version tested here
    assert front["python_version"] in ZEROGPU_PYTHONS and front["suggested_hardware"].startswith("zero-")
    assert (ROOT / front["app_file"]).is_file()
    assert {front["colorFrom"], front["colorTo"]} <= SPACE_COLORS
    assert len(front["short_description"]) <= 60
    assert front["preload_from_hub"] == front["models"] == [settings.DEFAULT_MODEL]
