// Linear layers for a few rows of activations (decode steps) on x86-64 CPUs with AVX-512 or with
// AVX2 + FMA (one build, a code path per instruction set, chosen by the caller), streaming the
// weights once: bfloat16 weights [N, K], or the published ChatGLM quantized layout read in place
// (quant/format.py): int8 [N, K], or int8 [N, K/2] with the even input element in the high nibble,
// with a float per-row scale; an optional bias.
//
//   y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n], accumulated in float32.
//
// Why: torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are compute-bound on one
// token (they convert every weight to float with cross-lane shuffles, and INT4 needs a repacked
// copy), and its bfloat16 GEMV reads about half the bandwidth; a decode step should be bound by
// reading the weights once. Measured choices:
//   - rows in blocks of 4, each block streamed together while the next block is prefetched into
//     L2 (not L1, which keeps the activations: prefetching into L1 read 19-25 GB/s on a 2-core
//     Zen 4, into L2 28-36); one sequential stream per row left the hardware prefetcher behind;
//   - INT4 turns each nibble into an exact bfloat16 with one table permute and multiplies with
//     `vdpbf16ps` (32 products per instruction); the activations are permuted once per call so
//     that the nibbles of a 64-byte load line up with them. INT8 widens bytes to float32.
//     bfloat16 weights go to `vdpbf16ps` as they are.
//   - AVX2 has no bfloat16 dot product, and only 16 vector registers: activations in float32, rows
//     of the weight widened to float32 in registers and multiplied with FMA, at most 2 activation
//     rows per pass. INT4: a 32-byte load is 8 words of 8 nibbles, offset once to unsigned;
//     nibble j of every word becomes an exact integer with one AND and a float with one convert
//     (the activations permuted and scaled once per call to line up with it; see
//     int4_block_avx2). bfloat16: the even element of each 32-bit word is the word shifted left
//     by 16, the odd one the word with its low half cleared (activations split into evens and
//     odds once per call). INT8: as INT4, a 32-byte load
//     offset once to unsigned, byte j of every word one AND and one convert (int8_block_avx2).
// Products are exact (bf16 x 8-bit integer; float32 x integer in FMA); only the float32 summation
// order differs from the float64 reference. (AVX-512 INT4 rounds float32 activations to bf16; the
// model's are bf16 already.) Built on first use by model_runtime/native (torch.utils.cpp_extension).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>

namespace {

constexpr int64_t kBlockRows = 4;   // weight rows streamed together
constexpr int kMaxGroup = 4;        // activation rows computed per pass over a block (AVX-512; AVX2: 2)
constexpr int64_t kGrainBlocks = 16;

// Where a block starts: pointers to its weight rows (`row_len` elements each; past the last row,
// row n0 again: computed and discarded) and zeroed accumulators (V: __m512 or __m256; no
// intrinsics here, so that both instruction sets' kernels inline it).
template <int M, typename W, typename V>
__attribute__((always_inline)) inline void start_block(
    const W* q, int64_t row_len, int64_t n0, int64_t rows, const W* (&w)[kBlockRows], V (&acc)[M][kBlockRows]) {
  for (int r = 0; r < kBlockRows; ++r) {
    w[r] = q + (n0 + (r < rows ? r : 0)) * row_len;
    for (int m = 0; m < M; ++m) acc[m][r] = V{};
  }
}

// Where it ends: sums[m * kBlockRows + r] for activation row m and weight row n0 + r.
template <int M>
__attribute__((target("avx512f"), always_inline)) inline void finish_block(__m512 (&acc)[M][kBlockRows], float* sums) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kBlockRows; ++r) sums[m * kBlockRows + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// AVX2: with one activation row, alternate steps go to a second set of accumulators (`odd`), so
// that twice as many FMAs overlap (one set waits on the FMA latency: 4 bytes per cycle at INT4);
// with more rows there are enough chains already, and `odd` is `acc`, or unused.
template <int M>
__attribute__((target("avx2,fma"), always_inline)) inline void finish_block(
    __m256 (&acc)[M][kBlockRows], __m256 (&odd)[M][kBlockRows], float* sums) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kBlockRows; ++r) {
      const __m256 sum = M == 1 && &acc != &odd ? _mm256_add_ps(acc[m][r], odd[m][r]) : acc[m][r];
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
      sums[m * kBlockRows + r] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
    }
}

// The L2 prefetch of the next block's rows, one 64-byte line ahead per row (see the top).
template <typename W>
__attribute__((always_inline)) inline void prefetch_next_block(const W* (&w)[kBlockRows], int64_t at, int64_t row_len) {
  for (int r = 0; r < kBlockRows; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(w[r] + at + kBlockRows * row_len), _MM_HINT_T1);
}

// Sums of one block: acc[m * kBlockRows + r] for rows n0 + r of the weight.
template <int M>
__attribute__((target("avx512f,avx512bw")))
void int8_block(const float* x, int64_t K, const int8_t* q, int64_t n0, int64_t rows, float* sums) {
  // x: float32 [M, K] (K a multiple of 16)
  __m512 acc[M][kBlockRows];
  const int8_t* w[kBlockRows];
  start_block<M>(q, K, n0, rows, w, acc);
  for (int64_t k = 0; k < K; k += 16) {
    if ((k & 63) == 0) prefetch_next_block(w, k, K);
    __m512 wf[kBlockRows];
    for (int r = 0; r < kBlockRows; ++r)
      wf[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k))));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < kBlockRows; ++r) acc[m][r] = _mm512_fmadd_ps(wf[r], xv, acc[m][r]);
    }
  }
  finish_block<M>(acc, sums);
}

// x: bfloat16 bits [M, Kp/128, 4, 32] (K zero-padded to Kp, a multiple of 128), with
// x[m, c, i, t] = input element 128c + 4t + {1, 0, 3, 2}[i]: the one that nibble i (bits 4i..4i+3)
// of 16-bit word t of the c-th 64-byte chunk of a row multiplies. K is a multiple of 64: a row
// ending in half a chunk is read with a masked load (zero nibbles, times zero padding).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void int4_block(const uint16_t* x, int64_t K, const uint8_t* q, int64_t n0, int64_t rows, float* sums) {
  const int64_t x_stride = (K + 127) / 128 * 128;
  // bfloat16 of the signed nibble; vpermw reads 5 index bits, so the table repeats.
  alignas(64) static const uint16_t kNibbleBf16[32] = {
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};
  const __m512i table = _mm512_load_si512(kNibbleBf16);
  const int64_t row_bytes = K / 2;
  __m512 acc[M][kBlockRows];
  const uint8_t* w[kBlockRows];
  start_block<M>(q, row_bytes, n0, rows, w, acc);
  for (int64_t c = 0; c < row_bytes; c += 64) {
    __m512i packed[kBlockRows];
    for (int r = 0; r < kBlockRows; ++r)
      packed[r] = _mm512_maskz_loadu_epi8(c + 64 <= row_bytes ? ~__mmask64{0} : __mmask64{0xFFFFFFFF}, w[r] + c);
    prefetch_next_block(w, c, row_bytes);
    const uint16_t* xc = x + 2 * c;
    for (int i = 0; i < 4; ++i) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xc + m * x_stride + 32 * i);
      for (int r = 0; r < kBlockRows; ++r) {
        const __m512i index = i == 0 ? packed[r] : _mm512_srli_epi16(packed[r], 4 * i);
        const __m512bh wb = (__m512bh)_mm512_permutexvar_epi16(index, table);
        for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wb, xv[m]);
      }
    }
  }
  finish_block<M>(acc, sums);
}

// x: bfloat16 bits [M, K], K a multiple of 32.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void bf16_block(const uint16_t* x, int64_t K, const uint16_t* q, int64_t n0, int64_t rows, float* sums) {
  __m512 acc[M][kBlockRows];
  const uint16_t* w[kBlockRows];
  start_block<M>(q, K, n0, rows, w, acc);
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wb[kBlockRows];
    for (int r = 0; r < kBlockRows; ++r) wb[r] = (__m512bh)_mm512_loadu_si512(w[r] + k);
    prefetch_next_block(w, k, K);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < kBlockRows; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wb[r], xv);
    }
  }
  finish_block<M>(acc, sums);
}

// The AVX2 + FMA kernels: the same blocks, float32 activations and FMA (see the top).

// x: float32 [M, K + 8]: per row, for the first B = K - K % 32 inputs [B/32, 4, 8] with
// x[m, c, j, t] = 2^-8j' * input element 32c + 4t + j, the one that byte j of 32-bit word t of
// the c-th 32-byte chunk of a row multiplies (j' = j, but 0 for j = 3); then the last K - B inputs
// (0 or 16) as they are; then 128 * (the sum of the first B inputs) and 7 zeros. K is a multiple
// of 16. As in int4_block_avx2, each word is XORed with 0x80808080 once, turning every signed byte
// b into b + 128 (0..255); byte j of the words is then one AND (an exact integer below 2^24; byte
// 3 a logical shift) and one convert, and 128 * sum(x) is subtracted at the end: three operations
// per 8 weights and one load per 32, where widening bytes took a load and a cross-lane widen per 8
// (four ChatGLM-6B block shapes, one row, 2-core Zen 4: 0.83 of a plain read against 0.51;
// benchmarks/results/cpu_isa-kernels.json and cpu_isa-kernels-previous.json).
template <int M>
__attribute__((target("avx2,fma")))
void int8_block_avx2(const float* x, int64_t K, const int8_t* q, int64_t n0, int64_t rows, float* sums) {
  const int64_t body = K - K % 32, x_stride = K + 8;
  const __m256i offset = _mm256_set1_epi32(static_cast<int>(0x80808080u));
  __m256 acc[M][kBlockRows], odd[M][kBlockRows];
  const int8_t* w[kBlockRows];
  start_block<M>(q, K, n0, rows, w, acc);
  start_block<M>(q, K, n0, rows, w, odd);
  for (int64_t k = 0; k < body; k += 32) {
    if ((k & 63) == 0) prefetch_next_block(w, k, K);
    __m256i packed[kBlockRows];
    for (int r = 0; r < kBlockRows; ++r)
      packed[r] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)), offset);
    for (int j = 0; j < 4; ++j) {
      auto& into = M == 1 && (j & 1) ? odd : acc;
      const __m256i byte = _mm256_set1_epi32(static_cast<int>(0xFFu << (8 * j)));
      for (int r = 0; r < kBlockRows; ++r) {
        const __m256i shifted = j == 3 ? _mm256_srli_epi32(packed[r], 24) : _mm256_and_si256(packed[r], byte);
        const __m256 wf = _mm256_cvtepi32_ps(shifted);
        for (int m = 0; m < M; ++m)
          into[m][r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * x_stride + k + 8 * j), into[m][r]);
      }
    }
  }
  for (int64_t k = body; k < K; k += 8)  // the last 16 inputs, if any: bytes widened
    for (int r = 0; r < kBlockRows; ++r) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w[r] + k));
      const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * x_stride + k), acc[m][r]);
    }
  finish_block<M>(acc, odd, sums);
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kBlockRows; ++r) sums[m * kBlockRows + r] -= x[m * x_stride + K];
}

// x: float32 [M, K + 8]: per row, [K/64, 8, 8] with x[m, c, j, t] = 2^-4j' * input element
// 64c + 8t + (j ^ 1), the one that nibble j (bits 4j..4j+3) of 32-bit word t of the c-th 32-byte
// chunk of a row multiplies (j' = j, but 0 for j = 7), then 8 * (the sum of the row's inputs) and
// 7 zeros. K is a multiple of 64. Each word is XORed with 0x88888888 once, turning every signed
// nibble s into s + 8 (0..15); nibble j of the words is then one AND (s + 8 times 2^4j, an exact
// integer; nibble 7 a logical shift) and one convert; the 2^-4j lives in the activations, and
// 8 * sum(x) is subtracted at the end. Three operations per 8 weights instead of four.
template <int M>
__attribute__((target("avx2,fma")))
void int4_block_avx2(const float* x, int64_t K, const uint8_t* q, int64_t n0, int64_t rows, float* sums) {
  const int64_t row_bytes = K / 2, x_stride = K + 8;
  const __m256i offset = _mm256_set1_epi32(static_cast<int>(0x88888888u));
  __m256 acc[M][kBlockRows], odd[M][kBlockRows];
  const uint8_t* w[kBlockRows];
  start_block<M>(q, row_bytes, n0, rows, w, acc);
  start_block<M>(q, row_bytes, n0, rows, w, odd);
  for (int64_t c = 0; c < row_bytes; c += 32) {
    if ((c & 63) == 0) prefetch_next_block(w, c, row_bytes);
    __m256i packed[kBlockRows];
    for (int r = 0; r < kBlockRows; ++r)
      packed[r] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + c)), offset);
    const float* xc = x + 2 * c;
    for (int j = 0; j < 8; ++j) {
      auto& into = M == 1 && (j & 1) ? odd : acc;
      const __m256i nibble = _mm256_set1_epi32(0xF << (4 * j));
      for (int r = 0; r < kBlockRows; ++r) {
        const __m256i shifted = j == 7 ? _mm256_srli_epi32(packed[r], 28) : _mm256_and_si256(packed[r], nibble);
        const __m256 wf = _mm256_cvtepi32_ps(shifted);
        for (int m = 0; m < M; ++m) into[m][r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xc + m * x_stride + 8 * j), into[m][r]);
      }
    }
  }
  finish_block<M>(acc, odd, sums);
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kBlockRows; ++r) sums[m * kBlockRows + r] -= x[m * x_stride + K];
}

// x: float32 [M, K/16, 2, 8], x[m, c, p, t] = input element 16c + 2t + p (evens, then odds, of
// each 16); K a multiple of 32.
template <int M>
__attribute__((target("avx2,fma")))
void bf16_block_avx2(const float* x, int64_t K, const uint16_t* q, int64_t n0, int64_t rows, float* sums) {
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[M][kBlockRows], odd[M][kBlockRows];
  auto& into_odd = M == 1 ? odd : acc;
  const uint16_t* w[kBlockRows];
  start_block<M>(q, K, n0, rows, w, acc);
  start_block<M>(q, K, n0, rows, w, odd);
  for (int64_t k = 0; k < K; k += 16) {
    if ((k & 31) == 0) prefetch_next_block(w, k, K);
    for (int r = 0; r < kBlockRows; ++r) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k));
      const __m256 evens = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
      const __m256 odds = _mm256_castsi256_ps(_mm256_and_si256(words, high_half));
      for (int m = 0; m < M; ++m) {
        acc[m][r] = _mm256_fmadd_ps(evens, _mm256_loadu_ps(x + m * K + k), acc[m][r]);
        into_odd[m][r] = _mm256_fmadd_ps(odds, _mm256_loadu_ps(x + m * K + k + 8), into_odd[m][r]);
      }
    }
  }
  finish_block<M>(acc, odd, sums);
}

template <typename X, typename W>
using BlockFn = void (*)(const X*, int64_t, const W*, int64_t, int64_t, float*);

// by_group[g - 1]: the kernel for g activation rows per pass (up to G).
template <typename X, typename W, size_t G>
void run_blocks(const X* x, int64_t x_stride, int64_t M, int64_t K, const W* q, int64_t N, const float* scale,
                const float* bias, float* out, const BlockFn<X, W> (&by_group)[G]) {
  static_assert(G <= kMaxGroup);
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    float sums[kMaxGroup * kBlockRows];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kBlockRows, rows = std::min(kBlockRows, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += G) {
        const int64_t group = std::min<int64_t>(G, M - m0);
        by_group[group - 1](x + m0 * x_stride, K, q, n0, rows, sums);
        for (int64_t m = 0; m < group; ++m)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t n = n0 + r;
            out[(m0 + m) * N + n] = sums[m * kBlockRows + r] * (scale ? scale[n] : 1.0f) + (bias ? bias[n] : 0.0f);
          }
      }
    }
  });
}

// Whether this CPU runs the `isa` path ("avx512" or "avx2") at that width (checked at run time:
// the file is built with per-function target attributes, so it compiles on any x86-64).
bool supported(int64_t bits, const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = isa == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return bits == 8 ? avx512 : avx512 && __builtin_cpu_supports("avx512bf16");  // 16 and 4: vdpbf16ps
}

// The activations as the kernels of that path and width read them (see each kernel): [M, row
// stride] values in a contiguous tensor, written in one pass over x (a chain of torch ops here
// cost 15 us a call, as much as reading a 4096 x 4096 INT4 weight's first 8%).
at::Tensor activations_for(const at::Tensor& x, int64_t bits, bool avx512) {
  const int64_t M = x.size(0), K = x.size(1);
  if (avx512 && bits == 16) return x.to(at::kBFloat16).contiguous();
  if (avx512 && bits == 8) return x.to(at::kFloat).contiguous();
  if (avx512) {  // INT4, see int4_block: bfloat16 [M, Kp/128, 4, 32], zero-padded
    const at::Tensor x16 = x.to(at::kBFloat16).contiguous();
    const int64_t padded = (K + 127) / 128 * 128;
    at::Tensor out = at::empty({M, padded}, x16.options());
    const auto* in = reinterpret_cast<const uint16_t*>(x16.data_ptr());
    auto* o = reinterpret_cast<uint16_t*>(out.data_ptr());
    for (int64_t m = 0; m < M; ++m, in += K, o += padded)
      for (int64_t c = 0; c < padded; c += 128)
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t t = 0; t < 32; ++t) {
            const int64_t k = c + 4 * t + (i ^ 1);
            o[c + 32 * i + t] = k < K ? in[k] : 0;
          }
    return out;
  }
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* in = x32.data_ptr<float>();
  if (bits == 16) {  // see bf16_block_avx2: [M, K/16, 2, 8]
    at::Tensor out = at::empty({M, K}, x32.options());
    float* o = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m, in += K, o += K)
      for (int64_t c = 0; c < K; c += 16)
        for (int64_t p = 0; p < 2; ++p)
          for (int64_t a = 0; a < 8; ++a) o[c + 8 * p + a] = in[c + 2 * a + p];
    return out;
  }
  // INT8 / INT4 (see int8_block_avx2 / int4_block_avx2): K + 8 per row, the lined-up inputs,
  // then offset x (the sum of the inputs lined up, in float64) and 7 zeros.
  const int64_t stride = K + 8;
  const int64_t lined = bits == 8 ? K - K % 32 : K;  // INT8: the last K % 32 inputs go as they are
  const double offset = bits == 8 ? 128 : 8;
  at::Tensor out = at::zeros({M, stride}, x32.options());
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m, in += K, o += stride) {
    if (bits == 8) {  // byte j of word t of chunk c: input 32c + 4t + j, times 2^-8j (j < 3)
      static const float kByteScale[4] = {1.0f, 0x1p-8f, 0x1p-16f, 1.0f};
      for (int64_t c = 0; c < lined; c += 32)
        for (int64_t j = 0; j < 4; ++j)
          for (int64_t t = 0; t < 8; ++t) o[c + 8 * j + t] = kByteScale[j] * in[c + 4 * t + j];
      std::copy(in + lined, in + K, o + lined);
    } else {  // nibble j of word t: input 64c + 8t + (j ^ 1), times 2^-4j (j < 7)
      static const float kNibbleScale[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
      for (int64_t c = 0; c < K; c += 64)
        for (int64_t j = 0; j < 8; ++j)
          for (int64_t t = 0; t < 8; ++t) o[c + 8 * j + t] = kNibbleScale[j] * in[c + 8 * t + (j ^ 1)];
    }
    double lanes[8] = {};  // eight running sums, so that the compiler vectorizes them
    for (int64_t k = 0; k < lined; k += 8)
      for (int64_t l = 0; l < 8; ++l) lanes[l] += in[k + l];
    o[K] = static_cast<float>(offset * std::accumulate(lanes, lanes + 8, 0.0));
  }
  return out;
}

// bits 16: bfloat16 weights, no scale; 8 / 4: the published quantized layout with its scale.
// isa: "avx512" or "avx2", the code path (the caller picks it: model_runtime/native).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias, int64_t bits, c10::string_view isa_name) {
  TORCH_CHECK(bits == 16 || bits == 8 || bits == 4, "bits must be 16, 8 or 4");
  const std::string isa(isa_name);
  TORCH_CHECK(supported(bits, isa), "this CPU cannot run the ", isa, " path at ", bits, " bits");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.is_contiguous() &&
              weight.scalar_type() == (bits == 16 ? at::kBFloat16 : at::kChar),
              "x [M, K] and a contiguous weight (bfloat16 for 16 bits, else int8) expected");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == (bits == 4 ? K / 2 : K), "weight does not match x");
  const int64_t multiple = bits == 16 ? 32 : bits == 8 ? 16 : 64;
  TORCH_CHECK(K % multiple == 0, "K must be a multiple of ", multiple);
  at::Tensor scale32;
  if (bits != 16) {
    TORCH_CHECK(scale.has_value() && scale->defined(), "a quantized weight needs its scale");
    scale32 = scale->to(at::kFloat).contiguous();
    TORCH_CHECK(scale32.numel() == N, "one scale per output row expected");
  }
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    bias32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias32.numel() == N, "one bias per output row expected");
  }
  const float* bias_ptr = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const float* scale_ptr = scale32.defined() ? scale32.data_ptr<float>() : nullptr;
  const bool avx512 = isa == "avx512";
  const at::Tensor xs = activations_for(x, bits, avx512);
  const int64_t stride = xs.numel() / std::max<int64_t>(M, 1);
  const auto* x16 = reinterpret_cast<const uint16_t*>(xs.data_ptr());
  const auto* x32 = reinterpret_cast<const float*>(xs.data_ptr());
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  if (bits == 16) {
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    static const BlockFn<uint16_t, uint16_t> by_group[] = {bf16_block<1>, bf16_block<2>, bf16_block<3>, bf16_block<4>};
    static const BlockFn<float, uint16_t> by_group_avx2[] = {bf16_block_avx2<1>, bf16_block_avx2<2>};
    avx512 ? run_blocks(x16, stride, M, K, w, N, scale_ptr, bias_ptr, o, by_group)
           : run_blocks(x32, stride, M, K, w, N, scale_ptr, bias_ptr, o, by_group_avx2);
  } else if (bits == 8) {
    const int8_t* w = weight.data_ptr<int8_t>();
    static const BlockFn<float, int8_t> by_group[] = {int8_block<1>, int8_block<2>, int8_block<3>, int8_block<4>};
    static const BlockFn<float, int8_t> by_group_avx2[] = {int8_block_avx2<1>, int8_block_avx2<2>};
    avx512 ? run_blocks(x32, stride, M, K, w, N, scale_ptr, bias_ptr, o, by_group)
           : run_blocks(x32, stride, M, K, w, N, scale_ptr, bias_ptr, o, by_group_avx2);
  } else {
    const auto* w = reinterpret_cast<const uint8_t*>(weight.data_ptr());
    static const BlockFn<uint16_t, uint8_t> by_group[] = {int4_block<1>, int4_block<2>, int4_block<3>, int4_block<4>};
    static const BlockFn<float, uint8_t> by_group_avx2[] = {int4_block_avx2<1>, int4_block_avx2<2>};
    avx512 ? run_blocks(x16, stride, M, K, w, N, scale_ptr, bias_ptr, o, by_group)
           : run_blocks(x32, stride, M, K, w, N, scale_ptr, bias_ptr, o, by_group_avx2);
  }
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, int bits, str isa) -> Tensor");
  m.def("linear_supported(int bits, str isa) -> bool",
        [](int64_t bits, c10::string_view isa) { return supported(bits, std::string(isa)); });
}
TORCH_LIBRARY_IMPL(chatglm, CPU, m) { m.impl("linear", &linear); }
