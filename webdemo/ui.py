"""The chat page: Gradio Blocks layout and its events, talking only to a ChatBackend.

State lives in the browser: the conversations are one `gr.BrowserState` (local storage,
library.py), so each browser has its own, a reload or a server restart keeps them (the
encryption key is kept, storage_key.py), and the server keeps nothing per user between turns.
Every event reads that value as hostile input and checks its size caps. The chat window shows
an escaped copy of the open conversation (see render.py); tool calls and results (a chat imported
from an agent run's JSON) show as collapsed messages and go back to a model that calls tools as
they are. The page declares no tools and runs none.

Events: Send/Enter, an example, the Chatbot's own retry and edit events stream an answer from
one generator; the Chatbot's undo and clear events, Reset, New chat, switching, Delete and
Import change the library. Stop cancels the model's work through `ActiveStreams` (the answer
then ends itself and keeps its text); anything that changes which conversation is open or what
it holds also abandons the answer (Gradio's `cancels` drops a queued or running handler, and
one still running writes nothing more).
After each change the HTML/JSON downloads are rewritten (exports.py: in server-named folders;
the client's session hash is only ever a dictionary key). The same answer loop is also a public
API endpoint, `/chat`, for `gradio_client`. Both check a conversation against limits.py before
submitting it, as /v1 does.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import gradio as gr

from model_runtime.protocol import ChatBackend, EngineBusy, InvalidRequest

from .access import CLIENT_HEADER
from .conversation import (ActiveStreams, Progress, answer_message, check_message, check_settings, clean_history,
                           failure, fit_history, has_tool_messages, message_text, readout, stream_answer)
from .exports import SessionExports
from .i18n import PAGE_TEXTS, pick_language, say
from .importing import MAX_IMPORT_BYTES, ImportRefused, decode_upload, read_export
from .library import (ANSWER_RESERVE_BYTES, MAX_CONVERSATIONS, Library, LibraryInvalid, empty_library, imported_chat,
                      json_bytes, read_library, store_limit)
from .limits import LimitExceeded, Limits
from .render import (LATEX_DELIMITERS, chat_message, conversation_html, conversation_json, thinking_message,
                     tool_arguments_text, tool_message)
from .sealed_store import StoreSeal, StoreUnreadable
from .storage_key import sealing_secret
from .storage_key import storage_secret as kept_storage_secret

STORE_INTERVAL_S = 2.0  # while an answer streams, the sealed library is rewritten at most this often
STORAGE_KEY = "chatglm-webdemo-conversation"  # the one-chat page's key: a chat it kept opens as one conversation

EXAMPLES = [
    {"text": "用三句话介绍一下你自己。"},
    {"text": "写一首关于秋天的五言绝句。"},
    {"text": "Explain the Pythagorean theorem with a formula."},
    {"text": "Write a Python function that checks whether a string is a palindrome."},
]

CSS = """
.gradio-container { max-width: min(1180px, 100%) !important; margin: 0 auto !important; }
#title { gap: 0; }
#title h1 { margin: 0; }
#title p { margin: .2rem 0 0; color: var(--body-text-color-subdued); }
#random-notice { border-left: 4px solid #f0b429; padding-left: .8rem; }
#readout { min-height: 1.5em; }
#readout p { margin: 0; font-size: var(--text-sm) !important; color: var(--body-text-color-subdued) !important; }
#chatbot .message pre { white-space: pre; overflow-x: auto; max-width: 100%; }
#chatbot .message-content { overflow-wrap: anywhere; }
/* flex items grow to their content's width unless allowed to shrink: a long code line would
   widen the whole page on a phone (its pre scrolls instead) */
.gradio-container, .gradio-container .main, .gradio-container .wrap, .gradio-container .contain, #layout,
#chatbot .wrapper, #chatbot .bubble-wrap, #chatbot .message-row, #chatbot .flex-wrap, #chatbot .message {
  min-width: 0 !important;
}
#conversations .wrap { flex-direction: column; gap: .25rem; }
#conversations label { width: 100%; min-width: 0; }
#conversations label span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
}
"""

# Gradio's page has no viewport tag: a phone would lay it out 980 px wide and zoom out.
HEAD = '<meta name="viewport" content="width=device-width, initial-scale=1">'

# Import: the browser reads the picked file and sends its first MAX_IMPORT_BYTES + 1 bytes as base64
# in place of the hidden input's value (so the server sees a file that is too big, and says so).
PICK_IMPORT_JS = """async (_, ...rest) => {
  const input = Object.assign(document.createElement("input"), {type: "file", accept: ".json,application/json"});
  input.style.display = "none";
  document.body.appendChild(input);
  const file = await new Promise((resolve) => {
    input.addEventListener("change", () => resolve(input.files[0] || null));
    input.addEventListener("cancel", () => resolve(null));
    input.click();
  });
  input.remove();
  if (!file) return [null, ...rest];
  const bytes = new Uint8Array(await file.slice(0, %d).arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return [btoa(binary), ...rest];
}""" % (MAX_IMPORT_BYTES + 1)

FOCUS_MESSAGE_BOX = "() => { document.querySelector('#message textarea')?.focus(); }"

THEME = gr.themes.Soft(font=["system-ui", "-apple-system", "Segoe UI", "Noto Sans CJK SC", "PingFang SC",
                             "Microsoft YaHei", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Noto Sans Mono CJK SC",
                                  "monospace"])


@dataclass
class ChatPage:
    """The built page and what `launch()` needs alongside it (i18n, CSS and theme are launch
    options in Gradio 6)."""

    blocks: gr.Blocks
    backend: ChatBackend
    active: ActiveStreams
    exports: SessionExports
    concurrency_limit: Optional[int] = None
    launch_options: dict = field(default_factory=dict)

    def launch(self, queue_size: Optional[int] = None, app: Optional[Any] = None, **kwargs) -> Any:
        """`Blocks.launch(**kwargs)` with the page's options. app: a Gradio `App` to serve the page
        from, prepared before the server starts (server.py's, with the access gate and the API in
        front); routes added after launch would race the first requests."""
        self.blocks.queue(max_size=queue_size)
        options = {**self.launch_options, **kwargs}
        if self.concurrency_limit:
            options.setdefault("max_threads", self.concurrency_limit + 16)
        return self.blocks.launch(_app=app, **options)

    def close(self) -> None:
        self.blocks.close()
        self.exports.close()


def _language(request: Optional[gr.Request]) -> str:
    headers = getattr(request, "headers", None) or {}
    return pick_language(headers.get("accept-language"))


def _session(request: Optional[gr.Request]) -> str:
    """The caller's session hash, as a dictionary key only. A call without one gets a key of its
    own, so that no other caller can stop its answer (a heartbeat names the session it ends)."""
    return getattr(request, "session_hash", None) or f"no-session-{secrets.token_hex(16)}"


def _client(request: Optional[gr.Request]) -> Optional[str]:
    """Who sent the request, as the access gate wrote it (access.CLIENT_HEADER), for per-client
    shares; None where no gate stands in front (the page built alone, in tests)."""
    headers = getattr(request, "headers", None) or {}
    return headers.get(CLIENT_HEADER.decode())


def _refusal(message: str) -> gr.Error:
    """An error for the API caller, without a traceback in the server log (it is expected)."""
    return gr.Error(message, print_exception=False)


def _heading(model_name: str) -> str:
    """The page title the family's own demos use, from the model's name."""
    name = model_name.lower()
    for prefix, heading in (("chatglm-6b", "ChatGLM-6B"), ("chatglm2-6b", "ChatGLM2-6B"),
                            ("chatglm3-6b", "ChatGLM3-6B"), ("glm-4-9b", "GLM-4-9B")):
        if name.startswith(prefix):
            return heading
    return model_name


def _display(history: list[dict], lang: str, pending: bool = False) -> list[dict]:
    """Chat-window messages (see _rows)."""
    return [shown for _, shown in _rows(history, lang, pending)]


def _rows(history: list[dict], lang: str, pending: bool = False) -> list[tuple[int, dict]]:
    """Chat-window messages, each with the index of the stored message it shows. An empty answer
    shows as an ellipsis while it runs (pending), else as a note that there was none (stopped
    before its first word). A tool call message shows its text, if any, then each call, and a
    tool result shows as one message: collapsed, titled with the tool's name. Shown only: the
    page runs no tool. A reasoning model's thinking shows above its answer, collapsed and titled
    (running until the answer's first word)."""
    rows = []
    names: dict[str, str] = {}  # call id -> tool name, for the results
    for number, message in enumerate(history):
        calls = message.get("tool_calls", ())
        if message.get("reasoning"):
            running = pending and number == len(history) - 1 and not message["content"]
            rows.append((number, thinking_message(say(lang, "thinking_running" if running else "thinking"),
                                                  message["reasoning"])))
        if message["role"] == "tool":
            name = names.get(message["tool_call_id"], "?")
            rows.append((number, tool_message(say(lang, "tool_result", name=name), message["content"])))
        elif message["role"] == "assistant" and not message["content"] and not calls:
            running = pending and number == len(history) - 1
            note = "…" if running else ("_（没有回答）_" if lang == "zh" else "_(no answer)_")
            rows.append((number, {"role": "assistant", "content": {"type": "text", "text": note}}))
        elif message["content"]:
            rows.append((number, chat_message(message["role"], message["content"])))
        for call in calls:
            name = names[call["id"]] = call["function"]["name"]
            rows.append((number, tool_message(say(lang, "tool_called", name=name),
                                              tool_arguments_text(call["function"]["arguments"]), "json")))
    return rows


def _event_index(event: Optional[gr.EventData]) -> Optional[int]:
    """The message index a Chatbot event names, if it is a plain integer (the client sends it)."""
    data = getattr(event, "_data", None)
    index = data.get("index") if isinstance(data, dict) else None
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def _event_text(event: Optional[gr.EventData]) -> Optional[str]:
    """The new text of an edit event, if it is text."""
    data = getattr(event, "_data", None)
    value = data.get("value") if isinstance(data, dict) else None
    if isinstance(value, dict):
        value = value.get("text")
    return value if isinstance(value, str) else None


def _stored_index(messages: list[dict], shown_index: Optional[int]) -> Optional[int]:
    """The index of the stored message that the chat-window message at `shown_index` (a Chatbot
    event's index) shows, or None."""
    rows = _rows(messages, "en")
    return rows[shown_index][0] if shown_index is not None and 0 <= shown_index < len(rows) else None


def _user_message_at(messages: list[dict], shown_index: Optional[int]) -> Optional[int]:
    """The stored index of the user message that starts the turn holding the chat-window
    message at `shown_index`, or None."""
    index = _stored_index(messages, shown_index)
    while index is not None and messages[index]["role"] != "user":  # stored chats are whole turns
        index -= 1
    return index


def build_page(backend: ChatBackend, *, concurrency_limit: Optional[int] = 64, title: Optional[str] = None,
               storage_secret: Optional[str] = None, sealing_key: Optional[str] = None,
               limits: Limits = Limits()) -> ChatPage:
    """The chat page for `backend`. concurrency_limit: answers streaming at once (the engine
    batches them; None means no limit). sealing_key: the key stored chats are sealed with
    (sealed_store.py); storage_secret: Gradio's public browser-side wrapper around them; both by
    default random ones kept in the user's cache folder (storage_key.py), so that chats survive a
    restart. limits: what one conversation may hold, and its time limit;
    its body limit also caps what the browser may keep (library.store_limit)."""
    info = backend.info
    limit = info.max_sequence_length
    defaults = info.default_sampling
    default_length = min(defaults.max_length, limit)
    default_settings = {"max_length": default_length, "top_p": defaults.top_p, "temperature": defaults.temperature,
                        "system": ""}
    store_bytes = store_limit(limits.max_body_bytes)
    seal = StoreSeal(sealing_key or sealing_secret())
    active = ActiveStreams()
    files = SessionExports()
    salt_key = secrets.token_bytes(32)
    busy, idle = gr.update(interactive=False), gr.update(interactive=True)
    view_outputs: list = []  # what `view` fills, once the layout exists

    def cache_salt(kind: str, session: str) -> str:
        """KV-cache reuse only within one session: a salt its hash decides, that no one can
        compute for another session without this process's key."""
        digest = hmac.new(salt_key, session.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return f"{kind}:{digest}"

    def exports(history: list[dict], session: str) -> tuple:
        """Rewrite this session's HTML and JSON downloads (or disable them for an empty chat)."""
        if not history:
            return gr.update(value=None, interactive=False), gr.update(value=None, interactive=False)
        html_path, json_path = files.write(session, conversation_html(history, info.name),
                                           conversation_json(history, info.name))
        return gr.update(value=str(html_path), interactive=True), gr.update(value=str(json_path), interactive=True)

    def settings_valid(settings: dict) -> bool:
        try:
            check_settings(settings["max_length"], settings["top_p"], settings["temperature"], limit)
        except (ValueError, InvalidRequest):
            return False
        return isinstance(settings["system"], str) and len(settings["system"]) <= limits.max_message_chars

    def read(value: Any, request: Optional[gr.Request] = None) -> Library:
        """The library a browser sent (hostile input: see library.read_library): a sealed token
        (sealed_store.py), or a plain value kept before sealing. One this server cannot open, or
        of the wrong shape, becomes a new library, and the page says so when `request` is given."""
        try:
            if isinstance(value, str):
                value = seal.open(value, store_bytes)
            return read_library(value, max_messages=limits.max_messages, max_chars=limits.max_message_chars,
                                defaults=default_settings, settings_valid=settings_valid)
        except (StoreUnreadable, LibraryInvalid):
            if request is not None:
                gr.Warning(say(_language(request), "store_unreadable"))
            return empty_library(dict(default_settings))

    def keep(library: Library) -> str:
        """The library as the browser keeps it: sealed."""
        return seal.seal(library.to_value())

    def keep_settings(library: Library, max_length, top_p, temperature, system) -> dict:
        """Save the page's settings in the open chat (unless they are invalid); what it has now."""
        settings = {"max_length": max_length, "top_p": top_p, "temperature": temperature,
                    "system": system if isinstance(system, str) else ""}
        if settings_valid(settings):
            library.current.settings = settings
        return library.current.settings

    def chat_list(library: Library, lang: str) -> dict:
        return gr.update(choices=library.choices(say(lang, "untitled")), value=library.current_id)

    def view(library: Library, request: gr.Request) -> tuple:
        """Everything the page shows of the open chat, and the library to keep (in view_outputs' order)."""
        lang, chat = _language(request), library.current
        settings = chat.settings
        return (_display(chat.messages, lang), chat_list(library, lang), gr.update(value=chat.title),
                settings["max_length"], settings["top_p"], settings["temperature"], settings["system"], "",
                *exports(chat.messages, _session(request)), keep(library))

    def fitted(history: list[dict], cut: bool, fixed: list[str], lang: str) -> Optional[list[dict]]:
        """The newest turns of a stored chat that fit the limits with the `fixed` messages (a
        toast says that older ones were removed), or None with a toast if those alone do not."""
        try:
            kept, dropped = fit_history(history, fixed, limits)
        except LimitExceeded as error:
            gr.Warning(say(lang, "invalid", error=error))
            return None
        if dropped or cut:
            gr.Warning(say(lang, "trimmed"))
        return kept

    def answer(library: Library, history: list[dict], query: str, max_length, top_p, temperature, system,
               request: gr.Request, restore: str) -> Iterator[tuple]:
        """Stream one answer to `query` after `history` in the open chat (whose messages from
        there on it replaces). Yields the STREAMED outputs. A refusal leaves everything as it was."""
        lang, chat = _language(request), library.current
        original = chat.messages
        unchanged = (gr.skip(), _display(original, lang)) + (gr.skip(),) * 7
        try:
            params = check_settings(max_length, top_p, temperature, limit, lang, defaults)
        except (ValueError, InvalidRequest) as error:
            gr.Warning(str(error))
            yield unchanged
            return
        system = system if info.supports_system_prompt and isinstance(system, str) else ""
        history = fitted(history, chat.cut, ([system] if system.strip() else []) + [query], lang)
        if history is None:
            yield unchanged
            return
        keep_settings(library, max_length, top_p, temperature, system)
        if not info.supports_tools and has_tool_messages(history):
            gr.Info(say(lang, "tools_left_out"))
        turn = history + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        chat.messages, chat.cut = turn, False
        empty_answer_size = library.size()
        if empty_answer_size > store_bytes - ANSWER_RESERVE_BYTES:
            gr.Warning(say(lang, "store_full", used=empty_answer_size // 1024, limit=store_bytes // 1024))
            yield unchanged
            return
        session = _session(request)
        active.stop(session, abandon=True)  # a new answer replaces any other of this page
        started = active.begin()
        shown_before = _display(turn[:-1], lang)  # unchanged while the answer streams
        locked = gr.update(value="", interactive=False)  # free again in finish()
        yield (locked, _display(turn, lang, pending=True), keep(library), "", busy, idle, busy, busy,
               chat_list(library, lang))
        updates = stream_answer(backend, history, query, params, active, session, started, system,
                                deadline_s=limits.request_timeout_s, cache_salt=cache_salt("page", session),
                                client=_client(request))
        progress, stored_at = Progress(), time.monotonic()
        try:
            for progress in updates:
                if active.abandoned_after(session, started):  # another answer or conversation owns the page:
                    yield (gr.skip(),) * 9  # the last yield is sent again when the event completes
                    return
                if empty_answer_size + json_bytes(progress.text) + json_bytes(progress.reasoning) - 2 > store_bytes:
                    gr.Warning(say(lang, "answer_cut_store"))
                    return
                chat.messages = turn[:-1] + [answer_message(progress.text, progress.reasoning)]
                shown = shown_before + _display(chat.messages[-1:], lang, pending=not progress.finished)
                store_now = progress.finished or time.monotonic() - stored_at >= STORE_INTERVAL_S
                stored_at = time.monotonic() if store_now else stored_at
                yield (gr.skip(), shown, keep(library) if store_now else gr.skip(),
                       readout(progress, params.max_length, lang)) + (gr.skip(),) * 5
        except (InvalidRequest, EngineBusy) as error:
            # A toast, not gr.Error: an error would mark every output "Error" and skip .then().
            gr.Warning(say(lang, "refused_busy", reason=error) if isinstance(error, EngineBusy)
                       else say(lang, "invalid", error=error))
            chat.messages = original
            yield (restore, _display(original, lang), keep(library), "") + (gr.skip(),) * 4 \
                + (chat_list(library, lang),)
            return
        finally:
            updates.close()  # cancels the request in the backend unless it has ended
        if progress.finish_reason == "error":  # cut off (time limit, shutdown) or failed: never complete
            gr.Warning(failure(progress, lang))

    def checked_message(message: Any, lang: str) -> Optional[str]:
        try:
            return check_message(message, lang, limits.max_message_chars)
        except ValueError as error:
            gr.Warning(str(error))
            return None

    def respond(message: str, stored: Any, max_length: float, top_p: float, temperature: float, system: str,
                request: gr.Request):
        if not isinstance(message, str) or not message.strip() or checked_message(message, _language(request)) is None:
            return
        library = read(stored, request)
        yield from answer(library, library.current.messages, message, max_length, top_p, temperature, system,
                          request, restore=message)

    def example(stored: Any, max_length: float, top_p: float, temperature: float, system: str,
                event: gr.EventData, request: gr.Request):
        """An example prompt (one of EXAMPLES, picked by index: the text is the server's own)."""
        index = _event_index(event)
        if index is None or not 0 <= index < len(EXAMPLES):
            return
        library = read(stored, request)
        yield from answer(library, library.current.messages, EXAMPLES[index]["text"], max_length, top_p,
                          temperature, system, request, restore="")

    def retry(stored: Any, max_length: float, top_p: float, temperature: float, system: str,
              event: gr.EventData, request: gr.Request):
        """The Chatbot's retry: answer the turn's question again (later turns are dropped)."""
        library = read(stored, request)
        messages = library.current.messages
        start = _user_message_at(messages, _event_index(event))
        if start is None:
            gr.Warning(say(_language(request), "no_message"))
            return
        yield from answer(library, messages[:start], messages[start]["content"], max_length, top_p, temperature,
                          system, request, restore="")

    def edit(stored: Any, max_length: float, top_p: float, temperature: float, system: str,
             event: gr.EventData, request: gr.Request):
        """The Chatbot's edit of a user message: the turns after it are dropped and it is answered."""
        lang, library = _language(request), read(stored, request)
        messages = library.current.messages
        index, text = _stored_index(messages, _event_index(event)), _event_text(event)
        if index is None or messages[index]["role"] != "user":
            gr.Warning(say(lang, "no_message"))
            yield (gr.skip(), _display(messages, lang)) + (gr.skip(),) * 7
            return
        if checked_message(text, lang) is None:
            yield (gr.skip(), _display(messages, lang)) + (gr.skip(),) * 7
            return
        yield from answer(library, messages[:index], text, max_length, top_p, temperature, system, request,
                          restore="")

    def finish(stored: Any, request: gr.Request):
        """After an answer (finished, stopped or failed): free the input, rewrite the downloads."""
        return (idle, idle, busy, idle, idle) + exports(read(stored).current.messages, _session(request))

    def undo(stored: Any, event: gr.EventData, request: gr.Request):
        """The Chatbot's undo: drop the turn (and those after it); its question goes back in the box."""
        library = read(stored, request)
        messages = library.current.messages
        start = _user_message_at(messages, _event_index(event))
        if start is None:
            return (gr.skip(),) * 7
        library.current.messages = messages[:start]
        lang, session = _language(request), _session(request)
        active.stop(session, abandon=True)
        return (messages[start]["content"], _display(messages[:start], lang), keep(library), "",
                chat_list(library, lang)) + exports(messages[:start], session)

    def stop(request: gr.Request):
        active.stop(_session(request))

    def changed(stored: Any, request: gr.Request, change) -> tuple:
        """Apply `change(library, lang)` to the browser's library; unless it returns False (refused:
        the page stays as it was), stop this page's answer (one stopped writes nothing more) and
        show the result."""
        library = read(stored, request)
        if change(library, _language(request)) is False:
            return (gr.skip(),) * len(view_outputs)
        active.stop(_session(request), abandon=True)
        return view(library, request)

    def new_chat(stored: Any, max_length, top_p, temperature, system, request: gr.Request):
        def change(library: Library, lang: str):
            if library.current.messages and len(library.chats) >= MAX_CONVERSATIONS:
                gr.Warning(say(lang, "too_many_chats", limit=MAX_CONVERSATIONS))
                return False
            library.new_chat(dict(keep_settings(library, max_length, top_p, temperature, system)))
        return changed(stored, request, change)

    def switch(chat_id: Any, stored: Any, max_length, top_p, temperature, system, request: gr.Request):
        def change(library: Library, lang: str):
            keep_settings(library, max_length, top_p, temperature, system)
            library.switch(chat_id)
        return changed(stored, request, change)

    def delete(stored: Any, max_length, top_p, temperature, system, request: gr.Request):
        def change(library: Library, lang: str):
            library.delete(dict(keep_settings(library, max_length, top_p, temperature, system)))
        return changed(stored, request, change)

    def reset(stored: Any, max_length, top_p, temperature, system, request: gr.Request):
        def change(library: Library, lang: str):
            keep_settings(library, max_length, top_p, temperature, system)
            library.current.messages = []
        return changed(stored, request, change)

    def import_file(encoded: Any, stored: Any, max_length, top_p, temperature, system, request: gr.Request):
        """A conversation from a JSON download, opened as a new chat (refused: nothing changes).
        encoded: the file's bytes in base64, read by the browser (PICK_IMPORT_JS); None if none was picked."""
        def change(library: Library, lang: str):
            if not isinstance(encoded, str):
                return False
            try:
                messages = read_export(decode_upload(encoded), limits)
            except ImportRefused as error:
                gr.Warning(say(lang, "import_refused", error=error))
                return False
            if len(library.chats) >= MAX_CONVERSATIONS:
                gr.Warning(say(lang, "too_many_chats", limit=MAX_CONVERSATIONS))
                return False
            library.add(imported_chat(messages, dict(keep_settings(library, max_length, top_p, temperature, system))))
            used = library.size()
            if used > store_bytes - ANSWER_RESERVE_BYTES:
                gr.Warning(say(lang, "store_full", used=used // 1024, limit=store_bytes // 1024))
                return False
        return changed(stored, request, change)

    def rename(title: Any, stored: Any, request: gr.Request):
        """Name the open chat ("" names it after its first message again). Not while it answers
        (the controls are disabled then): the answer's next write would undo it."""
        library = read(stored, request)
        library.rename(title)
        return chat_list(library, _language(request)), gr.update(value=library.current.title), keep(library)

    def restore(stored: Any, request: gr.Request):
        """Page load: show the open conversation kept in this browser."""
        library = read(stored, request)
        if library.current.cut:
            gr.Warning(say(_language(request), "trimmed"))
        shown = view(library, request)
        if stored is None:  # a new browser: leave the settings alone (someone may be setting them already)
            shown = shown[:3] + (gr.skip(),) * 4 + shown[7:]
        return shown

    def session_closed(request: gr.Request):
        session = _session(request)
        active.forget(session)
        files.forget(session)

    def chat(message: str, history: list, max_length: int = default_length, top_p: float = defaults.top_p,
             temperature: float = defaults.temperature, system: str = "", request: gr.Request = None) -> str:
        """Stream an answer to `message`. history: [[user, answer], ...] pairs or
        [{"role", "content"}, ...] messages, tool calls and results in OpenAI's shape included
        (sent to models that call tools; none is run here); system: a system prompt (for models
        that take one).
        Yields the whole answer so far. A conversation over the limits is refused, as on /v1."""
        lang = _language(request)
        if not isinstance(message, str) or not message.strip():
            raise _refusal(say(lang, "empty"))
        if not isinstance(history, list):
            raise _refusal(say(lang, "history"))
        try:
            params = check_settings(max_length, top_p, temperature, limit, lang, defaults)
        except (ValueError, InvalidRequest) as error:
            raise _refusal(str(error))
        if not isinstance(system, str) or not info.supports_system_prompt:
            system = ""
        if len(history) > limits.max_messages:  # each item is at least one message: refused unread
            raise _refusal(say(lang, "too_many", count=len(history), limit=limits.max_messages))
        turns = clean_history(history, limits.max_messages)
        try:
            limits.check_conversation(([system] if system.strip() else []) + [message_text(m) for m in turns]
                                      + [message])
        except LimitExceeded as error:
            raise _refusal(str(error))
        session = _session(request)
        try:
            for progress in stream_answer(backend, turns, message, params, active, session, active.begin(), system,
                                          deadline_s=limits.request_timeout_s, cache_salt=cache_salt("api", session),
                                          client=_client(request)):
                if progress.finish_reason == "error":
                    raise _refusal(failure(progress, lang))
                yield progress.text
        except EngineBusy as error:
            raise _refusal(say(lang, "refused_busy", reason=error))
        except InvalidRequest as error:
            raise _refusal(say(lang, "invalid", error=error))

    def stats() -> dict:
        """The backend's counters (requests, tokens/s, queue) plus answers streaming to pages."""
        return {**backend.stats(), "streams_open": active.count()}

    t = PAGE_TEXTS
    title = title or _heading(info.name)
    with gr.Blocks(title=title, fill_height=False, delete_cache=(86400, 86400)) as blocks:
        stored = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=storage_secret or kept_storage_secret())
        with gr.Column(elem_id="title"):
            gr.Markdown(f"# {title}")
            gr.Markdown(t("subtitle"))
            if info.fine_tunes:  # what the operator loaded on top of the base model
                gr.Markdown(" · ".join(info.fine_tunes), elem_id="fine-tunes")
        if info.random_weights:
            gr.Markdown(t("random_notice"), elem_id="random-notice")
        with gr.Row(equal_height=False, elem_id="layout"):
            with gr.Column(scale=4, min_width=280):  # first: on a phone the chat comes first
                chatbot = gr.Chatbot(elem_id="chatbot", show_label=False, height=500, autoscroll=True,
                                     latex_delimiters=LATEX_DELIMITERS, buttons=["copy", "copy_all"],
                                     feedback_options=None, allow_tags=False, placeholder=t("empty_chat"),
                                     editable="user", examples=EXAMPLES)
                with gr.Row(equal_height=True):
                    box = gr.Textbox(elem_id="message", show_label=False, placeholder=t("placeholder"),
                                     lines=1, max_lines=8, scale=8, min_width=160, autofocus=True,
                                     max_length=limits.max_message_chars)
                    send = gr.Button(t("send"), elem_id="send", variant="primary", scale=1, min_width=72)
                readout_md = gr.Markdown("", elem_id="readout")
                with gr.Row():
                    stop_btn = gr.Button(t("stop"), elem_id="stop", size="sm", interactive=False, min_width=60)
                    reset_btn = gr.Button(t("reset"), elem_id="reset", size="sm", min_width=60)
            with gr.Column(scale=1, min_width=250):
                with gr.Accordion(t("conversations"), open=True, elem_id="conversations-panel"):
                    new_btn = gr.Button(t("new_chat"), elem_id="new-chat", size="sm", variant="primary")
                    chats = gr.Radio([], label=t("conversations"), show_label=False, elem_id="conversations", container=False)
                    with gr.Row(equal_height=True):
                        title_box = gr.Textbox(show_label=False, placeholder=t("title"), lines=1,
                                               max_lines=1, elem_id="chat-title", scale=3, min_width=120,
                                               container=False, max_length=200)
                        rename_btn = gr.Button(t("rename"), elem_id="rename", size="sm", scale=1, min_width=60)
                    with gr.Row():
                        delete_btn = gr.Button(t("delete_chat"), elem_id="delete-chat", size="sm", variant="stop",
                                               min_width=60)
                        import_btn = gr.Button(t("import_json"), elem_id="import", size="sm", min_width=60)
                        import_data = gr.Textbox(visible=False, elem_id="import-data")
                    download_html = gr.DownloadButton(t("download_html"), elem_id="download-html", size="sm",
                                                      interactive=False)
                    download_json = gr.DownloadButton(t("download_json"), elem_id="download-json", size="sm",
                                                      interactive=False)
                with gr.Accordion(t("settings"), open=False, elem_id="settings"):
                    max_length = gr.Slider(1, limit, value=default_length, step=1, label=t("max_length"),
                                           info=t("max_length_info"), elem_id="max-length")
                    top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label=t("top_p"), elem_id="top-p")
                    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.01, label=t("temperature"),
                                            info=t("temperature_info"), elem_id="temperature")
                    system_box = gr.Textbox(label=t("system_prompt"), lines=3, max_lines=8, elem_id="system-prompt",
                                            visible=info.supports_system_prompt, max_length=limits.max_message_chars)

        settings = [max_length, top_p, temperature, system_box]
        view_outputs[:] = [chatbot, chats, title_box, *settings, readout_md, download_html, download_json, stored]
        streamed = [box, chatbot, stored, readout_md, send, stop_btn, title_box, rename_btn, chats]
        after = [box, send, stop_btn, title_box, rename_btn, download_html, download_json]
        stream_options = dict(concurrency_limit=concurrency_limit, concurrency_id="answers",
                              show_progress="minimal", api_visibility="private")
        answering = [trigger(respond, [box, stored] + settings, streamed, **stream_options)
                     for trigger in (box.submit, send.click)]
        answering += [trigger(handler, [stored] + settings, streamed, **stream_options)
                      for trigger, handler in ((chatbot.retry, retry), (chatbot.edit, edit),
                                               (chatbot.example_select, example))]
        for event in answering:  # .then() runs after a finished, stopped or failed answer alike
            event.then(finish, [stored], after, api_visibility="private").then(None, js=FOCUS_MESSAGE_BOX)
        private = dict(api_visibility="private")
        stop_btn.click(stop, None, None, queue=False, **private)  # the answer ends itself, keeping its text
        chatbot.undo(undo, [stored], [box, chatbot, stored, readout_md, chats, download_html, download_json],
                     cancels=answering, **private)
        for trigger, handler in ((new_btn.click, new_chat), (delete_btn.click, delete), (reset_btn.click, reset),
                                 (chatbot.clear, reset)):
            trigger(handler, [stored] + settings, view_outputs, cancels=answering, **private)
        chats.input(switch, [chats, stored] + settings, view_outputs, cancels=answering, **private)
        import_btn.click(import_file, [import_data, stored] + settings, view_outputs, js=PICK_IMPORT_JS, **private)
        for trigger in (title_box.submit, rename_btn.click):
            trigger(rename, [title_box, stored], [chats, title_box, stored], **private)
        blocks.load(restore, [stored], view_outputs, **private)
        blocks.unload(session_closed)
        gr.api(chat, api_name="chat", concurrency_limit=concurrency_limit, concurrency_id="answers")
        gr.api(stats, api_name="stats", queue=False)

    return ChatPage(blocks, backend, active, files, concurrency_limit,
                    launch_options=dict(i18n=PAGE_TEXTS, css=CSS, theme=THEME, head=HEAD))
