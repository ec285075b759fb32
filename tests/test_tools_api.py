"""Tool calling end to end through the real server (page, gate, /v1, engine) with the openai
package and LangChain's bind_tools, on tiny ChatGLM3 and GLM-4 checkpoints whose answers a test-only
model scripts: it reads the tokens it is fed and forces the next token of a scripted answer, so
the prompt layout, the engine, the answer reading and the API are all the real ones."""
import json
import os

import httpx
import pytest
import torch
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import BadRequestError, OpenAI

from model_runtime.loading.loader import load_model
from tests.webdemo_server import MODEL_NAME, serving

QUESTION = "北京天气怎么样？"
RESULT = '{"temperature": 22, "sky": "晴"}'
FINAL = "北京今天晴，气温 22 度。"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {}}}}
ARGUMENTS = {"chatglm3": "```python\ntool_call(city='北京')\n```", "glm4": '{"city": "北京"}'}


class ScriptedModel:
    """Stands in for a model: its "hidden state" is where each row stands (slot, position), so
    `logits` sees the whole sequence so far (prompt and answer) and forces the next token of
    `script(prompt)`, the prompt being everything up to the last <|assistant|>. Everything else
    (config, KV-cache allocation, positions) is the tiny model's."""

    def __init__(self, tokenizer, model):
        self._model, self.tokenizer = model, tokenizer
        self.assistant = tokenizer.special_id("<|assistant|>")
        self.sequences: dict[int, list[int]] = {}
        self.prompts: list[list[int]] = []  # each answer's prompt up to its last <|assistant|>, as seen
        self.script = lambda prompt: []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, tokens, positions, cache_positions, mask, slots, cache):
        # slots [B]: a row per sequence; [1, T]: a packed row, a slot per token
        token_slots = slots[:, None].expand(tokens.shape) if slots.dim() == 1 else slots
        for slot, position, token in zip(token_slots.flatten().tolist(), cache_positions.flatten().tolist(),
                                         tokens.flatten().tolist()):
            sequence = self.sequences.setdefault(slot, [])
            del sequence[position:]
            sequence.append(token)
        return torch.stack([token_slots.float(), cache_positions.float()], dim=-1)

    def logits(self, hidden):
        logits = torch.full((hidden.shape[0], self._model.config.vocab_size), -1e4)
        for row, (slot, position) in enumerate(hidden.long().tolist()):
            sequence = self.sequences[slot][:position + 1]
            cut = len(sequence) - sequence[::-1].index(self.assistant)
            prompt, answer = sequence[:cut], sequence[cut:]
            if not self.prompts or self.prompts[-1] != prompt:
                self.prompts.append(prompt)
            script = self.script(prompt)
            logits[row, script[len(answer)] if len(answer) < len(script) else self.tokenizer.eos_token_id] = 1e4
        return logits

    def says(self, text, stop="<|observation|>"):
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.special_id(stop)]

    def call_then_answer(self, name="get_weather", arguments=None, family=None):
        """Answer with a call (an answer after an observation): the real models' two steps."""
        observation = self.tokenizer.special_id("<|observation|>")

        def script(prompt):
            if observation in prompt:
                return self.tokenizer.encode("\n" + FINAL, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            return (self.tokenizer.encode(f"{name}\n", add_special_tokens=False)
                    + self.says(arguments or ARGUMENTS[family]))
        self.script = script


@pytest.fixture(scope="module")
def family_models(tiny_family_checkpoints):
    return {family: load_model(folder, device="cpu", dtype="float32")
            for family, folder in tiny_family_checkpoints.items()}


@pytest.fixture(params=["chatglm3", "glm4"])
def served(request, family_models):
    tokenizer, model = family_models[request.param]
    fake = ScriptedModel(tokenizer, model)
    fake.call_then_answer(family=request.param)
    with serving((tokenizer, fake), step_delay=0.0) as server:
        server.family, server.fake = request.param, fake
        yield server


def client(served):
    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def shown(served, prompt):
    return served.fake.tokenizer.decode(prompt, skip_special_tokens=False)


def check_second_prompt(served, call_id):
    """The call sent back and its result are in the model's own layout in the next prompt."""
    text = shown(served, served.fake.prompts[-1])
    call = "tool_call(city='北京')" if served.family == "chatglm3" else '{"city": "北京"}'
    assert "<|assistant|>get_weather\n" in text and call in text
    assert text.rstrip().endswith(f"{RESULT}<|assistant|>") and "<|observation|>" in text
    assert call_id not in text  # ids are the API's business, not the model's


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_calls_a_tool_sends_the_result_and_gets_the_answer(served, stream):
    api = client(served)
    messages = [{"role": "user", "content": QUESTION}]
    if stream:
        chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER, SEARCH],
                                                  stream=True, temperature=0))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert all(c.choices[0].delta.content in (None, "") for c in chunks)
        call_id = deltas[0].id
        name = "".join(d.function.name or "" for d in deltas)
        arguments = "".join(d.function.arguments or "" for d in deltas)
        assert {d.index for d in deltas} == {0} and call_id.startswith("call_")
    else:
        response = api.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER, SEARCH],
                                               temperature=0)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        assert call.type == "function" and call_id.startswith("call_")
    assert name == "get_weather" and json.loads(arguments) == {"city": "北京"}
    first_prompt = shown(served, served.fake.prompts[-1])
    assert "## get_weather" in first_prompt or '"name": "get_weather"' in first_prompt
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": RESULT}]
    if stream:
        chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER, SEARCH],
                                                  stream=True, temperature=0))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == FINAL
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
    else:
        final = api.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER, SEARCH])
        assert final.choices[0].message.content == FINAL and final.choices[0].finish_reason == "stop"
        assert final.choices[0].message.tool_calls is None
    check_second_prompt(served, call_id)


@tool
def get_weather(city: str) -> str:
    """查询城市的天气"""
    return RESULT


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_bind_tools_agent_loop(served, stream):
    llm = ChatOpenAI(model=MODEL_NAME, base_url=served.url + "/v1", api_key="unused", temperature=0,
                     max_retries=0, timeout=60).bind_tools([get_weather])

    def ask(messages):
        if not stream:
            return llm.invoke(messages)
        chunks = list(llm.stream(messages))
        merged = chunks[0]
        for chunk in chunks[1:]:
            merged += chunk
        return merged

    messages = [HumanMessage(QUESTION)]
    ai = ask(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "北京"})]
    messages += [ai, get_weather.invoke(ai.tool_calls[0])]  # the client runs the tool: a ToolMessage
    final = ask(messages)
    assert final.content == FINAL and not final.tool_calls
    check_second_prompt(served, ai.tool_calls[0]["id"])


def test_named_tool_choice_starts_the_call_in_the_prompt(served):
    def ask(**choice):
        return client(served).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER, SEARCH], **choice)

    auto, named = ask(), ask(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert auto.choices[0].message.tool_calls[0].function == named.choices[0].message.tool_calls[0].function
    # the prompt wrote "get_weather\n" after <|assistant|>: the model wrote only the arguments
    name_tokens = len(served.fake.tokenizer.encode("get_weather\n", add_special_tokens=False))
    assert auto.usage.completion_tokens - named.usage.completion_tokens == name_tokens
    assert named.usage.prompt_tokens - auto.usage.prompt_tokens < 0  # the other tool is left out
    prompt = shown(served, served.fake.prompts[-1])
    assert prompt.endswith("<|assistant|>") and "## search" not in prompt and '"name": "search"' not in prompt
    for choice, message in (("required", "exactly one tool"), ({"type": "function", "function": {"name": "nope"}},
                                                                "not in 'tools'")):
        with pytest.raises(BadRequestError, match=message):
            client(served).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "q"}],
                                                   tools=[WEATHER, SEARCH], tool_choice=choice)


@pytest.mark.parametrize("arguments", ["tool_call(city=__import__('os').system('touch {canary}'))",
                                       "```python\ntool_call(city=open('{canary}', 'w'))\n```",
                                       '{{"city": "北京"', "```python\ntool_call(city='北京'\n```"])
def test_malformed_calls_and_code_come_back_as_text_never_run(served, tmp_path, arguments):
    canary = tmp_path / "canary"
    served.fake.call_then_answer(arguments=arguments.format(canary=canary))
    response = client(served).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER])
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    name, text = choice.message.content.split("\n", 1)
    assert name == "get_weather" and text.strip() == arguments.format(canary=canary)
    assert not os.path.exists(canary)


@pytest.mark.parametrize("body, message", [
    ({"tools": {"type": "function"}}, "'tools' must be a list"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "two tools are named"),
    ({"tool_choice": "always", "tools": [WEATHER]}, "'tool_choice' must be"),
    ({"tool_choice": "auto"}, "needs 'tools'"),
    ({"parallel_tool_calls": "yes", "tools": [WEATHER]}, "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "JSON object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[" * 10000}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "JSON object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}, "tool_call_id"),
])
def test_bad_tool_requests_are_json_400s(served, body, message):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "q"}], **body}
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert client(served).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "q"}],
                                                  max_tokens=4).choices


def test_chatglm_6b_and_chatglm2_refuse_tools_naming_the_models_that_have_them(family_models, tiny_model):
    for pair in (family_models["chatglm2"], tiny_model):
        with serving(pair) as server:
            api = client(server)
            for extra in ({"tools": [WEATHER]}, {"messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "r"}]}):
                arguments = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "q"}], **extra}
                with pytest.raises(BadRequestError, match="ChatGLM3-6B and GLM-4-9B-chat"):
                    api.chat.completions.create(**arguments)
            assert api.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "q"}],
                                               max_tokens=4).choices[0].finish_reason in ("stop", "length")
