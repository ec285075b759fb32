"""GLM-4-0414 / GLM-Z1 (Glm4ForCausalLM) and glm-4-9b-chat-hf (GlmForCausalLM): our network
against transformers' own classes on tiny random checkpoints that transformers saves, loaded
through load_model; and our tiny checkpoints loaded by transformers."""
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model_runtime.loading.family import detect_family, read_config
from model_runtime.loading.loader import load_model
from model_runtime.loading.ptuning import PrefixCheckpoint, with_prefix_config
from model_runtime.models.config import CheckpointError
from model_runtime.models.glm_hf import HFGLMModel
from model_runtime.models.kv_cache import attention_mask
from model_runtime.protocol import SamplingParams
from model_runtime.quant.format import quantize_weight
from model_runtime.quant.saving import save_quantized
from model_runtime.serving.decode_batch import generate
from model_runtime.tiny.glm_hf import GLM4_0414_TEMPLATE, write_tiny_hf_checkpoint, write_tiny_json_tokenizer


STEPS = 32
GREEDY = SamplingParams(max_length=256, temperature=0)

# (transformers class, its config class, config overrides): grouped heads, partial rotary, tied and
# untied output layer, with and without attention bias.
CONFIGS = {
    "glm4-grouped-untied-bias": ("Glm4ForCausalLM", "Glm4Config", dict(num_key_value_heads=2)),
    "glm4-tied-nobias": ("Glm4ForCausalLM", "Glm4Config", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                               attention_bias=False)),
    "glm4-ungrouped-quarter-rotary": ("Glm4ForCausalLM", "Glm4Config", dict(num_key_value_heads=4,
                                                                            partial_rotary_factor=0.25)),
    "glm-grouped-untied-bias": ("GlmForCausalLM", "GlmConfig", dict(num_key_value_heads=2)),
    "glm-tied-full-rotary": ("GlmForCausalLM", "GlmConfig", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                                 partial_rotary_factor=1.0)),
}


def save_transformers_checkpoint(folder, name: str) -> "torch.nn.Module":
    """A tiny random checkpoint saved by transformers' own class (random weights at a scale that
    makes greedy answers vary; the output rows past the tokenizer's ids, which the serving path
    never picks, zero), with our tiny tokenizer files beside it."""
    class_name, config_name, overrides = CONFIGS[name]
    tokenizer = write_tiny_json_tokenizer(folder, GLM4_0414_TEMPLATE, f"tiny/{name}")
    stops = [tokenizer.special_id(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": overrides.pop("partial_rotary_factor", 0.5)}
    config = getattr(transformers, config_name)(
        vocab_size=704, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, eos_token_id=stops, pad_token_id=stops[0],
        rope_parameters=rope, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).float().eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in param_name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(2.5 * torch.randn_like(param) / param.shape[-1] ** 0.5)
        model.get_output_embeddings().weight[tokenizer.vocab_size:] = 0  # padding rows: never the argmax
    model.save_pretrained(folder)
    return model


def our_greedy_logits(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's float32 logits: the prompt in one forward, then one token per
    forward over our KV cache (the decode path), never stopping early."""
    cache = model.new_kv_cache(slots=1, max_len=len(prompt) + steps)
    tokens, logits, start, fed = [], [], 0, list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            end = start + len(fed)
            positions = torch.arange(start, end)[None]
            cache.set_decode_rows([(0, end)] if len(fed) == 1 else None)
            hidden = model(torch.tensor([fed]), positions, positions, attention_mask(torch.tensor([0]), positions, end),
                           torch.tensor([0]), cache)
            step_logits = model.logits(hidden[:, -1])[0]
            logits.append(step_logits)
            tokens.append(int(step_logits.argmax()))
            start, fed = end, [tokens[-1]]
    return tokens, logits


def reference_greedy_logits(reference, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits, sequence = [], [], list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            step_logits = reference(torch.tensor([sequence])).logits[0, -1].float()
            logits.append(step_logits)
            tokens.append(int(step_logits.argmax()))
            sequence.append(tokens[-1])
    return tokens, logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_at_every_greedy_step(tmp_path, name):
    reference = save_transformers_checkpoint(tmp_path, name)
    tokenizer, model = load_model(tmp_path, device="cpu", dtype="float32")
    assert isinstance(model, HFGLMModel) and model.config.family == ("glm4-0414" if "glm4" in name else "glm4-hf")
    prompt = tokenizer.chat_format.encode(tokenizer, "今天天气怎么样？", [("你好", "你好！很高兴见到你。")])
    ours, our_logits = our_greedy_logits(model, prompt, STEPS)
    theirs, their_logits = reference_greedy_logits(reference, prompt, STEPS)
    assert ours == theirs
    assert len(set(ours)) > 3  # the weights' scale makes the answer vary: the comparison means something
    for step, (a, b) in enumerate(zip(our_logits, their_logits)):
        assert torch.allclose(a[:b.shape[0]], b, atol=1e-4, rtol=0), f"step {step}: {(a - b).abs().max()}"
    # the serving path (decode batch, sampler, stop tokens) picks the same tokens until it stops
    served = generate(model, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)[0]
    assert served[:STEPS] == theirs[:len(served)] and len(served) > 0


@pytest.mark.parametrize("tiny", ["glm4-0414", "z1", "glm4-hf"])
def test_transformers_loads_our_tiny_checkpoints_and_agrees(tmp_path, tiny):
    write_tiny_hf_checkpoint(tmp_path, tiny)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reference).__name__ == ("GlmForCausalLM" if tiny == "glm4-hf" else "Glm4ForCausalLM")
    tokenizer, model = load_model(tmp_path, device="cpu", dtype="float32")
    prompt = tokenizer.chat_format.encode(tokenizer, "你好", [])
    ours, our_logits = our_greedy_logits(model, prompt, 8)
    theirs, their_logits = reference_greedy_logits(reference, prompt, 8)
    assert ours == theirs
    assert all(torch.allclose(a[:b.shape[0]], b, atol=1e-4, rtol=0) for a, b in zip(our_logits, their_logits))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_loading_follows_the_float_model(tmp_path, bits):
    save_transformers_checkpoint(tmp_path, "glm4-grouped-untied-bias")
    tokenizer, float_model = load_model(tmp_path, device="cpu", dtype="float32")
    _, quantized = load_model(tmp_path, device="cpu", dtype="float32", quantize=bits)
    assert quantized.config.quantization_bit == bits
    linears = [name for name, module in quantized.named_modules() if type(module).__name__ == "QuantizedLinear"]
    assert len(linears) == 4 * quantized.config.num_layers  # q, k and v stacked, o, gate_up, down of every block
    prompt = tokenizer.chat_format.encode(tokenizer, "你好", [])
    _, float_logits = our_greedy_logits(float_model, prompt, 1)
    _, quant_logits = our_greedy_logits(quantized, prompt, 1)
    error = (quant_logits[0] - float_logits[0]).norm() / float_logits[0].norm()
    assert 0 < error < (0.05 if bits == 8 else 0.3)
    # the in-place route (load float, then quantize) gives the same layers
    _, later = load_model(tmp_path, device="cpu", dtype="float32")
    later.quantize(bits)
    _, later_logits = our_greedy_logits(later, prompt, 1)
    assert torch.allclose(later_logits[0], quant_logits[0], atol=1e-5)


def test_q_k_v_are_stacked_on_load_and_split_again_on_save(tmp_path):
    """The checkpoint's q_proj, k_proj and v_proj run as one stacked Linear; quantized (per row,
    so stacking and quantizing commute) and saved, they are the checkpoint's three layers again,
    each the quantization of its own float rows, and the reload answers as the model saved."""
    save_transformers_checkpoint(tmp_path / "float", "glm4-grouped-untied-bias")
    floats = load_file(tmp_path / "float" / "model.safetensors")
    tokenizer, model = load_model(tmp_path / "float", device="cpu", dtype="float32")
    attention = model.model.layers[1].self_attn
    assert not hasattr(attention, "q_proj") and torch.equal(attention.qkv_proj.weight, torch.cat(
        [floats[f"model.layers.1.self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")]))
    model.quantize(4)
    saved = save_quantized(model, tokenizer, tmp_path / "int4", float_dtype=torch.float32)
    stored = {}
    for shard in saved.glob("*.safetensors"):
        stored.update(load_file(shard))
    assert not any("qkv_proj" in name for name in stored)
    for name in ("q_proj", "k_proj", "v_proj"):
        prefix = f"model.layers.1.self_attn.{name}"
        weight, scale = quantize_weight(floats[f"{prefix}.weight"], 4)
        assert torch.equal(stored[f"{prefix}.weight"], weight) and torch.equal(stored[f"{prefix}.weight_scale"], scale)
        assert torch.equal(stored[f"{prefix}.bias"], floats[f"{prefix}.bias"])
    _, reloaded = load_model(saved, device="cpu", dtype="float32")
    prompt = tokenizer.chat_format.encode(tokenizer, "你好", [])
    ours, logits = our_greedy_logits(model, prompt, 4)
    again, logits_again = our_greedy_logits(reloaded, prompt, 4)
    assert ours == again and all(torch.equal(a, b) for a, b in zip(logits, logits_again))


def test_a_missing_part_of_a_stacked_layer_is_named(tmp_path):
    save_transformers_checkpoint(tmp_path, "glm4-grouped-untied-bias")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lack model\.layers\.0\.self_attn\.k_proj\.weight$"):
        load_model(tmp_path, device="cpu", dtype="float32")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(48, 64\), "
                                              r"config.json implies 32 rows"):
        load_model(tmp_path, device="cpu", dtype="float32")


def test_bfloat16_model_with_int8_output_layer_loads(tmp_path):
    save_transformers_checkpoint(tmp_path, "glm4-tied-nobias")
    tokenizer, model = load_model(tmp_path, device="cpu", dtype="bfloat16", quantize=8, lm_head="auto")
    prompt = tokenizer.chat_format.encode(tokenizer, "你好", [])
    assert generate(model, [prompt], SamplingParams(max_length=64, temperature=0), vocab_size=tokenizer.vocab_size)[0]


def test_family_detection_reads_architectures_and_model_type(tmp_path):
    assert detect_family({"architectures": ["Glm4ForCausalLM"]}, tmp_path) == "glm4-0414"
    assert detect_family({"model_type": "glm4"}, tmp_path) == "glm4-0414"
    assert detect_family({"architectures": ["GlmForCausalLM"], "model_type": "glm"}, tmp_path) == "glm4-hf"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4", "vocab_size": 151552}))
    with pytest.raises(CheckpointError, match="missing required field"):
        read_config(tmp_path)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    write_tiny_hf_checkpoint(tmp_path, "glm4-0414")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="rope scaling"):
        read_config(tmp_path)


def test_a_published_style_config_reads_with_the_real_sizes(tmp_path):
    """GLM-4-9B-0414's config.json as published (top-level rope fields, torch_dtype, eos list):
    read as the 0414 network with GLM-4-9B-chat's sizes, 9.4 billion parameters."""
    raw = {"architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "attention_bias": True,
           "attention_dropout": 0.0, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
           "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 32768,
           "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
           "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 151552}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = read_config(tmp_path)
    assert (config.family, config.rotary_dim, config.kv_heads, config.eos_token_ids) == \
        ("glm4-0414", 64, 2, (151329, 151336, 151338))
    assert 9.3e9 < sum(config.parameter_counts()) < 9.5e9
    with torch.device("meta"):  # the full-size network's shapes, nothing allocated
        model = HFGLMModel(config)
    assert sum(p.numel() for p in model.parameters()) == sum(config.parameter_counts())
    assert model.rotary.base == 10000.0 and len(model.model.layers) == 40


def test_a_p_tuning_prefix_is_refused_clearly(tmp_path):
    write_tiny_hf_checkpoint(tmp_path, "glm4-0414")
    prefix = PrefixCheckpoint(folder=tmp_path, tensors={}, pre_seq_len=4, prefix_projection=False, base_model="")
    with pytest.raises(CheckpointError, match="P-tuning v2 prefixes are for ChatGLM's own layouts"):
        with_prefix_config(read_config(tmp_path), prefix)


def test_a_peft_lora_adapter_merges_as_peft_merges_it(tmp_path):
    """A LoRA adapter PEFT trains on transformers' Glm4ForCausalLM (every block projection
    targeted, named after a 0414 checkpoint) loads with --adapter: logits equal PEFT's merged model."""
    reference = save_transformers_checkpoint(tmp_path / "base", "glm4-grouped-untied-bias")
    torch.manual_seed(1)
    lora = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"  # named as a real 0414 adapter is: read as
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()),  # glm4-0414, not glm4
                                           base_model_name_or_path="THUDM/GLM-4-9B-0414")))
    merged = lora.merge_and_unload().eval()
    tokenizer, model = load_model(tmp_path / "base", device="cpu", dtype="float32", adapter=tmp_path / "adapter")
    assert model.fine_tunes and "LoRA" in model.fine_tunes[0]
    prompt = tokenizer.chat_format.encode(tokenizer, "你好", [])
    ours, our_logits = our_greedy_logits(model, prompt, 8)
    theirs, their_logits = reference_greedy_logits(merged, prompt, 8)
    assert ours == theirs
    assert all(torch.allclose(a[:b.shape[0]], b, atol=1e-4, rtol=0) for a, b in zip(our_logits, their_logits))
