"""The per-call backend (ZeroGPU's way to serve): one host call per answer, the engine's decode
loop in it, Stop at the next step, a time budget from the request. Here the "host" is a wrapper
in this process that records what it is asked; tests/test_zerogpu.py runs the real app through a
forking stand-in of the `spaces` package."""
import pickle
import threading
import time

import pytest

from model_runtime.protocol import ChatRequest, EngineBusy, InvalidRequest, Message, SamplingParams, Tool
from model_runtime.serving.engine import Engine
from model_runtime.serving.per_call import MIN_GPU_S, PerCallBackend

from .test_engine import QUERIES, final, request


class RecordingHost:
    """A host wrapper like spaces.GPU: asks `duration` with the call's arguments, runs the call
    here, and notes whether the caller closed it early (what tells ZeroGPU to stop its worker)."""

    def __init__(self, refuse: str = ""):
        self.durations, self.closed_early, self.refuse = [], 0, refuse

    def __call__(self, run, duration):
        def call(job):
            pickle.loads(pickle.dumps(job))  # the arguments cross into a worker process
            self.durations.append(duration(job))
            if self.refuse:
                raise RuntimeError(self.refuse)
            finished = False
            try:
                for event in run(job):
                    pickle.loads(pickle.dumps(event))  # and every event comes back
                    yield event
                finished = True
            finally:
                self.closed_early += not finished
        return call


@pytest.fixture
def backend(tiny_model):
    tokenizer, model = tiny_model
    made = []

    def make(**kwargs):
        host = kwargs.pop("host", None) or RecordingHost()
        made.append(PerCallBackend(tokenizer, model, gpu_call=host, **kwargs))
        made[-1].host = host
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_answers_equal_the_engines(tiny_model, backend):
    tokenizer, model = tiny_model
    engine = Engine(tokenizer, model, slots=2)
    try:
        expected = [final(engine.submit(request(q)))[-1] for q in QUERIES[:3]]
    finally:
        engine.close()
    per_call = backend()
    for query, want in zip(QUERIES[:3], expected):
        got = final(per_call.submit(request(query)))[-1]
        assert (got.text, got.finish_reason, got.completion_tokens) == (want.text, want.finish_reason,
                                                                          want.completion_tokens)
    assert per_call.host.closed_early == 0
    stats = per_call.stats()
    assert stats["requests_completed"] == 3 and stats["active_sequences"] == 0


def test_each_answer_is_one_call_whose_duration_follows_the_request(backend):
    # At most 50 tokens a second on any machine: a fast one measured the tiny model at thousands
    # a second after the first call, so the long call's estimate fell below the first call's guess.
    b = backend(max_gpu_s=100, step_delay=0.02)
    final(b.submit(request("你好", max_length=20)))
    long_answer = b.submit(request("你好", max_length=2000))
    events = iter(long_answer)
    next(events)  # its call has begun: its duration is asked for; no need to wait 40 s for the rest
    long_answer.cancel()
    list(events)
    short, long = b.host.durations
    assert MIN_GPU_S <= short < long <= 100
    assert len(b.host.durations) == 2


def test_cancel_ends_the_call_at_the_next_step(backend):
    b = backend(step_delay=0.02)
    stream = b.submit(request("你好", max_length=2000))
    events = iter(stream)
    first = next(events)
    assert first.kind == "delta"
    stream.cancel()
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 10
    assert b.host.closed_early == 1
    assert b.stats()["active_sequences"] == 0 and b.stats()["requests_cancelled"] == 1


def test_a_consumer_that_goes_away_closes_the_call(backend):
    b = backend(step_delay=0.02)
    events = iter(b.submit(request("你好", max_length=2000)))
    next(events)
    events.close()  # a closed tab: Gradio closes the handler's generator
    assert b.host.closed_early == 1
    assert b.stats()["active_sequences"] == 0 and b.stats()["requests_cancelled"] == 1


def test_an_answer_ends_with_an_error_before_its_gpu_time_runs_out(backend):
    b = backend(max_gpu_s=3, step_delay=0.02)
    started = time.monotonic()
    last = final(b.submit(request("你好", max_length=2000)))[-1]
    assert time.monotonic() - started < 3  # before the host would abort the call
    assert last.finish_reason == "error" and "time limit" in last.error and last.text
    assert b.host.durations == [3]


def test_a_refused_call_ends_its_answer_with_the_hosts_message(backend):
    b = backend(host=RecordingHost(refuse="You have exceeded your GPU quota"))
    last = final(b.submit(request("你好")))[-1]
    assert last.finish_reason == "error" and "GPU quota" in last.error
    assert b.stats()["requests_failed"] == 1 and b.stats()["active_sequences"] == 0


def test_requests_that_cannot_run_are_refused_at_submit(backend):
    b = backend(context_length=64, max_active=1)
    with pytest.raises(InvalidRequest, match="maximum length|max_length"):
        b.submit(request("天气" * 200, max_length=2048))
    with pytest.raises(InvalidRequest, match="top_p"):
        b.submit(request("hi", top_p=0))
    running = b.submit(request("你好", max_length=30))
    with pytest.raises(EngineBusy, match="busy"):
        b.submit(request("你好"))
    final(running)
    final(b.submit(request("你好", max_length=30)))  # the place is free again
    assert b.host.durations and len(b.host.durations) == 2


def test_close_refuses_new_answers_and_cuts_off_what_outlives_the_drain(backend):
    b = backend(step_delay=0.02)
    stream = b.submit(request("你好", max_length=2000))
    events = []
    reader = threading.Thread(target=lambda: events.extend(stream))
    reader.start()
    deadline = time.monotonic() + 20
    while not any(event.kind == "delta" for event in events):  # the answer is running
        assert time.monotonic() < deadline, events
        time.sleep(0.01)
    b.close(drain_s=0.2)
    reader.join(timeout=10)
    assert events[-1].finish_reason == "error" and "shutting down" in events[-1].error
    assert b.health() is not None
    with pytest.raises(EngineBusy):
        b.submit(request("你好"))


def test_tool_requests_cross_into_the_worker(tiny_glm4, backend):
    """A GLM-4 request with tools: the job (tool reader included) pickles, and the answer runs."""
    tokenizer, model = tiny_glm4
    b = PerCallBackend(tokenizer, model, gpu_call=RecordingHost())
    tool = Tool("weather", '{"name": "weather", "parameters": {"type": "object", "properties": {}}}')
    stream = b.submit(ChatRequest(messages=(Message("user", "weather?"),), tools=(tool,),
                                  sampling=SamplingParams(max_length=4000, max_new_tokens=20, temperature=0)))
    assert final(stream)[-1].finish_reason in ("stop", "length", "tool_calls")
