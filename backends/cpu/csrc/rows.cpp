// Row-wise kernels of a serve step, each one call where PyTorch needs several small operators: RMS norm (of a
// model's width, or of each head), the sort of routed slots by expert, and the gate-weighted combine of the
// experts' outputs. Each rounds where the reference ops round (lcc.ops.rms_norm, lcc.model.moe.combine), so
// that they differ from them only in the order of a row's sum of squares. Built with the other kernels into
// one library (lcc/backends/cpu/native.py).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16(float f) {  // nearest even, as PyTorch rounds (finite values; NaN stays NaN)
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}


}  // namespace

extern "C" {

void lcc_rms_norm(const void* x, int64_t rows, int D, const void* weight, float eps, int bf16, void* out,
                  int64_t first, int64_t last) {
  (void)rows;
  const int64_t size = bf16 ? 2 : 4;
  for (int64_t r = first; r < last; ++r) {
    const char* xr = static_cast<const char*>(x) + r * D * size;
    lcc::V acc = lcc::zero();
    for (int64_t j = 0; j < D; j += 16) {
      const lcc::V v = lcc::load16_n(xr + j * size, bf16, D - j);
      acc = lcc::fmadd(v, v, acc);
    }
    const float scale = 1.0f / sqrtf(lcc::sum(acc) / static_cast<float>(D) + eps);
    char* orow = static_cast<char*>(out) + r * D * size;
    for (int64_t j = 0; j < D; ++j) {  // (x * rsqrt(...)) rounded to x's dtype, then times the weight
      if (bf16) {
        const float t = bf16_to_float(float_to_bf16(bf16_to_float(reinterpret_cast<const uint16_t*>(xr)[j]) * scale));
        reinterpret_cast<uint16_t*>(orow)[j] =
            float_to_bf16(t * bf16_to_float(static_cast<const uint16_t*>(weight)[j]));
      } else {
        reinterpret_cast<float*>(orow)[j] = reinterpret_cast<const float*>(xr)[j] * scale *
                                            static_cast<const float*>(weight)[j];
      }
    }
  }
}

void lcc_silu_mul_bf16(uint16_t* gate, const uint16_t* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = bf16_to_float(gate[i]);
    const float s = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
    gate[i] = float_to_bf16(s * bf16_to_float(up[i]));
  }
}

void lcc_sort_slots(const int64_t* experts, const uint8_t* mask, const float* gates, int T, int K, int E,
                    const int64_t* counts, int64_t* token_S, float* gate_S) {
  std::vector<int64_t> next(E);
  int64_t at = 0;
  for (int e = 0; e < E; ++e) {
    next[e] = at;
    at += counts[e];
  }
  for (int t = 0; t < T; ++t) {  // token order inside each expert's segment, as a stable sort keeps it
    for (int j = 0; j < K; ++j) {
      if (mask[t * K + j]) {
        const int64_t s = next[experts[t * K + j]]++;
        token_S[s] = t;
        gate_S[s] = gates[t * K + j];
      }
    }
  }
}

void lcc_combine(const void* y, const int64_t* token_S, const float* gate_S, int64_t S, int D, int bf16,
                 void* out) {
  // out[t] = sum of y[s] * gate[s] over the slots s of token t, in slot order: each product rounded to the
  // output's dtype (the weighted rows), the sums in float32 and rounded once (as index_add sums bfloat16
  // rows); out starts at zero.
  if (bf16) {
    const uint16_t* yp = static_cast<const uint16_t*>(y);
    int64_t tokens = 0;  // the rows written: up to the last token with a slot (the others stay zero)
    for (int64_t s = 0; s < S; ++s) tokens = token_S[s] + 1 > tokens ? token_S[s] + 1 : tokens;
    std::vector<float> acc(static_cast<size_t>(tokens) * D, 0.0f);
    for (int64_t s = 0; s < S; ++s) {
      const float g = bf16_to_float(float_to_bf16(gate_S[s]));
      float* o = acc.data() + token_S[s] * D;
      const uint16_t* ys = yp + s * D;
      for (int j = 0; j < D; ++j) o[j] += bf16_to_float(float_to_bf16(bf16_to_float(ys[j]) * g));
    }
    uint16_t* op = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < tokens * D; ++i) op[i] = float_to_bf16(acc[i]);
  } else {
    const float* yp = static_cast<const float*>(y);
    float* op = static_cast<float*>(out);
    for (int64_t s = 0; s < S; ++s) {
      const float g = gate_S[s];
      float* o = op + token_S[s] * D;
      const float* ys = yp + s * D;
      for (int j = 0; j < D; ++j) o[j] += ys[j] * g;
    }
  }
}

}  // extern "C"
