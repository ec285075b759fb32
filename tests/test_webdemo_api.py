"""The page's API through gradio_client, against the real `python app.py --tiny-random`."""
import time

import gradio_client
import pytest

from tests.browser.app_server import AppServer


@pytest.fixture(scope="module")
def server():
    server = AppServer("--step-delay", "0.005")
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()
    server.log_path.unlink()


def test_only_the_chat_and_stats_endpoints_are_public(server):
    endpoints = server.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/chat", "/stats"}
    names = [p["parameter_name"] for p in endpoints["/chat"]["parameters"]]
    assert names == ["message", "history", "max_length", "top_p", "temperature", "system"]


def test_a_streamed_chat(server):
    job = server.client.submit("你好", [["早上好", "早上好！"]], 96, 0.7, 0.0, api_name="/chat")
    updates = list(job)
    assert len(updates) >= 3
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:])), "each update extends the last"
    assert job.result() == updates[-1] != ""
    again = server.client.predict("你好", [{"role": "user", "content": "早上好"},
                                          {"role": "assistant", "content": "早上好！"}],
                                  96, 0.7, 0.0, api_name="/chat")
    assert again == updates[-1]  # greedy, and both history formats mean the same conversation


def test_a_cancelled_chat_stops_the_model(server):
    before = server.wait_idle()
    job = server.client.submit("你好", [], 2048, 0.7, 0.0, api_name="/chat")
    deadline = time.monotonic() + 20
    while not job.outputs():
        assert time.monotonic() < deadline, "no answer text arrived"
        time.sleep(0.02)
    assert server.stats()["active_sequences"] == 1
    job.cancel()
    after = server.wait_idle(timeout=3)
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["tokens_generated_total"] - before["tokens_generated_total"] < 1500  # far from 2048 - prompt
    assert server.client.predict("早上好", [], 32, 0.7, 0.0, api_name="/chat")  # and the next one works


@pytest.mark.parametrize("arguments, message", [
    ((0, 0.7, 0.95), "max_length must be between 1 and 2048, got 0."),
    ((100000, 0.7, 0.95), "max_length must be between 1 and 2048, got 100000."),
    ((100, 0.0, 0.95), "top_p must be between 0.01 and 1.0, got 0.0."),
    ((100, 1.01, 0.95), "top_p must be between 0.01 and 1.0, got 1.01."),
    ((100, 0.7, -1), "temperature must be between 0.0 and 2.0, got -1."),
    ((100, 0.7, 2.5), "temperature must be between 0.0 and 2.0, got 2.5."),
])
def test_out_of_range_settings_are_rejected_clearly(server, arguments, message):
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        server.client.predict("你好", [], *arguments, api_name="/chat")
    assert message in str(error.value)


def test_empty_or_too_long_messages_are_rejected_clearly(server):
    with pytest.raises(gradio_client.exceptions.AppError, match="The message is empty"):
        server.client.predict("  ", [], 100, 0.7, 0.95, api_name="/chat")
    with pytest.raises(gradio_client.exceptions.AppError, match="shorten the message or raise the maximum length"):
        server.client.predict("你好 " * 100, [], 16, 0.7, 0.95, api_name="/chat")
