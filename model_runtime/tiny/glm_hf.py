"""Tiny GLM-4-0414, GLM-Z1 and glm-4-9b-chat-hf checkpoints in transformers' layout: config.json
as published (architectures, model_type, partial_rotary_factor, rope_theta...), a tokenizer.json
trained here with the `tokenizers` library, tokenizer_config.json with the chat template,
generation_config.json with the stop ids, and random weights under transformers' names.

- tokenizer.json: a byte-level BPE over GLM-4's pre-tokenizer pattern (split, then byte-level
  without its own regex), GLM-4's 14 special tokens added after the merges, as in the real file
  (<|endoftext|> first; a GGUF conversion of GLM-Z1-Rumination-32B-0414 logs "special tokens cache
  size = 14", ik_llama.cpp PR #333). `<think>` and `</think>` are ordinary text there; the tiny
  corpus has them often enough that each becomes one merged token.
- The chat templates (`GLM4_0414_TEMPLATE`, `Z1_TEMPLATE`): GLM-Z1-9B-0414's, as a public copy
  of its tokenizer_config.json has it (reformatted over lines there; written on one line here, as
  the official files write templates, e.g. GLM-Z1-Rumination-32B-0414's in the log above): tools
  in a system block ("# 可用工具", per function "## NAME" and its JSON), system messages, then per
  message `<|role|>` + "\\n" + the text after any `</think>`, a call as `<|assistant|>NAME \\n
  ARGS`, results as `<|observation|>`, and the generation prompt `<|assistant|>\\n<think>`. The
  0414 chat template is taken to be the same without the thinking (no `</think>` split, generation
  prompt `<|assistant|>`): its official text was not at hand. The runtime renders whatever
  template a checkpoint ships, so this choice only shapes the tiny stand-ins. The tiny
  glm-4-9b-chat-hf carries the 0414 template too.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..models.glm_hf import HFGLMConfig, HFGLMModel
from ..tokenizers.glm4 import GLM4_PATTERN, GLM4_SPECIALS
from ..tokenizers.hf_json import JSONTokenizer
from .corpus import corpus_lines
from .weights import random_weights, write_shards

_TOOLS = ("[gMASK]<sop>{%- if tools -%}<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型"
          " GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
          "{%- for tool in tools %}{%- set function = tool.function if tool.get(\"function\") else tool %}\n\n"
          "## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n"
          "在调用上述函数时，请使用 Json 格式表示调用的参数。{%- endfor %}{%- endif -%}"
          "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}{%- endif %}{%- endfor %}")
_MESSAGES = ("{%- for message in messages if message.role != 'system' %}{%- set role = message['role'] %}"
             "{%- set content = message['content'] %}{%- set visible = VISIBLE %}"
             "{%- set meta = message.get(\"metadata\", \"\") %}"
             "{%- if role == 'user' %}<|user|>\n{{ visible }}"
             "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ visible }}"
             "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ visible }}"
             "{%- elif role == 'observation' %}<|observation|>\n{{ visible }}"
             "{%- endif %}{%- endfor %}{% if add_generation_prompt %}GENERATION{% endif %}")
Z1_TEMPLATE = _TOOLS + _MESSAGES.replace("VISIBLE", "content.split('</think>')[-1].strip()").replace(
    "GENERATION", "<|assistant|>\n<think>")
GLM4_0414_TEMPLATE = _TOOLS + _MESSAGES.replace("VISIBLE", "content").replace("GENERATION", "<|assistant|>")

# --tiny-random name -> (family, template, name the checkpoint gives itself)
TINY_HF = {
    "glm4-0414": ("glm4-0414", GLM4_0414_TEMPLATE, "tiny-random/GLM-4-9B-0414"),
    "z1": ("glm4-0414", Z1_TEMPLATE, "tiny-random/GLM-Z1-9B-0414"),
    "glm4-hf": ("glm4-hf", GLM4_0414_TEMPLATE, "tiny-random/glm-4-9b-chat-hf"),
}


def write_tiny_json_tokenizer(directory: str | Path, template: str, name: str, family: str = "glm4-0414",
                              vocab_size: int = 640) -> JSONTokenizer:
    """tokenizer.json + tokenizer_config.json of a tiny GLM tokenizer (deterministic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(GLM4_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    thinking = ["<think>\n好的，我来想一想。\n</think>\n\n你好！", "<think>Let me think.</think>\nHello!"] * 20
    tokenizer.train_from_iterator(corpus_lines() + thinking, trainer)
    tokenizer.add_special_tokens(list(GLM4_SPECIALS))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"name_or_path": name, "chat_template": template, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "do_lower_case": False,
              "model_max_length": 128000, "padding_side": "left", "remove_space": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                     encoding="utf-8")
    stops = [tokenizer.token_to_id(token) for token in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    generation = {"eos_token_id": stops, "pad_token_id": stops[0]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return JSONTokenizer(directory, family)


def tiny_hf_config(family: str, tokenizer: JSONTokenizer, hidden_size: int = 64, num_layers: int = 2,
                   num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 16,
                   intermediate_size: int = 128, tie_word_embeddings: bool = False, attention_bias: bool = True,
                   partial_rotary_factor: float = 0.5) -> dict:
    """config.json of a tiny checkpoint: the published fields with tiny sizes."""
    stops = [tokenizer.special_id(name) for name in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return HFGLMConfig(
        vocab_size=-(-tokenizer.vocab_size // 64) * 64 + 64, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, max_position_embeddings=4096, attention_bias=attention_bias,
        partial_rotary_factor=partial_rotary_factor, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tuple(stops), pad_token_id=stops[0], family=family, rms_norm_eps=1e-5,
    ).to_dict()


def random_hf_state(config: HFGLMConfig, tokenizer: JSONTokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under transformers' names, bfloat16 as published. Output rows of single
    bytes and of the specials other than the stop tokens are shrunk so that answers are mostly text that ends now
    and then; a tied output layer is not stored (transformers leaves it out)."""
    state = random_weights(HFGLMModel(config), torch.Generator().manual_seed(seed))
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    quiet = torch.zeros(config.vocab_size, dtype=torch.bool)
    quiet[:256] = True  # single bytes (the trainer's alphabet comes first): half characters, control bytes
    quiet[tokenizer.vocab_size:] = True
    quiet[list(tokenizer.index_special_tokens)] = True
    quiet[list(tokenizer.chat_format.stop_ids(tokenizer))] = False
    state[head][quiet] *= 0.05
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    return {name: value.to(torch.bfloat16) for name, value in state.items()}


def write_tiny_hf_checkpoint(directory: str | Path, tiny: str = "glm4-0414", seed: int = 0, shards: int = 2,
                             **sizes) -> Path:
    """A complete random checkpoint directory of a --tiny-random name in TINY_HF (sizes: see
    tiny_hf_config)."""
    if tiny not in TINY_HF:
        raise ValueError(f"tiny must be one of {', '.join(TINY_HF)}, got {tiny!r}")
    family, template, name = TINY_HF[tiny]
    directory = Path(directory)
    tokenizer = write_tiny_json_tokenizer(directory, template, name, family)
    raw = tiny_hf_config(family, tokenizer, **sizes)
    raw["_name_or_path"] = name
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    state = random_hf_state(HFGLMConfig.from_dict(raw, family=family), tokenizer, seed)
    write_shards(directory, state, shards, "safetensors")
    return directory

