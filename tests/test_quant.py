"""INT8 / INT4 weight-only quantization: the published storage format, every backend against the
plain dequantize-then-matmul reference, and quantized loading, saving and reloading."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_runtime.loading.checkpoint import read_shard, weight_files
from model_runtime.loading.loader import load_model
from model_runtime.models.config import CheckpointError
from model_runtime.models.glm6b import GLMConfig
from model_runtime.models.kv_cache import attention_mask
from model_runtime.quant.backends import KERNELS, choose_kernel
from model_runtime.quant.convert import quantized_linears, resolve_quantization
from model_runtime.quant.format import (QuantizationError, check_bits, dequantize, pack_int4, quantize_weight,
                                        reference_linear, unpack_int4)
from model_runtime.quant.linear import QuantizedLinear
from model_runtime.quant.saving import save_quantized

# ---------------------------------------------------------------------------------------------
# Storage format, against hand-computed vectors


def test_int4_packing_matches_hand_computed_bytes():
    q = torch.tensor([[-8, 7, -1, 0, 3, -3, 1, -2]], dtype=torch.int8)
    # byte = (even << 4) | (odd & 0xF): 0x87, 0xF0, 0x3D, 0x1E as signed bytes
    expected = torch.tensor([[-121, -16, 61, 30]], dtype=torch.int8)
    assert torch.equal(pack_int4(q), expected)
    assert torch.equal(unpack_int4(expected), q)


def test_int4_unpacking_of_every_byte_is_high_nibble_first_and_signed():
    every_byte = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    unpacked = unpack_int4(every_byte[None])[0].tolist()
    for index, byte in enumerate(range(256)):  # the same bytes as unsigned values 0..255 ...
        value = (byte + 128) % 256  # ... in the order arange(-128, 128) lists them
        high, low = value >> 4, value & 0xF
        assert unpacked[2 * index] == (high - 16 if high >= 8 else high)
        assert unpacked[2 * index + 1] == (low - 16 if low >= 8 else low)
    assert torch.equal(pack_int4(unpack_int4(every_byte[None])), every_byte[None])  # bit-exact round trip


def test_quantize_weight_hand_computed_rows():
    # Row maxima 127 (INT8) and 7 (INT4) make the scale exactly 1, so q = round(fp16(w)):
    # 3.4995 becomes 3.5 in float16 first, then rounds half-to-even to 4 (float32 would give 3);
    # 2.5 -> 2 and -0.5 -> 0 (half to even); an all-zero row gets scale 0 and q 0.
    weight = torch.tensor([[127.0, 3.4995, -3.4995, 2.5, -0.5, 1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_weight(weight, 8)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.tolist() == [[127, 4, -4, 2, 0, 1], [0, 0, 0, 0, 0, 0]]
    assert scale.tolist() == [1.0, 0.0]

    weight = torch.tensor([[7.0, 3.4995, -2.5, 0.5, -7.0, 1.2]])
    q, scale = quantize_weight(weight, 4)
    assert scale.tolist() == [1.0]
    # values 7, 4, -2, 0, -7, 1 -> bytes 0x74, 0xE0, 0x91
    assert q.tolist() == [[0x74, 0xE0 - 256, 0x91 - 256]]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_is_the_reference_float16_formula(bits):
    """The reference quantizer, restated: float16 weights, float16 arithmetic."""
    weight = (torch.randn(64, 96, generator=torch.Generator().manual_seed(bits)) * 0.05).half()
    ref_scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    ref_q = torch.round(weight / ref_scale[:, None]).to(torch.int8)
    if bits == 4:
        numbers = ref_q.numpy().astype(np.int16)
        ref_q = torch.from_numpy((((numbers[:, ::2] << 4) | (numbers[:, 1::2] & 0xF)) & 0xFF)
                                 .astype(np.uint8).view(np.int8))
    q, scale = quantize_weight(weight, bits)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weight_is_within_half_a_step(bits):
    # Half a step, plus what rounding w / scale to float16 first can add: half a float16 ulp at
    # |q| < 128 is 1/32 of a step (1/512 below 8, for INT4).
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_weight(weight, bits)
    error = (dequantize(q, scale, bits) - weight).abs().amax(dim=1)
    slack = 1 / 32 if bits == 8 else 1 / 512
    assert torch.all(error <= scale.float() * (0.5 + slack) + 1e-7)
    assert torch.all(error >= scale.float() * 0.3)  # and it really is rounding (not exact, not off)


def test_unsupported_bit_widths_say_what_to_use():
    for bits in (3, 2, 16, 0, True):
        with pytest.raises(QuantizationError, match=r"quantize=.* is not supported.*8 bits.*4 bits"):
            check_bits(bits)


# ---------------------------------------------------------------------------------------------
# Backends against the dequantize-then-matmul reference


def shipped_kernels(bits, dtype):
    """The backends that can run here for this width and activation dtype."""
    return [name for name, kernel in KERNELS.items()
            if bits in kernel.bit_widths and kernel.unavailable(torch.device("cpu"), bits, dtype) is None]


def cpu_paths(bits):
    """The code paths of our own kernel (cpu-avx512, cpu-avx2) this CPU has for that weight width
    (8 also stands for attention), fastest first, read from /proc/cpuinfo (not from the kernel's
    own check: where the CPU has one, a kernel that fails to build fails the tests), at or below
    CHATGLM_CPU_ISA where that is set."""
    with open("/proc/cpuinfo") as cpuinfo:
        flags = set(next(line for line in cpuinfo if line.startswith("flags")).split())
    has = {"avx512": {"avx512f", "avx512bw"} <= flags and (bits == 8 or "avx512_bf16" in flags),
           "avx2": {"avx2", "fma"} <= flags}
    forced = os.environ.get("CHATGLM_CPU_ISA")
    allowed = {"avx512": ("avx512", "avx2"), "avx2": ("avx2",), "none": ()}.get(forced, ("avx512", "avx2"))
    return [isa for isa in allowed if has[isa]]


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


# Tolerances: the output of a bf16 kernel is rounded to bf16 (relative 2**-9 per element), float16
# rounds the dequantized weight and output, float32 only reorders sums.
TOLERANCE = {torch.bfloat16: 6e-3, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_every_backend_matches_the_reference(bits, dtype):
    generator = torch.Generator().manual_seed(bits)
    weight, scale = quantize_weight(torch.randn(192, 256, generator=generator), bits)
    bias = torch.randn(192, generator=generator).to(dtype)
    names = [name for name in shipped_kernels(bits, dtype) if not KERNELS[name].opt_in]
    assert "dequant" in names
    if dtype == torch.bfloat16:  # the fused CPU kernels for this width must be among them here
        assert ("cpu-int8pack" if bits == 8 else "cpu-int4pack") in names
        assert [name for name in names if name in ("cpu-avx512", "cpu-avx2")] == [f"cpu-{isa}" for isa in cpu_paths(bits)]
    for name in names:
        kernel = KERNELS[name].prepare(weight, scale, bits)
        published = kernel.published()
        assert torch.equal(published[0], weight) and torch.equal(published[1], scale), name
        switch = getattr(kernel, "gemm_above", 4)
        for rows in (1, switch, switch + 3):  # the weight-only kernel, and the GEMM path beyond it
            x = torch.randn(2, rows, 256, generator=generator).to(dtype)
            expected = reference_linear(x, weight, scale, bits, bias)
            got = kernel(x, bias)
            assert got.dtype == dtype and got.shape == (2, rows, 192)
            assert relative_error(got, expected) < TOLERANCE[dtype], (name, rows)


@pytest.mark.parametrize("bits", [8, 4])
def test_fbgemm_dynamic_is_opt_in_and_its_activation_error_is_measured(bits):
    """fbgemm also quantizes activations: its error, measured here on random data, is larger than
    every weight-only backend's, which is why "auto" never picks it."""
    if "cpu-fbgemm-dynamic" not in shipped_kernels(bits, torch.bfloat16):
        pytest.skip("no fbgemm in this torch build")
    assert choose_kernel("cpu", bits, torch.bfloat16) is not KERNELS["cpu-fbgemm-dynamic"]
    generator = torch.Generator().manual_seed(3)
    weight, scale = quantize_weight(torch.randn(128, 512, generator=generator), bits)
    kernel = KERNELS["cpu-fbgemm-dynamic"].prepare(weight, scale, bits)
    assert all(torch.equal(a, b) for a, b in zip(kernel.published(), (weight, scale)))
    x = torch.randn(4, 512, generator=generator)
    error = relative_error(kernel(x), reference_linear(x, weight, scale, bits))
    assert 1e-4 < error < 0.03  # visibly not exact, still close on well-behaved random activations


def test_int4pack_shapes_it_cannot_hold_fall_back_to_dequant():
    weight, scale = quantize_weight(torch.randn(40, 64), 4)  # 40 rows: not a whole layout block
    kernel = KERNELS["cpu-int4pack"].prepare(weight, scale, 4)
    assert kernel.name == "dequant"


def test_kernel_choice_and_its_errors():
    for bits in (8, 4):
        ours = cpu_paths(bits)
        assert choose_kernel("cpu", bits, torch.bfloat16).name == (f"cpu-{ours[0]}" if ours else f"cpu-int{bits}pack")
    assert choose_kernel("cpu", 8, torch.float32).name == "dequant"  # the fused ops are slow in fp32
    with pytest.raises(QuantizationError, match="'cpu-int8pack' is INT8 only.*'dequant'"):
        choose_kernel("cpu", 4, torch.bfloat16, backend="cpu-int8pack")
    with pytest.raises(QuantizationError, match="needs bfloat16"):
        choose_kernel("cpu", 4, torch.float32, backend="cpu-int4pack")
    with pytest.raises(QuantizationError, match="unknown quantization backend 'triton'"):
        choose_kernel("cpu", 4, torch.bfloat16, backend="triton")
    with pytest.raises(QuantizationError, match="CUDA only"):
        choose_kernel("cpu", 8, torch.float16, backend="cuda-torch")


# ---------------------------------------------------------------------------------------------
# Quantized models


def logits_of(model, tokenizer, text="你好，今天天气怎么样？"):
    ids = tokenizer.encode(text)
    layout = model.layout_for_prompt(ids)
    cache = model.new_kv_cache(slots=1, max_len=64)
    cache_positions = torch.arange(len(ids))[None]
    mask = attention_mask(torch.tensor([layout.prefix_len]), cache_positions, len(ids))
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), layout.positions(0, len(ids))[None], cache_positions, mask,
                       torch.tensor([0]), cache)
        return model.logits(hidden)


@pytest.fixture(scope="module")
def float_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_tiny_model_stays_close_to_the_float_model(tiny_checkpoint, float_model, dtype):
    tokenizer, reference = float_model
    expected = logits_of(reference, tokenizer)
    float_layers = {name: module for name, module in reference.named_modules() if isinstance(module, torch.nn.Linear)}
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    errors = {}
    for bits, layer_bound in ((8, 0.01), (4, 0.15)):
        _, model = load_model(tiny_checkpoint, device="cpu", dtype=dtype, quantize=bits, lm_head="float")
        # Each quantized layer: the per-row rounding error alone (about 0.6% for INT8, 10% for INT4).
        for name, module in quantized_linears(model).items():
            linear = float_layers[name]
            inputs = x[:, :linear.in_features]
            ours = module(inputs.to(module.bias.dtype)).float()
            assert relative_error(ours, F.linear(inputs.double(), linear.weight.double(),
                                                 linear.bias.double())) < layer_bound, (bits, name)
        errors[bits] = relative_error(logits_of(model, tokenizer), expected.double())
    # Whole model (this tiny random model amplifies errors: its matrices are drawn at 3x scale).
    assert errors[8] < 0.08 and errors[4] < 0.7
    assert errors[8] < errors[4] / 4


def test_quantized_loading_never_allocates_float_block_weights(tiny_checkpoint):
    _, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=4, lm_head="float")
    config = model.config
    assert config.quantization_bit == 4
    float_matrices = [name for name, p in model.named_parameters() if p.dim() == 2]
    assert float_matrices == ["transformer.word_embeddings.weight"]
    h, f = config.hidden_size, config.inner_hidden_size
    packed = sum(module.kernel.nbytes() for module in quantized_linears(model).values())
    expected = config.num_layers * (4 * h * h + 2 * h * f) // 2  # half a byte per weight ...
    assert expected <= packed <= expected * 1.3  # ... plus scales and the kernels' small extras


@pytest.mark.parametrize("bits", [8, 4])
def test_model_quantize_equals_quantizing_while_loading(tiny_checkpoint, bits):
    # float32 holds the float16 checkpoint exactly (a bfloat16 model would quantize rounded weights)
    tokenizer, model = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    assert model.quantize(bits) is model and model.config.quantization_bit == bits
    _, loaded = load_model(tiny_checkpoint, device="cpu", dtype="float32", quantize=bits)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert torch.equal(logits_of(model, tokenizer), logits_of(loaded, tokenizer))
    with pytest.raises(QuantizationError, match="already INT"):
        model.quantize(12 - bits)


def write_published_checkpoint(source, target, bits):
    """A pre-quantized checkpoint as THUDM publishes it (one pytorch_model.bin, config
    quantization_bit), made with the reference formula restated independently of quant.py."""
    target.mkdir()
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copyfile(source / name, target / name)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(dict(config, quantization_bit=bits)))
    state = {}
    for path in weight_files(source, "bin"):
        for name, tensor in read_shard(path):
            state[name] = tensor.clone()
    for name in [n for n in state if n.endswith(".weight") and any(
            layer in n for layer in ("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"))]:
        weight = state[name].half()
        scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
        q = torch.round(weight / scale[:, None]).to(torch.int8)
        if bits == 4:
            numbers = q.numpy().astype(np.int16)
            q = torch.from_numpy((((numbers[:, ::2] << 4) | (numbers[:, 1::2] & 0xF)) & 0xFF)
                                 .astype(np.uint8).view(np.int8))
        state[name], state[name[:-len("weight")] + "weight_scale"] = q, scale
    torch.save(state, target / "pytorch_model.bin")
    return target


@pytest.mark.parametrize("bits", [8, 4])
def test_on_the_fly_and_prequantized_loading_give_identical_weights(tiny_checkpoint, tmp_path, bits):
    published = write_published_checkpoint(tiny_checkpoint, tmp_path / f"int{bits}", bits)
    tokenizer, prequantized = load_model(published, device="cpu", dtype="bfloat16")
    assert prequantized.config.quantization_bit == bits
    _, on_the_fly = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=bits)
    ours, theirs = on_the_fly.state_dict(), prequantized.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(logits_of(on_the_fly, tokenizer), logits_of(prequantized, tokenizer))
    with pytest.raises(QuantizationError, match=f"already INT{bits}"):
        load_model(published, device="cpu", quantize=12 - bits)


@pytest.mark.parametrize("weight_format", ["safetensors", "bin"])
def test_saved_quantized_checkpoint_reloads_identically(tiny_checkpoint, tmp_path, weight_format):
    tokenizer, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=4)
    out = save_quantized(model, tokenizer, tmp_path / "saved", weight_format=weight_format,
                         max_shard_bytes=16 * 1024)  # several shards even for the tiny model
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_bit"] == 4 and config["torch_dtype"] == "float16"
    assert (out / "ice_text.model").read_bytes() == (tiny_checkpoint / "ice_text.model").read_bytes()
    shards = weight_files(out, weight_format)
    assert len(shards) > 2
    stored = dict(item for path in shards for item in read_shard(path))
    name = "transformer.layers.0.mlp.dense_h_to_4h"
    assert stored[f"{name}.weight"].dtype == torch.int8
    assert stored[f"{name}.weight"].shape == (config["inner_hidden_size"], config["hidden_size"] // 2)
    assert stored[f"{name}.weight_scale"].dtype == torch.float16
    assert stored[f"{name}.bias"].dtype == torch.float16
    assert ("lm_head.weight" in stored) == (weight_format == "bin")

    reloaded_tokenizer, reloaded = load_model(out, device="cpu", dtype="bfloat16")
    assert reloaded_tokenizer.encode("你好") == tokenizer.encode("你好")
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours) and ours.keys() == theirs.keys()
    assert torch.equal(logits_of(model, tokenizer), logits_of(reloaded, tokenizer))


def test_save_refuses_a_float_model(float_model, tmp_path):
    tokenizer, model = float_model
    with pytest.raises(QuantizationError, match="not quantized"):
        save_quantized(model, tokenizer, tmp_path / "out")


def test_load_errors_say_what_to_do(tiny_checkpoint, tmp_path):
    with pytest.raises(QuantizationError, match="quantize=3 is not supported"):
        load_model(tiny_checkpoint, device="cpu", quantize=3)
    with pytest.raises(QuantizationError, match="'cpu-int8pack' is INT8 only"):
        load_model(tiny_checkpoint, device="cpu", quantize=4, quant_backend="cpu-int8pack")
    config = GLMConfig.from_file(tiny_checkpoint / "config.json")
    with pytest.raises(CheckpointError, match="quantization_embeddings.*not supported"):
        resolve_quantization(GLMConfig(**{**config.__dict__, "quantization_bit": 4,
                                          "quantization_embeddings": True}), None)
    # A pre-quantized checkpoint that lacks a scale is named.
    published = write_published_checkpoint(tiny_checkpoint, tmp_path / "broken", 8)
    state = torch.load(published / "pytorch_model.bin", weights_only=True)
    del state["transformer.layers.1.attention.dense.weight_scale"]
    torch.save(state, published / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="layers.1.attention.dense.weight_scale"):
        load_model(published, device="cpu")
    # ... and so is a weight of the wrong packed shape.
    state["transformer.layers.1.attention.dense.weight_scale"] = torch.ones(config.hidden_size).half()
    state["transformer.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(3, 3, dtype=torch.int8)
    torch.save(state, published / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.dense_4h_to_h.weight.*int8 \(3, 3\)"):
        load_model(published, device="cpu")


def test_moving_a_quantized_model_to_another_dtype_reprepares_its_kernels(tiny_checkpoint):
    tokenizer, model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize=8)
    before = model.state_dict()
    layer = quantized_linears(model)["transformer.layers.0.attention.dense"]
    assert layer.kernel.name == choose_kernel("cpu", 8, torch.bfloat16).name != "dequant"
    model.float()
    assert layer.kernel.name == "dequant" and layer.bias.dtype == torch.float32
    after = model.state_dict()
    for name in before:
        if name.endswith(("weight_scale", ".weight")) and before[name].dtype in (torch.int8, torch.float16):
            assert torch.equal(before[name], after[name]), name


def test_quantized_linear_round_trips_through_load_state_dict():
    generator = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(128, 64).to(torch.bfloat16)
    layer = QuantizedLinear.from_linear(linear, 4)
    copy = QuantizedLinear(128, 64, 4, dtype=torch.bfloat16)
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128, generator=generator).to(torch.bfloat16)
    assert torch.equal(copy(x), layer(x))
    with pytest.raises(RuntimeError, match="weight_scale"):
        QuantizedLinear(128, 64, 4, dtype=torch.bfloat16).load_state_dict({"bias": torch.zeros(64)})


def test_scratch_buffers_serve_inference_mode_and_plain_no_grad_alike():
    """A buffer first made while decoding (inference mode) is reused by a plain no_grad forward
    of the same thread, and the other way round."""
    from model_runtime.quant.memory import release_scratch, scratch_buffer

    release_scratch()
    with torch.inference_mode():
        scratch_buffer(64, torch.float32, torch.device("cpu")).fill_(1.0)
    with torch.no_grad():
        scratch_buffer(64, torch.float32, torch.device("cpu")).fill_(2.0)
    with torch.inference_mode():
        assert scratch_buffer(64, torch.float32, torch.device("cpu")).sum().item() == 128.0
    release_scratch()
