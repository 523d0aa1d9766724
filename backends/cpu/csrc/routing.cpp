// lcc's CPU routing decisions for serving (lcc.ops.serve.RoutingTables with serving's settings: no losses, no
// capacity): per token, cosine affinities to the group centroids, the kept groups (ties: lower id first),
// their experts' logits, scores, the joint probabilities pi, the ranking (pi plus the load bias in float64,
// or pi), k(x) from the threshold on the top-k mass, and the gates. float32 as the reference computes it
// (the bias in float64); dot products summed in 16 lanes, so decisions are the reference's up to the
// rounding of those sums. Built with the other kernels into one library (lcc/backends/cpu/native.py).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <utility>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

float dot(const float* a, const float* b, int n) {
  lcc::V acc = lcc::zero();
  int i = 0;
  for (; i + 16 <= n; i += 16) acc = lcc::fmadd(lcc::load(a + i), lcc::load(b + i), acc);
  if (i < n) acc = lcc::fmadd(lcc::load_n(a + i, n - i), lcc::load_n(b + i, n - i), acc);
  return lcc::sum(acc);
}

// Indices of the k largest of v[0..n) in rank order; equal values rank the lower index first (a stable
// descending sort's first k).
template <typename T>
void top_k(const T* v, int n, int k, int* out) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      bool taken = false;
      for (int p = 0; p < j; ++p) taken = taken || out[p] == i;
      if (!taken && (best < 0 || v[i] > v[best])) best = i;
    }
    out[j] = best;
  }
}

// softmax over n values in place (max subtracted, then normalised)
void softmax(float* v, int n) {
  float top = v[0];
  for (int i = 1; i < n; ++i) top = v[i] > top ? v[i] : top;
  float total = 0;
  for (int i = 0; i < n; ++i) total += (v[i] = expf(v[i] - top));
  for (int i = 0; i < n; ++i) v[i] /= total;
}

}  // namespace

extern "C" {

// x [T, D] float32; unit centroids [G, D] (normalised); router weights [E, D] (E = G * P, group-major);
// bias [E] float64 or null (top_score ranking). Writes experts, gates [T, K] (float32), mask [T, K] (bool),
// k [T] and counts [E] (used slots per expert). Three passes: each token's kept groups; each kept group's
// logits for all of its tokens at once (its block of router rows read once, as the reference's group-major
// matmul); each token's decisions.
void lcc_route(const float* x, int T, int D, const float* centroids, int G, const float* weight, int E,
               const double* bias, float temperature, int top, int softmax_scores, int K, int k_min,
               float threshold, int renormalize, float gate_scale, int64_t* experts, float* gates, uint8_t* mask,
               int64_t* k_out, int64_t* counts, int threads) {
  const int P = E / G, C = top * P;
  std::vector<int> kept((size_t)T * top);
  std::vector<float> q((size_t)T * top), z((size_t)T * C);
  std::vector<int64_t> first(G + 1, 0), pairs((size_t)T * top);  // (token, kept slot) pairs by group
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xn(D), affinity(G), pi(C);
    std::vector<double> rank(C);
    std::vector<int> slot(K);
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {  // 1: kept groups (ascending id) and their weights q
      const float* xt = x + (int64_t)t * D;
      const float norm = sqrtf(dot(xt, xt, D));
      const float denom = norm > 1e-12f ? norm : 1e-12f;
      for (int i = 0; i < D; ++i) xn[i] = xt[i] / denom;
      for (int g = 0; g < G; ++g) affinity[g] = dot(xn.data(), centroids + (int64_t)g * D, D) / temperature;
      int* kt = &kept[(size_t)t * top];
      top_k(affinity.data(), G, top, kt);
      for (int a = 1; a < top; ++a)
        for (int b = a; b > 0 && kt[b] < kt[b - 1]; --b) std::swap(kt[b], kt[b - 1]);
      float* qt = &q[(size_t)t * top];
      for (int a = 0; a < top; ++a) qt[a] = affinity[kt[a]];
      softmax(qt, top);
    }
#pragma omp single
    {
      for (int64_t i = 0; i < (int64_t)T * top; ++i) ++first[kept[i] + 1];
      for (int g = 0; g < G; ++g) first[g + 1] += first[g];
      std::vector<int64_t> at(first.begin(), first.end() - 1);
      for (int64_t i = 0; i < (int64_t)T * top; ++i) pairs[at[kept[i]]++] = i;
    }
#pragma omp for schedule(dynamic, 1)
    for (int g = 0; g < G; ++g) {  // 2: a group's logits for its tokens, row by row of its block
      for (int p = 0; p < P; ++p) {
        const float* w = weight + ((int64_t)g * P + p) * D;
        for (int64_t i = first[g]; i < first[g + 1]; ++i) {
          const int64_t t = pairs[i] / top, a = pairs[i] % top;
          z[t * C + a * P + p] = dot(x + t * D, w, D);
        }
      }
    }
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {  // 3: scores, pi, ranking, k(x), gates
      const int* kt = &kept[(size_t)t * top];
      for (int a = 0; a < top; ++a) {
        float* zs = &z[(size_t)t * C + a * P];
        if (softmax_scores) {
          softmax(zs, P);
        } else {
          float total = 0;
          for (int p = 0; p < P; ++p) total += (zs[p] = 1.0f / (1.0f + expf(-zs[p])));
          for (int p = 0; p < P; ++p) zs[p] /= total;
        }
        for (int p = 0; p < P; ++p) pi[a * P + p] = q[(size_t)t * top + a] * zs[p];
      }
      for (int c = 0; c < C; ++c) rank[c] = bias ? (double)pi[c] + bias[kt[c / P] * P + c % P] : (double)pi[c];
      top_k(rank.data(), C, K, slot.data());
      float mass = 0;
      int short_of = 0;
      for (int j = 0; j < K; ++j) {
        mass += pi[slot[j]];
        short_of += mass >= threshold ? 0 : 1;
      }
      int k = short_of + 1;
      k = k < k_min ? k_min : (k > K ? K : k);
      float total = 0;
      for (int j = 0; j < K; ++j) {
        const int c = slot[j];
        experts[(int64_t)t * K + j] = (int64_t)kt[c / P] * P + c % P;
        const float gate = j < k ? pi[c] : 0.0f;
        gates[(int64_t)t * K + j] = gate;
        mask[(int64_t)t * K + j] = j < k;
        total += gate;
      }
      for (int j = 0; j < K; ++j) {
        float& gate = gates[(int64_t)t * K + j];
        if (renormalize) gate = gate / total;
        gate = gate_scale * gate;
      }
      k_out[t] = k;
    }
  }
  memset(counts, 0, sizeof(int64_t) * E);
  for (int64_t s = 0; s < (int64_t)T * K; ++s)
    if (mask[s]) ++counts[experts[s]];
}

}  // extern "C"
