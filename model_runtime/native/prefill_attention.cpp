// Prompt attention on CPU: a chunk of a prompt's query rows attending to the first `kv_len`
// positions of their slot of the static KV cache, read in place, with GLM's visibility rule
// (the row at cache position p sees column j when j < prefix_len or j <= p) computed, not read
// from a mask. Grouped heads (GLM-4) share their key/value head.
//
// Why: SDPA's CPU flash kernel ran a 2037-token causal prompt of a mid-size GLM-4 at about 80
// GFLOP/s with the boolean mask it is given (95-100 ms a layer, two thirds of the whole prefill
// on 2 Zen 5 cores), computing the masked half too. Here: flash attention in float32 (scores of
// bfloat16 values are exact products, sums and the online softmax in float32, nothing the size of
// rows x columns is stored), blocks of query rows against vectors of keys, the keys transposed
// once per call into [blocks of W keys, d, W] so that a block's scores are one FMA chain per
// row over d, the values read from the cache as they are (each widened value vector feeds one
// FMA per row), and key blocks no row of a query block sees never computed.
//
// One source for both code paths: the kernel is written with GCC's generic vectors of W floats
// and inlined into one function per instruction set (W = 16 under AVX-512, 8 under AVX2 + FMA),
// so that each is compiled with that set's registers and FMAs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

// The generic helpers pass vectors by value but are always inlined into a function of one
// instruction set: GCC's warning about their ABI without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// Query rows per block: as many FMA chains as keep the FMA units busy, with their accumulators and
// a key vector in registers (AVX-512 has 32 of them: 16 rows measured 7% faster than 8; AVX2 16).
template <int W>
constexpr int kRows = W >= 16 ? 16 : 8;
constexpr int64_t kMaxDim = 256;  // head sizes up to this

template <int W>
struct Vectors {
  typedef float F __attribute__((vector_size(4 * W), aligned(4)));  // loads need no alignment
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

// W bfloat16 values widened to float32 (the high half of each lane's bits).
template <int W>
__attribute__((always_inline)) inline typename Vectors<W>::F widen(const uint16_t* bits) {
  typedef uint16_t H __attribute__((vector_size(2 * W), aligned(2)));
  H half;
  __builtin_memcpy(&half, bits, sizeof(half));
  const typename Vectors<W>::I word = __builtin_convertvector(half, typename Vectors<W>::I) << 16;
  typename Vectors<W>::F value;
  __builtin_memcpy(&value, &word, sizeof(value));
  return value;
}

template <int W>
__attribute__((always_inline)) inline float lane_max(typename Vectors<W>::F v) {
  float best = v[0];
  for (int i = 1; i < W; ++i) best = std::max(best, v[i]);
  return best;
}

template <int W>
__attribute__((always_inline)) inline float lane_sum(typename Vectors<W>::F v) {
  float sum = 0;
  for (int i = 0; i < W; ++i) sum += v[i];
  return sum;
}

// e^x for x <= 0 (scores less their running maximum), about 1 ulp: x = n ln2 + r with |r| <= ln2/2,
// e^r by its Taylor polynomial to r^6 (error about r^7/7!, 2^-23), 2^n put in the exponent bits.
// Below -87 it gives e^-87, still a normal float (the caller zeroes columns it must not see;
// others are that small).
template <int W>
__attribute__((always_inline)) inline typename Vectors<W>::F exp_nonpositive(typename Vectors<W>::F x) {
  using F = typename Vectors<W>::F;
  using I = typename Vectors<W>::I;
  x = x < -87.0f ? F{} - 87.0f : x;
  const F scaled = x * 1.44269504088896341f + 0.5f;  // n = floor(x log2 e + 0.5), the nearest
  I n = __builtin_convertvector(scaled, I);          // truncates toward zero: one too many below
  n += __builtin_convertvector(n, F) > scaled;       // a true comparison's lanes are -1
  const F nf = __builtin_convertvector(n, F);
  const F r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln 2, in two parts
  F p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (n + 127) << 23;
  F two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// One block of up to kRows query rows of one head. q: [kRows, d], scaled by 1/sqrt(d); the first
// row at cache position `first`; kt: this key head's keys as bfloat16 [kv_len / W blocks, d, W]
// (zero past kv_len); v: its values in the cache, bfloat16 [kv_len, d]; out: rows `rows` of
// [., out_stride]. Keys go kChunk vectors at a time: the scores of one vector of keys are one FMA
// chain over d per row (each widened key vector serves an FMA per row, as each value vector below);
// a chunk's softmax bookkeeping (its maximum, the rescaling of what was summed) is done once per row.
template <int W>
__attribute__((always_inline)) inline void attend_block(const float* q, int rows, int64_t first, const uint16_t* kt,
                                                       const uint16_t* v, int64_t kv_len, int64_t prefix_len,
                                                       int64_t d, float* out, int64_t out_stride) {
  using F = typename Vectors<W>::F;
  using I = typename Vectors<W>::I;
  constexpr int kChunk = 4, C = kChunk * W;  // vectors, keys per chunk
  const float kMinusInf = -std::numeric_limits<float>::infinity();
  alignas(64) float acc[kRows<W>][kMaxDim];
  alignas(64) float p[kRows<W>][C];  // a chunk's scores, then its softmax weights
  F total[kRows<W>];
  float running_max[kRows<W>];
  for (int r = 0; r < kRows<W>; ++r) {
    std::fill(acc[r], acc[r] + d, 0.0f);
    total[r] = F{};
    running_max[r] = kMinusInf;
  }
  // Columns some row of the block sees, and those every row sees (no mask needed below that).
  const int64_t seen = std::min(kv_len, std::max(prefix_len, first + rows));
  const int64_t all_see = std::min(kv_len, std::max(prefix_len, first + 1));
  I lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  for (int64_t c0 = 0; c0 < seen; c0 += C) {
    const int vectors = static_cast<int>(std::min<int64_t>(kChunk, (seen - c0 + W - 1) / W));
    for (int b = 0; b < vectors; ++b) {
      const uint16_t* keys = kt + (c0 + b * W) * d;  // block (c0 + bW) / W of [., d, W]
      F s[kRows<W>];
      for (int r = 0; r < kRows<W>; ++r) s[r] = F{};
      for (int64_t e = 0; e < d; ++e) {
        const F k = widen<W>(keys + e * W);
        for (int r = 0; r < kRows<W>; ++r) s[r] += q[r * d + e] * k;
      }
      for (int r = 0; r < kRows<W>; ++r) __builtin_memcpy(p[r] + b * W, &s[r], sizeof(F));
    }
    const bool masked = c0 + vectors * W > all_see;
    for (int r = 0; r < kRows<W>; ++r) {
      F scores[kChunk], most = F{} + kMinusInf;
      I visible[kChunk];
      for (int b = 0; b < vectors; ++b) {
        __builtin_memcpy(&scores[b], p[r] + b * W, sizeof(F));
        if (masked) {
          const I column = lane + static_cast<int32_t>(c0 + b * W);
          visible[b] = (column < static_cast<int32_t>(kv_len)) &
                       ((column < static_cast<int32_t>(prefix_len)) | (column <= static_cast<int32_t>(first + r)));
          scores[b] = visible[b] ? scores[b] : F{} + kMinusInf;
        }
        most = most > scores[b] ? most : scores[b];
      }
      const float new_max = std::max(running_max[r], lane_max<W>(most));  // finite: every row sees column 0
      const float rescale = std::exp(running_max[r] - new_max);  // 0 on the first chunk
      total[r] *= rescale;
      for (int b = 0; b < vectors; ++b) {
        F weights = exp_nonpositive<W>(scores[b] - new_max);
        if (masked) weights = visible[b] ? weights : F{};
        total[r] += weights;
        __builtin_memcpy(p[r] + b * W, &weights, sizeof(F));
      }
      running_max[r] = new_max;
      if (rescale != 1.0f)
        for (int64_t e = 0; e < d; ++e) acc[r][e] *= rescale;
    }
    const int64_t keys_here = std::min<int64_t>(C, seen - c0);
    for (int64_t e = 0; e < d; e += W) {
      F a[kRows<W>];
      for (int r = 0; r < kRows<W>; ++r) __builtin_memcpy(&a[r], acc[r] + e, sizeof(F));
      for (int64_t j = 0; j < keys_here; ++j) {
        const F value = widen<W>(v + (c0 + j) * d + e);
        for (int r = 0; r < kRows<W>; ++r) a[r] += p[r][j] * value;
      }
      for (int r = 0; r < kRows<W>; ++r) __builtin_memcpy(acc[r] + e, &a[r], sizeof(F));
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float inverse = 1.0f / lane_sum<W>(total[r]);
    for (int64_t e = 0; e < d; ++e) out[r * out_stride + e] = acc[r][e] * inverse;
  }
}

// What a call's tasks read: q32 [T, heads, d] float32, scaled; kt [kv_heads, blocks * d * W]
// bfloat16; v: the slot's values, bfloat16 [kv_heads, max_len, d]; out [T, heads, d] float32.
struct Call {
  const float* q32;
  int64_t T, heads, kv_heads, d;
  const uint16_t* kt;
  const uint16_t* v;
  int64_t max_len, kv_len, blocks, start, prefix_len;
  float* out;
  int64_t block_rows;  // kRows of the path
  int64_t row_blocks() const { return (T + block_rows - 1) / block_rows; }
};

// Tasks begin .. end - 1: (head, block of kRows query rows).
template <int W>
__attribute__((always_inline)) inline void run_tasks(const Call& call, int64_t begin, int64_t end) {
  const int64_t row_blocks = call.row_blocks(), d = call.d, heads = call.heads;
  alignas(64) float q[kRows<W> * kMaxDim];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t head = task / row_blocks, i0 = task % row_blocks * kRows<W>;
    const int rows = static_cast<int>(std::min<int64_t>(kRows<W>, call.T - i0));
    std::fill(q, q + kRows<W> * d, 0.0f);
    for (int r = 0; r < rows; ++r) std::copy_n(call.q32 + ((i0 + r) * heads + head) * d, d, q + r * d);
    const int64_t kv_head = head / (heads / call.kv_heads);
    attend_block<W>(q, rows, call.start + i0, call.kt + kv_head * call.blocks * d * W,
                    call.v + kv_head * call.max_len * d, call.kv_len, call.prefix_len, d,
                    call.out + (i0 * heads + head) * d, heads * d);
  }
}

// The two paths (a lambda is a function of its own, compiled for no particular instruction set:
// at::parallel_for's calls these).
__attribute__((target("avx512f"))) void tasks_avx512(const Call& call, int64_t begin, int64_t end) {
  run_tasks<16>(call, begin, end);
}

__attribute__((target("avx2,fma"))) void tasks_avx2(const Call& call, int64_t begin, int64_t end) {
  run_tasks<8>(call, begin, end);
}

bool supported(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == "avx512" && __builtin_cpu_supports("avx512f");
}

int64_t lanes(const std::string& isa) { return isa == "avx512" ? 16 : 8; }

// The first `columns` keys of slot `slot` of k [slots, kv_heads, max_len, d] (bfloat16,
// contiguous), transposed per block of W keys: [kv_heads, blocks * d * W], zero past `columns`.
// Apart from the attention so that ranges of rows reading the same keys (a prompt read a layer
// at a time) transpose them once.
at::Tensor prefill_attention_keys(const at::Tensor& k, int64_t slot, int64_t columns, c10::string_view isa_name) {
  const std::string isa(isa_name);
  TORCH_CHECK(supported(isa), "this CPU cannot run the ", isa, " path");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kBFloat16 && k.is_contiguous(),
              "a contiguous bfloat16 cache [slots, heads, len, d] expected");
  const int64_t kv_heads = k.size(1), max_len = k.size(2), d = k.size(3), W = lanes(isa);
  TORCH_CHECK(slot >= 0 && slot < k.size(0) && columns >= 1 && columns <= max_len, "slot or columns out of range");
  TORCH_CHECK(d % W == 0 && d <= kMaxDim, "head size ", d, ": a multiple of ", W, " up to ", kMaxDim, " expected");
  const int64_t blocks = (columns + W - 1) / W;
  at::Tensor kt = at::empty({kv_heads, blocks * W * d}, k.options());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr()) + slot * kv_heads * max_len * d;
  auto* ktp = reinterpret_cast<uint16_t*>(kt.data_ptr());
  at::parallel_for(0, kv_heads * blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, j0 = task % blocks * W, keys = std::min(W, columns - j0);
      const uint16_t* from = kp + (head * max_len + j0) * d;
      uint16_t* block = ktp + (head * blocks * W + j0) * d;
      for (int64_t e = 0; e < d; ++e) {
        for (int64_t j = 0; j < keys; ++j) block[e * W + j] = from[j * d + e];
        std::fill(block + e * W + keys, block + (e + 1) * W, uint16_t{0});
      }
    }
  });
  return kt;
}

// q [T, heads, d]: the rows at cache positions start .. start + T - 1 of slot `slot`, each seeing
// the columns j < `columns` with j < prefix_len or j <= its position; keys: that slot's first
// `columns` keys from prefill_attention_keys; v: the values [slots, kv_heads, max_len, d]
// (bfloat16, contiguous, read in place). Returns [T, heads, d] in q's dtype.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& v, int64_t slot,
                             int64_t start, int64_t columns, int64_t prefix_len, c10::string_view isa_name) {
  const std::string isa(isa_name);
  TORCH_CHECK(supported(isa), "this CPU cannot run the ", isa, " path");
  TORCH_CHECK(q.dim() == 3 && v.dim() == 4 && v.scalar_type() == at::kBFloat16 && v.is_contiguous(),
              "q [T, heads, d] and a contiguous bfloat16 cache [slots, heads, len, d] expected");
  const int64_t T = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = v.size(1), max_len = v.size(2);
  const int64_t W = lanes(isa), blocks = (columns + W - 1) / W;
  TORCH_CHECK(v.size(3) == d && d % W == 0 && d <= kMaxDim, "head size ", d, ": a multiple of ", W, " up to ",
              kMaxDim, " expected");
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(slot >= 0 && slot < v.size(0) && columns >= 1 && columns <= max_len && start >= 0 &&
              start + T <= columns && prefix_len >= 0, "slot, start, columns or prefix_len out of range");
  TORCH_CHECK(keys.scalar_type() == at::kBFloat16 && keys.is_contiguous() && keys.dim() == 2 &&
              keys.size(0) == kv_heads && keys.size(1) == blocks * W * d,
              "keys from prefill_attention_keys for these columns and this path expected");
  const at::Tensor q32 = q.to(at::kFloat).mul(1.0 / std::sqrt(static_cast<double>(d))).contiguous();
  at::Tensor out = at::empty({T, heads, d}, q32.options());
  const Call call{q32.data_ptr<float>(), T, heads, kv_heads, d, reinterpret_cast<const uint16_t*>(keys.data_ptr()),
                  reinterpret_cast<const uint16_t*>(v.data_ptr()) + slot * kv_heads * max_len * d, max_len, columns,
                  blocks, start, prefix_len, out.data_ptr<float>(), isa == "avx512" ? kRows<16> : kRows<8>};
  const auto tasks = isa == "avx512" ? tasks_avx512 : tasks_avx2;
  at::parallel_for(0, heads * call.row_blocks(), 1, [&](int64_t begin, int64_t end) { tasks(call, begin, end); });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("prefill_attention_keys(Tensor k, int slot, int columns, str isa) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor keys, Tensor v, int slot, int start, int columns, int prefix_len, str isa)"
        " -> Tensor");
  m.def("prefill_attention_supported(str isa) -> bool",
        [](c10::string_view isa) { return supported(std::string(isa)); });
}
TORCH_LIBRARY_IMPL(chatglm, CPU, m) {
  m.impl("prefill_attention_keys", &prefill_attention_keys);
  m.impl("prefill_attention", &prefill_attention);
}
