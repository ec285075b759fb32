"""Slow and greedy clients at the connection level: deadlines for receiving a request, and caps on
open connections per client address and in total, enforced before a connection costs more than
its file descriptor; and logs that cannot flood.

Why not in the ASGI gate (access.py): an ASGI app hears of a request only once its whole head has
arrived, so a client that sends its head a byte at a time, or opens a thousand connections and
sends nothing, never reaches it. uvicorn (which Gradio's launch() runs) has no deadline for a
request head or body and no cap on connections; out of file descriptors, asyncio's accept loop
logs one traceback per failed accept (hundreds of thousands a minute) and starves the server.

- Every connection runs `GuardedH11Protocol` (uvicorn's h11 protocol plus accounting), which the
  `ConnectionGuard` counts. A connection over the per-client cap is aborted in connection_made,
  before any byte is read; at the total cap the oldest connection still waiting for a request
  head makes room (else the newcomer is refused), so a client that sends its
  request at once gets in even while slow ones fill the server.
- Deadlines cover receiving a request only, never a response: a request head must arrive within
  `header_timeout_s` of the connection (or of the end of the previous response, where
  `keep_alive_s` bounds a keep-alive connection that sends nothing); a body that stops arriving
  for `body_timeout_s` ends the connection. An answer streaming for minutes has no deadline.
- The total cap leaves room below RLIMIT_NOFILE for the process's own files and for the sockets
  asyncio accepts before any protocol sees them (a few passes of its accept loop, each at most
  the listen backlog, which the guard therefore keeps small), so accept() never hits EMFILE.
- `RateLimitedLog` lets one line per condition per minute through asyncio's, uvicorn's and this
  module's loggers, whatever a client does.
"""
from __future__ import annotations

import ipaddress
import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable, Optional

import h11
from gradio import http_server as gradio_http_server
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0
MAX_PER_CLIENT = 64
MAX_TOTAL = 4096
FD_RESERVE = 128  # descriptors kept for the process itself: files it reads, pipes, sockets to a remote backend
MAX_BACKLOG = 128  # listen() queue; also the most sockets asyncio accepts in one pass of its loop
ACCEPT_PASSES = 4  # passes of the accept loop that run before the first of their sockets can be closed
LOG_INTERVAL_S = 60.0
LOG_CONDITIONS = 1024  # distinct conditions remembered at once
LOGGED = ("asyncio", "uvicorn.error", __name__)

log = logging.getLogger(__name__)


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (1 << 20) if soft == resource.RLIM_INFINITY else soft


def client_key(peername) -> str:
    """Whose connection this is: the IPv4 address, or an IPv6 address's /64 (one host's usual share)."""
    host = peername[0] if isinstance(peername, tuple) else str(peername)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass(frozen=True)
class ConnectionLimits:
    """--header-timeout, --body-timeout, --keep-alive, --max-connections-per-client (0: none, for
    a server behind a proxy, where every connection comes from the proxy) and --max-connections
    (None: as many as the open-file limit allows, at most MAX_TOTAL)."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_S
    max_per_client: int = MAX_PER_CLIENT
    max_total: Optional[int] = None

    def __post_init__(self):
        if not min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s) > 0:
            raise ValueError("the header, body and keep-alive timeouts must be > 0")

    def backlog(self, open_files: int) -> int:
        return max(8, min(MAX_BACKLOG, open_files // 32))

    def total(self, open_files: int) -> int:
        """The cap on open connections: what the descriptors left after the reserve and the
        accept loop's bursts allow, and at most max_total (or MAX_TOTAL)."""
        room = open_files - FD_RESERVE - ACCEPT_PASSES * self.backlog(open_files)
        return max(1, min(self.max_total or MAX_TOTAL, room))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, admitted and counted by `guard`, with deadlines for receiving
    each request (the guard's sweep calls `overdue`)."""

    guard: "ConnectionGuard"  # set on the subclass each guard makes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.guard.limits.keep_alive_s  # uvicorn's own idle timer agrees
        self.client_key = ""
        self.admitted = False
        self.waiting_since: Optional[float] = None  # when the wait for a request head began; None: not waiting
        self.served = False  # a response completed on this connection (so waiting for more is keep-alive)
        self.last_read = 0.0

    def connection_made(self, transport) -> None:
        self.client_key = client_key(transport.get_extra_info("peername"))
        self.transport = transport
        self.admitted = self.guard.admit(self)
        if not self.admitted:
            transport.abort()
            return
        super().connection_made(transport)
        self.waiting_since = self.last_read = time.monotonic()

    def connection_lost(self, exc) -> None:
        self.guard.release(self)
        if self.admitted:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self.waiting_since = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.waiting_since is None:
            self.waiting_since, self.served = time.monotonic(), True

    @property
    def upgraded(self) -> bool:
        """Handed to another protocol (a websocket), which now owns the transport and its timeouts."""
        return self.transport.get_protocol() is not self

    def waiting(self) -> bool:
        """Waiting for a request head, with no response left to write."""
        return (not self.upgraded and self.waiting_since is not None and self.conn.their_state is h11.IDLE
                and not self.transport.get_write_buffer_size())

    def overdue(self, now: float) -> Optional[str]:
        """Which receive deadline this connection has missed ("header", "body", "idle"), or None."""
        limits = self.guard.limits
        if self.waiting():
            idle = self.served and not self.conn.trailing_data[0]
            if now - self.waiting_since > (limits.keep_alive_s if idle else limits.header_timeout_s):
                return "idle" if idle else "header"
        elif (not self.upgraded and self.conn.their_state is h11.SEND_BODY and not self.flow.read_paused
              and now - self.last_read > limits.body_timeout_s):
            return "body"
        return None


class ConnectionGuard:
    """The open connections of one server: admission under the caps, and a sweep (a few times per
    shortest deadline, while any connection is open) that closes those past a receive deadline."""

    def __init__(self, limits: ConnectionLimits = ConnectionLimits(), open_files: Optional[int] = None):
        open_files = open_file_limit() if open_files is None else open_files
        self.limits = limits
        self.total = limits.total(open_files)
        self.backlog = limits.backlog(open_files)
        self.open: dict[GuardedH11Protocol, None] = {}  # in order of admission
        self.per_client: dict[str, int] = {}
        self.protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})
        self.tick_s = min(1.0, limits.header_timeout_s, limits.body_timeout_s, limits.keep_alive_s) / 4
        self._sweep_timer = None

    def admit(self, connection: GuardedH11Protocol) -> bool:
        key = connection.client_key
        held = self.per_client.get(key, 0)
        if self.limits.max_per_client and held >= self.limits.max_per_client:
            log.warning("refused a connection from %s: it has %d open (--max-connections-per-client)", key, held)
            return False
        if len(self.open) >= self.total:
            waiting = next((other for other in self.open if other.waiting()), None)
            if waiting is None:
                log.warning("refused a connection from %s: %d connections are open, all busy (--max-connections)",
                            key, len(self.open))
                return False
            log.warning("closed an idle connection from %s (no request in progress) to make room: %d connections "
                        "are open (--max-connections)", waiting.client_key, len(self.open))
            self.release(waiting)
            waiting.transport.abort()
        self.open[connection] = None
        self.per_client[key] = held + 1
        if self._sweep_timer is None:
            self._sweep_timer = connection.loop.call_later(self.tick_s, self._sweep, connection.loop)
        return True

    def release(self, connection: GuardedH11Protocol) -> None:
        """Forget a connection (closed, evicted or handed over); once only."""
        if connection in self.open:
            del self.open[connection]
            left = self.per_client.pop(connection.client_key) - 1
            if left:
                self.per_client[connection.client_key] = left

    def _sweep(self, loop) -> None:
        try:
            self._close_overdue(time.monotonic())
        finally:  # whatever happens, the deadlines keep being enforced
            self._sweep_timer = loop.call_later(self.tick_s, self._sweep, loop) if self.open else None

    def _close_overdue(self, now: float) -> None:
        for connection in list(self.open):
            if connection.upgraded:
                if connection.transport.is_closing():
                    self.release(connection)
                continue
            missed = connection.overdue(now)
            if missed == "header":
                log.warning("closed a connection from %s: no whole request head within %g s (--header-timeout)",
                            connection.client_key, self.limits.header_timeout_s)
            elif missed == "body":
                log.warning("closed a connection from %s: its request body stalled for %g s (--body-timeout)",
                            connection.client_key, self.limits.body_timeout_s)
            if missed is not None:
                self.release(connection)
                connection.transport.abort()

    def check_installed(self, server) -> None:
        """Fail loudly if the running server does not use this guard (see `GuardedServer`)."""
        protocol = getattr(getattr(server, "config", None), "http_protocol_class", None)
        if protocol is not self.protocol:
            raise RuntimeError("the connection limits are not installed: Gradio no longer builds its uvicorn "
                               "server through gradio.http_server.Server (see webdemo/connections.py)")


class GuardedServer(gradio_http_server.Server):
    """Gradio's uvicorn server; for an app with a `connection_guard`, every connection runs the
    guard's protocol and the listen queue is the guard's backlog.

    Gradio's launch() builds uvicorn's Config and Server itself and offers no parameter for the
    protocol class or the backlog, so `use_guarded_server` has gradio.http_server build this class
    instead (the only patch; `ConnectionGuard.check_installed` fails loudly if it stops working)."""

    def __init__(self, config, *args, **kwargs):
        guard = getattr(config.app, "connection_guard", None)
        if guard is not None:
            config.http, config.backlog = guard.protocol, guard.backlog
        super().__init__(config, *args, **kwargs)


def use_guarded_server() -> None:
    gradio_http_server.Server = GuardedServer
    quiet_floods()


class RateLimitedLog(logging.Filter):
    """One record per condition (logger, level, first line of the message template, exception
    type) per interval; the next one let through says how many were dropped meanwhile."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self.conditions: dict[tuple, tuple[float, int]] = {}  # condition: (when last let through, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, record.levelno, str(record.msg).partition("\n")[0],
               record.exc_info[0] if record.exc_info else None)
        since, dropped = self.conditions.get(key, (None, 0))
        if since is not None and now - since < self.interval_s:
            self.conditions[key] = (since, dropped + 1)
            return False
        if len(self.conditions) >= LOG_CONDITIONS:
            self.conditions = {k: v for k, v in self.conditions.items() if now - v[0] < self.interval_s}
            if len(self.conditions) >= LOG_CONDITIONS:
                return False  # a flood of distinct messages: none of them
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {now - since:.0f} s were not logged]"
        self.conditions[key] = (now, 0)
        return True


def quiet_floods() -> None:
    """Rate-limit the loggers a client can make speak (once per process)."""
    for name in LOGGED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
            logger.addFilter(RateLimitedLog())
