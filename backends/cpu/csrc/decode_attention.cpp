// lcc's CPU attention kernels for serving, in float32 with one rounding to the activations' dtype at the end:
//   lcc_rope_cache: the step's rotary embeddings (queries out, keys into the paged KV cache) and its values
//     into the cache, every token at once;
//   lcc_decode_attention: each single-token sequence's query heads attend to its context, read straight
//     from the paged KV cache by slot (no gathered copy): scores q.k / sqrt(d), softmax, the weighted sum of
//     values. Grouped queries: query head h reads key/value head h / (H / KV).
// Built with int4_experts.cpp into one library (lcc/backends/cpu/native.py).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using namespace lcc;

// Rows of 16-lane chunks rotated: x * (cos, cos) + swap(x) * (-sin, sin) per pair, from the interleaved
// tables of lcc.ops.serve.StepBatch.rope; n_rows rows of d values, dst in the same dtype as src.
void rotate_rows(const char* src, char* dst, int n_rows, int d, const float* both, const float* sign, bool bf16) {
  const int width = bf16 ? 2 : 4;
  for (int r = 0; r < n_rows; ++r) {
    for (int c = 0; c < d; c += 16) {
      const V x = load16(src + (r * d + c) * width, bf16);
      const V swapped = swap_pairs(x);  // (x1, x2) -> (x2, x1) in every pair
      const V y = fmadd(x, load(both + c), mul(swapped, load(sign + c)));
      store16(dst + (r * d + c) * width, y, bf16);
    }
  }
}

}  // namespace

extern "C" {

// q_out [T, H, d] = q rotated; k rotated and v copied into the caches [slots, KV, d] at slots[t]. q, k, v,
// q_out and the caches in bfloat16 (bf16 != 0) or float32; both and sign [T, d] float32. d a multiple of 16.
void lcc_rope_cache(const void* q, const void* k, const void* v, const float* both, const float* sign,
                    const int64_t* slots, int T, int H, int KV, int d, int bf16, void* q_out, void* k_cache,
                    void* v_cache, int threads) {
  const int width = bf16 ? 2 : 4;
  const char* qb = static_cast<const char*>(q);
  const char* kb = static_cast<const char*>(k);
  const char* vb = static_cast<const char*>(v);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < T; ++t) {
    const float* bt = both + (int64_t)t * d;
    const float* st = sign + (int64_t)t * d;
    rotate_rows(qb + (int64_t)t * H * d * width, static_cast<char*>(q_out) + (int64_t)t * H * d * width, H, d, bt,
                st, bf16);
    const int64_t at = slots[t] * KV * (int64_t)d * width;
    rotate_rows(kb + (int64_t)t * KV * d * width, static_cast<char*>(k_cache) + at, KV, d, bt, st, bf16);
    memcpy(static_cast<char*>(v_cache) + at, vb + (int64_t)t * KV * d * width, (size_t)KV * d * width);
  }
}

// q [T, H, d] and out [T, H, d] (bfloat16 when bf16 != 0, else float32); caches [slots, KV, d] likewise;
// for each of the n sequences, its query row rows[i] and its context: lengths[i] slots in slots[i, :]
// (stride longest). d a multiple of 16.
void lcc_decode_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* rows,
                          const int64_t* slots, const int64_t* lengths, int n, int longest, int H, int KV, int d,
                          int bf16, void* out, int threads) {
  const int g = H / KV, chunks = d / 16, width = bf16 ? 2 : 4;
  const float scale = 1.0f / sqrtf((float)d);
  const char* qb = static_cast<const char*>(q);
  const char* kb = static_cast<const char*>(k_cache);
  const char* vb = static_cast<const char*>(v_cache);
  char* ob = static_cast<char*>(out);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qf((size_t)H * d), acc((size_t)H * d), scores, total(H);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) {  // a sequence's heads together: each cache line of its context read once
      const int64_t L = lengths[i];
      const int64_t* ctx = slots + (int64_t)i * longest;
      const char* qi = qb + rows[i] * H * (int64_t)d * width;
      scores.resize((size_t)H * L);
      for (int c = 0; c < H * chunks; ++c) {
        store(&qf[c * 16], mul(load16(qi + c * 16 * width, bf16), set1(scale)));
      }
      for (int64_t j = 0; j < L; ++j) {  // scores
        const char* kj = kb + ctx[j] * KV * (int64_t)d * width;
        for (int h = 0; h < H; ++h) {
          const char* kh = kj + (h / g) * (int64_t)d * width;
          V dot = zero();
          for (int c = 0; c < chunks; ++c) dot = fmadd(load(&qf[h * d + c * 16]), load16(kh + c * 16 * width, bf16), dot);
          scores[h * L + j] = lcc::sum(dot);
        }
      }
      for (int h = 0; h < H; ++h) {  // softmax numerators, in place
        float* sh = &scores[h * L];
        float top = sh[0];
        for (int64_t j = 1; j < L; ++j) top = sh[j] > top ? sh[j] : top;
        V run = zero();
        for (int64_t j = 0; j < L; j += 16) {
          const V e = exp_ps(sub(load_n(sh + j, L - j), set1(top)));
          store_n(sh + j, e, L - j);
          run = add(run, keep_n(e, L - j));
        }
        total[h] = lcc::sum(run);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < L; ++j) {  // weighted values
        const char* vj = vb + ctx[j] * KV * (int64_t)d * width;
        for (int h = 0; h < H; ++h) {
          const char* vh = vj + (h / g) * (int64_t)d * width;
          const V p = set1(scores[h * L + j]);
          for (int c = 0; c < chunks; ++c) {
            float* a = &acc[h * d + c * 16];
            store(a, fmadd(p, load16(vh + c * 16 * width, bf16), load(a)));
          }
        }
      }
      char* dst = ob + rows[i] * H * (int64_t)d * width;
      for (int h = 0; h < H; ++h) {
        const V inv = set1(1.0f / total[h]);
        for (int c = 0; c < chunks; ++c) store16(dst + (h * d + c * 16) * width, mul(load(&acc[h * d + c * 16]), inv), bf16);
      }
    }
  }
}

}  // extern "C"
