"""Prompt layouts, stop tokens, answer clean-up and reference defaults of each GLM chat model.

`chat_format_for(tokenizer)` gives the format of a loaded checkpoint: the family tokenizers carry
theirs (`tokenizer.chat_format`), ChatGLM-6B's tokenizer gets ChatGLM-6B's format. `chat/`,
the engine and the page go through it, so nothing else needs to know which model is loaded.

| family | prompt | stops | system prompt |
|---|---|---|---|
| chatglm  | `[Round {i}]\\n问：{q}\\n答：{a}\\n` rounds from 0, then [gMASK] <sop> | <eop> | no (put before the first query) |
| chatglm2 | [gMASK] sop `[Round {i}]\\n\\n问：{q}\\n\\n答：{a}\\n\\n` from 1 | </s> | no (put before the first query) |
| chatglm3 | [gMASK] sop, `<\\|role\\|>` + enc(metadata + "\\n") + enc(content) per message, `<\\|assistant\\|>` | </s>, <\\|user\\|>, <\\|observation\\|> | yes |
| glm4     | [gMASK]<sop>, the same per message, `<\\|assistant\\|>` | <\\|endoftext\\|>, <\\|user\\|>, <\\|observation\\|> | yes |

Role tokens are only ever placed here, by id; message text is encoded as plain text.

ChatGLM3 and GLM-4 can call functions (`tool_dialect`, `tool_calls.py`): the tools go into a
system message, a call is an assistant message whose metadata is the function name, its result
an <|observation|> message (docs/tool-calling.md).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence as Seq

from ..protocol import Message, SamplingParams
from .tool_calls import CHATGLM3_TOOLS, GLM4_TOOLS, NotACall, ToolDialect

History = Seq[tuple[str, str]]

_CJK = "\u4e00-\u9fff"
_HALF_TO_FULL = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_PUNCT_NEAR_CJK = [
    re.compile(rf"([,!:;?])([{_CJK}])"),  # before a CJK character
    re.compile(rf"([{_CJK}])([,!:;?])"),  # after a CJK character
]


def with_system_in_first_query(query: str, history: History, system: Optional[str]):
    """Models without a system role: the system text goes in front of the first query."""
    history = list(history)
    if system:
        if history:
            history[0] = (f"{system}\n{history[0][0]}", history[0][1])
        else:
            query = f"{system}\n{query}"
    return query, history


def round_prompt(query: str, history: Seq[tuple[str, str]]) -> str:
    """The ChatGLM-6B prompt: the bare query, or numbered rounds when there is history."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(text: str) -> str:
    """The reference's clean-up: strip, date placeholder, full-width punctuation next to CJK."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    text = _PUNCT_NEAR_CJK[0].sub(lambda m: _HALF_TO_FULL[m[1]] + m[2], text)
    return _PUNCT_NEAR_CJK[1].sub(lambda m: m[1] + _HALF_TO_FULL[m[2]], text)


def clean_answer(text: str) -> str:
    """ChatGLM2/3 and GLM-4 answer clean-up: strip (this also drops ChatGLM3/GLM-4's empty
    metadata line, the "\\n" an answer starts with) and the date placeholder."""
    return text.strip().replace("[[训练时间]]", "2023年")


class ChatFormat:
    """ChatGLM-6B: numbered rounds from 0, the tokenizer appends [gMASK] <sop>."""

    name = "chatglm"
    supports_system_prompt = False
    causal = False  # the whole prompt is a bidirectional prefix: no KV reuse across turns
    default_sampling = SamplingParams(max_length=2048, top_p=0.7, temperature=0.95)
    tool_dialect: Optional[ToolDialect] = None  # how the model writes function calls, if it was trained to
    renders_template = False  # True: the checkpoint's Jinja template lays out whole conversations (template.py)
    opens_thinking = False  # True: every answer starts inside a <think> block (GLM-Z1)

    def encode(self, tokenizer, query: str, history: History, system: Optional[str] = None) -> list[int]:
        query, history = with_system_in_first_query(query, history, system)
        return tokenizer.encode(round_prompt(query, history))

    def stop_ids(self, tokenizer) -> frozenset[int]:
        return frozenset({tokenizer.eos_token_id})

    def process_response(self, text: str) -> str:
        return process_response(text)


class ChatGLM2Format(ChatFormat):
    name = "chatglm2"
    causal = True
    default_sampling = SamplingParams(max_length=8192, top_p=0.8, temperature=0.8)

    @staticmethod
    def prompt_text(query: str, history: History) -> str:
        rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, 1)]
        return "".join(rounds) + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def encode(self, tokenizer, query: str, history: History, system: Optional[str] = None) -> list[int]:
        query, history = with_system_in_first_query(query, history, system)
        return tokenizer.encode(self.prompt_text(query, history))

    def stop_ids(self, tokenizer) -> frozenset[int]:
        return frozenset({tokenizer.eos_token_id})

    def process_response(self, text: str) -> str:
        return clean_answer(text)


class RoleFormat(ChatFormat):
    """ChatGLM3-6B and GLM-4: a role token per message, then metadata and "\\n", then the content;
    the prompt ends with <|assistant|>. The system prompt is a message of its own."""

    name = "chatglm3"
    supports_system_prompt = True
    causal = True
    default_sampling = SamplingParams(max_length=8192, top_p=0.8, temperature=0.8)
    stop_names = ("<|user|>", "<|observation|>")
    tool_dialect = CHATGLM3_TOOLS

    def message(self, tokenizer, role: str, content: str, metadata: str = "") -> list[int]:
        return ([tokenizer.special_id(f"<|{role}|>")] + tokenizer.encode(f"{metadata}\n", add_special_tokens=False)
                + tokenizer.encode(content, add_special_tokens=False))

    def encode(self, tokenizer, query: str, history: History, system: Optional[str] = None) -> list[int]:
        tokens = list(tokenizer.prefix_tokens)
        if system:
            tokens += self.message(tokenizer, "system", system)
        for user_text, answer in history:
            tokens += self.message(tokenizer, "user", user_text)
            tokens += self.message(tokenizer, "assistant", answer)
        tokens += self.message(tokenizer, "user", query)
        return tokens + [tokenizer.special_id("<|assistant|>")]

    def message_parts(self, message: Message) -> list[tuple[str, str, str]]:
        """The (role, metadata, content) prompt messages of one conversation message: a tool
        result is an observation; each call an assistant message named after its function,
        after the text the assistant wrote first (if any). ValueError for a call whose
        arguments this model cannot be shown."""
        if message.role == "tool":
            return [("observation", "", message.content)]
        if message.role == "assistant" and message.tool_calls:
            text = [("assistant", "", message.content)] if message.content else []
            try:
                return text + [("assistant", call.name, self.tool_dialect.call_content(call.arguments))
                               for call in message.tool_calls]
            except NotACall as error:
                raise ValueError(f"a tool call sent back cannot be shown to this model: {error}") from None
        return [(message.role, "", message.content)]

    def stop_ids(self, tokenizer) -> frozenset[int]:
        return frozenset({tokenizer.eos_token_id} | {tokenizer.special_id(name) for name in self.stop_names})

    def process_response(self, text: str) -> str:
        return clean_answer(text)


class GLM4Format(RoleFormat):
    name = "glm4"
    # The official demo's settings (trans_cli_demo / web demo of GLM-4-9B-chat).
    default_sampling = SamplingParams(max_length=8192, top_p=0.8, temperature=0.6, repetition_penalty=1.2)
    tool_dialect = GLM4_TOOLS


GLM6B_FORMAT = ChatFormat()
FORMATS = {"chatglm": GLM6B_FORMAT, "chatglm2": ChatGLM2Format(), "chatglm3": RoleFormat(), "glm4": GLM4Format()}


def chat_format_for(tokenizer) -> ChatFormat:
    """The chat format a tokenizer's checkpoint uses (ChatGLM-6B's when it names none)."""
    return getattr(tokenizer, "chat_format", None) or GLM6B_FORMAT
