"""Decode attention reads each row's slot in place: the same numbers as gathering the rows'
caches under the visibility mask, for rows of different lengths beside slots full of other data;
our CPU kernels (decode rows, prompt chunks) on each code path as accurate as SDPA; and a CPU
cache costs the memory of what its slots hold."""
import pytest
import torch
import torch.nn.functional as F

from model_runtime import native
from model_runtime.models import kv_cache
from model_runtime.models.kv_cache import KVCache, attention_mask


# (slot, length after this token), in batch order: fewer than MANY_ROWS rows (SDPA for ungrouped
# heads), and more (the float32 kernel for all, on CPUs without AMX).
FEW_ROWS = [(2, 7), (0, 30), (3, 1)]
MANY = FEW_ROWS + [(5, 12), (4, 2)]
IN_ORDER = [(1, 9), (2, 9), (3, 4)]  # the span's slots in order: no scatter, a mask for the short row
ONE_ROW = [(4, 11)]  # no mask at all


# this-cpu: grouped heads' rows (all at most 30 keys) in one batched product on CPUs without AMX;
# row-by-row: the same with SHORT_ROWS below them; one-call: GPUs' (and AMX CPUs') single SDPA call
@pytest.mark.parametrize("path", ["this-cpu", "row-by-row", "one-call"])
@pytest.mark.parametrize("rows", [FEW_ROWS, MANY, IN_ORDER, ONE_ROW], ids=["few-rows", "many-rows", "in-order", "one"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])  # ChatGLM-6B; grouped heads (ChatGLM2/3, GLM-4)
def test_in_place_decode_equals_the_masked_gather(monkeypatch, heads, kv_heads, rows, path):
    assert len(FEW_ROWS) < kv_cache.MANY_ROWS <= len(MANY)
    monkeypatch.setattr(kv_cache, "LONG_ROW", 8)  # rows of 12 and 30 keys count as long
    if path == "row-by-row":
        monkeypatch.setattr(kv_cache, "SHORT_ROWS", 8)
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(layers=1, slots=6, heads=kv_heads, max_len=32, head_dim=16, dtype=torch.float32, device="cpu",
                    query_heads=heads)
    assert (cache.layers[0].scratch is not None) == (not kv_cache.amx_attention())
    layer = cache.layers[0]
    if path == "one-call":
        layer.scratch = None  # what a GPU's cache has
    layer.k.normal_(generator=generator)  # every slot full of other data beyond each row's length
    layer.v.normal_(generator=generator)
    slots = torch.tensor([slot for slot, _ in rows])
    positions = torch.tensor([[length - 1] for _, length in rows])
    n = len(rows)
    q = torch.randn(n, 1, heads, 16, generator=generator)
    k, v = torch.randn(n, 1, kv_heads, 16, generator=generator), torch.randn(n, 1, kv_heads, 16, generator=generator)
    mask = attention_mask(torch.tensor([2] + [0] * (n - 1)), positions, int(positions.max()) + 1)

    cache.set_decode_rows(None)
    gathered = layer.attend(q, k, v, slots, positions, mask)
    cache.set_decode_rows(rows)
    in_place = layer.attend(q, k, v, slots, positions, mask)
    torch.testing.assert_close(in_place, gathered, rtol=1e-5, atol=1e-6)
    for row, (slot, length) in enumerate(rows):  # and the new keys landed where they belong
        assert torch.equal(layer.k[slot, :, length - 1], k[row, 0])


@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])
def test_single_query_attention_in_chunks_is_as_accurate_as_sdpa(monkeypatch, heads, kv_heads):
    """bfloat16 cache, peaky scores: float32 scores in chunks of 16 keys (7 chunks, the last one
    partial) against float64, no worse than SDPA's flash kernel (bfloat16 scores would be ~5x)."""
    monkeypatch.setattr(kv_cache, "SCORE_CHUNK_ELEMENTS", 16 * kv_heads * 32)
    assert kv_cache.score_chunk(kv_heads, 32, 100) == 16
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(1, kv_heads, 128, 32, generator=generator).to(torch.bfloat16)[:, :, :100]  # a slot's view
    v = torch.randn(1, kv_heads, 128, 32, generator=generator).to(torch.bfloat16)[:, :, :100]
    q = (3 * torch.randn(1, 1, heads, 32, generator=generator)).to(torch.bfloat16)
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(q.double().transpose(1, 2), k.double().repeat_interleave(group, 1),
                                              v.double().repeat_interleave(group, 1)).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=group > 1).transpose(1, 2)
    ours = kv_cache.single_query_attention(q, k, v, torch.empty(16 * kv_heads * 32))

    def error(got):
        return ((got.double() - expected).norm() / expected.norm()).item()

    assert ours.dtype == torch.bfloat16 and error(ours) <= 1.1 * error(sdpa) and error(ours) < 4e-3


@pytest.mark.parametrize("head_dim", [16, 128])  # the tiny models' and the GLM family's
def test_our_decode_kernel_reads_each_slot_in_place_as_accurately_as_sdpa(head_dim, isa):
    """ChatGLM-6B's decode path on x86-64 CPUs (native/decode_attention.cpp), each code path: a
    bfloat16 cache, rows of different lengths (1 to 300 keys) in slots full of other data, peaky
    scores; against float64 attention over each row's own keys, no worse than SDPA's flash kernel."""
    cache = KVCache(layers=1, slots=6, heads=8, max_len=320, head_dim=head_dim, dtype=torch.bfloat16, device="cpu")
    layer = cache.layers[0]
    assert layer.native_decode == isa  # on this CPU, where the build must work
    assert not KVCache(1, 6, 2, 320, head_dim, torch.bfloat16, "cpu", query_heads=8).layers[0].native_decode
    assert not KVCache(1, 6, 8, 320, head_dim, torch.float32, "cpu").layers[0].native_decode
    generator = torch.Generator().manual_seed(0)
    layer.k.normal_(generator=generator)
    layer.v.normal_(generator=generator)
    rows = [(2, 7), (0, 300), (3, 1), (5, 64)]
    n = len(rows)
    slots = torch.tensor([slot for slot, _ in rows])
    positions = torch.tensor([[length - 1] for _, length in rows])
    q = (3 * torch.randn(n, 1, 8, head_dim, generator=generator)).to(torch.bfloat16)
    k, v = (torch.randn(n, 1, 8, head_dim, generator=generator).to(torch.bfloat16) for _ in range(2))
    cache.set_decode_rows(rows)
    ours = layer.attend(q, k, v, slots, positions, attention_mask(torch.zeros(n), positions, 300))
    assert ours.shape == q.shape and ours.dtype == torch.bfloat16
    for row, (slot, length) in enumerate(rows):
        keys, values = layer.k[slot:slot + 1, :, :length], layer.v[slot:slot + 1, :, :length]
        assert torch.equal(keys[0, :, -1], k[row, 0])  # the new key landed before attention read it
        query = q[row:row + 1].transpose(1, 2)
        expected = F.scaled_dot_product_attention(query.double(), keys.double(), values.double()).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention(query, keys, values).transpose(1, 2)

        def error(got):
            return ((got.double() - expected).norm() / expected.norm()).item()

        assert error(ours[row:row + 1]) <= 1.1 * error(sdpa) + 1e-7 and error(ours[row:row + 1]) < 4e-3, (row, length)


# (slot, end, length, prefix_len, columns): a whole causal prompt; a later chunk of one; a
# ChatGLM-6B prompt read whole (its prefix seen by all); a range of one read a layer at a time
# (rows in the middle, every column of the prompt seen); a chunk of one row. Lengths and ends
# are no multiples of a block of 8 rows or 16 keys.
PROMPT_CHUNKS = [(1, 77, 77, 0, 0), (3, 150, 37, 0, 0), (0, 61, 61, 60, 0), (2, 60, 21, 119, 120), (4, 5, 1, 0, 0)]


@pytest.mark.parametrize("head_dim", [16, 64, 128])  # the tiny models'; GLM-4's mid-size and GLM's
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])
def test_our_prompt_kernel_attends_each_chunk_in_place_as_accurately_as_sdpa(heads, kv_heads, head_dim, isa):
    """Prompt attention on x86-64 CPUs (native/prefill_attention.cpp), each code path: a bfloat16
    cache whose slots hold other data past each chunk's columns, chunks of every kind a prefill
    makes, peaky scores; against float64 attention under GLM's visibility rule, no worse than SDPA."""
    cache = KVCache(layers=1, slots=5, heads=kv_heads, max_len=160, head_dim=head_dim, dtype=torch.bfloat16,
                    device="cpu", query_heads=heads)
    layer = cache.layers[0]
    assert layer.native_prefill == (None if kv_cache.amx_attention() else isa)  # this CPU: the build must work
    assert not KVCache(1, 5, kv_heads, 160, head_dim, torch.float32, "cpu", query_heads=heads).layers[0].native_prefill
    if layer.native_prefill is None:
        pytest.skip("SDPA runs bfloat16 on this CPU's AMX tiles: our prompt kernel is not used")
    generator = torch.Generator().manual_seed(head_dim)
    layer.k.normal_(generator=generator)
    layer.v.normal_(generator=generator)
    for chunk in map(kv_cache.PromptChunk, *zip(*PROMPT_CHUNKS)):
        q = (3 * torch.randn(chunk.length, heads, head_dim, generator=generator)).to(torch.bfloat16)
        keys = native.prefill_attention_keys(layer.k, chunk.slot, chunk.seen, isa)
        ours = native.prefill_attention(q, keys, layer.v, chunk.slot, chunk.end - chunk.length, chunk.seen,
                                        chunk.prefix_len, isa)
        k, v = (t[chunk.slot, :, :chunk.seen].repeat_interleave(heads // kv_heads, 0) for t in (layer.k, layer.v))
        mask = kv_cache.PackedRows([chunk], [], layer.k).mask(chunk)[0]
        expected = F.scaled_dot_product_attention(q.double().transpose(0, 1), k.double(), v.double(),
                                                  attn_mask=mask).transpose(0, 1)
        sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)

        def error(got):
            return ((got.double() - expected).norm() / expected.norm()).item()

        assert ours.shape == q.shape and ours.dtype == torch.bfloat16
        assert error(ours) <= 1.1 * error(sdpa) + 1e-7 and error(ours) < 4e-3, chunk
        # in float32 it is float32 attention: exact products, float32 sums and softmax
        assert error(native.prefill_attention(q.float(), keys, layer.v, chunk.slot, chunk.end - chunk.length,
                                              chunk.seen, chunk.prefix_len, isa)) < 1e-5, chunk


def test_ranges_of_a_prompt_read_a_layer_at_a_time_lay_its_keys_out_once(monkeypatch):
    """The kernel's layout of a slot's keys is made once for the ranges of rows that read them
    all (packed forwards told `same_keys`), and again for any other packed forward, which may
    follow a write: never stale."""
    cache = KVCache(layers=2, slots=2, heads=2, max_len=64, head_dim=16, dtype=torch.bfloat16, device="cpu")
    first, second = cache.layers
    if first.native_prefill is None:
        pytest.skip("our prompt kernel does not run on this CPU")
    layouts = []
    original = native.prefill_attention_keys
    monkeypatch.setattr(native, "prefill_attention_keys", lambda *args: (layouts.append(args[1:3]), original(*args))[1])
    k = torch.randn(1, 40, 2, 16).to(torch.bfloat16)
    first.write(k, k, torch.tensor([1]), torch.arange(40)[None])
    chunk = kv_cache.PromptChunk(1, 40, 8, 39)
    cache.set_packed([chunk], [])
    a = first.transposed.get(first, 1, 40)
    cache.set_packed([chunk._replace(end=32)], [], same_keys=True)  # the next range of the layer
    assert first.transposed.get(first, 1, 40) is a and layouts == [(1, 40)]
    second.transposed.get(second, 1, 40)  # another layer's keys replace it
    assert first.transposed.get(first, 1, 40) is not a and len(layouts) == 3
    first.write(k[:, :1] + 1, k[:, :1], torch.tensor([1]), torch.tensor([[3]]))  # a new key at position 3
    cache.set_packed([chunk], [])
    fresh = first.transposed.get(first, 1, 40)
    assert len(layouts) == 4 and torch.equal(fresh, original(first.k, 1, 40, first.native_prefill))


def test_the_avx2_path_takes_the_chunks_whose_rows_see_little_of_their_columns(monkeypatch):
    """At 8 float32 lanes our prompt kernel is slower than SDPA per column computed, so the avx2
    path takes only chunks whose rows see at most AVX2_SEEN_SHARE of rows x columns (a causal
    prompt read whole: about half); the avx512 path takes every chunk."""
    layer = KVCache(1, 2, 2, 64, 16, torch.float32, "cpu").layers[0]
    whole_causal, late_chunk, whole_bidirectional = (kv_cache.PromptChunk(0, 60, 60), kv_cache.PromptChunk(0, 60, 10),
                                                     kv_cache.PromptChunk(0, 60, 60, 59))
    assert kv_cache.seen_share(0, 60, 60, 0) == pytest.approx(61 / 120)
    layer.native_prefill = "avx2"
    assert [layer.in_kernel(c) for c in (whole_causal, late_chunk, whole_bidirectional)] == [True, False, False]
    layer.native_prefill = "avx512"
    assert [layer.in_kernel(c) for c in (whole_causal, late_chunk, whole_bidirectional)] == [True, True, True]
    layer.native_prefill = None
    assert not layer.in_kernel(whole_causal)


def test_a_cpu_cache_costs_the_memory_of_what_its_slots_hold():
    """1 GiB of cache (4 layers x 8 slots x 32 heads x 2048 tokens x 128 dims, bfloat16): nothing
    is in memory until tokens are written, reading adds nothing, and dropping a slot's positions
    gives their whole pages (16 tokens of a head) back to the OS and reads zeros there again."""
    cache = KVCache(4, 8, 32, 2048, 128, torch.bfloat16, "cpu")
    assert sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers) == 2**30
    assert cache.resident_bytes == 0
    for layer in cache.layers:
        layer.k[1, :, :100] = 1.0
        layer.v[1, :, :100] = 2.0
    page_rows = 7 * 32 * 2 * 4  # 100 tokens fill 7 pages of each head's row, keys and values, 4 layers
    assert cache.resident_bytes == page_rows * 4096
    assert cache.layers[0].k[2:].float().abs().sum() == 0  # other slots read zeros ...
    assert cache.resident_bytes == page_rows * 4096  # ... without taking memory
    cache.drop_after(1, 50)  # keeps tokens 0-63: the pages holding the first 50
    assert cache.resident_bytes == 4 * 32 * 2 * 4 * 4096
    assert (cache.layers[3].v[1, :, :64] == 2.0).all() and cache.layers[3].v[1, :, 64:].float().abs().sum() == 0
    cache.drop_after(1, 0)
    assert cache.resident_bytes == 0 and cache.layers[0].k.float().abs().sum() == 0
