"""GLM-Z1's thinking apart from its answer (splitting while streaming, /v1 `reasoning_content`,
history without the thinking) and GLM-4-0414 tool calls through the OpenAI tools API, end to end
on the real server with tiny checkpoints whose answers tests.test_tools_api.ScriptedModel scripts
(the prompt layout, engine, answer reading and API are the real ones)."""
import json

import pytest
from openai import OpenAI

from model_runtime.chat.answer_text import AnswerText
from model_runtime.chat.reasoning import split_thinking, visible_reply
from model_runtime.chat.stream import stream_answer
from model_runtime.loading.loader import load_model
from model_runtime.protocol import SamplingParams
from model_runtime.tiny.glm_hf import write_tiny_hf_checkpoint
from tests.test_tools_api import FINAL, QUESTION, RESULT, WEATHER, ScriptedModel
from tests.webdemo_server import MODEL_NAME, serving

THINKING = "用户问天气。我应该查一下。"
ANSWER = "北京今天晴。"


@pytest.mark.parametrize("opened", [True, False])
def test_thinking_and_reply_only_grow_while_streaming(opened):
    raw = ("" if opened else "<think>") + f"\n{THINKING}\n</think>\n\n{ANSWER}"
    thinking = reply = ""
    for end in range(len(raw) + 1):
        now_thinking, now_reply = split_thinking(raw[:end], opened, final=False)
        assert now_thinking.startswith(thinking) and now_reply.startswith(reply), raw[:end]
        thinking, reply = now_thinking, now_reply
    assert split_thinking(raw, opened, final=True) == (THINKING, f"\n\n{ANSWER}")
    assert split_thinking("还在想</thi", True, final=False) == ("还在想", "")  # a partial marker is held back
    assert split_thinking("没想完", True, final=True) == ("没想完", "")  # never closed: all thinking
    assert split_thinking("plain answer", False, final=True) == ("", "plain answer")
    assert visible_reply(raw) == ANSWER and visible_reply(ANSWER) == ANSWER


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(tokenizer, model) of the tiny GLM-Z1 and GLM-4-0414, float32."""
    root = tmp_path_factory.mktemp("tiny-hf")
    return {tiny: load_model(write_tiny_hf_checkpoint(root / tiny, tiny), device="cpu", dtype="float32")
            for tiny in ("z1", "glm4-0414")}


def test_answer_text_splits_the_thinking_token_by_token(tiny_hf):
    tokenizer, _ = tiny_hf["z1"]
    tokens = tokenizer.encode_text(f"\n{THINKING}\n</think>\n\n{ANSWER}") + [tokenizer.eos_token_id]
    text, thinking, shown = AnswerText(tokenizer), "", ""
    for end in range(1, len(tokens)):
        shown += text.update(tokens[:end])
        thinking += text.reasoning_delta
        assert text.thinking == thinking and ANSWER.startswith(shown) and "</think>" not in thinking + shown
    shown += text.finish(tokens)
    assert (text.thinking, shown, text.shown) == (THINKING, ANSWER, ANSWER)


def test_model_chat_history_keeps_the_visible_reply_only(tiny_hf):
    tokenizer, model = tiny_hf["z1"]
    updates = list(stream_answer(model, tokenizer, "你好", [], SamplingParams(max_length=96, temperature=0)))
    last = updates[-1]
    assert "</think>" not in last.text and last.finish_reason in ("stop", "length")
    assert any(u.thinking for u in updates)  # the random model thinks (it rarely stops doing so)


def scripted(tokenizer, model, answer_for):
    """A ScriptedModel whose answer to a prompt is answer_for(prompt) (token ids). For a template
    whose generation prompt opens <think>, the script starts with the prompt's own tail."""
    fake = ScriptedModel(tokenizer, model)
    tail = tokenizer.encode_with_specials("\n<think>") if tokenizer.chat_format.opens_thinking else []
    fake.script = lambda prompt: tail + answer_for(prompt)
    return fake


@pytest.fixture
def z1_server(tiny_hf):
    tokenizer, model = tiny_hf["z1"]
    fake = scripted(tokenizer, model, lambda prompt: tokenizer.encode_text(f"\n{THINKING}\n</think>\n\n{ANSWER}")
                    + [tokenizer.eos_token_id])
    with serving((tokenizer, fake), step_delay=0.0) as server:
        server.fake = fake
        yield server


def api(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_v1_streams_reasoning_content_apart_from_content(z1_server):
    chunks = list(api(z1_server).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "北京天气？"}], stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == (THINKING, ANSWER)
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])  # thinking comes first


def test_v1_answer_has_reasoning_content_and_clean_content(z1_server):
    client = api(z1_server)
    message = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "北京天气？"}]
                                             ).choices[0].message
    assert message.content == ANSWER and message.model_extra["reasoning_content"] == THINKING
    # the client sends the turn back (even with the thinking in it): the prompt holds the reply only
    client.chat.completions.create(model=MODEL_NAME, messages=[
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": f"<think>{THINKING}</think>{ANSWER}"},
        {"role": "user", "content": "明天呢？"}])
    prompt = z1_server.fake.tokenizer.decode(z1_server.fake.prompts[-1], skip_special_tokens=False)
    assert THINKING not in prompt and f"<|assistant|>\n{ANSWER}<|user|>\n明天呢？<|assistant|>" in prompt


@pytest.mark.parametrize("tiny", ["glm4-0414", "z1"])
def test_tools_round_trip_in_the_0414_format(tiny_hf, tiny):
    """The model writes the function name, a newline and the JSON arguments (Z1 after its
    thinking), then stops at <|observation|>; the result goes back under <|observation|>."""
    tokenizer, model = tiny_hf[tiny]
    observation = tokenizer.special_id("<|observation|>")
    thought = f"\n{THINKING}\n</think>" if tiny == "z1" else ""

    def answer_for(prompt):
        if observation in prompt:
            return tokenizer.encode_text(f"{thought}\n{FINAL}") + [tokenizer.eos_token_id]
        return tokenizer.encode_text(f'{thought}get_weather\n{{"city": "北京"}}') + [observation]

    fake = scripted(tokenizer, model, answer_for)
    with serving((tokenizer, fake), step_delay=0.0) as server:
        client = api(server)
        messages = [{"role": "user", "content": QUESTION}]
        first = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER]).choices[0]
        assert first.finish_reason == "tool_calls" and not first.message.content
        call = first.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        assert (first.message.model_extra.get("reasoning_content") or "") == (THINKING if tiny == "z1" else "")
        messages += [first.message.model_dump(exclude_none=True, exclude={"reasoning_content"}),
                     {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
        second = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER]).choices[0]
        assert second.finish_reason == "stop" and second.message.content == FINAL
    first_prompt = tokenizer.decode(fake.prompts[0], skip_special_tokens=False)
    second_prompt = tokenizer.decode(fake.prompts[-1], skip_special_tokens=False)
    assert "# 可用工具" in first_prompt and "## get_weather" in first_prompt
    assert f'<|assistant|>get_weather \n{{"city": "北京"}}<|observation|>\n{RESULT}<|assistant|>' in second_prompt
