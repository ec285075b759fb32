"""Newcomers are prefilled in groups of similar length: the padded tokens actually run are
bounded, and greedy answers do not change."""
import itertools
import random

import pytest

from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import FORWARD_COST, DecodeBatch, generate, new_sequence, prefill_groups

GREEDY = SamplingParams(max_length=160, temperature=0)


def modelled_cost(lengths, groups):
    return sum(FORWARD_COST + len(group) * max(lengths[i] for i in group) for group in groups)


def test_groups_are_the_cheapest_partition_into_runs_of_sorted_lengths():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([1, 3, 8, 20, 21, 60, 200, 500]) + rng.randrange(5) for _ in range(rng.randrange(1, 8))]
        groups = prefill_groups(lengths)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        ordered = sorted(lengths, reverse=True)
        cheapest = min(
            sum(FORWARD_COST + (end - start) * ordered[start] for start, end in zip((0,) + cuts, cuts + (len(ordered),)))
            for k in range(len(ordered)) for cuts in itertools.combinations(range(1, len(ordered)), k))
        assert modelled_cost(lengths, groups) == cheapest
    assert prefill_groups([200, 20, 19, 5]) == [[0], [1, 2, 3]]
    assert prefill_groups([100, 97, 99]) == [[0, 2, 1]]  # nearly equal: one forward


@pytest.fixture
def long_and_short_prompts(tiny_model):
    tokenizer, _ = tiny_model
    return [tokenizer.encode(text) for text in
            ["你好", "今天天气怎么样？" * 12, "hello", "写一首诗"]]


def test_tokens_run_by_prefill_are_bounded(tiny_model, long_and_short_prompts):
    _, model = tiny_model
    prompts = long_and_short_prompts
    lengths = [len(p) for p in prompts]
    assert max(lengths) > 4 * sorted(lengths)[-2]  # one long prompt among short ones
    run = []
    hook = model.register_forward_pre_hook(lambda module, args: run.append(args[0].shape))
    try:
        seqs = [new_sequence(model, prompt, GREEDY) for prompt in prompts]
        batch = DecodeBatch(model, slots=len(seqs), max_len=GREEDY.max_length)
        for seq in seqs:
            batch.admit(seq)
        batch.prefill(seqs)
    finally:
        hook.remove()
    tokens_run = sum(rows * length for rows, length in run)
    assert len(run) == 2  # the long prompt alone, the short ones padded together
    assert tokens_run == max(lengths) + 3 * sorted(lengths)[-2]
    assert tokens_run < 0.5 * len(prompts) * max(lengths)  # what padding all to the longest ran
    assert all(len(seq.tokens) == len(seq.prompt) + 1 for seq in seqs)


@pytest.mark.parametrize("family", ["chatglm", "glm4"])
def test_grouped_prefill_leaves_greedy_answers_unchanged(tiny_model, tiny_glm4, family):
    tokenizer, model = tiny_model if family == "chatglm" else tiny_glm4
    prompts = [tokenizer.encode(text) for text in ["你好", "今天天气怎么样？" * 12, "hello", "写一首诗", "今天天气怎么样？" * 11]]
    assert len(prefill_groups([len(p) for p in prompts])) > 1
    together = generate(model, prompts, GREEDY, vocab_size=tokenizer.vocab_size)
    alone = [generate(model, [prompt], GREEDY, vocab_size=tokenizer.vocab_size)[0] for prompt in prompts]
    assert together == alone and all(together)
