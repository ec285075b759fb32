"""The whole server (page, API, access gate) in this process on 127.0.0.1, on the real Engine
with the tiny checkpoint, for the API and security tests."""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from model_runtime.serving.engine import Engine
from tests.browser.app_server import free_port
from webdemo.access import AccessPolicy
from webdemo.clients import GuessThrottle
from webdemo.fair_share import FairShareBackend
from webdemo.limits import Limits
from webdemo.server import start_server
from webdemo.ui import build_page

MODEL_NAME = "chatglm-6b-tiny"


@dataclass
class Served:
    url: str  # without the trailing slash
    engine: Engine

    def metrics(self, headers: dict | None = None) -> dict:
        """/metrics as {name: value} (chatglm_ prefix dropped)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=5).text
        return {line.split()[0].removeprefix("chatglm_"): float(line.split()[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_for(self, condition, timeout: float = 5.0, headers: dict | None = None) -> dict:
        """Metrics once condition(metrics) holds; AssertionError after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics(headers)
            if condition(metrics):
                return metrics
            assert time.monotonic() < deadline, f"not reached within {timeout} s: {metrics}"
            time.sleep(0.02)


@contextmanager
def serving(tiny_model, *, policy: AccessPolicy = AccessPolicy(), limits: Limits = Limits(), slots: int = 2,
            queue_size: int = 16, step_delay: float = 0.002, concurrency: int = 8,
            throttle: GuessThrottle | None = None, per_client: int | None = None):
    """per_client: FairShareBackend's cap in front of the engine (None: no such layer)."""
    tokenizer, model = tiny_model
    # This server runs inside the pytest process, whose heap holds what every earlier test left. A
    # full garbage collection over such a heap holds the GIL and stalls the server's event loop (a
    # synthetic heap of 6 million objects: 0.8 s here), which the timing tests would blame on the
    # server: the likely cause of /health replies of 1.0-1.3 s seen in full runs, never alone.
    # That heap is frozen (left out of collections) while the server runs.
    gc.collect()
    gc.freeze()
    try:
        engine = Engine(tokenizer, model, slots=slots, max_queue=queue_size, name=MODEL_NAME, step_delay=step_delay)
        backend = engine if per_client is None else FairShareBackend(engine, per_client=per_client)
        page = build_page(backend, concurrency_limit=concurrency, limits=limits)
        server = start_server(page, backend, policy=policy, limits=limits, concurrency=concurrency,
                              queue_size=queue_size, port=free_port(), quiet=True, throttle=throttle)
        try:
            yield Served(server.url.rstrip("/"), engine)
        finally:
            server.shutdown()
    finally:
        gc.unfreeze()
