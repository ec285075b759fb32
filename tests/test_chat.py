"""Chat API: the seed's chat/stream_chat, prompt format, history budget, streamed text."""
import random
import threading
import time

import pytest

from model_runtime.chat.answer_text import AnswerText
from model_runtime.chat.formats import chat_format_for, process_response, round_prompt
from model_runtime.chat.incremental import IncrementalDecoder
from model_runtime.chat.planning import answer_reserve, pairs_from_messages, plan_prompt
from model_runtime.chat.stream import CHAT_BATCHES, stream_answer
from model_runtime.protocol import InvalidRequest, Message, SamplingParams
from model_runtime.tiny.glm4 import write_tiny_tiktoken
from model_runtime.tiny.glm_hf import GLM4_0414_TEMPLATE, write_tiny_json_tokenizer
from model_runtime.tokenizers.glm2 import ChatGLM2Tokenizer
from model_runtime.tokenizers.glm4 import GLM4Tokenizer
from model_runtime.tokenizers.glm6b import ChatGLMTokenizer

from .conftest import budget, reference_file


def test_round_prompt_format():
    assert round_prompt("你好", []) == "你好"
    assert round_prompt("再见", [("你好", "你好！")]) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："


@pytest.mark.parametrize("raw, expected", [
    ("  你好,世界  ", "你好，世界"),
    ("现在是[[训练时间]]", "现在是2023年"),
    ("真的?好!", "真的？好！"),
    ("Hello, world! a:b", "Hello, world! a:b"),
    ("比例:3;", "比例：3;"),
])
def test_process_response(raw, expected):
    assert process_response(raw) == expected


def test_chat_and_stream_chat_agree(tiny_model):
    tokenizer, model = tiny_model
    response, history = model.chat(tokenizer, "你好", history=[], max_length=64, temperature=0)
    assert response and history == [("你好", response)]
    updates = list(model.stream_chat(tokenizer, "你好", [], max_length=64, temperature=0))
    assert len(updates) > 3  # it streams
    texts = [text for text, _ in updates]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # only ever appended to
    assert updates[-1] == (response, [("你好", response)])


def test_seed_compatible_keywords(tiny_model):
    tokenizer, model = tiny_model
    response, history = model.chat(tokenizer, "How are you?", history=[("你好", "你好！")], max_length=2048,
                                   top_p=0.7, temperature=0.95)
    assert isinstance(response, str) and len(history) == 2


def test_max_length_counts_prompt_and_answer(tiny_model):
    tokenizer, model = tiny_model
    prompt_tokens = len(tokenizer.encode("你好"))
    params = SamplingParams(max_length=prompt_tokens + 5, temperature=0)
    last = list(stream_answer(model, tokenizer, "你好", [], params))[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens + last.completion_tokens == prompt_tokens + 5


def test_oldest_turns_are_dropped_to_leave_room_for_the_answer(tiny_model):
    tokenizer, model = tiny_model
    history = [(f"第{i}个问题 about the weather", "天气很好 " * 10) for i in range(8)]
    max_length = 160
    plan = plan_prompt(tokenizer, "今天呢?", history, max_length)
    assert 0 < plan.dropped_turns < len(history)
    assert len(plan.tokens) <= max_length - answer_reserve(max_length)
    kept = history[plan.dropped_turns:]
    assert plan.tokens == tokenizer.encode(round_prompt("今天呢?", kept))
    # One more turn would not have fitted.
    longer = tokenizer.encode(round_prompt("今天呢?", history[plan.dropped_turns - 1:]))
    assert len(longer) > max_length - answer_reserve(max_length)
    last = list(stream_answer(model, tokenizer, "今天呢?", history, SamplingParams(max_length=max_length)))[-1]
    assert last.dropped_turns == plan.dropped_turns


def test_a_query_too_long_for_max_length_is_refused_clearly(tiny_model):
    tokenizer, model = tiny_model
    with pytest.raises(InvalidRequest, match="shorten the message or raise the maximum length"):
        model.chat(tokenizer, "天气" * 50_000, max_length=2048)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": -1}, "max_length"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 2.5}, "top_k"),
])
def test_bad_arguments_are_refused(tiny_model, kwargs, message):
    tokenizer, model = tiny_model
    with pytest.raises(InvalidRequest, match=message):
        model.chat(tokenizer, "你好", **kwargs)


def test_non_string_query_is_refused(tiny_model):
    tokenizer, model = tiny_model
    with pytest.raises(InvalidRequest, match="string"):
        model.chat(tokenizer, 42)


def test_cancel_stops_within_one_step(tiny_model):
    tokenizer, model = tiny_model
    cancel = threading.Event()
    seen = 0
    for update in stream_answer(model, tokenizer, "你好", [], SamplingParams(max_length=2048, temperature=0), cancel):
        seen += 1
        if seen == 2:
            cancel.set()
    assert update.finish_reason == "cancelled"
    assert update.completion_tokens < 20


class ByteTokenizer:
    """Decodes ids as UTF-8 bytes, to exercise half characters in the stream."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_text_never_shows_half_a_character_or_unsettled_punctuation():
    text = AnswerText(ByteTokenizer())
    data = "好,世".encode()
    shown = [text.update(list(data[:n])) and text.shown for n in range(1, len(data) + 1)]
    assert all("\ufffd" not in s for s in shown if s)
    assert "好," not in shown  # the comma waits: the next character turns it full-width
    assert text.shown == "好，世"
    assert text.finish(list(data)) == ""


def test_messages_become_query_and_history():
    messages = [Message("system", "Be brief."), Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    assert pairs_from_messages(messages) == ("c", [("Be brief.\na", "b")])
    with pytest.raises(InvalidRequest):
        pairs_from_messages([Message("user", "a"), Message("assistant", "b")])


def test_stop_strings_end_the_text_and_are_never_shown_in_part():
    text = AnswerText(ByteTokenizer(), stop=("END", "停"))
    data = "abc EN".encode()
    text.update(list(data))
    assert text.shown == "abc" and not text.stopped  # " EN" may begin "END": held back
    text.update(list("abc ENough".encode()))
    assert text.shown == "abc ENough"
    text.update(list("abc ENough END more".encode()))
    assert text.stopped and text.shown == "abc ENough"
    assert text.finish(list("abc ENough END more".encode())) == ""


def test_stop_string_in_a_real_answer(tiny_model):
    tokenizer, model = tiny_model
    full = list(stream_answer(model, tokenizer, "你好", [], SamplingParams(max_length=64, temperature=0)))[-1].text
    stop = full[10:13]
    cut = list(stream_answer(model, tokenizer, "你好", [], SamplingParams(max_length=64, temperature=0, stop=(stop,))))
    assert cut[-1].finish_reason == "stop"
    assert cut[-1].text == full[:full.find(stop)].rstrip()


def plan_one_turn_at_a_time(tokenizer, query, history, max_length, system=None):
    """The planner as it was (quadratic: the whole prompt again per dropped turn), as an oracle."""
    budget = max_length - answer_reserve(max_length)
    chat_format = chat_format_for(tokenizer)
    for dropped in range(len(history) + 1):
        tokens = chat_format.encode(tokenizer, query, history[dropped:], system)
        if len(tokens) <= budget:
            return tokens, dropped
    return None


WORDS = ["你好", "天气", "很好", "Hello", "world", "the", "weather", "is", "sunny", "1", "23", "456", "7890",
         " ", "  ", "\n", "\n\n", "\t", ",", "。", "？", "[Round 3]", "问：", "答：", "<|user|>", "def f():", "😀"]


def random_text(rng, most_words):
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, most_words)))


@pytest.fixture(scope="module")
def every_tokenizer(tiny_model, tiny_family_checkpoints):
    from model_runtime.loading.family import load_tokenizer, read_config

    family = {name: load_tokenizer(folder, read_config(folder)) for name, folder in tiny_family_checkpoints.items()}
    return {"chatglm": tiny_model[0], **family}


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_planning_gives_the_same_prompt_as_dropping_one_turn_at_a_time(every_tokenizer, family):
    tokenizer = every_tokenizer[family]
    rng = random.Random(family)
    planned = 0
    for _ in range(150):
        history = [(random_text(rng, 12), random_text(rng, 20)) for _ in range(rng.randint(0, 25))]
        query, system = random_text(rng, 8), rng.choice([None, random_text(rng, 6)])
        max_length = rng.randint(24, 600)
        expected = plan_one_turn_at_a_time(tokenizer, query, history, max_length, system)
        if expected is None:
            with pytest.raises(InvalidRequest, match="shorten the message"):
                plan_prompt(tokenizer, query, history, max_length, system=system)
            continue
        plan = plan_prompt(tokenizer, query, history, max_length, system=system)
        assert (plan.tokens, plan.dropped_turns) == expected, (query, history, max_length, system)
        planned += 0 < plan.dropped_turns < len(history)
    assert planned > 20  # many plans dropped some turns and kept others


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_a_5000_pair_history_is_planned_quickly(every_tokenizer, family):
    tokenizer = every_tokenizer[family]
    history = [(f"第{i}个问题: how is the weather today?", "今天是晴天，气温大约 25 度。" * 3) for i in range(5000)]
    started = time.perf_counter()
    plan = plan_prompt(tokenizer, "今天呢?", history, 2048)
    assert time.perf_counter() - started < budget(0.3)
    assert 4000 < plan.dropped_turns < 5000
    assert plan.tokens == chat_format_for(tokenizer).encode(tokenizer, "今天呢?", history[plan.dropped_turns:])


def test_chat_allocates_the_cache_its_max_length_needs(tiny_glm4):
    tokenizer, model = tiny_glm4
    assert model.config.seq_length >= 2048
    CHAT_BATCHES.pop(model, None)
    model.chat(tokenizer, "你好", max_length=64, temperature=0)
    cache = CHAT_BATCHES[model].cache
    assert cache.max_len == 64 and cache.nbytes == 64 * model.kv_cache_bytes_per_token()



class CountingTokenizer:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, tokens):
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens)


@pytest.mark.parametrize("family", ["chatglm", "chatglm3", "glm4", "glm4-0414"])
def test_incremental_decoding_equals_a_whole_decode_at_every_length(family, tmp_path):
    tokenizer = {"chatglm": lambda: ChatGLMTokenizer(reference_file("tokenizers/chatglm-6b-ice_text.model")),
                 "chatglm3": lambda: ChatGLM2Tokenizer(reference_file("tokenizers/chatglm2-3-tokenizer.model")),
                 "glm4": lambda: GLM4Tokenizer(write_tiny_tiktoken(tmp_path)),
                 "glm4-0414": lambda: write_tiny_json_tokenizer(tmp_path, GLM4_0414_TEMPLATE, "tiny")}[family]()
    texts = ["你好！我是人工智能助手。 def main():\n    print('hello  world')\t# x\n\n$$x^2$$ 😀👍🏽 café  " * 6,
             "   leading spaces\n\n\n and   many    blanks, 中文，标点。" * 8]
    encode = (lambda t: tokenizer.encode(t, add_special_tokens=False)) if family == "chatglm" else tokenizer.encode
    rng = random.Random(0)
    sequences = [encode(text) for text in texts]
    sequences += [[rng.randrange(min(tokenizer.vocab_size, 60000)) for _ in range(150)] for _ in range(4)]
    for tokens in sequences:
        counting = CountingTokenizer(tokenizer)
        decoder = IncrementalDecoder(counting)
        for length in range(1, len(tokens) + 1):
            assert decoder.text(tokens[:length]) == tokenizer.decode(tokens[:length]).replace("\ufffd", "")
        # constant work per token: far less than decoding the whole answer at every step
        assert counting.decoded < 8 * (IncrementalDecoder.TAIL + IncrementalDecoder.CONTEXT) * len(tokens)
        assert counting.decoded < len(tokens) ** 2 / 2 or len(tokens) < 200
