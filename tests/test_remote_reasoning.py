"""The remote backend (`--backend openai`) in front of an OpenAI-compatible server that serves a
reasoning, tool-calling model: this project's own /v1 on 127.0.0.1, serving a tiny GLM-Z1 whose
answers tests.test_tools_api.ScriptedModel scripts. Tools, tool calls, results and
reasoning_content go through both ways."""
import json

import pytest

from model_runtime.protocol import ChatRequest, Message, SamplingParams, Tool
from tests.test_glm_reasoning import THINKING, scripted, tiny_hf, weather_script  # noqa: F401 (fixture)
from tests.test_tools_api import FINAL, QUESTION, RESULT, WEATHER
from tests.webdemo_server import MODEL_NAME, serving
from webdemo.remote import OpenAIBackend

TOOLS = (Tool("get_weather", json.dumps(WEATHER["function"], ensure_ascii=False)),)


@pytest.fixture
def remote(tiny_hf):  # noqa: F811
    tokenizer, model = tiny_hf["z1"]
    fake = scripted(tokenizer, model, weather_script(tokenizer, thinks=True))
    with serving((tokenizer, fake), step_delay=0.0) as server:
        backend = OpenAIBackend(server.url + "/v1", context_length=4096)
        try:
            yield backend, fake
        finally:
            backend.close()


def events_of(backend, messages, tools=TOOLS):
    return list(backend.submit(ChatRequest(tuple(messages), SamplingParams(max_length=4096, temperature=0),
                                           tools=tools)))


def test_reasoning_and_tool_calls_come_back_and_results_go_out(remote):
    backend, fake = remote
    assert backend.info.name == MODEL_NAME and backend.info.supports_tools
    messages = [Message("user", QUESTION)]
    events = events_of(backend, messages)
    last = events[-1]
    assert last.finish_reason == "tool_calls" and last.text == "" and last.reasoning == THINKING
    assert "".join(e.reasoning_delta for e in events) == THINKING
    (call,) = last.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "北京"} and call.id
    first_prompt = fake.tokenizer.decode(fake.prompts[-1], skip_special_tokens=False)
    assert "## get_weather" in first_prompt  # the tools reached the model through the remote server
    messages += [Message("assistant", "", tool_calls=last.tool_calls), Message("tool", RESULT, tool_call_id=call.id)]
    last = events_of(backend, messages)[-1]
    assert (last.finish_reason, last.text, last.reasoning) == ("stop", FINAL, THINKING)
    second_prompt = fake.tokenizer.decode(fake.prompts[-1], skip_special_tokens=False)
    assert f'<|assistant|>get_weather \n{{"city": "北京"}}<|observation|>\n{RESULT}<|assistant|>' in second_prompt


def test_without_tools_a_call_is_text_and_the_thinking_stays_apart(remote):
    backend, _ = remote
    last = events_of(backend, [Message("user", QUESTION)], tools=())[-1]
    assert (last.finish_reason, last.text, last.reasoning) == ("stop", 'get_weather\n{"city": "北京"}', THINKING)
