"""The prompt of a checkpoint that ships a Jinja chat template (GLM-4-0414, GLM-Z1,
glm-4-9b-chat-hf): the template is rendered as transformers renders it, so a template change in a
checkpoint needs no code change here.

- Rendering: a sandboxed Jinja environment (`ImmutableSandboxedEnvironment`) with transformers'
  settings (trim_blocks, lstrip_blocks, loop controls) and helpers (`tojson` without HTML
  escaping, `raise_exception`, `strftime_now`); the variables `messages`, `tools`,
  `add_generation_prompt` and the tokenizer's token strings (`bos_token`, `eos_token`...).
  Templates are untrusted code from the Hub: the sandbox forbids attribute tricks, and a template
  that fails is a clean InvalidRequest.
- Tokens: the rendered text is tokenized with special-token strings read as their ids, as
  transformers' `apply_chat_template` does: the ids equal transformers' for every conversation
  whose text holds no special-token string. Text that does (a user typing "<|assistant|>") is
  put in as ordinary text: before rendering, each such string in a message or tool is swapped for
  a private-use character, which is encoded back as the literal string (transformers would make
  it a role token: a user could forge turns).
- Messages: OpenAI roles as GLM's own server passes them (THUDM/GLM-4 `glm_server.py`
  `process_messages`): a tool result is an `observation` message, a call an assistant message
  whose `metadata` is the function name and whose content is the arguments.
- Reasoning (GLM-Z1): a template whose generation prompt ends inside `<think>` makes every answer
  start with thinking (`opens_thinking`); the template itself drops thinking from earlier turns.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence as Seq

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..protocol import InvalidRequest, Message, SamplingParams
from .formats import ChatFormat, History, clean_answer
from .tool_calls import GLM4_TOOLS, NotACall

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_LITERALS = 0x100000  # Supplementary Private Use Area-B: stands for special strings inside message text
DEFAULT_SAMPLING = SamplingParams(max_length=8192, top_p=0.8, temperature=0.6)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (utils/chat_template_utils.py)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise ValueError(f"the chat template does not compile: {error}") from None


def template_messages(messages: Seq[Message]) -> list[dict]:
    """Protocol messages as the template's dicts (see the module docstring)."""
    out = []
    for message in messages:
        if message.role == "tool":
            out.append({"role": "observation", "content": message.content})
        elif message.role == "assistant" and message.tool_calls:
            if message.content:
                out.append({"role": "assistant", "content": message.content})
            for call in message.tool_calls:
                try:
                    out.append({"role": "assistant", "metadata": call.name, "content": GLM4_TOOLS.call_content(call.arguments)})
                except NotACall as error:
                    raise InvalidRequest(f"a tool call sent back cannot be shown to this model: {error}") from None
        else:
            out.append({"role": message.role, "content": message.content})
    return out


def pair_messages(query: str, history: History, system: Optional[str]) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for user_text, answer in history:
        messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": query}]


def json_object_file(path: Path) -> dict:
    """A checkpoint's JSON object file, {} when absent; ValueError naming it when it is not one."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def _int_list(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


class TemplateFormat(ChatFormat):
    """The chat format of a checkpoint with a Jinja template (see the module docstring)."""

    supports_system_prompt = True
    causal = True
    renders_template = True

    def __init__(self, name: str, source: str, tokenizer, stop_ids: frozenset[int],
                 default_sampling: SamplingParams = DEFAULT_SAMPLING):
        self.name = name
        self.source = source
        self.template = compile_template(source)
        self.default_sampling = default_sampling
        self._stop_ids = stop_ids
        # Tools: the template declares them if it reads `tools`; calls are GLM-4's "NAME\n{json}".
        self.tool_dialect = GLM4_TOOLS if re.search(r"\btools\b", source) else None
        self._specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._literal_of = {chr(_LITERALS + i): name for i, name in enumerate(self._specials)}
        self._literal_pattern = re.compile(f"([{''.join(self._literal_of)}])") if self._literal_of else None
        prompt = self.render(tokenizer, [{"role": "user", "content": "?"}])
        self.opens_thinking = prompt.rstrip().endswith(THINK_OPEN)

    @classmethod
    def for_checkpoint(cls, folder: Path, source: str, tokenizer) -> "TemplateFormat":
        """The format of a checkpoint folder: its template, its stop tokens (generation_config.json's
        eos ids, else config.json's, and <|user|> / <|observation|> where the tokenizer has them) and
        its sampling defaults (generation_config.json's temperature, top_p, top_k where given)."""
        generation, config = json_object_file(folder / "generation_config.json"), json_object_file(folder / "config.json")
        stops = set(_int_list(generation.get("eos_token_id", config.get("eos_token_id"))))
        stops |= {tokenizer.special_tokens[name] for name in ("<|user|>", "<|observation|>")
                  if name in tokenizer.special_tokens}
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        sampling = DEFAULT_SAMPLING
        for key in ("temperature", "top_p", "top_k"):
            value = generation.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sampling = replace(sampling, **{key: value})
        return cls(tokenizer.family, source, tokenizer, frozenset(stops), sampling)

    # ---- rendering ---------------------------------------------------------------------------------

    def _guarded(self, value: Any) -> Any:
        """value with every special-token string inside its text swapped for its private-use stand-in."""
        if isinstance(value, str):
            for char, name in self._literal_of.items():
                value = value.replace(name, char) if name in value else value
            return value
        if isinstance(value, dict):
            return {key: self._guarded(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._guarded(item) for item in value]
        return value

    def render(self, tokenizer, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        """The template's text for messages (special strings in their text replaced by stand-ins),
        ending with the generation prompt."""
        try:
            return self.template.render(messages=self._guarded(messages), tools=self._guarded(tools) if tools else None,
                                        add_generation_prompt=True, **tokenizer.token_strings)
        except Exception as error:  # untrusted code: raise_exception, a sandbox refusal, a range too big...
            raise InvalidRequest(f"the model's chat template failed on this conversation "
                                 f"({type(error).__name__}: {error})") from None

    def encode_messages(self, tokenizer, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        """Prompt ids of template dicts (`template_messages`), ending with the generation prompt."""
        text = self.render(tokenizer, messages, tools)
        if self._literal_pattern is None:
            return tokenizer.encode_with_specials(text)
        ids = []
        for piece in self._literal_pattern.split(text):
            if piece in self._literal_of:
                ids += tokenizer.encode_text(self._literal_of[piece])
            elif piece:
                ids += tokenizer.encode_with_specials(piece)
        return ids

    # ---- the ChatFormat interface --------------------------------------------------------------------

    def encode(self, tokenizer, query: str, history: History, system: Optional[str] = None) -> list[int]:
        return self.encode_messages(tokenizer, pair_messages(query, history, system))

    def stop_ids(self, tokenizer) -> frozenset[int]:
        return self._stop_ids

    def process_response(self, text: str) -> str:
        return clean_answer(text)

