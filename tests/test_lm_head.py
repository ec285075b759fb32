"""The INT8 output layer (`QuantizedOutputLayer`): on by default with quantized blocks where a fused
int8 kernel runs, its error bounded at full size and on every tiny family, saved and reloaded."""
import json

import pytest
import torch
import torch.nn.functional as F

from model_runtime.chat.formats import chat_format_for
from model_runtime.loading.loader import load_model
from model_runtime.models.kv_cache import attention_mask
from model_runtime.protocol import SamplingParams
from model_runtime.quant.backends import choose_kernel
from model_runtime.quant.convert import quantize_lm_head
from model_runtime.quant.format import QuantizationError, quantize_weight, reference_linear
from model_runtime.quant.linear import QuantizedOutputLayer
from model_runtime.quant.saving import save_quantized
from model_runtime.serving.decode_batch import generate

PROMPTS = ["你好", "hello", "今天天气怎么样？", "write a poem", "1+1=?", "介绍一下北京", "what is AI", "再见"]


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def int8_copy(linear_weight: torch.Tensor) -> QuantizedOutputLayer:
    layer = QuantizedOutputLayer(linear_weight.shape[1], linear_weight.shape[0], dtype=linear_weight.dtype)
    layer.load_tensor("weight", linear_weight.detach())
    return layer


def all_hidden_states(model, ids: list[int]) -> torch.Tensor:
    layout = model.layout_for_prompt(ids)
    cache = model.new_kv_cache(slots=1, max_len=len(ids))
    cache_positions = torch.arange(len(ids))[None]
    mask = attention_mask(torch.tensor([layout.prefix_len]), cache_positions, len(ids))
    with torch.no_grad():
        return model(torch.tensor([ids]), layout.positions(0, len(ids))[None], cache_positions, mask,
                     torch.tensor([0]), cache)[0]


def test_full_size_error_is_the_int8_weight_error():
    # ChatGLM-6B's output layer shape (GLM-4's 151552 rows measure the same), random weights of the
    # embedding's scale, hidden states of unit scale, 1..16 rows per call (decode batches). The
    # float head in float32 (in slices of the vocabulary) is exact to about 1e-7 here: bfloat16
    # products are exact in float32, and 4096 terms lose far less than the 1e-2 measured.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(130528, 4096, generator=generator, dtype=torch.bfloat16).div_(64)  # exact: a power of 2
    layer = int8_copy(weight)
    assert layer.kernel.name == choose_kernel("cpu", 8, torch.bfloat16).name != "dequant"
    assert layer.kernel.gemm_above == float("inf")
    hidden = torch.randn(64, 4096, generator=generator).to(torch.bfloat16)
    ours = torch.cat([layer(rows) for rows in hidden.split(16)]).float()
    float_head = torch.cat([F.linear(hidden.float(), rows.float()) for rows in weight.split(16384)], dim=1)
    assert relative_error(ours, float_head) < 0.0105  # measured 0.0089
    # Random logits have small top-2 gaps (median 0.16 std), so this is a floor: measured 0.95 on 512 rows.
    assert (ours.argmax(1) == float_head.argmax(1)).float().mean() >= 0.85


def test_int8_output_layer_matches_its_own_reference_at_every_batch_size():
    generator = torch.Generator().manual_seed(0)
    embedding = torch.nn.Embedding(1024, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(1024, 512, generator=generator) / 512 ** 0.5)
    head = QuantizedOutputLayer.tied_to(embedding)
    assert head.state_dict() == {}  # derived from the embedding: never saved
    for rows in (1, 20):
        hidden = torch.randn(rows, 512, generator=generator).to(torch.bfloat16)
        exact = reference_linear(hidden.double(), *quantize_weight(embedding.weight, 8), 8)
        assert relative_error(head(hidden), exact) < 6e-3  # the kernel, bf16 output rounding only


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_greedy_tokens_and_logits_of_tiny_models_stay_close(tiny_checkpoint, tiny_family_checkpoints, family):
    """Teacher-forced along the float head's greedy answers (the hidden states are the same for
    both heads): measured 97-99.6% of argmax tokens agree, logits within 0.63-0.66%."""
    folder = tiny_checkpoint if family == "chatglm" else tiny_family_checkpoints[family]
    tokenizer, model = load_model(folder, device="cpu", dtype="bfloat16", quantize=8, lm_head="float")
    int8_head = int8_copy(model.lm_head.weight)
    chat_format = chat_format_for(tokenizer)
    agree = total = 0
    float_logits, int8_logits = [], []
    for text in PROMPTS:
        prompt = chat_format.encode(tokenizer, text, [])
        answer = generate(model, [prompt], SamplingParams(max_length=len(prompt) + 32, temperature=0),
                          vocab_size=tokenizer.vocab_size)[0]
        hidden = all_hidden_states(model, prompt + answer)[len(prompt) - 1:]
        with torch.no_grad():
            plain, ours = (head(hidden).float()[:, :tokenizer.vocab_size] for head in (model.lm_head, int8_head))
        agree += int((plain.argmax(1) == ours.argmax(1)).sum())
        total += len(plain)
        float_logits.append(plain)
        int8_logits.append(ours)
    assert relative_error(torch.cat(int8_logits), torch.cat(float_logits)) < 0.008
    assert agree / total >= 0.95


@pytest.mark.parametrize("family", ["chatglm", "glm4"])
def test_default_follows_the_blocks_and_the_kernel(tiny_checkpoint, tiny_family_checkpoints, family):
    folder = tiny_checkpoint if family == "chatglm" else tiny_family_checkpoints[family]
    _, quantized = load_model(folder, device="cpu", dtype="bfloat16", quantize=4)
    assert isinstance(quantized.lm_head, QuantizedOutputLayer)
    _, opted_out = load_model(folder, device="cpu", dtype="bfloat16", quantize=4, lm_head="float")
    _, unquantized = load_model(folder, device="cpu", dtype="bfloat16")
    _, no_fused_kernel = load_model(folder, device="cpu", dtype="float32", quantize=4)  # int8pack: bf16 only
    for model in (opted_out, unquantized, no_fused_kernel):
        assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantizedOutputLayer)
    _, forced = load_model(folder, device="cpu", dtype="bfloat16", lm_head="int8")
    assert isinstance(forced.lm_head, QuantizedOutputLayer)
    with pytest.raises(QuantizationError, match="fused int8 kernel"):
        load_model(folder, device="cpu", dtype="float32", lm_head="int8")
    with pytest.raises(ValueError, match="lm_head must be one of"):
        load_model(folder, device="cpu", lm_head=True)


def test_chatglm6b_int8_head_changes_only_the_logits_and_is_never_saved(tiny_checkpoint, tmp_path):
    tokenizer, plain = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=4, lm_head="float")
    _, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=4)
    assert isinstance(model.lm_head, QuantizedOutputLayer) and quantize_lm_head(model) is model
    assert torch.equal(model.transformer.word_embeddings.weight, plain.transformer.word_embeddings.weight)
    ids = chat_format_for(tokenizer).encode(tokenizer, "你好", [])
    hidden = all_hidden_states(plain, ids)
    assert torch.equal(all_hidden_states(model, ids), hidden)
    assert 0 < relative_error(model.logits(hidden), plain.logits(hidden)) < 0.02
    assert set(model.state_dict()) == set(plain.state_dict()) - {"lm_head.weight"}
    save_quantized(model, tokenizer, tmp_path / "saved", float_dtype=torch.bfloat16)
    assert "output_layer_bit" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    _, reloaded = load_model(tmp_path / "saved", device="cpu", lm_head="float")
    assert isinstance(reloaded.lm_head, torch.nn.Linear) and not isinstance(reloaded.lm_head, QuantizedOutputLayer)
    assert torch.equal(reloaded.logits(hidden), plain.logits(hidden))


def test_untied_int8_output_layer_is_quantized_on_arrival_saved_and_reloaded(tiny_family_checkpoints, tmp_path):
    folder = tiny_family_checkpoints["glm4"]
    tokenizer, plain = load_model(folder, device="cpu", dtype="bfloat16", quantize=4, lm_head="float")
    _, model = load_model(folder, device="cpu", dtype="bfloat16", quantize=4)
    layer = model.transformer.output_layer
    assert isinstance(layer, QuantizedOutputLayer) and model.lm_head is layer
    assert "transformer.output_layer.weight" not in dict(model.named_parameters())  # no float copy kept
    expected = quantize_weight(plain.transformer.output_layer.weight, 8)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(layer.kernel.published(), expected))
    saved = save_quantized(model, tokenizer, tmp_path / "saved", float_dtype=torch.bfloat16)
    assert json.loads((saved / "config.json").read_text())["output_layer_bit"] == 8
    _, reloaded = load_model(saved, device="cpu")
    assert isinstance(reloaded.lm_head, QuantizedOutputLayer)
    prompt = chat_format_for(tokenizer).encode(tokenizer, "你好", [])
    hidden = all_hidden_states(model, prompt)
    assert torch.equal(reloaded.logits(hidden), model.logits(hidden))
    with pytest.raises(QuantizationError, match="stores its output layer in INT8"):
        load_model(saved, device="cpu", lm_head="float")
