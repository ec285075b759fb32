"""Bounded work: hostile sizes are refused or answered quickly while /health stays fast, and
work ends with its client (a disconnected request frees its slot; --queue-size governs /v1)."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import gradio_client
import httpx
import pytest

from tests.conftest import budget
from tests.webdemo_server import MODEL_NAME, serving

HEALTH_BUDGET_S = budget(0.2)


def chat_body(messages, **fields) -> dict:
    """A /v1 request body. Long answers are asked greedy (temperature 0): the tiny model's greedy
    answer runs past 200 tokens, while a sampled one ends in a stop token now and then (1 in about
    40 ended after 18 tokens, which made a 'still running' test flaky)."""
    return {"model": MODEL_NAME, "max_tokens": 4, "messages": messages, **fields}


@contextmanager
def health_watch(url: str):
    """Measures /health from another thread while the block runs; yields the latencies list.
    Every probe's status is checked here, in the test's own thread, once the block is done (an
    assertion inside the probe thread would never reach the test)."""
    latencies, statuses, stop = [], [], threading.Event()

    def probe():
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    statuses.append(client.get(url + "/health").status_code)
                except httpx.HTTPError as error:
                    statuses.append(repr(error))
                latencies.append(time.monotonic() - started)
                stop.wait(0.01)  # a pause between probes, ended at once by stop

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not latencies:  # the probe is running before the block starts
        assert time.monotonic() < deadline, "the /health probe never got an answer"
        time.sleep(0.01)
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and statuses and set(statuses) == {200}, statuses


@pytest.fixture(scope="module")
def served(tiny_model):
    with serving(tiny_model, slots=2, queue_size=4, step_delay=0.05) as served:
        yield served


def post(url: str, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(url + "/v1/chat/completions", timeout=30, **kwargs)
    return response, time.monotonic() - started


def test_8001_messages_are_refused_quickly(served):
    messages = [{"role": "user", "content": "hi"}] * 8001
    with health_watch(served.url) as latencies:
        response, elapsed = post(served.url, json=chat_body(messages))
    assert response.status_code == 400 and "8001 messages" in response.json()["error"]["message"]
    assert elapsed < budget(2) and latencies and max(latencies) < HEALTH_BUDGET_S


@pytest.mark.parametrize("chunked", [False, True])
def test_a_20_mb_body_is_refused_before_it_is_read(served, chunked):
    text = "天" * (7 << 20)  # 21 MB of UTF-8
    body = json.dumps(chat_body([{"role": "user", "content": text}]), ensure_ascii=False).encode()
    content = iter([body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]) if chunked else body
    with health_watch(served.url) as latencies:
        try:
            response, elapsed = post(served.url, content=content, headers={"Content-Type": "application/json"})
        except httpx.WriteError:  # the server answered 413 and closed while the body was still going out
            response, elapsed = None, 0
    if response is not None:
        assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
        assert elapsed < budget(3)
    assert latencies and max(latencies) < HEALTH_BUDGET_S
    assert httpx.get(served.url + "/v1/models", timeout=5).status_code == 200


def test_json_nested_50k_deep_is_refused_quickly(served):
    with health_watch(served.url) as latencies:
        response, elapsed = post(served.url, content=b"[" * 50_000 + b"]" * 50_000,
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nested" in response.json()["error"]["message"]
    assert elapsed < budget(1) and max(latencies) < HEALTH_BUDGET_S


def test_a_5000_pair_history_through_the_page_is_refused_or_answered_quickly(served):
    client = gradio_client.Client(served.url + "/", verbose=False)
    history = [[f"question {i}", f"answer {i}"] for i in range(5000)]
    with health_watch(served.url) as latencies:
        started = time.monotonic()
        try:
            client.predict("你好", history, 32, 0.7, 0.0, api_name="/chat")
        except gradio_client.exceptions.AppError as error:
            assert "conversation" in str(error) or "messages" in str(error)
        elapsed = time.monotonic() - started
    assert elapsed < budget(5) and max(latencies) < HEALTH_BUDGET_S


def test_a_disconnected_non_streamed_request_frees_its_slot(served):
    served.wait_for(lambda m: m["active_sequences"] == 0 and m["queue_length"] == 0)
    cancelled = served.metrics()["requests_cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", timeout=1.0,
                   json=chat_body([{"role": "user", "content": "你好"}], max_tokens=2000, temperature=0))
    left = time.monotonic()
    after = served.wait_for(lambda m: m["active_sequences"] == 0, timeout=1.0)
    assert after["requests_cancelled"] == cancelled + 1
    assert time.monotonic() - left < budget(1.0)


def test_queue_size_governs_v1_with_429_and_retry_after(served):
    """slots 2 + queue 4: six long answers are taken, the seventh is refused at once."""
    served.wait_for(lambda m: m["active_sequences"] == 0 and m["queue_length"] == 0)
    clients, streams = [], []
    body = chat_body([{"role": "user", "content": "你好"}], max_tokens=2000, stream=True, temperature=0)
    try:
        for _ in range(6):
            client = httpx.Client(base_url=served.url, timeout=30)
            clients.append(client)
            stream = client.stream("POST", "/v1/chat/completions", json=body)
            streams.append(stream)
            assert stream.__enter__().status_code == 200
        served.wait_for(lambda m: m["active_sequences"] == 2 and m["queue_length"] == 4)
        refused, elapsed = post(served.url, json=body)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["code"] == "busy" and elapsed < budget(1)
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
        for client in clients:
            client.close()
    served.wait_for(lambda m: m["active_sequences"] == 0 and m["queue_length"] == 0, timeout=3)
