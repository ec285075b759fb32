"""Answers that each run inside one function call: for hosts that lend a GPU only while a call
runs (Hugging Face ZeroGPU: `spaces.GPU`, which runs the call in a forked worker process and
pickles every value it yields back to the main process).

There the continuous-batching `Engine` cannot work: its scheduler thread would live in the main
process, which has no GPU. `PerCallBackend` has no thread and keeps no state between calls:

- `submit` checks and plans the request in the caller's process (tokenizing on the CPU, so a
  refusal comes at once and costs no GPU time) and returns a stream;
- iterating the stream makes ONE call of `run_answer`, through the host's wrapper (`gpu_call`),
  which moves the model to the device once per worker process, then prefills and decodes the
  answer with the same `DecodeBatch` loop as the engine (a batch of one), yielding a `ChatEvent`
  at every step, so that the host can stop the call at the next step when the stream is closed
  (Stop, a closed tab) or cancelled;
- the call's time budget (the `duration` the host is asked for) comes from the request: its
  prompt and answer lengths at the speeds measured on earlier calls, capped; the answer ends
  with an error, never silently, if the budget runs out.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..chat.answer_text import AnswerText, reasoning_fields
from ..chat.tool_calls import ToolReader
from ..protocol import ChatEvent, ChatRequest, EngineBusy, InvalidRequest
from .admission import model_info, prepare
from .decode_batch import DecodeBatch, new_sequence

log = logging.getLogger(__name__)

# What a host wrapper gets: the generator function to run, and a function of the same arguments
# giving the seconds to reserve. The identity (no host) runs the call in the caller's thread.
GpuCall = Callable[[Callable[..., Iterator[ChatEvent]], Callable[..., int]], Callable[..., Iterator[ChatEvent]]]

FIRST_TOKEN_GUESS_S = 10.0  # seconds to a first token before any call was measured (weights move in)
DECODE_GUESS_TOK_S = 15.0  # decode speed before any call was measured
MIN_GPU_S = 10
BUDGET_MARGIN_S = 2.0  # a call ends this long before its reserved time, so it ends on its own terms
SPEED_WEIGHT = 0.3  # weight of the newest measurement in the running estimates
SHUTDOWN_MESSAGE = "the server is shutting down; this answer was cut off"


def no_host(run: Callable[..., Iterator[ChatEvent]], duration: Callable[..., int]) -> Callable[..., Iterator[ChatEvent]]:
    return run


@dataclass(frozen=True)
class AnswerJob:
    """Everything one call needs; crosses into the worker process, so plain picklable data."""

    request: ChatRequest
    prompt: tuple[int, ...]
    stop_ids: frozenset[int]
    max_length: int  # prompt plus answer, within the server's context length
    dropped_turns: int
    tool_reader: Optional[ToolReader]
    gpu_seconds: int  # what the host is asked to reserve
    deadline: Optional[float]  # time.time() when the request's deadline_s ends


class AnswerRunner:
    """The worker-process side: runs one `AnswerJob` from prefill to its last token."""

    def __init__(self, tokenizer, model, device: str = "auto", step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.step_delay = step_delay

    def place_model(self) -> None:
        """Move the model where this process computes: the GPU the host attached (once per
        worker process; quantized layers re-pack their weights for it), or stay put."""
        target = self.device
        if target == "auto":
            target = "cuda" if torch.cuda.is_available() else str(self.model.device)
        if torch.device(target).type != self.model.device.type:
            self.model.to(target)

    def run(self, job: AnswerJob) -> Iterator[ChatEvent]:
        started = time.time()
        ends = started + job.gpu_seconds - BUDGET_MARGIN_S
        if job.deadline is not None:
            ends = min(ends, job.deadline)
        self.place_model()
        request = job.request
        seq = new_sequence(self.model, list(job.prompt), request.sampling, stop_ids=job.stop_ids)
        batch = DecodeBatch(self.model, slots=1, max_len=job.max_length, vocab_size=self.tokenizer.vocab_size)
        batch.admit(seq)  # bounds the answer by the cache: job.max_length
        text = AnswerText(self.tokenizer, request.sampling.stop, job.tool_reader)

        def event(kind, **fields) -> ChatEvent:
            return ChatEvent(kind=kind, request_id=request.request_id, text=text.shown, prompt_tokens=len(seq.prompt),
                             completion_tokens=len(seq.generated), dropped_turns=job.dropped_turns, **fields,
                             **reasoning_fields(text))

        batch.prefill([seq])
        while not seq.finished:
            delta = text.update(seq.generated)
            yield event("delta", delta=delta)  # every step: the host may stop the call here
            if text.stopped:
                yield event("done", finish_reason="stop")
                return
            if time.time() >= ends:
                yield event("done", finish_reason="error",
                            error=f"time limit of {ends - started:.0f} s reached; the answer was cut off")
                return
            if self.step_delay:
                time.sleep(self.step_delay)
            batch.step([seq])
        delta = text.finish(seq.generated)
        tool_calls = text.tool_calls if seq.finish_reason == "stop" else ()
        yield event("done", delta=delta, finish_reason="tool_calls" if tool_calls else seq.finish_reason,
                    tool_calls=tool_calls)


class CallStream:
    """The caller's side of one answer: iterating makes the host call; cancel() ends it at the
    next step (the call is closed, which tells the host to stop its worker)."""

    def __init__(self, backend: "PerCallBackend", job: AnswerJob):
        self._backend = backend
        self.job = job
        self.request_id = job.request.request_id
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[ChatEvent]:
        backend = self._backend
        final: Optional[ChatEvent] = None
        try:
            for event in self._events():
                final = event if event.finished else None
                yield event
        finally:  # also when the consumer went away (closed tab, dropped client): a cancel
            backend.ended(self.request_id, final.finish_reason if final else "cancelled",
                          final.completion_tokens if final else 0)

    def _events(self) -> Iterator[ChatEvent]:
        """The call's events as a stream shows them; always ends with a "done" event."""
        backend, job = self._backend, self.job
        submitted = time.monotonic()
        first_token_at: Optional[float] = None
        last: Optional[ChatEvent] = None
        calls = None
        reason, error = "cancelled", None
        try:
            if not self.cancelled.is_set():
                calls = backend.gpu_run(job)
                for event in calls:
                    if self.cancelled.is_set() or backend.cut_off:
                        break
                    last = event
                    if event.finished:
                        if event.finish_reason != "error" and first_token_at is not None:
                            backend.measured(decode_tok_s=_rate(event.completion_tokens - 1,
                                                                time.monotonic() - first_token_at))
                        for _ in calls:  # the call returns right after its last event: let it end
                            pass
                        yield event
                        return
                    if first_token_at is None:  # the first token always says "generating now"
                        first_token_at = time.monotonic()
                        backend.measured(first_token_s=first_token_at - submitted)
                        yield event
                    elif event.delta or event.reasoning_delta:
                        yield event
            if backend.cut_off:
                reason, error = "error", SHUTDOWN_MESSAGE
        except Exception as failure:  # the host refused (quota, duration) or the call failed
            log.warning("answer %s failed: %s: %s", self.request_id, type(failure).__name__, failure)
            reason, error = "error", str(failure) or type(failure).__name__
        finally:
            if calls is not None:
                calls.close()  # GeneratorExit: the host stops the worker at its next step
        yield ChatEvent("done", self.request_id, text=last.text if last else "", finish_reason=reason, error=error,
                        prompt_tokens=len(job.prompt), completion_tokens=last.completion_tokens if last else 0,
                        dropped_turns=job.dropped_turns, reasoning=last.reasoning if last else "")


def _rate(tokens: int, seconds: float) -> Optional[float]:
    return tokens / seconds if tokens > 0 and seconds > 0 else None


class PerCallBackend:
    """`protocol.ChatBackend` whose every answer is one host call (see the module docstring).

    gpu_call: the host's wrapper (`spaces.GPU` on ZeroGPU; `no_host` runs calls in the caller's
    thread); max_gpu_s: the longest call to ask for; max_active: answers at once, more are busy."""

    def __init__(self, tokenizer, model, *, gpu_call: GpuCall = no_host, device: str = "auto",
                 name: str = "chatglm-6b", random_weights: bool = False, context_length: Optional[int] = None,
                 max_gpu_s: int = 120, max_active: int = 8, step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.model = model
        self.runner = AnswerRunner(tokenizer, model, device, step_delay)
        self.max_gpu_s = max_gpu_s
        self.max_active = max_active
        self.info = model_info(tokenizer, model, name=name, random_weights=random_weights,
                               context_length=min(context_length or model.config.max_sequence_length,
                                                  model.config.max_sequence_length))
        self.gpu_run = gpu_call(self.runner.run, self.gpu_seconds)
        self._lock = threading.Lock()
        self._active: dict[str, CallStream] = {}
        self._idle = threading.Condition(self._lock)
        self._closing = False
        self.cut_off = False  # set once a shutdown's drain time is over
        self._first_token_s = FIRST_TOKEN_GUESS_S
        self._decode_tok_s = DECODE_GUESS_TOK_S
        self._counters = {"requests_total": 0, "requests_rejected_busy": 0, "requests_cancelled": 0,
                          "requests_failed": 0, "requests_completed": 0, "tokens_generated_total": 0}

    # ---- the ChatBackend interface -------------------------------------------------------------

    def submit(self, request: ChatRequest) -> CallStream:
        unavailable = self.health()
        if unavailable:
            raise EngineBusy(unavailable)
        seq, plan = prepare(self.tokenizer, self.model, request, self.info.max_sequence_length)
        job = AnswerJob(request, tuple(plan.tokens), frozenset(plan.stop_ids), seq.max_length, plan.dropped_turns,
                        plan.tool_reader, self._estimate_seconds(seq.max_length - len(plan.tokens)),
                        time.time() + request.deadline_s if request.deadline_s is not None else None)
        stream = CallStream(self, job)
        with self._lock:
            if self._closing:
                raise EngineBusy("the server is shutting down")
            if request.request_id in self._active:
                raise InvalidRequest(f"request id {request.request_id!r} is already in use")
            if len(self._active) >= self.max_active:
                self._counters["requests_rejected_busy"] += 1
                raise EngineBusy(f"the server is busy ({len(self._active)} answers running): try again shortly")
            self._active[request.request_id] = stream
            self._counters["requests_total"] += 1
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            stream = self._active.get(request_id)
        if stream is not None:
            stream.cancel()

    def stats(self) -> dict:
        with self._lock:
            return {**self._counters, "queue_length": 0, "active_sequences": len(self._active),
                    "slots_total": self.max_active, "decode_tokens_per_second_estimate": self._decode_tok_s}

    def health(self) -> Optional[str]:
        return "the server is shutting down" if self._closing else None

    def close(self, drain_s: float = 0.0) -> None:
        """Refuse new answers; let running ones go on for up to drain_s, then cut them off at
        their next step."""
        with self._lock:
            self._closing = True
            self._idle.wait_for(lambda: not self._active, timeout=max(0.0, drain_s))
            self.cut_off = True

    # ---- bookkeeping (called by streams) -----------------------------------------------------------

    def gpu_seconds(self, job: AnswerJob) -> int:
        """The host's `duration` for a call (same arguments as the call)."""
        return job.gpu_seconds

    def _estimate_seconds(self, answer_tokens: int) -> int:
        """First token (weights moving in, prefill) plus the longest answer allowed, at the speeds
        measured so far, with a quarter more for safety; at least MIN_GPU_S, at most max_gpu_s."""
        with self._lock:
            estimate = 1.25 * (self._first_token_s + answer_tokens / self._decode_tok_s)
        return int(min(self.max_gpu_s, max(MIN_GPU_S, estimate)))

    def measured(self, first_token_s: Optional[float] = None, decode_tok_s: Optional[float] = None) -> None:
        with self._lock:
            if first_token_s is not None:
                self._first_token_s += SPEED_WEIGHT * (first_token_s - self._first_token_s)
            if decode_tok_s is not None:
                self._decode_tok_s += SPEED_WEIGHT * (decode_tok_s - self._decode_tok_s)

    def ended(self, request_id: str, reason: str, completion_tokens: int) -> None:
        counter = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(reason, "requests_completed")
        with self._lock:
            if self._active.pop(request_id, None) is None:
                return
            self._counters[counter] += 1
            self._counters["tokens_generated_total"] += completion_tokens
            if not self._active:
                self._idle.notify_all()
