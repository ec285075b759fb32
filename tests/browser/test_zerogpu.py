"""ZeroGPU mode, end to end: the real `python app.py --tiny-random --zerogpu on` with the test-only
stand-in of the `spaces` package (tests/stand_ins/spaces), which forks a child process for every
GPU call, pickles what crosses, kills a call that outruns its duration, and makes any model
computation or CUDA use in the main process an error. The stand-in logs each call's child pid and
the duration asked for."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from .app_server import ROOT, AppServer
from .conftest import _chromium_or_skip, holds_for
from .test_chat_page import BOT, answers, chat, send, settle, wait_done

STAND_INS = str(ROOT / "tests" / "stand_ins")
GPU_DURATION = 60


class GpuCalls:
    """The stand-in's log: one line per GPU call."""

    def __init__(self, path: Path):
        self.path = path

    def all(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """This module's server (conftest's `new_page` opens its page): ZeroGPU mode, stand-in spaces."""
    log = tmp_path_factory.mktemp("zerogpu") / "gpu-calls.jsonl"
    server = AppServer("--zerogpu", "on", "--step-delay", "0.01", "--gpu-duration", str(GPU_DURATION),
                       env={"PYTHONPATH": STAND_INS, "CHATGLM_STANDIN_SPACES_LOG": str(log)})
    server.calls = GpuCalls(log)
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()
    assert server.process.returncode == 0, server.log()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_page_streams_an_answer_made_in_a_gpu_call(new_page, app_server):
    page = new_page()
    settle(page, max_length=160)
    calls = len(app_server.calls.all())
    send(page, "你好")
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (page.locator("#stop").is_hidden() and seen):
        texts = answers(page)
        if texts and texts[-1] not in ("…", "") and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        time.sleep(0.03)
    final = wait_done(page, 1)
    assert len(seen) >= 3 and final.startswith(seen[0][:5]), seen
    new = app_server.calls.all()[calls:]
    assert len(new) == 1 and new[0]["pid"] != app_server.process.pid  # one call, in a child process
    assert 10 <= new[0]["duration"] <= GPU_DURATION


def test_stop_ends_the_gpu_call(new_page, app_server):
    page = new_page()
    settle(page, max_length=2048)
    cancelled = app_server.stats()["requests_cancelled"]
    send(page, "你好")
    expect(page.locator(BOT)).to_have_text(re.compile(r".{12,}"))
    child = app_server.calls.all()[-1]["pid"]
    assert alive(child)
    page.click("#stop")
    wait_until(lambda: not alive(child), 5, "the GPU call's process still runs after Stop")
    stats = app_server.wait_idle(timeout=2)
    assert stats["requests_cancelled"] == cancelled + 1
    frozen = wait_done(page, 1)
    holds_for(lambda: answers(page)[-1] == frozen, 0.5, "the stopped answer changed")
    set_length = page.locator("#max-length input[type=number]")
    set_length.fill("40")
    set_length.press("Enter")
    assert chat(page, "早上好") not in ("", "…")  # the next message is answered normally


def test_regenerate_makes_a_new_gpu_call(new_page, app_server):
    page = new_page()
    settle(page, max_length=48, temperature=0)
    first = chat(page, "你好")
    calls = len(app_server.calls.all())
    page.click('#chatbot button[aria-label="Retry"]')
    wait_until(lambda: len(app_server.calls.all()) == calls + 1, 10, "Retry made no GPU call")
    # The call starts before the page hears of it: wait for the page to show the new answer running
    # (Stop shown), else a loaded machine lets wait_done read the first tokens as the whole answer.
    expect(page.locator("#stop")).to_be_visible(timeout=10_000)
    again = wait_done(page, 1)
    assert again == first  # greedy: the same answer again, in place of the old one
    assert len(page.locator(BOT).all_inner_texts()) == 1


def test_two_users_at_once_both_get_their_answers(app_server):
    from gradio_client import Client

    def ask(query, into):
        client = Client(app_server.url, verbose=False)
        try:
            into[query] = client.predict(query, [], 200, 0.7, 0.0, "", api_name="/chat")
        finally:
            client.close()

    alone, together = {}, {}
    for query in ("你好", "早上好"):
        ask(query, alone)
    threads = [threading.Thread(target=ask, args=(query, together)) for query in alone]
    most_at_once = 0
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        most_at_once = max(most_at_once, app_server.stats()["active_sequences"])
        time.sleep(0.05)
    assert together == alone and all(alone.values())
    assert most_at_once == 2  # the two calls ran side by side


def test_the_openai_api_says_why_it_does_not_answer(app_server):
    import openai

    client = openai.OpenAI(base_url=app_server.url + "v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["chatglm-6b-tiny-random"]
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="chatglm-6b-tiny-random", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503
    assert "ZeroGPU" in refused.value.message and "gradio_client" in refused.value.message


def test_the_stand_in_catches_an_engine_in_the_main_process():
    """The engine's scheduler thread computes in the main process: under the stand-in (as on
    ZeroGPU, where that process has no GPU) its answer fails instead of passing unnoticed."""
    _chromium_or_skip()  # not needed, but this module's servers run only where the browser tests do
    script = ("import spaces\n"
              "from model_runtime.serving.launch import start_engine\n"
              "from model_runtime.protocol import ChatRequest, Message\n"
              "engine = start_engine(tiny_random=True, slots=1)\n"
              "print(list(engine.submit(ChatRequest((Message('user', 'hi'),))))[-1].error)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": STAND_INS})
    assert "main process" in done.stdout, done.stdout + done.stderr
