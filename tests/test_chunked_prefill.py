"""Chunked prefill (DecodeBatch.prefill with a budget, the engine's prefill_chunk): a prompt read
over several steps gives the same logits, keys, values and greedy tokens as one read whole, in
every family (ChatGLM-6B's bidirectional prompt goes layer by layer, the causal ones by tokens),
running answers keep getting tokens meanwhile, a request cancelled mid-prefill frees its slot, and
the default budget is paced by the step times measured (pacing.PrefillPace)."""
import time

import pytest
import torch

from model_runtime.chat.formats import chat_format_for
from model_runtime import native
from model_runtime.loading.loader import load_model
from model_runtime.models import kv_cache
from model_runtime.models.kv_cache import amx_attention
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, chunk_cost, generate, new_sequence
from model_runtime.serving.engine import Engine
from model_runtime.serving.layerwise import MIN_RANGE
from model_runtime.serving.pacing import GAP_STEPS, IDLE_STEP_S, WINDOW, PrefillPace
from model_runtime.tiny.checkpoint import write_tiny_checkpoint
from model_runtime.tokenizers.hf_json import JSONTokenizer
from model_runtime.tiny.glm_hf import TINY_HF

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4")
HF_FAMILIES = tuple(TINY_HF)  # GLM-4-0414, GLM-Z1, glm-4-9b-chat-hf: causal, on glm2's blocks
GREEDY = SamplingParams(max_length=400, max_new_tokens=12, temperature=0)
LONG_QUERY = "请告诉我明天北京的天气怎么样，还有上海和广州的。" * 6 + " Then say it again in English."


@pytest.fixture(scope="module")
def models(tiny_model, tiny_family_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-hf")
    folders = {**tiny_family_checkpoints, **{family: write_tiny_checkpoint(root / family, family=family)
                                             for family in HF_FAMILIES}}
    loaded = {family: load_model(folder, device="cpu", dtype="float32") for family, folder in folders.items()}
    return {"chatglm": tiny_model, **loaded}


def encode(tokenizer, query):
    if isinstance(tokenizer, JSONTokenizer):  # a tokenizer.json checkpoint: its template lays out chats
        return tokenizer.encode_text(query)
    return chat_format_for(tokenizer).encode(tokenizer, query, [])


def read(batch, seq, budget):
    """Prefill seq with `budget` per call until its first token comes: (calls, logits of that token)."""
    seen = []
    original = batch._sample
    batch._sample = lambda seqs, hidden: (seen.append(batch.model.logits(hidden)), original(seqs, hidden))
    calls = 0
    try:
        while seq.prefilling:
            batch.prefill([seq], budget)
            calls += 1
    finally:
        batch._sample = original
    return calls, seen[0][0]


def prompt_cache(batch, seq):
    """Every layer's keys and values of seq's prompt in its slot."""
    n = len(seq.prompt)
    return [torch.cat([layer.k[seq.slot, :, :n], layer.v[seq.slot, :, :n]]) for layer in batch.cache.layers]


@pytest.mark.parametrize("family", FAMILIES + HF_FAMILIES)
@pytest.mark.parametrize("budget", [4, 24, 60])
def test_chunked_prefill_equals_one_forward(models, family, budget):
    tokenizer, model = models[family]
    prompt = encode(tokenizer, LONG_QUERY)
    answers, logits, caches = [], [], []
    for chunk in (None, budget):
        batch = DecodeBatch(model, slots=2, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
        seq = new_sequence(model, prompt, GREEDY)
        batch.admit(seq)
        calls, first = read(batch, seq, chunk)
        assert calls == 1 if chunk is None else calls >= 3  # several chunks
        logits.append(first)
        caches.append(prompt_cache(batch, seq))
        while not seq.finished:
            batch.step([seq])
        answers.append(seq.generated)
        batch.release(seq)
        assert batch.free_slots == [0, 1] and not batch._layerwise
    # float32 rounding: chunks of a token or two take other attention kernels than one forward
    # (ChatGLM-6B's layer-wise read has given identical bits); logits here reach about 10
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    for chunked, whole in zip(caches[1], caches[0]):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    assert answers[1] == answers[0] and len(answers[0]) > 3


@pytest.mark.parametrize("family", ["chatglm", "glm4"])  # ungrouped heads, read layer by layer; grouped, by tokens
def test_bfloat16_prompts_read_by_our_attention_kernel_are_as_accurate_as_by_sdpa(models, tiny_checkpoint,
                                                                                   tiny_family_checkpoints, family,
                                                                                   isa, monkeypatch):
    """A bfloat16 model on x86-64 CPUs reads prompts with our attention kernel (each code path),
    whole and in chunks: its first logits are as close to the float32 model's as SDPA's are."""
    tokenizer, reference = models[family]
    _, model = load_model(tiny_checkpoint if family == "chatglm" else tiny_family_checkpoints[family], device="cpu",
                          dtype="bfloat16")
    prompt = encode(tokenizer, LONG_QUERY)
    monkeypatch.setattr(kv_cache, "AVX2_SEEN_SHARE", 1.0)  # the avx2 path too takes every chunk (a speed rule)
    calls = []
    original = native.prefill_attention
    monkeypatch.setattr(native, "prefill_attention", lambda *args: (calls.append(args[-1]), original(*args))[1])

    def first_logits(model, budget, kernel):
        batch = DecodeBatch(model, slots=1, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
        for layer in batch.cache.layers:
            assert layer.native_prefill == (isa if model is not reference and not amx_attention() else None)
            layer.native_prefill = layer.native_prefill if kernel else None
        seq = new_sequence(model, prompt, GREEDY)
        batch.admit(seq)
        return read(batch, seq, budget)[1].double()

    expected = first_logits(reference, None, kernel=False)
    for budget in (None, 24):
        sdpa = first_logits(model, budget, kernel=False)
        calls.clear()
        ours = first_logits(model, budget, kernel=True)
        assert set(calls) == ({isa} if not amx_attention() else set())
        error = {name: ((got - expected).norm() / expected.norm()).item() for name, got in (("ours", ours), ("sdpa", sdpa))}
        assert error["ours"] <= 1.25 * error["sdpa"] + 2e-3, (budget, error)


def test_a_bidirectional_prompt_is_never_split_into_token_chunks(models):
    """A budget that holds the prompt's tokens but not their work (attention counts too) once
    sent ChatGLM-6B's prompt down in a causal chunk, whose queries saw the unwritten rest of the
    prompt: what the slot's last user left there. Every budget must read it as one forward does."""
    tokenizer, model = models["chatglm"]
    prompt = encode(tokenizer, LONG_QUERY)
    hidden = model.config.hidden_size
    batch = DecodeBatch(model, slots=1, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)

    def first_logits(budget):
        other = new_sequence(model, encode(tokenizer, LONG_QUERY[::-1] + "!"), GREEDY)  # leaves its keys in the slot
        batch.admit(other)
        batch.prefill([other])
        batch.release(other)
        seq = new_sequence(model, prompt, GREEDY)
        batch.admit(seq)
        logits = read(batch, seq, budget)[1]
        batch.release(seq)
        return logits

    whole = first_logits(None)
    n = len(prompt)
    assert chunk_cost(0, n, hidden) > n + 4  # so that the budgets below hold the tokens but not the work
    for budget in (n - 1, n, n + 2, int(chunk_cost(0, n, hidden)) - 1):
        torch.testing.assert_close(first_logits(budget), whole, rtol=1e-5, atol=1e-5)


def test_a_layer_wise_read_runs_no_sliver_of_a_range(models, monkeypatch):
    """Each range of a layer's keys or rows passes over that part's weights once, so a step's
    budget left for under MIN_RANGE rows waits for the next step, and a layer's last rows go with
    the range before them: every range holds at least MIN_RANGE rows (one per step's end did)."""
    tokenizer, model = models["chatglm"]
    layer_type = type(model.transformer.layers[0])
    sizes = []
    for part in ("write_keys", "finish"):
        original = getattr(layer_type, part)
        monkeypatch.setattr(layer_type, part, lambda self, rows, *rest, run=original: (
            sizes.append(rows.shape[1]), run(self, rows, *rest))[1])
    prompt = encode(tokenizer, LONG_QUERY)
    assert len(prompt) > 8 * MIN_RANGE
    batch = DecodeBatch(model, slots=1, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
    seq = new_sequence(model, prompt, GREEDY)
    batch.admit(seq)
    calls, _ = read(batch, seq, 2 * MIN_RANGE + 3)  # steps of a few ranges, ending mid-layer
    layers = model.config.num_layers
    assert calls > layers and len(sizes) >= 2 * layers and min(sizes) >= MIN_RANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_a_p_tuning_prefix_is_seen_by_every_chunk(models, family):
    tokenizer, model = models[family]
    config = model.config
    torch.manual_seed(0)
    model.set_prefix(torch.randn(2 * config.num_layers, config.kv_heads, 5, config.head_dim))
    try:
        prompt = encode(tokenizer, LONG_QUERY)
        logits = []
        for chunk in (None, 24):
            batch = DecodeBatch(model, slots=1, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
            seq = new_sequence(model, prompt, GREEDY)
            batch.admit(seq)
            logits.append(read(batch, seq, chunk)[1])
    finally:
        model.set_prefix(None)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("whole_decode", [False, True])
def test_a_newcomer_read_in_chunks_while_others_decode_changes_no_answer(models, family, whole_decode):
    tokenizer, model = models[family]
    stops = chat_format_for(tokenizer).stop_ids(tokenizer)
    prompts = [encode(tokenizer, q) for q in ("你好", "How is the weather in Shanghai today?", LONG_QUERY)]
    alone = [generate(model, [p], GREEDY, vocab_size=tokenizer.vocab_size, stop_ids=stops)[0] for p in prompts]
    batch = DecodeBatch(model, slots=3, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size,
                        whole_decode=whole_decode)  # fixed-shape decode steps (CUDA graphs) beside a part-read slot
    running = [new_sequence(model, p, GREEDY, stops) for p in prompts[:2]]
    for seq in running:
        batch.admit(seq)
    batch.prefill(running)
    newcomer = new_sequence(model, prompts[2], GREEDY, stops)
    batch.admit(newcomer)
    tokens_meanwhile = 0
    while newcomer.prefilling:
        batch.prefill([newcomer], 8)
        live = [s for s in running if not s.finished]
        if live and newcomer.prefilling:
            batch.step(live)
            tokens_meanwhile += 1
    assert tokens_meanwhile >= 3
    live = [s for s in running + [newcomer] if not s.finished]
    while live:
        batch.step(live)
        live = [s for s in live if not s.finished]
    assert [s.generated for s in running + [newcomer]] == alone


CAUSAL = ("chatglm2", "chatglm3", "glm4") + HF_FAMILIES


def run_newcomers_beside_running_answers(batch, tokenizer, packed, budget=10):
    """Two answers decode while two newcomers are read `budget` tokens' worth a step, until all
    end: each step packed into one forward (`prefill_and_step`) or apart (`prefill`, then `step`).
    Returns (answers, the logits each sequence sampled from, forwards run while both ran)."""
    model = batch.model
    prompts = [encode(tokenizer, q) for q in ("你好", "How is the weather in Shanghai today?", LONG_QUERY, "早上好" * 9)]
    seqs = [new_sequence(model, prompt, GREEDY) for prompt in prompts]
    for seq in seqs:
        batch.admit(seq)
    batch.prefill(seqs[:2])
    seen = {id(seq): [] for seq in seqs}
    original = batch._sample

    def recording(sampled, hidden):
        for seq, row in zip(sampled, batch.model.logits(hidden)):
            seen[id(seq)].append(row)
        original(sampled, hidden)

    forwards = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape))
    batch._sample = recording
    mixed = 0
    try:
        while any(not seq.finished for seq in seqs):
            reading = [seq for seq in seqs if seq.prefilling]
            decoding = [seq for seq in seqs if not seq.prefilling and not seq.finished]
            if reading and decoding:
                before = len(forwards)
                if packed:
                    assert batch.packs(reading, budget)
                    batch.prefill_and_step(reading, decoding, budget)
                else:
                    batch.prefill(reading, budget)
                    batch.step(decoding)
                mixed += len(forwards) - before
            elif reading:
                batch.prefill(reading, budget)
            else:
                batch.step(decoding)
    finally:
        batch._sample = original
        hook.remove()
    return [seq.generated for seq in seqs], [seen[id(seq)] for seq in seqs], mixed


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("prefix", [False, True], ids=["", "p-tuning"])
def test_prompts_packed_with_decode_rows_read_and_answer_as_apart(models, family, prefix):
    """prefill_and_step: prompt chunks and the running answers' new tokens in ONE forward per
    step give the same greedy answers and, at every token, the same logits as a prompt step and
    a decode step apart, for every causal family, with a P-tuning prefix too (the decode rows
    then attend one by one, like chunks of a token)."""
    tokenizer, model = models[family]
    if prefix:
        torch.manual_seed(0)
        config = model.config
        model.set_prefix(torch.randn(2 * config.num_layers, config.kv_heads, 5, config.head_dim))
    try:
        runs = [run_newcomers_beside_running_answers(
            DecodeBatch(model, slots=4, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size), tokenizer,
            packed) for packed in (False, True)]
    finally:
        model.set_prefix(None)
    (apart, apart_logits, apart_forwards), (packed, packed_logits, packed_forwards) = runs
    assert packed == apart and all(len(answer) > 3 for answer in apart)
    for rows_apart, rows_packed in zip(apart_logits, packed_logits):
        torch.testing.assert_close(torch.stack(rows_packed), torch.stack(rows_apart), rtol=1e-4, atol=1e-4)
    assert packed_forwards >= 5 and apart_forwards == 2 * packed_forwards  # one forward a step, not two


def test_chatglm_6b_prompts_read_whole_are_packed_with_decode_rows_and_answer_as_apart(models):
    """A bidirectional prompt that fits the step's budget whole shares the running answers'
    forward too (its chunk's mask holds its prefix): same answers and logits as apart."""
    tokenizer, model = models["chatglm"]
    runs = [run_newcomers_beside_running_answers(
        DecodeBatch(model, slots=4, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size), tokenizer,
        packed, budget=None) for packed in (False, True)]
    (apart, apart_logits, apart_forwards), (packed, packed_logits, packed_forwards) = runs
    assert packed == apart and all(len(answer) > 3 for answer in apart)
    for rows_apart, rows_packed in zip(apart_logits, packed_logits):
        torch.testing.assert_close(torch.stack(rows_packed), torch.stack(rows_apart), rtol=1e-4, atol=1e-4)
    assert packed_forwards >= 1 and apart_forwards == 2 * packed_forwards


def test_the_fixed_shape_decode_step_and_split_bidirectional_prompts_are_never_packed(models):
    tokenizer, model = models["glm4"]
    assert DecodeBatch(model, slots=2, max_len=64).packs([], 10)
    assert not DecodeBatch(model, slots=2, max_len=64, whole_decode=True).packs([], 10)
    tokenizer, model = models["chatglm"]
    batch = DecodeBatch(model, slots=2, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
    seq = new_sequence(model, encode(tokenizer, LONG_QUERY), GREEDY)
    batch.admit(seq)
    whole = chunk_cost(0, len(seq.prompt), model.config.hidden_size)
    assert batch.packs([seq], None) and batch.packs([seq], int(whole) + 1)
    assert not batch.packs([seq], len(seq.prompt))  # its tokens fit, their attention does not
    batch.prefill([seq], 10)  # begun layer by layer: it finishes that way
    assert seq in batch._layerwise and not batch.packs([seq], None)


def test_a_budget_shared_by_several_prompts_reads_them_in_order(models):
    tokenizer, model = models["glm4"]
    batch = DecodeBatch(model, slots=3, max_len=GREEDY.max_length, vocab_size=tokenizer.vocab_size)
    seqs = [new_sequence(model, encode(tokenizer, q), GREEDY) for q in ("你好", LONG_QUERY, "早上好")]
    for seq in seqs:
        batch.admit(seq)
    hidden = model.config.hidden_size
    first = batch.prefill(seqs, chunk_cost(0, len(seqs[0].prompt), hidden) + chunk_cost(0, 5, hidden))
    assert first == [seqs[0]] and seqs[1].kv_len == 5 and seqs[2].kv_len == 0  # the oldest prompt first
    assert batch.prefill(seqs[1:], None) == seqs[1:]


def request(query, max_new_tokens=40):
    return ChatRequest(messages=(Message("user", query),),
                       sampling=SamplingParams(max_length=400, max_new_tokens=max_new_tokens, temperature=0))


@pytest.mark.parametrize("family", ["chatglm", "glm4"])
def test_engine_streams_keep_going_while_a_long_prompt_is_read(models, family):
    tokenizer, model = models[family]
    texts, tokens_meanwhile = {}, {}
    for chunk in (0, 4):
        engine = Engine(tokenizer, model, slots=2, prefill_chunk=chunk, step_delay=0.02)
        try:
            running = iter(engine.submit(request("你好", max_new_tokens=200)))
            while next(running).kind != "delta":
                pass
            before = engine.stats()["tokens_generated_total"]
            newcomer = iter(engine.submit(request(LONG_QUERY)))
            while next(newcomer).kind != "delta":
                pass
            tokens_meanwhile[chunk] = engine.stats()["tokens_generated_total"] - before
            texts[chunk] = (list(newcomer)[-1].text, list(running)[-1].text)
        finally:
            engine.close()
    assert texts[4] == texts[0]
    # Read whole, the prompt takes one step; in chunks of 4 tokens' work, 40 or more, each
    # giving the running answer a token (a slow test machine adds a few steps to both).
    assert tokens_meanwhile[4] >= tokens_meanwhile[0] + 20


def test_the_engine_packs_a_newcomers_prompt_with_the_running_answers(models):
    """While a causal model's newcomer is read, every forward the engine runs is one packed row
    (a prompt chunk and the running answer's token), never a prompt step and a decode step."""
    tokenizer, model = models["glm4"]
    forwards = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(tuple(args[0].shape)))
    engine = Engine(tokenizer, model, slots=2, prefill_chunk=4, step_delay=0.02)
    try:
        running = iter(engine.submit(request("你好", max_new_tokens=200)))
        while next(running).kind != "delta":
            pass
        first = len(forwards)
        newcomer = list(engine.submit(request(LONG_QUERY, max_new_tokens=3)))
    finally:
        engine.close()
        hook.remove()
    during = forwards[first:]
    reading = [i for i, (_, length) in enumerate(during) if length > 1]
    assert len(reading) >= 10 and all(during[i][0] == 1 for i in reading)  # one packed row each
    # the whole prompt, read beside the running answer's tokens: one each step
    assert sum(during[i][1] - 1 for i in reading) == newcomer[-1].prompt_tokens
    assert all(length > 1 for _, length in during[reading[0]:reading[-1] + 1])  # no decode step of its own


@pytest.mark.parametrize("family", ["chatglm", "glm4"])
def test_cancel_mid_prefill_frees_the_slot(models, family):
    tokenizer, model = models[family]
    engine = Engine(tokenizer, model, slots=1, prefill_chunk=1, step_delay=0.02)
    try:
        long_one = engine.submit(request(LONG_QUERY))
        deadline = time.monotonic() + 10
        while engine.stats()["active_sequences"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # a few steps into the prompt
        job = engine._jobs[long_one.request_id]
        assert job.seq.prefilling and engine.batch.free_slots == []
        long_one.cancel()
        events = list(long_one)
        assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens == 0
        assert not any(e.kind == "delta" for e in events)
        assert engine.batch.free_slots == [0] and not engine.batch._layerwise
        assert list(engine.submit(request("早上好", max_new_tokens=5)))[-1].finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_the_default_budget_is_paced_by_measured_step_times():
    pace = PrefillPace(32)
    assert pace.budget(decoding=True) == pace.budget(decoding=False) == 32  # nothing measured yet
    pace.read(0.064, 32, used_up=True)  # 2 ms a token's worth
    assert pace.budget(decoding=False) == int(IDLE_STEP_S / 0.002)  # nobody waits: about a second a step
    assert pace.budget(decoding=True) == 32  # no decode step measured yet
    pace.decoded(0.020)
    # Running answers wait GAP_STEPS gaps: the step itself when packed with their decode rows,
    # the step then their decode step when apart.
    assert pace.budget(decoding=True, packed=True) == int(GAP_STEPS * 0.020 / 0.002)
    assert pace.budget(decoding=True) == int((GAP_STEPS - 1) * 0.020 / 0.002)
    pace.read(5.0, 32, used_up=False)  # the prompt ended early: says nothing of the rate
    assert pace.budget(decoding=True) == int((GAP_STEPS - 1) * 0.020 / 0.002)
    for _ in range(20):
        pace.decoded(0.0001)  # decode steps far faster than a token's reading: never under the floor
    assert pace.budget(decoding=True) == 32
    fixed, whole = PrefillPace(32, paced=False), PrefillPace(0)
    for measured in (fixed, whole):
        measured.read(0.064, 32, used_up=True)
        measured.decoded(0.020)
    assert fixed.budget(decoding=False) == fixed.budget(decoding=True) == 32
    assert whole.budget(decoding=False) is None


def test_one_slow_step_moves_no_budget_and_a_new_rate_takes_over_within_a_few_steps():
    pace = PrefillPace(32)
    for _ in range(WINDOW):
        pace.read(0.064, 32, used_up=True)  # 2 ms a token's worth
        pace.decoded(0.040)
    steady = pace.budget(decoding=True)
    pace.decoded(0.400)  # one decode step ten times as slow (a collection, a busy neighbour)
    pace.read(0.640, 32, used_up=True)  # and one prompt step
    assert pace.budget(decoding=True) == steady == int((GAP_STEPS - 1) * 0.040 / 0.002)
    for _ in range(WINDOW // 2 + 1):  # the machine got twice as slow at reading, for good
        pace.read(0.128, 32, used_up=True)
    assert pace.budget(decoding=True) == int((GAP_STEPS - 1) * 0.040 / 0.004)


def test_an_engine_paces_its_default_budget_and_keeps_a_chosen_one(models):
    tokenizer, model = models["glm4"]
    for chunk in (None, 4):
        engine = Engine(tokenizer, model, slots=2, prefill_chunk=chunk)
        try:
            answer = list(engine.submit(request(LONG_QUERY, max_new_tokens=3)))
            assert answer[-1].finish_reason in ("stop", "length")
            budget = engine.pace.budget(decoding=False)
        finally:
            engine.close()
        if chunk is None:  # measured its reading: a tiny model reads far more than the floor in a second
            assert engine.pace.token_s is not None and budget > engine.prefill_chunk
        else:
            assert budget == 4
