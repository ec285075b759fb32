"""Per-client shares of one backend: a client (ChatRequest.client, the gate's word for its
address) may have at most `per_client` answers running or queued at once, so one greedy client
cannot fill every slot and the whole queue while others wait. The page, its Gradio API and /v1
all submit through the same `FairShareBackend`, so the count is one per client across them.
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter
from typing import Iterator, Optional

from model_runtime.protocol import ChatBackend, ChatEvent, ChatRequest, ChatStream, EngineBusy, ModelInfo

DEFAULT_PER_CLIENT = 4  # default of --max-per-client


class _CountedStream:
    """A backend stream that gives its client's share back once: when it ends, is cancelled or
    is dropped."""

    def __init__(self, stream: ChatStream, release):
        self.stream, self.request_id, self._release = stream, stream.request_id, release

    def __iter__(self) -> Iterator[ChatEvent]:
        try:
            for event in self.stream:
                if event.finished:
                    self._release()
                yield event
        finally:
            self._release()

    def cancel(self) -> None:
        self.stream.cancel()
        self._release()


class FairShareBackend:
    """`backend` with per-client caps on submit (EngineBusy saying why, which /v1 answers 429)."""

    def __init__(self, backend: ChatBackend, per_client: int = DEFAULT_PER_CLIENT):
        if per_client < 1:
            raise ValueError("per_client must be at least 1")
        self.backend, self.per_client = backend, per_client
        self.active: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def submit(self, request: ChatRequest) -> ChatStream:
        client = request.client
        if client is None:
            return self.backend.submit(request)
        with self.lock:
            if self.active[client] >= self.per_client:
                raise EngineBusy(f"you already have {self.active[client]} answers running or waiting; at most "
                                 f"{self.per_client} per client: wait for one to finish")
            self.active[client] += 1
        try:
            stream = self.backend.submit(request)
        except BaseException:
            self._give_back(client)
            raise
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if released.is_set():
                    return
                released.set()
            self._give_back(client)
        counted = _CountedStream(stream, release)
        weakref.finalize(counted, release)  # a stream dropped unread and uncancelled gives its share back too
        return counted

    def _give_back(self, client: str) -> None:
        with self.lock:
            self.active[client] -= 1
            if self.active[client] <= 0:
                del self.active[client]

    def cancel(self, request_id: str) -> None:
        self.backend.cancel(request_id)

    def stats(self) -> dict:
        return {**self.backend.stats(), "clients_active": len(self.active)}

    def health(self) -> Optional[str]:
        return self.backend.health()

    def close(self, drain_s: float = 0.0) -> None:
        self.backend.close(drain_s=drain_s)
