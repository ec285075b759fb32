"""The batched sampler: the distribution transformers' processors give, per row, whatever the
other rows' settings; exponential-race draws that follow it; seeded rows repeat; overflow is an
error for the step, never a silent pick."""
import collections

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from model_runtime.protocol import SamplingParams
from model_runtime.serving.sampling import (Sampler, SamplingError, filtered_probabilities, penalize_repeats,
                                            sample)


def reference_probabilities(logits, seen, params):
    """What the per-row transformers pipeline of the reference gives."""
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
                                      TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        processors.append(TopPLogitsWarper(params.top_p))
    return processors(torch.tensor([seen]), logits[None].clone()).softmax(-1)[0]


def test_each_row_gets_the_reference_distribution_in_a_mixed_batch():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):
        rows.append(SamplingParams(temperature=float(torch.empty(1).uniform_(0.1, 2, generator=generator)),
                                   top_k=int(torch.randint(0, 60, (1,), generator=generator)),
                                   top_p=float(torch.empty(1).uniform_(0.05, 1, generator=generator)),
                                   repetition_penalty=float(torch.empty(1).uniform_(1, 1.5, generator=generator))))
    logits = torch.randn(len(rows), 3000, generator=generator) * 3
    seen = [torch.randint(0, 3000, (20,), generator=generator).tolist() for _ in rows]
    samplers = [Sampler(params) for params in rows]
    scores = penalize_repeats(logits.clone(), samplers, seen)
    ours = filtered_probabilities(scores, torch.tensor([p.temperature for p in rows]),
                                  torch.tensor([p.top_k for p in rows]), torch.tensor([p.top_p for p in rows]))
    for row, params in enumerate(rows):
        torch.testing.assert_close(ours[row], reference_probabilities(logits[row], seen[row], params),
                                   rtol=0, atol=1e-6)


def test_draws_follow_the_distribution_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [0.5, 3.0, 0.1, 0.2]])
    samplers = [Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=9)), Sampler(SamplingParams(temperature=0))]
    counts = collections.Counter()
    for _ in range(20000):
        drawn, greedy = sample(logits, samplers, [[0], [0]])
        counts[drawn] += 1
        assert greedy == 1
    expected = logits[0].softmax(-1)
    for token in range(4):
        assert abs(counts[token] / 20000 - expected[token].item()) < 0.012


def test_seeded_rows_repeat_and_do_not_depend_on_their_neighbours():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))

    def draws(neighbour_seed):
        samplers = [Sampler(SamplingParams(temperature=0.9, top_p=0.95, seed=42)),
                    Sampler(SamplingParams(temperature=1.2, top_p=0.8, seed=neighbour_seed)),
                    Sampler(SamplingParams(temperature=0))]
        return [sample(logits, samplers, [[1], [1], [1]])[0] for _ in range(30)]

    assert draws(1) == draws(2)  # row 0 is the same whatever row 1's seed


def test_overflowing_probabilities_raise_instead_of_picking_anything():
    logits = torch.full((2, 50), 3e38)  # finite, but temperature < 1 overflows them
    samplers = [Sampler(SamplingParams(temperature=0.5, seed=1)), Sampler(SamplingParams(temperature=0))]
    with pytest.raises(SamplingError):
        sample(logits, samplers, [[1], [1]])
    assert sample(logits[1:], samplers[1:], [[1]]) == [0]  # the greedy row alone is fine
