"""The OpenAI-compatible API with the official `openai` client, against a real server on 127.0.0.1."""
import json
import time

import httpx
import openai
import pytest

from tests.webdemo_server import MODEL_NAME, serving
from webdemo.access import AccessPolicy

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_model):
    with serving(tiny_model, policy=AccessPolicy(api_key=API_KEY), slots=4, queue_size=2) as served:
        yield served.url, served.engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def ask(client, text="你好", **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": text}],
                                          **kwargs)


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_non_streamed_completion_with_usage_matching_the_tokenizer(client, tiny_model):
    tokenizer, _ = tiny_model
    result = ask(client, max_tokens=12)
    answer = result.choices[0].message.content
    assert result.choices[0].finish_reason == "length" and answer
    assert result.usage.prompt_tokens == len(tokenizer.encode("你好"))
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12


def test_streamed_completion_equals_the_non_streamed_one(client):
    expected = ask(client, max_tokens=20).choices[0].message.content
    chunks = list(ask(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_closing_the_stream_cancels_the_generation(client, server):
    _, engine = server
    before = engine.stats()["requests_cancelled"]
    stream = ask(client, max_tokens=2000, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while engine.stats()["requests_cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["requests_cancelled"] == before + 1
    assert engine.stats()["active_sequences"] == 0


def test_stop_sequence_and_seed(client):
    full = ask(client, max_tokens=30).choices[0].message.content
    stop = full[8:10]
    cut = ask(client, max_tokens=30, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.find(stop)].rstrip()
    seeded = [ask(client, max_tokens=15, temperature=0.9, seed=5).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 3}, "'temperature' must be a number between 0 and 2"),
    ({"top_p": 0}, "'top_p' must be greater than 0"),
    ({"max_tokens": 0}, "'max_tokens' must be an integer"),
    ({"n": 2}, "only n=1"),
    ({"extra_body": {"bogus_field": 1}}, "Unrecognized request argument supplied: bogus_field"),
])
def test_invalid_parameters_get_openai_style_400(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, **kwargs)
    assert message in error.value.body["message"]


def test_unknown_model_and_wrong_key(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(wrong)


def test_malformed_bodies_get_clear_errors(server):
    url, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    cases = [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
             (json.dumps({"messages": []}).encode(), "'messages' must be a non-empty list"),
             (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
              "role system, user, assistant or tool"),
             (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "content must be a string"),
             (json.dumps({"messages": [{"role": "user", "content": "天气" * 9000}]}).encode(),
              "message 0 is 18000 characters long; at most 16000")]
    for body, message in cases:
        response = httpx.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        assert message in response.json()["error"]["message"]


def test_metrics_and_health(server):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("chatglm_requests_total", "chatglm_queue_length", "chatglm_active_sequences",
                 "chatglm_tokens_generated_total", "chatglm_tokens_per_second",
                 "chatglm_time_to_first_token_seconds_sum"):
        assert f"\n{name} " in "\n" + metrics
