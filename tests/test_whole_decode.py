"""The fixed-shape decode step (`DecodeBatch(whole_decode=True)`, what CUDA graphs capture):
the same greedy tokens as the per-row step, a forward torch.compile traces whole (no graph
break, no recompilation as sequences come and go), and free slots' cached turns left intact."""
import pytest
import torch
from torch._dynamo.utils import counters

from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, new_sequence

GREEDY = SamplingParams(max_length=44, temperature=0)
TRACE_ONLY = {"backend": "eager", "fullgraph": True, "dynamic": False}  # dynamo's graph capture, no codegen


def prompts_for(tokenizer, family):
    prompts = [[5, 6, 7, 8, 9] * 3, [10, 11, 12] * 7, [13, 14] * 2]
    if family == "chatglm":  # ChatGLM-6B's prompts end with [gMASK] <sop>: a bidirectional prefix
        prompts = [p + [tokenizer.gmask_token_id, tokenizer.bos_token_id] for p in prompts]
    return prompts


def run(tokenizer, model, prompts, batch=None, **batch_options):
    """Greedy answers, the third prompt joining once the first two have run 5 steps."""
    seqs = [new_sequence(model, p, GREEDY) for p in prompts]
    for seq in seqs:
        seq.stop_ids = frozenset()  # random weights: always run to the length limit
    batch = batch or DecodeBatch(model, 4, 48, vocab_size=tokenizer.vocab_size, **batch_options)
    for seq in seqs[:2]:
        batch.admit(seq)
    batch.prefill(seqs[:2])
    for _ in range(5):
        batch.step(seqs[:2])
    batch.admit(seqs[2])
    batch.prefill(seqs[2:])
    live = seqs
    while live:
        batch.step(live)
        live = [s for s in live if not s.finished]
    return [s.generated for s in seqs]


@pytest.fixture(params=["chatglm", "glm4"])
def family_model(request, tiny_model, tiny_glm4):
    return request.param, *(tiny_model if request.param == "chatglm" else tiny_glm4)


def test_whole_decode_gives_the_per_row_answers(family_model):
    family, tokenizer, model = family_model
    prompts = prompts_for(tokenizer, family)
    assert run(tokenizer, model, prompts, whole_decode=True) == run(tokenizer, model, prompts)


def test_the_compiled_step_is_one_graph_for_every_step(family_model):
    family, tokenizer, model = family_model
    prompts = prompts_for(tokenizer, family)
    torch._dynamo.reset()
    counters.clear()
    assert run(tokenizer, model, prompts, compile_options=TRACE_ONLY) == run(tokenizer, model, prompts)
    assert counters["stats"]["unique_graphs"] == 1  # one capture, reused as sequences join and finish
    assert not counters["graph_break"]


def test_free_slots_keep_their_cached_turns(tiny_glm4):
    """Rows of free slots write into the spare slot: a turn cached for reuse survives other
    sequences' steps, and the next turn reusing it answers as a full prefill would."""
    tokenizer, model = tiny_glm4
    first, other = [5, 6, 7, 8, 9] * 4, [10, 11, 12] * 5

    def second_turn(**options):
        batch = DecodeBatch(model, 2, 64, vocab_size=tokenizer.vocab_size, **options)
        turn = new_sequence(model, first, GREEDY, cache_salt="a")
        batch.admit(turn)
        batch.prefill([turn])
        for _ in range(4):
            batch.step([turn])
        batch.release(turn)  # its keys and values stay in the slot for the salt "a"
        busy = new_sequence(model, other, GREEDY, cache_salt="b")
        batch.admit(busy)
        batch.prefill([busy])
        for _ in range(6):
            batch.step([busy])  # the free slot's row runs too, in whole_decode
        follow_up = new_sequence(model, turn.tokens + [13, 14, 15], GREEDY, cache_salt="a")
        batch.admit(follow_up)
        assert follow_up.cached == turn.kv_len  # reused, not re-prefilled
        batch.prefill([follow_up])
        for _ in range(8):
            batch.step([busy, follow_up])
        return follow_up.generated

    assert second_turn(whole_decode=True) == second_turn()


def test_the_compiled_step_gives_the_eager_tokens_and_logits(family_model, monkeypatch):
    """What CUDA runs by default (DecodeBatch(compile_options=...)), here through torch.compile's
    aot_eager backend (the graph torch.compile traces and the code that replays it, on CPU):
    the eager step's greedy tokens, and its logits within float32 rounding."""
    family, tokenizer, model = family_model
    prompts = prompts_for(tokenizer, family)
    plain_logits = model.logits

    def answers_and_logits(**options):
        seen = []
        monkeypatch.setattr(model, "logits", lambda hidden: seen.append(plain_logits(hidden)) or seen[-1])
        return run(tokenizer, model, prompts, **options), seen

    torch._dynamo.reset()
    compiled, compiled_logits = answers_and_logits(compile_options={"backend": "aot_eager", "fullgraph": True,
                                                                    "dynamic": False})
    eager, eager_logits = answers_and_logits()
    assert compiled == eager and all(eager)
    assert len(compiled_logits) == len(eager_logits) > 10
    for got, expected in zip(compiled_logits, eager_logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_compile_is_paid_at_start_up_by_a_probe_that_leaves_nothing_behind(family_model):
    """`warm_up` (what the engine runs at start-up on CUDA) traces the fixed-shape step on a
    throwaway prompt: the answers that follow reuse that one graph (no compile in a user's
    request), find every slot free and nothing cached for reuse, and equal the eager answers."""
    family, tokenizer, model = family_model
    prompts = prompts_for(tokenizer, family)
    torch._dynamo.reset()
    counters.clear()
    batch = DecodeBatch(model, 4, 48, vocab_size=tokenizer.vocab_size, compile_options=TRACE_ONLY)
    assert batch.warm_up(new_sequence(model, prompts[0], GREEDY, cache_salt="probe")) is None
    assert counters["stats"]["unique_graphs"] == 1
    assert batch.free_slots == [0, 1, 2, 3] and not batch.slot_contents
    assert run(tokenizer, model, prompts, batch) == run(tokenizer, model, prompts)
    assert counters["stats"]["unique_graphs"] == 1 and batch.whole_decode


def test_a_step_that_cannot_compile_falls_back_to_the_eager_step(family_model):
    """A compiler that fails at start-up (no toolchain for this GPU, an op it cannot lower) must
    not fail every answer after: the batch decodes eager, per row, and says why."""
    family, tokenizer, model = family_model
    prompts = prompts_for(tokenizer, family)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler for this device")

    torch._dynamo.reset()
    batch = DecodeBatch(model, 4, 48, vocab_size=tokenizer.vocab_size,
                        compile_options={"backend": broken_backend, "fullgraph": True, "dynamic": False})
    reason = batch.warm_up(new_sequence(model, prompts[1], GREEDY))
    assert "no compiler for this device" in reason
    assert not batch.whole_decode and batch.free_slots == [0, 1, 2, 3]
    assert run(tokenizer, model, prompts, batch) == run(tokenizer, model, prompts)
