// lcc's native CPU kernels as PyTorch operators, torch.ops.lcc.*: the schemas, and CPU implementations that
// check every tensor they are given (device, dtype, contiguity, shapes, counts and slot bounds) with
// TORCH_CHECK before calling the kernel (kernels.h), so that a wrong call raises an error naming the argument
// and never reads or writes outside a tensor. The fake implementations, which let torch.compile and torch.fx
// trace through the operators, are in lcc/backends/cpu/native.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/add.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

namespace {

using at::IntArrayRef;
using at::Tensor;

bool amx_ready = false;  // lcc::amx_init succeeded in this process: AMX tiles may be used

int threads() { return at::get_num_threads(); }

// A size the kernels take as a C int.
int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), what, " ", v, " is out of the kernels' range");
  return static_cast<int>(v);
}

// A dtype as Python spells it (torch.float32, not Float).
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kByte: return "uint8";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

void check_tensor(const Tensor& t, const char* name, std::initializer_list<at::ScalarType> dtypes, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, not on ", t.device());
  bool ok = false;
  std::string allowed;
  for (auto d : dtypes) {
    ok = ok || t.scalar_type() == d;
    allowed += (allowed.empty() ? "" : " or ") + dtype_name(d);
  }
  TORCH_CHECK(ok, name, " has dtype ", dtype_name(t.scalar_type()), ": the kernel takes ", allowed);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, not ", t.sizes());
}

// A tensor the kernel writes into in place: it must already be contiguous.
void check_writable(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the kernel writes into it in place)");
}

// Indices (int64) that must lie in [0, bound), read on the host.
void check_indices(const Tensor& idx, int64_t bound, const char* name, const char* of) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, "[", i, "] = ", p[i], " is out of range: ", of, " has ", bound);
  }
}

// An int4 stack in the kernel's layout (lcc/backends/cpu/int4_native.py): codes uint8 [E, N/16, K/2, 16],
// scales float32 [E, N/16, K/g, 16], shifts like the scales or none. Returns (E, N, K).
std::tuple<int64_t, int64_t, int64_t> check_int4(const Tensor& codes, const Tensor& scales,
                                                 const std::optional<Tensor>& shifts, int64_t g, const char* name) {
  check_tensor(codes, name, {at::kByte}, 4);
  TORCH_CHECK(codes.is_contiguous() && codes.size(3) == 16, name, " codes must be contiguous [E, out / 16, in / 2, 16], not ",
              codes.sizes());
  const int64_t E = codes.size(0), N = codes.size(1) * 16, K = codes.size(2) * 2;
  TORCH_CHECK(g > 0 && g % 2 == 0 && K % g == 0, name, ": group size ", g, " must be even and divide the input width ", K);
  const std::vector<int64_t> want{E, N / 16, K / g, 16};
  check_tensor(scales, name, {at::kFloat}, 4);
  TORCH_CHECK(scales.is_contiguous() && scales.sizes() == IntArrayRef(want), name, " scales must be contiguous ",
              IntArrayRef(want), ", not ", scales.sizes());
  if (shifts) {
    check_tensor(*shifts, name, {at::kFloat}, 4);
    TORCH_CHECK(shifts->is_contiguous() && shifts->sizes() == IntArrayRef(want), name, " shifts must be contiguous ",
                IntArrayRef(want), ", not ", shifts->sizes());
  }
  return {E, N, K};
}

// One count per expert, none negative, summing to the rows.
void check_counts(IntArrayRef counts, int64_t E, int64_t rows) {
  int64_t total = 0;
  bool ok = static_cast<int64_t>(counts.size()) == E;
  for (int64_t c : counts) {
    ok = ok && c >= 0 && c <= rows - total;  // never past the rows, so the sum cannot overflow
    if (ok) total += c;
  }
  TORCH_CHECK(ok && total == rows, rows, " rows for counts ", counts, ": one count per expert (", E,
              "), none negative, summing to the rows");
}

int amx_rows(int64_t amx_min_rows) {
  TORCH_CHECK(amx_min_rows >= 0, "amx_min_rows must not be negative");
  TORCH_CHECK(amx_min_rows == 0 || amx_ready, "amx_min_rows ", amx_min_rows,
              " asks for AMX tiles, which this process has not been granted (lcc::amx_init)");
  return as_int(amx_min_rows, "amx_min_rows");
}

const float* optional_ptr(const std::optional<Tensor>& t) { return t ? t->const_data_ptr<float>() : nullptr; }

bool amx_init() {
  amx_ready = lcc_int4_has_amx() && lcc_int4_amx_init() == 0;
  return amx_ready;
}

Tensor simd_exp(const Tensor& x) {
  check_tensor(x, "x", {at::kFloat}, x.dim());
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  lcc_exp(xc.const_data_ptr<float>(), out.mutable_data_ptr<float>(), xc.numel());
  return out;
}

Tensor int4_matmul(const Tensor& x, IntArrayRef counts, const Tensor& codes, const Tensor& scales,
                   const std::optional<Tensor>& shifts, int64_t group_size, int64_t amx_min_rows) {
  const auto [E, N, K] = check_int4(codes, scales, shifts, group_size, "w");
  check_tensor(x, "x", {at::kFloat}, 2);
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns and the weights take ", K);
  as_int(K * 16, "the input width");
  check_counts(counts, E, x.size(0));
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({x.size(0), N}, x.options());
  lcc_int4_matmul(xc.const_data_ptr<float>(), counts.data(), as_int(E, "experts"), codes.const_data_ptr<uint8_t>(),
                  scales.const_data_ptr<float>(), optional_ptr(shifts), as_int(N, "N"), as_int(K, "K"),
                  as_int(group_size, "group size"), out.mutable_data_ptr<float>(), threads(), amx_rows(amx_min_rows));
  return out;
}

Tensor int4_swiglu(const Tensor& x, IntArrayRef counts, const Tensor& codes13, const Tensor& scales13,
                   const std::optional<Tensor>& shifts13, const Tensor& codes2, const Tensor& scales2,
                   const std::optional<Tensor>& shifts2, int64_t group_size, int64_t amx_min_rows,
                   std::optional<bool> dot_products) {
  const bool has = lcc_has_avx512_bf16() != 0;
  TORCH_CHECK(!dot_products.value_or(false) || has, "dot_products=True needs a CPU with AVX512-BF16, which this one lacks");
  const auto [E, F2, D] = check_int4(codes13, scales13, shifts13, group_size, "w13");
  const auto [E2, D2, F] = check_int4(codes2, scales2, shifts2, group_size, "w2");
  TORCH_CHECK(E2 == E && D2 == D && F2 == 2 * F, "w13 ", IntArrayRef({E, F2, D}), " and w2 ", IntArrayRef({E2, D2, F}),
              " are not one layer's experts: w13 [E, 2F, D] and w2 [E, D, F]");
  TORCH_CHECK(shifts13.has_value() == shifts2.has_value(), "w13 and w2 must both have shifts or neither");
  TORCH_CHECK(F % 16 == 0, "the experts' width ", F, " must be a multiple of 16 (the activation runs 16 lanes at a time)");
  as_int(2 * F * 8, "the experts' width");
  as_int(D * 16, "the model width");
  check_tensor(x, "x", {at::kFloat, at::kBFloat16}, 2);
  TORCH_CHECK(x.size(1) == D, "x has ", x.size(1), " columns and the experts take ", D);
  check_counts(counts, E, x.size(0));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || amx_min_rows == 0, "AMX tiles take bfloat16 activations (amx_min_rows 0 for float32)");
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({x.size(0), D}, x.options());
  lcc_int4_swiglu(xc.const_data_ptr(), counts.data(), as_int(E, "experts"), bf16, codes13.const_data_ptr<uint8_t>(),
                  scales13.const_data_ptr<float>(), optional_ptr(shifts13), codes2.const_data_ptr<uint8_t>(),
                  scales2.const_data_ptr<float>(), optional_ptr(shifts2), as_int(D, "D"), as_int(F, "F"),
                  as_int(group_size, "group size"), out.mutable_data_ptr(), threads(), amx_rows(amx_min_rows),
                  bf16 && dot_products.value_or(has));
  return out;
}

// q [T, H, d], k and v [T, KV, d], caches [slots, KV, d]: one dtype (bfloat16 or float32), d a multiple of 16.
void check_heads(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache) {
  check_tensor(q, "q", {at::kBFloat16, at::kFloat}, 3);
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_tensor(*t, name, {q.scalar_type()}, 3);
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " differ");
  const int64_t H = q.size(1), d = q.size(2), KV = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d, "the caches hold heads of ", k_cache.size(2), ", the queries of ", d);
  TORCH_CHECK(d % 16 == 0 && KV > 0 && H % KV == 0, "the attention kernels need head_dim a multiple of 16 and query ",
              "heads a multiple of key/value heads (head_dim ", d, ", ", H, " and ", KV, " heads)");
  as_int(H * d * 4, "query heads x head_dim");
}

Tensor rope_cache(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& both, const Tensor& sign,
                  const Tensor& slots, Tensor& k_cache, Tensor& v_cache) {
  check_heads(q, k_cache, v_cache);
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), KV = k_cache.size(1);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_tensor(*t, name, {q.scalar_type()}, 3);
    TORCH_CHECK(t->sizes() == IntArrayRef({T, KV, d}), name, " must be ", IntArrayRef({T, KV, d}), ", not ", t->sizes());
  }
  for (const auto& [t, name] : {std::pair{&both, "both"}, std::pair{&sign, "sign"}}) {
    check_tensor(*t, name, {at::kFloat}, t->dim());
    TORCH_CHECK(t->numel() == T * d, name, " must hold [T, d] = ", T * d, " values, not ", t->sizes());
  }
  check_writable(k_cache, "k_cache");
  check_writable(v_cache, "v_cache");
  check_tensor(slots, "slots", {at::kLong}, 1);
  TORCH_CHECK(slots.size(0) == T, "slots must hold one slot per token (", T, "), not ", slots.size(0));
  const Tensor s = slots.contiguous();
  check_indices(s, k_cache.size(0), "slots", "the cache");
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), bc = both.contiguous(),
               sc = sign.contiguous();
  Tensor out = at::empty_like(qc);
  lcc_rope_cache(qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), bc.const_data_ptr<float>(),
                 sc.const_data_ptr<float>(), s.const_data_ptr<int64_t>(), as_int(T, "T"), as_int(H, "H"),
                 as_int(KV, "KV"), as_int(d, "d"), q.scalar_type() == at::kBFloat16, out.mutable_data_ptr(),
                 k_cache.mutable_data_ptr(), v_cache.mutable_data_ptr(), threads());
  return out;
}

void decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& rows,
                      const Tensor& slots, const Tensor& lengths, Tensor& out) {
  check_heads(q, k_cache, v_cache);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  check_tensor(out, "out", {q.scalar_type()}, 3);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must be ", q.sizes(), ", not ", out.sizes());
  check_writable(out, "out");
  check_tensor(rows, "rows", {at::kLong}, 1);
  check_tensor(slots, "slots", {at::kLong}, 2);
  check_tensor(lengths, "lengths", {at::kLong}, 1);
  const int64_t n = slots.size(0), longest = slots.size(1);
  TORCH_CHECK(rows.size(0) == n && lengths.size(0) == n, "rows (", rows.size(0), "), slots (", n, ") and lengths (",
              lengths.size(0), ") must have one entry per sequence");
  const Tensor r = rows.contiguous(), s = slots.contiguous(), len = lengths.contiguous();
  check_indices(r, q.size(0), "rows", "q");
  const int64_t* lp = len.const_data_ptr<int64_t>();
  const int64_t* sp = s.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= longest, "lengths[", i, "] = ", lp[i], " must lie in [1, ", longest, "]");
    for (int64_t j = 0; j < lp[i]; ++j) {
      TORCH_CHECK(sp[i * longest + j] >= 0 && sp[i * longest + j] < k_cache.size(0), "slots[", i, ", ", j, "] = ",
                  sp[i * longest + j], " is out of range: the cache has ", k_cache.size(0));
    }
  }
  const Tensor qc = q.contiguous();
  lcc_decode_attention(qc.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
                       r.const_data_ptr<int64_t>(), sp, lp, as_int(n, "sequences"), as_int(longest, "longest"),
                       as_int(q.size(1), "H"), as_int(k_cache.size(1), "KV"), as_int(q.size(2), "d"),
                       q.scalar_type() == at::kBFloat16, out.mutable_data_ptr(), threads());
}

Tensor bf16_linear(const Tensor& x, const Tensor& w, std::optional<bool> dot_products) {
  const bool has = lcc_has_avx512_bf16() != 0;
  TORCH_CHECK(!dot_products.value_or(false) || has, "dot_products=True needs a CPU with AVX512-BF16, which this one lacks");
  check_tensor(w, "weight", {at::kBFloat16}, 2);
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous [out, in]");
  TORCH_CHECK(w.size(1) > 0, "weight has no input columns");
  check_tensor(x, "x", {at::kBFloat16}, x.dim());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "x has ", x.dim() ? x.size(-1) : 0, " columns and the weight takes ",
              w.size(1));
  const Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  Tensor y = at::empty(shape, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.const_data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr());
  const int64_t M = xc.numel() / w.size(1), blocks = (w.size(0) + 3) / 4;
  const int K = as_int(w.size(1), "in"), N = as_int(w.size(0), "out");
  const int dp = dot_products.value_or(has);
  // PyTorch's thread pool, warm from the step's other operators; a split only where the weights pay for it
  const int64_t grain = w.numel() >= (1 << 17) ? 1 : blocks;
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    lcc_bf16_linear(xp, M, K, wp, N, yp, dp, first, last);
  });
  return y;
}

// Unquantised bfloat16 experts at decode sizes: each expert's SwiGLU over its segment of x (segments in expert
// order) through the dense kernel, rounded to bfloat16 where the grouped matmul rounds (each projection, the
// activation, the product). Two passes over PyTorch's thread pool: every expert's gate and up blocks, then
// every expert's down blocks; experts without rows cost nothing.
Tensor bf16_swiglu(const Tensor& x, IntArrayRef counts, const Tensor& w1, const Tensor& w3, const Tensor& w2,
                   std::optional<bool> dot_products) {
  const bool has = lcc_has_avx512_bf16() != 0;
  TORCH_CHECK(!dot_products.value_or(false) || has, "dot_products=True needs a CPU with AVX512-BF16, which this one lacks");
  for (auto [t, name] : {std::pair{&w1, "w1"}, std::pair{&w3, "w3"}, std::pair{&w2, "w2"}}) {
    check_tensor(*t, name, {at::kBFloat16}, 3);
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous [experts, out, in]");
  }
  const int64_t E = w1.size(0), F = w1.size(1), D = w1.size(2);
  TORCH_CHECK(w3.sizes() == w1.sizes(), "w3 must have w1's shape ", w1.sizes(), ", not ", w3.sizes());
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == D && w2.size(2) == F, "w2 must be [", E, ", ", D, ", ", F, "], not ",
              w2.sizes());
  TORCH_CHECK(D > 0 && F > 0, "the experts have no columns");
  check_tensor(x, "x", {at::kBFloat16}, 2);
  TORCH_CHECK(x.size(1) == D, "x has ", x.size(1), " columns and the experts take ", D);
  check_counts(counts, E, x.size(0));
  const Tensor xc = x.contiguous();
  const int64_t S = x.size(0);
  Tensor gate = at::empty({S, F}, x.options()), up = at::empty({S, F}, x.options()), out = at::empty({S, D}, x.options());
  std::vector<std::pair<int64_t, int64_t>> segs;  // (expert, first row) of the experts with rows
  for (int64_t e = 0, first = 0; e < E; first += counts[e], ++e) {
    if (counts[e]) segs.emplace_back(e, first);
  }
  const int dp = dot_products.value_or(has);
  const int64_t nseg = static_cast<int64_t>(segs.size()), fb = (F + 3) / 4, db = (D + 3) / 4;
  const int f = as_int(F, "F"), d = as_int(D, "D");
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr());
  auto* gp = reinterpret_cast<uint16_t*>(gate.mutable_data_ptr());
  auto* up_ = reinterpret_cast<uint16_t*>(up.mutable_data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  const auto* w1p = reinterpret_cast<const uint16_t*>(w1.const_data_ptr());
  const auto* w3p = reinterpret_cast<const uint16_t*>(w3.const_data_ptr());
  const auto* w2p = reinterpret_cast<const uint16_t*>(w2.const_data_ptr());
  at::parallel_for(0, nseg * 2 * fb, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const auto [e, row] = segs[i / (2 * fb)];
      const bool is_up = (i / fb) % 2;
      const int64_t b = i % fb;
      lcc_bf16_linear(xp + row * D, counts[e], d, (is_up ? w3p : w1p) + e * F * D, f, (is_up ? up_ : gp) + row * F, dp,
                      b, b + 1);
    }
  });
  lcc_silu_mul_bf16(gp, up_, S * F);  // gate <- bf16(bf16(silu(gate)) * up)
  at::parallel_for(0, nseg * db, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const auto [e, row] = segs[i / db];
      const int64_t b = i % db;
      lcc_bf16_linear(gp + row * F, counts[e], f, w2p + e * D * F, d, op + row * D, dp, b, b + 1);
    }
  });
  return out;
}

using RouteOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// x in float32 or bfloat16 (widened to float32 here: the decisions are made in float32).
RouteOut route(const Tensor& x, const Tensor& centroids, const Tensor& weight, const std::optional<Tensor>& bias,
               double temperature, int64_t top, bool softmax, int64_t k, int64_t k_min, double threshold,
               bool renormalize, double gate_scale) {
  check_tensor(x, "x", {at::kFloat, at::kBFloat16}, 2);
  check_tensor(centroids, "centroids", {at::kFloat}, 2);
  check_tensor(weight, "weight", {at::kFloat}, 2);
  const int64_t T = x.size(0), D = x.size(1), G = centroids.size(0), E = weight.size(0);
  TORCH_CHECK(centroids.size(1) == D && weight.size(1) == D, "x, centroids and weight must have ", D,
              " columns, not ", centroids.size(1), " and ", weight.size(1));
  TORCH_CHECK(G > 0 && E % G == 0 && top >= 1 && top <= G && k >= 1 && top * (E / G) >= k, E, " experts in ", G,
              " groups: keeping ", top, " groups cannot give ", k, " experts");
  TORCH_CHECK(k_min >= 1 && k_min <= k, "k_min ", k_min, " must lie in [1, ", k, "]");
  TORCH_CHECK(temperature > 0, "temperature must be positive, not ", temperature);
  if (bias) {
    check_tensor(*bias, "bias", {at::kDouble}, 1);
    TORCH_CHECK(bias->size(0) == E, "bias must hold one value per expert (", E, "), not ", bias->size(0));
  }
  const Tensor xc = x.to(at::kFloat).contiguous(), cc = centroids.contiguous(), wc = weight.contiguous();
  const std::optional<Tensor> bc = bias ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  const auto i64 = x.options().dtype(at::kLong);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor experts = at::empty({T, k}, i64), gates = at::empty({T, k}, f32),
         mask = at::empty({T, k}, x.options().dtype(at::kBool)), k_T = at::empty({T}, i64), counts = at::empty({E}, i64);
  lcc_route(xc.const_data_ptr<float>(), as_int(T, "T"), as_int(D, "D"), cc.const_data_ptr<float>(), as_int(G, "G"),
            wc.const_data_ptr<float>(), as_int(E, "E"), bc ? bc->const_data_ptr<double>() : nullptr,
            static_cast<float>(temperature), as_int(top, "top"), softmax, as_int(k, "k"), as_int(k_min, "k_min"),
            static_cast<float>(threshold), renormalize, static_cast<float>(gate_scale),
            experts.mutable_data_ptr<int64_t>(), gates.mutable_data_ptr<float>(),
            reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>()), k_T.mutable_data_ptr<int64_t>(),
            counts.mutable_data_ptr<int64_t>(), threads());
  // the used slots sorted by expert (the dispatch's segments), from the decisions just made
  const int64_t* cp = counts.const_data_ptr<int64_t>();
  int64_t S = 0;
  for (int64_t e = 0; e < E; ++e) S += cp[e];
  Tensor token_S = at::empty({S}, i64), gate_S = at::empty({S}, f32);
  lcc_sort_slots(experts.const_data_ptr<int64_t>(), reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()),
                 gates.const_data_ptr<float>(), static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), cp,
                 token_S.mutable_data_ptr<int64_t>(), gate_S.mutable_data_ptr<float>());
  return {experts, gates, mask, k_T, counts, counts.to(at::kDouble), token_S, gate_S};
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  check_tensor(x, "x", {at::kFloat, at::kBFloat16}, x.dim());
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  check_tensor(weight, "weight", {x.scalar_type()}, 1);
  // each slice of D = weight's size along the last dim is normed: the width, or each head of D (head_dim)
  const int64_t D = weight.size(0);
  TORCH_CHECK(D > 0, "weight has no values");
  TORCH_CHECK(x.size(-1) % D == 0, "weight holds ", D, " values and x has ", x.size(-1), " columns, not a multiple");
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = xc.numel() / D;
  const int bf16 = x.scalar_type() == at::kBFloat16;
  const int d = as_int(D, "D");
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / D), [&](int64_t first, int64_t last) {
    lcc_rms_norm(xc.const_data_ptr(), rows, d, wc.const_data_ptr(), static_cast<float>(eps), bf16,
                 out.mutable_data_ptr(), first, last);
  });
  return out;
}

Tensor combine(const Tensor& y, const Tensor& token_S, const Tensor& gate_S, int64_t tokens) {
  check_tensor(y, "y", {at::kFloat, at::kBFloat16}, 2);
  check_tensor(token_S, "token_S", {at::kLong}, 1);
  check_tensor(gate_S, "gate_S", {at::kFloat}, 1);
  const int64_t S = y.size(0);
  TORCH_CHECK(token_S.size(0) == S && gate_S.size(0) == S, "y has ", S, " rows, token_S ", token_S.size(0),
              " and gate_S ", gate_S.size(0));
  TORCH_CHECK(tokens >= 0, "tokens must not be negative, not ", tokens);
  const Tensor yc = y.contiguous(), tc = token_S.contiguous(), gc = gate_S.contiguous();
  check_indices(tc, tokens, "token_S", "the output");
  Tensor out = at::zeros({tokens, y.size(1)}, y.options());
  lcc_combine(yc.const_data_ptr(), tc.const_data_ptr<int64_t>(), gc.const_data_ptr<float>(), S,
              as_int(y.size(1), "D"), y.scalar_type() == at::kBFloat16, out.mutable_data_ptr());
  return out;
}


// A projection as ops.linear runs it on a serving weight held for the dense kernel (lcc.backends.cpu.dense):
// lcc's kernel up to max_rows rows, PyTorch's matmul beyond.
Tensor project(const Tensor& x, const Tensor& w, int64_t max_rows) {
  return x.numel() <= max_rows * x.size(-1) ? bf16_linear(x, w, std::nullopt) : at::linear(x, w);
}

// Unquantised experts as lcc.backends.cpu.dense.swiglu_segments runs them: the layer in one call when no
// segment has more than max_rows rows, else segment by segment.
Tensor dense_experts(const Tensor& xs, IntArrayRef counts, const Tensor& w1, const Tensor& w3, const Tensor& w2,
                     int64_t max_rows) {
  const int64_t most = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  if (most <= max_rows) return bf16_swiglu(xs, counts, w1, w3, w2, std::nullopt);
  check_counts(counts, w1.size(0), xs.size(0));
  Tensor out = at::empty({xs.size(0), w2.size(1)}, xs.options());
  for (int64_t e = 0, start = 0; e < static_cast<int64_t>(counts.size()); start += counts[e], ++e) {
    if (!counts[e]) continue;
    const Tensor x = xs.narrow(0, start, counts[e]);
    const Tensor h = at::mul(at::silu(project(x, w1.select(0, e), max_rows)), project(x, w3.select(0, e), max_rows));
    out.narrow(0, start, counts[e]).copy_(project(h, w2.select(0, e), max_rows));
  }
  return out;
}

// One transformer layer of a decode step (every sequence one token, the rows in order): what the serve
// program's lines of a MoE layer run one after another (lcc.ops.decode.decode_layer), called here without
// Python between them: the same operators in the same order on the same tensors, so the result is the
// op-by-op layer's to the bit. x [T, D] bfloat16, the residual stream; returns x after the layer. The experts
// are int4 (codes and scales, lcc_int4_swiglu) or unquantised bfloat16 stacks (w1, w3, w2); max_rows is the
// dense kernel's (lcc.backends.cpu.dense.MAX_ROWS). Where given, `routed` [T, k] int64 receives each token's
// experts in slot order (-1 for a slot the token does not use) and `expert_counts` [E] int64 is added the
// tokens routed to each expert.
Tensor decode_layer(const Tensor& x, const Tensor& attn_norm, const Tensor& wq, const Tensor& wk, const Tensor& wv,
                    const Tensor& wo, const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                    int64_t head_dim, double eps, const Tensor& both, const Tensor& sign, const Tensor& slots,
                    Tensor& k_cache, Tensor& v_cache, const Tensor& rows, const Tensor& context_slots,
                    const Tensor& lengths, const Tensor& ffn_norm, const Tensor& centroids, const Tensor& router,
                    const std::optional<Tensor>& bias, double temperature, int64_t top, bool softmax, int64_t k,
                    int64_t k_min, double threshold, bool renormalize, double gate_scale,
                    const std::optional<Tensor>& codes13, const std::optional<Tensor>& scales13,
                    const std::optional<Tensor>& shifts13, const std::optional<Tensor>& codes2,
                    const std::optional<Tensor>& scales2, const std::optional<Tensor>& shifts2, int64_t group_size,
                    int64_t amx_min_rows, const std::optional<Tensor>& w1, const std::optional<Tensor>& w3,
                    const std::optional<Tensor>& w2, int64_t max_rows, const std::optional<Tensor>& routed,
                    const std::optional<Tensor>& expert_counts) {
  check_tensor(x, "x", {at::kBFloat16}, 2);
  TORCH_CHECK(head_dim > 0, "head_dim must be positive, not ", head_dim);
  TORCH_CHECK(max_rows >= 0, "max_rows must not be negative, not ", max_rows);
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q_norm and k_norm: both or neither");
  const bool int4 = codes13 && scales13 && codes2 && scales2;
  TORCH_CHECK(int4 != (w1 && w3 && w2) && (int4 || !(codes13 || scales13 || codes2 || scales2)),
              "the experts: int4 codes and scales, or bfloat16 stacks w1, w3 and w2, not both or neither");
  const int64_t T = x.size(0);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == T && rows.dim() == 1 && rows.size(0) == T,
              "a decode layer attends one token per sequence: ", T, " rows, ", rows.numel(), " attending and ",
              lengths.numel(), " context lengths");
  const Tensor h = rms_norm(x, attn_norm, eps);
  Tensor q = project(h, wq, max_rows), kk = project(h, wk, max_rows);
  const Tensor v = project(h, wv, max_rows);
  if (q_norm) {
    q = rms_norm(q, *q_norm, eps);
    kk = rms_norm(kk, *k_norm, eps);
  }
  TORCH_CHECK(q.size(1) % head_dim == 0 && kk.size(1) % head_dim == 0, "the projections' widths ", q.size(1), " and ",
              kk.size(1), " are not whole heads of ", head_dim);
  const Tensor q3 = q.view({T, q.size(1) / head_dim, head_dim});
  const Tensor qr = rope_cache(q3, kk.view({T, kk.size(1) / head_dim, head_dim}),
                               v.view({T, v.size(1) / head_dim, head_dim}), both, sign, slots, k_cache, v_cache);
  Tensor attended = at::empty_like(qr);
  decode_attention(qr, k_cache, v_cache, rows, context_slots, lengths, attended);
  const Tensor x1 = at::add(x, project(attended.view({T, q.size(1)}), wo, max_rows));
  const Tensor h2 = rms_norm(x1, ffn_norm, eps);
  const auto [experts, gates, mask, k_T, counts, load, token_S, gate_S] =
      route(h2, centroids, router, bias, temperature, top, softmax, k, k_min, threshold, renormalize, gate_scale);
  if (routed) {
    TORCH_CHECK(routed->scalar_type() == at::kLong && routed->dim() == 2 && routed->size(0) == T &&
                routed->size(1) == k, "routed must be int64 [", T, ", ", k, "]");
    routed->copy_(experts.masked_fill(mask.logical_not(), -1));
  }
  if (expert_counts) {
    TORCH_CHECK(expert_counts->scalar_type() == at::kLong && expert_counts->dim() == 1 &&
                expert_counts->size(0) == counts.size(0), "expert_counts must be int64 [", counts.size(0), "]");
    expert_counts->add_(counts);
  }
  const int64_t* cp = counts.const_data_ptr<int64_t>();
  const std::vector<int64_t> host(cp, cp + counts.numel());
  const Tensor xs = h2.index_select(0, token_S);
  const Tensor y = int4 ? int4_swiglu(xs, host, *codes13, *scales13, shifts13, *codes2, *scales2, shifts2, group_size,
                                      amx_min_rows, std::nullopt)
                        : dense_experts(xs, host, *w1, *w3, *w2, max_rows);
  return at::add(x1, combine(y, token_S, gate_S, T));
}

}  // namespace

TORCH_LIBRARY(lcc, m) {
  m.def("amx_init() -> bool", &amx_init);
  m.def("simd_exp(Tensor x) -> Tensor");
  m.def("int4_matmul(Tensor x, int[] counts, Tensor codes, Tensor scales, Tensor? shifts, int group_size, "
        "int amx_min_rows) -> Tensor");
  m.def("int4_swiglu(Tensor x, int[] counts, Tensor codes13, Tensor scales13, Tensor? shifts13, Tensor codes2, "
        "Tensor scales2, Tensor? shifts2, int group_size, int amx_min_rows, bool? dot_products=None) -> Tensor");
  m.def("rope_cache(Tensor q, Tensor k, Tensor v, Tensor both, Tensor sign, Tensor slots, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor slots, Tensor lengths, "
        "Tensor(a!) out) -> ()");
  m.def("bf16_linear(Tensor x, Tensor weight, bool? dot_products=None) -> Tensor");
  m.def("has_avx512_bf16() -> bool", [] { return lcc_has_avx512_bf16() != 0; });
  m.def("route(Tensor x, Tensor centroids, Tensor weight, Tensor? bias, float temperature, int top, bool softmax, "
        "int k, int k_min, float threshold, bool renormalize, float gate_scale) -> (Tensor experts, Tensor gates, "
        "Tensor mask, Tensor k, Tensor counts, Tensor load, Tensor token_S, Tensor gate_S)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");  // each slice of weight's size along x's last dim
  m.def("bf16_swiglu(Tensor x, int[] counts, Tensor w1, Tensor w3, Tensor w2, bool? dot_products=None) -> Tensor");
  m.def("combine(Tensor y, Tensor token_S, Tensor gate_S, int tokens) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor attn_norm, Tensor wq, Tensor wk, Tensor wv, Tensor wo, Tensor? q_norm, "
        "Tensor? k_norm, int head_dim, float eps, Tensor both, Tensor sign, Tensor slots, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor rows, Tensor context_slots, Tensor lengths, Tensor ffn_norm, Tensor centroids, "
        "Tensor router, Tensor? bias, float temperature, int top, bool softmax, int k, int k_min, float threshold, "
        "bool renormalize, float gate_scale, Tensor? codes13, Tensor? scales13, Tensor? shifts13, Tensor? codes2, "
        "Tensor? scales2, Tensor? shifts2, int group_size, int amx_min_rows, Tensor? w1, Tensor? w3, Tensor? w2, "
        "int max_rows, Tensor(c!)? routed=None, Tensor(d!)? expert_counts=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lcc, CPU, m) {
  m.impl("simd_exp", &simd_exp);
  m.impl("int4_matmul", &int4_matmul);
  m.impl("int4_swiglu", &int4_swiglu);
  m.impl("rope_cache", &rope_cache);
  m.impl("decode_attention", &decode_attention);
  m.impl("route", &route);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("bf16_swiglu", &bf16_swiglu);
  m.impl("combine", &combine);
  m.impl("decode_layer", &decode_layer);
}
