"""Slow and greedy connections (webdemo/connections.py), on the real `python app.py` under
`ulimit -n 1024`: 1100 connections that send part of a request head and stop leave /health
fast, the server's file descriptors below the limit and its log a few lines; the header
deadline closes them; the per-client cap refuses a greedy address while another gets through;
a stalled body is cut, while a slow but steady body and an answer streaming past every
deadline are not. Plus the pieces alone: the log filter, the caps' arithmetic, the hook check,
the flags."""
from __future__ import annotations

import json
import logging
import os
import resource
import selectors
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol

import app
from tests.browser.app_server import AppServer
from webdemo.connections import ConnectionGuard, ConnectionLimits, RateLimitedLog, client_key

OPEN_FILES = 1024  # the server's RLIMIT_NOFILE
SLOW_CONNECTIONS = 1100
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 22)]  # 55 connections each: under the per-client cap of 64
HEADER_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
STEP_DELAY_S = 0.1
HEALTH_BUDGET_S = 2.0  # generous: CI has two busy cores
PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # never finished
MAX_LOG_LINES = 20
CONNECT_BATCH = 25  # below the server's listen queue (32 at this limit)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = SLOW_CONNECTIONS + 256
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the test process may open only {hard} files; {needed} are needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    server = AppServer("--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
                       "--keep-alive", str(KEEP_ALIVE_S), "--step-delay", str(STEP_DELAY_S),
                       log_dir=tmp_path_factory.mktemp("logs"), open_files=OPEN_FILES)
    try:
        yield server
    finally:
        server.stop()


def open_slow(count: int, port: int, sources: list[str]) -> dict[socket.socket, float]:
    """count connections from the source addresses in turn, each sending PARTIAL_HEAD once
    connected; {socket: when it was sent (or opened, if it never connected)}."""
    sockets, sent = [], {}
    for index in range(count):
        if index % CONNECT_BATCH == 0:
            time.sleep(0.01)  # a burst beyond the listen queue would leave connections half-open in the kernel
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((sources[index % len(sources)], 0))
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
        sent[sock] = time.monotonic()
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 10
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(0.2):
                selector.unregister(key.fileobj)
                sent[key.fileobj] = time.monotonic()
                try:
                    key.fileobj.send(PARTIAL_HEAD)
                except OSError:  # refused at once
                    pass
    return sent


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


@contextmanager
def slow_connections(count: int, port: int, sources: list[str]):
    sockets = open_slow(count, port, sources)
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def count_closed(sockets, expected: int, timeout: float = 2.5) -> int:
    """How many of sockets the server has closed, once that is at least `expected` (or after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        closed = sum(closed_by_server(sock) for sock in sockets)
        if closed >= expected or time.monotonic() > deadline:
            return closed
        time.sleep(0.05)


def watch_closures(sockets, timeout: float) -> dict[socket.socket, float]:
    """{socket: when the server closed it}, polled until all are closed or timeout seconds passed."""
    closed, deadline = {}, time.monotonic() + timeout
    while len(closed) < len(sockets) and time.monotonic() < deadline:
        for sock in sockets:
            if sock not in closed and closed_by_server(sock):
                closed[sock] = time.monotonic()
        time.sleep(0.02)
    return closed


def health(url: str, source: str = "127.0.0.1") -> tuple[int, float]:
    started = time.monotonic()
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        status = client.get(url + "health").status_code
    return status, time.monotonic() - started


@contextmanager
def peak_descriptors(pid: int):
    """The most descriptors the process held, sampled every few milliseconds while the block runs."""
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], len(os.listdir(f"/proc/{pid}/fd")))
            time.sleep(0.003)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(5)


def log_growth(server: AppServer, since: int) -> tuple[int, list[str]]:
    server.log()  # flushes
    data = Path(server.log_path).read_bytes()[since:]
    return len(data), data.decode(errors="replace").splitlines()


def test_1100_slow_connections_under_ulimit_1024(server):
    log_start = Path(server.log_path).stat().st_size
    closed = {}
    with peak_descriptors(server.process.pid) as peak, \
            slow_connections(SLOW_CONNECTIONS, server.port, ATTACKERS) as sent:
        watcher = threading.Thread(target=lambda: closed.update(watch_closures(sent, HEADER_TIMEOUT_S + 6)))
        watcher.start()
        latencies = []
        for _ in range(5):
            status, elapsed = health(server.url)
            assert status == 200
            latencies.append(elapsed)
        watcher.join()
    assert max(latencies) < HEALTH_BUDGET_S, latencies
    assert peak[0] < OPEN_FILES, f"the server held {peak[0]} descriptors"
    assert len(closed) == len(sent), f"{len(sent) - len(closed)} slow connections outlived the header deadline"
    # most were let in (the total cap is 768 here) and held until the deadline; the rest made room for newer ones
    lived = [closed[sock] - sent[sock] for sock in sent]
    assert sum(HEADER_TIMEOUT_S * 0.9 < seconds < HEADER_TIMEOUT_S + 2 for seconds in lived) > 500, sorted(lived)
    size, lines = log_growth(server, log_start)
    assert len(lines) <= MAX_LOG_LINES and size < 4096, lines[:40]
    assert "Too many open files" not in "\n".join(lines)


def test_the_per_client_cap_refuses_a_greedy_address_only(server):
    greedy, polite = "127.0.0.30", "127.0.0.31"
    with slow_connections(64 + 16, server.port, [greedy]) as sockets:
        refused = count_closed(sockets, 16)
        assert refused == 16, f"{refused} of {len(sockets)} connections from one address were refused"
        status, elapsed = health(server.url, source=polite)
        assert status == 200 and elapsed < HEALTH_BUDGET_S
        with pytest.raises(httpx.TransportError):
            health(server.url, source=greedy)
    deadline = time.monotonic() + 10
    while True:  # once the server has seen them close, the greedy address gets in again
        try:
            if health(server.url, source=greedy)[0] == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the greedy address's closed connections were never given back"
        time.sleep(0.05)


def test_websocket_upgrades_give_their_slot_back(server):
    """A connection handed to uvicorn's websocket protocol no longer reports its close to ours;
    its slot must come back anyway, or refused upgrades would use up a client's share (and the
    server's)."""
    client = "127.0.0.40"
    upgrade = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(client, 0))
        sock.sendall(upgrade)
        assert sock.recv(65536).startswith(b"HTTP/1.1 403")  # no websocket route answers
        sock.close()
    time.sleep(1)  # no signal tells when uvicorn has dropped the upgraded sockets: the 65th below proves it
    with slow_connections(64 + 1, server.port, [client]) as sent:
        assert count_closed(sent, 1) == 1  # the 65th: all 64 slots were free


def test_a_stream_of_malformed_requests_does_not_flood_the_log(server):
    log_start = Path(server.log_path).stat().st_size
    for index in range(200):  # uvicorn logs a warning for each
        sock = raw_request(server.port, b"NOT HTTP AT ALL\r\n\r\n", source=f"127.0.0.{50 + index % 10}")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
        sock.close()
    size, lines = log_growth(server, log_start)
    assert len(lines) <= 2 and size < 512, lines


def raw_request(port: int, head: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(head)
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes sock (reading and dropping what it sends)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def chat_head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def chat_body(model: str, max_tokens: int, stream: bool = False) -> bytes:
    """Greedy: a sampled answer of the tiny model could end early (it did once), and the long one
    must last past every deadline."""
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": stream, "temperature": 0,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_a_stalled_body_is_cut_a_slow_one_and_a_long_answer_are_not(server):
    model = httpx.get(server.url + "v1/models", timeout=10).json()["data"][0]["id"]
    stalled = raw_request(server.port, chat_head(1000) + b'{"model": ')
    body = chat_body(model, 2)
    steady = raw_request(server.port, chat_head(len(body)))
    results = {}

    def send_steadily():  # a chunk every 0.4 s: slower in all than both deadlines, never stalled that long
        chunks = [body[i:i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
        for chunk in chunks:
            time.sleep(0.4)
            steady.sendall(chunk)
        results["steady"] = steady.recv(65536).split(b"\r\n", 1)[0]

    def stream_long_answer():
        started = time.monotonic()
        with httpx.stream("POST", server.url + "v1/chat/completions", timeout=30,
                          json=json.loads(chat_body(model, 50, stream=True))) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        results["stream"] = (response.status_code, lines, time.monotonic() - started)

    threads = [threading.Thread(target=work) for work in (send_steadily, stream_long_answer)]
    for thread in threads:
        thread.start()
    cut_after = wait_closed(stalled, timeout=BODY_TIMEOUT_S + 5)
    for thread in threads:
        thread.join(30)
    steady.close()
    assert BODY_TIMEOUT_S * 0.9 < cut_after < BODY_TIMEOUT_S + 3
    assert results["steady"] == b"HTTP/1.1 200 OK"
    status, lines, elapsed = results["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    finish = [json.loads(line[5:])["choices"][0]["finish_reason"] for line in lines[:-1]
              if json.loads(line[5:]).get("choices")]
    assert finish[-1] == "length" and elapsed > max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_S) + 1


def test_an_idle_keep_alive_connection_is_closed(server):
    sock = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert KEEP_ALIVE_S * 0.9 < wait_closed(sock, timeout=KEEP_ALIVE_S + 5) < KEEP_ALIVE_S + 3
    sock.close()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_log_filter_lets_one_line_per_condition_per_interval_through():
    clock, seen = Clock(), []
    logger = logging.getLogger("test.slow_clients.flood")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    logger.addFilter(RateLimitedLog(interval_s=60, clock=clock))
    for second in range(120):
        clock.now = float(second)
        for _ in range(100):
            logger.warning("refused a connection from %s", "127.0.0.1")
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.exception("socket.accept() out of system resource\nsocket: fd=%d", second)
        logger.warning("something else")
    assert len(seen) == 6, seen  # each of the three conditions at 0 s and at 60 s
    assert "[5999 more like this in the last 60 s were not logged]" in seen[3]


@pytest.mark.parametrize("open_files, total, backlog", [(1024, 768, 32), (4096, 3456, 128), (65536, 4096, 128),
                                                        (256, 96, 8)])
def test_the_total_cap_leaves_room_below_the_open_file_limit(open_files, total, backlog):
    guard = ConnectionGuard(ConnectionLimits(), open_files=open_files)
    assert (guard.total, guard.backlog) == (total, backlog)
    assert ConnectionGuard(ConnectionLimits(max_total=100), open_files=open_files).total == min(100, total)


def test_clients_are_addresses_and_ipv6_slash_64s():
    assert client_key(("127.0.0.1", 5000)) == "127.0.0.1"
    assert client_key(("::ffff:10.1.2.3", 5000, 0, 0)) == "10.1.2.3"
    assert client_key(("2001:db8:1:2:aaaa::1", 5000, 0, 0)) == client_key(("2001:db8:1:2:bbbb::9", 1, 0, 0))


def test_a_server_without_the_guard_fails_loudly():
    guard = ConnectionGuard(ConnectionLimits(), open_files=1024)
    plain = SimpleNamespace(config=SimpleNamespace(http_protocol_class=H11Protocol))  # uvicorn's own
    with pytest.raises(RuntimeError, match="not installed"):
        guard.check_installed(plain)
    guard.check_installed(SimpleNamespace(config=SimpleNamespace(http_protocol_class=guard.protocol)))


CONNECTION_ENV = {"CHATGLM_HEADER_TIMEOUT": "4", "CHATGLM_BODY_TIMEOUT": "6.5", "CHATGLM_KEEP_ALIVE": "2",
                  "CHATGLM_MAX_CONNECTIONS": "500", "CHATGLM_MAX_CONNECTIONS_PER_CLIENT": "0"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*CONNECTION_ENV, "SPACE_ID", "SYSTEM"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_flags_and_their_variables_set_the_limits(clean_env):
    assert app.connection_limits(app.parse_args([])) == ConnectionLimits()
    assert app.connection_limits(app.parse_args(["--header-timeout", "1.5", "--max-connections-per-client", "8"])) \
        == ConnectionLimits(header_timeout_s=1.5, max_per_client=8)
    for name, value in CONNECTION_ENV.items():
        clean_env.setenv(name, value)
    assert app.connection_limits(app.parse_args([])) == ConnectionLimits(4, 6.5, 2, max_per_client=0, max_total=500)


def test_on_spaces_there_is_no_per_client_cap(clean_env):
    clean_env.setenv("SPACE_ID", "someone/chatglm")  # every connection comes from the Spaces proxy
    assert app.connection_limits(app.parse_args([])).max_per_client == 0
