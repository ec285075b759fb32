"""Your own fine-tunes on a base model: P-tuning v2 prefixes (ChatGLM-6B, ChatGLM3) and LoRA
adapters written by the real `peft` package, merged while loading, in float and quantized.

References are independent of the code under test: the original ChatGLM-6B code's outputs
(tests/data), weights the test merges itself (W + scale * B @ A), and peft's own merge_and_unload."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import huggingface_hub
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import app
from model_runtime.loading.loader import load_model
from model_runtime.models.config import CheckpointError
from model_runtime.models.glm6b import ChatGLMModel, GLMConfig
from model_runtime.models.kv_cache import attention_mask
from model_runtime.quant.saving import save_quantized
from model_runtime.tiny.checkpoint import write_tiny_checkpoint
from model_runtime.tiny.glm6b import TinySize

from .browser.app_server import AppServer
from .conftest import reference_arrays
from .test_parity import REFERENCE_LAYOUT, replay_reference_steps

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("chatglm", "chatglm3")
PROMPT = "你好，今天天气怎么样？"


# ---- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {family: write_tiny_checkpoint(root / family, family=family, weight_formats=("safetensors",))
            for family in FAMILIES}


def checkpoint_tensors(folder) -> dict:
    """The checkpoint's own tensors, read straight from its safetensors shards."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            tensors.update({name: shard.get_tensor(name) for name in shard.keys()})
    return tensors


def stand_in_tree(folder) -> nn.Module:
    """Plain torch modules at the checkpoint's parameter names, holding its weights: what peft
    sees when it trains an adapter on the real model."""
    tensors = checkpoint_tensors(folder)
    root = nn.Module()
    modules = sorted({name.rpartition(".")[0] for name in tensors})
    for path in modules:
        weight, bias = tensors.get(f"{path}.weight"), tensors.get(f"{path}.bias")
        if weight is None:
            continue
        if weight.dim() == 1:
            module = nn.LayerNorm(weight.shape[0], bias=bias is not None)
        elif path.endswith("word_embeddings"):
            module = nn.Embedding(*weight.shape)
        else:
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        module.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
        parent = root
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path.split(".")[-1], module)
    return root


def write_adapter(folder, out, seed=0, safe=True, tree=None, **lora):
    """Train nothing, but give every LoRA (and other trainable) tensor random non-zero values,
    and save the adapter with peft. Returns the peft model (for its own merge)."""
    model = peft.get_peft_model(tree or stand_in_tree(folder), peft.LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out, safe_serialization=safe)
    return model


def logits(model, tokenizer, text=PROMPT) -> torch.Tensor:
    """Logits of every position of one prompt, in one forward."""
    prompt = tokenizer.encode(text)
    layout, n = model.layout_for_prompt(prompt), len(prompt)
    cache_positions = torch.arange(n)[None]
    mask = attention_mask(torch.tensor([layout.prefix_len]), cache_positions, n)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt]), layout.positions(0, n)[None], cache_positions, mask,
                       torch.tensor([0]), model.new_kv_cache(1, n))
        return model.logits(hidden)[0]


def merge_by_hand(model, adapter_dir) -> None:
    """W + scale * B @ A for every LoRA pair of the adapter file, scale = lora_alpha / r."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace("lora_A", "lora_B")]
                params[f"{module}.weight"] += scale * b @ a


# ---- P-tuning v2 ---------------------------------------------------------------------------------


def test_glm6b_p_tuning_v2_prefix_matches_original_code():
    """tests/data/glm_ptuning_v2_model.data: the original ChatGLM-6B class with pre_seq_len 5."""
    take = reference_arrays("glm_ptuning_v2_model.data")
    prefix_kv = take((2, 8, 5, 4), np.float16).float()
    h, f, v, layer = 32, 128, 5, "transformer.layers.0."
    shapes = [("transformer.word_embeddings.weight", (v, h)),
              (layer + "input_layernorm.weight", (h,)), (layer + "input_layernorm.bias", (h,)),
              (layer + "attention.query_key_value.weight", (3 * h, h)),
              (layer + "attention.query_key_value.bias", (3 * h,)),
              (layer + "attention.dense.weight", (h, h)), (layer + "attention.dense.bias", (h,)),
              (layer + "post_attention_layernorm.weight", (h,)), (layer + "post_attention_layernorm.bias", (h,)),
              (layer + "mlp.dense_h_to_4h.weight", (f, h)), (layer + "mlp.dense_h_to_4h.bias", (f,)),
              (layer + "mlp.dense_4h_to_h.weight", (h, f)), (layer + "mlp.dense_4h_to_h.bias", (h,)),
              ("transformer.final_layernorm.weight", (h,)), ("transformer.final_layernorm.bias", (h,))]
    weights = {key: take(shape, np.float32) for key, shape in shapes}
    steps = [(take((n,), np.int32), take((n, h), np.float32)) for n in (3, 1, 1)]
    assert take.remaining() == 0
    config = GLMConfig(vocab_size=5, hidden_size=32, num_layers=1, num_attention_heads=8, inner_hidden_size=128,
                       max_sequence_length=16, bos_token_id=1, eos_token_id=2, mask_token_id=3, gmask_token_id=4,
                       pre_seq_len=5)
    model = ChatGLMModel(config).float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) == {"lm_head.weight", "transformer.prefix_encoder.embedding.weight"} and not unexpected
    model.set_prefix(prefix_kv)
    replay_reference_steps(model, steps)
    model.set_prefix(None)  # the prefix matters: without it the first step is far off
    with torch.no_grad():
        cache_positions = torch.arange(3)[None]
        hidden = model(steps[0][0].long()[None], REFERENCE_LAYOUT.positions(0, 3)[None], cache_positions,
                       attention_mask(torch.tensor([2]), cache_positions, 3), torch.tensor([0]),
                       model.new_kv_cache(1, 8))
    assert (hidden[0] - steps[0][1]).abs().max() > 0.1


def write_ptuning_checkpoint(folder, base_model, pre_seq_len=4, projection=False, seed=1, name_or_path=None,
                             extra=None):
    """A folder as the ptuning/ trainer saves it: pytorch_model.bin with the prefix encoder only,
    and the model's config.json with pre_seq_len."""
    c = base_model.config
    kv_size = c.num_layers * 2 * c.kv_heads * c.head_dim
    generator = torch.Generator().manual_seed(seed)
    width = (c.hidden_size if c.family == "chatglm" else kv_size) if projection else kv_size
    tensors = {"transformer.prefix_encoder.embedding.weight": torch.randn(pre_seq_len, width, generator=generator)}
    if projection:
        tensors.update({
            "transformer.prefix_encoder.trans.0.weight": torch.randn(c.hidden_size, width, generator=generator) * 0.2,
            "transformer.prefix_encoder.trans.0.bias": torch.randn(c.hidden_size, generator=generator) * 0.2,
            "transformer.prefix_encoder.trans.2.weight": torch.randn(kv_size, c.hidden_size, generator=generator) * 0.2,
            "transformer.prefix_encoder.trans.2.bias": torch.randn(kv_size, generator=generator) * 0.2})
    tensors.update(extra or {})
    folder.mkdir(parents=True)
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"pre_seq_len": pre_seq_len, "prefix_projection": projection,
                                                    "_name_or_path": name_or_path or f"THUDM/{c.family}-6b"}))
    return tensors


def original_prefix(tensors, config, pre_seq_len):
    """What the original's get_prompt computes: the encoder's rows (through its MLP when there is
    one), viewed [P, layers * 2, heads, d], permuted to [layers * 2, heads, P, d]."""
    rows = tensors["transformer.prefix_encoder.embedding.weight"]
    if "transformer.prefix_encoder.trans.0.weight" in tensors:
        hidden = torch.tanh(rows @ tensors["transformer.prefix_encoder.trans.0.weight"].T
                            + tensors["transformer.prefix_encoder.trans.0.bias"])
        rows = hidden @ tensors["transformer.prefix_encoder.trans.2.weight"].T \
            + tensors["transformer.prefix_encoder.trans.2.bias"]
    return rows.view(pre_seq_len, config.num_layers * 2, config.kv_heads, config.head_dim).permute(1, 2, 0, 3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_p_tuning_checkpoint_loads_on_top_of_the_base(checkpoints, tmp_path, family, projection):
    tokenizer, base = load_model(checkpoints[family], device="cpu", dtype="float32")
    tensors = write_ptuning_checkpoint(tmp_path / "ckpt", base, projection=projection)
    _, tuned = load_model(checkpoints[family], device="cpu", dtype="float32", ptuning_checkpoint=tmp_path / "ckpt")
    assert tuned.fine_tunes == ("P-tuning v2 prefix ckpt (4 tokens)",)
    assert (tuned.config.pre_seq_len, tuned.config.prefix_projection) == (4, projection)
    expected = original_prefix(tensors, base.config, 4)
    base.set_prefix(expected)  # the base's own weights, with the prefix the original code would compute
    torch.testing.assert_close(logits(tuned, tokenizer), logits(base, tokenizer), rtol=1e-5, atol=1e-5)
    base.set_prefix(None)
    assert (logits(tuned, tokenizer) - logits(base, tokenizer)).abs().max() > 1e-2  # the prefix is seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [8, 4])
def test_p_tuning_prefix_on_quantized_weights(checkpoints, tmp_path, family, bits):
    tokenizer, base = load_model(checkpoints[family], device="cpu", dtype="float32", quantize=bits)
    tensors = write_ptuning_checkpoint(tmp_path / "ckpt", base, pre_seq_len=6)
    _, tuned = load_model(checkpoints[family], device="cpu", dtype="float32", quantize=bits,
                          ptuning_checkpoint=tmp_path / "ckpt", pre_seq_len=6)
    base.set_prefix(original_prefix(tensors, base.config, 6))
    torch.testing.assert_close(logits(tuned, tokenizer), logits(base, tokenizer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_moved_model_takes_its_prefix_along(checkpoints, tmp_path, family):
    """model.to() (how a ZeroGPU call puts the model on its GPU) converts the P-tuning prefix
    with the weights: after a dtype round trip the logits are the ones before."""
    tokenizer, base = load_model(checkpoints[family], device="cpu", dtype="float32")
    write_ptuning_checkpoint(tmp_path / "ckpt", base)
    _, tuned = load_model(checkpoints[family], device="cpu", dtype="float32", ptuning_checkpoint=tmp_path / "ckpt")
    before = logits(tuned, tokenizer)
    tuned.to(torch.float64)
    assert all(t.dtype == torch.float64 for layer in tuned.transformer.layers for t in layer.attention.prefix_kv)
    torch.testing.assert_close(logits(tuned.to(torch.float32), tokenizer), before)


def test_p_tuning_refusals(checkpoints, tmp_path):
    folder = checkpoints["chatglm"]
    _, base = load_model(folder, device="cpu", dtype="float32")
    write_ptuning_checkpoint(tmp_path / "ckpt", base, pre_seq_len=4)
    with pytest.raises(CheckpointError, match=r"embedding.weight holds 4 prefix rows, but the pre_seq_len asked for "
                                              "is 8"):
        load_model(folder, device="cpu", ptuning_checkpoint=tmp_path / "ckpt", pre_seq_len=8)
    with pytest.raises(ValueError, match="give the checkpoint too"):
        load_model(folder, device="cpu", pre_seq_len=8)
    with pytest.raises(CheckpointError, match="no such P-tuning checkpoint directory"):
        load_model(folder, device="cpu", ptuning_checkpoint=tmp_path / "nowhere")
    # The config.json the trainer saved must agree with the tensors.
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dict(config, pre_seq_len=128)))
    with pytest.raises(CheckpointError, match=r"config.json's pre_seq_len is 128"):
        load_model(folder, device="cpu", ptuning_checkpoint=tmp_path / "ckpt")
    # A whole model is not a P-tuning checkpoint.
    write_ptuning_checkpoint(tmp_path / "whole", base, extra={"transformer.final_layernorm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: tensor 'transformer.final_layernorm.weight' is not "
                                              "part of a P-tuning v2 prefix encoder"):
        load_model(folder, device="cpu", ptuning_checkpoint=tmp_path / "whole")
    # A prefix of another family: its rows do not fit, or its config.json says so.
    _, glm3 = load_model(checkpoints["chatglm3"], device="cpu", dtype="float32")
    write_ptuning_checkpoint(tmp_path / "glm3", glm3, name_or_path="/data/my-base")
    with pytest.raises(CheckpointError, match=r"embedding.weight has shape \(4, 128\), but this base model "
                                              r"\(chatglm, 2 layers\) expects shape \(4, 256\)"):
        load_model(folder, device="cpu", ptuning_checkpoint=tmp_path / "glm3")
    write_ptuning_checkpoint(tmp_path / "named", glm3)
    with pytest.raises(CheckpointError, match="trained on 'THUDM/chatglm3-6b', a chatglm3 model, but the base "
                                              "model loaded is chatglm"):
        load_model(folder, device="cpu", ptuning_checkpoint=tmp_path / "named")


# ---- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merges_as_w_plus_scaled_b_a(checkpoints, tmp_path, family):
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    write_adapter(checkpoints[family], tmp_path / "lora", r=4, lora_alpha=8, target_modules=targets)
    tokenizer, merged = load_model(checkpoints[family], device="cpu", dtype="float32", adapter=tmp_path / "lora")
    assert merged.fine_tunes == ("LoRA adapter lora (r 4)",)
    _, by_hand = load_model(checkpoints[family], device="cpu", dtype="float32")
    base_logits = logits(by_hand, tokenizer)
    merge_by_hand(by_hand, tmp_path / "lora")
    expected = logits(by_hand, tokenizer)
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter changes the model
    for bits in (8, 4):  # merged before quantizing: exactly the hand-merged model, quantized
        _, quantized = load_model(checkpoints[family], device="cpu", dtype="float32", quantize=bits,
                                  adapter=tmp_path / "lora")
        reference = load_model(checkpoints[family], device="cpu", dtype="float32")[1]
        merge_by_hand(reference, tmp_path / "lora")
        ours = logits(quantized, tokenizer)
        # Equal to the hand-merged float model quantized by the same code: what separates it from
        # the float merged model is the quantization of the merged weights and nothing else.
        torch.testing.assert_close(ours, logits(reference.quantize(bits), tokenizer), rtol=1e-5, atol=1e-5)
        assert (ours - expected).abs().mean() > 0
        if bits == 8:  # INT8 keeps the adapter's effect (measured: its error is under 1/10 of it)
            assert (ours - expected).abs().mean() < (expected - base_logits).abs().mean() / 2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_peft_option_matches_peft_own_merge(checkpoints, tmp_path, family):
    """rslora, per-module rank and alpha, trained biases, a LoRA bias, embeddings, modules_to_save,
    fan_in_fan_out and the .bin format, against peft's merge_and_unload on the same weights."""
    layout = "transformer.layers" if family == "chatglm" else "transformer.encoder.layers"
    saved = ["final_layernorm"]
    cases = [
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["query_key_value", "dense_4h_to_h"],
             rank_pattern={"dense_4h_to_h": 2}, alpha_pattern={rf"{layout}\.1\.mlp\.dense_4h_to_h": 3}),
        dict(r=2, lora_alpha=4, bias="all", target_modules=["dense_h_to_4h", "word_embeddings"],
             modules_to_save=saved, fan_in_fan_out=True),
        dict(r=3, lora_alpha=5, bias="lora_only", lora_bias=True, target_modules=["query_key_value"]),
    ]
    for i, options in enumerate(cases):
        out = tmp_path / f"case{i}"
        trained = write_adapter(checkpoints[family], out, seed=i, safe=i != 1, **options)
        tokenizer, ours = load_model(checkpoints[family], device="cpu", dtype="float32", adapter=out)
        _, reference = load_model(checkpoints[family], device="cpu", dtype="float32")
        peft_merged = trained.merge_and_unload().state_dict()
        with torch.no_grad():
            for name, param in reference.named_parameters():
                param.copy_(peft_merged[name])
        torch.testing.assert_close(logits(ours, tokenizer), logits(reference, tokenizer), rtol=1e-5, atol=1e-5)


def test_lora_refusals(checkpoints, tmp_path):
    glm6b, glm3 = checkpoints["chatglm"], checkpoints["chatglm3"]

    def refused(adapter, match, base=glm6b, **options):
        with pytest.raises(CheckpointError, match=match):
            load_model(base, device="cpu", adapter=adapter, **options)

    write_adapter(glm6b, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["dense"], use_dora=True)
    refused(tmp_path / "dora", r"adapter_config.json: use_dora is set, which cannot be merged")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=False)))
    refused(tmp_path / "dora", r"adapter_model.safetensors: tensor 'base_model.model.transformer.layers.0.attention"
                               r".dense.lora_magnitude_vector' is a DoRA magnitude vector")

    write_adapter(glm3, tmp_path / "glm3", r=2, lora_alpha=4, target_modules=["query_key_value"])
    refused(tmp_path / "glm3", r"adapter_model.safetensors: tensor for 'transformer.encoder.layers.0.self_attention."
                               r"query_key_value.weight' targets a parameter this chatglm model does not have \(it is "
                               r"named like a ChatGLM2/ChatGLM3/GLM-4 parameter: an adapter for another model family\)")

    tree = stand_in_tree(glm6b)
    tree.get_submodule("transformer.layers.0.attention").add_module("q_proj", nn.Linear(64, 64))  # a LLaMA name
    write_adapter(glm6b, tmp_path / "llama", tree=tree, r=2, lora_alpha=4, target_modules=["q_proj"])
    refused(tmp_path / "llama", r"tensor for 'transformer.layers.0.attention.q_proj.weight' targets a parameter "
                                r"this chatglm model does not have")

    wider = write_tiny_checkpoint(tmp_path / "wider", family="chatglm3", weight_formats=("safetensors",),
                                  size=TinySize(hidden_size=128, num_attention_heads=4, num_layers=2,
                                                      inner_hidden_size=256))
    write_adapter(wider, tmp_path / "wide", r=2, lora_alpha=4, target_modules=["dense"])
    refused(tmp_path / "wide", r"the update of 'transformer.encoder.layers.0.self_attention.dense.weight' has shape "
                               r"\(128, 128\), but the base model's is \(64, 64\)", base=glm3)

    write_adapter(glm3, tmp_path / "named", r=2, lora_alpha=4, target_modules=["dense"])
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    (tmp_path / "named" / "adapter_config.json").write_text(
        json.dumps(dict(config, base_model_name_or_path="THUDM/chatglm2-6b")))
    refused(tmp_path / "named", r"base_model_name_or_path 'THUDM/chatglm2-6b' is a chatglm2 model, but the base model "
                                r"loaded is chatglm3", base=glm3)

    ia3 = peft.get_peft_model(stand_in_tree(glm6b), peft.IA3Config(target_modules=["dense"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    refused(tmp_path / "ia3", r"peft_type 'IA3' is not LORA")

    shutil.copytree(tmp_path / "glm3", tmp_path / "stray")
    tensors = load_file(tmp_path / "stray" / "adapter_model.safetensors")
    save_file(dict(tensors, **{"base_model.model.transformer.encoder.final_layernorm.weight": torch.ones(64)}),
              tmp_path / "stray" / "adapter_model.safetensors")
    refused(tmp_path / "stray", r"tensor 'base_model.model.transformer.encoder.final_layernorm.weight' is neither a "
                                r"LoRA tensor nor part of modules_to_save", base=glm3)

    (tmp_path / "stray" / "adapter_model.safetensors").unlink()
    refused(tmp_path / "stray", r"stray: no adapter weights", base=glm3)
    (tmp_path / "stray" / "adapter_config.json").write_text("{not json")
    refused(tmp_path / "stray", r"adapter_config.json: not valid JSON", base=glm3)
    refused(tmp_path / "nowhere", "no such adapter directory")

    # A checkpoint stored quantized cannot take a merge.
    tokenizer, model = load_model(glm3, device="cpu", dtype="float32", quantize=8)
    int8 = save_quantized(model, tokenizer, tmp_path / "int8")
    write_adapter(glm3, tmp_path / "on-int8", r=2, lora_alpha=4, target_modules=["dense"])
    refused(tmp_path / "on-int8", r"tensor 'transformer.encoder.layers.0.self_attention.dense.weight' is stored "
                                  r"quantized \(torch.int8\)", base=int8)


def test_adapter_from_the_hugging_face_cache_offline(checkpoints, tmp_path, monkeypatch):
    """A Hub id resolves through the hub's cache (here: offline, already downloaded)."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--glm3-lora" / "snapshots" / ("0" * 40)
    write_adapter(checkpoints["chatglm3"], snapshot, r=2, lora_alpha=4, target_modules=["dense"])
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    # huggingface_hub reads its environment once, at import: set what it read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    tokenizer, model = load_model(checkpoints["chatglm3"], device="cpu", dtype="float32", adapter="someone/glm3-lora")
    assert model.fine_tunes == ("LoRA adapter someone/glm3-lora (r 2)",)
    with pytest.raises(CheckpointError, match="could not get 'someone/other' .* --adapter /path/to/adapter"):
        load_model(checkpoints["chatglm3"], device="cpu", adapter="someone/other")


def test_adapter_and_prefix_together(checkpoints, tmp_path):
    tokenizer, base = load_model(checkpoints["chatglm3"], device="cpu", dtype="float32")
    tensors = write_ptuning_checkpoint(tmp_path / "ckpt", base)
    write_adapter(checkpoints["chatglm3"], tmp_path / "lora", r=2, lora_alpha=4, target_modules=["dense"])
    _, both = load_model(checkpoints["chatglm3"], device="cpu", dtype="float32", adapter=tmp_path / "lora",
                         ptuning_checkpoint=tmp_path / "ckpt")
    assert both.fine_tunes == ("LoRA adapter lora (r 2)", "P-tuning v2 prefix ckpt (4 tokens)")
    merge_by_hand(base, tmp_path / "lora")
    base.set_prefix(original_prefix(tensors, base.config, 4))
    torch.testing.assert_close(logits(both, tokenizer), logits(base, tokenizer), rtol=1e-5, atol=1e-5)


# ---- the command line and the app ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tunes(checkpoints, tmp_path_factory):
    """A LoRA adapter and a P-tuning checkpoint for the tiny ChatGLM3."""
    root = tmp_path_factory.mktemp("fine-tunes")
    _, base = load_model(checkpoints["chatglm3"], device="cpu", dtype="float32")
    write_ptuning_checkpoint(root / "ckpt", base)
    write_adapter(checkpoints["chatglm3"], root / "lora", r=2, lora_alpha=4, target_modules=["dense"])
    return root / "lora", root / "ckpt"


def run_cli(*flags, typed="你好\nexit\n") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_runtime", "chat", *map(str, flags)], input=typed,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_flags_load_the_adapter_and_the_prefix(checkpoints, fine_tunes):
    lora, ckpt = fine_tunes
    result = run_cli("--model", checkpoints["chatglm3"], "--dtype", "float32", "--temperature", "0",
                     "--max-length", "40", "--adapter", lora, "--ptuning-checkpoint", ckpt, "--pre-seq-len", "4")
    assert result.returncode == 0, result.stderr
    assert "with LoRA adapter lora (r 2)\nwith P-tuning v2 prefix ckpt (4 tokens)\n" in result.stdout
    tokenizer, model = load_model(checkpoints["chatglm3"], device="cpu", dtype="float32", adapter=lora,
                                  ptuning_checkpoint=ckpt)
    answer, _ = model.chat(tokenizer, "你好", [], max_length=40, temperature=0)
    assert f"ChatGLM: {answer}\n" in result.stdout  # the flags reached the model
    refused = run_cli("--model", checkpoints["chatglm3"], "--ptuning-checkpoint", ckpt, "--pre-seq-len", "9")
    assert refused.returncode == 1 and "holds 4 prefix rows, but the pre_seq_len asked for is 9" in refused.stderr
    assert "Traceback" not in refused.stderr
    refused = run_cli("--model", checkpoints["chatglm"], "--adapter", lora)
    assert refused.returncode == 1 and "an adapter for another model family" in refused.stderr


def test_app_flags_and_their_environment_variables(monkeypatch):
    monkeypatch.setenv("CHATGLM_ADAPTER", "someone/lora")
    monkeypatch.setenv("CHATGLM_PTUNING_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("CHATGLM_PRE_SEQ_LEN", "128")
    args = app.parse_args([])
    assert (args.adapter, args.ptuning_checkpoint, args.pre_seq_len) == ("someone/lora", "/ckpt", 128)
    args = app.parse_args(["--adapter", "a", "--ptuning-checkpoint", "b", "--pre-seq-len", "8"])
    assert (args.adapter, args.ptuning_checkpoint, args.pre_seq_len) == ("a", "b", 8)
    monkeypatch.delenv("CHATGLM_PTUNING_CHECKPOINT")
    with pytest.raises(SystemExit) as exit_status:
        app.parse_args([])  # a prefix length without a checkpoint
    assert exit_status.value.code == 2
    help_text = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=60).stdout
    for name in ("--adapter", "--ptuning-checkpoint", "--pre-seq-len", "CHATGLM_ADAPTER",
                 "CHATGLM_PTUNING_CHECKPOINT", "CHATGLM_PRE_SEQ_LEN"):
        assert name in help_text


def test_the_page_and_v1_models_say_what_is_loaded(checkpoints, fine_tunes):
    lora, ckpt = fine_tunes
    server = AppServer("--model", str(checkpoints["chatglm3"]), "--dtype", "float32", "--adapter", str(lora),
                       "--ptuning-checkpoint", str(ckpt), program=("app.py",))
    try:
        listed = httpx.get(server.url + "v1/models", timeout=10).json()["data"]
        assert listed[0]["fine_tunes"] == ["LoRA adapter lora (r 2)", "P-tuning v2 prefix ckpt (4 tokens)"]
        page = httpx.get(server.url + "config", timeout=10).json()
        (line,) = [c["props"]["value"] for c in page["components"] if c.get("props", {}).get("elem_id") == "fine-tunes"]
        assert "LoRA adapter lora (r 2)" in line and "P-tuning v2 prefix ckpt (4 tokens)" in line
    finally:
        server.stop()
    assert "Traceback" not in server.log(tail=10**6)
