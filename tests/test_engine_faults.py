"""Fault injection: a fault ends only the requests it touches, health() tells the truth, and
nothing ever hangs (every wait here has a timeout).

The faults come from the model the engine serves (the tiny GLM-4 behind `FaultyModel`), never
from changes to the engine: a prompt with a trigger word makes its admission, its prefill or its
sampling fail, or kills the scheduler thread."""
import threading
import time

import pytest

from model_runtime.protocol import ChatRequest, EngineBusy, Message, SamplingParams
from model_runtime.serving.engine import Engine
from tests.conftest import budget

TIMEOUT_S = 30
OVERFLOW = 3e38  # finite, so it passes the sampler's NaN/inf guard, but temperature < 1 overflows it


def within(seconds, fn, *args):
    """fn(*args), run in a thread; fails the test if it has not returned after `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args)
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class SchedulerKilled(BaseException):
    """Not an Exception: what no step can recover from."""


class UnreadableLayout:
    @property
    def prefix_len(self):
        raise RuntimeError("simulated admission failure")


class FaultyModel:
    """The wrapped model, failing on purpose for prompts holding a trigger word:
    ADMIT: its layout cannot be read, so admission fails; FORWARD: its prefill raises;
    SAMPLE: it is made to say "a" three times, then its logits overflow the sampler; KILL: its
    prefill raises SchedulerKilled. A prefill is one packed row (kv_cache.PackedRows): prompt
    chunks, one per slot, then the running answers' tokens, one each."""

    def __init__(self, model, tokenizer):
        self._model = model
        self._tokenizer = tokenizer
        self._sample_faults: dict[int, int] = {}  # slot of a SAMPLE prompt -> tokens sampled
        self._last_slots: list[int] = []  # the slot of each row the next logits call samples
        self.failed_forwards: list[tuple[int, int]] = []  # the token shapes of the forwards that raised
        self._letter_a = tokenizer.encode("a", add_special_tokens=False)[0]

    def __getattr__(self, name):
        return getattr(self._model, name)

    def layout_for_prompt(self, prompt):
        if "ADMIT" in self._tokenizer.decode(prompt):
            return UnreadableLayout()
        return self._model.layout_for_prompt(prompt)

    def __call__(self, tokens, positions, cache_positions, mask, slots, cache):
        packed = cache.layers[0].packed
        if packed is None:  # a decode step: a row per running answer
            self._last_slots = slots.tolist()
            return self._model(tokens, positions, cache_positions, mask, slots, cache)
        chunks, start = [], 0
        for chunk in packed.chunks:
            chunks.append((chunk.slot, self._tokenizer.decode(tokens[0, start:start + chunk.length].tolist())))
            start += chunk.length
        if any("KILL" in text for _, text in chunks):
            raise SchedulerKilled()
        if any("FORWARD" in text for _, text in chunks):
            self.failed_forwards.append(tuple(tokens.shape))
            raise RuntimeError("simulated kernel failure")
        for slot, text in chunks:
            if "SAMPLE" in text:
                self._sample_faults[slot] = 0
            else:
                self._sample_faults.pop(slot, None)
        # Sampled: the prompts read whole (all of them when as many rows come), then the answers.
        self._last_slots = [slot for slot, _ in chunks] + slots[0, start:].tolist()
        return self._model(tokens, positions, cache_positions, mask, slots, cache)

    def logits(self, hidden):
        logits = self._model.logits(hidden)
        rows = self._last_slots if len(self._last_slots) == len(logits) else []  # a prompt not read whole: none
        for row, slot in enumerate(rows):
            if slot in self._sample_faults:
                self._sample_faults[slot] += 1
                if self._sample_faults[slot] > 3:
                    logits[row] = OVERFLOW
                else:  # certainly not an end token, however it samples
                    logits[row] = -OVERFLOW
                    logits[row, self._letter_a] = 0.0
        return logits


def request(query, temperature=0.0, max_length=128, max_new_tokens=16):
    return ChatRequest(messages=(Message("user", query),), sampling=SamplingParams(
        max_length=max_length, max_new_tokens=max_new_tokens, temperature=temperature))


def final(stream):
    events = within(TIMEOUT_S, list, stream)
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    return events


@pytest.fixture
def engine(tiny_glm4):
    tokenizer, model = tiny_glm4
    engines = []

    def make(**kwargs):
        engines.append(Engine(tokenizer, FaultyModel(model, tokenizer), slots=2, **kwargs))
        return engines[-1]

    yield make
    for e in engines:
        within(TIMEOUT_S, e.close)


def check_fault_hits_only_its_request(engine, bad_request, message):
    eng = engine(step_delay=0.01)  # slow enough that both requests share the batch
    expected = final(eng.submit(request("你好")))[-1]
    assert expected.finish_reason in ("stop", "length") and expected.completion_tokens > 4
    bad, good = eng.submit(bad_request), eng.submit(request("你好"))
    bad_events, good_events = final(bad), final(good)
    assert bad_events[-1].finish_reason == "error" and message in bad_events[-1].error
    assert good_events[-1].finish_reason == expected.finish_reason and good_events[-1].text == expected.text
    assert eng.health() is None
    assert final(eng.submit(request("你好")))[-1].text == expected.text  # the engine carries on
    stats = eng.stats()
    assert stats["requests_failed"] == 1 and stats["active_sequences"] == 0 and stats["queue_length"] == 0
    return bad_events


def test_a_failing_admission_ends_only_its_own_request(engine):
    events = check_fault_hits_only_its_request(engine, request("ADMIT 你好"), "simulated admission failure")
    assert events[-1].completion_tokens == 0


def test_a_failing_forward_ends_only_its_own_request(engine):
    check_fault_hits_only_its_request(engine, request("FORWARD 你好"), "simulated kernel failure")


def test_a_failing_sampler_ends_only_its_own_request(engine):
    events = check_fault_hits_only_its_request(engine, request("SAMPLE 你好", temperature=0.5), "SamplingError")
    assert events[-1].completion_tokens == 3  # it failed mid-answer


def test_a_failing_packed_step_ends_only_the_prompt_at_fault(engine):
    """A prompt read while an answer runs shares its forward (one packed row); when that raises,
    the engine runs the prompt step and the decode step apart: only the request at fault ends."""
    eng = engine(step_delay=0.01)
    expected = final(eng.submit(request("你好", max_new_tokens=30)))[-1]
    running = iter(eng.submit(request("你好", max_new_tokens=30)))
    while within(TIMEOUT_S, next, running).kind != "delta":
        pass
    bad = final(eng.submit(request("FORWARD 你好")))
    rest = within(TIMEOUT_S, list, running)
    assert bad[-1].finish_reason == "error" and "simulated kernel failure" in bad[-1].error
    assert rest[-1].finish_reason == expected.finish_reason and rest[-1].text == expected.text
    (packed_rows, packed_length), (rows, length) = eng.batch.model.failed_forwards
    assert packed_rows == rows == 1 and packed_length == length + 1  # the packed row, then the prompt alone
    assert eng.health() is None and eng.stats()["requests_failed"] == 1


def test_a_dead_scheduler_ends_every_stream_and_refuses_new_requests(engine):
    eng = engine(step_delay=0.02)
    running = eng.submit(request("你好", max_length=2048, max_new_tokens=2000))
    events = iter(running)
    while within(TIMEOUT_S, next, events).kind != "delta":
        pass
    killer = eng.submit(request("KILL"))
    cut = within(TIMEOUT_S, list, events)[-1]
    assert cut.finish_reason == "error" and "internal error" in cut.error
    assert final(killer)[-1].finish_reason == "error"
    assert "SchedulerKilled" in eng.health()
    started = time.monotonic()
    with pytest.raises(EngineBusy, match="internal error"):
        eng.submit(request("你好"))
    assert time.monotonic() - started < budget(0.5)  # refused before any work


def test_a_failed_prompt_read_teaches_the_pace_nothing(engine):
    """The default budget is paced by measured reading (pacing.py): a read that raised at once
    must not count as a fast one, or the next prompts would be read in one long stall."""
    eng = engine()
    long_prompt = "FORWARD " + "请告诉我明天北京的天气怎么样，还有上海和广州的。" * 4  # longer than the first step's 32
    assert final(eng.submit(request(long_prompt, max_length=512)))[-1].finish_reason == "error"
    assert eng.pace.token_s is None
    assert final(eng.submit(request(long_prompt[len("FORWARD "):], max_length=512)))[-1].finish_reason in ("stop", "length")
    assert eng.pace.token_s is not None  # a read that worked is measured
