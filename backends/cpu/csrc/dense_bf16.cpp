// lcc's CPU kernel for serving's dense projections at decode sizes: y [M, N] = x [M, K] W[N, K]^T with x, W
// and y in bfloat16, products summed in float32, y rounded once to nearest even. Built for few rows (a decode
// step's tokens), where a GEMM library's blocking costs more than reading W: each weight row is read once
// from memory for all M rows, 4 weight rows at a time against up to 4 rows of x (16 float32 accumulators),
// each weight row read through before the next (in memory order: measured 1.7-2x the bandwidth of reading
// the 4 rows side by side when rows are 1 KiB), 2 KiB ahead prefetched, its products summed in 4 chains. The caller splits the blocks of 4 weight rows over threads (ops.cpp: PyTorch's
// own thread pool, whose threads the step's other operators keep awake).
// Two paths, chosen at run time: AVX512-BF16 (`vdpbf16ps`, pairs of bfloat16 products summed into float32
// lanes) where the CPU has it and the build is AVX-512's, else FMA (each half of 32 bfloat16 values widened
// to float32; AVX-512F or AVX2, the same bits).
// Built with the other kernels into one library (lcc/backends/cpu/native.py).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "kernels.h"
#include "simd.h"

namespace {

constexpr int kCols = 4;  // weight rows per block
constexpr int kRows = 4;  // rows of x per block
constexpr int kAhead = 1024;  // weight elements (2 KiB) prefetched ahead of the ones read

inline uint16_t round_bf16(float v) {
  uint32_t b;
  memcpy(&b, &v, 4);
  return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// acc[r] += x[r, k:k+n] . row[k:k+n] for the R rows of x (n <= 32; lanes past it read nothing and add
// zero), the FMA path: each half of 32 bfloat16 values widened to float32.
template <int R>
inline void step_fma(const uint16_t* x, int K, const uint16_t* row, int k, int n, lcc::V* acc) {
  if (n >= 32) {
    const lcc::V lo = lcc::load_bf16(row + k), hi = lcc::load_bf16(row + k + 16);
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = x + (int64_t)r * K + k;
      acc[r] = lcc::fmadd(lcc::load_bf16(xr), lo, acc[r]);
      acc[r] = lcc::fmadd(lcc::load_bf16(xr + 16), hi, acc[r]);
    }
    return;
  }
  const int n_hi = n > 16 ? n - 16 : 0;
  const lcc::V lo = lcc::load_bf16_n(row + k, n), hi = lcc::load_bf16_n(row + k + 16, n_hi);
  for (int r = 0; r < R; ++r) {
    const uint16_t* xr = x + (int64_t)r * K + k;
    acc[r] = lcc::fmadd(lcc::load_bf16_n(xr, n), lo, acc[r]);
    acc[r] = lcc::fmadd(lcc::load_bf16_n(xr + 16, n_hi), hi, acc[r]);
  }
}

#if defined(__AVX512F__)
// The same with AVX512-BF16's dot products: pairs of bfloat16 products summed into float32 lanes.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void
step_dp(const uint16_t* x, int K, const uint16_t* row, int k, int n, lcc::V* acc) {
  const __mmask32 m = n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
  const __m512i wv = _mm512_maskz_loadu_epi16(m, row + k);
  for (int r = 0; r < R; ++r) {
    const __m512i xs = _mm512_maskz_loadu_epi16(m, x + (int64_t)r * K + k);
    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)xs, (__m512bh)wv);
  }
}
#define LCC_DENSE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define LCC_DENSE_TARGET
#endif

template <int R, bool BF16DP>
LCC_DENSE_TARGET inline void step(const uint16_t* x, int K, const uint16_t* row, int k, int n, lcc::V* acc) {
#if defined(__AVX512F__)
  if constexpr (BF16DP) {
    step_dp<R>(x, K, row, k, n, acc);
    return;
  }
#endif
  step_fma<R>(x, K, row, k, n, acc);
}

template <int R, bool BF16DP>
LCC_DENSE_TARGET void block(const uint16_t* x, int K, const uint16_t* w, int n, int cols, uint16_t* y, int N) {
  for (int c = 0; c < cols; ++c) {  // the block's weight rows one after another: the reads follow memory
    const uint16_t* row = w + (int64_t)(n + c) * K;
    // four independent sums per row of x (k in steps of 32, taken in turn), so no sum waits on the last product
    lcc::V a0[R], a1[R], a2[R], a3[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = a2[r] = a3[r] = lcc::zero();
    int k = 0;
    for (; k + 128 <= K; k += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kAhead + 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kAhead + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kAhead + 96), _MM_HINT_T0);
      step<R, BF16DP>(x, K, row, k, 32, a0);
      step<R, BF16DP>(x, K, row, k + 32, 32, a1);
      step<R, BF16DP>(x, K, row, k + 64, 32, a2);
      step<R, BF16DP>(x, K, row, k + 96, 32, a3);
    }
    for (; k < K; k += 32) step<R, BF16DP>(x, K, row, k, K - k, a0);
    for (int r = 0; r < R; ++r) {
      const lcc::V total = lcc::add(lcc::add(a0[r], a1[r]), lcc::add(a2[r], a3[r]));
      y[(int64_t)r * N + n + c] = round_bf16(lcc::sum(total));
    }
  }
}

template <bool BF16DP>
void rows_block(const uint16_t* x, int rows, int K, const uint16_t* w, int n, int cols, uint16_t* y, int N) {
  switch (rows) {
    case 1: block<1, BF16DP>(x, K, w, n, cols, y, N); break;
    case 2: block<2, BF16DP>(x, K, w, n, cols, y, N); break;
    case 3: block<3, BF16DP>(x, K, w, n, cols, y, N); break;
    default: block<4, BF16DP>(x, K, w, n, cols, y, N); break;
  }
}

template <bool BF16DP>
void run(const uint16_t* x, int64_t M, int K, const uint16_t* w, int N, uint16_t* y, int64_t first, int64_t last) {
  for (int64_t b = first; b < last; ++b) {
    const int n = (int)(b * kCols), cols = std::min(kCols, N - n);
    for (int64_t r = 0; r < M; r += kRows) {
      rows_block<BF16DP>(x + r * K, (int)std::min<int64_t>(kRows, M - r), K, w, n, cols, y + r * N, N);
    }
  }
}

}  // namespace

extern "C" {

// An AVX2 build has no dot-product path, whatever the CPU.
int lcc_has_avx512_bf16() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
  return 0;
#endif
}

void lcc_bf16_linear(const uint16_t* x, int64_t M, int K, const uint16_t* w, int N, uint16_t* y, int dot_products,
                     int64_t first, int64_t last) {
#if defined(__AVX512F__)
  if (dot_products) {
    run<true>(x, M, K, w, N, y, first, last);
    return;
  }
#else
  (void)dot_products;  // no dot-product path in an AVX2 build (ops.cpp refuses to ask for it)
#endif
  run<false>(x, M, K, w, N, y, first, last);
}

}  // extern "C"
