"""The second round of attacks (issue 22), each against the whole server on 127.0.0.1 with real
clients, asserting the effect: bytes on disk, status codes, what a guessing loop achieves, which
client got a slot. A second client speaks from 127.0.0.2 (the loopback range is all local), so
per-address rules can be seen to leave other addresses alone."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.webdemo_server import MODEL_NAME, serving
from webdemo.access import AccessPolicy
from webdemo.clients import FREE_FAILURES, GuessThrottle, client_address

USER, PASSWORD, KEY = "ann", "pa55-word", "k3y-0123456789"
CHAT = {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "你好"}]}
OTHER_ADDRESS = "127.0.0.2"


def client_from(url: str, address: str = "127.0.0.1", **options) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=20, transport=httpx.HTTPTransport(local_address=address), **options)


def tree_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) under root."""
    files = [path for path in root.rglob("*") if path.is_file()] if root.exists() else []
    return len(files), sum(path.stat().st_size for path in files)


def test_uploads_are_refused_and_nothing_reaches_the_disk(tiny_model):
    """Gradio's upload routes (and the others that write files) answer 404 before reading the
    body: 50 uploads of 256 KiB leave the upload folder as it was and echo no server path."""
    upload_root = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    with serving(tiny_model) as served, client_from(served.url) as client:
        before = tree_bytes(upload_root)
        payload = os.urandom(256 << 10)
        for n in range(50):
            for path in ("/gradio_api/upload", "/upload", "/gradio_api/process_recording",
                         "/gradio_api/component_server"):
                response = client.post(path, files={"files": (f"f{n}.json", payload, "application/json")})
                assert response.status_code == 404, (path, response.text)
                assert tempfile.gettempdir() not in response.text and "/tmp" not in response.text
        assert client.get("/gradio_api/upload_progress", params={"upload_id": "x"}).status_code == 404
        assert tree_bytes(upload_root) == before


@pytest.fixture(scope="module")
def guarded(tiny_model):
    with serving(tiny_model, policy=AccessPolicy(login=(USER, PASSWORD), api_key=KEY)) as served:
        yield served


def test_key_guessing_is_locked_out_per_address_and_others_still_get_in(guarded):
    with client_from(guarded.url, OTHER_ADDRESS) as guesser, client_from(guarded.url) as owner:
        statuses, started = [], time.monotonic()
        while time.monotonic() - started < 2.0:
            response = guesser.get("/v1/models", headers={"Authorization": f"Bearer guess-{len(statuses)}"})
            statuses.append(response.status_code)
        checked = statuses.count(401)
        # the free tries, then a 1 s lock (one more check after it), then a 2 s one: nothing else is checked
        assert FREE_FAILURES + 1 <= checked <= FREE_FAILURES + 2, statuses[:20]
        assert statuses.count(429) == len(statuses) - checked and len(statuses) > 20
        locked = guesser.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert locked.status_code == 429, "the right key is refused too while locked"
        assert int(locked.headers["Retry-After"]) >= 1
        assert locked.json()["error"]["code"] == "too_many_failed_attempts"
        assert owner.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        api = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0,
                            http_client=client_from(guarded.url))
        assert api.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")


def test_password_guessing_on_the_login_form_is_locked_out_too(guarded):
    guesser_address = "127.0.0.3"
    with client_from(guarded.url, guesser_address) as guesser, client_from(guarded.url) as owner:
        statuses = [guesser.post("/login", data={"username": USER, "password": f"guess-{n}"}).status_code
                    for n in range(FREE_FAILURES + 5)]
        assert statuses == [400] * (FREE_FAILURES + 1) + [429] * 4, statuses
        assert guesser.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 429
        response = owner.post("/login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 200
        cookies = response.headers.get_list("set-cookie")
        assert cookies and all("samesite=lax" in cookie.lower() for cookie in cookies), cookies
        assert owner.get("/config").status_code == 200  # the session works


def test_a_lock_doubles_and_ends():
    now = [0.0]
    throttle = GuessThrottle(free_failures=2, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait_s("a") == 0
        throttle.failed("a")
    assert throttle.wait_s("a") == pytest.approx(1.0) and throttle.wait_s("b") == 0
    now[0] += 1.0
    assert throttle.wait_s("a") == 0
    throttle.failed("a")
    assert throttle.wait_s("a") == pytest.approx(2.0)
    now[0] += 2.0
    throttle.succeeded("a")
    assert throttle.wait_s("a") == 0 and "a" not in throttle.failures


def test_many_addresses_guessing_together_share_one_budget():
    """Each address has its free tries, but addresses that have failed lately draw on one shared
    budget: 1000 addresses get 30 checks a minute between them, not 5000; an address with no
    failure is never held up."""
    now = [0.0]
    throttle = GuessThrottle(clock=lambda: now[0])
    checks = 0
    for round_ in range(FREE_FAILURES):
        for n in range(1000):
            if throttle.wait_s(f"10.0.{n // 250}.{n % 250}") == 0:
                throttle.failed(f"10.0.{n // 250}.{n % 250}")
                checks += 1
        now[0] += 1.0
    assert checks <= 1000 + 30 + 5  # each address's first try, then the shared budget and its refill
    assert throttle.wait_s("192.0.2.1") == 0


def test_x_forwarded_for_counts_only_from_a_trusted_proxy():
    assert client_address("203.0.113.9", "1.2.3.4", ()) == "203.0.113.9"  # a direct client chooses nothing
    assert client_address("10.0.0.2", "1.2.3.4, 5.6.7.8", ("10.0.0.2",)) == "5.6.7.8"
    assert client_address("10.0.0.2", "1.2.3.4, 10.0.0.3", ("10.0.0.2", "10.0.0.3")) == "1.2.3.4"
    assert client_address("10.0.0.2", "not-an-ip", ("*",)) == "10.0.0.2"


def test_cross_site_posts_to_v1_are_refused(tiny_model):
    """A form or fetch from another site (no preflight: no Content-Type, or text/plain) carrying a
    visitor's cookie must not run: a foreign Origin gets 403, and a body not sent as
    application/json gets 415 even without one."""
    with serving(tiny_model, policy=AccessPolicy(login=(USER, PASSWORD), api_key=KEY)) as served, \
            client_from(served.url) as browser:
        assert browser.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        body = httpx.Request("POST", "/", json=CHAT).content
        foreign = browser.post("/v1/chat/completions", content=body, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "cross_site_request"
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
            headers = {"Content-Type": content_type} if content_type else {}
            response = browser.post("/v1/chat/completions", content=body, headers=headers)
            assert response.status_code == 415, (content_type, response.text)
        own = browser.post("/v1/chat/completions", json=CHAT, headers={"Origin": served.url})
        assert own.status_code == 200, own.text


def test_foreign_host_names_are_refused(tiny_model):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends
    Host: evil.example; so does a forged X-Forwarded-Host. Both get 400, /config never shows
    the name; the names the server is reached by still work."""
    policy = AccessPolicy(allowed_hosts=("chat.example.com", ".corp.example"))
    with serving(tiny_model, policy=policy) as served, client_from(served.url) as client:
        port = served.url.rsplit(":", 1)[1]
        for headers in ({"Host": "evil.example"}, {"Host": f"evil.example:{port}"},
                        {"X-Forwarded-Host": "evil.example"}, {"X-Forwarded-Host": "chat.example.com, evil.example"},
                        {"Host": "corp.example.evil"}):
            for path in ("/config", "/", "/v1/models", "/gradio_api/info"):
                response = client.get(path, headers=headers)
                assert response.status_code == 400, (headers, path)
                assert "evil" not in response.text.replace(repr(headers.get("Host", "")), "") or \
                    response.json()["error"]["code"] == "host_not_allowed"
        for headers in ({}, {"Host": f"localhost:{port}"}, {"Host": "chat.example.com"},
                        {"Host": "a.corp.example"}, {"X-Forwarded-Host": "chat.example.com"}):
            assert client.get("/config", headers=headers).status_code == 200, headers
        assert client.get("/health", headers={"Host": "evil.example"}).status_code == 200  # says only "ok"


def test_default_hosts_on_a_loopback_bind_are_the_loopback_names(tiny_model):
    with serving(tiny_model) as served, client_from(served.url) as client:
        assert client.get("/config").status_code == 200
        assert client.get("/config", headers={"Host": "attacker.example"}).status_code == 400


def test_one_client_cannot_take_every_slot(tiny_model):
    """A greedy client opens many streams at once: it gets its share (2 running or waiting), the
    rest 429 saying why, and a polite client from another address gets the free slot meanwhile."""
    with serving(tiny_model, slots=3, queue_size=16, step_delay=0.05, per_client=2) as served:
        long_chat = {**CHAT, "max_tokens": 400, "temperature": 0, "stream": True}
        greedy_api = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                                   http_client=client_from(served.url))
        streams, refusals = [], []
        for _ in range(6):
            try:
                streams.append(greedy_api.chat.completions.create(**long_chat))
            except openai.RateLimitError as error:
                refusals.append(str(error))
        assert len(streams) == 2 and len(refusals) == 4
        assert all("at most 2 per client" in text for text in refusals)
        for stream in streams:
            next(iter(stream))
        held = served.wait_for(lambda m: m["active_sequences"] == 2)
        assert held["queue_length"] == 0 and held["clients_active"] == 1
        polite = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                               http_client=client_from(served.url, OTHER_ADDRESS))
        answer = polite.chat.completions.create(**{**CHAT, "max_tokens": 2})
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert served.metrics()["active_sequences"] == 2, "served beside the greedy client's answers"
        for stream in streams:
            stream.close()
        served.wait_for(lambda m: m["active_sequences"] == 0 and m["clients_active"] == 0)
        again = greedy_api.chat.completions.create(**{**CHAT, "max_tokens": 2})  # shares given back
        assert again.choices[0].finish_reason in ("stop", "length")
