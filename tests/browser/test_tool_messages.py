"""A conversation holding a tool call and its result, imported from a JSON download into the
page of a tiny GLM-4 (`python app.py --tiny-random glm4`): both show as collapsed messages whose
text is literal, and the chat goes on with them sent to the model. The page runs no tool."""
import json

import pytest

from .app_server import AppServer
from .conftest import STEP_DELAY, _chromium_or_skip
from .test_chat_page import BOT, USER, chat, expect, settle
from .test_conversations import import_file

ATTACK = '<img src=x onerror="window.__xss=1">'
CONVERSATION = {"model": "glm-4-9b-chat", "exported_at": "2026-01-01T00:00:00+00:00", "messages": [
    {"role": "user", "content": "What is the weather in 北京?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc123", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "北京", "note": ATTACK}, ensure_ascii=False)}}]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": f"晴 ``` {ATTACK} **bold**"},
    {"role": "assistant", "content": "It is sunny in 北京."},
]}
THOUGHT = "#chatbot .thought-group"


@pytest.fixture(scope="module")
def app_server():
    _chromium_or_skip()
    server = AppServer("--step-delay", STEP_DELAY, program=("app.py", "--tiny-random", "glm4"))
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()


def test_an_imported_tool_call_and_result_show_collapsed_and_escaped(new_page, tmp_path):
    path = tmp_path / "agent-run.json"
    path.write_text(json.dumps(CONVERSATION, ensure_ascii=False), encoding="utf-8")
    page = new_page()
    import_file(page, path)
    expect(page.locator(USER)).to_have_text(["What is the weather in 北京?"])
    groups = page.locator(THOUGHT)
    expect(groups).to_have_count(2)
    expect(groups.nth(0)).to_contain_text("🛠 Called get_weather")
    expect(groups.nth(1)).to_contain_text("📎 Result of get_weather")
    assert ATTACK not in groups.nth(0).inner_text(), "collapsed: the arguments are hidden until opened"
    for index in range(2):
        groups.nth(index).locator("[role=button]").first.click()
    expect(groups.nth(0)).to_contain_text('"city": "北京"')
    expect(groups.nth(0)).to_contain_text(ATTACK.replace('"', '\\"'))  # JSON text, shown as it is
    expect(groups.nth(1)).to_contain_text(f"晴 ``` {ATTACK} **bold**")  # no Markdown, no HTML
    assert page.locator("#chatbot img").count() == 0 and page.evaluate("window.__xss") is None
    expect(page.locator(BOT).last).to_contain_text("It is sunny in 北京.")
    settle(page, max_length=160)
    chat(page, "And tomorrow?")  # the call and its result go to the model with the history
    expect(page.locator(USER)).to_have_count(2)
    expect(page.locator(THOUGHT)).to_have_count(2)
