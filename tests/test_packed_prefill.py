"""Newcomers' prompts are read in one packed forward with no padding (DecodeBatch._packed), and
a prompt reads the same numbers whatever is read beside it: each attends to exactly its own
slot, so a float32 prompt's hidden states are bit for bit the ones it gets alone, and so are its
greedy answers. Every prompt here is over 11 tokens, and the hidden states are compared rather
than the logits: torch's float32 GEMM (MKL) computes a product of 1-3, 5-7 or 9-11 rows through
other kernels than a longer one on some CPUs (measured on an AMD EPYC with AVX2), so there a row
of a short product (a short prompt, the output layer's row per prompt) differs in its last bit
between a product alone and one beside others, whatever the packing."""
import pytest
import torch

from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, generate, new_sequence

GREEDY = SamplingParams(max_length=160, temperature=0)
QUERIES = ["你好，请用三句话介绍一下你自己。", "今天天气怎么样？" * 12, "hello, what can you do for me today?",
           "写一首关于秋天和月亮的诗，要押韵。", "今天天气怎么样？" * 11]


def first_hidden(model, tokenizer, prompts):
    """The hidden state behind each prompt's first answer token, all read by one prefill call
    (compared rather than the logits: the output layer's product has a row per prompt, so its
    row count differs alone and together; see the top)."""
    seqs = [new_sequence(model, prompt, GREEDY) for prompt in prompts]
    batch = DecodeBatch(model, slots=len(seqs), max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
    seen = []
    original = batch._sample
    batch._sample = lambda read, hidden: (seen.append((read, hidden)), original(read, hidden))
    for seq in seqs:
        batch.admit(seq)
    assert batch.prefill(seqs) == seqs
    (read, hidden), = seen
    return [hidden[read.index(seq)] for seq in seqs]


def test_prompts_of_any_lengths_are_read_in_one_forward_without_padding(tiny_model):
    tokenizer, model = tiny_model
    prompts = [tokenizer.encode(text) for text in QUERIES]
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        first_hidden(model, tokenizer, prompts)
    finally:
        hook.remove()
    assert shapes == [(1, sum(len(p) for p in prompts))]


@pytest.mark.parametrize("family", ["chatglm", "glm4"])
def test_a_prompt_reads_the_same_whatever_is_read_beside_it(tiny_model, tiny_glm4, family):
    tokenizer, model = tiny_model if family == "chatglm" else tiny_glm4
    prompts = [tokenizer.encode(text) for text in QUERIES]
    together = first_hidden(model, tokenizer, prompts)
    for prompt, hidden in zip(prompts, together):
        assert torch.equal(hidden, first_hidden(model, tokenizer, [prompt])[0])
    answers = generate(model, prompts, GREEDY, vocab_size=tokenizer.vocab_size)
    assert answers == [generate(model, [p], GREEDY, vocab_size=tokenizer.vocab_size)[0] for p in prompts]
    assert all(answers)
