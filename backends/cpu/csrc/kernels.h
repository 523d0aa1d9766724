// The entry points of lcc's native CPU kernels (int4_experts.cpp, decode_attention.cpp, routing.cpp,
// dense_bf16.cpp, rows.cpp), with plain pointers and sizes: ops.cpp checks its tensors and calls these. Nothing here checks its arguments.
#pragma once

#include <stdint.h>

extern "C" {

// 1 when this build has the AMX path.
int lcc_int4_has_amx();
// Asks Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 0 on success.
int lcc_int4_amx_init();
// out[i] = e^x[i] for n float32 values by simd.h's exp_ps (the SwiGLU activation's and softmax's exp).
void lcc_exp(const float* x, float* out, int64_t n);

// out [S, N] float32 = x [S, K] float32, each expert's rows (counts[e] of them, in expert order) times its
// weights [N, K]. Experts with at least amx_min_rows rows (0: none) run on AMX with x rounded to bfloat16.
void lcc_int4_matmul(const float* x, const int64_t* counts, int E, const uint8_t* codes, const float* scales,
                     const float* shifts, int N, int K, int g, float* out, int threads, int amx_min_rows);
// The experts' SwiGLU: out [S, D] = (silu(x W1^T) * (x W3^T)) W2^T per expert segment, x [S, D] and out in
// bfloat16 (bf16 != 0) or float32. dot_products (bfloat16 only; the CPU must have AVX512-BF16): the segments not
// on AMX take the vdpbf16ps path, the activation between the projections rounded to bfloat16. w13 holds W1 and W3 stacked along the outputs ([2F, D]), w2 is [D, F].
void lcc_int4_swiglu(const void* x, const int64_t* counts, int E, int bf16, const uint8_t* codes13,
                     const float* scales13, const float* shifts13, const uint8_t* codes2, const float* scales2,
                     const float* shifts2, int D, int F, int g, void* out, int threads, int amx_min_rows,
                     int dot_products);

// q_out [T, H, d] = q rotated; k rotated and v copied into the caches [slots, KV, d] at slots[t].
void lcc_rope_cache(const void* q, const void* k, const void* v, const float* both, const float* sign,
                    const int64_t* slots, int T, int H, int KV, int d, int bf16, void* q_out, void* k_cache,
                    void* v_cache, int threads);
// For each of the n sequences, out[rows[i]] = its query heads q[rows[i]] over its context: lengths[i]
// slots of the caches in slots[i, :] (stride longest).
void lcc_decode_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* rows,
                          const int64_t* slots, const int64_t* lengths, int n, int longest, int H, int KV, int d,
                          int bf16, void* out, int threads);

// 1 when the CPU has AVX512-BF16 (vdpbf16ps): lcc_bf16_linear's faster path.
int lcc_has_avx512_bf16();
// y [M, N] = x [M, K] W[N, K]^T, bfloat16 in and out, float32 sums; for few rows (decode steps): the columns of
// blocks first to last (each 4 weight rows: N / 4 rounded up in all), in the calling thread. dot_products: the
// AVX512-BF16 path (the CPU must have it; an AVX2 build has none), else the FMA one (AVX-512F or AVX2).
void lcc_bf16_linear(const uint16_t* x, int64_t M, int K, const uint16_t* w, int N, uint16_t* y, int dot_products,
                     int64_t first, int64_t last);

// gate[i] = bf16(bf16(silu(gate[i])) * up[i]) for n bfloat16 values: SwiGLU's activation as PyTorch rounds it.
void lcc_silu_mul_bf16(uint16_t* gate, const uint16_t* up, int64_t n);

// Serving's routing decisions for T tokens: experts, gates [T, K], mask [T, K], k [T], counts [E].
void lcc_route(const float* x, int T, int D, const float* centroids, int G, const float* weight, int E,
               const double* bias, float temperature, int top, int softmax_scores, int K, int k_min,
               float threshold, int renormalize, float gate_scale, int64_t* experts, float* gates, uint8_t* mask,
               int64_t* k_out, int64_t* counts, int threads);

// out [rows, D] = RMS norm of each row of x times weight [D], rows first to last; x, weight and out float32,
// or bfloat16 (bf16 != 0); the row's mean square in float32.
void lcc_rms_norm(const void* x, int64_t rows, int D, const void* weight, float eps, int bf16, void* out,
                  int64_t first, int64_t last);
// The used slots (mask) of T tokens' K choices sorted by expert, token order inside an expert's segment:
// each slot's token and gate; counts [E] holds the used slots per expert (their sum is the slots written).
void lcc_sort_slots(const int64_t* experts, const uint8_t* mask, const float* gates, int T, int K, int E,
                    const int64_t* counts, int64_t* token_S, float* gate_S);
// out [tokens, D] (zeroed by the caller) += y[s] * gate_S[s] into row token_S[s], slot by slot (bfloat16:
// each product rounded, the sums in float32, rounded once).
void lcc_combine(const void* y, const int64_t* token_S, const float* gate_S, int64_t S, int D, int bf16,
                 void* out);

}  // extern "C"
