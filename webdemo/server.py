"""The server: the chat page and the OpenAI API on one port, behind one access gate, ready
before its first request and shut down in order.

Gradio builds its FastAPI app inside `Blocks.launch()` and starts serving at once, so a layer
added afterwards races the first requests. The page is therefore launched on `GuardedApp`, a
Gradio `App` (the `_app` that `gr.Server` hands to `launch()` too) whose ASGI stack has the
gate of access.py outermost: Starlette builds the stack for the server's first ASGI call (the
lifespan startup, before any connection is accepted). The API is a FastAPI app of its own
behind the same gate, so Gradio's CORS and compression layers never touch /v1. Below the
ASGI layer, connections.py bounds how long a connection may take to send its request and how
many connections a client, and everyone, may hold open.

Shutdown: stop accepting (every new request gets 503), let the backend finish its answers for up
to drain_s seconds and cut off the rest (their streams end with an error), then stop the HTTP
server.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Mapping, Optional
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI, Request
from gradio.route_utils import FnIndexInferError
from gradio.routes import App, ORJSONResponse

from model_runtime.protocol import ChatBackend

from .access import AccessGate, AccessPolicy, error_response
from .api import add_api_routes
from .clients import GuessThrottle, HostAllowList, default_allowed_hosts, host_name, space_host
from .connections import ConnectionGuard, ConnectionLimits, use_guarded_server
from .limits import Limits
from .ui import ChatPage

KEY_HOLDER = "api-key"  # the user name the page sees for requests the API key let in


class GradioSessions:
    """Gradio's login sessions: the cookie its login form sets, checked against its own table."""

    def __init__(self, app: App):
        self.app = app
        self._key_token = secrets.token_urlsafe(32)  # never sent to a client

    def logged_in(self, cookies: Mapping[str, str]) -> bool:
        token = cookies.get(f"access-token-{self.app.cookie_id}") or \
            cookies.get(f"access-token-unsecure-{self.app.cookie_id}")
        return token is not None and self.app.tokens.get(token) is not None

    def key_holder_cookie(self) -> str:
        self.app.tokens[self._key_token] = KEY_HOLDER  # set each time: launch() empties the table
        return f"access-token-{self.app.cookie_id}={self._key_token}"


async def _unknown_name(request: Request, error: KeyError):
    return error_response(400, "the request names an endpoint, event or session that does not exist",
                          code="not_found")


async def _internal_error(request: Request, error: Exception):
    return error_response(500, f"internal error: {type(error).__name__}", kind="server_error")


class GuardedApp(App):
    """Gradio's app with `gate` as its outermost ASGI layer, and JSON errors: Gradio looks up
    client-sent names (api names, fn_index, event ids) without a guard, so failing to find one
    is the client's mistake (400); anything else unexpected is a JSON 500 (and its traceback is logged)."""

    def __init__(self, api: FastAPI, *, policy: AccessPolicy, limits: Limits, limiter: anyio.CapacityLimiter,
                 hosts: HostAllowList, throttle: Optional[GuessThrottle] = None):
        super().__init__(default_response_class=ORJSONResponse)
        self.gate = AccessGate(api, policy=policy, limits=limits, sessions=GradioSessions(self), limiter=limiter,
                               hosts=hosts, throttle=throttle)
        for unknown in (KeyError, FnIndexInferError):
            self.add_exception_handler(unknown, _unknown_name)
        self.add_exception_handler(Exception, _internal_error)

    def build_middleware_stack(self):
        self.gate.page = super().build_middleware_stack()
        return self.gate


@dataclass
class RunningServer:
    page: ChatPage
    backend: ChatBackend
    app: GuardedApp
    url: str

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Refuse new requests, drain the answers running (up to drain_s), stop the server."""
        self.app.gate.stop_accepting()
        try:
            self.backend.close(drain_s=drain_s)
        finally:
            self.page.close()


def start_server(page: ChatPage, backend: ChatBackend, *, policy: AccessPolicy = AccessPolicy(),
                 limits: Limits = Limits(), connection_limits: ConnectionLimits = ConnectionLimits(),
                 concurrency: int = 64, queue_size: int = 100, host: str = "127.0.0.1",
                 port: Optional[int] = None, share: bool = False, quiet: bool = False,
                 chat_api_unavailable: Optional[str] = None, throttle: Optional[GuessThrottle] = None) -> RunningServer:
    """Serve `page` and the API on host:port and return at once (the server runs in a thread).
    concurrency bounds the blocking work (parsing, tokenizing) done for requests at once;
    connection_limits: deadlines and caps for every connection (connections.py);
    chat_api_unavailable: why /v1/chat/completions answers 503 here (None: it serves); throttle: of
    failed logins and keys (default: clients.GuessThrottle's defaults)."""
    problem = policy.startup_problem(host, share)
    if problem is not None:
        raise ValueError(problem)
    limiter = anyio.CapacityLimiter(concurrency)
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    add_api_routes(api, backend, limits=limits, cache_salt=policy.cache_salt(), concurrency=concurrency,
                   max_streams=concurrency + queue_size, chat_unavailable=chat_api_unavailable)
    hosts = HostAllowList(policy.allowed_hosts if policy.allowed_hosts is not None
                          else default_allowed_hosts(host, share, space_host()))
    app = GuardedApp(api, policy=policy, limits=limits, limiter=limiter, hosts=hosts, throttle=throttle)
    app.connection_guard = ConnectionGuard(connection_limits)  # deadlines and caps per connection
    use_guarded_server()
    login_hint = "Log in with your user name and password" if policy.login else None
    if policy.api_key:
        login_hint = (login_hint + ", or" if login_hint else "Log in") + " with any user name and the API key as password"
    page.launch(queue_size=queue_size, app=app, server_name=host, server_port=port, share=share, quiet=True,
                auth=policy.accepts_login if policy.required else None, auth_message=login_hint,
                prevent_thread_lock=True)
    app.connection_guard.check_installed(page.blocks.server)
    if not quiet:  # Gradio's own lines would say "set share=True in launch()": this program's flag is --share
        print(f"* Running on local URL:  {page.blocks.local_url}")
        print(f"* Running on public URL: {page.blocks.share_url}" if page.blocks.share_url
              else "* To create a public link, run with --share.")
    if page.blocks.share_url and policy.allowed_hosts is None:
        hosts.add(host_name(urlsplit(page.blocks.share_url).netloc))  # a custom share server's name too
    return RunningServer(page, backend, app, page.blocks.local_url)
