// Decode-step attention on CPU: one new query row per sequence, each attending to the first
// `length` positions of its own slot of the static KV cache, read in place (no gather, no mask).
// For ungrouped heads (ChatGLM-6B: as many key/value heads as query heads).
//
// Why: SDPA's CPU flash kernel is built for blocks of query rows; with one row it reads ChatGLM-6B's
// 512 cached keys of a layer at about 4 GB/s (2.4 ms per layer on 2 threads), where reading them
// once should take a tenth of that. Here each (row, head) is one task: scores q.k in float32
// (products of bfloat16 values are exact), a softmax (torch's, vectorised), then the weighted sum
// of the values in float32, with each key and value read exactly once. Two code paths, chosen
// by the caller: AVX-512 (16 floats per vector) and AVX2 + FMA (8).
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
#include <string>

namespace {

// 16 bfloat16 values (32 bytes) widened to float32.
__attribute__((target("avx512f"))) inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// 8 bfloat16 values (16 bytes) widened to float32.
__attribute__((target("avx2"))) inline __m256 load_bf16_avx2(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

__attribute__((target("avx2"))) inline float reduce_add_avx2(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
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

// The same with 8 floats per vector; D8 = head_dim / 8 (the query is read from L1 each time:
// 16 registers hold at most 128 of its values).
template <int D8>
__attribute__((target("avx2,fma")))
void scores_row_avx2(const float* q, const uint16_t* keys, int64_t length, float scale, float* scores) {
  for (int64_t t = 0; t < length; ++t) {
    const uint16_t* key = keys + t * 8 * D8;
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), load_bf16_avx2(key));
    for (int j = 1; j < D8; ++j) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * j), load_bf16_avx2(key + 8 * j), acc);
    scores[t] = reduce_add_avx2(acc) * scale;
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

template <int D8>
__attribute__((target("avx2,fma")))
void weighted_values_avx2(const float* weights, const uint16_t* values, int64_t length, float* out) {
  __m256 acc[D8];
  for (int j = 0; j < D8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const __m256 weight = _mm256_set1_ps(weights[t]);
    const uint16_t* value = values + t * 8 * D8;
    for (int j = 0; j < D8; ++j) acc[j] = _mm256_fmadd_ps(weight, load_bf16_avx2(value + 8 * j), acc[j]);
  }
  for (int j = 0; j < D8; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

// One path's two loops for one head size.
struct Attention {
  void (*scores_row)(const float* q, const uint16_t* keys, int64_t length, float scale, float* scores);
  void (*weighted_values)(const float* weights, const uint16_t* values, int64_t length, float* out);
};

template <int D>
Attention attention_for(bool avx512) {
  if (avx512) return {scores_row<D / 16>, weighted_values<D / 16>};
  return {scores_row_avx2<D / 8>, weighted_values_avx2<D / 8>};
}

void attend(const Attention& path, int64_t d, const float* q, const uint16_t* k, const uint16_t* v,
            const int64_t* slots, const int64_t* lengths, int64_t rows, int64_t heads, int64_t max_len,
            at::Tensor& scores, float* out) {
  const int64_t longest = scores.size(1);
  float* sp = scores.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Task (row, head) reads [slot, head, :length, :] of the cache: [slots, heads, max_len, d].
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / heads, head = task % heads;
      const int64_t offset = (slots[row] * heads + head) * max_len * d;
      path.scores_row(q + task * d, k + offset, lengths[row], scale, sp + task * longest);
    }
  });
  const at::Tensor weights = at::_softmax(scores, -1, false);
  const float* wp = weights.data_ptr<float>();
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / heads, head = task % heads;
      const int64_t offset = (slots[row] * heads + head) * max_len * d;
      path.weighted_values(wp + task * longest, v + offset, lengths[row], out + task * d);
    }
  });
}

bool supported(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == "avx512" && __builtin_cpu_supports("avx512f");
}

// q [rows, heads, d]; k, v cache [slots, heads, max_len, d] bfloat16; slots, lengths int64 [rows].
// isa: "avx512" or "avx2", the code path (the caller picks it: model_runtime/native).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& slots, const at::Tensor& lengths, c10::string_view isa_name) {
  const std::string isa(isa_name);
  TORCH_CHECK(supported(isa), "this CPU cannot run the ", isa, " path");
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
  const bool avx512 = isa == "avx512";
  Attention path{};
  switch (d) {  // the head sizes of the GLM family (128) and of the tiny test models
    case 16: path = attention_for<16>(avx512); break;
    case 32: path = attention_for<32>(avx512); break;
    case 64: path = attention_for<64>(avx512); break;
    case 128: path = attention_for<128>(avx512); break;
    case 256: path = attention_for<256>(avx512); break;
    default: TORCH_CHECK(false, "head_dim ", d, " is not built in (16, 32, 64, 128, 256 are)");
  }
  attend(path, d, qp, kp, vp, slot, length, rows, heads, max_len, scores, op);
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor lengths, str isa) -> Tensor");
  m.def("decode_attention_supported(str isa) -> bool", [](c10::string_view isa) { return supported(std::string(isa)); });
}
TORCH_LIBRARY_IMPL(chatglm, CPU, m) { m.impl("decode_attention", &decode_attention); }
