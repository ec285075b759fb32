"""Outside parity: outputs of the original ChatGLM-6B code on a tiny random model."""
import numpy as np
import torch

from model_runtime.models.glm6b import ChatGLMModel, GLMConfig, SequenceLayout
from model_runtime.models.kv_cache import attention_mask

from .conftest import reference_arrays


def read_reference(name, config, tensors):
    """Split the raw little-endian arrays of a reference file into named tensors and outputs."""
    take = reference_arrays(name)

    weights = {key: take(shape, np.float32) for key, shape in tensors}
    steps = [(take((n,), np.int32), take((n, config.hidden_size), np.float32)) for n in (3, 1, 1)]
    assert take.remaining() == 0
    return weights, steps


def test_glm6b_hidden_states_match_original_code():
    config = GLMConfig(vocab_size=5, hidden_size=32, num_layers=1, num_attention_heads=8,
                       inner_hidden_size=128, max_sequence_length=16, bos_token_id=1,
                       eos_token_id=2, mask_token_id=3, gmask_token_id=4)
    h, f, v = 32, 128, 5
    prefix = "transformer.layers.0."
    tensors = [("transformer.word_embeddings.weight", (v, h)),
               (prefix + "input_layernorm.weight", (h,)), (prefix + "input_layernorm.bias", (h,)),
               (prefix + "attention.query_key_value.weight", (3 * h, h)),
               (prefix + "attention.query_key_value.bias", (3 * h,)),
               (prefix + "attention.dense.weight", (h, h)), (prefix + "attention.dense.bias", (h,)),
               (prefix + "post_attention_layernorm.weight", (h,)),
               (prefix + "post_attention_layernorm.bias", (h,)),
               (prefix + "mlp.dense_h_to_4h.weight", (f, h)), (prefix + "mlp.dense_h_to_4h.bias", (f,)),
               (prefix + "mlp.dense_4h_to_h.weight", (h, f)), (prefix + "mlp.dense_4h_to_h.bias", (h,)),
               ("transformer.final_layernorm.weight", (h,)), ("transformer.final_layernorm.bias", (h,))]
    weights, steps = read_reference("glm_model.data", config, tensors)
    model = ChatGLMModel(config).float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) == {"lm_head.weight"} and not unexpected  # tied to the embeddings
    # One layer deep, yet the original code scales residuals by sqrt(2 * 28) (model.RESIDUAL_SCALE):
    # with sqrt(2 * 1) every output would be off by ~1. Nothing is patched here.
    replay_reference_steps(model, steps)


REFERENCE_LAYOUT = SequenceLayout(prefix_len=2, mask_pos=1)  # a two-token bidirectional context, then causal


def replay_reference_steps(model, steps) -> None:
    """Run a ChatGLM-6B reference file's three calls on one KV cache, as the original did (the
    three-token context, then one token, then one more), and compare each call's final hidden
    states with the file's to 1e-5."""
    cache = model.new_kv_cache(slots=1, max_len=8)
    start = 0
    for tokens, expected in steps:
        end = start + len(tokens)
        cache_positions = torch.arange(start, end)[None]
        mask = attention_mask(torch.tensor([REFERENCE_LAYOUT.prefix_len]), cache_positions, end)
        with torch.no_grad():
            hidden = model(tokens.long()[None], REFERENCE_LAYOUT.positions(start, end)[None], cache_positions,
                           mask, torch.tensor([0]), cache)
        torch.testing.assert_close(hidden[0], expected, rtol=1e-5, atol=1e-5)
        start = end
