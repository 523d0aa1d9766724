// Vector helpers shared by lcc's native CPU kernels (AVX-512F).
#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace lcc {

// float32 -> bfloat16 bits in the low half of each lane, rounded to nearest even (finite values)
inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
}

// e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by the classic degree-5 polynomial
// (Cephes expf), then scaled by 2^n; within 1 ulp of the correctly rounded e^x over [-87, 87].
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {  // n a multiple of 16
  for (int64_t j = 0; j < n; j += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(src + j))));
  }
}

inline void from_bf16(const uint16_t* src, float* dst, int64_t n) {  // n a multiple of 16
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j)));
    _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
}

// The float32 values of n bfloat16 or float32 values (n a multiple of 16).
inline void to_float(const void* src, bool bf16, float* dst, int64_t n) {
  if (bf16) {
    from_bf16(static_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(dst + j, _mm512_loadu_ps(static_cast<const float*>(src) + j));
  }
}

// 16 bfloat16 or float32 values as float32 lanes.
inline __m512 load16(const void* src, bool bf16) {
  if (bf16) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(src)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(src));
}

// 16 float32 lanes stored as bfloat16 (rounded to nearest even) or float32.
inline void store16(void* dst, __m512 v, bool bf16) {
  if (bf16) {
    _mm256_storeu_si256(static_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(bf16_bits(v)));
  } else {
    _mm512_storeu_ps(static_cast<float*>(dst), v);
  }
}

}  // namespace lcc
