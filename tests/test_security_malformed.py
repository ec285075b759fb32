"""Whatever bytes arrive, the answer is a JSON 4xx within a second, and the server still works:
a generated corpus of bad bodies through /v1 and through the page's Gradio API."""
from __future__ import annotations

import json
import random
import time

import gradio_client
import httpx
import pytest

from tests.conftest import budget
from tests.webdemo_server import MODEL_NAME, serving
from webdemo.access import AccessPolicy

KEY = "malformed-key"
GOOD = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "你好"}]}
NAN, INF = float("nan"), float("inf")
COMMON_BAD = ["\ud800", {}, {"a": 1}, [1], [None]]  # wrong for every field
INVALID = {  # field -> values that are wrong for it (besides COMMON_BAD)
    "model": [True, 1, "gpt-4", "", "x" * 5000, []], "messages": [None, True, 1, "x", "", []],
    "temperature": [True, -1, 2.01, 1e308, "1", NAN, INF], "top_p": [True, 0, -0.5, 1.5, "1", NAN, -INF],
    "max_tokens": [True, 0, -1, 1.5, 10 ** 30, "5", NAN], "max_completion_tokens": [False, 0, 2 ** 21, "5", INF],
    "stop": [1, True, "", [""], ["a", "b", "c", "d", "e"], ["x" * 65], [1]], "seed": [True, 1.5, "1", 2 ** 64, NAN],
    "n": [2, 0, "1", None], "stream": [1, "true", None], "stream_options": [1, "x", True],
    "frequency_penalty": [0.5, "0", True, NAN], "presence_penalty": [-1, "0", False, INF],
}
JSON_HEADERS = {"Content-Type": "application/json"}


def encoded(body) -> bytes:
    """JSON bytes that may hold lone surrogates (as escapes) and NaN, as a hostile client sends."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def v1_corpus() -> list[tuple[str, bytes, dict]]:
    """(what, body, headers) for /v1/chat/completions, every one of them invalid."""
    cases = []
    for field, values in INVALID.items():  # a wrong type or value for every field
        for value in values + COMMON_BAD:
            if field == "stream_options" and isinstance(value, dict):
                continue  # any object is a valid stream_options
            cases.append((f"{field}={value!r:.40}", encoded({**GOOD, field: value}), JSON_HEADERS))
    for index, message in enumerate([None, 1, "hi", [], {}, {"role": "user"}, {"role": "robot", "content": "x"},
                                     {"role": "user", "content": 5}, {"role": "user", "content": [{"type": "image"}]},
                                     {"role": "user", "content": [{"type": "text", "text": {"a": 1}}]},
                                     {"role": ["user"], "content": "x"}, {"role": "user", "content": "\udc00x"},
                                     {"role": "user", "content": "x" * 16001}]):
        cases.append((f"message {index}", encoded({**GOOD, "messages": [message]}), JSON_HEADERS))
    cases += [("unknown field", encoded({**GOOD, "bogus": 1}), JSON_HEADERS),
              ("surrogate field name", encoded({**GOOD, "\ud800": 1}), JSON_HEADERS),
              ("surrogate model", b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', JSON_HEADERS),
              ("bad utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', JSON_HEADERS),
              ("latin-1", '{"messages": [{"role": "user", "content": "é"}]}'.encode("latin-1"), JSON_HEADERS),
              ("utf-16", json.dumps(GOOD).encode("utf-16"), JSON_HEADERS),
              ("empty", b"", JSON_HEADERS), ("null", b"null", JSON_HEADERS), ("array", b"[]", JSON_HEADERS),
              ("array of good", encoded([GOOD]), JSON_HEADERS), ("string", b'"hi"', JSON_HEADERS),
              ("number", b"12", JSON_HEADERS), ("huge integer", b'{"max_tokens": ' + b"9" * 5000 + b"}", JSON_HEADERS),
              ("deep 65", b"[" * 65 + b"]" * 65, JSON_HEADERS), ("deep 50k", b"[" * 50_000, JSON_HEADERS),
              ("deep in a field", encoded({**GOOD, "user": json.loads("[" * 70 + "]" * 70)}), JSON_HEADERS),
              ("NaN literal", b'{"temperature": NaN, "messages": [{"role": "user", "content": "x"}]}', JSON_HEADERS),
              ("Infinity", b'{"top_p": Infinity, "messages": [{"role": "user", "content": "x"}]}', JSON_HEADERS),
              ("form", b"messages=hi", {"Content-Type": "application/x-www-form-urlencoded"}),
              ("text/plain", encoded(GOOD), {"Content-Type": "text/plain"}),
              ("multipart", b"--x\r\n\r\n--x--", {"Content-Type": "multipart/form-data; boundary=x"}),
              ("nul bytes", b"\x00" * 100, JSON_HEADERS), ("bom", b"\xef\xbb\xbf" + encoded(GOOD)[:-1], JSON_HEADERS)]
    good = encoded(GOOD)
    for cut in range(1, len(good), max(1, len(good) // 30)):  # truncated JSON
        cases.append((f"truncated at {cut}", good[:cut], JSON_HEADERS))
    fuzz = random.Random(11)
    for _ in range(30):  # a lone UTF-8 continuation byte somewhere: never valid UTF-8
        at = fuzz.randrange(len(good))
        cases.append((f"byte at {at}", good[:at] + bytes([fuzz.randrange(0x80, 0xC0)]) + good[at:], JSON_HEADERS))
    return cases


def page_corpus() -> list[tuple[str, str, bytes, dict]]:
    """(what, path, body, headers) for the page's Gradio API."""
    cases = []
    bodies = [b"", b"{", b"[]", b"null", b'"x"', b"[" * 50_000, b"\xff\xfe", b'{"data": 5}', b'{"data": "x"}',
              b'{"data": {}}', b'{"data": null}', b'{"\\ud800": []}', b'{"data": [], "session_hash": []}',
              b"{" * 70 + b"}" * 70,
              b'{"data": [' + b"9" * 5000 + b"]}"]
    for path in ("/gradio_api/call/chat", "/gradio_api/queue/join", "/gradio_api/run/chat"):
        cases += [(f"{path} {body[:20]!r}", path, body, JSON_HEADERS) for body in bodies]
    cases += [("join wrong types", "/gradio_api/queue/join", b'{"data": [], "event_data": 5, "fn_index": "x"}',
               JSON_HEADERS),
              ("join text/plain", "/gradio_api/queue/join", b"{}", {"Content-Type": "text/plain"}),
              ("join wrong fn", "/gradio_api/queue/join",
               b'{"data": [], "fn_index": 99999, "session_hash": "abc", "trigger_id": 1}', JSON_HEADERS),
              ("join huge fn", "/gradio_api/queue/join",
               b'{"data": [], "fn_index": 1e400, "session_hash": "abc"}', JSON_HEADERS),
              ("call unknown api", "/gradio_api/call/nothing", b'{"data": []}', JSON_HEADERS)]
    return cases


@pytest.fixture(scope="module")
def served(tiny_model):
    with serving(tiny_model, policy=AccessPolicy(api_key=KEY)) as served:
        yield served


def assert_json_4xx(response: httpx.Response, elapsed: float, what: str) -> dict:
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), (what, response.text[:300])
    assert elapsed < budget(1.0), (what, elapsed)
    return response.json()


def test_at_least_200_bad_bodies_to_v1_each_get_an_openai_error(served):
    corpus = v1_corpus()
    assert len(corpus) >= 200
    with httpx.Client(base_url=served.url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for what, body, headers in corpus:
            started = time.monotonic()
            response = client.post("/v1/chat/completions", content=body, headers=headers)
            error = assert_json_4xx(response, time.monotonic() - started, what)["error"]
            assert isinstance(error["message"], str) and error["type"], what
        chunked = client.post("/v1/chat/completions", content=iter([b'{"messages": ', b"[[[[", b"oops"]),
                              headers=JSON_HEADERS)
        assert chunked.status_code == 400 and "error" in chunked.json()
        answer = client.post("/v1/chat/completions", json=GOOD)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


def test_at_least_50_bad_bodies_to_the_page_api_each_get_a_json_4xx(served):
    corpus = page_corpus()
    assert len(corpus) >= 50
    with httpx.Client(base_url=served.url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for what, path, body, headers in corpus:
            started = time.monotonic()
            assert_json_4xx(client.post(path, content=body, headers=headers), time.monotonic() - started, what)
    page_api = gradio_client.Client(served.url + "/", headers={"Authorization": f"Bearer {KEY}"}, verbose=False)
    assert page_api.predict("你好", [], 32, 0.7, 0.0, api_name="/chat")
