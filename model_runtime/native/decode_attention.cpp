// Decode-step attention on CPU: one new query row per sequence, each attending to the first
// `length` positions of its own slot of the static KV cache, read in place (no gather, no mask).
// For ungrouped heads (ChatGLM-6B: as many key/value heads as query heads).
//
// Why: SDPA's CPU flash kernel is built for blocks of query rows; with one row it reads ChatGLM-6B's
// 512 cached keys of a layer at about 4 GB/s (2.4 ms per layer on 2 threads), where reading them
// once should take a tenth of that. Here each (row, head) is one task: scores q.k in float32
// (products of bfloat16 values are exact), a softmax (torch's, vectorised), then the weighted sum
// of the values in float32, with each key and value read exactly once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/_softmax.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace {

// 16 bfloat16 values (32 bytes) widened to float32.
__attribute__((target("avx512f"))) inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// scores[t] = q . k[t] * scale for t < length; D16 = head_dim / 16.
template <int D16>
__attribute__((target("avx512f")))
void scores_row(const float* q, const uint16_t* keys, int64_t length, float scale, float* scores) {
  __m512 query[D16];
  for (int j = 0; j < D16; ++j) query[j] = _mm512_loadu_ps(q + 16 * j);
  for (int64_t t = 0; t < length; ++t) {
    const uint16_t* key = keys + t * 16 * D16;
    __m512 acc = _mm512_mul_ps(query[0], load_bf16(key));
    for (int j = 1; j < D16; ++j) acc = _mm512_fmadd_ps(query[j], load_bf16(key + 16 * j), acc);
    scores[t] = _mm512_reduce_add_ps(acc) * scale;
  }
}

// out = sum over t < length of weights[t] * v[t], in float32.
template <int D16>
__attribute__((target("avx512f")))
void weighted_values(const float* weights, const uint16_t* values, int64_t length, float* out) {
  __m512 acc[D16];
  for (int j = 0; j < D16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const __m512 weight = _mm512_set1_ps(weights[t]);
    const uint16_t* value = values + t * 16 * D16;
    for (int j = 0; j < D16; ++j) acc[j] = _mm512_fmadd_ps(weight, load_bf16(value + 16 * j), acc[j]);
  }
  for (int j = 0; j < D16; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

template <int D16>
void attend(const float* q, const uint16_t* k, const uint16_t* v, const int64_t* slots, const int64_t* lengths,
            int64_t rows, int64_t heads, int64_t max_len, at::Tensor& scores, float* out) {
  const int64_t longest = scores.size(1);
  float* sp = scores.data_ptr<float>();
  const int64_t d = 16 * D16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Task (row, head) reads [slot, head, :length, :] of the cache: [slots, heads, max_len, d].
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / heads, head = task % heads;
      const int64_t offset = (slots[row] * heads + head) * max_len * d;
      scores_row<D16>(q + task * d, k + offset, lengths[row], scale, sp + task * longest);
    }
  });
  const at::Tensor weights = at::_softmax(scores, -1, false);
  const float* wp = weights.data_ptr<float>();
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / heads, head = task % heads;
      const int64_t offset = (slots[row] * heads + head) * max_len * d;
      weighted_values<D16>(wp + task * longest, v + offset, lengths[row], out + task * d);
    }
  });
}

// q [rows, heads, d]; k, v cache [slots, heads, max_len, d] bfloat16; slots, lengths int64 [rows].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& slots, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes(), "q [rows, heads, d], k/v [slots, heads, len, d]");
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.is_contiguous() &&
              v.is_contiguous(), "a contiguous bfloat16 cache expected");
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2), max_len = k.size(2);
  TORCH_CHECK(k.size(1) == heads && k.size(3) == d, "ungrouped heads of the same size expected");
  const at::Tensor slots64 = slots.to(at::kLong).contiguous(), lengths64 = lengths.to(at::kLong).contiguous();
  TORCH_CHECK(slots64.numel() == rows && lengths64.numel() == rows, "one slot and length per row");
  const int64_t* slot = slots64.data_ptr<int64_t>();
  const int64_t* length = lengths64.data_ptr<int64_t>();
  int64_t longest = 1;
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(slot[row] >= 0 && slot[row] < k.size(0) && length[row] >= 1 && length[row] <= max_len,
                "slot or length out of range");
    longest = std::max(longest, length[row]);
  }
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  // past each row's length: -inf, so the softmax gives those columns weight 0
  at::Tensor scores = at::full({rows * heads, longest}, -std::numeric_limits<float>::infinity(),
                               q.options().dtype(at::kFloat));
  at::Tensor out = at::empty({rows, heads, d}, q.options().dtype(at::kFloat));
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const float* qp = q32.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (d) {  // the head sizes of the GLM family (128) and of the tiny test models
    case 16: attend<1>(qp, kp, vp, slot, length, rows, heads, max_len, scores, op); break;
    case 32: attend<2>(qp, kp, vp, slot, length, rows, heads, max_len, scores, op); break;
    case 64: attend<4>(qp, kp, vp, slot, length, rows, heads, max_len, scores, op); break;
    case 128: attend<8>(qp, kp, vp, slot, length, rows, heads, max_len, scores, op); break;
    case 256: attend<16>(qp, kp, vp, slot, length, rows, heads, max_len, scores, op); break;
    default: TORCH_CHECK(false, "head_dim ", d, " is not built in (16, 32, 64, 128, 256 are)");
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor lengths) -> Tensor");
  m.def("decode_attention_supported() -> bool", [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx512f"));
  });
}
TORCH_LIBRARY_IMPL(chatglm, CPU, m) { m.impl("decode_attention", &decode_attention); }
