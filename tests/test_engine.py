"""The serving engine: batching equality, cancellation, back-pressure, isolation."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from model_runtime.chat.stream import stream_answer
from model_runtime.protocol import ChatRequest, EngineBusy, InvalidRequest, Message, SamplingParams
from model_runtime.serving import launch
from model_runtime.serving.engine import Engine

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


def test_cancel_while_queued_leaves_the_queue_at_once(engine):
    eng = engine(slots=1, step_delay=0.01)
    running = eng.submit(request("你好", max_length=2048))
    events = iter(running)  # kept: a stream dropped mid-way cancels its request
    while next(events).kind != "delta":  # running now
        pass
    waiting = eng.submit(request("早上好"))
    assert eng.stats()["queue_length"] == 1
    waiting.cancel()
    assert eng.stats()["queue_length"] == 0  # before the scheduler's next step
    assert final(waiting)[-1].finish_reason == "cancelled"
    running.cancel()


def test_deadline_ends_the_request_as_an_error_naming_the_limit(engine):
    eng = engine(slots=1, step_delay=0.01)
    req = ChatRequest(messages=(Message("user", "你好"),), sampling=SamplingParams(max_length=2048, temperature=0),
                      deadline_s=0.2)
    last = final(eng.submit(req))[-1]
    assert last.finish_reason == "error" and last.error == "time limit of 0.2 s reached"


def test_deadline_covers_time_spent_waiting_in_the_queue(engine):
    eng = engine(slots=1, step_delay=0.01)
    running = eng.submit(request("你好", max_length=2048))
    started = time.monotonic()
    queued = eng.submit(ChatRequest(messages=(Message("user", "早上好"),), deadline_s=0.3,
                                    sampling=SamplingParams(max_length=2048, temperature=0)))
    last = final(queued)[-1]
    assert last.finish_reason == "error" and "time limit" in last.error and last.completion_tokens == 0
    assert time.monotonic() - started < 2
    assert eng.stats()["active_sequences"] == 1  # the running answer goes on
    running.cancel()


def test_close_cuts_off_what_outlives_the_drain_and_refuses_new_requests(engine):
    eng = engine(slots=1, step_delay=0.01)
    running = eng.submit(request("你好", max_length=2048))
    queued = eng.submit(request("早上好", max_length=2048))
    events = iter(running)
    while next(events).kind != "delta":
        pass
    started = time.monotonic()
    eng.close(drain_s=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    cut = list(events)[-1]
    assert cut.finish_reason == "error" and "cut off" in cut.error and cut.completion_tokens > 0
    never_started = final(queued)[-1]
    assert never_started.finish_reason == "error" and "shutting down" in never_started.error
    assert "shutting down" in eng.health()
    with pytest.raises(EngineBusy, match="shutting down"):
        eng.submit(request("你好"))
    eng.close(drain_s=5)  # idempotent: returns at once
    assert time.monotonic() - started < 6


def test_close_lets_running_answers_finish_within_the_drain_time(engine):
    eng = engine(slots=2, step_delay=0.01)
    short = eng.submit(request("早上好", max_length=40))
    events = iter(short)
    while next(events).kind != "delta":  # running now
        pass
    started = time.monotonic()
    eng.close(drain_s=30)
    assert time.monotonic() - started < 10  # returns as soon as the answer is done
    assert list(events)[-1].finish_reason in ("stop", "length")


def test_health_is_none_while_serving(engine):
    eng = engine(slots=1)
    assert eng.health() is None
    final(eng.submit(request("你好", max_length=30)))
    assert eng.health() is None


def salted(query, salt, max_new_tokens=8):
    return ChatRequest(messages=(Message("user", query),), cache_salt=salt,
                       sampling=SamplingParams(max_length=256, max_new_tokens=max_new_tokens, temperature=0))


def test_kv_reuse_only_between_requests_of_the_same_salt(tiny_glm4):
    tokenizer, model = tiny_glm4
    eng = Engine(tokenizer, model, slots=3)
    try:
        def reused_by(messages, salt):
            before = eng.stats()["prompt_tokens_reused_total"]
            last = final(eng.submit(ChatRequest(messages=tuple(messages), cache_salt=salt, sampling=SamplingParams(
                max_length=256, max_new_tokens=8, temperature=0))))[-1]
            return eng.stats()["prompt_tokens_reused_total"] - before, last

        document = [Message("user", "Please read this shared document about the weather in Beijing. " * 3)]
        assert reused_by(document, "alice")[0] == 0
        reused, first = reused_by(document, "mallory")
        assert reused == 0  # the very same prompt, cached for another visitor: not reused
        follow_up = document + [Message("assistant", first.text), Message("user", "Thanks!")]
        assert reused_by(follow_up, None)[0] == 0  # no salt: no reuse at all
        assert reused_by(follow_up, "alice")[0] >= first.prompt_tokens - 1
    finally:
        eng.close()


def test_model_chat_beside_a_serving_engine_changes_no_answer(tiny_glm4):
    tokenizer, model = tiny_glm4
    queries = ["你好", "Tell me a long story about a cat and a dog who become friends.", "1 + 1 = ?"]
    eng = Engine(tokenizer, model, slots=2)
    try:
        def answers():
            streams = [eng.submit(request(q, max_length=160)) for q in queries]
            return [final(stream)[-1].text for stream in streams]

        expected = answers()
        stop = threading.Event()
        chats = []

        def chat_loop():
            while not stop.is_set():
                chats.append(model.chat(tokenizer, "Tell me about the weather", max_length=200, temperature=0)[0])

        chatter = threading.Thread(target=chat_loop, daemon=True)
        chatter.start()
        try:
            assert answers() == expected
        finally:
            stop.set()
            chatter.join(60)
        assert chats and not chatter.is_alive()
    finally:
        eng.close()


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


def test_the_token_budget_holds_back_what_would_not_fit_and_gives_memory_back(engine):
    """Slots are free but the running answer's reservation (its max_length) leaves too little of
    the budget: the next request waits at the head of the line, the one after it behind it;
    once the first ends, both run; when all have ended nothing is held or in memory."""
    eng = engine(slots=4, step_delay=0.01, token_budget=2100)
    running = eng.submit(request("你好", max_length=2048))
    events = iter(running)
    while next(events).kind != "delta":
        pass
    assert eng.stats()["kv_tokens_held"] == 2048 and eng.batch.cache.resident_bytes > 0
    held_back, behind = iter(eng.submit(request("早上好", max_length=100))), iter(eng.submit(request("1 + 1 = ?", max_length=20)))
    first = next(held_back)
    assert first.kind == "queued" and first.queue_position == 1
    assert next(behind).queue_position == 2  # a short request does not jump the line
    assert eng.stats()["active_sequences"] == 1 and eng.stats()["queue_length"] == 2
    running.cancel()
    assert list(held_back)[-1].finish_reason in ("stop", "length")
    assert list(behind)[-1].finish_reason in ("stop", "length")
    assert eng.stats()["kv_tokens_held"] == 0 and eng.batch.cache.resident_bytes == 0  # no salt: nothing kept


def test_the_token_budget_drops_a_cached_conversation_before_holding_a_request_back(tiny_glm4):
    tokenizer, model = tiny_glm4
    eng = Engine(tokenizer, model, slots=3, context_length=256, token_budget=300)
    try:
        def ask(messages, salt, max_length=256, max_new_tokens=8):  # reserves min(max_length, prompt + max_new_tokens)
            before = eng.stats()["prompt_tokens_reused_total"]
            last = final(eng.submit(ChatRequest(messages=tuple(messages), cache_salt=salt, sampling=SamplingParams(
                max_length=max_length, max_new_tokens=max_new_tokens, temperature=0))))[-1]
            return eng.stats()["prompt_tokens_reused_total"] - before, last

        document = [Message("user", "Please read this shared document about the weather in Beijing. " * 2)]
        _, first = ask(document, "alice", max_length=160)
        kept = eng.stats()["kv_tokens_held"]
        assert first.prompt_tokens <= kept <= first.prompt_tokens + first.completion_tokens  # kept for her next turn
        follow_up = document + [Message("assistant", first.text), Message("user", "Thanks!")]
        assert ask(follow_up, "alice", max_length=160)[0] > 0  # 160 more fit beside what is kept: reused
        ask([Message("user", "Something else entirely")], "bob", max_new_tokens=None)  # 256 do not fit beside alice's turns
        assert ask(follow_up, "alice", max_length=160)[0] == 0  # dropped to make room: read again
    finally:
        eng.close()


def test_cpus_default_to_16_slots_sharing_a_quarter_of_the_free_memory(monkeypatch):
    """A CPU cache costs what it holds, so 16 slots share a token budget; a GPU's is reserved
    whole, so it gets as many whole-context slots as fit (and no budget beyond them)."""
    monkeypatch.setattr(launch, "free_memory", lambda device: 64 * 2**20)  # a quarter: 16 MiB
    per_token = 2**10
    cpu = SimpleNamespace(device=torch.device("cpu"), kv_cache_bytes_per_token=lambda: per_token)
    assert launch.default_capacity(cpu, context_length=2048) == (16, 16 * 2**10)
    assert launch.default_capacity(cpu, context_length=32768) == (16, 32768)  # at least one whole context
    gpu = SimpleNamespace(device=torch.device("cuda"), kv_cache_bytes_per_token=lambda: per_token)
    assert launch.default_capacity(gpu, context_length=2048) == (8, None)
    assert launch.default_capacity(gpu, context_length=32768) == (1, None)
