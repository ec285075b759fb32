"""Reading the calls ChatGLM3-6B and GLM-4-9B-chat write, on canned answers: plain text, one call,
nested JSON and Chinese arguments, malformed calls and calls that try to run code. Model output
is never executed: a call is read by walking its syntax tree, and anything but literals is text."""
import json
import os

import pytest

from model_runtime.chat.tool_calls import CHATGLM3_TOOLS, GLM4_TOOLS, MAX_CALL_CHARS, NotACall

NAMES = ("get_weather", "search")


def chatglm3(code):
    return f"get_weather\n```python\n{code}\n```"


@pytest.mark.parametrize("dialect", [CHATGLM3_TOOLS, GLM4_TOOLS])
@pytest.mark.parametrize("answer", ["", "\n北京今天晴。", "The weather is fine.", "get_weather", "get_weather\n",
                                    "\nget_weather\n{\"city\": \"x\"}"])
def test_plain_text_is_not_a_call(dialect, answer):
    assert dialect.parse(answer, NAMES) is None


def test_chatglm3_one_call():
    call = CHATGLM3_TOOLS.parse(chatglm3("tool_call(city='Beijing', days=3)"), NAMES)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Beijing", "days": 3})


def test_glm4_one_call():
    call = GLM4_TOOLS.parse('get_weather\n{"city": "Beijing", "days": 3}', NAMES)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Beijing", "days": 3})


def test_nested_and_chinese_arguments():
    value = {"城市": "北京", "options": {"units": ["摄氏度", None, True, False], "range": [-2.5, 1e3, -7]},
             "quote": "it's \"quoted\"\n"}
    code = "tool_call(" + ", ".join(f"{k}={v!r}" for k, v in value.items() if k.isidentifier()) + ")"
    expected = {k: v for k, v in value.items() if k.isidentifier()}
    glm3 = CHATGLM3_TOOLS.parse(chatglm3(code), NAMES)
    assert json.loads(glm3.arguments) == expected
    assert "北京" in glm3.arguments  # arguments are JSON text with Chinese kept (ensure_ascii=False)
    glm4 = GLM4_TOOLS.parse("search\n" + json.dumps(value, ensure_ascii=False, indent=2), NAMES)
    assert glm4.name == "search" and json.loads(glm4.arguments) == value and "北京" in glm4.arguments
    chinese_keys = CHATGLM3_TOOLS.parse(chatglm3("tool_call(城市='北京', 天数=(1, 2))"), NAMES)
    assert json.loads(chinese_keys.arguments) == {"城市": "北京", "天数": [1, 2]}


@pytest.mark.parametrize("answer", [
    "unknown_tool\n```python\ntool_call(city='x')\n```",  # not one of the request's tools
    chatglm3("tool_call(city='x'"),  # unclosed
    chatglm3("tool_call('x')"),  # positional
    chatglm3("tool_call(**{'city': 'x'})"),
    chatglm3("tool_call(city='x', city='y')"),
    chatglm3("other(city='x')"),
    chatglm3("tool_call(city='x')\ntool_call(city='y')"),
    chatglm3("tool_call(city=x)"),  # a name, not a literal
    chatglm3("tool_call(n=1+2)"),
    chatglm3("tool_call(n=1e999)"),  # infinity is no JSON number
    chatglm3("tool_call(d={1: 'a'})"),  # JSON keys are strings
    chatglm3("tool_call(s={1, 2})"),
    chatglm3("tool_call(b=b'x')"),
    chatglm3("tool_call(c=1j)"),
    chatglm3("tool_call(v=[i for i in range(3)])"),
    chatglm3("tool_call(v=" + "[" * 500 + "]" * 500 + ")"),  # nested beyond any sane depth
    "get_weather\ntool_call(city='x')",  # no fence
    "get_weather\n```\ntool_call(city='x')\n```",  # not a python fence
])
def test_malformed_chatglm3_calls_are_plain_text(answer):
    assert CHATGLM3_TOOLS.parse(answer, NAMES) is None


@pytest.mark.parametrize("answer", [
    'unknown_tool\n{"city": "x"}', 'get_weather\n{"city": "x"', 'get_weather\n["x"]', 'get_weather\n"x"',
    'get_weather\n{"n": NaN}', 'get_weather\n{"n": Infinity}', "get_weather\n{'city': 'x'}",
    'get_weather\n{"city": "x"} trailing', "get_weather\n" + "[" * 100_000 + "]" * 100_000,
    "get_weather\n" + "{\"a\":" * 100_000,
])
def test_malformed_glm4_calls_are_plain_text(answer):
    assert GLM4_TOOLS.parse(answer, NAMES) is None


def test_overlong_answers_are_not_read():
    assert CHATGLM3_TOOLS.parse(chatglm3(f"tool_call(s='{'x' * MAX_CALL_CHARS}')"), NAMES) is None
    assert GLM4_TOOLS.parse('get_weather\n{"s": "' + "x" * MAX_CALL_CHARS + '"}', NAMES) is None


@pytest.mark.parametrize("code", [
    "tool_call(x=__import__('os').system('touch {canary}'))",
    "tool_call(x=open('{canary}', 'w').write('x'))",
    "tool_call(x=(lambda: __import__('os').system('touch {canary}'))())",
    "__import__('os').system('touch {canary}')",
    "tool_call(**__import__('os').system('touch {canary}') or {{}})",
    "tool_call(x=[__import__('pathlib').Path('{canary}').touch()])",
])
def test_calls_that_try_code_are_plain_text_and_never_run(tmp_path, code):
    canary = tmp_path / "canary"
    for dialect, answer in ((CHATGLM3_TOOLS, chatglm3(code.format(canary=canary))),
                            (GLM4_TOOLS, "get_weather\n" + code.format(canary=canary))):
        assert dialect.parse(answer, NAMES) is None
    assert not os.path.exists(canary)


def test_calls_sent_back_are_written_as_each_model_writes_them():
    arguments = json.dumps({"city": "北京", "days": 3, "opts": {"a": [True, None, -1.5]}}, ensure_ascii=False)
    assert CHATGLM3_TOOLS.call_content(arguments) == \
        "```python\ntool_call(city='北京', days=3, opts={'a': [True, None, -1.5]})\n```"
    assert GLM4_TOOLS.call_content(arguments) == arguments
    # and the model's own way of writing reads back as the same call
    again = CHATGLM3_TOOLS.parse("get_weather\n" + CHATGLM3_TOOLS.call_content(arguments), NAMES)
    assert json.loads(again.arguments) == json.loads(arguments)
    for bad in ('["x"]', '{"not an identifier": 1}', "not json"):
        with pytest.raises(NotACall):
            CHATGLM3_TOOLS.call_content(bad)
