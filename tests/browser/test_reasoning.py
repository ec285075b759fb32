"""A GLM-Z1's thinking on the page: a collapsed, titled block above the answer while it streams
and after, and a reload keeps both (tests/browser/reasoning_server.py scripts the model)."""
import pytest

from .app_server import AppServer
from .conftest import LOADED, _chromium_or_skip
from .reasoning_server import REPLY, THINKING
from .test_chat_page import BOT, expect, send

THOUGHT = "#chatbot .thought-group"


@pytest.fixture(scope="module")
def app_server():
    _chromium_or_skip()
    server = AppServer(program=("-m", "tests.browser.reasoning_server"))
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()


def check_thinking_then_reply(page) -> None:
    group = page.locator(THOUGHT)
    expect(group).to_have_count(1)
    expect(group).to_contain_text("💭 Thinking")
    assert THINKING not in group.inner_text(), "collapsed: the thinking is hidden until opened"
    expect(page.locator(BOT).last).to_contain_text(REPLY)
    text = page.locator("#chatbot").inner_text()
    assert text.index("💭 Thinking") < text.index(REPLY) and "</think>" not in text
    group.locator("[role=button]").first.click()
    expect(group).to_contain_text(THINKING)
    assert REPLY not in group.inner_text()


def test_thinking_shows_collapsed_above_the_answer_and_survives_a_reload(new_page):
    page = new_page()
    send(page, "你好")
    expect(page.locator(THOUGHT)).to_contain_text("💭 Thinking…")  # titled and collapsed while it streams
    assert THINKING not in page.locator(THOUGHT).inner_text()
    expect(page.locator("#stop")).to_be_hidden(timeout=60_000)
    check_thinking_then_reply(page)
    page.reload()
    page.wait_for_selector(LOADED)
    check_thinking_then_reply(page)
