"""The serving engine: batching equality, cancellation, back-pressure, isolation."""
import threading
import time

import pytest

from model_runtime.chat import stream_answer
from model_runtime.engine import Engine
from model_runtime.protocol import ChatRequest, EngineBusy, InvalidRequest, Message, SamplingParams
from model_runtime.sampling import Sampler

QUERIES = ["你好", "How is the weather in Shanghai today?", "写一个 Python 函数", "早上好",
           "Tell me a long story about a cat and a dog who become friends.", "1 + 1 = ?"]


def request(query, max_length=96, **sampling):
    sampling.setdefault("temperature", 0)
    return ChatRequest(messages=(Message("user", query),), sampling=SamplingParams(max_length=max_length, **sampling))


@pytest.fixture
def engine(tiny_model):
    tokenizer, model = tiny_model
    engines = []

    def make(**kwargs):
        engines.append(Engine(tokenizer, model, **kwargs))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def final(stream):
    events = list(stream)
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    return events


def alone(tiny_model, query, max_length=96):
    tokenizer, model = tiny_model
    return list(stream_answer(model, tokenizer, query, [], SamplingParams(max_length=max_length, temperature=0)))[-1].text


def test_batched_greedy_answers_equal_answers_alone(tiny_model, engine):
    expected = {q: alone(tiny_model, q) for q in QUERIES}
    eng = engine(slots=4)
    results = {}

    def client(query):
        events = final(eng.submit(request(query)))
        results[query] = events

    threads = [threading.Thread(target=client, args=(q,)) for q in QUERIES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for query, events in results.items():
        assert events[-1].text == expected[query], query  # never another session's answer
        assert "".join(e.delta for e in events) == events[-1].text
    assert len(results) == len(QUERIES)


def test_cancel_mid_stream_frees_the_slot_for_the_next_request(engine):
    eng = engine(slots=1, step_delay=0.01)
    long_one = eng.submit(request("你好", max_length=2048))
    events = iter(long_one)
    while next(events).kind != "delta":
        pass
    started = time.monotonic()
    next_one = eng.submit(request("早上好", max_length=20))
    long_one.cancel()
    last = list(events)[-1]
    assert last.finish_reason == "cancelled" and last.completion_tokens < 100
    assert final(next_one)[-1].finish_reason in ("stop", "length")
    assert time.monotonic() - started < 5  # the long answer would take ~20 s


def test_abandoning_the_stream_cancels_the_request(engine):
    eng = engine(slots=1, step_delay=0.01)
    stream = eng.submit(request("你好", max_length=2048))
    for event in stream:
        if event.kind == "delta":
            break  # the generator is closed: like a client that disconnects
    deadline = time.monotonic() + 5
    while eng.stats()["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.stats()["active_sequences"] == 0
    assert eng.stats()["requests_cancelled"] == 1


def test_full_queue_answers_busy_at_once_and_positions_are_reported(engine):
    eng = engine(slots=1, max_queue=2, step_delay=0.01)
    running = eng.submit(request("你好", max_length=2048))
    first_waiting = eng.submit(request("早上好", max_length=20))
    second_waiting = eng.submit(request("早上好", max_length=20))
    with pytest.raises(EngineBusy, match="busy"):
        eng.submit(request("one too many"))
    positions = []
    for event in second_waiting:
        if event.kind == "queued":
            positions.append(event.queue_position)
        if event.kind == "queued" and event.queue_position == 2:
            running.cancel()
    assert positions[0] == 2 and positions[-1] == 1
    assert final(first_waiting)[-1].finish_reason in ("stop", "length")
    assert eng.stats()["requests_rejected_busy"] == 1


def test_cancel_while_queued_ends_the_request_immediately(engine):
    eng = engine(slots=1, step_delay=0.01)
    running = eng.submit(request("你好", max_length=2048))
    waiting = eng.submit(request("早上好"))
    waiting.cancel()
    assert final(waiting)[-1].finish_reason == "cancelled"
    running.cancel()


def test_deadline_ends_the_request(engine):
    eng = engine(slots=1, step_delay=0.01)
    req = ChatRequest(messages=(Message("user", "你好"),), sampling=SamplingParams(max_length=2048, temperature=0),
                      deadline_s=0.2)
    assert final(eng.submit(req))[-1].finish_reason == "cancelled"


def test_a_failing_forward_ends_only_its_own_request(tiny_model, engine, monkeypatch):
    tokenizer, model = tiny_model
    poison = tokenizer.encode("毒", add_special_tokens=False)[-1]
    forward = type(model).forward

    def fragile_forward(self, tokens, *args):
        if tokens.shape[1] > 1 and (tokens == poison).any(dim=1).any():
            raise RuntimeError("simulated kernel failure")
        return forward(self, tokens, *args)

    monkeypatch.setattr(type(model), "forward", fragile_forward)
    expected = alone(tiny_model, "你好")
    eng = engine(slots=4)
    eng.step_delay = 0.05  # let both requests join the same prefill
    streams = [eng.submit(request("毒")), eng.submit(request("你好"))]
    bad, good = final(streams[0])[-1], final(streams[1])[-1]
    assert bad.finish_reason == "error" and "simulated kernel failure" in bad.error
    assert good.finish_reason in ("stop", "length") and good.text == expected
    assert final(eng.submit(request("你好")))[-1].text == expected  # the engine carries on


def test_a_failing_sampler_ends_only_its_own_request(tiny_model, engine, monkeypatch):
    call = Sampler.__call__

    def fragile(self, logits, tokens):
        if getattr(self, "poisoned", False) and len(tokens) > 12:
            raise ValueError("simulated sampler bug")
        return call(self, logits, tokens)

    monkeypatch.setattr(Sampler, "__call__", fragile)
    eng = engine(slots=4)
    bad_stream = eng.submit(request("你好"))
    eng._jobs[bad_stream.request_id].seq.sampler.poisoned = True
    good = final(eng.submit(request("早上好")))[-1]
    bad = final(bad_stream)[-1]
    assert bad.finish_reason == "error" and "simulated sampler bug" in bad.error
    assert good.text == alone(tiny_model, "早上好")


def test_requests_that_cannot_run_are_refused_at_submit(engine):
    eng = engine(slots=1)
    with pytest.raises(InvalidRequest, match="maximum length"):
        eng.submit(request("天气" * 5000, max_length=2048))
    with pytest.raises(InvalidRequest, match="top_p"):
        eng.submit(request("hi", top_p=0))
    with pytest.raises(InvalidRequest, match="end with a user message"):
        eng.submit(ChatRequest(messages=(Message("assistant", "hi"),)))
    assert eng.stats()["requests_total"] == 0


def test_stats_count_what_happened(engine):
    eng = engine(slots=2)
    final(eng.submit(request("你好", max_length=30)))
    stats = eng.stats()
    assert stats["requests_total"] == 1 and stats["requests_completed"] == 1
    assert stats["tokens_generated_total"] > 0 and stats["time_to_first_token_seconds_count"] == 1
    assert stats["queue_length"] == 0 and stats["active_sequences"] == 0 and stats["slots_total"] == 2
