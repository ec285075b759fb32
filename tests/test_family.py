"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat: parity, rotary, tokenizers, chat formats, loading,
KV reuse across turns, batching, quantization and the engine, on tiny checkpoints of each."""
import json
import math
import shutil

import gradio_client
import numpy as np
import pytest
import torch

from model_runtime.chat.formats import chat_format_for
from model_runtime.chat.planning import plan_messages, plan_prompt
from model_runtime.chat.stream import CHAT_BATCHES, stream_answer
from model_runtime.loading.family import detect_family, read_config
from model_runtime.loading.loader import load_model
from model_runtime.models.config import CheckpointError
from model_runtime.models.glm2 import ChatGLM2Model, GLM2Config, RotaryEmbedding, apply_rotary_pairs
from model_runtime.models.kv_cache import attention_mask
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, generate, new_sequence
from model_runtime.serving.engine import Engine
from model_runtime.tiny.checkpoint import write_tiny_checkpoint
from model_runtime.tiny.glm2 import TINY_FAMILIES
from model_runtime.tokenizers.glm2 import ChatGLM2Tokenizer
from model_runtime.tokenizers.glm4 import GLM4Tokenizer

from webdemo import api, ui

from .conftest import reference_arrays, reference_file

GREEDY = SamplingParams(max_length=64, temperature=0)


# ---- outside parity ----------------------------------------------------------------------------


def read_glm2_reference(name, prefix=False):
    """The raw arrays of a glm2/glm4/glm3-ptuning reference file (see tests/data/README.md)."""
    take = reference_arrays(name)

    prefix_kv = take((2, 2, 5, 4), np.float16).float() if prefix else None
    h, f, layer = 32, 48, "transformer.encoder.layers.0."
    shapes = [("transformer.embedding.word_embeddings.weight", (5, h)), (layer + "input_layernorm.weight", (h,)),
              (layer + "self_attention.query_key_value.weight", (48, h)),
              (layer + "self_attention.query_key_value.bias", (48,)),
              (layer + "self_attention.dense.weight", (h, h)), (layer + "post_attention_layernorm.weight", (h,)),
              (layer + "mlp.dense_h_to_4h.weight", (2 * f, h)), (layer + "mlp.dense_4h_to_h.weight", (h, f)),
              ("transformer.encoder.final_layernorm.weight", (h,))]
    weights = {key: take(shape, np.float32) for key, shape in shapes}
    steps = [(take((n,), np.int32), take((n, h), np.float32)) for n in (3, 1, 1)]
    assert take.remaining() == 0
    return prefix_kv, weights, steps


def check_reference(name, eps, family, tolerance, rope_ratio=1.0, prefix=False):
    config = GLM2Config(padded_vocab_size=5, hidden_size=32, num_layers=1, num_attention_heads=8, kv_channels=4,
                        multi_query_group_num=2, ffn_hidden_size=48, seq_length=16, layernorm_epsilon=eps,
                        rope_ratio=rope_ratio, family=family, pre_seq_len=5 if prefix else None)
    prefix_kv, weights, steps = read_glm2_reference(name, prefix)
    model = ChatGLM2Model(config).float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and "transformer.output_layer.weight" in missing  # hidden states only
    cache = model.new_kv_cache(slots=1, max_len=8)
    if prefix:
        model.set_prefix(prefix_kv)
    start = 0
    for tokens, expected in steps:  # a 3-token prompt, then two decode steps on the cache
        end = start + len(tokens)
        cache_positions = torch.arange(start, end)[None]
        mask = attention_mask(torch.tensor([0]), cache_positions, end)
        with torch.no_grad():
            hidden = model(tokens.long()[None], cache_positions, cache_positions, mask, torch.tensor([0]), cache)
        torch.testing.assert_close(hidden[0], expected, rtol=tolerance, atol=tolerance)
        start = end


def test_chatglm2_and_chatglm3_hidden_states_match_original_code():
    check_reference("glm2_model.data", 1e-5, "chatglm2", 1e-5)
    check_reference("glm2_model.data", 1e-5, "chatglm3", 1e-5)


def test_glm4_hidden_states_match_original_code():
    # Head dim 4 has one rotary frequency (theta_0 = 1 for any base): rope_ratio 500 changes nothing.
    check_reference("glm4_model.data", 1.5625e-7, "glm4", 1e-5, rope_ratio=500)


def test_chatglm3_p_tuning_v2_prefix_matches_original_code():
    # The file stores the prefix keys/values rounded to float16, while the original code ran with
    # the float32 values: outputs agree to ~1e-4 (chatglm.cpp's own test allows 5e-4). A wrong
    # layout or a rotary applied to the prefix is off by 0.1 or more.
    check_reference("glm3_ptuning_v2_model.data", 1e-5, "chatglm3", 5e-4, prefix=True)


# ---- rotary -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_ratio", [1.0, 500.0])
def test_rotary_base_follows_rope_ratio(rope_ratio):
    head_dim, position = 16, 37
    rotary = RotaryEmbedding(head_dim // 2, 10000.0 * rope_ratio, head_dim=head_dim)
    base = 10000.0 * rope_ratio
    thetas = [base ** (-2 * i / 8) for i in range(4)]  # rotary on head_dim / 2 = 8 dims, 4 pairs
    table_cos, table_sin = rotary.cos_sin(torch.tensor([[position]]), torch.float64)
    cos, sin = table_cos[..., 0:8:2], table_sin[..., 1:8:2]  # each pair's cos and sin
    expected = torch.tensor([math.cos(position * t) for t in thetas], dtype=torch.float64)
    torch.testing.assert_close(cos[0, 0, 0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[0, 0, 0], torch.tensor([math.sin(position * t) for t in thetas],
                                                          dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # Adjacent pairs rotate; dims 8..15 pass through.
    x = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 1, 1, 16)
    out = apply_rotary_pairs(x, table_cos, table_sin)
    x0, x1 = x[..., 0:8:2], x[..., 1:8:2]
    torch.testing.assert_close(out[..., 0:8:2], x0 * cos - x1 * sin)
    torch.testing.assert_close(out[..., 1:8:2], x1 * cos + x0 * sin)
    assert torch.equal(out[..., 8:], x[..., 8:])


def test_glm4_checkpoint_rotary_uses_rope_ratio_from_config(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "glm4", family="glm4")
    assert json.loads((folder / "config.json").read_text())["rope_ratio"] == 500
    _, model = load_model(folder, device="cpu", dtype="float32")
    assert model.rotary.base == 10000.0 * 500
    # The model's output changes when the ratio does (head dim 16 has four frequencies).
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    positions = torch.arange(6)[None]
    mask = attention_mask(torch.tensor([0]), positions, 6)

    def run():
        with torch.no_grad():
            return model(tokens, positions, positions, mask, torch.tensor([0]), model.new_kv_cache(1, 16))

    with_ratio = run()
    model.rotary.base = 10000.0
    assert not torch.allclose(run(), with_ratio, atol=1e-4)


def test_chatglm2_rounds_rotary_angles_to_float16_as_its_reference_did():
    positions = torch.tensor([[2048, 2049]])
    chatglm2, chatglm3 = RotaryEmbedding(64, half_precision_angles=True), RotaryEmbedding(64)
    cos2, _ = chatglm2.cos_sin(positions, torch.float16)
    assert torch.equal(cos2[0, 0], cos2[0, 1])  # 2049 is not a float16 number: it rounds to 2048
    cos3, _ = chatglm3.cos_sin(positions, torch.float16)
    assert not torch.equal(cos3[0, 0], cos3[0, 1])
    cos32, _ = chatglm2.cos_sin(positions, torch.float32)  # float32 models compute in float32
    assert not torch.equal(cos32[0, 0], cos32[0, 1])


# ---- tokenizers with the real file ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sp_file():
    return reference_file("tokenizers/chatglm2-3-tokenizer.model")


def test_real_chatglm2_3_tokenizer_known_ids(real_sp_file):
    chatglm2, chatglm3 = ChatGLM2Tokenizer(real_sp_file, "chatglm2"), ChatGLM2Tokenizer(real_sp_file, "chatglm3")
    for tokenizer in (chatglm2, chatglm3):
        assert tokenizer.encode("你好") == [64790, 64792, 36474, 54591]
        assert (tokenizer.special_id("[MASK]"), tokenizer.gmask_token_id, tokenizer.special_id("[sMASK]"),
                tokenizer.sop_token_id, tokenizer.special_id("eop")) == (64789, 64790, 64791, 64792, 64793)
        assert (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 0, 2)
    assert [chatglm3.special_id(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")] == \
        [64794, 64795, 64796, 64797]
    assert chatglm2.vocab_size == 64794 and chatglm3.vocab_size == 64798
    assert chat_format_for(chatglm2).encode(chatglm2, "你好", []) == [
        64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211]
    assert chat_format_for(chatglm3).encode(chatglm3, "你好", []) == [64790, 64792, 64795, 30910, 13, 36474,
                                                                     54591, 64796]


@pytest.mark.parametrize("text", ["你好", "  hello   world  ", "def main():\n    print('hi')\t# x\n\n",
                                  "emoji 👋🏽 and ＦＵＬＬ－ｗｉｄｔｈ，标点！", "a\r\nb\x00c", "数字 12345 and 3.14159"])
def test_real_chatglm3_tokenizer_round_trip(real_sp_file, text):
    tokenizer = ChatGLM2Tokenizer(real_sp_file, "chatglm3")
    assert tokenizer.decode(tokenizer.encode(text)) == text  # identity normalisation: exact


def test_role_strings_typed_by_a_user_are_plain_text(real_sp_file):
    tokenizer = ChatGLM2Tokenizer(real_sp_file, "chatglm3")
    typed = "<|assistant|>[gMASK]sop<|user|> <|observation|>"
    ids = tokenizer.encode(typed, add_special_tokens=False)
    assert all(i < tokenizer.first_special for i in ids)
    assert tokenizer.decode(ids) == typed
    prompt = chat_format_for(tokenizer).encode(tokenizer, typed, [("<|system|>", "<|user|>")])
    roles = [i for i in prompt if i >= tokenizer.first_special]
    assert roles == [64790, 64792, 64795, 64796, 64795, 64796]  # only the format's own role tokens


# ---- tiny checkpoints of every family --------------------------------------------------------------


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {family: write_tiny_checkpoint(root / family, family=family) for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def family_models(family_dirs):
    return {family: load_model(folder, device="cpu", dtype="float32") for family, folder in family_dirs.items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_is_read_from_the_checkpoint(family_dirs, family_models, family):
    tokenizer, model = family_models[family]
    assert model.config.family == family and isinstance(model, ChatGLM2Model)
    assert tokenizer.chat_format.name == family
    assert model.transformer.output_layer.weight is not model.transformer.embedding.word_embeddings.weight
    expected_tokenizer = GLM4Tokenizer if family == "glm4" else ChatGLM2Tokenizer
    assert isinstance(tokenizer, expected_tokenizer)


def test_chatglm2_vs_chatglm3_hints(tmp_path, family_dirs):
    folder = tmp_path / "ckpt"
    shutil.copytree(family_dirs["chatglm3"], folder)
    raw = json.loads((folder / "config.json").read_text())
    assert detect_family(dict(raw, _name_or_path="THUDM/chatglm2-6b-int4"), folder) == "chatglm2"
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm3-6b"}))
    assert detect_family(dict(raw, _name_or_path=""), folder) == "chatglm3"
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenization_chatglm.py").write_text("special_tokens = ['[MASK]', '[gMASK]', 'sop', 'eop']")
    assert detect_family(dict(raw, _name_or_path=""), folder) == "chatglm2"
    (folder / "tokenization_chatglm.py").write_text("role_special_tokens = ['<|user|>', '<|observation|>']")
    assert detect_family(dict(raw, _name_or_path=""), folder) == "chatglm3"
    assert detect_family({"inner_hidden_size": 16384, "position_encoding_2d": True}, folder) == "chatglm"
    assert detect_family(dict(raw, _name_or_path="", padded_vocab_size=151552), folder) == "glm4"


def test_glm4_tiny_tokenizer_layout(family_models):
    tokenizer, _ = family_models["glm4"]
    n = tokenizer.first_special
    assert [tokenizer.special_id(s) - n for s in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>",
                                                  "<|observation|>")] == [0, 2, 4, 7, 8, 9]
    assert tokenizer.encode("\n", add_special_tokens=False) == [198]  # as in the real file
    hello = tokenizer.encode("你好", add_special_tokens=False)
    assert tokenizer.encode("你好") == [n + 2, n + 4] + hello  # real file: [151331, 151333, 109377]
    prompt = chat_format_for(tokenizer).encode(tokenizer, "你好", [])
    # Real file: [151331, 151333, 151336, 198, 109377, 151337]
    assert prompt == [n + 2, n + 4, n + 7, 198] + hello + [n + 8]
    for text in ["Hello, world!\n\n  def f(x):\treturn x  # 注释", "👋🏽 ＦＵＬＬ", "<|user|>[gMASK]<sop>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert all(i < n for i in ids) and tokenizer.decode(ids) == text


def test_tiny_chatglm2_3_tokenizer_has_the_real_layout(family_models):
    tokenizer, _ = family_models["chatglm3"]
    n = tokenizer.first_special
    assert tokenizer.encode("\n", add_special_tokens=False)[-1] == 13  # byte <0x0A>, as in the real file
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    hello = tokenizer.encode("你好", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert chat_format_for(tokenizer).encode(tokenizer, "你好", []) == [n + 1, n + 3, n + 6] + newline + hello + [n + 7]


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_system_prompt_is_its_own_message(family_models, family):
    tokenizer, _ = family_models[family]
    fmt = chat_format_for(tokenizer)
    messages = (Message("system", "Be brief."), Message("user", "你好"), Message("assistant", "你好！"),
                Message("user", "再见"))
    plan = plan_messages(tokenizer, messages, 2048)
    expected = (tokenizer.prefix_tokens + fmt.message(tokenizer, "system", "Be brief.")
                + fmt.message(tokenizer, "user", "你好") + fmt.message(tokenizer, "assistant", "你好！")
                + fmt.message(tokenizer, "user", "再见") + [tokenizer.special_id("<|assistant|>")])
    assert plan.tokens == expected
    assert plan.stop_ids == {tokenizer.eos_token_id, tokenizer.special_id("<|user|>"),
                             tokenizer.special_id("<|observation|>")}


def test_chatglm2_has_no_system_role_and_numbers_rounds_from_one(family_models):
    tokenizer, _ = family_models["chatglm2"]
    plan = plan_messages(tokenizer, (Message("system", "Be brief."), Message("user", "a"),
                                     Message("assistant", "b"), Message("user", "c")), 2048)
    assert tokenizer.decode(plan.tokens) == "[Round 1]\n\n问：Be brief.\na\n\n答：b\n\n[Round 2]\n\n问：c\n\n答："
    assert plan.stop_ids == {2}


def test_answers_are_cleaned_per_format(family_models):
    tokenizer, _ = family_models["chatglm3"]
    fmt = chat_format_for(tokenizer)
    assert fmt.process_response("\n 现在是[[训练时间]], ok ") == "现在是2023年, ok"  # no full-width rewrite


# ---- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_batched_equals_alone(family_models, family):
    tokenizer, model = family_models[family]
    fmt = chat_format_for(tokenizer)
    queries = ["你好", "Tell me about the weather in Beijing tomorrow, please.", "def main():\n    pass", "早上好"]
    prompts = [fmt.encode(tokenizer, q, []) for q in queries]
    stops = fmt.stop_ids(tokenizer)
    together = generate(model, prompts, GREEDY, vocab_size=tokenizer.vocab_size, stop_ids=stops)
    alone = [generate(model, [p], GREEDY, vocab_size=tokenizer.vocab_size, stop_ids=stops)[0] for p in prompts]
    assert together == alone
    assert sum(len(answer) for answer in alone) > 12
    assert max(max(a) for a in alone) < tokenizer.vocab_size  # the padded rows are never sampled


def prefill_logits(model, tokenizer, prompt, slot_batch):
    """Logits of the last prompt token through DecodeBatch (reusing whatever the slots hold)."""
    seq = new_sequence(model, prompt, SamplingParams(max_length=256, temperature=0), cache_salt="one user")
    slot_batch.admit(seq)
    seen = []
    original = slot_batch._sample
    slot_batch._sample = lambda seqs, hidden: (seen.append(model.logits(hidden)), original(seqs, hidden))
    slot_batch.prefill([seq])
    slot_batch._sample = original
    slot_batch.release(seq)
    return seq.cached, seen[0][0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_second_turn_prefills_only_new_text_and_matches_full_prefill(family_models, family):
    tokenizer, model = family_models[family]
    fmt = chat_format_for(tokenizer)
    first = fmt.encode(tokenizer, "今天天气怎么样？", [])
    answer = generate(model, [first], GREEDY, vocab_size=tokenizer.vocab_size, stop_ids=fmt.stop_ids(tokenizer))[0]
    second = fmt.encode(tokenizer, "明天呢？", [("今天天气怎么样？", tokenizer.decode(answer))])
    batch = DecodeBatch(model, slots=2, max_len=256, vocab_size=tokenizer.vocab_size)
    assert prefill_logits(model, tokenizer, first, batch)[0] == 0
    reused, with_reuse = prefill_logits(model, tokenizer, second, batch)
    assert reused >= len(first) - 1 and reused < len(second)
    batch.slot_contents.clear()
    none_reused, full = prefill_logits(model, tokenizer, second, batch)
    assert none_reused == 0
    torch.testing.assert_close(with_reuse, full, rtol=1e-5, atol=1e-5)


def ask(engine, messages, max_new_tokens=40):
    sampling = SamplingParams(max_length=512, max_new_tokens=max_new_tokens, temperature=0)
    events = list(engine.submit(ChatRequest(messages=tuple(messages), sampling=sampling, cache_salt="one user")))
    assert events[-1].finished and events[-1].finish_reason in ("stop", "length"), events[-1]
    assert events[-1].dropped_turns == 0
    return events[-1]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_engine_reuses_the_conversation_and_gives_the_same_tokens(family_models, family):
    tokenizer, model = family_models[family]
    system = [Message("system", "你是一个乐于助人的助手。")] if family != "chatglm2" else []
    turn1 = system + [Message("user", "你好")]
    engine = Engine(tokenizer, model, slots=2)
    try:
        assert engine.info.supports_system_prompt == (family != "chatglm2")
        assert engine.info.default_sampling.top_p == 0.8
        first = ask(engine, turn1)
        turn2 = turn1 + [Message("assistant", first.text), Message("user", "今天天气怎么样？")]
        second = ask(engine, turn2)
        reused = engine.stats()["prompt_tokens_reused_total"]
        # Role formats: all of turn 1's prompt (it ends in a role token); ChatGLM2: up to where
        # SentencePiece joins "答：" with the answer differently.
        assert reused >= (first.prompt_tokens if family != "chatglm2" else first.prompt_tokens // 2)
    finally:
        engine.close()
    fresh = Engine(tokenizer, model, slots=2)  # a new cache: the whole conversation is encoded again
    try:
        again = ask(fresh, turn2)
        assert fresh.stats()["prompt_tokens_reused_total"] == 0
    finally:
        fresh.close()
    assert again.text == second.text and again.completion_tokens == second.completion_tokens


def test_slots_prefer_the_longest_shared_prefix_then_empty_then_least_recent(family_models):
    tokenizer, model = family_models["chatglm3"]
    fmt = chat_format_for(tokenizer)
    batch = DecodeBatch(model, slots=3, max_len=128, vocab_size=tokenizer.vocab_size)
    a, b = fmt.encode(tokenizer, "第一个对话", []), fmt.encode(tokenizer, "another conversation", [])
    for prompt in (a, b):
        seq = new_sequence(model, prompt, GREEDY, cache_salt="one user")
        batch.admit(seq)
        batch.prefill([seq])
        batch.release(seq)
    slot_a = next(s for s, (_, tokens) in batch.slot_contents.items() if tokens[:len(a)] == a)
    follow_up = fmt.encode(tokenizer, "再说一遍", [("第一个对话", "好的")])
    seq = new_sequence(model, follow_up, GREEDY, cache_salt="one user")
    batch.admit(seq)
    assert seq.slot == slot_a and seq.cached >= len(a) - 1
    unrelated = new_sequence(model, fmt.encode(tokenizer, "zzz", []), GREEDY, cache_salt="one user")
    batch.admit(unrelated)
    assert unrelated.slot not in batch.slot_contents and unrelated.cached == 0  # the empty slot
    batch.release(seq)
    batch.release(unrelated)


def test_stream_chat_keeps_the_conversation_cached_between_calls(family_models):
    tokenizer, model = family_models["glm4"]
    CHAT_BATCHES.pop(model, None)
    response, history = model.chat(tokenizer, "你好", [], temperature=0, max_length=64, system="Be brief.")
    assert history == [("你好", response)]
    updates = list(stream_answer(model, tokenizer, "再见", history, SamplingParams(max_length=96, temperature=0),
                                 system="Be brief."))
    plan = plan_prompt(tokenizer, "再见", history, 96, system="Be brief.")
    assert updates[-1].prompt_tokens == len(plan.tokens)
    cached = CHAT_BATCHES[model].slot_contents[0][1]
    assert cached[:len(plan.tokens)] == plan.tokens  # the second turn sits in the slot for a third


# ---- quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("family, bits", [("chatglm3", 8), ("glm4", 4)])
def test_on_the_fly_quantization(family_dirs, family_models, family, bits):
    tokenizer, float_model = family_models[family]
    _, model = load_model(family_dirs[family], device="cpu", dtype="bfloat16", quantize=bits)
    assert model.config.quantization_bit == bits
    from model_runtime.quant.convert import quantized_linears
    assert len(quantized_linears(model)) == 4 * model.config.num_layers + 1  # the blocks', and the INT8 output layer
    prompt = chat_format_for(tokenizer).encode(tokenizer, "你好", [])
    answer = generate(model, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)[0]
    assert len(answer) > 0 and max(answer) < tokenizer.vocab_size


def test_chatglm2_int4_published_format_loads(family_dirs, tmp_path):
    """A checkpoint like THUDM/chatglm2-6b-int4: quantization_bit 4 in config.json, int8-packed
    `weight` + float16 `weight_scale` per block Linear, the rest float16."""
    from model_runtime.quant.saving import save_quantized

    tokenizer, quantized = load_model(family_dirs["chatglm2"], device="cpu", dtype="float32", quantize=4)
    folder = save_quantized(quantized, tokenizer, tmp_path / "int4", weight_format="bin")
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("glm_family")  # as published: only the names say which model it is
    raw["_name_or_path"] = "THUDM/chatglm2-6b-int4"
    (folder / "config.json").write_text(json.dumps(raw))
    state = torch.load(next(folder.glob("pytorch_model-*.bin")), weights_only=True)
    packed = state["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert packed.dtype == torch.int8 and packed.shape[1] == quantized.config.hidden_size // 2
    tokenizer2, reloaded = load_model(folder, device="cpu", dtype="float32")
    assert reloaded.config.quantization_bit == 4 and reloaded.config.family == "chatglm2"
    prompt = chat_format_for(tokenizer2).encode(tokenizer2, "你好", [])
    assert generate(reloaded, [prompt], GREEDY, vocab_size=tokenizer2.vocab_size) == \
        generate(quantized, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)


# ---- loading errors ----------------------------------------------------------------------------


def test_config_and_tokenizer_mismatch_is_named(family_dirs, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(family_dirs["chatglm3"], folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(raw, padded_vocab_size=128)))
    with pytest.raises(CheckpointError, match="padded_vocab_size"):
        load_model(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps(dict(raw, ffn_hidden_size=96)))
    with pytest.raises(CheckpointError, match=r"mlp.dense_h_to_4h.weight' has shape"):
        load_model(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_model(folder, device="cpu")


def test_family_config_round_trips(family_models):
    _, model = family_models["glm4"]
    raw = model.config.to_dict()
    assert raw["eos_token_id"] == list(model.config.eos_token_ids) and raw["glm_family"] == "glm4"
    assert GLM2Config.from_dict(raw) == model.config


# ---- the OpenAI-compatible API ----------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_openai_api_serves_each_family(family_models, family):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    tokenizer, model = family_models[family]
    messages = [Message("system", "Be brief."), Message("user", "你好")]
    engine = Engine(tokenizer, model, slots=2, name=f"{family}-tiny")
    try:
        expected = ask(engine, messages, max_new_tokens=12)
        app = FastAPI()
        api.add_api_routes(app, engine)
        body = {"model": f"{family}-tiny", "temperature": 0, "max_tokens": 12,
                "messages": [{"role": m.role, "content": m.content} for m in messages]}
        with TestClient(app) as client:
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            result = reply.json()
            assert result["choices"][0]["message"]["content"] == expected.text
            assert result["usage"]["prompt_tokens"] == expected.prompt_tokens
            with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as stream:
                chunks = [json.loads(line[6:]) for line in stream.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert streamed == expected.text
    finally:
        engine.close()


def test_p_tuning_v2_checkpoint_loads_and_its_prefix_is_seen(family_dirs, family_models, tmp_path):
    from safetensors.torch import save_file

    tokenizer, base = family_models["chatglm3"]
    folder = tmp_path / "ptuning"
    shutil.copytree(family_dirs["chatglm3"], folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(raw, pre_seq_len=4)))
    config = base.config
    rows = torch.randn(4, config.num_layers * 2 * config.kv_heads * config.head_dim, generator=torch.Generator().manual_seed(3))
    save_file({"transformer.prefix_encoder.embedding.weight": rows.half()}, folder / "prefix.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.prefix_encoder.embedding.weight"] = "prefix.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, tuned = load_model(folder, device="cpu", dtype="float32")
    prompt = chat_format_for(tokenizer).encode(tokenizer, "你好", [])
    with_prefix = generate(tuned, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)[0]
    keys, values = tuned.transformer.layers[1].attention.prefix_kv
    expected = rows.half().float().view(4, config.num_layers * 2, config.kv_heads, config.head_dim)
    assert torch.equal(keys[0], expected[:, 2].transpose(0, 1)) and torch.equal(values[0], expected[:, 3].transpose(0, 1))
    tuned.set_prefix(None)
    assert generate(tuned, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)[0] == \
        generate(base, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)[0] != with_prefix


# ---- the page ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_page_serves_each_family(family_models, family):
    import socket

    tokenizer, model = family_models[family]
    engine = Engine(tokenizer, model, slots=2, name=f"{family}-tiny")
    page = ui.build_page(engine)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        page.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        brief = client.predict("你好", [], 96, 0.8, 0.0, "Be brief.", api_name="/chat")
        english = client.predict("你好", [], 96, 0.8, 0.0, "Answer in English, please.", api_name="/chat")
        assert brief
        # ChatGLM3 / GLM-4 get the system prompt as their own message; ChatGLM2 has no such box.
        assert (brief != english) == (family != "chatglm2")
        follow_up = client.predict("再见", [["你好", brief]], 160, 0.8, 0.0, "Be brief.", api_name="/chat")
        assert follow_up
        assert engine.stats()["prompt_tokens_reused_total"] > 0  # the follow-up reused the first turn
    finally:
        page.close()
        engine.close()
