"""The serving engine: one model, many users, continuous batching in one background thread.

`Engine` implements `protocol.ChatBackend`. `submit()` validates and encodes a request in the
caller's thread (so errors come back at once), then puts it in a bounded FIFO queue. The
scheduler thread, once per step:

1. ends requests that were cancelled, passed their deadline (waiting or running) or outlived a
   shutdown's drain time (their slots free up at once);
2. admits waiting requests, first come first served, while KV-cache slots are free;
3. reads the prompts of admitted requests, oldest first, for at most `prefill_chunk` tokens'
   worth of work (chunked prefill, decode_batch.DecodeBatch.prefill): a long prompt is read over
   several steps, so the answers already running keep getting tokens meanwhile;
4. advances every other live request by one token in one batched forward; with causal models
   (not in the fixed-shape CUDA step) 3 and 4 are one packed forward that reads each weight once
   (decode_batch.DecodeBatch.prefill_and_step);
5. turns new tokens into text events on each request's own queue.

Nothing can leave a caller waiting forever. A forward that raises is retried one request at a
time, so only the request at fault ends with an error event; a sampler, a decode or an admission
that raises ends only its own request; anything else that raises in a step ends the requests in
flight and the loop goes on. When steps keep failing, or something that is not an `Exception`
escapes, the scheduler stops for good: every request ends with an error, `health()` says why and
`submit()` raises EngineBusy. Streams wait with a timeout and end with an error event should the
scheduler thread be gone without a word.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..chat.answer_text import AnswerText, reasoning_fields
from ..chat.tool_calls import ToolReader
from ..protocol import ChatEvent, ChatRequest, EngineBusy, InvalidRequest, Message
from .admission import model_info, prepare
from .decode_batch import CUDA_GRAPHS, DecodeBatch, Sequence
from .openmp import release_workers
from .pacing import PrefillPace

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # tokens/s in stats() is measured over this many recent seconds
STREAM_POLL_S = 0.5  # a stream waiting for its next event checks this often that the scheduler lives
IDLE_POLL_S = 1.0  # the scheduler re-checks deadlines this often when it has nothing to run
MAX_FAILED_STEPS = 3  # consecutive failed steps after which the scheduler gives up
JOIN_GRACE_S = 30.0  # close() waits this much past the drain time for the step in progress
SHUTDOWN_MESSAGE = "the server is shutting down; this answer was cut off"
INTERNAL_ERROR = "internal error in the engine; see the server log"
# The least prompt tokens' worth of work read per engine step, by device type (pacing.py reads
# more where steps are fast). CPU: measured with benchmarks/chunked_prefill.py
# (docs/chunked-prefill.md); GPUs: not measured here, the order of llama.cpp's and vLLM's batches.
CPU_PREFILL_CHUNK = 32
GPU_PREFILL_CHUNK = 512


def default_prefill_chunk(device: torch.device) -> int:
    return CPU_PREFILL_CHUNK if torch.device(device).type == "cpu" else GPU_PREFILL_CHUNK


@dataclass(eq=False)
class _Job:
    """Engine-side state of one request."""

    request: ChatRequest
    seq: Sequence
    dropped_turns: int
    tool_reader: Optional[ToolReader] = None  # the request's tools, when the answer may be a call
    events: "queue.Queue[ChatEvent]" = field(default_factory=queue.Queue)
    text: Optional[AnswerText] = None
    submitted: float = field(default_factory=time.monotonic)
    deadline: Optional[float] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_at: Optional[float] = None
    queue_position: int = 0
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def event(self, kind, **fields) -> ChatEvent:
        return ChatEvent(kind=kind, request_id=self.request_id, text=self.text.shown if self.text else "",
                         prompt_tokens=len(self.seq.prompt), completion_tokens=len(self.seq.generated),
                         dropped_turns=self.dropped_turns, **fields, **reasoning_fields(self.text))


class EngineStream:
    """The caller's side of one request: iterate for events; cancel() to stop it."""

    def __init__(self, engine: "Engine", job: _Job):
        self._engine = engine
        self._job = job
        self.request_id = job.request_id

    def __iter__(self) -> Iterator[ChatEvent]:
        finished = False
        try:
            while not finished:
                try:
                    event = self._job.events.get(timeout=STREAM_POLL_S)
                except queue.Empty:
                    self._engine._end_if_orphaned(self._job)  # puts a final event if the scheduler is gone
                    continue
                finished = event.finished
                yield event
        finally:
            if not finished:  # the consumer went away (closed tab, dropped client)
                self.cancel()

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)


class Engine:
    """Continuous-batching chat engine around one loaded model (see the module docstring).

    slots: sequences decoded together at most (KV-cache rows, each of `context_length` tokens);
    max_queue: requests allowed to wait beyond those; step_delay: seconds to sleep per step
    (a debugging aid that makes streams slow enough to watch); cuda_graphs: decode steps over
    every slot with fixed shapes, compiled into CUDA graphs (decode_batch.DecodeBatch); None:
    on a CUDA GPU, where a step of many small kernels otherwise waits on their launches;
    prefill_chunk: the prompt tokens' worth of work a step reads (0: every prompt whole at
    once; None: `default_prefill_chunk` for the model's device, on CPUs paced up by measured
    step times: pacing.PrefillPace); token_budget: tokens the slots may hold together, each
    request reserving its max_length when it starts (None: every slot its whole context; see
    decode_batch.DecodeBatch)."""

    def __init__(self, tokenizer, model, *, slots: int = 8, max_queue: int = 64, context_length: Optional[int] = None,
                 name: str = "chatglm-6b", random_weights: bool = False, step_delay: float = 0.0,
                 cuda_graphs: Optional[bool] = None, prefill_chunk: Optional[int] = None,
                 token_budget: Optional[int] = None):
        paced = prefill_chunk is None and model.device.type == "cpu"  # a GPU step's time needs a sync
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk(model.device)
        if slots < 1 or max_queue < 0 or prefill_chunk < 0:
            raise ValueError("slots must be >= 1, max_queue and prefill_chunk >= 0")
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda"
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA GPU, not on {model.device.type}")
        self.tokenizer = tokenizer
        self.model = model
        self.max_queue = max_queue
        self.slots = slots
        self.step_delay = step_delay
        self.prefill_chunk = prefill_chunk
        self.pace = PrefillPace(prefill_chunk, paced)
        self.batch = DecodeBatch(model, slots, context_length or model.config.max_sequence_length,
                                 vocab_size=tokenizer.vocab_size, compile_options=CUDA_GRAPHS if cuda_graphs else None,
                                 token_budget=token_budget)
        if cuda_graphs:  # the compile is paid here, at start-up, not by the first answer
            self.compile_decode_step()
        self.info = model_info(tokenizer, model, name=name, context_length=self.batch.max_len,
                               random_weights=random_weights)
        self._lock = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._jobs: dict[str, _Job] = {}
        self._closing = False
        self._drain_until: Optional[float] = None
        self._failure: Optional[str] = None  # why the scheduler stopped for good
        self._counters = {"requests_total": 0, "requests_rejected_busy": 0, "requests_cancelled": 0,
                          "requests_failed": 0, "requests_completed": 0, "tokens_generated_total": 0,
                          "prompt_tokens_reused_total": 0}  # KV cache of earlier turns (causal models)
        self._ttft_sum = 0.0
        self._ttft_count = 0
        self._token_times: deque[float] = deque()  # when each token of the last RATE_WINDOW_S came
        if model.device.type == "cpu":  # from here the engine's thread computes: one OpenMP pool (openmp.py)
            release_workers()
        self._thread = threading.Thread(target=self._run, name="chatglm-engine", daemon=True)
        self._thread.start()

    def compile_decode_step(self) -> None:
        """Compile the batch's fixed-shape decode step now (`DecodeBatch.warm_up` on a throwaway
        prompt); if that fails the batch decodes eager, and the log says why. Before serving."""
        started = time.perf_counter()
        probe, _ = prepare(self.tokenizer, self.model, ChatRequest(messages=(Message("user", "你好"),)),
                           self.batch.max_len)
        failed = self.batch.warm_up(probe)
        if failed:
            log.warning("the compiled decode step failed (%s): decoding eager, per row, instead", failed)
        else:
            log.info("decode step compiled in %.1f s", time.perf_counter() - started)

    # ---- the ChatBackend interface -------------------------------------------------------------

    def submit(self, request: ChatRequest) -> EngineStream:
        unavailable = self.health()
        if unavailable:  # refuse before any tokenizing
            raise EngineBusy(unavailable)
        seq, plan = prepare(self.tokenizer, self.model, request, self.info.max_sequence_length)
        job = _Job(request, seq, plan.dropped_turns, plan.tool_reader)
        if request.deadline_s is not None:
            job.deadline = job.submitted + request.deadline_s
        with self._lock:
            unavailable = self.health()
            if unavailable:
                raise EngineBusy(unavailable)
            if request.request_id in self._jobs:
                raise InvalidRequest(f"request id {request.request_id!r} is already in use")
            if len(self._waiting) - len(self.batch.free_slots) >= self.max_queue:
                self._counters["requests_rejected_busy"] += 1
                raise EngineBusy(f"the server is busy ({len(self._waiting)} requests waiting): try again shortly")
            self._counters["requests_total"] += 1
            self._jobs[request.request_id] = job
            self._waiting.append(job)
            self._announce_queue_positions()
            self._lock.notify_all()
        return EngineStream(self, job)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None:
                return
            job.cancelled.set()
            if job in self._waiting:  # never started: end it right here
                self._end(job, "cancelled")
            self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            now = time.monotonic()
            window = [t for t in self._token_times if now - t <= RATE_WINDOW_S]
            span = (now - window[0]) if window else 0.0
            return {
                **self._counters,
                "queue_length": len(self._waiting),
                "active_sequences": len(self._running),
                "slots_total": self.slots,
                "kv_tokens_held": self.batch.tokens_held,
                "kv_tokens_budget": self.batch.token_budget,
                "tokens_per_second": len(window) / span if span > 0 else 0.0,
                "time_to_first_token_seconds_sum": self._ttft_sum,
                "time_to_first_token_seconds_count": self._ttft_count,
            }

    def health(self) -> Optional[str]:
        """None while requests are served; else why not (no lock taken: always quick)."""
        if self._failure:
            return self._failure
        if self._closing:
            return "the server is shutting down"
        if not self._thread.is_alive():
            return "the engine's scheduler has stopped"
        return None

    def close(self, drain_s: float = 0.0) -> None:
        """Stop accepting requests, end the waiting ones, let running answers go on for up to
        drain_s seconds, then cut the rest off ("error"); returns once the scheduler has ended.
        Idempotent: a second call only waits."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._drain_until = time.monotonic() + max(0.0, drain_s)
                for job in list(self._waiting):
                    self._end(job, "error", error=SHUTDOWN_MESSAGE)
            self._lock.notify_all()
            drain_until = self._drain_until
        self._thread.join(timeout=max(0.0, drain_until - time.monotonic()) + JOIN_GRACE_S)
        with self._lock:  # a scheduler stuck in a forward must not keep anyone waiting
            for job in list(self._jobs.values()):
                self._end(job, "error", error=SHUTDOWN_MESSAGE)

    # ---- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        failed_steps = 0
        try:
            while not self._finished_closing():
                try:
                    self._step()
                    failed_steps = 0
                except Exception:
                    failed_steps += 1
                    log.exception("engine step failed (%d in a row)", failed_steps)
                    with self._lock:
                        for job in list(self._running):
                            self._end(job, "error", error=INTERNAL_ERROR)
                    if failed_steps >= MAX_FAILED_STEPS:
                        raise
        except BaseException as error:
            log.critical("the engine's scheduler stopped", exc_info=True)
            with self._lock:
                self._failure = f"the engine stopped after an internal error ({type(error).__name__})"
                for job in list(self._jobs.values()):
                    self._end(job, "error", error=f"{self._failure}; see the server log")

    def _finished_closing(self) -> bool:
        with self._lock:
            return self._closing and not self._running and not self._waiting

    def _step(self) -> None:
        with self._lock:
            while not self._closing and not self._waiting and not self._running:
                self._lock.wait()
            self._end_expired()
            self._admit()
            reading = [job for job in self._running if job.seq.prefilling]
            ongoing = [job for job in self._running if not job.seq.prefilling and not job.seq.finished]
            if not reading and not ongoing:
                if not self._closing:  # only requests that cannot start yet: wait, don't spin
                    self._lock.wait(timeout=IDLE_POLL_S)
                return
        budget = self.pace.budget(decoding=True, packed=True)
        packed = reading and ongoing and self.batch.packs([job.seq for job in reading], budget)
        if not (packed and self._step_packed(reading, ongoing, budget)):
            self._step_apart(reading, ongoing)
        self._publish([job for job in reading if not job.seq.prefilling] + ongoing)
        if self.step_delay:
            time.sleep(self.step_delay)

    def _step_packed(self, reading: list[_Job], ongoing: list[_Job], budget: Optional[int]) -> bool:
        """Prompt chunks and the running answers' decode step in one forward (decode_batch's
        `prefill_and_step`); False if it raised (logged): nothing moved, and the caller runs the
        two apart, where a failure ends only the requests it touches."""
        started = time.perf_counter()
        try:
            self.batch.prefill_and_step([job.seq for job in reading], [job.seq for job in ongoing], budget)
        except Exception:
            log.warning("a packed prefill and decode step failed; running them apart", exc_info=True)
            return False
        self.pace.read(time.perf_counter() - started, budget, any(job.seq.prefilling for job in reading))
        return True

    def _step_apart(self, reading: list[_Job], ongoing: list[_Job]) -> None:
        """A prompt step, then the running answers' decode step, each retried per request."""
        if reading:
            budget, started = self.pace.budget(decoding=bool(ongoing)), time.perf_counter()
            self._forward(lambda seqs: self.batch.prefill(seqs, budget), reading)
            still_reading = any(job.seq.prefilling and not job.done for job in reading)  # a failed read ends its job
            self.pace.read(time.perf_counter() - started, budget, still_reading)
        if ongoing:
            started = time.perf_counter()
            self._forward(self.batch.step, ongoing)
            self.pace.decoded(time.perf_counter() - started)

    def _end_expired(self) -> None:
        """End what was cancelled, is past its deadline (waiting too), or outlived the drain."""
        now = time.monotonic()
        drained = self._closing and now >= self._drain_until
        for job in self._running + list(self._waiting):
            if job.cancelled.is_set():
                self._end(job, "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._end(job, "error", error=f"time limit of {job.request.deadline_s:g} s reached")
            elif drained:
                self._end(job, "error", error=SHUTDOWN_MESSAGE)

    def _admit(self) -> None:
        """Start waiting requests, first come first served, while a slot and the token budget
        allow (a request the budget cannot take yet waits at the head of the line)."""
        while self._waiting and self.batch.free_slots:
            job = self._waiting[0]
            try:
                if not self.batch.admit(job.seq):
                    break
                job.text = AnswerText(self.tokenizer, job.request.sampling.stop, job.tool_reader)
            except Exception as error:
                log.exception("could not admit request %s", job.request_id)
                self._end(job, "error", error=f"could not start this answer: {type(error).__name__}: {error}")
                continue
            self._waiting.popleft()
            self._counters["prompt_tokens_reused_total"] += job.seq.cached
            self._running.append(job)
        self._announce_queue_positions()

    def _forward(self, run, jobs: list[_Job]) -> None:
        """One batched forward; if it fails, each request alone, failing only those that fail."""
        try:
            run([job.seq for job in jobs])
            return
        except Exception as error:
            if len(jobs) == 1:
                self._fail(jobs[0], error)
                return
        for job in jobs:
            try:
                run([job.seq])
            except Exception as error:
                self._fail(job, error)

    def _fail(self, job: _Job, error: Exception) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            message = "out of memory while generating this answer: try a shorter conversation or maximum length"
        else:
            message = f"generation failed: {type(error).__name__}: {error}"
        log.warning("request %s failed: %s", job.request_id, message)
        with self._lock:
            self._end(job, "error", error=message)

    def _publish(self, jobs: list[_Job]) -> None:
        now = time.monotonic()
        # The text work (decoding, post-processing, stop strings) runs before taking the lock,
        # so that submit, cancel and stats never wait for it.
        texts = {job: self._new_text(job) for job in jobs if not job.done and not job.seq.finished}
        with self._lock:
            for job in jobs:
                if job.done:
                    continue
                text = texts.get(job)
                if isinstance(text, Exception):
                    log.error("could not publish the text of request %s", job.request_id, exc_info=text)
                    self._end(job, "error", error=f"generation failed: {type(text).__name__}: {text}")
                    continue
                self._publish_one(job, now, text)
            while self._token_times and now - self._token_times[0] > RATE_WINDOW_S:
                self._token_times.popleft()

    @staticmethod
    def _new_text(job: _Job):
        """The answer's new stable text, or the exception that decoding it raised."""
        try:
            return job.text.update(job.seq.generated)
        except Exception as error:
            return error

    def _publish_one(self, job: _Job, now: float, delta: Optional[str]) -> None:
        """Count the job's new token and send its text (caller holds the lock); delta is None
        when the sequence has just finished (its last text goes with the final event)."""
        first_token = job.first_token_at is None
        if first_token:
            job.first_token_at = now
            self._ttft_sum += now - job.submitted
            self._ttft_count += 1
        self._counters["tokens_generated_total"] += 1
        self._token_times.append(now)
        if job.seq.finished:
            self._end(job, job.seq.finish_reason)
            return
        if delta or first_token or job.text.reasoning_delta:  # the first token always says "generating now"
            job.events.put(job.event("delta", delta=delta))
        if job.text.stopped:  # a stop string appeared
            self._end(job, "stop")

    def _end_if_orphaned(self, job: _Job) -> None:
        """A stream found nothing new for a while: if the scheduler is gone, end its request."""
        if not job.done and not self._thread.is_alive():
            with self._lock:
                self._end(job, "error", error=self.health() or "the engine's scheduler has stopped")

    def _end(self, job: _Job, reason: str, error: Optional[str] = None) -> None:
        """Take the job out of the queue or the batch, release its slot and send its final event
        (caller holds the lock)."""
        if job in self._waiting:
            self._waiting.remove(job)
            self._announce_queue_positions()
        if job in self._running:
            self._running.remove(job)
        self.batch.release(job.seq)
        if job.done:
            return
        job.done = True
        delta = ""
        if job.text and reason != "error":
            try:
                delta = job.text.finish(job.seq.generated)
            except Exception:  # the final event must go out whatever the decoder does
                log.exception("could not decode the end of request %s", job.request_id)
        tool_calls = job.text.tool_calls if job.text and reason == "stop" else ()
        job.events.put(job.event("done", delta=delta, finish_reason="tool_calls" if tool_calls else reason,
                                 error=error, tool_calls=tool_calls))
        self._jobs.pop(job.request_id, None)
        counter = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(reason, "requests_completed")
        self._counters[counter] += 1

    def _announce_queue_positions(self) -> None:
        """Tell each waiting request its place in line (those a free slot awaits are not in line;
        while the token budget holds the first back, everyone is)."""
        head = self._waiting[0].seq if self._waiting else None
        starting = 0 if head is not None and head.slot < 0 and not self.batch.fits(head.max_length) \
            else len(self.batch.free_slots)
        for index, job in enumerate(self._waiting):
            position = index + 1 - starting
            if position > 0 and job.queue_position != position:
                job.queue_position = position
                job.events.put(job.event("queued", queue_position=position))
