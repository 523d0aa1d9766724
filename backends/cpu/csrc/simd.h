// Vector helpers shared by lcc's native CPU kernels: `lcc::V`, 16 float32 lanes, and the operations the
// kernels use on it, so that each kernel is written once for both instruction sets the library is built for
// (lcc/backends/cpu/native.py): AVX-512F (one zmm register) and AVX2 with FMA (two ymm registers). Every
// operation computes the same IEEE result lane by lane on both (multiply-adds fused where named), and `sum`
// adds the 16 lanes in one tree written out here (sum_halves), so both builds give the same bits whatever
// the compiler. What only AVX-512 has (AVX512-BF16 dot products, AMX tiles) is built where __AVX512F__ is
// defined.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace lcc {

// hi + lo lane by lane, then the 128-bit halves, then pairs 2 apart, then 1: the sum of 16 lanes (`sum`).
inline float sum_halves(__m256 hi, __m256 lo) {
  const __m256 h = _mm256_add_ps(hi, lo);
  const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps(p, p, 1));
}

#if defined(__AVX512F__)

using V = __m512;

inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float a) { return _mm512_set1_ps(a); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c, one rounding
inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
// The lanes' sum in a fixed tree, spelled out rather than left to a compiler's _mm512_reduce_add_ps: lanes
// i + (i + 8), then the 128-bit halves, then pairs 2 apart, then 1 (GCC's own order), on both builds.
inline float sum(V v) {
  return sum_halves(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), _mm512_castps512_ps256(v));
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
// The first n values (n <= 16), the other lanes zero; nothing past them is read.
inline V load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
// The first n lanes stored; nothing past them is written.
inline void store_n(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
// v with the lanes from n on set to zero.
inline V keep_n(V v, int64_t n) { return _mm512_maskz_mov_ps(lanes(n), v); }
// (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)
inline V swap_pairs(V v) { return _mm512_permute_ps(v, 0xB1); }

// v * 2^n for lanes n holding whole numbers in [-150, 128] (the exp below), rounded once.
inline V scale2(V v, V n) { return _mm512_scalef_ps(v, n); }
inline V round_even(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// float32 -> bfloat16 bits in the low half of each lane, rounded to nearest even (finite values)
inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
}

// 16 bfloat16 values as float32 lanes.
inline V load_bf16(const uint16_t* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
// The first n of them (n <= 16), the other lanes zero; nothing past them is read.
inline V load_bf16_n(const uint16_t* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 lanes stored as bfloat16, rounded to nearest even.
inline void store_bf16(uint16_t* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// The 16 columns' int4 codes of one pair of k (16 bytes: code(k) in the low nibble, code(k + 1) in the high
// one) as signed floats, code - 8: vpermps reads only an index's low 4 bits, so a byte's low nibble indexes
// the table directly.
inline void int4_pair(const uint8_t* p, V& lo, V& hi) {
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_permutexvar_ps(v, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

#else  // AVX2 and FMA: the 16 lanes in two ymm registers, lanes 0-7 in lo

struct V {
  __m256 lo, hi;
};

inline V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, V v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V sub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V div(V a, V b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V vmin(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V fnmadd(V a, V b, V c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline float sum(V v) { return sum_halves(v.hi, v.lo); }  // the AVX-512 build's tree

inline V load_n(const float* p, int64_t n) {
  float buf[16] = {0};
  memcpy(buf, p, (size_t)(n < 16 ? n : 16) * sizeof(float));
  return load(buf);
}
inline void store_n(float* p, V v, int64_t n) {
  float buf[16];
  store(buf, v);
  memcpy(p, buf, (size_t)(n < 16 ? n : 16) * sizeof(float));
}
inline V keep_n(V v, int64_t n) {
  const __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i limit = _mm256_set1_epi32((int)(n < 16 ? n : 16));
  const __m256 lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, at));
  const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, _mm256_add_epi32(at, _mm256_set1_epi32(8))));
  return {_mm256_and_ps(v.lo, lo), _mm256_and_ps(v.hi, hi)};
}
inline V swap_pairs(V v) { return {_mm256_permute_ps(v.lo, 0xB1), _mm256_permute_ps(v.hi, 0xB1)}; }

// v * 2^n in two exact steps of at most 2^±75 each (each a normal power of two), so that only the last one
// rounds, as AVX-512's vscalefps rounds once.
inline __m256 scale2_half(__m256 v, __m256 n) {
  const __m256i e = _mm256_cvtps_epi32(n);
  const __m256i a = _mm256_srai_epi32(e, 1), b = _mm256_sub_epi32(e, a);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
  const __m256 pb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(v, pa), pb);
}
inline V scale2(V v, V n) { return {scale2_half(v.lo, n.lo), scale2_half(v.hi, n.hi)}; }
inline V round_even(V v) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(v.lo, mode), _mm256_round_ps(v.hi, mode)};
}

inline __m256 widen_bf16(__m128i h) {  // 8 bfloat16 values as float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V load_bf16(const uint16_t* p) {
  return {widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline V load_bf16_n(const uint16_t* p, int64_t n) {
  uint16_t buf[16] = {0};
  memcpy(buf, p, (size_t)(n < 16 ? n : 16) * sizeof(uint16_t));
  return load_bf16(buf);
}
inline __m256i bf16_bits_half(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
}
inline void store_bf16(uint16_t* p, V v) {
  // packus interleaves the 128-bit halves (lo 0-3, hi 0-3, lo 4-7, hi 4-7): put them back in order
  const __m256i packed = _mm256_packus_epi32(bf16_bits_half(v.lo), bf16_bits_half(v.hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}

// The nibbles of all 16 bytes at once as signed bytes (code - 8), then 8 at a time widened and converted.
inline V signed_bytes(__m128i codes) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8)))};
}
inline void int4_pair(const uint8_t* p, V& lo, V& hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nibble = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  lo = signed_bytes(_mm_sub_epi8(_mm_and_si128(bytes, nibble), eight));
  hi = signed_bytes(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), eight));
}

#endif

// e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by the classic degree-5 polynomial
// (Cephes expf), then scaled by 2^n; within 1 ulp of the correctly rounded e^x over [-87, 87].
inline V exp_ps(V x) {
  x = vmax(vmin(x, set1(88.7f)), set1(-104.0f));
  const V n = round_even(mul(x, set1(1.44269504088896341f)));
  V r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  V p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return scale2(p, n);
}

inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {  // n a multiple of 16
  for (int64_t j = 0; j < n; j += 16) store_bf16(dst + j, load(src + j));
}

inline void from_bf16(const uint16_t* src, float* dst, int64_t n) {  // n a multiple of 16
  for (int64_t j = 0; j < n; j += 16) store(dst + j, load_bf16(src + j));
}

// 16 bfloat16 or float32 values as float32 lanes.
inline V load16(const void* src, bool bf16) {
  return bf16 ? load_bf16(static_cast<const uint16_t*>(src)) : load(static_cast<const float*>(src));
}

// The first n (n <= 16) of them, the other lanes zero; nothing past them is read.
inline V load16_n(const void* src, bool bf16, int64_t n) {
  return bf16 ? load_bf16_n(static_cast<const uint16_t*>(src), n) : load_n(static_cast<const float*>(src), n);
}

// 16 float32 lanes stored as bfloat16 (rounded to nearest even) or float32.
inline void store16(void* dst, V v, bool bf16) {
  if (bf16) {
    store_bf16(static_cast<uint16_t*>(dst), v);
  } else {
    store(static_cast<float*>(dst), v);
  }
}

}  // namespace lcc
