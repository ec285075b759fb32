"""One access policy for every route: the matrix of routes x flags x credentials, each status
asserted, against the whole server on 127.0.0.1 (httpx, openai and gradio_client as clients)."""
from __future__ import annotations

import gradio_client
import httpx
import openai
import pytest

from tests.webdemo_server import MODEL_NAME, serving
from webdemo.access import AccessPolicy
from webdemo.clients import GuessThrottle


USER, PASSWORD, KEY = "ann", "pa55-word", "k3y-0123456789"
POLICIES = {"open": AccessPolicy(), "auth": AccessPolicy(login=(USER, PASSWORD)),
            "key": AccessPolicy(api_key=KEY), "both": AccessPolicy(login=(USER, PASSWORD), api_key=KEY)}
CHAT = {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "你好"}]}
OPEN_STATUS = {"config": 200, "call": 200, "file": 403, "heartbeat": 200, "models": 200, "chat": 200,
               "metrics": 200, "health": 200}


def request(client: httpx.Client, route: str) -> int:
    """The status of one route (a heartbeat is a stream: only its status line is read)."""
    if route == "heartbeat":
        with client.stream("GET", "/gradio_api/heartbeat/matrix-session") as response:
            return response.status_code
    method, path, body = {
        "config": ("GET", "/config", None), "call": ("POST", "/gradio_api/call/stats", {"data": []}),
        "file": ("GET", "/gradio_api/file=/etc/hostname", None), "models": ("GET", "/v1/models", None),
        "chat": ("POST", "/v1/chat/completions", CHAT), "metrics": ("GET", "/metrics", None),
        "health": ("GET", "/health", None)}[route]
    return client.request(method, path, json=body).status_code


def credentials(url: str, kind: str, accepted: bool) -> httpx.Client:
    """A client holding no, wrong, or right credentials of one kind (accepted: whether the
    login form must take them)."""
    client = httpx.Client(base_url=url, timeout=20)
    if kind == "wrong":
        client.headers["Authorization"] = "Bearer not-the-key"
        client.cookies.set("access-token-unsecure-x", "forged")
    elif kind == "bare-key":
        client.headers["Authorization"] = KEY
    elif kind == "bearer":
        client.headers["Authorization"] = f"bEaReR {KEY}"  # the scheme in any case
    elif kind in ("login", "login-with-key"):
        password = PASSWORD if kind == "login" else KEY
        response = client.post("/login", data={"username": USER, "password": password})
        assert response.status_code == (200 if accepted else 400), response.text
    return client


def expected(policy_name: str, kind: str, route: str) -> int:
    let_in = {"open": True, "auth": kind == "login", "key": kind in ("bearer", "login-with-key"),
              "both": kind in ("bearer", "login", "login-with-key")}[policy_name]
    return OPEN_STATUS[route] if let_in or route == "health" else 401


@pytest.fixture(scope="module", params=sorted(POLICIES))
def server(request, tiny_model):
    # The matrix sends dozens of wrong credentials from one address on purpose: the throttle that
    # would lock it out after a few is tested on its own (test_security_guessing.py).
    with serving(tiny_model, policy=POLICIES[request.param], throttle=GuessThrottle(free_failures=10_000)) as served:
        yield request.param, served


@pytest.mark.parametrize("kind", ["none", "wrong", "bare-key", "bearer", "login", "login-with-key"])
def test_access_matrix(server, kind):
    policy_name, served = server
    if kind in ("login", "login-with-key") and not POLICIES[policy_name].required:
        # no login form without --auth or --require-api-key: Gradio sends a login back to the page
        response = httpx.post(served.url + "/login", data={"username": USER, "password": PASSWORD}, timeout=20)
        assert response.status_code == 302 and "set-cookie" not in response.headers
        return
    client = credentials(served.url, kind, accepted=expected(policy_name, kind, "config") == 200)
    try:
        statuses = {route: request(client, route) for route in OPEN_STATUS}
    finally:
        client.close()
    assert statuses == {route: expected(policy_name, kind, route) for route in OPEN_STATUS}


def test_the_login_shell_stays_reachable(server):
    policy_name, served = server
    page = httpx.get(served.url + "/", timeout=20)
    assert page.status_code == 200
    assert ('"auth_required":true' in page.text.replace(" ", "")) == POLICIES[policy_name].required
    assert httpx.get(served.url + "/theme.css", timeout=20).status_code == 200


def test_real_clients(server):
    """openai with the key, gradio_client with the key as a header: in exactly where a key exists."""
    policy_name, served = server
    needs_key = POLICIES[policy_name].required
    api = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    if needs_key and POLICIES[policy_name].api_key is None:
        with pytest.raises(openai.AuthenticationError):
            api.models.list()
    else:
        assert [m.id for m in api.models.list()] == [MODEL_NAME]
    if POLICIES[policy_name].api_key is not None:
        page_api = gradio_client.Client(served.url + "/", headers={"Authorization": f"Bearer {KEY}"}, verbose=False)
        assert page_api.predict(api_name="/stats")["requests_total"] >= 0
    if needs_key:
        with pytest.raises(Exception):
            gradio_client.Client(served.url + "/", verbose=False)


def test_cors_is_off_unless_an_origin_is_allowed(tiny_model):
    allowed = "https://app.example.com"
    with serving(tiny_model, policy=AccessPolicy(api_key=KEY, cors_origins=(allowed,))) as served:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = httpx.options(served.url + "/v1/chat/completions", headers={"Origin": allowed, **preflight})
        assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == allowed
        assert "access-control-allow-credentials" not in ok.headers
        for origin in ("http://localhost:3000", "https://evil.example.com", "null"):
            refused = httpx.options(served.url + "/v1/chat/completions", headers={"Origin": origin, **preflight})
            assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
            simple = httpx.get(served.url + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
            assert simple.status_code == 200
            assert "access-control-allow-origin" not in simple.headers
            assert "access-control-allow-credentials" not in simple.headers
        simple = httpx.get(served.url + "/v1/models", headers={"Origin": allowed, "Authorization": f"Bearer {KEY}"})
        assert simple.headers["access-control-allow-origin"] == allowed


@pytest.mark.parametrize("host, share, problem", [
    ("0.0.0.0", False, "--require-api-key"), ("127.0.0.1", True, "--require-api-key"),
    ("192.168.1.5", False, "--require-api-key"), ("127.0.0.1", False, None), ("::1", False, None),
])
def test_login_alone_is_refused_where_others_can_reach_the_server(host, share, problem):
    found = AccessPolicy(login=(USER, PASSWORD)).startup_problem(host, share)
    assert found is None if problem is None else problem in found
    assert AccessPolicy(login=(USER, PASSWORD), api_key=KEY).startup_problem(host, share) is None


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_key_is_refused(key):
    assert "empty" in AccessPolicy(api_key=key).startup_problem("127.0.0.1", False)


@pytest.mark.parametrize("policy_name", ["open", "both"])
def test_cross_site_requests_to_the_page_are_refused(tiny_model, policy_name):
    """Another site may not drive a visitor's browser against the page (Gradio alone would
    answer any origin with credentials on a public host); the page's own origin, programs that
    send no Origin, an allowed proxy's X-Forwarded-Host and --cors-origin origins still get in."""
    allowed = "https://embed.example.com"
    policy = POLICIES[policy_name]
    policy = AccessPolicy(login=policy.login, api_key=policy.api_key, cors_origins=(allowed,),
                          allowed_hosts=("chat.example.com",))  # the proxy's name (loopback names always work)
    with serving(tiny_model, policy=policy) as served:
        host = served.url.removeprefix("http://")
        bearer = {"Authorization": f"Bearer {KEY}"} if policy.required else {}
        join = {"data": [], "fn_index": 0, "session_hash": "cross-site-check"}
        for origin in ("https://evil.example.com", "null", f"http://{host}.evil.example.com", "file://"):
            for method, path in (("GET", "/config"), ("POST", "/gradio_api/queue/join"),
                                 ("OPTIONS", "/gradio_api/queue/join")):
                headers = {"Origin": origin, **bearer}
                if method == "OPTIONS":
                    headers["Access-Control-Request-Method"] = "POST"
                response = httpx.request(method, served.url + path, headers=headers,
                                         json=join if method == "POST" else None, timeout=20)
                assert response.status_code == 403, (origin, method, path, response.text)
                assert "access-control-allow-origin" not in response.headers
                assert response.json()["error"]["code"] == "cross_site_request"
        for headers in ({}, {"Origin": f"http://{host}"}, {"Origin": allowed},
                        {"Origin": "https://chat.example.com", "X-Forwarded-Host": "chat.example.com"}):
            assert httpx.get(served.url + "/config", headers={**headers, **bearer}, timeout=20).status_code == 200


@pytest.mark.parametrize("bad", ["..", "../x", "/tmp", "a/../../b", "a\x00b", "x" * 65, "é", ""])
def test_odd_session_hashes_are_refused_at_the_door(tiny_model, bad):
    """Defence in depth (no session hash names a file anyway: test_security_paths.py): values that
    Gradio's own clients never make are refused before any route sees them."""
    escaped = "".join(f"%{byte:02X}" for byte in bad.encode())  # every byte, so that no client folds ".."
    with serving(tiny_model) as served:
        heartbeat = httpx.get(f"{served.url}/gradio_api/heartbeat/{escaped}", timeout=20)
        data = httpx.get(f"{served.url}/gradio_api/queue/data", params={"session_hash": bad}, timeout=20)
        join = httpx.post(f"{served.url}/gradio_api/queue/join", timeout=20,
                          json={"data": [], "fn_index": 0, "session_hash": bad})
        for response in ([heartbeat] if bad else []) + [data, join]:
            assert response.status_code == 400, (bad, response.status_code, response.text)
            assert response.json()["error"]["code"] == "invalid_session_hash"
        good = httpx.post(f"{served.url}/gradio_api/queue/join", timeout=20,
                          json={"data": [], "fn_index": 0, "session_hash": "Ab-9_" * 12})
        assert good.status_code != 400 or "session_hash" not in good.text
