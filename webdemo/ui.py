"""The chat page: Gradio Blocks layout and its events, talking only to a ChatBackend.

State lives in the browser: the conversation is a `gr.BrowserState` (local storage), so each
browser has its own chat, a reload keeps it, and the server keeps nothing per user between
turns. The chat window shows an escaped copy of it (see render.py).

Events: Send/Enter and Regenerate stream an answer from a generator; Stop cancels the model's
work through `ActiveStreams` (and Gradio's `cancels` drops a queued or running handler); Undo and
Reset edit the stored conversation; after each change the HTML/JSON downloads are rewritten
(exports.py: in server-named folders; the client's session hash is only ever a dictionary key).
The same answer loop is also a public API endpoint, `/chat`, for `gradio_client`. Both check
a conversation against limits.py before submitting it, as /v1 does.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import gradio as gr

from model_runtime.protocol import ChatBackend, EngineBusy, InvalidRequest

from . import hf_spaces
from .conversation import (ActiveStreams, Progress, check_message, check_settings, clean_history, failure,
                           fit_history, readout, stream_answer)
from .exports import SessionExports
from .i18n import PAGE_TEXTS, pick_language, say
from .limits import LimitExceeded, Limits
from .render import LATEX_DELIMITERS, chat_message, conversation_html, conversation_json
from .storage_key import storage_secret as kept_storage_secret

STORAGE_KEY = "chatglm-webdemo-conversation"

CSS = """
.gradio-container { max-width: 1180px !important; margin: 0 auto !important; }
#title { gap: 0; }
#title h1 { margin: 0; }
#title p { margin: .2rem 0 0; color: var(--body-text-color-subdued); }
#random-notice { border-left: 4px solid #f0b429; padding-left: .8rem; }
#readout { min-height: 1.5em; }
#readout p { margin: 0; font-size: var(--text-sm) !important; color: var(--body-text-color-subdued) !important; }
#chatbot .message pre { white-space: pre; }
"""

FOCUS_MESSAGE_BOX = "() => { document.querySelector('#message textarea')?.focus(); }"

THEME = gr.themes.Soft(font=["system-ui", "-apple-system", "Segoe UI", "PingFang SC", "Microsoft YaHei",
                             "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


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
    """Chat-window messages. An empty answer shows as an ellipsis while it runs (pending),
    else as a note that there was none (stopped before its first word)."""
    shown = []
    for number, message in enumerate(history):
        if message["role"] == "assistant" and not message["content"]:
            running = pending and number == len(history) - 1
            note = "…" if running else ("_（没有回答）_" if lang == "zh" else "_(no answer)_")
            shown.append({"role": "assistant", "content": {"type": "text", "text": note}})
        else:
            shown.append(chat_message(message["role"], message["content"]))
    return shown


def build_page(backend: ChatBackend, *, concurrency_limit: Optional[int] = 64, title: Optional[str] = None,
               storage_secret: Optional[str] = None, limits: Limits = Limits()) -> ChatPage:
    """The chat page for `backend`. concurrency_limit: answers streaming at once (the engine
    batches them; None means no limit). storage_secret: key of the browser-side encryption of
    stored chats; by default a random one kept in the user's cache folder (storage_key.py), so
    that chats survive a restart. limits: what one conversation may hold, and its time limit."""
    info = backend.info
    limit = info.max_sequence_length
    defaults = info.default_sampling
    default_length = min(defaults.max_length, limit)
    active = ActiveStreams()
    files = SessionExports()
    salt_key = secrets.token_bytes(32)
    busy, idle = gr.update(interactive=False), gr.update(interactive=True)

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

    def read_stored(value: Any) -> tuple[list[dict], bool]:
        """A conversation from a browser, cleaned, and whether older items were left unread
        (they would not fit the limits anyway)."""
        return clean_history(value, limits.max_messages), isinstance(value, list) and len(value) > limits.max_messages

    def fitted(history: list[dict], unread: bool, fixed: list[str], lang: str, note: bool = True) -> Optional[list[dict]]:
        """The newest turns of a stored chat that fit the limits with the `fixed` messages (a
        toast says that older ones were removed), or None with a toast if those alone do not."""
        try:
            kept, dropped = fit_history(history, fixed, limits)
        except LimitExceeded as error:
            gr.Warning(say(lang, "invalid", error=error))
            return None
        if note and (dropped or unread):
            gr.Warning(say(lang, "trimmed"))
        return kept

    def stored_chat(value: Any, lang: str, note: bool) -> list[dict]:
        """The newest turns of a stored chat that fit the limits (with no new message, some do)."""
        return fitted(*read_stored(value), [], lang, note)

    def answer(history: list[dict], unread: bool, query: str, max_length, top_p, temperature, system,
               request: gr.Request, restore: str) -> Iterator[tuple]:
        """Stream one answer to `query` after `history` (unread: older turns were not read).
        Yields (message box, chat window, stored conversation, readout, send, stop, regenerate,
        undo, reset)."""
        lang = _language(request)
        try:
            params = check_settings(max_length, top_p, temperature, limit, lang, defaults)
        except (ValueError, InvalidRequest) as error:
            gr.Warning(str(error))
            return
        system = system if info.supports_system_prompt and isinstance(system, str) else ""
        history = fitted(history, unread, ([system] if system.strip() else []) + [query], lang)
        if history is None:
            return
        session = _session(request)
        started = active.begin()
        turn = history + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        shown_before = _display(turn[:-1], lang)  # unchanged while the answer streams
        locked = gr.update(value="", interactive=False)  # free again in finish()
        yield (locked, _display(turn, lang, pending=True), turn, "", busy, idle, busy, busy, busy)
        try:
            updates = stream_answer(backend, history, query, params, active, session, started, system,
                                    deadline_s=limits.request_timeout_s, cache_salt=cache_salt("page", session))
            progress = Progress()
            for progress in updates:
                turn = turn[:-1] + [{"role": "assistant", "content": progress.text}]
                shown = shown_before + _display(turn[-1:], lang, pending=not progress.finished)
                yield (gr.skip(), shown, turn,
                       readout(progress, params.max_length, lang)) + (gr.skip(),) * 5
        except (InvalidRequest, EngineBusy) as error:
            # A toast, not gr.Error: an error would mark every output "Error" and skip .then().
            gr.Warning(say(lang, "busy") if isinstance(error, EngineBusy) else say(lang, "invalid", error=error))
            yield (restore, _display(history, lang), history, "") + (gr.skip(),) * 5
            return
        if progress.finish_reason == "error":  # cut off (time limit, shutdown) or failed: never complete
            gr.Warning(failure(progress, lang))

    @hf_spaces.gpu_task
    def respond(message: str, history: Any, max_length: float, top_p: float, temperature: float, system: str,
                request: gr.Request):
        history, unread = read_stored(history)
        if not isinstance(message, str) or not message.strip():
            return
        try:
            check_message(message, _language(request), limits.max_message_chars)
        except ValueError as error:
            gr.Warning(str(error))
            return
        yield from answer(history, unread, message, max_length, top_p, temperature, system, request, restore=message)

    @hf_spaces.gpu_task
    def regenerate(history: Any, max_length: float, top_p: float, temperature: float, system: str,
                   request: gr.Request):
        history, unread = read_stored(history)
        if not history:
            return
        query = history[-2]["content"]
        yield from answer(history[:-2], unread, query, max_length, top_p, temperature, system, request, restore="")

    def finish(history: Any, request: gr.Request):
        """After an answer (finished, stopped or failed): free the input, rewrite the downloads."""
        history = stored_chat(history, _language(request), note=False)
        return (idle, idle, busy, idle, idle, idle) + exports(history, _session(request))

    def undo(history: Any, request: gr.Request):
        history = stored_chat(history, _language(request), note=False)
        if not history:
            return (gr.skip(),) * 6
        last_query = history[-2]["content"]
        history = history[:-2]
        return (last_query, _display(history, _language(request)), history, "") + exports(history, _session(request))

    def reset(request: gr.Request):
        session = _session(request)
        active.stop(session)
        return ("", [], [], "") + exports([], session)

    def stop(request: gr.Request):
        active.stop(_session(request))

    def restore(history: Any, request: gr.Request):
        """Page load: show the conversation kept in this browser."""
        history = stored_chat(history, _language(request), note=True)
        return (_display(history, _language(request)), history) + exports(history, _session(request))

    def session_closed(request: gr.Request):
        session = _session(request)
        active.forget(session)
        files.forget(session)

    @hf_spaces.gpu_task
    def chat(message: str, history: list, max_length: int = default_length, top_p: float = defaults.top_p,
             temperature: float = defaults.temperature, system: str = "", request: gr.Request = None) -> str:
        """Stream an answer to `message`. history: [[user, answer], ...] pairs or
        [{"role", "content"}, ...] messages; system: a system prompt (for models that take one).
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
            limits.check_conversation(([system] if system.strip() else []) + [m["content"] for m in turns] + [message])
        except LimitExceeded as error:
            raise _refusal(str(error))
        session = _session(request)
        try:
            for progress in stream_answer(backend, turns, message, params, active, session, active.begin(), system,
                                          deadline_s=limits.request_timeout_s, cache_salt=cache_salt("api", session)):
                if progress.finish_reason == "error":
                    raise _refusal(failure(progress, lang))
                yield progress.text
        except EngineBusy:
            raise _refusal(say(lang, "busy"))
        except InvalidRequest as error:
            raise _refusal(say(lang, "invalid", error=error))

    def stats() -> dict:
        """The backend's counters (requests, tokens/s, queue) plus answers streaming to pages."""
        return {**backend.stats(), "streams_open": active.count()}

    t = PAGE_TEXTS
    title = title or _heading(info.name)
    with gr.Blocks(title=title, fill_height=False, delete_cache=(86400, 86400)) as blocks:
        stored = gr.BrowserState([], storage_key=STORAGE_KEY, secret=storage_secret or kept_storage_secret())
        with gr.Column(elem_id="title"):
            gr.Markdown(f"# {title}")
            gr.Markdown(t("subtitle"))
        if info.random_weights:
            gr.Markdown(t("random_notice"), elem_id="random-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(elem_id="chatbot", show_label=False, height=500, autoscroll=True,
                                     latex_delimiters=LATEX_DELIMITERS, buttons=["copy", "copy_all"],
                                     feedback_options=None, allow_tags=False, placeholder=t("empty_chat"))
                with gr.Row(equal_height=True):
                    box = gr.Textbox(elem_id="message", show_label=False, placeholder=t("placeholder"),
                                     lines=1, max_lines=8, scale=8, autofocus=True, max_length=limits.max_message_chars)
                    send = gr.Button(t("send"), elem_id="send", variant="primary", scale=1, min_width=90)
                readout_md = gr.Markdown("", elem_id="readout")
                with gr.Row():
                    stop_btn = gr.Button(t("stop"), elem_id="stop", size="sm", interactive=False)
                    regen_btn = gr.Button(t("regenerate"), elem_id="regenerate", size="sm")
                    undo_btn = gr.Button(t("undo"), elem_id="undo", size="sm")
                    reset_btn = gr.Button(t("reset"), elem_id="reset", size="sm")
            with gr.Column(scale=1, min_width=250):
                max_length = gr.Slider(1, limit, value=default_length, step=1, label=t("max_length"),
                                       info=t("max_length_info"), elem_id="max-length")
                top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label=t("top_p"), elem_id="top-p")
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.01, label=t("temperature"),
                                        info=t("temperature_info"), elem_id="temperature")
                system_box = gr.Textbox(label=t("system_prompt"), lines=3, max_lines=8, elem_id="system-prompt",
                                        visible=info.supports_system_prompt, max_length=limits.max_message_chars)
                download_html = gr.DownloadButton(t("download_html"), elem_id="download-html", size="sm",
                                                  interactive=False)
                download_json = gr.DownloadButton(t("download_json"), elem_id="download-json", size="sm",
                                                  interactive=False)

        settings = [max_length, top_p, temperature, system_box]
        streamed = [box, chatbot, stored, readout_md, send, stop_btn, regen_btn, undo_btn, reset_btn]
        after = [box, send, stop_btn, regen_btn, undo_btn, reset_btn, download_html, download_json]
        stream_options = dict(concurrency_limit=concurrency_limit, concurrency_id="answers",
                              show_progress="minimal", api_visibility="private")
        answering = [trigger(respond, [box, stored] + settings, streamed, **stream_options)
                     for trigger in (box.submit, send.click)]
        answering.append(regen_btn.click(regenerate, [stored] + settings, streamed, **stream_options))
        for event in answering:  # .then() runs after a finished, stopped or failed answer alike
            event.then(finish, [stored], after, api_visibility="private").then(None, js=FOCUS_MESSAGE_BOX)
        stop_btn.click(stop, None, None, cancels=answering, queue=False, api_visibility="private")
        undo_btn.click(undo, [stored], [box, chatbot, stored, readout_md, download_html, download_json],
                       api_visibility="private")
        cleared = [box, chatbot, stored, readout_md, download_html, download_json]
        reset_btn.click(reset, None, cleared, cancels=answering, api_visibility="private")
        chatbot.clear(reset, None, cleared, cancels=answering, api_visibility="private")
        blocks.load(restore, [stored], [chatbot, stored, download_html, download_json], api_visibility="private")
        blocks.unload(session_closed)
        gr.api(chat, api_name="chat", concurrency_limit=concurrency_limit, concurrency_id="answers")
        gr.api(stats, api_name="stats", queue=False)

    return ChatPage(blocks, backend, active, files, concurrency_limit,
                    launch_options=dict(i18n=PAGE_TEXTS, css=CSS, theme=THEME))
