"""webdemo.conversation: stored history, settings checks, cancelling, the readout; streaming
through the real Engine on the tiny checkpoint. webdemo.library and webdemo.importing: the
conversations a browser keeps, and reading one back from its download."""
import base64
import json
import random
import threading
import time

import pytest

from model_runtime.protocol import SamplingParams
from tests.test_webdemo_page import RecordingBackend
from webdemo.chat_titles import clean_title
from webdemo.conversation import (ActiveStreams, Progress, check_message, check_settings, clean_history, fit_history,
                                  readout, stream_answer)
from webdemo.sealed_store import StoreSeal
from webdemo.importing import MAX_IMPORT_BYTES, ImportRefused, decode_upload, read_export
from webdemo.library import (ANSWER_RESERVE_BYTES, MAX_CONVERSATIONS, MAX_TITLE_CHARS, LibraryInvalid, json_bytes,
                             read_library, store_limit)
from webdemo.limits import MAX_BODY_BYTES, MAX_MESSAGE_CHARS, LimitExceeded, Limits
from webdemo.render import conversation_json


def test_clean_history_keeps_alternating_turns_only():
    assert clean_history(None) == [] and clean_history("x") == []
    assert clean_history([["hi", "hello"], ["a", "b"]]) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messy = [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "system", "content": "s"},
             {"role": "assistant", "content": "a"}, {"role": "assistant", "content": 5}, 7, ["x"],
             {"role": "user", "content": "dangling"}]
    assert clean_history(messy) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_clean_history_reads_only_the_newest_items():
    pairs = [[f"q{i}", f"a{i}"] for i in range(10)]
    assert [m["content"] for m in clean_history(pairs, max_items=2)] == ["q8", "a8", "q9", "a9"]
    assert clean_history(pairs, max_items=0) == []


def test_clean_history_is_linear_on_a_hostile_list():
    hostile = [{"role": "user", "content": "q"}] * 500_000 + [7] * 500_000
    started = time.perf_counter()
    assert clean_history(hostile, max_items=400) == []
    assert clean_history(hostile, max_items=10**7) == []  # a user, then only more users: no pair
    assert time.perf_counter() - started < 2.0


def turns(*pairs):
    return [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)]


def test_fit_history_keeps_the_newest_turns_that_fit():
    limits = Limits(max_messages=5, max_message_chars=10, max_conversation_chars=20)
    history = turns(("a" * 4, "b" * 4), ("c" * 4, "d" * 4), ("e" * 2, "f" * 2))
    assert fit_history(history, ["q"], limits) == (history[2:], 1)  # 5 messages at most
    assert fit_history(history, ["q" * 9], limits) == (history[4:], 2)  # 20 characters at most
    assert fit_history(turns(("x" * 11, "y"), ("e", "f")), ["q"], limits) == (turns(("e", "f")), 1)
    assert fit_history([], [], limits) == ([], 0)
    with pytest.raises(LimitExceeded, match="at most 10"):
        fit_history(history, ["q" * 11], limits)


def test_fit_history_is_one_pass_over_a_long_chat():
    history = turns(*[("q" * 100, "a" * 100)] * 50_000)
    started = time.perf_counter()
    kept, dropped = fit_history(history, ["hello"], Limits())
    assert time.perf_counter() - started < 1.0
    assert len(kept) == 398 and dropped == 50_000 - 199 and kept == history[-398:]


def test_check_settings_accepts_the_slider_ranges():
    params = check_settings(2048, 0.7, 0, limit=2048)
    assert (params.max_length, params.top_p, params.temperature) == (2048, 0.7, 0.0)
    defaults = SamplingParams(repetition_penalty=1.2, top_k=7)
    assert check_settings(5.0, 1, 2, limit=8, defaults=defaults).repetition_penalty == 1.2


@pytest.mark.parametrize("max_length, top_p, temperature, message", [
    (0, 0.7, 0.95, "max_length must be between 1 and 2048, got 0."),
    (4096, 0.7, 0.95, "max_length must be between 1 and 2048, got 4096."),
    (10.5, 0.7, 0.95, "max_length must be between 1 and 2048, got 10.5."),
    (100, 0, 0.95, "top_p must be between 0.01 and 1.0, got 0."),
    (100, 1.5, 0.95, "top_p must be between 0.01 and 1.0, got 1.5."),
    (100, 0.7, -0.1, "temperature must be between 0.0 and 2.0, got -0.1."),
    (100, 0.7, float("nan"), "temperature must be a number, got nan."),
    (100, "0.7", 0.9, "top_p must be a number, got '0.7'."),
    (True, 0.7, 0.9, "max_length must be a number, got True."),
])
def test_check_settings_rejects_with_a_clear_message(max_length, top_p, temperature, message):
    with pytest.raises(ValueError) as error:
        check_settings(max_length, top_p, temperature, limit=2048)
    assert str(error.value) == message


def test_check_settings_speaks_chinese():
    with pytest.raises(ValueError, match="必须在"):
        check_settings(0, 0.7, 0.9, limit=2048, lang="zh")


class Stream:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def test_stop_cancels_running_streams_of_that_session_only():
    active = ActiveStreams()
    mine, theirs = Stream(), Stream()
    active.add("me", mine, active.begin())
    active.add("you", theirs, active.begin())
    active.stop("me")
    assert mine.cancelled.is_set() and not theirs.cancelled.is_set()


def test_stop_before_the_stream_exists_cancels_it_on_arrival():
    active = ActiveStreams()
    started = active.begin()
    active.stop("me")  # Stop pressed before the answer was submitted
    late = Stream()
    active.add("me", late, started)
    assert late.cancelled.is_set()
    fresh = Stream()  # the next answer is not affected
    active.add("me", fresh, active.begin())
    assert not fresh.cancelled.is_set()
    active.remove("me", late)
    active.remove("me", fresh)
    assert active.count() == 0


def test_remembered_stops_are_bounded_and_forgetting_one_stops_nothing():
    active = ActiveStreams(max_remembered_stops=3)
    started = active.begin()
    for number in range(1000):  # a client can send any number of session hashes
        active.stop(f"session-{number}")
    assert len(active._last_stop) == 3
    early = Stream()
    active.add("session-0", early, started)  # its Stop was forgotten: the answer runs
    assert not early.cancelled.is_set()
    late = Stream()
    active.add("session-999", late, started)  # remembered: cancelled on arrival
    assert late.cancelled.is_set()


def test_readout_lines():
    progress = Progress("abc", True, "length", prompt_tokens=10, completion_tokens=6, dropped_turns=2,
                        tokens_per_second=12.345)
    assert readout(progress, 16, "en") == ("12.3 tokens/s · context 16 / 16 tokens · "
                                           "2 older turn(s) left out of the model's context · "
                                           "answer cut at the maximum length")
    assert readout(Progress(queue_position=3), 16, "zh") == "排队中：第 3 位"
    assert "stopped" in readout(Progress("x", True, "cancelled", prompt_tokens=3, completion_tokens=1), 9, "en")
    assert readout(Progress("", True, "error", error="boom"), 9, "en") == "the answer failed: boom"
    cut = readout(Progress("half an answ", True, "error", error="time limit reached", prompt_tokens=3,
                           completion_tokens=4), 9, "en")
    assert cut == "context 7 / 9 tokens · the answer was cut off and is incomplete: time limit reached"


@pytest.fixture(scope="module")
def engine(tiny_model):
    from model_runtime.serving.engine import Engine

    tokenizer, model = tiny_model
    engine = Engine(tokenizer, model, slots=2, step_delay=0.002)
    yield engine
    engine.close()


def test_stream_answer_streams_and_ends(engine):
    active = ActiveStreams()
    updates = list(stream_answer(engine, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}],
                                 "早上好", SamplingParams(max_length=64, temperature=0), active, "s", 0))
    assert updates[-1].finished and updates[-1].finish_reason in ("stop", "length")
    assert all(not u.finished for u in updates[:-1])
    texts = [u.text for u in updates]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert updates[-1].prompt_tokens > 0 and updates[-1].completion_tokens > 0
    assert active.count() == 0


def test_closing_the_generator_cancels_in_the_engine(engine):
    active = ActiveStreams()
    cancelled = engine.stats()["requests_cancelled"]
    updates = stream_answer(engine, [], "你好", SamplingParams(max_length=2048, temperature=0), active, "s", 0)
    next(updates)
    updates.close()  # what Gradio does when the page goes away or Stop cancels the handler
    assert active.count() == 0
    deadline = time.monotonic() + 2
    while engine.stats()["requests_cancelled"] != cancelled + 1:  # ended at the engine's next step
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    assert engine.stats()["active_sequences"] == 0


def test_stop_from_another_thread_ends_the_answer(engine):
    active = ActiveStreams()
    updates = stream_answer(engine, [], "你好", SamplingParams(max_length=2048, temperature=0), active, "s",
                            active.begin())
    first = next(updates)
    assert not first.finished
    active.stop("s")
    last = list(updates)[-1]
    assert last.finished and last.finish_reason == "cancelled" and last.completion_tokens < 500


def test_check_message():
    assert check_message("hi") == "hi"
    for bad, text in [("", "empty"), ("   \n", "empty"), (None, "empty"), ("x" * 16_001, "too long")]:
        with pytest.raises(ValueError, match=text):
            check_message(bad)
    with pytest.raises(ValueError, match="at most 5"):
        check_message("x" * 6, limit=5)


def test_server_texts_follow_accept_language():
    from webdemo.i18n import EN, ZH, pick_language

    assert pick_language("zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert pick_language("en-US,en;q=0.9,zh-CN;q=0.8") == "en"
    assert pick_language("fr-FR,fr;q=0.9") == "en" and pick_language(None) == "en"
    assert set(EN) == set(ZH)


def test_stream_answer_sends_the_deadline_and_salt_and_reports_a_cut_off():
    backend = RecordingBackend()
    backend.finish_reason, backend.error = "error", "time limit"
    updates = list(stream_answer(backend, [], "hi", SamplingParams(), ActiveStreams(), "s", 0,
                                 deadline_s=12.5, cache_salt="page:abc"))
    request = backend.requests[0]
    assert (request.deadline_s, request.cache_salt) == (12.5, "page:abc")
    assert updates[-1].finish_reason == "error" and updates[-1].text == "partial answer"


# ---- the library of conversations a browser keeps (library.py) and imports (importing.py) ----


DEFAULTS = {"max_length": 64, "top_p": 0.7, "temperature": 0.95, "system": ""}
TURN = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def read(value):
    return read_library(value, max_messages=400, max_chars=100, defaults=DEFAULTS,
                        settings_valid=lambda s: isinstance(s["max_length"], int) and 1 <= s["max_length"] <= 64)


def test_read_library_refuses_a_wrong_shape_and_replaces_what_is_malformed_within_it():
    for empty in (None, {"chats": []}, {"version": 1, "current": "00000000000000aa", "chats": []}):
        library = read(empty)
        assert len(library.chats) == 1 and library.current.messages == [] and library.current.settings == DEFAULTS
    for junk in ("x", 7, {"chats": "x"}, {"chats": [1, "a", None]}, {"current": ["a"], "chats": []},
                 {"current": {"a": 1}, "chats": [{"messages": TURN}]}, {"version": True, "chats": []},
                 {"chats": [], "html": "<b>"}, {"chats": [{"title": 5, "messages": TURN}]},
                 {"chats": [{"messages": "x"}]}, {"chats": [{"id": 1}]}, {"chats": [{"settings": []}]}):
        with pytest.raises(LibraryInvalid):
            read(junk)
    legacy = read(TURN)  # the one-conversation page's value
    assert [chat.messages for chat in legacy.chats] == [TURN]
    value = {"current": "../etc", "chats": [
        {"id": "../../x", "title": "t" * 500, "settings": {"max_length": 10**9}, "messages": TURN},
        {"id": "00000000000000aa", "title": "", "settings": {"max_length": 32, "system": "s" * 101}, "messages": TURN},
        {"id": "00000000000000aa", "settings": {"max_length": 32, "top_p": 0.5, "temperature": 0, "system": "hi"},
         "messages": [TURN[0]] * 3}]}
    library = read(value)
    ids = [chat.id for chat in library.chats]
    assert len(set(ids)) == 3 and ids[1] == "00000000000000aa" and ids[0] != "../../x"
    assert library.current_id == ids[0]  # an unknown current id opens the first
    assert len(library.chats[0].title) == 60 and library.chats[1].title == ""
    assert library.chats[0].settings == DEFAULTS and library.chats[1].settings == DEFAULTS  # out of range, too long
    assert library.chats[2].settings["max_length"] == 32 and library.chats[2].messages == []


def test_read_library_reads_at_most_the_cap_quickly():
    value = {"chats": [{"messages": TURN * 1000}] * 10_000}
    started = time.perf_counter()
    library = read(value)
    assert len(library.chats) == MAX_CONVERSATIONS and all(len(chat.messages) == 400 for chat in library.chats)
    assert library.chats[0].cut and time.perf_counter() - started < 2.0


def test_library_operations():
    library = read(None)
    first = library.current_id
    library.new_chat(dict(DEFAULTS))
    assert library.current_id == first, "an empty chat is reused"
    library.current.messages = list(TURN)
    library.new_chat({**DEFAULTS, "max_length": 8})
    assert library.current_id != first and library.chats[0].settings["max_length"] == 8
    assert library.choices("New chat") == [("New chat", library.current_id), ("q", first)]
    assert not library.switch("nope") and library.switch(first) and library.current.messages == TURN
    library.rename("  My\n\tchat  ")
    assert library.current.title == "My chat" and library.choices("New chat")[1] == ("My chat", first)
    library.delete(dict(DEFAULTS))
    assert [chat.id for chat in library.chats] == [library.current_id] and library.current_id != first
    library.delete(dict(DEFAULTS))
    assert len(library.chats) == 1 and library.current.messages == []
    for _ in range(MAX_CONVERSATIONS - 1):
        library.current.messages = list(TURN)
        library.new_chat(dict(DEFAULTS))
    library.current.messages = list(TURN)
    before = library.to_value()
    assert not library.new_chat(dict(DEFAULTS)) and library.to_value() == before  # refused: nothing changes
    assert not library.can_start_chat()


def test_new_chat_keeps_a_named_chat_and_delete_can_be_undone():
    library = read(None)
    library.current.messages = list(TURN)
    library.rename("Keep me")
    library.current.messages = []  # Reset
    assert library.new_chat({**DEFAULTS, "max_length": 8})
    assert [chat.shown_title("New chat") for chat in library.chats] == ["New chat", "Keep me"]
    assert library.current.settings["max_length"] == 8
    library.switch(library.chats[1].id)
    assert library.new_chat(dict(DEFAULTS)) and len(library.chats) == 2, "the empty unnamed chat is opened again"
    assert library.chats[0].id == library.current_id and not library.current.title
    library.switch(library.chats[1].id)
    place, removed, placeholder = library.delete(dict(DEFAULTS))
    assert (place, removed.title, placeholder) == (1, "Keep me", None) and len(library.chats) == 1
    assert library.undelete(place, removed) and library.current.title == "Keep me" and len(library.chats) == 2
    assert not library.undelete(place, removed), "already back"
    assert library.matching("KEEP", "New chat") == [("Keep me", removed.id)]
    assert len(library.matching("", "New chat")) == 2 and library.matching(None, "x") == library.choices("x")
    library.delete(dict(DEFAULTS))
    only = library.delete(dict(DEFAULTS))  # the last one: an empty chat takes its place...
    assert only[2] == library.current_id and len(library.chats) == 1
    assert library.undelete(*only) and [chat.id for chat in library.chats] == [only[1].id]  # ...until undone


def test_a_full_store_fits_the_body_limit_with_the_largest_message():
    """The worst request body that carries the store: the store at its limit, sealed (random
    CJK text, which compresses least), a message and a system prompt of the most characters,
    each the costliest to encode (\\u0001 is 6 bytes)."""
    limit = store_limit(MAX_BODY_BYTES)
    largest = "\x01" * MAX_MESSAGE_CHARS
    noise = random.Random(5)
    text = "".join(chr(noise.randrange(0x4E00, 0x9FFF)) for _ in range(limit // 3 - 100))
    store = {"chats": [{"messages": [{"role": "user", "content": text}]}]}
    assert json_bytes(store) <= limit
    sealed = StoreSeal("key").seal(store)
    body = {"data": [largest, sealed, 2048, 0.7, 0.95, largest], "fn_index": 99, "trigger_id": 99,
            "session_hash": "s" * 64, "event_data": None}
    assert json_bytes(body) < 0.75 * MAX_BODY_BYTES
    assert ANSWER_RESERVE_BYTES < limit // 4


def export_file(tmp_path, content, name="chat.json"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_read_export_round_trips_a_download(tmp_path):
    history = [{"role": "user", "content": "中文 <script>x</script> $x^2$"}, {"role": "assistant", "content": "好\x00"}]
    path = export_file(tmp_path, conversation_json(history, "model"))
    assert read_export(path.read_bytes(), Limits()) == [history[0], {"role": "assistant", "content": "好"}]  # NUL dropped


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}', "surrogate"),
    (b'[1, 2]', "not a conversation exported"),
    (b'{"messages": [], "extra": 1}', "not a conversation exported"),
    (b'{"messages": []}', "no messages"),
    (b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}', "message 0"),
    (b'{"messages": [{"role": "user", "content": "q", "x": 1}, {"role": "assistant", "content": "a"}]}', "message 0"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}', "message 0"),
    (b'{"messages": [{"role": "user", "content": "q"}]}', "last message must be an answer"),
    (b'{"model": 1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "text"),
])
def test_read_export_refuses_malformed_files(tmp_path, content, reason):
    with pytest.raises(ImportRefused, match=reason):
        read_export(export_file(tmp_path, content).read_bytes(), Limits())


def test_read_export_refuses_big_files_and_conversations_over_the_limits(tmp_path):
    with pytest.raises(ImportRefused, match="larger than 256 KiB"):
        decode_upload("A" * (200 << 20))  # refused by its length, undecoded
    with pytest.raises(ImportRefused, match="larger than 256 KiB"):
        decode_upload(base64.b64encode(b" " * (MAX_IMPORT_BYTES + 1)).decode())
    assert decode_upload(base64.b64encode(b" " * MAX_IMPORT_BYTES).decode()) == b" " * MAX_IMPORT_BYTES
    with pytest.raises(ImportRefused, match="not base64"):
        decode_upload("/etc/passwd")
    many = json.dumps({"messages": TURN * 3}).encode()
    with pytest.raises(ImportRefused, match="6 messages; at most 5"):
        read_export(export_file(tmp_path, many).read_bytes(), Limits(max_messages=5))
    long = json.dumps({"messages": [TURN[0], {"role": "assistant", "content": "a" * 51}]}).encode()
    with pytest.raises(ImportRefused, match="at most 50"):
        read_export(export_file(tmp_path, long).read_bytes(), Limits(max_message_chars=50))
    assert MAX_IMPORT_BYTES == 256 << 10


def test_abandoning_is_told_apart_from_stopping():
    active = ActiveStreams()
    started = active.begin()
    active.stop("s")
    assert active.stopped_after("s", started) and not active.abandoned_after("s", started)
    active.stop("s", abandon=True)
    assert active.abandoned_after("s", started) and not active.abandoned_after("other", started)
    later = active.begin()
    active.stop("s")  # a plain stop later does not abandon an answer begun after the abandon
    assert active.stopped_after("s", later) and not active.abandoned_after("s", later)


# ---- tool calls and results in a stored or imported conversation ----


def call_message(*calls, content=""):
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        for call_id, name, arguments in calls]}


def result(call_id, content):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


TOOL_TURN = [{"role": "user", "content": "weather in 北京 and 上海?"},
             call_message(("call_1", "get_weather", '{"city": "北京"}'), ("call_2", "get_weather", '{"city": "上海"}'),
                          content="Let me look."),
             result("call_2", "雨 <img src=x onerror=alert(1)>"), result("call_1", '{"sky": "sunny"}'),
             {"role": "assistant", "content": "Sunny in 北京, rain in 上海."}]


def test_clean_history_keeps_tool_turns_whole():
    assert clean_history(TOOL_TURN + TURN) == TOOL_TURN + TURN
    openai_null = [TOOL_TURN[0], {**TOOL_TURN[1], "content": None}, *TOOL_TURN[2:]]
    assert clean_history(openai_null)[1]["content"] == ""
    missing_result = [TOOL_TURN[0], TOOL_TURN[1], TOOL_TURN[2], TOOL_TURN[4]]  # call_1 unanswered
    assert clean_history(missing_result) == [TOOL_TURN[0], TOOL_TURN[4]]  # the call goes with its result
    stray = [result("call_1", "x"), TOOL_TURN[0], result("call_9", "x"), TOOL_TURN[4]]
    assert clean_history(stray) == [TOOL_TURN[0], TOOL_TURN[4]]
    assert clean_history(TOOL_TURN[:4]) == []  # no answer yet: not a whole turn


@pytest.mark.parametrize("calls", [
    [],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}] * 2,  # the same id twice
    [{"id": "c" * 257, "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    [{"id": "c/../x", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    [{"id": "c", "type": "function", "function": {"name": "f x", "arguments": "{}"}}],
    [{"id": "c", "type": "function", "function": {"name": "f" * 65, "arguments": "{}"}}],
    [{"id": "c", "type": "code", "function": {"name": "f", "arguments": "{}"}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": NaN}'}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}"}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "' + "x" * 16_000 + '"}'}}],
    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", "code": "import os"}}],
    [{"id": f"c{n}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for n in range(17)],
])
def test_malformed_tool_calls_are_dropped_and_refused_on_import(calls, tmp_path):
    turn = [TURN[0], {"role": "assistant", "content": "", "tool_calls": calls}, result("c", "r"), TURN[1]]
    assert clean_history(turn) == TURN
    path = export_file(tmp_path, json.dumps({"messages": turn}))
    with pytest.raises(ImportRefused, match="message 1"):
        read_export(path.read_bytes(), Limits())


def test_fit_history_keeps_or_drops_tool_turns_whole_counting_arguments():
    limits = Limits(max_messages=6, max_message_chars=100, max_conversation_chars=200)
    history = TOOL_TURN + TURN  # 5 + 2 messages
    assert fit_history(history, ["q"], limits) == (TURN, 1)
    assert fit_history(TOOL_TURN, ["q"], limits) == (TOOL_TURN, 0)
    long_arguments = [TURN[0], call_message(("c", "f", '{"a": "' + "x" * 95 + '"}')), result("c", "r"), TURN[1]]
    assert fit_history(long_arguments + TURN, ["q"], limits) == (TURN, 1)  # the call is over 100 characters


def test_tool_messages_go_to_a_tool_model_as_they_are_and_not_to_others():
    from dataclasses import replace

    from model_runtime.protocol import Message, ToolCall

    backend = RecordingBackend()
    list(stream_answer(backend, TOOL_TURN, "and tomorrow?", SamplingParams(), ActiveStreams(), "s", 0))
    assert backend.requests[-1].messages == (Message("user", TOOL_TURN[0]["content"]),
                                            Message("assistant", TOOL_TURN[4]["content"]), Message("user", "and tomorrow?"))
    backend.info = replace(RecordingBackend.info, supports_tools=True)
    list(stream_answer(backend, TOOL_TURN, "and tomorrow?", SamplingParams(), ActiveStreams(), "s", 0))
    sent = backend.requests[-1].messages
    assert sent[1] == Message("assistant", "Let me look.", (ToolCall("call_1", "get_weather", '{"city": "北京"}'),
                                                            ToolCall("call_2", "get_weather", '{"city": "上海"}')))
    assert sent[2] == Message("tool", TOOL_TURN[2]["content"], tool_call_id="call_2")
    assert sent[3] == Message("tool", '{"sky": "sunny"}', tool_call_id="call_1") and len(sent) == 6
    assert not backend.requests[-1].tools, "the page declares no tools: the model answers in text"


def test_read_export_round_trips_tool_calls_and_results(tmp_path):
    path = export_file(tmp_path, conversation_json(TOOL_TURN + TURN, "glm-4-9b-chat"))
    assert read_export(path.read_bytes(), Limits()) == TOOL_TURN + TURN
    agent_run = json.loads(path.read_text())
    agent_run["messages"][1]["content"] = None  # what the openai client keeps of a call without text
    path.write_text(json.dumps(agent_run))
    assert read_export(path.read_bytes(), Limits())[1] == {**TOOL_TURN[1], "content": ""}


@pytest.mark.parametrize("messages, reason", [
    ([TOOL_TURN[0], TOOL_TURN[1], TOOL_TURN[2], TOOL_TURN[4]], "message 1 is out of place"),  # call_1 unanswered
    ([TOOL_TURN[0], result("call_1", "x"), TURN[1]], "message 1 is out of place"),
    ([*TOOL_TURN[:4]], "last message must be an answer"),
    ([TURN[0], {**TOOL_TURN[1], "name": "x"}, *TOOL_TURN[2:]], "message 1 must be"),
    ([TURN[0], {**TOOL_TURN[2], "name": "get_weather"}, TURN[1]], "message 1 must be"),
    ([TURN[0], {**TOOL_TURN[2], "tool_call_id": "../x"}, TURN[1]], "message 1 must be"),
    ([TURN[0], {**TOOL_TURN[2], "content": None}, TURN[1]], "message 1 must be"),
    ([TURN[0], {"role": "tool", "content": "x"}, TURN[1]], "message 1 must be"),
    ([TURN[0], {"role": "assistant", "content": None}], "message 1 must be"),
])
def test_read_export_refuses_misplaced_or_malformed_tool_messages(tmp_path, messages, reason):
    with pytest.raises(ImportRefused, match=reason):
        read_export(export_file(tmp_path, json.dumps({"messages": messages})).read_bytes(), Limits())


def test_read_export_counts_tool_arguments_against_the_limits(tmp_path):
    turn = [TURN[0], call_message(("c", "f", '{"a": "' + "x" * 60 + '"}')), result("c", "r"), TURN[1]]
    with pytest.raises(ImportRefused, match="at most 50"):
        read_export(export_file(tmp_path, json.dumps({"messages": turn})).read_bytes(), Limits(max_message_chars=50))


def test_the_models_title_is_kept_and_the_users_wins():
    stored = {"version": 1, "current": "0" * 16, "chats": [
        {"id": "0" * 16, "title": "", "auto_title": " Weather\nin  Beijing ", "settings": {}, "messages": list(TURN)},
        {"id": "1" * 16, "title": "Mine", "auto_title": "Theirs", "settings": {}, "messages": list(TURN)},
        {"id": "2" * 16, "title": "", "settings": {}, "messages": list(TURN)}]}
    library = read(stored)
    assert library.choices("New chat") == [("Weather in Beijing", "0" * 16), ("Mine", "1" * 16), ("q", "2" * 16)]
    assert read(library.to_value()).to_value() == library.to_value()
    assert "auto_title" not in library.to_value()["chats"][2]  # absent when there is none
    assert [clean_title(reply) for reply in ('Title: "Weather in Beijing"', "《北京天气》\nmore", "**Palindromes**.",
                                             "  \n", "x" * 100)] == [
        "Weather in Beijing", "北京天气", "Palindromes", "", "x" * (MAX_TITLE_CHARS - 1) + "…"]
