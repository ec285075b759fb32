"""The network: positions and mask, KV cache against full recomputation, batching."""
import torch

from model_runtime.models.kv_cache import attention_mask
from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, generate, new_sequence
from model_runtime.tokenizers.glm6b import ChatGLMTokenizer

from .conftest import reference_file

GREEDY = SamplingParams(max_length=48, temperature=0)


def test_positions_and_mask_of_the_spec_example():
    tokenizer = ChatGLMTokenizer(reference_file("tokenizers/chatglm-6b-ice_text.model"))
    from model_runtime.models.glm6b import GLMConfig, layout_for_prompt

    config = GLMConfig(vocab_size=130528, hidden_size=8, num_layers=1, num_attention_heads=1,
                       inner_hidden_size=8, max_sequence_length=16, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
                       gmask_token_id=tokenizer.gmask_token_id)
    prompt = tokenizer.encode("你好")
    assert prompt == [5, 74874, 130001, 130004]
    layout = layout_for_prompt(prompt, config)
    assert layout.positions(0, 4).tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]
    # The next two generated tokens: same position, block positions 2 and 3.
    assert layout.positions(4, 6).tolist() == [[2, 2], [2, 3]]
    mask = attention_mask(torch.tensor([layout.prefix_len]), torch.arange(5)[None], 5)[0, 0]
    expected = torch.tensor([[1, 1, 1, 0, 0],   # the prefix sees the whole prefix...
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],   # ...and from <sop> on it is causal
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def full_logits(model, tokens, layout):
    """Logits of the last token, recomputed from scratch without reusing any cache entry."""
    cache = model.new_kv_cache(1, model.config.max_sequence_length)
    n = len(tokens)
    cache_positions = torch.arange(n)[None]
    mask = attention_mask(torch.tensor([layout.prefix_len]), cache_positions, n)
    with torch.no_grad():
        hidden = model(torch.tensor([tokens]), layout.positions(0, n)[None], cache_positions, mask,
                       torch.tensor([0]), cache)
    return model.logits(hidden[0, -1])


def test_every_decode_step_matches_recomputation_without_cache(tiny_model):
    tokenizer, model = tiny_model
    seq = new_sequence(model, tokenizer.encode("今天天气怎么样？"), SamplingParams(max_length=30, temperature=0))
    batch = DecodeBatch(model, slots=2, max_len=64)
    seq_logits = []
    batch.admit(seq)
    original = batch._sample

    def record(seqs, hidden):  # keep the logits each cached step computed
        seq_logits.append(model.logits(hidden[0]))
        original(seqs, hidden)

    batch._sample = record
    batch.prefill([seq])
    for _ in range(6):
        batch.step([seq])
    tokens = seq.tokens
    for step, logits in enumerate(seq_logits):
        upto = len(seq.prompt) + step
        expected = full_logits(model, tokens[:upto], seq.layout)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_batch_of_different_lengths_matches_each_prompt_alone(tiny_model):
    tokenizer, model = tiny_model
    queries = ["你好", "Tell me about the weather in Beijing tomorrow, please.", "def main():\n    pass",
               "早上好"]
    prompts = [tokenizer.encode(q) for q in queries]
    together = generate(model, prompts, GREEDY, vocab_size=tokenizer.vocab_size)
    alone = [generate(model, [p], GREEDY, vocab_size=tokenizer.vocab_size)[0] for p in prompts]
    assert together == alone
    assert all(len(answer) > 5 for answer in alone)


def test_seeded_sampling_repeats_and_seeds_differ(tiny_model):
    tokenizer, model = tiny_model
    prompt = [tokenizer.encode("你好")]

    def sample(seed):
        params = SamplingParams(max_length=40, temperature=1.0, top_p=0.9, seed=seed)
        return generate(model, prompt, params, vocab_size=tokenizer.vocab_size)[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_padded_vocabulary_is_never_sampled(tiny_model):
    tokenizer, model = tiny_model
    assert model.config.vocab_size > tokenizer.vocab_size
    params = SamplingParams(max_length=200, temperature=5.0, top_p=1.0, top_k=0, seed=1)
    answer = generate(model, [tokenizer.encode("你好")], params, vocab_size=tokenizer.vocab_size)[0]
    assert max(answer) < tokenizer.vocab_size
