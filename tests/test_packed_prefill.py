"""Newcomers' prompts are read in one packed forward with no padding (DecodeBatch._packed), and
a prompt reads the same numbers whatever is read beside it: each attends to exactly its own
slot, so a float32 answer is bit for bit the one it gets alone."""
import pytest
import torch

from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, generate, new_sequence

GREEDY = SamplingParams(max_length=160, temperature=0)
QUERIES = ["你好", "今天天气怎么样？" * 12, "hello", "写一首诗", "今天天气怎么样？" * 11]


def first_logits(model, tokenizer, prompts):
    """The first answer token's logits of each prompt, all read by one prefill call."""
    seqs = [new_sequence(model, prompt, GREEDY) for prompt in prompts]
    batch = DecodeBatch(model, slots=len(seqs), max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
    seen = []
    original = batch._sample
    batch._sample = lambda read, hidden: (seen.append((read, model.logits(hidden))), original(read, hidden))
    for seq in seqs:
        batch.admit(seq)
    assert batch.prefill(seqs) == seqs
    (read, logits), = seen
    return [logits[read.index(seq)] for seq in seqs]


def test_prompts_of_any_lengths_are_read_in_one_forward_without_padding(tiny_model):
    tokenizer, model = tiny_model
    prompts = [tokenizer.encode(text) for text in QUERIES]
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        first_logits(model, tokenizer, prompts)
    finally:
        hook.remove()
    assert shapes == [(1, sum(len(p) for p in prompts))]


@pytest.mark.parametrize("family", ["chatglm", "glm4"])
def test_a_prompt_reads_the_same_whatever_is_read_beside_it(tiny_model, tiny_glm4, family):
    tokenizer, model = tiny_model if family == "chatglm" else tiny_glm4
    prompts = [tokenizer.encode(text) for text in QUERIES]
    together = first_logits(model, tokenizer, prompts)
    for prompt, logits in zip(prompts, together):
        assert torch.equal(logits, first_logits(model, tokenizer, [prompt])[0])
    answers = generate(model, prompts, GREEDY, vocab_size=tokenizer.vocab_size)
    assert answers == [generate(model, [p], GREEDY, vocab_size=tokenizer.vocab_size)[0] for p in prompts]
    assert all(answers)
