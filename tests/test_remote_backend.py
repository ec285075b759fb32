"""The page in front of a remote OpenAI-compatible server: one app instance serves the API, a
second one runs `--backend openai --api-base` against it, driven through gradio_client."""
import subprocess
import sys
import time

import openai
import pytest

from tests.browser.app_server import ROOT, AppServer

pytest.importorskip("gradio_client")
KEY = "upstream-secret"


@pytest.fixture(scope="module")
def upstream():
    server = AppServer("--step-delay", "0.005", "--require-api-key", KEY)
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
