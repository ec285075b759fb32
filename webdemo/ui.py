"""The chat page: one class in the style of Gradio's ChatInterface, talking only to a ChatBackend.

`ChatPage` builds its components in `_build`, wires their events in `_wire`, and each event is a
method that returns (or, for an answer, yields) a dict of updates keyed by component, so adding
an output never shifts another. Settings live in page_settings.py, the conversations in
library.py, what the chat window shows in page_view.py, the look in page_assets.py and the
downloads in exports.py.

State lives in the browser: the conversations are one `gr.BrowserState`, sealed by this server
(sealed_store.py: `read` opens it, `keep` seals it), so each browser has its own, a reload or a
server restart keeps them, and the server keeps nothing per user between turns (the one
exception: a deleted chat, for a few seconds, so that Delete can be undone). Every event reads
what the browser sends as hostile input and checks its size caps. Text is escaped before it is
shown (render.py); tool calls and results only show. The page declares no tools and runs none.

Events: Send/Enter, an example, the Chatbot's retry and edit stream an answer from one generator
(Stop, in place of Send meanwhile, cancels it through `ActiveStreams`; the answer then ends
itself and keeps its text); anything that changes which conversation is open or what it holds
also abandons the answer. The controls stay disabled until the page load has shown what this
browser keeps, so nothing typed before is overwritten by it. The same answer loop is also a
public API endpoint, `/chat`, for `gradio_client`. Both check a conversation against limits.py
before submitting it, as /v1 does.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any, Iterator, Optional

import gradio as gr

from model_runtime.protocol import ChatBackend, EngineBusy, InvalidRequest

from .access import CLIENT_HEADER
from .chat_titles import TitleJob
from .conversation import (ActiveStreams, Progress, answer_message, check_message, check_settings, clean_history,
                           failure, fit_history, has_tool_messages, message_text, readout, stream_answer)
from .exports import SessionExports
from .i18n import PAGE_TEXTS, pick_language, say
from .importing import ImportRefused, decode_upload, read_export
from .library import (ANSWER_RESERVE_BYTES, MAX_CONVERSATIONS, Chat, Library, LibraryInvalid, empty_library,
                      imported_chat, json_bytes, read_library, store_limit)
from .limits import LimitExceeded, Limits
from .page_assets import (CLOSE_DRAWER_ON_PHONE, CSS, EXAMPLES, FOCUS_MESSAGE_BOX, HEAD, PICK_IMPORT_JS, THEME,
                          TOGGLE_SETTINGS)
from .page_settings import SettingsRules
from .page_view import display, event_index, event_text, heading, stored_index, user_message_at
from .render import LATEX_DELIMITERS, conversation_html, conversation_json
from .sealed_store import StoreSeal, StoreUnreadable
from .storage_key import sealing_secret
from .storage_key import storage_secret as kept_storage_secret

STORE_INTERVAL_S = 2.0  # while an answer streams, the sealed library is rewritten at most this often
STORAGE_KEY = "chatglm-webdemo-conversation"  # the one-chat page's key: a chat it kept opens as one conversation
UNDO_DELETE_S = 6.0  # how long a deleted chat can be brought back
TITLE_WAIT_S = 2.0  # how long a finished first answer waits for its chat's title before going without

BUSY, IDLE = gr.update(interactive=False), gr.update(interactive=True)


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


class ChatPage:
    """The page for one backend, and what `launch()` needs alongside it (i18n, CSS and theme are
    launch options in Gradio 6).

    concurrency_limit: answers streaming at once (the engine batches them; None: no limit).
    sealing_key: the key stored chats are sealed with (sealed_store.py); storage_secret: Gradio's
    public browser-side wrapper around them; both by default random ones kept in the user's
    cache folder (storage_key.py), so that chats survive a restart. limits: what one
    conversation may hold, and its time limit; its body limit also caps what the browser may
    keep (library.store_limit). auto_titles: name each new chat by asking the model for a title
    beside its first answer (chat_titles.py); off, chats are named after their first message."""

    def __init__(self, backend: ChatBackend, *, concurrency_limit: Optional[int] = 64, title: Optional[str] = None,
                 storage_secret: Optional[str] = None, sealing_key: Optional[str] = None,
                 limits: Limits = Limits(), auto_titles: bool = False):
        self.backend, self.info, self.limits = backend, backend.info, limits
        self.auto_titles = auto_titles
        self.rules = SettingsRules.for_model(backend.info, limits.max_message_chars)
        self.store_bytes = store_limit(limits.max_body_bytes)
        self.seal = StoreSeal(sealing_key or sealing_secret())
        self.active = ActiveStreams()
        self.exports = SessionExports()
        self.concurrency_limit = concurrency_limit
        self.title = title or heading(self.info.name)
        self.launch_options = dict(i18n=PAGE_TEXTS, css=CSS, theme=THEME, head=HEAD)
        self._salt_key = secrets.token_bytes(32)
        with gr.Blocks(title=self.title, fill_height=False, delete_cache=(86400, 86400)) as self.blocks:
            self._build(storage_secret or kept_storage_secret())
            self._wire()

    # ---- launching --------------------------------------------------------------------------

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

    # ---- components ---------------------------------------------------------------------------

    def _build(self, storage_secret: str) -> None:
        """Every component, in page order. The controls start disabled: `restore` frees them."""
        self.stored = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=storage_secret)
        self.deleted = gr.State(None)  # (place, chat) of the chat deleted last, in this server's memory
        self.undo_timer = gr.Timer(UNDO_DELETE_S, active=False)
        with gr.Sidebar(open=True, position="left", elem_id="sidebar", width=300):
            self._build_sidebar()
        with gr.Column(elem_id="main"):
            self._build_main()
        # Settings in a panel of their own, closed at first but built with the page (a closed
        # Accordion builds its sliders when opened, and their reset button then restores the
        # value they had at that moment, not the default).
        with gr.Sidebar(label=PAGE_TEXTS("settings"), open=False, position="right", elem_id="settings", width=320):
            self._build_settings()

    def _build_sidebar(self) -> None:
        t = PAGE_TEXTS
        self.new_btn = gr.Button(t("new_chat"), elem_id="new-chat", variant="primary", interactive=False)
        self.cap_note = gr.Markdown(visible=False, elem_id="cap-note")
        self.search = gr.Textbox(show_label=False, placeholder=t("search"), elem_id="chat-search", lines=1,
                                 max_lines=1, container=False, max_length=200)
        self.chats = gr.Radio([], label=t("conversations"), show_label=False, elem_id="conversations",
                              container=False)
        with gr.Row(equal_height=True):
            self.title_box = gr.Textbox(show_label=False, placeholder=t("title"), lines=1, max_lines=1,
                                        elem_id="chat-title", scale=3, min_width=120, container=False, max_length=200)
            self.rename_btn = gr.Button(t("rename"), elem_id="rename", size="sm", scale=1, min_width=60)
        with gr.Row():
            self.delete_btn = gr.Button(t("delete_chat"), elem_id="delete-chat", size="sm", variant="stop",
                                        min_width=60)
            self.undo_delete_btn = gr.Button(t("undo_delete"), elem_id="undo-delete", size="sm", visible=False,
                                             min_width=60)
            self.import_btn = gr.Button(t("import_json"), elem_id="import", size="sm", min_width=60)
            self.import_data = gr.Textbox(visible=False, elem_id="import-data")
        with gr.Row():
            self.download_html = gr.DownloadButton(t("download_html"), elem_id="download-html", size="sm",
                                                   interactive=False, min_width=60)
            self.download_json = gr.DownloadButton(t("download_json"), elem_id="download-json", size="sm",
                                                   interactive=False, min_width=60)

    def _build_settings(self) -> None:
        t, rules, defaults = PAGE_TEXTS, self.rules, self.rules.defaults
        self.max_length = gr.Slider(1, rules.limit, value=defaults["max_length"], step=1, label=t("max_length"),
                                    info=t("max_length_info"), elem_id="max-length", interactive=False)
        self.top_p = gr.Slider(0.01, 1.0, value=defaults["top_p"], step=0.01, label=t("top_p"), elem_id="top-p",
                               interactive=False)
        self.temperature = gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.01, label=t("temperature"),
                                     info=t("temperature_info"), elem_id="temperature", interactive=False)
        self.system_box = gr.Textbox(label=t("system_prompt"), lines=3, max_lines=8, elem_id="system-prompt",
                                     visible=self.info.supports_system_prompt, interactive=False,
                                     max_length=self.limits.max_message_chars)
        self.settings = [self.max_length, self.top_p, self.temperature, self.system_box]

    def _build_main(self) -> None:
        t = PAGE_TEXTS
        with gr.Column(elem_id="title"):
            gr.Markdown(f"# {self.title}")
            gr.Markdown(t("subtitle"))
            if self.info.fine_tunes:  # what the operator loaded on top of the base model
                gr.Markdown(" · ".join(self.info.fine_tunes), elem_id="fine-tunes")
        if self.info.random_weights:
            gr.Markdown(t("random_notice"), elem_id="random-notice")
        self.chatbot = gr.Chatbot(elem_id="chatbot", show_label=False, height=520, autoscroll=True,
                                  latex_delimiters=LATEX_DELIMITERS, buttons=["copy", "copy_all"],
                                  feedback_options=None, allow_tags=False, placeholder=t("empty_chat"),
                                  editable="user", examples=EXAMPLES)
        with gr.Row(equal_height=True, elem_id="composer"):
            self.box = gr.Textbox(elem_id="message", show_label=False, placeholder=t("placeholder"), lines=1,
                                  max_lines=8, scale=8, min_width=160, autofocus=True, interactive=False,
                                  max_length=self.limits.max_message_chars)
            self.send = gr.Button(t("send"), elem_id="send", variant="primary", scale=1, min_width=80,
                                  interactive=False)
            self.stop_btn = gr.Button(t("stop"), elem_id="stop", variant="stop", scale=1, min_width=80,
                                      visible=False)
        with gr.Row(equal_height=True, elem_id="below-chat"):
            self.readout_md = gr.Markdown("", elem_id="readout")
            self.settings_btn = gr.Button("⚙ " + t("settings"), elem_id="open-settings", size="sm", scale=0,
                                          min_width=100)
            self.reset_btn = gr.Button(t("reset"), elem_id="reset", size="sm", scale=0, min_width=80)

    # ---- events -------------------------------------------------------------------------------

    def _wire(self) -> None:
        """Every event: which method runs, what it reads and what it may update."""
        private = dict(api_visibility="private")
        view = self._view_outputs()
        answering = self._wire_answers()
        self.stop_btn.click(self.stop, None, None, queue=False, **private)  # the answer ends itself, keeping its text
        self.chatbot.undo(self.undo, [self.stored], [self.box, *view], cancels=answering, **private)
        changes = ((self.new_btn.click, self.new_chat), (self.reset_btn.click, self.reset),
                   (self.chatbot.clear, self.reset))
        for trigger, handler in changes:
            trigger(handler, [self.stored, *self.settings], view, cancels=answering, **private)
        for trigger, handler in ((self.chats.input, self.switch), (self.delete_btn.click, self.delete)):
            trigger(handler, [self.chats, self.stored, *self.settings], view, cancels=answering, **private)
        self.undo_delete_btn.click(self.undo_delete, [self.deleted, self.stored], view, cancels=answering, **private)
        self.undo_timer.tick(self.forget_deleted, None, [self.deleted, self.undo_delete_btn, self.undo_timer],
                             **private)
        self.import_btn.click(self.import_file, [self.import_data, self.stored, *self.settings], view,
                              js=PICK_IMPORT_JS, **private)
        for trigger in (self.title_box.submit, self.rename_btn.click):
            trigger(self.rename, [self.title_box, self.stored], [self.chats, self.title_box, self.stored,
                                                                  self.download_html, self.download_json], **private)
        self.search.change(self.search_titles, [self.search, self.stored], [self.chats], queue=False, **private)
        self.blocks.load(self.restore, [self.stored], [*view, self.box, self.send], **private)
        for trigger in (self.blocks.load, self.chats.input, self.new_btn.click):
            trigger(None, js=CLOSE_DRAWER_ON_PHONE)
        self.settings_btn.click(None, js=TOGGLE_SETTINGS)
        self.blocks.unload(self.session_closed)
        gr.api(self.chat, api_name="chat", concurrency_limit=self.concurrency_limit, concurrency_id="answers")
        gr.api(self.stats, api_name="stats", queue=False)

    def _view_outputs(self) -> list:
        """What showing a conversation updates; the sealed library last."""
        return [self.chatbot, self.chats, self.title_box, *self.settings, self.readout_md, self.download_html,
                self.download_json, self.new_btn, self.cap_note, self.search, self.deleted, self.undo_delete_btn,
                self.undo_timer, self.stored]

    def _wire_answers(self) -> list:
        """The events that stream an answer, each followed by `finish`; returns them (for `cancels`)."""
        streamed = [self.box, self.chatbot, self.stored, self.readout_md, self.send, self.stop_btn, self.title_box,
                    self.rename_btn, self.chats, self.search, self.new_btn, self.cap_note]
        after = [self.box, self.send, self.stop_btn, self.title_box, self.rename_btn, self.download_html,
                 self.download_json]
        options = dict(concurrency_limit=self.concurrency_limit, concurrency_id="answers", show_progress="minimal",
                       api_visibility="private")
        inputs = [self.stored, *self.settings]
        answering = [trigger(self.respond, [self.box, *inputs], streamed, **options)
                     for trigger in (self.box.submit, self.send.click)]
        answering += [trigger(handler, inputs, streamed, **options)
                      for trigger, handler in ((self.chatbot.retry, self.retry), (self.chatbot.edit, self.edit),
                                               (self.chatbot.example_select, self.example))]
        for event in answering:  # .then() runs after a finished, stopped or failed answer alike
            event.then(self.finish, [self.stored], after, api_visibility="private").then(None, js=FOCUS_MESSAGE_BOX)
        return answering

    # ---- the library as the browser keeps it --------------------------------------------------

    def read(self, value: Any, request: Optional[gr.Request] = None) -> Library:
        """The library a browser sent (hostile input: see library.read_library): a sealed token
        (sealed_store.py), or a plain value kept before sealing. One this server cannot open, or
        of the wrong shape, becomes a new library, and the page says so when `request` is given."""
        try:
            if isinstance(value, str):
                value = self.seal.open(value, self.store_bytes)
            return read_library(value, max_messages=self.limits.max_messages,
                                max_chars=self.limits.max_message_chars, defaults=self.rules.defaults,
                                settings_valid=self.rules.valid)
        except (StoreUnreadable, LibraryInvalid):
            if request is not None:
                gr.Warning(say(_language(request), "store_unreadable"))
            return empty_library(self.rules.fresh())

    def keep(self, library: Library) -> str:
        """The library as the browser keeps it: sealed."""
        return self.seal.seal(library.to_value())

    def _cache_salt(self, kind: str, session: str) -> str:
        """KV-cache reuse only within one session: a salt its hash decides, that no one can
        compute for another session without this process's key."""
        digest = hmac.new(self._salt_key, session.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return f"{kind}:{digest}"

    # ---- updates shared by the handlers -------------------------------------------------------

    def _downloads(self, chat: Chat, lang: str, session: str) -> dict:
        """This session's HTML and JSON downloads of `chat`, named after it (or disabled: empty)."""
        if not chat.messages:
            off = gr.update(value=None, interactive=False)
            return {self.download_html: off, self.download_json: off}
        title = chat.shown_title(say(lang, "untitled"))
        html_path, json_path = self.exports.write(session, conversation_html(chat.messages, self.info.name, title=title),
                                                  conversation_json(chat.messages, self.info.name), title)
        return {self.download_html: gr.update(value=str(html_path), interactive=True),
                self.download_json: gr.update(value=str(json_path), interactive=True)}

    def _chat_list(self, library: Library, lang: str) -> dict:
        """The conversation list (unfiltered) and New chat, refused at the cap with a note why."""
        can_start = library.can_start_chat()
        return {self.chats: gr.update(choices=library.choices(say(lang, "untitled")), value=library.current_id),
                self.search: "", self.new_btn: gr.update(interactive=can_start),
                self.cap_note: gr.update(value=say(lang, "too_many_chats", limit=MAX_CONVERSATIONS),
                                         visible=not can_start)}

    def _unchanged(self) -> dict:
        """No update (Gradio reads an empty dict as one value)."""
        return {self.stored: gr.skip()}

    def _view(self, library: Library, request: gr.Request) -> dict:
        """Everything the page shows of the open chat, and the library to keep."""
        lang, chat = _language(request), library.current
        settings = chat.settings
        return {self.chatbot: display(chat.messages, lang), **self._chat_list(library, lang),
                self.title_box: gr.update(value=chat.title), self.max_length: settings["max_length"],
                self.top_p: settings["top_p"], self.temperature: settings["temperature"],
                self.system_box: settings["system"], self.readout_md: "",
                **self._downloads(chat, lang, _session(request)), self.stored: self.keep(library)}

    def _changed(self, stored: Any, request: gr.Request, change) -> dict:
        """Apply `change(library, lang)` to the browser's library; unless it returns False (refused:
        the page stays as it was), stop this page's answer (one stopped writes nothing more) and
        show the result."""
        library = self.read(stored, request)
        if change(library, _language(request)) is False:
            return self._unchanged()
        self.active.stop(_session(request), abandon=True)
        return self._view(library, request)

    # ---- conversations ------------------------------------------------------------------------

    def restore(self, stored: Any, request: gr.Request) -> dict:
        """Page load: show the open conversation kept in this browser, then free the controls."""
        library = self.read(stored, request)
        if library.current.cut:
            gr.Warning(say(_language(request), "trimmed"))
        shown = self._view(library, request)
        return {**shown, self.box: IDLE, self.send: IDLE,
                **{setting: gr.update(value=shown[setting], interactive=True) for setting in self.settings}}

    def new_chat(self, stored: Any, max_length, top_p, temperature, system, request: gr.Request) -> dict:
        """Open an empty chat with the default settings (the open chat keeps its own)."""
        def change(library: Library, lang: str):
            self.rules.save(library, max_length, top_p, temperature, system)
            if not library.new_chat(self.rules.fresh()):
                gr.Warning(say(lang, "too_many_chats", limit=MAX_CONVERSATIONS))
                return False
        return self._changed(stored, request, change)

    def switch(self, chat_id: Any, stored: Any, max_length, top_p, temperature, system, request: gr.Request) -> dict:
        def change(library: Library, lang: str):
            self.rules.save(library, max_length, top_p, temperature, system)
            library.switch(chat_id)
        return self._changed(stored, request, change)

    def delete(self, chat_id: Any, stored: Any, max_length, top_p, temperature, system, request: gr.Request) -> dict:
        """Delete the chat selected in the list (the browser selects it at once, before the
        library it sends has heard of it), else the open one; Undo brings it back for
        UNDO_DELETE_S seconds."""
        removed = []

        def change(library: Library, lang: str):
            library.switch(chat_id)
            removed.append(library.delete(self.rules.fresh()))
        shown = self._changed(stored, request, change)
        return {**shown, self.deleted: removed[0], self.undo_delete_btn: gr.update(visible=True),
                self.undo_timer: gr.Timer(active=True)}

    def undo_delete(self, deleted: Any, stored: Any, request: gr.Request) -> dict:
        """Put the chat deleted last back where it was (it came from this server's memory)."""
        def change(library: Library, lang: str):
            if deleted is None or not library.undelete(*deleted):
                return False
        shown = self._changed(stored, request, change)
        return {**shown, **self.forget_deleted()}

    def forget_deleted(self) -> dict:
        return {self.deleted: None, self.undo_delete_btn: gr.update(visible=False),
                self.undo_timer: gr.Timer(active=False)}

    def reset(self, stored: Any, max_length, top_p, temperature, system, request: gr.Request) -> dict:
        def change(library: Library, lang: str):
            self.rules.save(library, max_length, top_p, temperature, system)
            library.current.messages, library.current.auto_title = [], ""  # that title named what is gone
        return self._changed(stored, request, change)

    def import_file(self, encoded: Any, stored: Any, max_length, top_p, temperature, system,
                    request: gr.Request) -> dict:
        """A conversation from a JSON download, opened as a new chat (refused: nothing changes).
        encoded: the file's bytes in base64, read by the browser (PICK_IMPORT_JS); None if none was picked."""
        def change(library: Library, lang: str):
            if not isinstance(encoded, str):
                return False
            try:
                messages = read_export(decode_upload(encoded), self.limits)
            except ImportRefused as error:
                gr.Warning(say(lang, "import_refused", error=error))
                return False
            if library.full():
                gr.Warning(say(lang, "too_many_chats", limit=MAX_CONVERSATIONS))
                return False
            self.rules.save(library, max_length, top_p, temperature, system)
            library.add(imported_chat(messages, self.rules.fresh()))
            used = library.size()
            if used > self.store_bytes - ANSWER_RESERVE_BYTES:
                gr.Warning(say(lang, "store_full", used=used // 1024, limit=self.store_bytes // 1024))
                return False
        return self._changed(stored, request, change)

    def rename(self, title: Any, stored: Any, request: gr.Request) -> dict:
        """Name the open chat ("" names it after its first message again). Not while it answers
        (the controls are disabled then): the answer's next write would undo it."""
        library, lang = self.read(stored, request), _language(request)
        library.rename(title)
        return {self.chats: gr.update(choices=library.choices(say(lang, "untitled")), value=library.current_id),
                self.title_box: gr.update(value=library.current.title), self.stored: self.keep(library),
                **self._downloads(library.current, lang, _session(request))}

    def search_titles(self, query: Any, stored: Any, request: gr.Request) -> dict:
        """Show only the chats whose title holds `query` (the open one stays selected if shown)."""
        library = self.read(stored)
        shown = library.matching(query, say(_language(request), "untitled"))
        selected = library.current_id if any(chat_id == library.current_id for _, chat_id in shown) else None
        return {self.chats: gr.update(choices=shown, value=selected)}

    def session_closed(self, request: gr.Request) -> None:
        session = _session(request)
        self.active.forget(session)
        self.exports.forget(session)

    # ---- answers ------------------------------------------------------------------------------

    def _fitted(self, history: list[dict], cut: bool, fixed: list[str], lang: str) -> Optional[list[dict]]:
        """The newest turns of a stored chat that fit the limits with the `fixed` messages (a
        toast says that older ones were removed), or None with a toast if those alone do not."""
        try:
            kept, dropped = fit_history(history, fixed, self.limits)
        except LimitExceeded as error:
            gr.Warning(say(lang, "invalid", error=error))
            return None
        if dropped or cut:
            gr.Warning(say(lang, "trimmed"))
        return kept

    def _checked_message(self, message: Any, lang: str) -> Optional[str]:
        try:
            return check_message(message, lang, self.limits.max_message_chars)
        except ValueError as error:
            gr.Warning(str(error))
            return None

    def _prepare(self, library: Library, history: list[dict], query: str, settings: tuple,
                 lang: str) -> Optional[tuple]:
        """(params, system, history) for an answer to `query`, with the turn stored in the open
        chat and its settings kept; None, with a toast and nothing changed, when it is refused."""
        chat = library.current
        try:
            params = check_settings(*settings[:3], self.rules.limit, lang, self.info.default_sampling)
        except (ValueError, InvalidRequest) as error:
            gr.Warning(str(error))
            return None
        system = settings[3] if self.info.supports_system_prompt and isinstance(settings[3], str) else ""
        history = self._fitted(history, chat.cut, ([system] if system.strip() else []) + [query], lang)
        if history is None:
            return None
        original = chat.messages, chat.cut, chat.settings
        self.rules.save(library, *settings[:3], system)
        chat.messages, chat.cut = history + [{"role": "user", "content": query}, answer_message("")], False
        used = library.size()
        if used > self.store_bytes - ANSWER_RESERVE_BYTES:
            gr.Warning(say(lang, "store_full", used=used // 1024, limit=self.store_bytes // 1024))
            chat.messages, chat.cut, chat.settings = original
            return None
        if not self.info.supports_tools and has_tool_messages(history):
            gr.Info(say(lang, "tools_left_out"))
        return params, system, history

    def _answer(self, library: Library, history: list[dict], query: str, settings: tuple, request: gr.Request,
                restore: str) -> Iterator[dict]:
        """Stream one answer to `query` after `history` in the open chat (whose messages from
        there on it replaces). A refusal leaves everything as it was."""
        lang, chat = _language(request), library.current
        original = chat.messages
        prepared = self._prepare(library, history, query, settings, lang)
        if prepared is None:
            yield {self.chatbot: display(original, lang)}
            return
        params, system, history = prepared
        session = _session(request)
        self.active.stop(session, abandon=True)  # a new answer replaces any other of this page
        started = self.active.begin()
        yield {self.box: gr.update(value="", interactive=False), self.chatbot: display(chat.messages, lang, True),
               self.stored: self.keep(library), self.readout_md: "", self.send: gr.update(visible=False),
               self.stop_btn: gr.update(visible=True, interactive=True), self.title_box: BUSY,
               self.rename_btn: BUSY, **self._chat_list(library, lang)}
        updates = stream_answer(self.backend, history, query, params, self.active, session, started, system,
                                deadline_s=self.limits.request_timeout_s, cache_salt=self._cache_salt("page", session),
                                client=_client(request))
        naming = self._title_job(chat, history, query, session, request)
        try:
            yield from self._follow(library, updates, params.max_length, session, started, lang, naming)
        except (InvalidRequest, EngineBusy) as error:
            # A toast, not gr.Error: an error would mark every output "Error" and skip .then().
            gr.Warning(say(lang, "refused_busy", reason=error) if isinstance(error, EngineBusy)
                       else say(lang, "invalid", error=error))
            chat.messages = original
            yield {self.box: restore, self.chatbot: display(original, lang), self.stored: self.keep(library),
                   self.readout_md: "", **self._chat_list(library, lang)}
        finally:
            updates.close()  # cancels the request in the backend unless it has ended
            if naming is not None:
                naming.cancel()

    def _title_job(self, chat: Chat, history: list[dict], query: str, session: str,
                   request: gr.Request) -> Optional[TitleJob]:
        """A title request for a chat's first answer, if the page names chats and this one has no name."""
        if not self.auto_titles or history or chat.title or chat.auto_title:
            return None
        return TitleJob(self.backend, query, cache_salt=self._cache_salt("page", _session(request)),
                        client=_client(request), deadline_s=self.limits.request_timeout_s)

    def _named(self, library: Library, naming: Optional[TitleJob], lang: str, wait_s: float = 0.0) -> dict:
        """The model's title in the open chat and the list, once ready (it never replaces the
        user's: rename is disabled while the answer runs, and shown_title puts the user's first)."""
        title = naming.title(wait_s) if naming is not None else None
        if not title or library.current.auto_title:
            return {}
        library.current.auto_title = title
        return {self.chats: gr.update(choices=library.choices(say(lang, "untitled")), value=library.current_id),
                self.stored: self.keep(library)}

    def _follow(self, library: Library, updates: Iterator[Progress], max_length: int, session: str,
                started: int, lang: str, naming: Optional[TitleJob] = None) -> Iterator[dict]:
        """The streamed answer into the open chat: the window on each update, the sealed library
        at most every STORE_INTERVAL_S and at the end, the chat's title when it is ready."""
        chat = library.current
        turn, empty_size = chat.messages, library.size()
        shown_before = display(turn[:-1], lang)  # unchanged while the answer streams
        progress, stored_at = Progress(), time.monotonic()
        for progress in updates:
            if self.active.abandoned_after(session, started):  # another answer or conversation owns the page:
                yield self._unchanged()  # the last yield is sent again when the event completes
                return
            if empty_size + json_bytes(progress.text) + json_bytes(progress.reasoning) - 2 > self.store_bytes:
                gr.Warning(say(lang, "answer_cut_store"))
                return
            chat.messages = turn[:-1] + [answer_message(progress.text, progress.reasoning)]
            shown = shown_before + display(chat.messages[-1:], lang, pending=not progress.finished)
            store_now = progress.finished or time.monotonic() - stored_at >= STORE_INTERVAL_S
            stored_at = time.monotonic() if store_now else stored_at
            yield {self.chatbot: shown, self.readout_md: readout(progress, max_length, lang),
                   **({self.stored: self.keep(library)} if store_now else {}),
                   **self._named(library, naming, lang, TITLE_WAIT_S if progress.finished else 0.0)}
        if progress.finish_reason == "error":  # cut off (time limit, shutdown) or failed: never complete
            gr.Warning(failure(progress, lang))

    def respond(self, message: str, stored: Any, max_length: float, top_p: float, temperature: float, system: str,
                request: gr.Request) -> Iterator[dict]:
        if not isinstance(message, str) or not message.strip() or \
                self._checked_message(message, _language(request)) is None:
            return
        library = self.read(stored, request)
        yield from self._answer(library, library.current.messages, message, (max_length, top_p, temperature, system),
                                request, restore=message)

    def example(self, stored: Any, max_length: float, top_p: float, temperature: float, system: str,
                event: gr.EventData, request: gr.Request) -> Iterator[dict]:
        """An example prompt (one of EXAMPLES, picked by index: the text is the server's own)."""
        index = event_index(event)
        if index is None or not 0 <= index < len(EXAMPLES):
            return
        library = self.read(stored, request)
        yield from self._answer(library, library.current.messages, EXAMPLES[index]["text"],
                                (max_length, top_p, temperature, system), request, restore="")

    def retry(self, stored: Any, max_length: float, top_p: float, temperature: float, system: str,
              event: gr.EventData, request: gr.Request) -> Iterator[dict]:
        """The Chatbot's retry: answer the turn's question again (later turns are dropped)."""
        library = self.read(stored, request)
        messages = library.current.messages
        start = user_message_at(messages, event_index(event))
        if start is None:
            gr.Warning(say(_language(request), "no_message"))
            return
        yield from self._answer(library, messages[:start], messages[start]["content"],
                                (max_length, top_p, temperature, system), request, restore="")

    def edit(self, stored: Any, max_length: float, top_p: float, temperature: float, system: str,
             event: gr.EventData, request: gr.Request) -> Iterator[dict]:
        """The Chatbot's edit of a user message: the turns after it are dropped and it is answered."""
        lang, library = _language(request), self.read(stored, request)
        messages = library.current.messages
        index, text = stored_index(messages, event_index(event)), event_text(event)
        if index is None or messages[index]["role"] != "user":
            gr.Warning(say(lang, "no_message"))
            yield {self.chatbot: display(messages, lang)}
            return
        if self._checked_message(text, lang) is None:
            yield {self.chatbot: display(messages, lang)}
            return
        yield from self._answer(library, messages[:index], text, (max_length, top_p, temperature, system), request,
                                restore="")

    def finish(self, stored: Any, request: gr.Request) -> dict:
        """After an answer (finished, stopped or failed): Send in place of Stop, the downloads."""
        library, lang = self.read(stored), _language(request)
        return {self.box: IDLE, self.send: gr.update(visible=True, interactive=True),
                self.stop_btn: gr.update(visible=False), self.title_box: IDLE, self.rename_btn: IDLE,
                **self._downloads(library.current, lang, _session(request))}

    def undo(self, stored: Any, event: gr.EventData, request: gr.Request) -> dict:
        """The Chatbot's undo: drop the turn (and those after it); its question goes back in the box."""
        library = self.read(stored, request)
        messages = library.current.messages
        start = user_message_at(messages, event_index(event))
        if start is None:
            return self._unchanged()
        library.current.messages = messages[:start]
        self.active.stop(_session(request), abandon=True)
        return {**self._view(library, request), self.box: messages[start]["content"]}

    def stop(self, request: gr.Request) -> None:
        self.active.stop(_session(request))

    # ---- the API ------------------------------------------------------------------------------

    def chat(self, message: str, history: list, max_length: Optional[int] = None, top_p: Optional[float] = None,
             temperature: Optional[float] = None, system: str = "", request: gr.Request = None) -> Iterator[str]:
        """Stream an answer to `message`. history: [[user, answer], ...] pairs or
        [{"role", "content"}, ...] messages, tool calls and results in OpenAI's shape included
        (sent to models that call tools; none is run here); system: a system prompt (for models
        that take one). max_length, top_p, temperature: the model's defaults where left out.
        Yields the whole answer so far. A conversation over the limits is refused, as on /v1."""
        lang, limits = _language(request), self.limits
        if not isinstance(message, str) or not message.strip():
            raise _refusal(say(lang, "empty"))
        if not isinstance(history, list):
            raise _refusal(say(lang, "history"))
        given = {"max_length": max_length, "top_p": top_p, "temperature": temperature}
        try:
            params = check_settings(*(self.rules.defaults[name] if value is None else value
                                      for name, value in given.items()), self.rules.limit, lang,
                                    self.info.default_sampling)
        except (ValueError, InvalidRequest) as error:
            raise _refusal(str(error))
        if not isinstance(system, str) or not self.info.supports_system_prompt:
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
            for progress in stream_answer(self.backend, turns, message, params, self.active, session,
                                          self.active.begin(), system, deadline_s=limits.request_timeout_s,
                                          cache_salt=self._cache_salt("api", session), client=_client(request)):
                if progress.finish_reason == "error":
                    raise _refusal(failure(progress, lang))
                yield progress.text
        except EngineBusy as error:
            raise _refusal(say(lang, "refused_busy", reason=error))
        except InvalidRequest as error:
            raise _refusal(say(lang, "invalid", error=error))

    def stats(self) -> dict:
        """The backend's counters (requests, tokens/s, queue) plus answers streaming to pages."""
        return {**self.backend.stats(), "streams_open": self.active.count()}


def build_page(backend: ChatBackend, **options) -> ChatPage:
    """The chat page for `backend` (see ChatPage for the options)."""
    return ChatPage(backend, **options)
