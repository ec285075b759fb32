"""webdemo.render: Markdown that cannot carry HTML, and the HTML/JSON transcript."""
import json
import re
import time
from datetime import datetime, timezone

import pytest

from webdemo.render import (MAX_FORMULAS, chat_message, code_block, conversation_html, conversation_json,
                            escape_markdown, message_html, sanitize_html, segments, tool_message)

TEXTS = [
    "plain text",
    "<script>alert(1)</script>",
    "```python\ndef f():\n    return 1<2\n```\nafter <b>",
    "use `<b>` here & `` a`b `` <i>",
    "- item\n\n        indented <code>\n",
    "text\n\n    code <x>\n\nmore <y>",
    "```\nunclosed <z>",
    "a\n```\nb\n```\n```\nc\n```\nd\n",
    "$a<b$ and $$\\frac{1}{2}$$ and \\(x\\) \\[y\\]",
    "| a | b |\n|:-|-:|\n| <i>1</i> | $x$ |",
    "\n\n\n",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_segments_cover_the_text_exactly(text):
    for keep_math in (False, True):
        assert "".join(s.text for s in segments(text, keep_math)) == text


@pytest.mark.parametrize("attack, visible", [
    ("<script>alert(1)</script>", "&lt;script>alert(1)&lt;/script>"),
    ('<img src=x onerror="alert(1)">', '&lt;img src=x onerror="alert(1)">'),
    ("&lt;b&gt;", "&amp;lt;b&amp;gt;"),
    ("![pic](http://evil.example/p.png)", "!&#91;pic](http://evil.example/p.png)"),
    ("[go](javascript:alert(1))", "[go&#93;(javascript:alert(1))"),
    ("[go]( <javascript:alert(1)>)", "[go&#93;( &lt;javascript:alert(1)>)"),
    ("[go](data:text/html,x)", "[go&#93;(data:text/html,x)"),
    ("[r]: javascript:alert(1)", "&#91;r&#93;: javascript:alert(1)"),
])
def test_prose_html_images_and_script_links_become_text(attack, visible):
    assert escape_markdown(attack) == visible


def test_safe_links_code_and_quotes_are_kept():
    assert escape_markdown("[docs](https://example.com) and [mail](mailto:a@b.c)") == \
        "[docs](https://example.com) and [mail](mailto:a@b.c)"
    code = "```html\n<script>alert(1)</script>\n    indented\n```"
    assert escape_markdown(code) == code
    assert escape_markdown("`<b>` and <b>") == "`<b>` and &lt;b>"
    assert escape_markdown("> quoted\n\n**bold**") == "> quoted\n\n**bold**"


def test_math_is_escaped_for_the_page_but_kept_for_mdtex2html():
    assert escape_markdown("$a<b$") == "$a&lt;b$"
    assert escape_markdown("$a<b$ <i>", keep_math=True) == "$a<b$ &lt;i>"


def test_chat_message_is_a_text_block():
    message = chat_message("assistant", "```\n    x\n```")
    assert message == {"role": "assistant", "content": {"type": "text", "text": "```\n    x\n```"}}


def test_sanitize_html_allows_markup_and_mathml_only():
    clean = sanitize_html('<p class="x" onclick="evil()">hi <a href="javascript:x">a</a> <a href="https://e.x">b</a>'
                          '<script>alert(1)</script><img src=x onerror=y><math><mi>x</mi></math>'
                          '<td style="text-align: left;">c</td><td style="background:url(x)">d</td><!-- c --></p>')
    assert "onclick" not in clean and "javascript" not in clean
    assert '<a href="https://e.x" rel="noopener noreferrer">b</a>' in clean
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in clean
    assert "&lt;img src=x onerror=y&gt;" in clean
    assert "<math><mi>x</mi></math>" in clean
    assert '<td style="text-align: left;">c</td>' in clean and "url(" not in clean
    assert "<!--" not in clean


def test_message_html_renders_markdown_code_tables_and_math():
    html = message_html("**bold** $x^2$ and $$\\frac{1}{2}$$\n\n```python\ndef f():\n    return 1 < 2\n```\n\n"
                        "| a | b |\n|---|---|\n| 1 | 2 |\n\nuse `a<b`")
    assert "<strong>bold</strong>" in html
    assert html.count("<math") == 2 and "<mfrac>" in html
    assert '<pre><code class="language-python">def f():\n    return 1 &lt; 2\n</code></pre>' in html
    assert "<table>" in html and "<td>1</td>" in html
    assert "<code>a&lt;b</code>" in html


@pytest.mark.parametrize("attack", [
    "<script>alert(1)</script>", '<img src=x onerror="alert(1)">', "[x](javascript:alert(1))",
    "![x](http://evil.example/x.png)", "$\\text{<img src=x onerror=alert(1)>}$", "<svg onload=alert(1)>",
    '<a href="javascript:alert(1)">x</a>', "```\nunclosed <script>", "\\[<script>alert(1)</script>\\]",
])
def test_message_html_never_contains_active_html(attack):
    html = message_html(attack)
    assert not re.search(r"<(script|img|svg|iframe)\b", html)
    assert not re.search(r"<[^>]+\son\w+\s*=", html)
    assert not re.search(r'<[^>]+href="\s*javascript', html)


def test_conversation_html_is_self_contained():
    history = [{"role": "user", "content": "Show <b>me</b> $e^{i\\pi}$"},
               {"role": "assistant", "content": "```\n  x = 1\n```"}]
    page = conversation_html(history, "chatglm-6b", datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc))
    assert page.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in page  # no scripts, no remote loads even if something slipped through
    assert "Show &lt;b&gt;me&lt;/b&gt;" in page and "<math" in page
    assert "<pre><code>  x = 1\n</code></pre>" in page
    assert "2026-01-02 03:04 UTC" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_conversation_json_round_trips():
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<b>hi</b>"}]
    data = json.loads(conversation_json(history, "chatglm-6b"))
    assert data["model"] == "chatglm-6b" and data["messages"] == history
    assert datetime.fromisoformat(data["exported_at"])


def test_formulas_beyond_the_budget_stay_as_text_and_cost_little():
    history = [{"role": "user", "content": "$$a$$ " * 2500}, {"role": "assistant", "content": "$y$ " * 4000}] * 4
    started = time.perf_counter()
    page = conversation_html(history, "m")
    assert time.perf_counter() - started < 10  # about a millisecond per formula otherwise: 30 s
    assert page.count("<math") == MAX_FORMULAS and "<code>$y$</code>" in page
    assert message_html("a $x^2$ b", max_formulas=0) == "<p>a <code>$x^2$</code> b</p>"


TOOL_CHAT = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "<b>北京</b>"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "```\n</code><script>alert(1)</script>"},
    {"role": "assistant", "content": "Sunny."},
]


@pytest.mark.parametrize("text", TEXTS + ["```\n</code><img src=x>", "a ```` b ````` c"])
def test_a_tool_message_is_one_collapsed_code_block_whatever_its_text(text):
    message = tool_message("🛠 Called `f`", text)
    assert message["metadata"] == {"title": "🛠 Called `f`", "status": "done"}  # "done": shown collapsed
    block = message["content"]["text"]
    (segment,) = segments(block)  # nothing in the text closes the fence early
    assert segment.kind == "block" and segment.code == text + "\n" and block == code_block(text)


def test_the_transcript_shows_tool_calls_and_results_collapsed_and_escaped():
    page = conversation_html(TOOL_CHAT, "glm-4-9b-chat")
    assert page.count("<details") == 2 and "Tool call / 工具调用: get_weather</summary>" in page
    assert "Tool result / 工具结果: get_weather</summary>" in page
    assert "&lt;b&gt;北京&lt;/b&gt;" in page and "&lt;script&gt;" in page
    assert "<script" not in page and "<b>" not in page


def test_conversation_json_keeps_tool_calls_and_results():
    data = json.loads(conversation_json(TOOL_CHAT, "glm-4-9b-chat"))
    assert data["messages"] == TOOL_CHAT
