"""Prompts of conversations with tools, laid out as the official code lays them out
(docs/tool-calling.md): token for token with the real ChatGLM3 tokenizer, character for
character against GLM-4-9B-chat's own chat template; and the streamed answer that holds a call
back until it can be read."""
import json

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import SentencePieceProcessor

from model_runtime.chat.answer_text import AnswerText
from model_runtime.chat.planning import plan_messages
from model_runtime.loading.family import load_tokenizer, read_config
from model_runtime.protocol import InvalidRequest, Message, Tool, ToolCall, ToolChoice
from model_runtime.tokenizers.glm2 import ChatGLM2Tokenizer

from .conftest import reference_file

WEATHER = {"name": "get_weather", "description": "查询城市的天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                          "required": ["city"]}}
SEARCH = {"name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": {}}}
TOOLS = (Tool("get_weather", json.dumps(WEATHER, ensure_ascii=False)), Tool("search", json.dumps(SEARCH)))
CALL = ToolCall("call_1", "get_weather", '{"city": "北京"}')
CONVERSATION = (Message("system", "Be brief."), Message("user", "北京天气怎么样？"),
                Message("assistant", "", (CALL,)), Message("tool", '{"temperature": 22}', tool_call_id="call_1"))
SP_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
               "<|observation|>"]


@pytest.fixture(scope="module")
def chatglm3():
    return ChatGLM2Tokenizer(reference_file("tokenizers/chatglm2-3-tokenizer.model"), "chatglm3")


@pytest.fixture(scope="module")
def tokenizers(tiny_family_checkpoints):
    return {family: load_tokenizer(folder, read_config(folder)) for family, folder in tiny_family_checkpoints.items()}


def test_chatglm3_prompt_with_tools_a_call_and_an_observation_token_for_token(chatglm3):
    """Built here straight from the documented format with SentencePiece alone: build_single_message
    = [<|role|>] + encode(metadata + "\\n") + encode(content); the tools system message of
    build_chat_input; the call as finetune_demo's format_function_call writes it."""
    sp = SentencePieceProcessor(model_file=str(reference_file("tokenizers/chatglm2-3-tokenizer.model")))
    special = {name: sp.vocab_size() + i for i, name in enumerate(SP_SPECIALS)}

    def message(role, metadata, content):
        return [special[f"<|{role}|>"]] + sp.encode(f"{metadata}\n") + sp.encode(content)

    system = "Be brief.\n" + json.dumps([WEATHER, SEARCH], indent=4, ensure_ascii=False)
    expected = ([special["[gMASK]"], special["sop"]] + message("system", "", system)
                + message("user", "", "北京天气怎么样？")
                + message("assistant", "get_weather", "```python\ntool_call(city='北京')\n```")
                + message("observation", "", '{"temperature": 22}') + [special["<|assistant|>"]])
    assert plan_messages(chatglm3, CONVERSATION, 8192, TOOLS).tokens == expected
    # Without a system message the default tool instruction leads; these ids are the ones
    # THUDM/ChatGLM3's finetune_demo README prints for such a prompt ('Answer', 'the', 'following').
    plain = plan_messages(chatglm3, CONVERSATION[1:], 8192, TOOLS).tokens
    assert plain[:8] == [64790, 64792, 64794, 30910, 13, 20115, 267, 1762]
    assert chatglm3.decode(plain[5:]).startswith(
        "Answer the following questions as best as you can. You have access to the following tools:\n[\n    {\n"
        '        "name": "get_weather",\n        "description": "查询城市的天气",')


# The function-tool part of glm-4-9b-chat's tokenizer_config.json chat_template (the python,
# simple_browser and cogview branches left out), rendered as written. transformers renders it with
# trim_blocks, which eats the first "\n" of "\n\n## NAME" (it follows a block tag); the tokenizer's
# own Python apply_chat_template it replaced, and THUDM/GLM-4's composite demo, write "\n\n## NAME",
# as the template's text does: that is the layout kept (docs/tool-calling.md).
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{% set tools = item['tools'] %}"
    "{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}"
    "{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def glm4_template(messages):
    env = ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(GLM4_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def test_glm4_prompt_with_tools_a_call_and_an_observation_matches_its_chat_template(tokenizers):
    # The messages as THUDM/GLM-4's glm_server.py process_messages hands them to the template.
    official = glm4_template([
        {"role": "system", "content": "Be brief.", "tools": [{"type": "function", "function": WEATHER},
                                                             {"type": "function", "function": SEARCH}]},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"temperature": 22}'}])
    glm4 = tokenizers["glm4"]
    prompt = plan_messages(glm4, CONVERSATION, 8192, TOOLS).tokens
    assert glm4.decode(prompt, skip_special_tokens=False) == official
    assert "\n\n## get_weather\n\n{\n    \"name\": \"get_weather\",\n    \"description\": \"查询城市的天气\"" in official


def test_assistant_text_before_a_call_and_several_calls(chatglm3):
    second = ToolCall("call_2", "search", '{"q": "天气", "n": [1, -2.5, null, true]}')
    messages = (Message("user", "q"), Message("assistant", "Let me look.", (CALL, second)),
                Message("tool", "r1", tool_call_id="call_1"), Message("tool", "r2", tool_call_id="call_2"))
    text = chatglm3.decode(plan_messages(chatglm3, messages, 8192, TOOLS).tokens, skip_special_tokens=False)
    assert text.endswith("<|user|>\n q<|assistant|>\n Let me look.<|assistant|>get_weather\n ```python\n"
                         "tool_call(city='北京')\n```<|assistant|>search\n ```python\n"
                         "tool_call(q='天气', n=[1, -2.5, None, True])\n```<|observation|>\n r1<|observation|>\n r2"
                         "<|assistant|>")


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_tool_choice_shapes_the_prompt(tokenizers, family):
    tokenizer = tokenizers[family]
    user = (Message("user", "北京天气怎么样？"),)

    def text(tools, choice):
        plan = plan_messages(tokenizer, user, 8192, tools, choice)
        return tokenizer.decode(plan.tokens, skip_special_tokens=False), plan.tool_reader

    auto, reader = text(TOOLS, ToolChoice())
    assert "get_weather" in auto and "search" in auto and auto.endswith("<|assistant|>")
    assert reader.names == ("get_weather", "search") and reader.forced is None
    named, reader = text(TOOLS, ToolChoice("function", "search"))
    assert "get_weather" not in named and named.endswith("<|assistant|>search\n") and reader.forced == "search"
    required, reader = text(TOOLS[:1], ToolChoice("required"))
    assert required.endswith("<|assistant|>get_weather\n") and reader.forced == "get_weather"
    none, reader = text(TOOLS, ToolChoice("none"))
    assert "get_weather" not in none and reader is None
    with pytest.raises(InvalidRequest, match="exactly one tool"):
        text(TOOLS, ToolChoice("required"))
    with pytest.raises(InvalidRequest, match="not one of the tools"):
        text(TOOLS, ToolChoice("function", "other"))


def test_models_without_tools_refuse_them_naming_those_that_have_them(tokenizers, tiny_model):
    for tokenizer in (tokenizers["chatglm2"], tiny_model[0]):
        with pytest.raises(InvalidRequest, match="ChatGLM3-6B and GLM-4-9B-chat"):
            plan_messages(tokenizer, (Message("user", "hi"),), 512, TOOLS)
        with pytest.raises(InvalidRequest, match="ChatGLM3-6B and GLM-4-9B-chat"):
            plan_messages(tokenizer, CONVERSATION[1:], 512)


def test_old_turns_are_dropped_whole_and_the_last_turn_is_kept(chatglm3):
    old = [Message("user", f"问题 {i} " + "很长的话。" * 40) for i in range(6)]
    messages = tuple(m for u in old for m in (u, Message("assistant", "", (CALL,)),
                                              Message("tool", "结果" * 30, tool_call_id="call_1")))
    messages += (Message("user", "最后的问题"),)
    plan = plan_messages(chatglm3, messages, 700, TOOLS)
    text = chatglm3.decode(plan.tokens, skip_special_tokens=False)
    assert 0 < plan.dropped_turns < 6 and len(plan.tokens) <= 700 - 175
    kept = 6 - plan.dropped_turns
    assert text.count("<|user|>") == kept + 1 and text.count("<|observation|>") == kept  # whole turns
    assert "get_weather" in text.split("<|user|>")[0] and text.endswith("最后的问题<|assistant|>")
    with pytest.raises(InvalidRequest, match="maximum length"):
        plan_messages(chatglm3, (Message("user", "长" * 2000),), 700, TOOLS)


@pytest.mark.parametrize("bad", [(Message("user", "q"), Message("assistant", "", (CALL,))),
                                 (Message("user", "q"), Message("assistant", "", (ToolCall("c", "f", '{"a-b": 1}'),)),
                                  Message("tool", "r"))])
def test_conversations_that_cannot_be_laid_out_are_refused(chatglm3, bad):
    with pytest.raises(InvalidRequest):
        plan_messages(chatglm3, bad, 8192, TOOLS)


def stream(tokenizer, reader, text, stop=()):
    """AnswerText fed the answer's tokens one at a time: (shown deltas, final delta, answer text).
    text: a string, or a list of strings to join with <|assistant|> tokens."""
    parts = [tokenizer.encode(part, add_special_tokens=False) for part in ([text] if isinstance(text, str) else text)]
    tokens = parts[0]
    for part in parts[1:]:
        tokens = tokens + [tokenizer.special_id("<|assistant|>")] + part
    answer = AnswerText(tokenizer, stop, reader)
    deltas = [answer.update(tokens[:n]) for n in range(1, len(tokens) + 1)]
    return [d for d in deltas if d], answer.finish(tokens), answer


@pytest.mark.parametrize("family, call_text", [("chatglm3", "get_weather\n```python\ntool_call(city='北京')\n```"),
                                               ("glm4", 'get_weather\n{"city": "北京"}')])
def test_a_call_is_held_back_and_read_a_plain_answer_streams(tokenizers, family, call_text):
    tokenizer = tokenizers[family]
    reader = plan_messages(tokenizer, CONVERSATION[:2], 8192, TOOLS).tool_reader
    deltas, last, answer = stream(tokenizer, reader, call_text)
    assert deltas == [] and last == "" and answer.shown == ""
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [("get_weather", {"city": "北京"})]
    assert answer.tool_calls[0].id.startswith("call_")
    deltas, last, answer = stream(tokenizer, reader, "\n北京今天晴，气温二十二度。")
    assert len(deltas) > 1 and "".join(deltas) + last == answer.shown == "北京今天晴，气温二十二度。"
    assert answer.tool_calls == ()
    for malformed in (call_text[:-3], "get_weather\n```python\ntool_call(x=__import__('os'))\n```", "hello\nworld"):
        deltas, last, answer = stream(tokenizer, reader, malformed)
        assert deltas == [] and answer.tool_calls == () and last == answer.shown == malformed.strip()
    forced = plan_messages(tokenizer, CONVERSATION[:2], 8192, TOOLS, ToolChoice("function", "get_weather"))
    deltas, last, answer = stream(tokenizer, forced.tool_reader, call_text.split("\n", 1)[1])
    assert deltas == [] and answer.tool_calls[0].name == "get_weather"


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_text_then_a_call_in_a_second_assistant_message(tokenizers, family):
    """ChatGLM3's format lets an answer write text, then <|assistant|>NAME and the call
    (THUDM/ChatGLM3 PROMPT_en.md): the text streams, the call is read at the end."""
    tokenizer = tokenizers[family]
    reader = plan_messages(tokenizer, CONVERSATION[:2], 8192, TOOLS).tool_reader
    call = "get_weather\n```python\ntool_call(city='北京')\n```" if family == "chatglm3" else \
        'get_weather\n{"city": "北京"}'
    deltas, last, answer = stream(tokenizer, reader, ["\n好的，我来查一下北京的天气。", call])
    assert "".join(deltas) + last == answer.shown == "好的，我来查一下北京的天气。" and len(deltas) > 1
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [("get_weather", {"city": "北京"})]
    deltas, last, answer = stream(tokenizer, reader, ["\n好的。", "get_weather\n(city='北京')"])
    assert answer.tool_calls == () and answer.shown.startswith("好的。") and "(city='北京')" in answer.shown
