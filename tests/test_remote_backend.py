"""The page in front of a remote OpenAI-compatible server: one app instance serves the API, a
second one runs `--backend openai --api-base` against it, driven through gradio_client."""
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from model_runtime.protocol import ChatRequest, EngineBusy, Message, SamplingParams
from tests.browser.app_server import ROOT, AppServer
from tests.conftest import budget
from tests.test_engine_faults import within
from webdemo.remote import OpenAIBackend

KEY = "upstream-secret"


@pytest.fixture(scope="module")
def upstream():
    server = AppServer("--step-delay", "0.005", "--require-api-key", KEY, headers={"Authorization": f"Bearer {KEY}"})
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()


@pytest.fixture(scope="module")
def front(upstream):
    server = AppServer("--backend", "openai", "--api-base", upstream.url + "v1", "--api-key", KEY,
                       "--context-length", "2048")
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()


def test_answers_stream_end_to_end_and_equal_the_upstream_answer(upstream, front):
    direct = openai.OpenAI(base_url=upstream.url + "v1", api_key=KEY, max_retries=0)
    expected = direct.chat.completions.create(model="chatglm-6b-tiny-random", max_tokens=40, temperature=0,
                                              messages=[{"role": "user", "content": "你好"}]).choices[0].message.content
    job = front.client.submit("你好", [], 40, 0.7, 0.0, api_name="/chat")
    updates = list(job)
    assert len(updates) >= 3 and all(b.startswith(a) for a, b in zip(updates, updates[1:]))
    assert updates[-1] == expected


def test_stop_on_the_front_page_cancels_the_upstream_generation(upstream, front):
    before = upstream.wait_idle()
    job = front.client.submit("你好", [], 2000, 0.7, 0.0, api_name="/chat")
    deadline = time.monotonic() + 20
    while not job.outputs():
        assert time.monotonic() < deadline, "no answer text arrived"
        time.sleep(0.02)
    assert upstream.stats()["active_sequences"] == 1
    job.cancel()
    after = upstream.wait_idle(timeout=5)
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert front.client.predict("早上好", [], 30, 0.7, 0.0, api_name="/chat")  # and the next one works


def test_remote_errors_appear_in_the_chat(front):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="shorten the message"):
        front.client.predict("天气" * 4000, [], 2048, 0.7, 0.0, api_name="/chat")


def test_a_wrong_remote_key_is_one_clear_startup_error(upstream):
    result = subprocess.run([sys.executable, "app.py", "--backend", "openai", "--api-base", upstream.url + "v1",
                             "--api-key", "wrong", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "cannot list the models" in result.stderr and "401" in result.stderr
    assert "Traceback" not in result.stderr


# ---- endings, deadlines, shutdown and health against a scripted server ------------------------


class ScriptedServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose answer follows the user's message: "stop", "length" and
    "content_filter" end with that finish_reason, "no-reason" ends without one, "cut" breaks the
    connection mid-answer, "slow N" sends N deltas 50 ms apart, then stops."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(json.dumps({"object": "list", "data": [{"id": "scripted"}]}).encode(), "application/json")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        script = body["messages"][-1]["content"]
        chunks = [{"choices": [{"delta": {"content": "Hello"}, "finish_reason": None}]}]
        if script.startswith("slow"):
            chunks *= int(script.split()[1])
        if script in ("stop", "length", "content_filter") or script.startswith("slow"):
            chunks.append({"choices": [{"delta": {}, "finish_reason": script if not script.startswith("slow") else "stop"}]})
        lines = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]
        if script == "cut":
            lines = lines[:1]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(10**6 if script == "cut" else sum(map(len, lines))))
        self.end_headers()
        try:
            for line in lines:
                self.wfile.write(line)
                self.wfile.flush()
                if script.startswith("slow"):
                    time.sleep(0.05)  # not a wait in a test: this fake upstream streams slowly on purpose
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            return
        if script == "cut":
            self.close_connection = True

    def _send(self, data, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1")
    yield backend
    within(30, backend.close)
    server.shutdown()
    server.server_close()


def ask(script, deadline_s=None):
    return ChatRequest(messages=(Message("user", script),), deadline_s=deadline_s,
                       sampling=SamplingParams(max_length=64, temperature=0))


@pytest.mark.parametrize("script, reason, message", [
    ("stop", "stop", None), ("length", "length", None),
    ("content_filter", "error", "content_filter"),
    ("no-reason", "error", "without saying why"),
    ("cut", "error", "failed"),
])
def test_only_the_servers_own_stop_or_length_count_as_complete(scripted, script, reason, message):
    last = within(30, list, scripted.submit(ask(script)))[-1]
    assert last.finish_reason == reason and last.text == "Hello"
    assert (message is None and last.error is None) or message in last.error


def test_a_deadline_cuts_the_remote_answer_as_an_error(scripted):
    started = time.monotonic()
    last = within(30, list, scripted.submit(ask("slow 200", deadline_s=0.3)))[-1]
    assert last.finish_reason == "error" and last.error == "time limit of 0.3 s reached"
    assert time.monotonic() - started < 5


def test_close_lets_answers_finish_within_the_drain_then_cuts_them_off(scripted):
    short, long = scripted.submit(ask("slow 4")), scripted.submit(ask("slow 400"))
    started = time.monotonic()
    within(30, scripted.close, 1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert within(30, list, short)[-1].finish_reason == "stop"
    cut = within(30, list, long)[-1]
    assert cut.finish_reason == "error" and "cut off" in cut.error and cut.text.startswith("Hello")
    assert "shutting down" in scripted.health()
    with pytest.raises(EngineBusy, match="shutting down"):
        scripted.submit(ask("stop"))


def test_health_reports_an_unreachable_server_without_waiting_for_it():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="scripted")
    try:
        deadline = time.monotonic() + 10
        while True:
            started = time.monotonic()
            health = backend.health()
            assert time.monotonic() - started < budget(0.1)  # never waits on the network
            if health is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert health is not None and "does not answer" in health
    finally:
        backend.close()
