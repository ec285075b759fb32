"""What attention reads besides the new tokens: the static, pre-allocated KV cache of every layer
(slots of a fixed length, owned by whoever decodes) and which of its columns a query may see.

Visibility follows GLM's rule for one sequence: a query at cache position p sees column j when
j < prefix_len (ChatGLM-6B's bidirectional prompt, up to and including [gMASK]) or j <= p
(causal); the causal models have prefix_len 0, so the rule reduces to a causal mask.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import native
from ..quant.memory import libc
from .prefix import with_prefix


def attention_mask(prefix_lens: torch.Tensor, cache_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean visibility [B, 1, T, kv_len] for queries at cache_positions [B, T]."""
    columns = torch.arange(kv_len, device=cache_positions.device)
    causal = columns <= cache_positions[:, :, None]
    prefix = columns < prefix_lens.to(cache_positions.device)[:, None, None]
    return (causal | prefix)[:, None]


# Where our decode kernel cannot run (no AVX-512, no compiler): ungrouped heads (ChatGLM-6B) on
# CPUs without AMX: SDPA per row is faster in a step of one row
# (full size, INT4, 512 keys: 4.06 against 3.56 tok/s), for short rows (its one call against the
# float32 kernel's ten) and for rows longer than one widened chunk (full size, 2048 keys: 7.8
# against 11.2 ms per layer, benchmarks/attention.py); the float32 kernel for the rows between, in
# steps of a few (mid-size model, 1024 keys: 68 against 50-58 tok/s at 4 rows, 123 against 80-86
# at 16; full size, 512 keys: 0.66 against 1.94 ms per layer).
MANY_ROWS = 4
LONG_ROW = 512
# Grouped heads on CPUs without AMX: when every row of a step is at most this long, all rows attend
# in one batched float32 product instead of one by one (GLM-4 heads, 2 threads, per layer: 8 rows
# of 64 keys 0.25 against 0.72 ms, of 256 keys 0.89 against 1.02; from 384 keys row by row wins).
SHORT_ROWS = 256
SCORE_CHUNK_ELEMENTS = 2**21  # keys (or values) widened to float32 at a time: 8 MiB, reused


def amx_attention() -> bool:
    """True where SDPA's CPU flash kernel runs bfloat16 on AMX tiles (Xeon 4th generation on):
    there it is fast for one query row too (0.3 ms per ChatGLM-6B layer at 512 keys, 2 threads)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def score_chunk(kv_heads: int, head_dim: int, length: int) -> int:
    """Keys per chunk of `single_query_attention` (at most `length`)."""
    return min(length, max(16, SCORE_CHUNK_ELEMENTS // (kv_heads * head_dim)))


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of ONE query row q [1, 1, heads, d] to keys and values [1, kv_heads, L, d] (views
    of a cache slot; no mask: the row sees all L), for decode steps: [1, 1, heads, d].

    The query heads of a key/value group form one matrix (16 rows per group for GLM-4), the keys
    and values are widened to float32 a chunk at a time into `scratch` (reused: no large
    allocation per call), and scores, softmax and the weighted sum run in float32: as accurate
    as SDPA's flash kernel (which also accumulates in float32; bfloat16 matmuls would round the
    scores: 5x the error). Used for grouped heads on CPUs without AMX, where SDPA handles each
    query head alone: per layer at 512 / 2048 keys (benchmarks/attention.py, 2 threads, EPYC),
    0.15 / 0.41 ms against SDPA's 1.75 / 7.2 ms; 8 GLM-4 layers, INT4, decoding at 512 tokens of
    context: 8.96 against 8.02 tok/s. NOT for ChatGLM-6B's 32 key/value heads: alone it measures
    faster (0.64 against 1.98 ms per layer), but inside the full model's decode step it loses
    (3.4-3.7 against 3.9-4.1 tok/s at 512): widening 8 MB of keys per layer costs more there."""
    heads, kv_heads, d, length = q.shape[2], k.shape[1], q.shape[3], k.shape[2]
    chunk = score_chunk(kv_heads, d, length)
    if scratch is None or scratch.numel() < kv_heads * chunk * d:
        scratch = torch.empty(kv_heads * chunk * d, dtype=torch.float32, device=q.device)
    queries = q[0, 0].float().view(kv_heads, heads // kv_heads, d).mul_(d ** -0.5)
    scores = torch.empty(kv_heads, heads // kv_heads, length, dtype=torch.float32, device=q.device)
    for start in range(0, length, chunk):
        keys = k[0, :, start:start + chunk]
        wide = scratch[:keys.numel()].view(keys.shape).copy_(keys)
        torch.bmm(queries, wide.transpose(1, 2), out=scores[:, :, start:start + chunk])
    weights = scores.softmax(-1)
    out = torch.zeros(kv_heads, heads // kv_heads, d, dtype=torch.float32, device=q.device)
    for start in range(0, length, chunk):
        values = v[0, :, start:start + chunk]
        wide = scratch[:values.numel()].view(values.shape).copy_(values)
        out.baddbmm_(weights[:, :, start:start + chunk], wide)
    return out.view(1, 1, heads, d).to(q.dtype)


def native_decode_attention(device, dtype, grouped: bool, head_dim: int) -> Optional[str]:
    """The code path of our kernel (native/decode_attention.cpp: "avx512" or "avx2") that decode
    steps use, or None for torch's: CPU, a bfloat16 cache, ungrouped heads (ChatGLM-6B), a CPU
    with AVX-512 or AVX2 and a build (where that is all that is missing, it says why once). Per
    ChatGLM-6B layer at 512 / 2048 keys, 2 threads, each layer's cache cold: 0.37 / 1.1 ms
    against SDPA's 2.0 / 8.6 ms (benchmarks/attention.py)."""
    if not (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not grouped
            and head_dim in native.ATTENTION_HEAD_DIMS):
        return None
    isa, passed_over = native.first_isa(native.decode_attention_unavailable)
    if isa is None:
        native.log_fallback_once("decode attention", passed_over)
    return isa


def native_prefill_attention(device, dtype, head_dim: int) -> Optional[str]:
    """The code path of our prompt attention kernel (native/prefill_attention.cpp) or None for
    SDPA: CPU, a bfloat16 cache, a head size the path is built for, and no AMX (SDPA's flash
    kernel runs bfloat16 on AMX tiles there). Per mid-size layer (16 heads of 64), a 2048-token
    prompt, 2 Zen 5 threads: causal with 2 key/value heads 32 against SDPA's 103 ms, all columns
    seen (ChatGLM-6B's prompt) 62 against 103 (benchmarks/prefill_attention.py)."""
    if not (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and head_dim <= 256) or amx_attention():
        return None

    def unavailable(isa: str) -> Optional[str]:
        if head_dim % native.PREFILL_HEAD_DIM_MULTIPLE[isa]:
            return f"is not built for head size {head_dim}"
        return native.prefill_attention_unavailable(isa)

    isa, passed_over = native.first_isa(unavailable)
    if isa is None:
        native.log_fallback_once("prompt attention", passed_over)
    return isa


# On the avx2 path our kernel multiplies in float32 at 8 lanes, about 1.3x SDPA's time per column
# it computes (2 threads, forced on a Zen 5, SDPA at its AVX2 capability too), but computes only
# the columns its rows see, where SDPA computes every column it is given: so it takes a chunk whose
# rows see at most this share of rows x columns (a whole causal prompt sees about half).
AVX2_SEEN_SHARE = 0.6


def seen_share(start: int, length: int, columns: int, prefix_len: int) -> float:
    """The share of a prompt chunk's rows x columns that its rows see: row i (at position start + i
    < columns) sees max(prefix, start + i + 1) columns, prefix = min(prefix_len, columns)."""
    prefix = min(prefix_len, columns)
    flat = min(max(prefix - start, 0), length)  # rows that see just the prefix
    seen = flat * prefix + (length - flat) * start + (length * (length + 1) - flat * (flat + 1)) // 2
    return seen / (length * columns)


class TransposedKeys:
    """Keys laid out for our prompt kernel (`native.prefill_attention_keys`), kept for the next
    chunk that reads the same ones: the ranges of rows of a prompt read a layer at a time all read
    its every key (for ChatGLM-6B's 32 heads, laying out 2048 keys took 22 ms, as long as attending
    256 rows to them). One layout per cache, so it holds at most one layer's slot; every packed
    forward but such a range clears it (`KVCache.set_packed`), so it is never stale."""

    def __init__(self):
        self.key: Optional[tuple] = None
        self.keys: Optional[torch.Tensor] = None

    def get(self, layer: "LayerCache", slot: int, columns: int) -> torch.Tensor:
        if self.key != (id(layer), slot, columns):
            self.clear()  # the old layout's memory first
            self.keys = native.prefill_attention_keys(layer.k, slot, columns, layer.native_prefill)
            self.key = (id(layer), slot, columns)
        return self.keys

    def clear(self) -> None:
        self.key, self.keys = None, None


class CommittedOnWrite:
    """CPU memory for a cache's tensors that the OS commits page by page as each page is first
    written: zeros in a private anonymous mapping, transparent huge pages off (a huge page would
    commit 2 MiB, 8192 tokens of a head, at once), so slots cost the memory of what they hold,
    not of their whole context. `drop` gives pages back (they read as zeros again);
    `resident_bytes` says what is held (the mapping sits between two inaccessible pages, so it is
    one region of its own in /proc/self/smaps, never merged with a neighbour)."""

    def __init__(self, nbytes: int):
        page = mmap.PAGESIZE
        self.mapping = mmap.mmap(-1, nbytes + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self.mapping.madvise(mmap.MADV_NOHUGEPAGE)
        self.base = torch.frombuffer(self.mapping, dtype=torch.uint8, count=page).data_ptr()
        for guard in (self.base, self.base + nbytes + page):
            libc().mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), 0)
        self.used = page

    @staticmethod
    def available() -> bool:
        return hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MADV_DONTNEED") and hasattr(libc(), "mprotect")

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next page-aligned `shape` of the mapping (the tensor keeps the mapping alive)."""
        nbytes = math.prod(shape) * dtype.itemsize
        tensor = torch.frombuffer(self.mapping, dtype=torch.uint8, offset=self.used, count=nbytes)
        self.used += whole_pages(nbytes)
        return tensor.view(dtype).view(shape)

    def drop(self, address: int, nbytes: int) -> None:
        """Give back the whole pages inside [address, address + nbytes)."""
        start = -(-(address - self.base) // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (address + nbytes - self.base) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the mapping in memory now (Linux; 0 elsewhere). Pages only read are not."""
        try:
            smaps = Path("/proc/self/smaps").read_text()
        except OSError:
            return 0
        found = re.search(rf"^{self.base + mmap.PAGESIZE:x}-.*?^Anonymous:\s+(\d+) kB", smaps, re.M | re.S)
        return int(found.group(1)) * 1024 if found else 0


def whole_pages(nbytes: int) -> int:
    """nbytes rounded up to whole pages."""
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


class LayerCache:
    """One layer's keys and values of every slot: [slots, kv_heads, max_len, head_dim] each.

    Attention reads it in place where it can. In a decode step (`decode_rows` set by the decode
    batch: each row's slot and length) every row attends to its own slot, so a step reads the
    keys and values its rows hold and copies nothing, whatever the other slots hold: all rows
    in one call of our CPU kernel where `native_decode` (ChatGLM-6B on AVX-512 or AVX2); on CPUs
    without AMX (`scratch`) grouped heads' short rows (SHORT_ROWS) in one batched product (they
    copy their few keys out), else row by row (`single_query_attention` for grouped heads, and for
    ungrouped ones' rows from LONG_ROW keys to one widened chunk in steps of MANY_ROWS rows or
    more; else SDPA); elsewhere (GPUs, AMX) in one SDPA call over the slots the rows span
    (`DecodeRows`), reading the cache in place. A packed forward (`packed` set: prompt chunks and
    decode rows in one row, `PackedRows`) attends per chunk, in place (on CPUs without AMX by our
    kernel where `native_prefill`, see `in_kernel`; else SDPA under the chunk's mask), then its
    decode rows as above; prompts are read that way, a prompt read a layer at a time too (a
    chunk that sees all its prompt's columns). Otherwise (a P-tuning prefix in front of a decode
    step) the rows' first kv_len columns are gathered and attended to under the visibility mask."""

    def __init__(self, shape: tuple[int, ...], dtype, device, scratch: Optional[torch.Tensor] = None,
                 grouped: bool = False, native_decode: Optional[str] = None,
                 memory: Optional[CommittedOnWrite] = None, native_prefill: Optional[str] = None,
                 transposed: Optional[TransposedKeys] = None):
        if memory is not None:
            self.k, self.v = memory.zeros(shape, dtype), memory.zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.memory = memory
        self.native_decode = native_decode  # our decode attention kernel's code path, or None
        self.native_prefill = native_prefill  # our prompt attention kernel's, or None
        self.transposed = transposed or TransposedKeys()  # its keys' layout, shared by a cache's layers
        self.decode_rows: Optional[DecodeRows] = None
        self.packed: Optional[PackedRows] = None  # the next forward is one packed row (PackedRows)
        self.whole = False  # row i of the forward is slot i, for every slot: read the whole cache in place
        self.scratch = scratch  # CPU: float32 chunk buffer of `single_query_attention`, shared by the layers
        self.grouped = grouped  # more query heads than key/value heads

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
               cache_positions: torch.Tensor, mask: torch.Tensor,
               prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Write k, v [B, T, kv_heads, d] at (slot, position), then attend q [B, T, heads, d] to
        the cache (mask [B, 1, T, kv_len] from `attention_mask`): [B, T, heads, d]."""
        self.write(k, v, slots, cache_positions)
        return self.read(q, slots, mask, prefix_kv)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache_positions: torch.Tensor) -> None:
        """Put k, v [B, T, kv_heads, d] at (slot, position) (slots [B], or [B, T] in a packed
        forward). Apart from `read` so that a prompt read a layer at a time can write all its keys
        before any of its queries reads them."""
        rows = slots[:, None] if slots.dim() == 1 else slots  # a packed forward: a slot per token
        self.k[rows, :, cache_positions] = k
        self.v[rows, :, cache_positions] = v

    def drop_after(self, slot: int, keep: int) -> None:
        """Give the memory of `slot`'s positions from `keep` on back to the OS (whole pages; a
        cache reserved whole keeps it): they read as zeros again."""
        if self.memory is None:
            return
        _, heads, max_len, d = self.k.shape
        token, row = d * self.k.element_size(), max_len * d * self.k.element_size()  # row: one head of one slot
        for tensor in (self.k, self.v):
            first = tensor[slot].data_ptr()
            if keep == 0:
                self.memory.drop(first, heads * row)  # the slot's rows of every head lie together: one range
                continue
            for head in range(heads):
                self.memory.drop(first + head * row + keep * token, row - keep * token)

    def read(self, q: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
             prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Attend q [B, T, heads, d] to what the rows' slots hold (see `attend`)."""
        if self.packed is not None:
            return self._attend_packed(q, self.packed, prefix_kv)
        if self.decode_rows is not None and prefix_kv is None:
            return self._attend_decode_rows(q, self.decode_rows)
        if self.whole:  # fixed shapes, no copy, no per-row loop: what a CUDA graph can capture
            keys, values, mask = with_prefix(prefix_kv, self.k[:q.shape[0]], self.v[:q.shape[0]], mask)
            return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                  enable_gqa=keys.shape[1] != q.shape[2]).transpose(1, 2)
        # index_select on the kv_len-column view copies only what attention reads (plain
        # advanced indexing is several times slower on CPU).
        kv_len = mask.shape[-1]
        keys, values = self.k[:, :, :kv_len].index_select(0, slots), self.v[:, :, :kv_len].index_select(0, slots)
        keys, values, mask = with_prefix(prefix_kv, keys, values, mask)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=keys.shape[1] != q.shape[2])
        return out.transpose(1, 2)

    def _attend_decode_rows(self, q: torch.Tensor, rows: "DecodeRows") -> torch.Tensor:
        """One new token per row q [rows, 1, heads, d], each attending to its own slot in place."""
        if self.native_decode:
            return native.decode_attention(q[:, 0], self.k, self.v, *rows.slots_lengths, self.native_decode)[:, None]
        if self.scratch is not None:
            if self.grouped and len(rows.rows) > 1 and rows.longest <= SHORT_ROWS:
                return self._attend_short_rows(q, rows)
            return self._attend_row_by_row(q, rows.rows)
        return self._attend_span(q, rows)

    def _attend_packed(self, q: torch.Tensor, packed: "PackedRows",
                       prefix_kv: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """q [1, T, heads, d] of a packed forward: each prompt chunk attends to its slot's columns
        (read in place; by our CPU kernel where `in_kernel` says so, else SDPA under its mask),
        then the decode rows as in a decode step (with a P-tuning prefix in front, they go one by
        one like chunks of one token)."""
        out, start = [], 0
        for chunk in packed.chunks + (packed.decode_chunks if prefix_kv is not None else []):
            queries = q[:, start:start + chunk.length]
            start += chunk.length
            if prefix_kv is None and self.in_kernel(chunk):
                keys = self.transposed.get(self, chunk.slot, chunk.seen)
                out.append(native.prefill_attention(queries[0], keys, self.v, chunk.slot, chunk.end - chunk.length,
                                                    chunk.seen, chunk.prefix_len, self.native_prefill)[None])
                continue
            keys, values, seen = with_prefix(prefix_kv, self.k[chunk.slot:chunk.slot + 1, :, :chunk.seen],
                                             self.v[chunk.slot:chunk.slot + 1, :, :chunk.seen], packed.mask(chunk))
            out.append(F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=seen,
                                                      enable_gqa=keys.shape[1] != q.shape[2]).transpose(1, 2))
        if prefix_kv is None and packed.decode is not None:
            out.append(self._attend_decode_rows(q[0, start:, None], packed.decode).transpose(0, 1))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def in_kernel(self, chunk: PromptChunk) -> bool:
        """Whether our prompt attention kernel takes this chunk (see AVX2_SEEN_SHARE)."""
        if self.native_prefill != "avx2":
            return self.native_prefill is not None
        return seen_share(chunk.end - chunk.length, chunk.length, chunk.seen, chunk.prefix_len) <= AVX2_SEEN_SHARE

    def _attend_span(self, q: torch.Tensor, rows: "DecodeRows") -> torch.Tensor:
        """One new token per row, all rows in one SDPA call over the cache's slots rows.start to
        rows.stop, read in place up to the longest row; rows.mask hides each slot's columns past
        its row's length (a new token sees every cached column of its slot up to its own: GLM's
        bidirectional prefix lies before it too) and is None where every row sees them all."""
        keys, values = self.k[rows.start:rows.stop, :, :rows.longest], self.v[rows.start:rows.stop, :, :rows.longest]
        queries = q if rows.in_order else q.new_zeros((rows.stop - rows.start, *q.shape[1:])).index_copy_(
            0, rows.span_index, q)
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=rows.mask,
                                             enable_gqa=keys.shape[1] != q.shape[2]).transpose(1, 2)
        return out if rows.in_order else out.index_select(0, rows.span_index)

    def _attend_short_rows(self, q: torch.Tensor, rows: "DecodeRows") -> torch.Tensor:
        """Grouped heads, every row at most SHORT_ROWS long: all rows in one batched product, in
        float32 as `single_query_attention` computes one (the rows' keys and values copied out
        up to the longest row and widened; each row's columns past its length masked)."""
        slots, _ = rows.slots_lengths
        keys = self.k[:, :, :rows.longest].index_select(0, slots).float()
        values = self.v[:, :, :rows.longest].index_select(0, slots).float()
        kv_heads, d = keys.shape[1], keys.shape[3]
        queries = q[:, 0].float().view(len(rows.rows), kv_heads, -1, d).mul_(d ** -0.5)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).masked_fill_(rows.padding[:, None, None], float("-inf"))
        return torch.matmul(scores.softmax(-1), values).view(q.shape).to(q.dtype)

    def _attend_row_by_row(self, q: torch.Tensor, rows: Sequence[tuple[int, int]]) -> torch.Tensor:
        """CPUs without AMX: each row against its own slot (no mask needed), by the kernel that
        measured fastest there for its length (see MANY_ROWS, LONG_ROW)."""
        out = torch.empty_like(q)
        many = len(rows) >= MANY_ROWS
        one_chunk = SCORE_CHUNK_ELEMENTS // (self.k.shape[1] * self.k.shape[3])  # keys widened in one go
        for row, (slot, kv_len) in enumerate(rows):
            keys, values = self.k[slot:slot + 1, :, :kv_len], self.v[slot:slot + 1, :, :kv_len]
            if self.scratch is not None and (self.grouped or (many and LONG_ROW <= kv_len <= one_chunk)):
                out[row] = single_query_attention(q[row:row + 1], keys, values, self.scratch)[0]
            else:
                out[row] = F.scaled_dot_product_attention(q[row:row + 1].transpose(1, 2), keys, values,
                                                          enable_gqa=keys.shape[1] != q.shape[2])[0].transpose(0, 1)
        return out


class DecodeRows:
    """A decode step's rows, (slot, length) each, and what every layer's attention needs of them,
    made once per step from host-side lists (nothing is read back from the device): the slots'
    and lengths' tensors of our CPU kernel; the span of slots the rows cover, where each row sits
    in it, and the additive mask [span, 1, 1, longest] of the one-call attention (`_attend_span`;
    None when the rows are the span's slots in order and all as long as the longest); the columns
    past each row's length (`padding`, for `_attend_short_rows`)."""

    def __init__(self, rows: Sequence[tuple[int, int]], cache: torch.Tensor):
        self.rows = rows
        slots, lengths = [slot for slot, _ in rows], [length for _, length in rows]
        self.slots_lengths = (torch.tensor(slots), torch.tensor(lengths))
        self.start, self.stop, self.longest = min(slots), max(slots) + 1, max(lengths)
        self.in_order = slots == list(range(self.start, self.stop))
        self.span_index = None if self.in_order else torch.tensor(slots, device=cache.device) - self.start
        self.mask = None
        if not (self.in_order and min(lengths) == self.longest):
            seen = [1] * (self.stop - self.start)  # slots of no row: one column, so no row is all -inf
            for slot, length in rows:
                seen[slot - self.start] = length
            hidden = torch.arange(self.longest) >= torch.tensor(seen)[:, None]
            mask = torch.zeros(hidden.shape, dtype=cache.dtype).masked_fill_(hidden, float("-inf"))
            self.mask = mask[:, None, None].to(cache.device)

    @functools.cached_property
    def padding(self) -> torch.Tensor:
        """[rows, longest]: True past each row's length (on the CPU, made at first use: only
        `_attend_short_rows` needs it)."""
        return torch.arange(self.longest) >= self.slots_lengths[1][:, None]


class PromptChunk(NamedTuple):
    """Prompt rows of one slot in a packed forward: the slot's positions end - length .. end - 1,
    seeing its first `columns` columns (0: end; a prompt read a layer at a time sees all of it)
    by GLM's rule (module docstring)."""

    slot: int
    end: int
    length: int
    prefix_len: int = 0
    columns: int = 0

    @property
    def seen(self) -> int:
        """The columns the chunk's rows attend over."""
        return self.columns or self.end


class PackedRows:
    """A packed forward: ONE row of tokens holding chunks of prompts, then one new token per
    decode row, so that a step reads each weight once for all of them (vLLM's mixed batches):
    running answers get their token in the step that reads a newcomer's prompt, and prompts of
    any lengths share a forward with no padding. Each chunk attends to exactly its slot's first
    columns, so no other row's length enters its sums: a prompt's numbers do not depend on what
    was read beside it. Made once per step, not per layer: `chunks` as `PromptChunk`s (a chunk of
    a prompt with a bidirectional prefix holds all of it), and the visibility mask of each, made
    at first use (our CPU kernel needs none); `decode` the decode rows (slot, length: the new token
    at length - 1) as `DecodeRows`, and as chunks of one token (`decode_chunks`, made at first use:
    only attention with a P-tuning prefix in front needs them)."""

    def __init__(self, chunks: Sequence[PromptChunk], decode: Sequence[tuple[int, int]], cache: torch.Tensor):
        self.device = cache.device
        self.chunks = list(chunks)
        self.decode = DecodeRows(decode, cache) if decode else None
        self._decode = decode
        self._masks: dict[PromptChunk, torch.Tensor] = {}

    @functools.cached_property
    def decode_chunks(self) -> list[PromptChunk]:
        return [PromptChunk(slot, length, 1) for slot, length in self._decode]

    def mask(self, chunk: PromptChunk) -> torch.Tensor:
        """The chunk's queries' visibility over its columns [1, 1, length, seen]."""
        if chunk not in self._masks:
            positions = torch.arange(chunk.end - chunk.length, chunk.end)[None]
            self._masks[chunk] = attention_mask(torch.tensor([chunk.prefix_len]), positions, chunk.seen).to(self.device)
        return self._masks[chunk]


class KVCache:
    """The static, pre-allocated KV cache of every layer: `slots` rows of up to `max_len` tokens.
    On the CPU its memory is committed as tokens are written (`CommittedOnWrite`) and given back
    by `drop_after`, so it costs what the slots hold; on a GPU it is reserved whole.

    It belongs to whoever decodes (a `serving.decode_batch.DecodeBatch`), not to the model: the model's
    forward reads and writes the cache it is given, in place, so that the serving engine and a
    `model.chat` on the same weights never touch each other's keys and values."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype, device,
                 query_heads: Optional[int] = None):
        """heads: key/value heads; query_heads: the attention heads (more when they are grouped)."""
        self.slots, self.max_len = slots, max_len
        grouped = query_heads is not None and query_heads > heads
        scratch = torch.empty(score_chunk(heads, head_dim, max_len) * heads * head_dim, dtype=torch.float32) \
            if torch.device(device).type == "cpu" and not amx_attention() else None
        decode_path = native_decode_attention(device, dtype, grouped, head_dim)
        prefill_path = native_prefill_attention(device, dtype, head_dim)
        shape = (slots, heads, max_len, head_dim)
        on_write = torch.device(device).type == "cpu" and CommittedOnWrite.available()
        self.memory = CommittedOnWrite(layers * 2 * whole_pages(math.prod(shape) * dtype.itemsize)) if on_write else None
        self.transposed = TransposedKeys()
        self.layers = [LayerCache(shape, dtype, device, scratch, grouped, decode_path, self.memory, prefill_path,
                                  self.transposed) for _ in range(layers)]

    def set_decode_rows(self, rows: Optional[Sequence[tuple[int, int]]], whole: bool = False) -> None:
        """(slot, length) of each row of the next forward when it decodes one token per row (its
        attention then reads each slot in place); None for any other forward. whole: the next
        forward has one row per slot, row i being slot i (the mask says what each row sees), and
        attends to the whole cache without copying it: fixed shapes for a compiled decode step."""
        decode_rows = None if rows is None else DecodeRows(rows, self.layers[0].k)  # once per step, not per layer
        for layer in self.layers:
            layer.decode_rows = decode_rows
            layer.packed = None
            layer.whole = whole

    def set_packed(self, chunks: Sequence[PromptChunk], decode: Sequence[tuple[int, int]],
                   same_keys: bool = False) -> None:
        """The next forward is one packed row (see PackedRows): prompt chunks, then one token per
        decode row (slot, length). Any other forward resets it with `set_decode_rows`. same_keys:
        no key it reads was written since the last packed forward (a range of a prompt read a
        layer at a time, after the layer's first), so that forward's layout of them still holds."""
        if not same_keys:
            self.transposed.clear()
        packed = PackedRows(chunks, decode, self.layers[0].k)
        for layer in self.layers:
            layer.decode_rows = None
            layer.packed = packed
            layer.whole = False

    def drop_after(self, slot: int, keep: int) -> None:
        """Give the memory of `slot`'s positions from `keep` on back to the OS, in every layer
        (CPU caches, committed on write; elsewhere the whole cache stays reserved)."""
        for layer in self.layers:
            layer.drop_after(slot, keep)

    @property
    def resident_bytes(self) -> int:
        """Bytes of this cache in memory now (CPU caches on Linux; else 0): what slots hold."""
        return self.memory.resident_bytes if self.memory is not None else 0

    def mark_static_addresses(self) -> None:
        """Tell torch.compile that the cache tensors never move, so a CUDA graph may write them."""
        for layer in self.layers:
            torch._dynamo.mark_static_address(layer.k)
            torch._dynamo.mark_static_address(layer.v)

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
