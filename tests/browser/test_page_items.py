"""What issue 26 found on the page, one test each (every one fails on the page before it):
settings defaults and reset, dollars and __names__, no placeholder leak, the conversation cap,
Reset then New chat, Delete undone, Stop in place of Send, a stable width, search, export names,
import errors people can read, and no KaTeX errors in the console."""
import json
import re
import time

from .test_chat_page import BOT, USER, chat, expect, open_settings, send, settle, wait_done
from .test_conversations import LIST, TOAST, import_file, new_chat, rename_chat, titles

SETTING_IDS = ("max-length", "top-p", "temperature")


def slider_values(page) -> dict:
    open_settings(page)
    return {name: float(page.locator(f"#{name} input[type=range]").input_value()) for name in SETTING_IDS}


def stable_box(page, selector: str) -> dict:
    """The element's box once it has stopped moving (two reads 100 ms apart agree)."""
    deadline, box = time.monotonic() + 10, None
    while True:
        page.wait_for_timeout(100)
        box, last = page.locator(selector).bounding_box(), box
        if box == last:
            return box
        assert time.monotonic() < deadline, f"{selector} kept moving: {last} -> {box}"


def test_slider_reset_restores_the_default_after_kept_settings_load(new_page):
    page = new_page()
    defaults = slider_values(page)
    settle(page, max_length=64)
    chat(page, "hello")
    page.reload()
    expect(page.locator(USER)).to_have_count(1)
    open_settings(page)
    expect(page.locator("#max-length input[type=range]")).to_have_value("64")  # the chat's own setting
    page.click("#max-length button.reset-button")
    expect(page.locator("#max-length input[type=range]")).to_have_value(f"{defaults['max-length']:g}")


def test_new_chat_starts_with_the_defaults(new_page):
    page = new_page()
    defaults = slider_values(page)
    settle(page, max_length=60, temperature=0)
    chat(page, "first")
    page.click("#new-chat")
    expect(page.locator(LIST)).to_have_count(2)
    for name, value in defaults.items():
        expect(page.locator(f"#{name} input[type=range]")).to_have_value(f"{value:g}")
    long_message = " ".join(["word"] * 300)  # over 60 tokens: refused with the old chat's settings
    assert chat(page, long_message)


def test_dollars_are_maths_only_when_they_look_like_maths(new_page):
    page = new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if "katex" in message.text.lower() else None)
    settle(page, max_length=256)
    chat(page, r"It costs $5 and $10. Area $x^2$, also \(a+b\). Call __init__ and __main__ here.")
    message = page.locator(USER).first
    expect(message.locator(".katex")).to_have_count(2)  # $x^2$ and \(a+b\), nothing else
    text = message.inner_text()
    assert "$5 and $10" in text and "__init__" in text and "__main__" in text
    assert message.locator("strong, em").count() == 0
    assert not errors, errors


def test_no_placeholder_leaks_after_an_edit(new_page):
    page = new_page()
    settle(page, max_length=128)
    chat(page, "plain text")
    page.locator(USER).first.hover()
    page.locator('#chatbot button[aria-label="Edit"]').first.click()
    # The browser hid formulas behind placeholders one delimiter at a time: a "$ ... $" pair around
    # a hidden $$...$$ kept its placeholder, and KaTeX showed it in its error text.
    edited = r"It costs $5 \frac{ and $$x^2$$ then $3; also \(y\) here."
    page.locator("#chatbot textarea.edit-textarea").fill(edited)
    page.click('#chatbot button[aria-label="Submit"]')
    wait_done(page, 1)
    message = page.locator(USER).first
    expect(message).to_contain_text("It costs")
    expect(page.locator("#chatbot")).not_to_contain_text("LATEX_BLOCK")
    assert "LATEX_BLOCK" not in page.locator("#chatbot").inner_html()
    expect(message.locator(".katex")).to_have_count(2)
    assert "costs $5" in message.inner_text() and "then $3" in message.inner_text()


def exported_file(tmp_path, name: str, question: str):
    path = tmp_path / name
    path.write_text(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": "answer"}]}), encoding="utf-8")
    return path


def test_at_the_cap_new_chat_is_refused_clearly_and_the_list_scrolls(new_page, tmp_path):
    page = new_page()
    for number in range(20):  # 19 imports beside the first, empty chat; then that one is replaced
        import_file(page, exported_file(tmp_path, f"chat{number}.json", f"imported {number}"))
        expect(page.locator(f"{LIST}.selected")).to_have_text(f"imported {number}")
        if number == 18:
            page.locator(LIST, has_text="New chat").click()
            page.click("#delete-chat")  # at once: the chat selected in the list goes, not the one before
            expect(page.locator(LIST)).to_have_count(19)
    expect(page.locator(LIST)).to_have_count(20)
    expect(page.locator("#new-chat")).to_be_disabled()
    expect(page.locator("#cap-note")).to_contain_text("At most 20 conversations")
    listed = page.evaluate("() => { const l = document.querySelector('#conversations');"
                           " return [l.scrollHeight, l.clientHeight]; }")
    assert listed[0] > listed[1], "the list scrolls instead of growing"
    for control in ("#delete-chat", "#rename", "#download-json"):
        expect(page.locator(control)).to_be_in_viewport()
    open_before = page.locator(f"{LIST}.selected").inner_text()
    settle(page)
    chat(page, "where do I land?")
    expect(page.locator(f"{LIST}.selected")).to_have_text(open_before)
    expect(page.locator(USER)).to_have_text([open_before, "where do I land?"])
    page.click("#delete-chat")
    expect(page.locator("#new-chat")).to_be_enabled()
    expect(page.locator("#cap-note")).to_be_hidden()


def test_after_reset_new_chat_keeps_a_renamed_empty_chat(new_page):
    page = new_page()
    settle(page)
    chat(page, "hello")
    rename_chat(page, "Keep me")
    expect(page.locator(LIST)).to_have_text(["Keep me"])
    page.click("#reset")
    expect(page.locator(USER)).to_have_count(0)
    page.click("#new-chat")
    expect(page.locator(LIST)).to_have_text(["New chat", "Keep me"])


def test_delete_can_be_undone_for_a_few_seconds(new_page):
    page = new_page()
    settle(page)
    first = chat(page, "first chat")
    new_chat(page)
    settle(page)  # a new chat starts with the default (long) maximum length
    chat(page, "second chat")
    page.locator(LIST, has_text="first chat").click()
    expect(page.locator(USER)).to_have_text(["first chat"])
    page.click("#delete-chat")
    expect(page.locator(LIST)).to_have_text(["second chat"])
    page.click("#undo-delete")
    expect(page.locator(LIST)).to_have_text(["second chat", "first chat"])
    expect(page.locator(f"{LIST}.selected")).to_have_text("first chat")
    expect(page.locator(BOT)).to_have_text([first])
    page.click("#delete-chat")
    expect(page.locator(LIST)).to_have_text(["second chat"])
    expect(page.locator("#undo-delete")).to_be_hidden(timeout=15_000)  # the offer ends by itself
    page.reload()
    expect(page.locator(LIST)).to_have_text(["second chat"])


def test_stop_takes_the_place_of_send_and_the_width_stays(new_page):
    page = new_page()
    settle(page, max_length=2048)
    page.click("#settings .toggle-button")  # closed: the page slides back (a CSS transition)
    send_box, width = stable_box(page, "#send"), stable_box(page, "#chatbot")["width"]
    send(page, "Tell me a long story. " + "x" * 300)
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    stop_box = stable_box(page, "#stop")
    assert abs(stop_box["x"] - send_box["x"]) < 4 and abs(stop_box["y"] - send_box["y"]) < 4
    expect(page.locator(BOT)).to_have_text(re.compile(r".{12,}"))
    page.click("#stop")
    wait_done(page, 1)
    assert page.locator("#chatbot").bounding_box()["width"] == width, "the chat column changed width"


def test_search_by_title(new_page):
    page = new_page()
    settle(page)
    for text in ("apples and pears", "书籍推荐", "Apple pie"):
        if page.locator(USER).count():
            new_chat(page)
            settle(page)  # a new chat starts with the default (long) maximum length
        chat(page, text)
    page.locator("#chat-search input").fill("apple")
    expect(page.locator(LIST)).to_have_text(["Apple pie", "apples and pears"])
    page.locator("#chat-search input").fill("书")
    expect(page.locator(LIST)).to_have_text(["书籍推荐"])
    page.locator(LIST).first.click()
    expect(page.locator(USER)).to_have_text(["书籍推荐"])
    expect(page.locator(LIST)).to_have_count(3)  # opening a chat shows the whole list again


def test_exports_are_named_after_the_chat_and_the_import_error_reads_well(new_page, tmp_path):
    page = new_page()
    settle(page)
    chat(page, "Trip to Paris")
    rename_chat(page, "Trip: Paris/Lyon")
    expect(page.locator(LIST)).to_have_text(["Trip: Paris/Lyon"])
    for button, name in (("#download-html", "Trip-Paris-Lyon.html"), ("#download-json", "Trip-Paris-Lyon.json")):
        with page.expect_download() as download:
            page.click(button)
        assert download.value.suggested_filename == name
    path = tmp_path / "wrong.json"
    path.write_text('{"chats": []}')
    import_file(page, path)
    toast = page.locator(TOAST).last
    expect(toast).to_contain_text("cannot be imported")
    assert "{" not in toast.inner_text(), toast.inner_text()
    assert titles(page) == ["Trip: Paris/Lyon"]
