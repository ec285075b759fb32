"""One access policy and one set of request bounds in front of every route of the server.

`AccessGate` is the outermost ASGI layer (server.py installs it before the server accepts its
first connection), so Gradio's page, its API, queue, heartbeat, file and upload routes, `/v1/*`
and `/metrics` all pass the same checks, in this order:

1. shutting down (SIGTERM): every request gets 503, `/health` says "unhealthy";
2. `/health` is always open and says only ok or unhealthy;
3. the Host (and X-Forwarded-Host) must be one the server answers to (`--allowed-hosts`,
   clients.HostAllowList) -> else 400: no DNS rebinding, no foreign root in Gradio's /config.
   The client's address (clients.client_address) is then written into the request as
   `x-chatglm-client` (a client-sent one is dropped), for the per-client shares of answers;
4. routes that write files (Gradio's uploads, recordings, component server) -> 404: the page
   takes no files (its import reads the file in the browser), so nothing a client sends is
   ever written to disk;
5. CORS for `/v1`: off unless `--cors-origin` names the origin; never with credentials, since
   API clients send a key, not cookies (Gradio's own CORS layer never sees `/v1`); a POST to
   `/v1` from a page of another origin (Origin header) -> 403;
6. credentials, one policy for every route: "a login session OR the API key".

   | flags                  | a request is let in with                                              |
   |------------------------|-----------------------------------------------------------------------|
   | none                   | nothing (a local demo: every route open)                              |
   | --auth U:P             | a login session (the page's form, user U, password P)                 |
   | --require-api-key K    | `Authorization: Bearer K`, or a login session (any user, password K)  |
   | both                   | `Bearer K`, or a login session from U:P or from K                     |

   Anything else gets 401 (wrong, missing, or a bare key without the Bearer scheme). The login
   shell (`/`, `POST /login`, its scripts, styles and fonts) stays open so that people can log
   in; Gradio shows only the login form on `/` until they have. A request the key let in is
   shown to Gradio as logged in (`LoginSessions.key_holder_cookie`), so gradio_client can use
   the page's API with `Client(url, headers={"Authorization": "Bearer K"})`.
   Every credential check (a Bearer header, a POST to /login) first asks clients.GuessThrottle:
   an address that keeps failing gets 429 with Retry-After, right credential or not. The login
   cookie Gradio sets is made SameSite=Lax, so no other site's request carries it;
7. cross-site requests to the page's routes (an `Origin` that is not the page's own host, and not
   one `--cors-origin` allows) -> 403: another site must not drive a logged-in visitor's browser
   (Gradio's own CORS layer would answer any origin with credentials on a public host);
8. Gradio session hashes (heartbeat path, `session_hash` query or JSON field) must look like the
   ones Gradio's clients make (letters, digits, `-`, `_`; at most 64) -> else 400. Nothing uses
   them as names (exports.py keys by them only), but no odd value reaches Gradio's routes;
9. the body, before any route parses it: at most `max_body_bytes`, counted while reading (a
   chunked body without Content-Length too) -> 413; a JSON body (or one without a type) at
   most `max_json_depth` deep, measured on the raw bytes before parsing, and valid UTF-8 JSON
   without lone surrogates -> else 400. (Gradio's routes answer plain-text 500s to these.)

Every refusal is an OpenAI-style JSON error, whatever the route.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit
from typing import Any, Awaitable, Callable, Mapping, Optional, Protocol

import anyio
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from .clients import GuessThrottle, HostAllowList, client_address, retry_after
from .limits import Limits

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_PREFIX = "/v1"
API_PATHS = ("/metrics", "/health")
# What the login form needs before anyone has logged in (Gradio 6's login shell), and the
# start-up call launch() makes itself without credentials (it acts once, then does nothing).
LOGIN_SHELL_PATHS = frozenset({"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css",
                               "/gradio_api/theme.css", "/manifest.json", "/robots.txt",
                               "/gradio_api/startup-events"})
LOGIN_SHELL_PREFIXES = ("/assets/", "/static/", "/svelte/")
JSON_IN_THREAD_BYTES = 64 << 10  # bigger JSON bodies are checked off the event loop
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"

SESSION_HASH = re.compile(r"[A-Za-z0-9_-]{1,64}")
HEARTBEAT_PREFIX = "/gradio_api/heartbeat/"
CLIENT_HEADER = b"x-chatglm-client"  # the gate's word for who sent a request (clients.client_address)
LOGIN_PATHS = ("/login", "/login/")
# Gradio routes that write what a client sends to disk (or run component code); the page needs none
FILE_WRITING_ROUTES = ("upload", "upload_progress", "process_recording", "component_server", "run-history",
                       "vibe-code", "vibe-edit", "undo-vibe-edit", "vibe-starter-queries")
REFUSED_PREFIXES = tuple(f"{root}/{route}" for root in ("", "/gradio_api") for route in FILE_WRITING_ROUTES)
DEFAULT_PORTS = {"http": ":80", "https": ":443"}

# Unrolled loop (Python 3.10's re has no possessive *+): linear, even if the string is unterminated
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { outside strings, without parsing: one regex pass and one
    pass over the brackets (about 50 ms for 1 MiB of brackets)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


class BadJSON(ValueError):
    """A body no route should parse further; the message says why, for the client."""


def _no_constant(name: str):
    raise BadJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadJSON(f"the number {text[:40]} is out of range")
    return number


def parse_json(body: bytes, max_depth: int) -> Any:
    """The JSON value of a UTF-8 body, or BadJSON: nested too deep (measured before parsing), not
    UTF-8, not JSON (NaN, Infinity and numbers beyond a float's range included: error responses
    that quote them could not be written), or holding a lone UTF-16 surrogate (which Python can
    hold but no tokenizer or JSON response can encode)."""
    depth = json_depth(body)
    if depth > max_depth:
        raise BadJSON(f"the JSON body is nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise BadJSON("the request body is not valid UTF-8") from None
    except BadJSON:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError, an integer of too many digits
        raise BadJSON("the request body is not valid JSON") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadJSON("the request body holds a lone UTF-16 surrogate (an invalid \\ud800-\\udfff escape)") \
            from None
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    """Who may use the server: --auth's user and password, --require-api-key's key, and the
    origins --cors-origin lets browsers call /v1 from."""

    login: Optional[tuple[str, str]] = None
    api_key: Optional[str] = None
    cors_origins: tuple[str, ...] = ()
    # --allowed-hosts; None: clients.default_allowed_hosts for the bound address (server.py)
    allowed_hosts: Optional[tuple[str, ...]] = None
    # --forwarded-allow-ips: proxies whose X-Forwarded-For names the client ("*": any peer)
    trusted_proxies: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.login is not None or self.api_key is not None

    def startup_problem(self, host: str, share: bool) -> Optional[str]:
        """Why the server must not start with these settings (with what to add), or None."""
        if self.api_key is not None and not self.api_key.strip():
            return "--require-api-key is empty: give a key (e.g. one from `python -c \"import secrets; " \
                   "print(secrets.token_urlsafe(32))\"`) or leave the flag out"
        if "*" in self.cors_origins:
            return "--cors-origin '*' is refused: name each origin, e.g. --cors-origin https://app.example.com"
        if self.login is not None and self.api_key is None and (share or not is_loopback(host)):
            where = "--share" if share else f"--host {host}"
            return f"{where} with --auth needs --require-api-key KEY too, so that the API and the page are " \
                   f"protected for everyone who can reach them: add --require-api-key KEY"
        return None

    def accepts_login(self, user: str, password: str) -> bool:
        """The page's login form: --auth's pair, or (with a key) any user name and the key."""
        pair_ok = self.login is not None and _same(user, self.login[0]) & _same(password, self.login[1])
        key_ok = self.api_key is not None and _same(password, self.api_key)
        return bool(pair_ok or key_ok)

    def accepts_authorization(self, header: Optional[bytes]) -> bool:
        """`Authorization: Bearer KEY` (scheme in any case); a bare key is refused."""
        if self.api_key is None or not header:
            return False
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode("utf-8"))

    def cache_salt(self) -> Optional[str]:
        """KV-cache reuse domain of /v1: every holder of the key is one client; no key, no reuse."""
        return None if self.api_key is None else hashlib.sha256(self.api_key.encode("utf-8")).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


class LoginSessions(Protocol):
    """The page's login sessions (Gradio's cookies), as the gate needs them."""

    def logged_in(self, cookies: Mapping[str, str]) -> bool: ...

    def key_holder_cookie(self) -> str:
        """A `name=value` cookie that makes the page see a request the key let in as logged in."""
        ...


def error_response(status: int, message: str, code: Optional[str] = None, kind: str = "invalid_request_error",
                   headers: Optional[dict] = None) -> JSONResponse:
    """The OpenAI error shape, used for every refusal of every route."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


class AccessGate:
    """The ASGI app in front of everything: checks, then hands the request to `api` (/v1,
    /metrics, /health) or to `page` (everything Gradio serves; set once Gradio has built it).
    limiter: the pool for measuring big bodies off the event loop."""

    def __init__(self, api: ASGIApp, *, policy: AccessPolicy, limits: Limits, sessions: LoginSessions,
                 limiter: anyio.CapacityLimiter, hosts: HostAllowList, throttle: Optional[GuessThrottle] = None):
        self.api, self.policy, self.limits, self.sessions, self.limiter = api, policy, limits, sessions, limiter
        self.hosts, self.throttle = hosts, throttle or GuessThrottle()
        self.page: Optional[ASGIApp] = None
        self.accepting = True

    def stop_accepting(self) -> None:
        """From now on every request gets 503 (shutdown)."""
        self.accepting = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.page(scope, receive, send)
            return
        path = scope["path"]
        is_api = path.startswith(API_PREFIX + "/") or path == API_PREFIX or path in API_PATHS
        refusal = self._refusal(scope, path, is_api)
        if refusal is not None:
            await self._refuse(scope, receive, send, refusal)
            return
        if scope["type"] == "http":
            body = await self._read_body(scope, receive)
            if isinstance(body, Response):
                await body(scope, receive, send)
                return
            receive = _replay(body, receive)
        if is_api:
            await self.api(scope, receive, self._with_cors(scope, send) if path.startswith(API_PREFIX) else send)
        else:
            await self.page(scope, receive, self._page_send(scope, send, path))

    def _refusal(self, scope: Scope, path: str, is_api: bool) -> Optional[Response]:
        """The response that ends this request before any route sees it, or None."""
        if not self.accepting:
            if path == "/health":
                return JSONResponse({"status": "unhealthy"}, status_code=503)
            return error_response(503, "the server is shutting down; try again shortly", code="shutting_down",
                                  kind="server_error", headers={"Retry-After": "5"})
        if path == "/health":
            return None
        connection = HTTPConnection(scope)
        foreign = [host for host in (connection.headers.get("host"), connection.headers.get("x-forwarded-host"))
                   if host is not None and not all(map(self.hosts.allows, host.split(",")))]
        if foreign:
            return error_response(400, f"this server does not answer to the host {foreign[0][:100]!r}; its "
                                       "operator can allow it with --allowed-hosts", code="host_not_allowed")
        client = self._note_client(scope, connection)
        if path.startswith(REFUSED_PREFIXES):
            return error_response(404, "this server takes no file uploads", code="not_found")
        method = scope.get("method", "GET")
        if is_api and scope["type"] == "http" and method == "OPTIONS" \
                and "access-control-request-method" in connection.headers:
            return self._preflight(connection.headers.get("origin"))
        if (not is_api or method not in ("GET", "HEAD", "OPTIONS")) and self._cross_site(connection):
            return error_response(403, "cross-site requests to this server are not allowed from this origin",
                                  code="cross_site_request")
        if not is_api and not _valid_session_hashes(scope, path):
            return _bad_session_hash()
        if not self.policy.required:
            return None
        authorization = dict(scope["headers"]).get(b"authorization")
        if authorization is not None or (method == "POST" and path in LOGIN_PATHS):
            wait_s = self.throttle.wait_s(client)
            if wait_s > 0:
                return error_response(429, f"too many wrong passwords or keys from your address: try again in "
                                           f"{retry_after(wait_s)} s", code="too_many_failed_attempts",
                                      headers={"Retry-After": retry_after(wait_s)})
        if authorization is not None:
            if self.policy.accepts_authorization(authorization):
                self.throttle.succeeded(client)
                if not is_api:
                    _add_cookie(scope, self.sessions.key_holder_cookie())
                return None
            self.throttle.failed(client)
        if self._has_session(connection) or (not is_api and _login_shell(scope, path)):
            return None
        what = "a login session or 'Authorization: Bearer KEY'" if self.policy.api_key else "a login session"
        return error_response(401, f"this server requires {what}", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    def _note_client(self, scope: Scope, connection: HTTPConnection) -> str:
        """The client's address (see clients.client_address), also written into the request's
        x-chatglm-client header for the handlers; a client-sent header of that name is dropped."""
        peer = scope["client"][0] if scope.get("client") else None
        client = client_address(peer, connection.headers.get("x-forwarded-for"), self.policy.trusted_proxies)
        scope["headers"] = [(name, value) for name, value in scope["headers"] if name != CLIENT_HEADER] + \
            [(CLIENT_HEADER, client.encode("latin-1", "replace"))]
        return client

    def _page_send(self, scope: Scope, send: Send, path: str) -> Send:
        """send for the page's responses: the login cookie becomes SameSite=Lax (Gradio sets None,
        which lets any site's request carry it), and a login's outcome goes to the throttle."""
        is_login = scope["type"] == "http" and scope.get("method") == "POST" and path in LOGIN_PATHS

        async def send_page(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(name, _lax_cookie(value) if name == b"set-cookie" else value)
                                                  for name, value in message.get("headers", [])]}
                if is_login and self.policy.required:
                    client = dict(scope["headers"])[CLIENT_HEADER].decode("latin-1")
                    if message["status"] == 200:
                        self.throttle.succeeded(client)
                    else:
                        self.throttle.failed(client)
            await send(message)
        return send_page

    def _has_session(self, connection: HTTPConnection) -> bool:
        try:
            cookies = connection.cookies
        except Exception:  # a header the cookie parser cannot read is no session
            return False
        return self.sessions.logged_in(cookies)

    def _cross_site(self, connection: HTTPConnection) -> bool:
        """Whether the request comes from a page of another origin (the browser says so in Origin;
        requests from programs send none). The page's own origin is its Host, or the host a
        reverse proxy names in X-Forwarded-Host."""
        origin = connection.headers.get("origin")
        if origin is None or origin in self.policy.cors_origins:
            return False
        parts = urlsplit(origin)
        if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
            return True  # "null" (sandboxed frames, files) and anything odd
        own = {connection.headers.get("host", ""), connection.headers.get("x-forwarded-host", "").split(",")[0]}
        own = {host.strip().lower().removesuffix(DEFAULT_PORTS[parts.scheme]) for host in own if host.strip()}
        return parts.netloc.lower().removesuffix(DEFAULT_PORTS[parts.scheme]) not in own

    def _preflight(self, origin: Optional[str]) -> Response:
        if origin not in self.policy.cors_origins:
            return error_response(403, "cross-origin requests to this API are not allowed from this origin",
                                  code="cors_origin_not_allowed")
        return Response(status_code=204, headers={
            "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_HEADERS, "Access-Control-Max-Age": "600", "Vary": "Origin"})

    def _with_cors(self, scope: Scope, send: Send) -> Send:
        """send, adding Access-Control-Allow-Origin for an allowed origin (never credentials)."""
        origin = HTTPConnection(scope).headers.get("origin")
        if origin is None or origin not in self.policy.cors_origins:
            return send

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"vary", b"Origin")]}
            await send(message)
        return send_with_cors

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await response(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive):
        """The whole body (bytes) or the refusal (Response): too long, too deep, cut short."""
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            return _too_large(limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return error_response(400, "the client closed the connection before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        if body and (not content_type or b"json" in content_type):
            try:
                if len(body) > JSON_IN_THREAD_BYTES:
                    value = await anyio.to_thread.run_sync(parse_json, body, self.limits.max_json_depth,
                                                           limiter=self.limiter)
                else:
                    value = parse_json(body, self.limits.max_json_depth)
            except BadJSON as error:
                return error_response(400, str(error), code="invalid_json")
            if isinstance(value, dict) and "session_hash" in value and not _valid_session_hash(value["session_hash"]):
                return _bad_session_hash()
        return body


def _too_large(limit: int) -> Response:
    return error_response(413, f"the request body is larger than {limit} bytes", code="body_too_large",
                          headers={"Connection": "close"})


def _bad_session_hash() -> Response:
    return error_response(400, "session_hash must be 1 to 64 letters, digits, '-' or '_'",
                          code="invalid_session_hash")


def _valid_session_hash(value: Any) -> bool:
    return value is None or (isinstance(value, str) and SESSION_HASH.fullmatch(value) is not None)


def _valid_session_hashes(scope: Scope, path: str) -> bool:
    """The session hashes in the path (heartbeat) and the query string look like Gradio's own."""
    if path.startswith(HEARTBEAT_PREFIX) and not _valid_session_hash(path[len(HEARTBEAT_PREFIX):]):
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return all(_valid_session_hash(value) for value in query.get("session_hash", ()))


def _login_shell(scope: Scope, path: str) -> bool:
    if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD", "POST"):
        return False
    if scope["method"] == "POST":
        return path in ("/login", "/login/")
    return path in LOGIN_SHELL_PATHS or path.startswith(LOGIN_SHELL_PREFIXES)


def _add_cookie(scope: Scope, cookie: str) -> None:
    """Append a cookie to the request's Cookie header (last, so it wins over a same-named one)."""
    headers = [(name, value) for name, value in scope["headers"] if name != b"cookie"]
    sent = [value for name, value in scope["headers"] if name == b"cookie"]
    headers.append((b"cookie", b"; ".join([*sent, cookie.encode("latin-1")])))
    scope["headers"] = headers


def _lax_cookie(header: bytes) -> bytes:
    return re.sub(rb"(?i)samesite=none", b"SameSite=Lax", header)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the client's own messages (so a route
    still learns of a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        if pending:
            return pending.pop()
        return await receive()
    return replayed
