// lcc's CPU int4 expert kernel: y = x @ W_e^T for every expert's contiguous segment of rows, from packed
// int4 weights, dequantised tile by tile in registers (never a whole expert). Built at first use by
// lcc/backends/cpu/native.py (g++ -O3, AVX-512F, AMX-BF16 when the compiler takes it; or AVX2 with FMA),
// called as torch.ops.lcc operators (ops.cpp).
//
// Weights of one expert `[N out, K in]`, group size g (even, divides K), N a multiple of 16, in column tiles
// of 16 outputs:
//   codes  uint8 [N/16][K/2][16]: byte j of (tile t, pair p) = code(t*16+j, 2p) | code(t*16+j, 2p+1) << 4
//   scales float [N/16][K/g][16]; for asymmetric weights shifts likewise, (8 - zero point) * scale, so that
//   w = (code - 8) * scale + shift is lcc's reference value (code - zero point) * scale.
// Experts follow each other in each array.
//
// Paths, chosen per expert:
//   FMA (AVX-512F, or AVX2): 16 columns x up to 12 rows (AVX2: 4) in registers. The codes become (code - 8)
//     as floats (simd.h's int4_pair), each pair of k once per block of rows; per scale group the products
//     with x sum in float32, then the group's scale (and shift, times the group's sum of x) applies: float32
//     throughout, the same bits on both instruction sets.
//   Dot products (AVX512-BF16 builds, bfloat16 activations where the CPU has it): dp_block below.
//   AMX (bfloat16 activations, segments of at least amx_min_rows rows): 32 columns of the expert dequantised
//     into a bfloat16 tile buffer (rounded to nearest even), then 16-row blocks through tile dot products
//     accumulating in float32. Rows stay independent: a row's result does not depend on the others.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <array>
#include <utility>
#include <vector>

#include "kernels.h"
#include "simd.h"
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using namespace lcc;

// Rows per block (the unit that decides how a row's products are summed: below), and per register block
// inside it: AVX-512's 32 registers hold 12 rows' accumulators and partial sums, AVX2's 16 (two per V) hold 4.
constexpr int kBlock = 12;
#if defined(__AVX512F__)
constexpr int kRows = 12;
#else
constexpr int kRows = 4;
#endif

// out[R rows, 16 columns] = x @ w for one column tile. Per scale group, sum x * (code - 8) in float32, then
// scale: w = (code - 8) * scale + shift, shift = (8 - zero point) * scale for asymmetric weights (ze, with the
// rows' sums of x per group in xs), none for symmetric ones (ze null). With few rows the products go into C
// independent sums per row (pairs of k taken in turn), so that no sum waits on the previous product: with one
// chain of dependent FMAs per row, a decode step's few rows are bound by the FMA's latency.
template <int R, int C>
void fma_block(const float* x, int64_t ldx, const float* xs, int64_t ldxs, const uint8_t* codes, const float* sc,
               const float* ze, int K, int g, float* out, int64_t ldo) {
  V acc[R], part[C][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = zero();
  for (int k0 = 0; k0 < K; k0 += g) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) part[j][r] = zero();
    for (int kc = k0; kc < k0 + g; kc += 2 * C) {
#pragma GCC unroll 4
      for (int j = 0; j < C; ++j) {
        const int k = kc + 2 * j;
        if ((k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + K * 8 + k * 8), _MM_HINT_T0);
        V c0, c1;
        int4_pair(codes + k * 8, c0, c1);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          part[j][r] = fmadd(set1(x[r * ldx + k]), c0, part[j][r]);
          part[j][r] = fmadd(set1(x[r * ldx + k + 1]), c1, part[j][r]);
        }
      }
    }
    const V s = load(sc + (k0 / g) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      V total = part[0][r];
#pragma GCC unroll 4
      for (int j = 1; j < C; ++j) total = add(total, part[j][r]);
      acc[r] = fmadd(total, s, acc[r]);
    }
    if (ze) {
      const V z = load(ze + (k0 / g) * 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = fmadd(set1(xs[r * ldxs + k0 / g]), z, acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) store(out + r * ldo, acc[r]);
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, const uint8_t*, const float*, const float*,
                         int, int, float*, int64_t);
template <int... R>
constexpr std::array<BlockFn, kRows + 1> fma_blocks(std::integer_sequence<int, R...>) {
  return {nullptr, fma_block<R + 1, 1>...};
}
constexpr std::array<BlockFn, kRows + 1> kFmaBlocks = fma_blocks(std::make_integer_sequence<int, kRows>{});
// Few rows, scale groups of a multiple of 8: four sums per row (one or two rows) or two (three or four rows).
const BlockFn kFewRows[5] = {nullptr, fma_block<1, 4>, fma_block<2, 4>, fma_block<3, 2>, fma_block<4, 2>};

// A block of rows takes the few-row sums when it has at most 4 rows (and groups of a multiple of 8); blocks are
// cut at kBlock rows on both builds, so that a row's number of sums, and so its bits, is the same on both.
inline bool few_rows(int64_t rows, int g) { return rows <= 4 && g % 8 == 0; }

#if defined(__AVX512F__)

// The signed codes (code - 8) as bfloat16 in words 0-15 (and again in 16-31): vpermw reads an index's low 5
// bits, and the indices below are nibbles.
inline __m512i signed_codes_bf16() {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const float f = static_cast<float>((i & 15) - 8);
    uint32_t b;
    memcpy(&b, &f, 4);
    t[i] = static_cast<uint16_t>(b >> 16);  // exact: small integers
  }
  return _mm512_load_si512(t);
}

// As fma_block for bfloat16 rows of x (ldx in elements), where the CPU has AVX512-BF16: a pair of k's codes
// become two bfloat16 values in each column's 32-bit lane (one vpermw for 32 weights) and meet the pair
// (x[k], x[k+1]) in one vdpbf16ps, half fma_block's instructions per weight (measured 1.3x at one or two
// rows, 1.5x at four, one thread). The products of a bfloat16 value and a small integer are exact in float32;
// only the order of the sums differs from fma_block.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dp_block(const uint16_t* x, int64_t ldx, const float* xs, int64_t ldxs, const uint8_t* codes, const float* sc,
              const float* ze, int K, int g, float* out, int64_t ldo) {
  __m512 acc[R], part[C][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i table = signed_codes_bf16();
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  for (int k0 = 0; k0 < K; k0 += g) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) part[j][r] = _mm512_setzero_ps();
    for (int kc = k0; kc < k0 + g; kc += 2 * C) {
#pragma GCC unroll 4
      for (int j = 0; j < C; ++j) {
        const int k = kc + 2 * j;
        if ((k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + K * 8 + k * 8), _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * 8)));
        // (v | v << 12) & 0x000F000F: the low word the code of k, the high word the code of k + 1
        const __m512i idx = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), nibbles, 0xA8);
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, table);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          memcpy(&pair, x + r * ldx + k, 4);
          part[j][r] = _mm512_dpbf16_ps(part[j][r], (__m512bh)_mm512_set1_epi32(pair), w);
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(sc + (k0 / g) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 sum = part[0][r];
#pragma GCC unroll 4
      for (int j = 1; j < C; ++j) sum = _mm512_add_ps(sum, part[j][r]);
      acc[r] = _mm512_fmadd_ps(sum, s, acc[r]);
    }
    if (ze) {
      const __m512 z = _mm512_loadu_ps(ze + (k0 / g) * 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * ldxs + k0 / g]), z, acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

using DpFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, const float*, const float*,
                      int, int, float*, int64_t);
const DpFn kDpBlocks[kBlock + 1] = {nullptr,         dp_block<1, 1>,  dp_block<2, 1>,  dp_block<3, 1>,
                                   dp_block<4, 1>,  dp_block<5, 1>,  dp_block<6, 1>,  dp_block<7, 1>,
                                   dp_block<8, 1>,  dp_block<9, 1>,  dp_block<10, 1>, dp_block<11, 1>,
                                   dp_block<12, 1>};
const DpFn kDpFewRows[5] = {nullptr, dp_block<1, 4>, dp_block<2, 4>, dp_block<3, 2>, dp_block<4, 2>};

inline DpFn dp_for(int64_t rows, int g) { return few_rows(rows, g) ? kDpFewRows[rows] : kDpBlocks[rows]; }
#endif

#if defined(LCC_AMX)
// 16 columns x K dequantised into AMX's pair layout: row p holds (w[j][2p], w[j][2p+1]) for j = 0..15.
void dequant_pairs(const uint8_t* codes, const float* sc, const float* ze, int K, int g, uint32_t* dst) {
  for (int k0 = 0; k0 < K; k0 += g) {
    const __m512 s = _mm512_loadu_ps(sc + (k0 / g) * 16);
    const __m512 z = ze ? _mm512_loadu_ps(ze + (k0 / g) * 16) : _mm512_setzero_ps();
    for (int k = k0; k < k0 + g; k += 2) {
      __m512 c0, c1;
      int4_pair(codes + k * 8, c0, c1);
      const __m512i a = bf16_bits(_mm512_fmadd_ps(c0, s, z));
      const __m512i b = bf16_bits(_mm512_fmadd_ps(c1, s, z));
      _mm512_storeu_si512(dst + k * 8, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void amx_configure() {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// out[rows, 32] (float32, stride ldo) = a[rows, K] (bfloat16, rows padded to a multiple of 16) @ (b0 | b1)
void amx_columns(const uint16_t* a, int64_t rows, const uint32_t* b0, const uint32_t* b1, int K, float* out,
                 int64_t ldo, float* spill) {
  const int64_t lda = K * 2;  // bytes
  int64_t r = 0;
  for (; r + 32 <= rows; r += 32) {  // two row blocks x two column tiles: four independent accumulators
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int kb = 0; kb < K / 32; ++kb) {
      _tile_loadd(0, a + r * K + kb * 32, lda);
      _tile_loadd(1, a + (r + 16) * K + kb * 32, lda);
      _tile_loadd(2, b0 + kb * 256, 64);
      _tile_loadd(3, b1 + kb * 256, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
    _tile_stored(4, out + r * ldo, ldo * 4);
    _tile_stored(5, out + r * ldo + 16, ldo * 4);
    _tile_stored(6, out + (r + 16) * ldo, ldo * 4);
    _tile_stored(7, out + (r + 16) * ldo + 16, ldo * 4);
  }
  for (; r < rows; r += 16) {
    const int64_t n = rows - r < 16 ? rows - r : 16;
    _tile_zero(4);
    _tile_zero(5);
    for (int kb = 0; kb < K / 32; ++kb) {
      _tile_loadd(0, a + r * K + kb * 32, lda);
      _tile_loadd(2, b0 + kb * 256, 64);
      _tile_loadd(3, b1 + kb * 256, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
    }
    if (n == 16) {
      _tile_stored(4, out + r * ldo, ldo * 4);
      _tile_stored(5, out + r * ldo + 16, ldo * 4);
    } else {  // the padding rows' results go nowhere
      _tile_stored(4, spill, 128);
      _tile_stored(5, spill + 16, 128);
      for (int64_t i = 0; i < n; ++i) memcpy(out + (r + i) * ldo, spill + i * 32, 32 * sizeof(float));
    }
  }
}
#endif

// h = silu(gate) * up over n values (n a multiple of 16)
void swiglu_row(const float* gate, const float* up, float* h, int64_t n) {
  const V one = set1(1.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const V g = load(gate + j);
    const V s = lcc::div(g, add(one, exp_ps(sub(zero(), g))));
    store(h + j, mul(s, load(up + j)));
  }
}

// h rounded to bfloat16 (nearest even) into hb, and h set to the rounded values (n values, any n).
void round_bf16_row(float* h, uint16_t* hb, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t b;
    memcpy(&b, h + j, 4);
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    hb[j] = static_cast<uint16_t>(b);
    b <<= 16;
    memcpy(h + j, &b, 4);
  }
}

// One expert stack's weights.
struct Weights {
  const uint8_t* codes;
  const float* scales;
  const float* shifts;  // null for symmetric weights
  int N, K, g;
};

// Whether a projection can run on AMX: the build has it, whole 32-wide k blocks and 32-column items.
inline bool amx_shape(const Weights& w) {
#if defined(LCC_AMX)
  return w.K % 32 == 0 && w.N % 32 == 0;
#else
  (void)w;
  return false;
#endif
}

// The rows of x by expert: which experts have rows, where each segment starts, and for the AMX experts
// where their zero-padded bfloat16 copy starts.
struct Segments {
  std::vector<int64_t> starts, active, padded;
  int64_t padded_rows = 0;

  Segments(const int64_t* counts, int E, bool amx, int amx_min_rows) : starts(E + 1, 0) {
    for (int e = 0; e < E; ++e) {
      starts[e + 1] = starts[e] + counts[e];
      if (!counts[e]) continue;
      active.push_back(e);
      const bool on_amx = amx && counts[e] >= amx_min_rows;
      padded.push_back(on_amx ? padded_rows : -1);
      if (on_amx) padded_rows += (counts[e] + 15) / 16 * 16;
    }
  }
  int64_t rows() const { return starts.back(); }
};

// A projection's work items: (active expert index, column tile); AMX items take 32 columns, others 16.
struct Items {
  std::vector<int64_t> a, t;
  Items(const Segments& seg, const Weights& w) {
    for (size_t i = 0; i < seg.active.size(); ++i) {
      const bool on_amx = amx_shape(w) && seg.padded[i] >= 0;
      for (int c = 0; c < w.N / 16; c += on_amx ? 2 : 1) {
        a.push_back(on_amx ? -1 - (int64_t)i : (int64_t)i);
        t.push_back(c);
      }
    }
  }
  int64_t size() const { return (int64_t)a.size(); }
};

// Per-thread state of the AMX path: tiles configured once, a buffer for 32 dequantised columns.
struct AmxState {
  std::vector<uint32_t> pairs;
  float spill[16 * 32];
  bool configured = false;
  ~AmxState() {
#if defined(LCC_AMX)
    if (configured) _tile_release();
#endif
  }
};

// A projection's input: x [S, K] float32, its rows' sums per scale group [S, K / g] (asymmetric weights
// only), the AMX experts' rows as padded bfloat16, and x as bfloat16 [S, K] where the items not on AMX take
// the AVX512-BF16 path (null: the float32 one).
struct Input {
  const float* x;
  const float* sums;
  const uint16_t* xb;
  const uint16_t* xbf = nullptr;
};

// Item i of a projection: out[rows of the expert, its columns] = x @ w. Called inside a parallel region.
void run_item(const Segments& seg, const Items& items, int64_t i, const Weights& w, const Input& in, float* out,
              AmxState& amx) {
  const bool on_amx = items.a[i] < 0;
  const int64_t a = on_amx ? -1 - items.a[i] : items.a[i];
  const int64_t e = seg.active[a], t = items.t[i], r0 = seg.starts[e], rows = seg.starts[e + 1] - r0;
  const int K = w.K, N = w.N, g = w.g;
  const int64_t codes_e = (int64_t)N * K / 2, groups_e = (int64_t)N * (K / g);
  const uint8_t* c = w.codes + e * codes_e + t * (K / 2) * 16;
  const float* s = w.scales + e * groups_e + t * (K / g) * 16;
  const float* z = w.shifts ? w.shifts + e * groups_e + t * (K / g) * 16 : nullptr;
#if defined(LCC_AMX)
  if (on_amx) {
    if (!amx.configured) {
      amx_configure();
      amx.configured = true;
    }
    amx.pairs.resize((size_t)K * 16);
    uint32_t* b1 = amx.pairs.data() + (size_t)K * 8;
    dequant_pairs(c, s, z, K, g, amx.pairs.data());
    dequant_pairs(c + (K / 2) * 16, s + (K / g) * 16, z ? z + (K / g) * 16 : nullptr, K, g, b1);
    amx_columns(in.xb + seg.padded[a] * K, rows, amx.pairs.data(), b1, K, out + r0 * N + t * 16, N, amx.spill);
    return;
  }
#else
  (void)amx;
#endif
  for (int64_t r = 0; r < rows; r += kBlock) {
    const int64_t n = rows - r < kBlock ? rows - r : kBlock;
    const float* sums = in.sums ? in.sums + (r0 + r) * (K / g) : nullptr;
#if defined(__AVX512F__)
    if (in.xbf) {
      dp_for(n, g)(in.xbf + (r0 + r) * K, K, sums, K / g, c, s, z, K, g, out + (r0 + r) * N + t * 16, N);
      continue;
    }
#endif
    if (few_rows(n, g)) {
      kFewRows[n](in.x + (r0 + r) * K, K, sums, K / g, c, s, z, K, g, out + (r0 + r) * N + t * 16, N);
      continue;
    }
    for (int64_t q = 0; q < n; q += kRows) {  // one register block on AVX-512, up to three on AVX2
      const int64_t m = n - q < kRows ? n - q : kRows;
      kFmaBlocks[m](in.x + (r0 + r + q) * K, K, sums ? sums + q * (K / g) : nullptr, K / g, c, s, z, K, g,
                    out + (r0 + r + q) * N + t * 16, N);
    }
  }
}

// Each row's sums of src [S, w.K] per scale group, for asymmetric weights. Inside a parallel region.
void group_sums(const Weights& w, const float* src, int64_t S, float* dst) {
  if (!w.shifts) return;
  const int groups = w.K / w.g;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < S; ++r) {
    for (int q = 0; q < groups; ++q) {
      float total = 0;
      for (int k = 0; k < w.g; ++k) total += src[r * w.K + q * w.g + k];
      dst[r * groups + q] = total;
    }
  }
}

// Rows of src (float32, w.K wide) into the padded bfloat16 copy of the AMX experts. Inside a parallel region.
void pad_bf16(const Segments& seg, const Weights& w, const float* src, uint16_t* dst) {
  if (!amx_shape(w) || !seg.padded_rows) return;
  const int K = w.K;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < (int64_t)seg.active.size(); ++i) {
    if (seg.padded[i] < 0) continue;
    const int64_t e = seg.active[i], rows = seg.starts[e + 1] - seg.starts[e];
    uint16_t* d = dst + seg.padded[i] * K;
    to_bf16(src + seg.starts[e] * K, d, rows * K);
    memset(d + rows * K, 0, (size_t)((rows + 15) / 16 * 16 - rows) * K * sizeof(uint16_t));
  }
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace


extern "C" {

// 1 when this build has the AMX path.
int lcc_int4_has_amx() {
#if defined(LCC_AMX)
  return 1;
#else
  return 0;
#endif
}

// out[i] = e^x[i] for n float32 values by exp_ps, the SwiGLU activation's exp: its accuracy is checked
// through this entry point (tests/serve/test_int4_native.py).
void lcc_exp(const float* x, float* out, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) store_n(out + j, exp_ps(load_n(x + j, n - j)), n - j);
}

// Asks Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 0 on success.
int lcc_int4_amx_init() {
#if defined(LCC_AMX) && defined(__linux__)
  return (int)syscall(SYS_arch_prctl, 0x1023, 18);
#else
  return -1;
#endif
}

// out [S, N] float32 = x [S, K] float32, each expert's rows (counts[e] of them, in expert order) times its
// weights [N, K]. Experts with at least amx_min_rows rows (0: none) run on AMX with x rounded to bfloat16.
void lcc_int4_matmul(const float* x, const int64_t* counts, int E, const uint8_t* codes, const float* scales,
                     const float* shifts, int N, int K, int g, float* out, int threads, int amx_min_rows) {
  const Weights w{codes, scales, shifts, N, K, g};
  const Segments seg(counts, E, amx_min_rows > 0, amx_min_rows);
  const Items items(seg, w);
  thread_local std::vector<uint16_t> xb;
  thread_local std::vector<float> sums;
  float* sums_data = grow(sums, (size_t)seg.rows() * (K / g));
  uint16_t* xb_data = grow(xb, (size_t)seg.padded_rows * K);
  const Input in{x, sums_data, xb_data};
#pragma omp parallel num_threads(threads)
  {
    AmxState amx;
    group_sums(w, x, seg.rows(), sums_data);
    pad_bf16(seg, w, x, xb_data);
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < items.size(); ++i) run_item(seg, items, i, w, in, out, amx);
  }
}

// The experts' SwiGLU: out [S, D] = (silu(x W1^T) * (x W3^T)) W2^T per expert segment, x [S, D] and out in
// bfloat16 (bf16 != 0) or float32. w13 holds W1 and W3 stacked along the outputs ([2F, D]), w2 is [D, F].
// Between the projections everything is float32. amx_min_rows as in lcc_int4_matmul.
void lcc_int4_swiglu(const void* x, const int64_t* counts, int E, int bf16, const uint8_t* codes13,
                     const float* scales13, const float* shifts13, const uint8_t* codes2, const float* scales2,
                     const float* shifts2, int D, int F, int g, void* out, int threads, int amx_min_rows,
                     int dot_products) {
  const Weights w13{codes13, scales13, shifts13, 2 * F, D, g}, w2{codes2, scales2, shifts2, D, F, g};
  const Segments seg(counts, E, amx_min_rows > 0, amx_min_rows);
  const Items up(seg, w13), down(seg, w2);
  const int64_t S = seg.rows();
  thread_local std::vector<float> xf_buf, gu_buf, h_buf, y_buf, xs_buf, hs_buf;
  thread_local std::vector<uint16_t> xb_buf, hb_buf, hbf_buf;
  float* xf_bf16 = bf16 ? grow(xf_buf, (size_t)S * D) : nullptr;
  const float* xf = bf16 ? xf_bf16 : static_cast<const float*>(x);
  float* gu = grow(gu_buf, (size_t)S * 2 * F);
  float* h = grow(h_buf, (size_t)S * F);
  float* y = bf16 ? grow(y_buf, (size_t)S * D) : static_cast<float*>(out);
  uint16_t* xb = grow(xb_buf, (size_t)seg.padded_rows * D);
  uint16_t* hb = grow(hb_buf, (size_t)seg.padded_rows * F);
  float* xs = grow(xs_buf, (size_t)S * (D / g));
  float* hs = grow(hs_buf, (size_t)S * (F / g));
  // bfloat16 activations on a CPU with AVX512-BF16: the items not on AMX take the dot-product path, and the
  // activation between the projections is rounded to bfloat16 (as AMX and PyTorch's bfloat16 experts round it)
#if defined(__AVX512F__)
  const bool dp = bf16 && dot_products;
#else
  const bool dp = false;  // no dot-product path in an AVX2 build (ops.cpp refuses to ask for it)
  (void)dot_products;
#endif
  uint16_t* hbf = dp ? grow(hbf_buf, (size_t)S * F) : nullptr;
  const Input x_in{xf, xs, xb, dp ? static_cast<const uint16_t*>(x) : nullptr}, h_in{h, hs, hb, hbf};
#pragma omp parallel num_threads(threads)
  {
    AmxState amx;
    if (bf16) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < S; ++r) from_bf16(static_cast<const uint16_t*>(x) + r * D, xf_bf16 + r * D, D);
    }
    group_sums(w13, xf, S, xs);
    pad_bf16(seg, w13, xf, xb);
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < up.size(); ++i) run_item(seg, up, i, w13, x_in, gu, amx);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < S; ++r) {
      swiglu_row(gu + r * 2 * F, gu + r * 2 * F + F, h + r * F, F);
      if (dp) round_bf16_row(h + r * F, hbf + r * F, F);
    }
    group_sums(w2, h, S, hs);
    pad_bf16(seg, w2, h, hb);
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < down.size(); ++i) run_item(seg, down, i, w2, h_in, y, amx);
    if (bf16) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < S; ++r) to_bf16(y + r * D, static_cast<uint16_t*>(out) + r * D, D);
    }
  }
}

}  // extern "C"
