"""Many conversations in one browser, edit and re-run, examples, import, a phone's viewport and
Chinese glyphs, against `python app.py --tiny-random` with its storage key in a test folder
(so that a restarted server on the same port reads what browsers kept)."""
import json
import re

import pytest

from .app_server import AppServer, free_port
from .conftest import LOADED, STEP_DELAY, _chromium_or_skip, holds_for
from .test_chat_page import BOT, USER, answers, chat, expect, send, set_slider, settle, wait_done

LIST = "#conversations label"
TOAST = ".toast-body"


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    """The environment and port every server of this module shares."""
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}, free_port()


@pytest.fixture(scope="module")
def app_server(server_env):
    _chromium_or_skip()
    env, port = server_env
    server = AppServer("--step-delay", STEP_DELAY, env=env, port=port)
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()


def titles(page) -> list[str]:
    return [text.strip() for text in page.locator(LIST).all_inner_texts()]


def open_chat(page, title: str) -> None:
    """Open the chat named after its first message `title`; wait until the page shows it."""
    page.locator(LIST, has_text=title).click()
    expect(page.locator(f"{LIST}.selected", has_text=title)).to_have_count(1)
    expect(page.locator(USER).first).to_have_text(title)


def rename_chat(page, title: str) -> None:
    """Name the open chat with the title box and Rename."""
    page.locator("#chat-title input").fill(title)
    page.click("#rename")


def users(page) -> list[str]:
    return page.locator(USER).all_inner_texts()


def new_chat(page) -> None:
    page.click("#new-chat")
    expect(page.locator(USER)).to_have_count(0)


def stored_value(page) -> str:
    return page.evaluate("() => localStorage.getItem('chatglm-webdemo-conversation')")


def import_file(page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#import")
    chooser.value.set_files(str(path))


def test_new_switch_rename_delete(new_page):
    page = new_page()
    settle(page)
    chat(page, "你好")
    new_chat(page)
    settle(page)  # a new chat starts with the default (long) maximum length
    chat(page, "Hello there")
    assert titles(page) == ["Hello there", "你好"]  # newest first, named after the first message
    open_chat(page, "你好")
    expect(page.locator(USER)).to_have_text(["你好"])
    rename_chat(page, "问候 greetings")
    expect(page.locator(LIST)).to_have_text(["Hello there", "问候 greetings"])
    page.click("#delete-chat")
    expect(page.locator(LIST)).to_have_text(["Hello there"])
    expect(page.locator(USER)).to_have_text(["Hello there"])
    page.click("#delete-chat")  # the last one: an empty chat takes its place
    expect(page.locator(LIST)).to_have_text(["New chat"])
    expect(page.locator(USER)).to_have_count(0)


def test_settings_are_kept_per_conversation(new_page):
    page = new_page()
    settle(page, max_length=48)
    chat(page, "first")
    new_chat(page)
    set_slider(page, "max-length", 60)
    chat(page, "second")
    open_chat(page, "first")
    expect(page.locator("#max-length input[type=number]")).to_have_value("48")
    open_chat(page, "second")
    expect(page.locator("#max-length input[type=number]")).to_have_value("60")


def test_switching_stops_the_answer_and_resets_the_context(new_page, app_server):
    page = new_page()
    settle(page, max_length=160, temperature=0)
    alone = chat(page, "早上好")
    new_chat(page)
    set_slider(page, "max-length", 2048)
    cancelled = app_server.stats()["requests_cancelled"]
    send(page, "Tell me a long story.")
    expect(page.locator(BOT)).to_have_text(re.compile(r".{12,}"))
    open_chat(page, "早上好")
    stats = app_server.wait_idle(timeout=3)
    assert stats["requests_cancelled"] == cancelled + 1
    expect(page.locator(USER)).to_have_text(["早上好"])
    expect(page.locator(BOT)).to_have_text([alone])
    expect(page.locator("#message textarea")).to_be_editable()
    holds_for(lambda: users(page) == ["早上好"], 0.5, "the stopped answer wrote into this chat")
    new_chat(page)
    settle(page, max_length=160, temperature=0)
    assert chat(page, "早上好") == alone  # a new chat's context holds nothing of the others
    assert "left out" not in page.locator("#readout").inner_text()


def test_edit_drops_later_turns_and_answers_again(new_page):
    page = new_page()
    settle(page, max_length=160, temperature=0)
    chat(page, "你好")
    chat(page, "今天天气怎么样？")
    page.locator(USER).first.hover()
    page.locator('#chatbot button[aria-label="Edit"]').first.click()
    page.locator("#chatbot textarea.edit-textarea").fill("早上好")
    page.click('#chatbot button[aria-label="Submit"]')
    edited = wait_done(page, 1)
    expect(page.locator(USER)).to_have_text(["早上好"])
    new_chat(page)
    settle(page, max_length=160, temperature=0)
    assert chat(page, "早上好") == edited  # answered from the edited message, with nothing before it
    page.reload()
    page.wait_for_selector(LOADED)
    expect(page.locator(USER)).to_have_text(["早上好"])


def test_examples_on_an_empty_chat(new_page):
    page = new_page()
    settle(page)
    examples = page.locator("#chatbot button.example")
    expect(examples).to_have_count(4)
    texts = examples.all_inner_texts()
    assert any("你" in text for text in texts) and any("Python" in text for text in texts)
    examples.first.click()
    wait_done(page, 1)
    expect(page.locator(USER)).to_have_text([texts[0]])
    expect(examples).to_have_count(0)
    page.click("#new-chat")
    expect(examples).to_have_count(4)


def test_import_a_download_into_another_browser(new_page, tmp_path):
    page = new_page()
    settle(page, max_length=96)
    answer = chat(page, "中文 and English <img src=x onerror=\"window.__xss=1\">")
    with page.expect_download() as download:
        page.click("#download-json")
    exported = tmp_path / "conversation.json"
    download.value.save_as(exported)
    other = new_page()
    import_file(other, exported)
    expect(other.locator(USER)).to_have_text(['中文 and English <img src=x onerror="window.__xss=1">'])
    expect(other.locator(BOT)).to_have_text([answer])
    assert titles(other)[0].startswith("中文 and English") and len(titles(other)) == 2
    assert other.locator("#chatbot img").count() == 0 and other.evaluate("window.__xss") is None
    other.reload()
    other.wait_for_selector(LOADED)
    expect(other.locator(USER)).to_have_count(1)
    settle(other, max_length=96)
    chat(other, "go on")  # the imported chat goes on
    expect(other.locator(USER)).to_have_count(2)


BAD_FILES = {
    "not-json.json": b"{not json",
    "nested.json": b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "system-role.json": json.dumps({"messages": [{"role": "system", "content": "x"},
                                                 {"role": "assistant", "content": "y"}]}).encode(),
    "extra-key.json": json.dumps({"messages": [{"role": "user", "content": "q", "html": "<b>"},
                                               {"role": "assistant", "content": "a"}]}).encode(),
    "not-utf8.json": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "surrogate.json": b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
}


def test_malicious_and_oversized_files_are_refused_and_change_nothing(new_page, tmp_path):
    page = new_page()
    settle(page)
    chat(page, "keep me")
    before = (stored_value(page), titles(page), users(page), answers(page))
    for name, content in [*BAD_FILES.items(), ("oversized.json", b" " * (300 << 10) + b"{}")]:
        path = tmp_path / name
        path.write_bytes(content)
        import_file(page, path)
        toast = page.locator(TOAST).last
        expect(toast).to_contain_text("larger than 256 KiB" if name == "oversized.json" else "cannot be imported")
        page.locator(".toast-close").last.click()
        holds_for(lambda: (stored_value(page), titles(page), users(page), answers(page)) == before, 0.3, name)


def test_phone_viewport_chat_first_no_horizontal_scroll(browser, app_server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, locale="zh-CN", is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    try:
        page = context.new_page()
        page.goto(app_server.url)
        page.wait_for_selector(LOADED)
        for panel in ("#sidebar", "#settings"):  # drawers over the page, closed: the chat comes first
            expect(page.locator(panel)).not_to_have_class(re.compile(r"\bopen\b"))
        chat_top = page.locator("#chatbot").bounding_box()["y"]
        assert chat_top < page.locator("#message").bounding_box()["y"]
        settle(page, max_length=1024)
        page.click("#settings .toggle-button")
        chat(page, "一个很长的中文句子" * 12 + "\n```python\nprint('" + "x" * 300 + "')\n```\n" + "w" * 200)
        for toggle in ("#settings .toggle-button", "#settings .toggle-button", "#sidebar .toggle-button"):
            widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth,"
                                   " document.body.scrollWidth]")
            assert widths[0] <= widths[1] and widths[2] <= widths[1], widths
            page.click(toggle)  # settings open, then closed, then the conversations: never wider
        page.click("#new-chat")  # starting a chat (or picking one) closes the drawer
        expect(page.locator("#sidebar")).not_to_have_class(re.compile(r"\bopen\b"))
        expect(page.locator(USER)).to_have_count(0)
    finally:
        context.close()


GLYPH_WIDTHS = """([text, missing]) => {
    const message = document.querySelector('#chatbot [data-testid="user"]');
    const span = t => { const s = document.createElement('span'); s.textContent = t; s.style.fontSize = '40px';
                        s.style.whiteSpace = 'nowrap'; message.appendChild(s); return s; };
    const shown = span(text), none = span(missing);
    shown.id = 'glyphs-shown'; none.id = 'glyphs-missing';
    return [shown.getBoundingClientRect().width, none.getBoundingClientRect().width];
}"""


def test_chinese_renders_with_real_glyphs(new_page):
    """Fails when Chinese shows as missing-glyph boxes: full-width ideographs are 1 em each, each
    looks different, and none looks like the box of a code point no font has (U+0378)."""
    page = new_page()
    settle(page)
    chat(page, "中文字体")
    text = "永中国字"
    width, _ = page.evaluate(GLYPH_WIDTHS, [text, "\u0378" * len(text)])
    assert abs(width - 40 * len(text)) <= 4, f"{len(text)} ideographs at 40px are {width}px wide, not 1 em each"
    shots = [page.locator("#glyphs-shown").screenshot(), page.locator("#glyphs-missing").screenshot()]
    assert shots[0] != shots[1], "the Chinese text renders exactly as missing glyphs"
    singles = []
    for char in text:
        page.evaluate("c => { document.querySelector('#glyphs-shown').textContent = c; }", char)
        singles.append(page.locator("#glyphs-shown").screenshot())
    assert len(set(singles)) == len(text), "different ideographs render the same (boxes)"


def test_kept_across_reload_and_server_restart(new_page, app_server, server_env):
    page = new_page()
    settle(page)
    first = chat(page, "你好")
    new_chat(page)
    settle(page)  # a new chat starts with the default (long) maximum length
    chat(page, "Second chat")
    open_chat(page, "你好")
    page.reload()
    page.wait_for_selector(LOADED)
    expect(page.locator(LIST)).to_have_text(["Second chat", "你好"])
    expect(page.locator(USER)).to_have_text(["你好"])
    expect(page.locator(BOT)).to_have_text([first])
    env, port = server_env
    app_server.stop()  # the last test of the module: nothing needs this server after it
    restarted = AppServer("--step-delay", STEP_DELAY, env=env, port=port)  # same key file, same origin
    try:
        page.reload()
        page.wait_for_selector(LOADED)
        expect(page.locator(LIST)).to_have_text(["Second chat", "你好"])
        expect(page.locator(BOT)).to_have_text([first])
        open_chat(page, "Second chat")
        expect(page.locator(USER)).to_have_text(["Second chat"])
    finally:
        restarted.stop()
