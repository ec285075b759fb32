"""webdemo.ui.build_page in-process: on the real Engine with the tiny checkpoint, and on a
recording backend for what the page sends (limits, deadline, cache salt) and shows (cut-off
answers)."""
import base64
import json
import threading
import time
import urllib.request
from contextlib import contextmanager

import httpx
import pytest

from model_runtime.protocol import ChatEvent, ModelInfo, SamplingParams
from tests.browser.app_server import free_port
from tests.test_security_paths import run_event
from webdemo.importing import MAX_IMPORT_BYTES
from webdemo.limits import Limits
from webdemo.sealed_store import TOKEN_PREFIX, StoreSeal, StoreUnreadable

SEALING_KEY = "test-sealing-key"


@pytest.fixture(scope="module")
def engine(tiny_model):
    from model_runtime.serving.engine import Engine

    tokenizer, model = tiny_model
    engine = Engine(tokenizer, model, slots=2)
    yield engine
    engine.close()


def test_page_serves_and_close_removes_its_files(engine):
    from webdemo.ui import build_page

    page = build_page(engine, concurrency_limit=4)
    port = free_port()
    page.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        assert page.exports.root.path.is_dir()
    finally:
        page.close()
    assert not page.exports.root.path.exists()


class RecordingBackend:
    """Answers "partial answer" and then ends with `finish_reason`; keeps every request."""

    info = ModelInfo("recording-model", max_sequence_length=64, default_sampling=SamplingParams(max_length=64))

    def __init__(self):
        self.requests = []
        self.finish_reason, self.error = "stop", None
        self._lock = threading.Lock()

    def submit(self, request):
        with self._lock:
            self.requests.append(request)
        events = [ChatEvent("delta", request.request_id, "partial answer", "partial answer", prompt_tokens=3,
                            completion_tokens=2),
                  ChatEvent("done", request.request_id, text="partial answer", prompt_tokens=3, completion_tokens=2,
                            finish_reason=self.finish_reason, error=self.error)]

        class Stream:
            request_id = request.request_id

            def __iter__(self):
                return iter(events)

            def cancel(self):
                pass

        return Stream()

    def cancel(self, request_id):
        pass

    def stats(self):
        return {}

    def health(self):
        return None

    def close(self, drain_s=0.0):
        pass


@contextmanager
def recording_page(backend, limits: Limits = Limits(), **options):
    """The page on `backend` (a recording backend), served on 127.0.0.1: yields its URL."""
    from webdemo.ui import build_page

    page = build_page(backend, concurrency_limit=4, limits=limits, storage_secret="test-secret",
                      sealing_key=SEALING_KEY, **options)
    port = free_port()
    page.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


LIMITS = Limits(max_messages=5, max_message_chars=50, max_conversation_chars=120, request_timeout_s=42.0)


@pytest.fixture(scope="module")
def recorded():
    """(backend, base URL) of a page on the recording backend, with small limits."""
    backend = RecordingBackend()
    with recording_page(backend, LIMITS) as url:
        yield backend, url


def page_event(url: str, api_name: str, data: list, session: str) -> list:
    with httpx.Client(base_url=url, timeout=30) as client:
        config = client.get("/config").json()
        (dependency,) = [d for d in config["dependencies"] if d.get("api_name") == api_name]
        return run_event(client, dependency, data, session)


def send(url: str, stored: list, message: str, session: str) -> list:
    """The page's Send with this stored chat; the event's messages."""
    return page_event(url, "respond", [message, stored, 64, 0.7, 0.95, ""], session)


def warnings(messages: list) -> list[str]:
    return [m["log"] for m in messages if isinstance(m, dict) and m.get("msg") == "log"]


def last_outputs(messages: list) -> list:
    return [m for m in messages if isinstance(m, dict) and m.get("msg") == "process_completed"][-1]["output"]["data"]


def opened(stored: str) -> dict:
    """A library the page sent back, unsealed with the page's key."""
    return StoreSeal(SEALING_KEY).open(stored, 1 << 24)


def pairs(count: int) -> list[dict]:
    return [{"role": role, "content": f"{role[0]}{n}"} for n in range(count) for role in ("user", "assistant")]


def test_page_sends_the_deadline_and_a_salt_of_its_session_only(recorded):
    backend, url = recorded
    backend.requests.clear()
    for session in ("session-one", "session-one", "session-two"):
        send(url, [], "hello", session)
    salts = [request.cache_salt for request in backend.requests]
    assert salts[0] == salts[1] != salts[2] and all(s.startswith("page:") for s in salts)
    assert not any("session" in s for s in salts)  # derived with a server key, not the hash itself
    assert {request.deadline_s for request in backend.requests} == {42.0}


def test_api_salt_differs_per_client(recorded):
    from gradio_client import Client

    backend, url = recorded
    backend.requests.clear()
    one, two = Client(url, verbose=False), Client(url, verbose=False)
    for client in (one, one, two):
        client.predict("hello", [], api_name="/chat")
    salts = [request.cache_salt for request in backend.requests]
    assert salts[0] == salts[1] != salts[2] and all(s.startswith("api:") for s in salts)


def test_page_trims_a_stored_chat_over_the_limits_with_a_note(recorded):
    backend, url = recorded
    backend.requests.clear()
    messages = send(url, pairs(3), "hello", "trim-session")  # 6 stored + 1 new > 5 messages
    sent = backend.requests[-1].messages
    assert [m.content for m in sent] == ["u1", "a1", "u2", "a2", "hello"]
    assert any("oldest turns were removed" in text for text in warnings(messages))
    (stored,) = opened(last_outputs(messages)[2])["chats"]  # a bare message list is read as one conversation
    assert [m["content"] for m in stored["messages"]] == ["u1", "a1", "u2", "a2", "hello", "partial answer"]


def test_page_refuses_a_message_over_the_limits(recorded):
    backend, url = recorded
    backend.requests.clear()
    messages = send(url, [], "x" * 51, "long-session")
    assert not backend.requests and any("at most 50" in text for text in warnings(messages))


def test_api_refuses_a_conversation_over_the_limits(recorded):
    from gradio_client import Client

    backend, url = recorded
    backend.requests.clear()
    client = Client(url, verbose=False)
    for history, words in [([["q", "a"]] * 3, "7 messages; at most 5"),
                           ([["q", "a"]] * 6, "more than 6 messages; at most 5"),
                           ([["q" * 51, "a"]], "message 0 is 51 characters long; at most 50"),
                           ([["q" * 40, "a" * 40]], "is 121 characters long; at most 120")]:
        with pytest.raises(Exception, match=words):
            client.predict("x" * 41 if "121" in words else "hello", history, api_name="/chat")
    assert not backend.requests
    assert client.predict("hello", [["q", "a"]], api_name="/chat") == "partial answer"


def test_a_cut_off_answer_shows_as_cut_off(recorded):
    from gradio_client import Client

    backend, url = recorded
    backend.finish_reason, backend.error = "error", "the time limit was reached"
    try:
        messages = send(url, [], "hello", "cut-session")
        readout = last_outputs(messages)[3]
        assert "cut off and is incomplete: the time limit was reached" in str(readout)
        assert any("cut off" in text for text in warnings(messages))
        with pytest.raises(Exception, match="cut off and is incomplete"):
            Client(url, verbose=False).predict("hello", [], api_name="/chat")
    finally:
        backend.finish_reason, backend.error = "stop", None


def library(*chats: list[dict]) -> dict:
    """A stored library value of these chats (the first open)."""
    ids = [f"{n:016x}" for n in range(len(chats))]
    return {"version": 1, "current": ids[0],
            "chats": [{"id": i, "title": "", "settings": {}, "messages": m} for i, m in zip(ids, chats)]}


@pytest.fixture(scope="module")
def small_store():
    """(backend, URL) of a page whose body limit leaves its browsers a small store."""
    backend = RecordingBackend()
    limits = Limits(max_body_bytes=186_000)  # store: 69 750 bytes; an answer starts below 69 750 - 65 536
    with recording_page(backend, limits) as url:
        yield backend, url


def test_a_full_store_refuses_a_new_answer_and_changes_nothing(small_store):
    backend, url = small_store
    backend.requests.clear()
    small = library([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 1000}])
    messages = send(url, small, "hello", "roomy-session")
    assert len(backend.requests) == 1 and not warnings(messages)
    full = library(*[[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 1000}]] * 5)
    messages = send(url, full, "hello", "full-session")
    assert len(backend.requests) == 1, "refused before the model saw it"
    assert any("storage for conversations is full" in text for text in warnings(messages))
    assert not any(isinstance(out, str) and out.startswith(TOKEN_PREFIX) for out in last_outputs(messages)), \
        "store unchanged"


def test_at_most_twenty_conversations(small_store):
    _, url = small_store
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    config = httpx.get(url + "config").json()
    (new_chat,) = [d for d in config["dependencies"] if d.get("api_name") == "new_chat"]
    with httpx.Client(base_url=url, timeout=30) as client:
        messages = run_event(client, new_chat, [library(*[turn] * 20), 64, 0.7, 0.95, ""], "cap-session")
        assert any("At most 20 conversations" in text for text in warnings(messages))
        messages = run_event(client, new_chat, [library(*[turn] * 19), 64, 0.7, 0.95, ""], "cap-session")
        stored = opened(last_outputs(messages)[-1])
        assert len(stored["chats"]) == 20 and stored["chats"][0]["messages"] == [] and not warnings(messages)


def test_import_never_reads_a_path_the_client_names(small_store, tmp_path):
    _, url = small_store
    secret = tmp_path / "secret.json"
    secret.write_text('{"messages": [{"role": "user", "content": "SECRET-CANARY"}, '
                      '{"role": "assistant", "content": "x"}]}')
    config = httpx.get(url + "config").json()
    (importer,) = [d for d in config["dependencies"] if d.get("api_name") == "import_file"]
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in (str(secret), "../" * 8 + str(secret)[1:],
                     {"path": str(secret), "orig_name": "x.json", "meta": {"_type": "gradio.FileData"}}):
            messages = run_event(client, importer, [path, library([]), 64, 0.7, 0.95, ""], "import-session")
            assert "SECRET-CANARY" not in json.dumps(messages)
            (completed,) = [m for m in messages if isinstance(m, dict) and m.get("msg") == "process_completed"]
            assert not completed["success"] or not any(isinstance(out, str) and out.startswith(TOKEN_PREFIX)
                                                       for out in completed["output"]["data"]), "nothing imported"


def test_import_takes_the_file_bytes_the_browser_read(small_store):
    _, url = small_store
    export = {"messages": [{"role": "user", "content": "从文件来"}, {"role": "assistant", "content": "好"}]}
    encoded = base64.b64encode(json.dumps(export).encode()).decode()
    config = httpx.get(url + "config").json()
    (importer,) = [d for d in config["dependencies"] if d.get("api_name") == "import_file"]
    with httpx.Client(base_url=url, timeout=30) as client:
        messages = run_event(client, importer, [encoded, library([]), 64, 0.7, 0.95, ""], "import-bytes")
        stored = opened(last_outputs(messages)[-1])
        assert stored["chats"][0]["messages"] == export["messages"] and len(stored["chats"]) == 2
        too_big = base64.b64encode(b" " * (MAX_IMPORT_BYTES + 1)).decode()
        messages = run_event(client, importer, [too_big, library([]), 64, 0.7, 0.95, ""], "import-bytes")
        assert any("larger than 256 KiB" in text for text in warnings(messages))


TOOL_CHAT = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "<img src=x onerror=alert(1)>"},
    {"role": "assistant", "content": "Sunny."},
]


@pytest.fixture(scope="module")
def tool_page():
    """(backend, URL) of a page on a recording backend of a model that calls tools."""
    from dataclasses import replace

    backend = RecordingBackend()
    backend.info = replace(RecordingBackend.info, supports_tools=True)
    with recording_page(backend) as url:
        yield backend, url


def test_the_page_shows_tool_calls_collapsed_and_sends_them_back_as_they_are(tool_page):
    backend, url = tool_page
    backend.requests.clear()
    messages = send(url, library(TOOL_CHAT), "and tomorrow?", "tool-session")
    (request,) = backend.requests
    assert [(m.role, m.tool_call_id, [c.name for c in m.tool_calls]) for m in request.messages] == [
        ("user", None, []), ("assistant", None, ["get_weather"]), ("tool", "call_1", []), ("assistant", None, []),
        ("user", None, [])]
    assert not request.tools  # the page declares no tools and runs none
    shown = last_outputs(messages)[1]
    titles = [(m.get("metadata") or {}).get("title") for m in shown]
    assert titles == [None, "🛠 Called `get_weather`", "📎 Result of `get_weather`", None, None, None]
    assert {m["metadata"]["status"] for m in shown if m.get("metadata")} == {"done"}
    assert "```\n<img src=x onerror=alert(1)>\n```" in json.dumps(shown, ensure_ascii=False).replace("\\n", "\n")
    stored = opened(last_outputs(messages)[2])["chats"][0]["messages"]
    assert stored[:4] == TOOL_CHAT and stored[4:] == [{"role": "user", "content": "and tomorrow?"},
                                                      {"role": "assistant", "content": "partial answer"}]


def test_retry_on_a_shown_tool_message_answers_its_turn_again(tool_page):
    backend, url = tool_page
    backend.requests.clear()
    config = httpx.get(url + "config").json()
    (retry,) = [d for d in config["dependencies"] if d.get("api_name") == "retry"]
    with httpx.Client(base_url=url, timeout=30) as client:
        # shown: weather?, its call's text, the call, the result, Sunny. (index 4), second?, its answer
        chat = [TOOL_CHAT[0], {**TOOL_CHAT[1], "content": "Let me look."}, *TOOL_CHAT[2:],
                {"role": "user", "content": "second?"}, {"role": "assistant", "content": "a"}]
        body_event = {"index": 4, "value": "Sunny."}
        trigger = (retry.get("targets") or [[None]])[0][0]
        joined = client.post("/gradio_api/queue/join", json={
            "data": [library(chat), 64, 0.7, 0.95, ""], "fn_index": retry["id"],
            "trigger_id": trigger, "session_hash": "retry-session", "event_data": body_event})
        assert joined.status_code == 200
        with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": "retry-session"}) as stream:
            deadline = time.monotonic() + 30
            for line in stream.iter_lines():
                assert time.monotonic() < deadline, "the retry did not complete"
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                    break
    (request,) = backend.requests
    assert [m.content for m in request.messages] == ["weather?"]  # the first turn, asked again


def test_a_model_without_tools_gets_each_turn_without_its_calls_and_says_so(recorded):
    backend, url = recorded
    backend.requests.clear()
    messages = send(url, library(TOOL_CHAT), "ok", "no-tools-session")
    assert [(m.role, m.content) for m in backend.requests[-1].messages] == [
        ("user", "weather?"), ("assistant", "Sunny."), ("user", "ok")]
    assert any("cannot call tools" in text for text in warnings(messages))


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings_in(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


def test_stored_chats_are_sealed_with_a_key_no_visitor_gets(recorded):
    """What the browser keeps is opaque: no message text in it, and neither the BrowserState
    secret Gradio serves in /config nor any other string a visitor is sent opens it."""
    _, url = recorded
    messages = send(url, library([]), "机密 canary-text", "sealed-session")
    token = last_outputs(messages)[2]
    assert token.startswith(TOKEN_PREFIX) and "canary" not in token
    assert opened(token)["chats"][0]["messages"][0]["content"] == "机密 canary-text"
    config = httpx.get(url + "config").json()
    served = strings_in(config)
    assert SEALING_KEY not in json.dumps(config) and "test-secret" in served  # Gradio's wrapper is public
    for candidate in served:
        with pytest.raises(StoreUnreadable):
            StoreSeal(candidate).open(token, 1 << 20)


def test_an_altered_or_foreign_store_becomes_a_new_library_with_one_message(recorded):
    backend, url = recorded
    token = last_outputs(send(url, library([]), "keep me", "altered-session"))[2]
    altered = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]
    other_key = StoreSeal("the key before it was replaced").seal(library([{"role": "user", "content": "old"}]))
    tampered = {"version": 1, "current": ["not", "an", "id"], "chats": [{"id": "00000000000000aa", "messages": []}]}
    for stored in (altered, other_key, "sealed-v1.!!!", tampered, {"chats": [{"title": 7}]}, 12):
        for api_name, data in (("new_chat", [stored, 64, 0.7, 0.95, ""]), ("restore", [stored]),
                               ("rename", ["t", stored])):
            messages = page_event(url, api_name, data, "altered-session")
            (completed,) = [m for m in messages if isinstance(m, dict) and m.get("msg") == "process_completed"]
            assert completed["success"], (stored, api_name, completed)  # no exception, no traceback
            assert [text for text in warnings(messages) if "could not be read" in text], (stored, api_name)
            fresh = opened(next(out for out in completed["output"]["data"]
                                if isinstance(out, str) and out.startswith(TOKEN_PREFIX)))
            assert len(fresh["chats"]) == 1 and fresh["chats"][0]["messages"] == []
    requests_before = len(backend.requests)
    messages = send(url, tampered, "hello", "altered-session")  # the answer goes on in a new library
    assert len(backend.requests) == requests_before + 1
    assert opened(last_outputs(messages)[2])["chats"][0]["messages"][0]["content"] == "hello"


def test_a_new_chat_is_named_by_the_model_beside_its_first_answer_unless_the_user_named_it():
    backend = RecordingBackend()
    with recording_page(backend, auto_titles=True) as url:
        messages = send(url, library([]), "What is the weather in Beijing?", "title-session")
        asked = [r for r in backend.requests if "title" in r.messages[-1].content]
        assert len(asked) == 1 and "What is the weather in Beijing?" in asked[0].messages[-1].content
        assert asked[0].sampling.temperature == 0.0 and asked[0].sampling.max_new_tokens
        (chat,) = opened(last_outputs(messages)[2])["chats"]
        assert chat["auto_title"] == "partial answer" and chat["title"] == ""  # the recording model's reply
        assert [m["content"] for m in chat["messages"]] == ["What is the weather in Beijing?", "partial answer"]
        backend.requests.clear()
        named = {"version": 1, "current": "0" * 16,
                 "chats": [{"id": "0" * 16, "title": "Mine", "settings": {}, "messages": []}]}
        for stored in (named, last_outputs(messages)[2]):  # named by the user; a second turn
            send(url, stored, "and tomorrow?", "title-session")
        assert not [r for r in backend.requests if "title" in r.messages[-1].content]
