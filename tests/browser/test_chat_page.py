"""The chat page in a real browser, against `python app.py --tiny-random` (one server per module).

The tiny model's answers are random text, so the tests use greedy decoding (temperature 0) where
they compare answers, and otherwise check structure: how many messages, growth, the readout.
Set UPDATE_SCREENSHOT=1 to rewrite the README's screenshots (docs/screenshot-*.png).
"""
import json
import os
import re
import time

import pytest
from playwright.sync_api import expect

from .app_server import ROOT
from .conftest import LOADED, holds_for


BOT = '#chatbot [data-testid="bot"]'
USER = '#chatbot [data-testid="user"]'


def open_settings(page) -> None:
    """The settings sit in a side panel, closed at first (the chat comes first)."""
    panel = page.locator("#settings")
    if "open" not in (panel.get_attribute("class") or "").split():
        page.click("#open-settings")
        expect(panel).to_have_class(re.compile(r"\bopen\b"))


def set_slider(page, elem_id: str, value) -> None:
    """Type the value into the slider's box; wait until the slider itself holds it (events read
    it from there). The sliders are disabled until the page has shown the kept settings, so no
    late answer of the load can overwrite what is typed here."""
    open_settings(page)
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()
    expect(page.locator(f"#{elem_id} input[type=range]")).to_have_value(f"{float(value):g}")


def settle(page, max_length=48, temperature=0.0) -> None:
    set_slider(page, "max-length", max_length)
    set_slider(page, "temperature", temperature)


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.click("#send")


def answers(page) -> list[str]:
    return page.locator(BOT).all_inner_texts()


def wait_done(page, count: int) -> str:
    """Wait until the page shows `count` answers and the last one has ended; return it.
    A warning toast instead (say, a prompt too long for the maximum length) fails at once."""
    deadline = time.monotonic() + 20
    while page.locator(BOT).count() != count:
        toasts = page.locator(".toast-body").all_inner_texts()
        assert not toasts, f"the page warned instead of answering: {toasts}"
        assert time.monotonic() < deadline, f"expected {count} answers, the page shows {page.locator(BOT).count()}"
        time.sleep(0.05)
    expect(page.locator("#stop")).to_be_hidden(timeout=60_000)  # Send is back in its place
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#message textarea")).to_be_editable()
    toasts = page.locator(".toast-body").all_inner_texts()
    assert not toasts, f"the page warned instead of answering: {toasts}"
    return answers(page)[-1]


def chat(page, text: str) -> str:
    count = page.locator(BOT).count()
    send(page, text)
    return wait_done(page, count + 1)


def readout(page) -> str:
    return page.locator("#readout").inner_text()


def test_answer_streams_token_by_token(new_page):
    page = new_page()
    settle(page, max_length=160)
    send(page, "你好")
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        texts = answers(page)
        if texts and texts[-1] not in ("…", "") and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        if page.locator("#stop").is_hidden() and texts:
            break
        time.sleep(0.03)
    final = wait_done(page, 1)
    assert len(seen) >= 3, seen
    assert all(len(a) <= len(b) for a, b in zip(seen, seen[1:])), "the answer only ever grows"
    assert final.startswith(seen[0][:5])
    assert re.search(r"\d+(\.\d)? tokens/s", readout(page))
    assert re.search(r"context \d+ / 160 tokens", readout(page))


def test_stop_freezes_the_answer_and_the_model(new_page, app_server):
    page = new_page()
    settle(page, max_length=2048)
    cancelled = app_server.stats()["requests_cancelled"]
    send(page, "你好")
    expect(page.locator(BOT)).to_have_text(re.compile(r".{12,}"))
    page.click("#stop")
    stats = app_server.wait_idle(timeout=2)
    assert stats["requests_cancelled"] == cancelled + 1
    frozen, frozen_readout = wait_done(page, 1), readout(page)
    holds_for(lambda: answers(page)[-1] == frozen and readout(page) == frozen_readout, 0.6,
              "the stopped answer changed")
    # The last progress shown (Gradio may end the handler before the "stopped" event arrives):
    # never a length cut, a failure or a full context.
    shown = re.fullmatch(r"(\d+(\.\d)? tokens/s · )?context (\d+) / 2048 tokens( · stopped)?", frozen_readout)
    assert shown, frozen_readout
    assert int(shown[3]) < 2048
    # the next message is answered normally
    set_slider(page, "max-length", 40)
    assert chat(page, "早上好") not in ("", "…")
    assert len(page.locator(USER).all_inner_texts()) == 2


def test_stop_before_the_first_token(new_page, app_server):
    page = new_page()
    settle(page, max_length=2048)
    cancelled = app_server.stats()["requests_cancelled"]
    send(page, "Tell me a long story about a cat and a dog who become friends.")
    page.click("#stop")  # enabled as soon as the page shows the question, before any answer text
    stats = app_server.wait_idle(timeout=2)
    assert stats["requests_cancelled"] == cancelled + 1
    wait_done(page, 1)
    assert len(answers(page)[-1]) < 400  # stopped within a few steps, not 2000 tokens later


def test_closing_the_tab_stops_the_model(new_page, app_server):
    page = new_page()
    settle(page, max_length=2048)
    send(page, "你好")
    expect(page.locator(BOT)).to_have_text(re.compile(r".{12,}"))
    assert app_server.stats()["active_sequences"] == 1
    page.context.close()
    app_server.wait_idle(timeout=3)


def test_retry_replaces_the_last_answer(new_page):
    page = new_page()
    settle(page, max_length=48, temperature=0)
    first = chat(page, "你好")
    set_slider(page, "temperature", 1.5)
    page.click('#chatbot button[aria-label="Retry"]')
    # the retry's first update replaces the answer and shows Stop together: only then is the
    # answer read when Send is back (else the old, finished one could be read)
    expect(page.locator(BOT).last).not_to_have_text(first)
    second = wait_done(page, 1)
    assert len(page.locator(USER).all_inner_texts()) == 1
    assert second != first


def test_undo_removes_the_last_turn(new_page):
    page = new_page()
    settle(page)
    chat(page, "你好")
    chat(page, "今天天气怎么样？")
    page.click('#chatbot button[aria-label="Undo"]')
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator(BOT)).to_have_count(1)
    assert page.locator(USER).inner_text() == "你好"
    expect(page.locator("#message textarea")).to_have_value("今天天气怎么样？")


def test_reset_empties_the_chat_and_the_context(new_page):
    page = new_page()
    settle(page, max_length=160, temperature=0)
    alone = chat(page, "早上好")
    page.click("#reset")
    expect(page.locator(BOT)).to_have_count(0)
    set_slider(page, "max-length", 48)
    chat(page, "你好")
    set_slider(page, "max-length", 160)
    with_history = chat(page, "早上好")
    assert "left out" not in readout(page)  # the model saw the first turn...
    assert with_history != alone  # ...and it changed the greedy answer
    page.click("#reset")
    expect(page.locator(BOT)).to_have_count(0)
    expect(page.locator(USER)).to_have_count(0)
    page.reload()
    page.wait_for_selector(LOADED)
    holds_for(lambda: page.locator(USER).count() == 0, 0.5, "a reset chat came back after a reload")
    settle(page, max_length=160, temperature=0)
    # after Reset the model sees no history: the greedy answer is the one a fresh chat gets
    assert chat(page, "早上好") == alone


def test_small_maximum_length_gives_a_short_answer(new_page):
    page = new_page()
    settle(page, max_length=20)
    answer = chat(page, "你好")
    used, limit = map(int, re.search(r"context (\d+) / (\d+)", readout(page)).groups())
    assert limit == 20 and used <= 20
    assert "maximum length" in readout(page)
    assert len(answer) <= 4 * 20


def test_readout_says_when_older_turns_are_left_out(new_page):
    page = new_page()
    settle(page, max_length=64)
    for query in ["你好", "今天天气怎么样？", "明天下午会下雨吗？", "谢谢你，再见"]:
        chat(page, query)
    assert re.search(r"\d+ older turn\(s\) left out", readout(page))


def test_two_browsers_never_see_each_other(new_page):
    alice, bob = new_page(), new_page()
    settle(alice)
    settle(bob)
    send(alice, "I am Alice")
    send(bob, "I am Bob")
    wait_done(alice, 1)
    wait_done(bob, 1)
    assert alice.locator(USER).all_inner_texts() == ["I am Alice"]
    assert bob.locator(USER).all_inner_texts() == ["I am Bob"]
    bob.reload()
    bob.wait_for_selector(LOADED)
    expect(bob.locator(USER)).to_have_text(["I am Bob"])


def test_reload_keeps_the_chat(new_page):
    page = new_page()
    settle(page)
    answer = chat(page, "你好")
    page.reload()
    page.wait_for_selector(LOADED)
    expect(page.locator(USER)).to_have_text(["你好"])
    expect(page.locator(BOT)).to_have_text([answer])
    settle(page)
    chat(page, "今天天气怎么样？")  # the restored chat goes on
    expect(page.locator(USER)).to_have_count(2)


ATTACKS = [
    "<script>window.__xss = 1</script>",
    '<img src=x onerror="window.__xss = 2">',
    "[click me](javascript:window.__xss=3)",
    '<a href="javascript:window.__xss=4">link</a>',
    "![pic](x onerror=window.__xss=5)",
    '![tracker](http://127.0.0.1:9/pixel.png "t")',
    '<svg onload="window.__xss = 6"></svg><iframe src="javascript:window.__xss=7"></iframe>',
    "[ref]: javascript:window.__xss=8\n\n[ref link][ref]",
    "$\\text{<img src=x onerror=window.__xss=9>}$",
]


ACTIVE_ATTRIBUTES = """() => Array.from(document.querySelectorAll('#chatbot *')).some(element =>
    Array.from(element.attributes).some(a => a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value)))"""


def test_html_and_script_are_shown_as_text(new_page):
    page = new_page()
    page.on("dialog", lambda dialog: pytest.fail(f"a dialog opened: {dialog.message}"))
    settle(page, max_length=256)
    messages = ["\n\n".join(ATTACKS[i:i + 3]) for i in range(0, len(ATTACKS), 3)]
    for message in messages:
        chat(page, message)
    for reloaded in (False, True):
        if reloaded:  # the stored conversation is rendered again on load
            page.reload()
            page.wait_for_selector(LOADED)
            expect(page.locator(USER)).to_have_count(len(messages))
        shown = "\n".join(page.locator(USER).all_inner_texts())
        for visible in ["<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">',
                        "[click me](javascript:window.__xss=3)", '<a href="javascript:window.__xss=4">link</a>',
                        "![tracker](http://127.0.0.1:9/pixel.png", "[ref]: javascript:window.__xss=8"]:
            assert visible in shown
        assert not page.locator("#chatbot img, #chatbot iframe, #chatbot script").count()
        assert not page.evaluate(ACTIVE_ATTRIBUTES), "an element in the chat has an on* or javascript: attribute"
        for link in page.locator("#chatbot .message-content a").all():
            link.click()
        assert page.evaluate("window.__xss") is None


def test_latex_renders_as_math(new_page):
    page = new_page()
    settle(page, max_length=256)
    chat(page, r"Inline $E=mc^2$ and \(a^2+b^2=c^2\); display $$\int_0^1 x\,dx$$ and \[\frac{1}{2}\]")
    message = page.locator(USER).first
    expect(message.locator(".katex")).to_have_count(4)
    assert message.locator(".katex-display").count() == 2
    assert "$" not in message.inner_text()


def test_code_keeps_its_indentation(new_page):
    page = new_page()
    settle(page, max_length=128)
    code = "def main():\n    for i in range(3):\n        print(i)\n    return 0"
    chat(page, f"Run this:\n```python\n{code}\n```")
    block = page.locator(f"{USER} pre code").first
    assert block.inner_text().rstrip("\n") == code
    assert page.locator(f"{USER} .copy_code_button, {USER} button[title='copy']").count() >= 1


def test_conversation_downloads_as_html_and_json(new_page, tmp_path):
    page = new_page()
    settle(page, max_length=96)
    answer = chat(page, "Formula $x^2$ and <b>not bold</b>")
    expect(page.locator("#download-html")).to_be_enabled()
    with page.expect_download() as download:
        page.click("#download-html")
    html_file = tmp_path / "conversation.html"
    download.value.save_as(html_file)
    with page.expect_download() as download:
        page.click("#download-json")
    json_file = tmp_path / "conversation.json"
    download.value.save_as(json_file)

    exported = json.loads(json_file.read_text(encoding="utf-8"))
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][0]["content"] == "Formula $x^2$ and <b>not bold</b>"
    view = page.context.new_page()
    view.goto(html_file.as_uri())
    body = view.locator("body").inner_text()
    assert "<b>not bold</b>" in body
    assert answer.split()[0][:8] in body
    assert view.locator("math").count() == 1
    assert view.locator("b, script").count() == 0
    view.close()


def test_labels_follow_the_browser_language(new_page):
    page = new_page(locale="zh-CN")
    expect(page.locator("#send")).to_have_text("发送")
    expect(page.locator("#new-chat")).to_have_text("新对话")
    expect(page.locator("#open-settings")).to_contain_text("设置")
    english = new_page(locale="en-US")
    expect(english.locator("#send")).to_have_text("Send")


def test_random_model_notice_is_shown(new_page):
    page = new_page()
    expect(page.locator("#random-notice")).to_contain_text("random")


SCREENSHOTS = {"desktop": dict(viewport={"width": 1280, "height": 800}),
               "phone": dict(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                             device_scale_factor=2)}


def test_readme_screenshots(browser, app_server, tmp_path):
    """docs/screenshot-{device}-{theme}.png: a Chinese and English conversation with code and a
    formula, beside an older one. UPDATE_SCREENSHOT=1 writes all four into docs/; otherwise the
    desktop light one is taken into a temporary folder and checked."""
    update = os.environ.get("UPDATE_SCREENSHOT") == "1"
    shots = [(device, theme) for device in SCREENSHOTS for theme in ("light", "dark")] if update \
        else [("desktop", "light")]
    for device, theme in shots:
        context = browser.new_context(locale="zh-CN", **SCREENSHOTS[device])
        context.set_default_timeout(20_000)
        try:
            page = context.new_page()
            page.goto(f"{app_server.url}?__theme={theme}")
            page.wait_for_selector(LOADED)
            settle(page, max_length=60, temperature=0.95)
            page.click("#settings .toggle-button")
            chat(page, "Hello! Who are you?")
            if device == "phone":  # the conversations are in a drawer
                page.click("#sidebar .toggle-button")
            page.click("#new-chat")
            expect(page.locator(USER)).to_have_count(0)
            settle(page, max_length=200, temperature=0.95)
            page.click("#settings .toggle-button")  # closed again: the page as it first opens
            expect(page.locator("#settings")).not_to_have_class(re.compile(r"\bopen\b"))
            chat(page, "用 Python 写一个求和函数 (sum of 1..n)，并验证公式 $\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}$：\n"
                       "```python\ndef total(n):\n    return n * (n + 1) // 2\n```")
            page.locator("#message textarea").blur()
            page.evaluate("window.scrollTo(0, 0)")
            target = (ROOT / "docs" if update else tmp_path) / f"screenshot-{device}-{theme}.png"
            page.screenshot(path=str(target))
            assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 20_000
        finally:
            context.close()
