// CPU kernels for the fused CBAM (the paper's variant: avg + max pooling, channel pooling,
// channel then spatial). Each kernel is one pass over the feature map, in NCHW or
// channels_last, so a residual block's tail reads the conv output three times in the forward
// (statistics and H x W pools; channel pools; gates + residual + ReLU) and three times in the
// backward (two passes and one product), where the separate ATen ops read or write it about
// twenty times.
//
// In a block the map is the block's conv output `b` and the kernels apply the block's
// BatchNorm on the fly as x = alpha[c] * b + beta[c]; outside a block alpha and beta are None
// and x = b. Arithmetic is in float (double for double inputs). The entry points run a whole
// forward or backward in one call (`forward_eval`; `forward_train` and `backward_train`,
// which fused_cbam.py calls from its autograd function): the passes below, the MLP's products
// and the spatial BatchNorm in ATen, the spatial gate's k x k conv and every per-channel or
// per-(n, c) step as plain loops. fused_cbam.py has the same math as separate ATen ops.
//
// Reductions along the contiguous axis keep kLanes partial results (sums, or max/min with
// their indices) in GCC vector types: one accumulator per lane, combined at the end as a
// tree, ties going to the lowest index. (Written as arrays of lanes, GCC kept them in scalar
// registers: the statistics pass ran 4x slower than a copy of the map.)

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using Opt = std::optional<Tensor>;
constexpr int64_t kLanes = 16;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool channels_last(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_map(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "the map must be N x C x H x W, got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "the map must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the map must be contiguous or channels_last");
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31), "H x W too large");
  // The kernels divide by N, C and H x W: an empty map would fault (ValueError in Python).
  TORCH_CHECK_VALUE(x.numel() > 0, "the kernels need a non-empty map, got ", x.sizes());
}

// A full-size tensor laid out like `like` (NCHW or channels_last), in its dtype. (The checks
// first: each ATen call costs microseconds, and these run ~20 times per block.)
Tensor in_layout(const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), "a map passed with the input must have its size ",
              like.sizes(), ", got ", t.sizes());
  const auto format = channels_last(like) ? at::MemoryFormat::ChannelsLast
                                          : at::MemoryFormat::Contiguous;
  if (t.scalar_type() == like.scalar_type() && t.is_contiguous(format)) return t;
  return t.to(like.scalar_type()).contiguous(format);
}

// Small tensors (per channel, per (n, c), per position) as contiguous float; None (or an
// undefined tensor): undefined.
Tensor vec(const Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}
Tensor vec(const Opt& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? vec(*t, acc) : Tensor();
}

// A small tensor the kernels index by position: its element count checked (None passes).
void check_numel(const Opt& t, int64_t numel, const char* what) {
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->numel() == numel, what, " must have ", numel, " elements for this map, got ",
                t->sizes());
  }
}

// The block BatchNorm's per-channel tensors, C each.
void check_block(const Opt& w, const Opt& b, const Opt& rm, const Opt& rv, int64_t c) {
  check_numel(w, c, "the block BatchNorm's weight");
  check_numel(b, c, "the block BatchNorm's bias");
  check_numel(rm, c, "the block BatchNorm's running mean");
  check_numel(rv, c, "the block BatchNorm's running var");
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// with_flags(f, a, b, ...) calls f(std::integral_constant<bool, a>{}, ...): flags that select
// a kernel's variant at compile time, so that its inner loops carry no branches.
template <typename F>
void with_flags(F&& f) {
  f();
}
template <typename F, typename... Bools>
void with_flags(F&& f, bool first, Bools... rest) {
  if (first) {
    with_flags([&](auto... flags) { f(std::true_type{}, flags...); }, rest...);
  } else {
    with_flags([&](auto... flags) { f(std::false_type{}, flags...); }, rest...);
  }
}

#define ROW __attribute__((noinline)) void  // restrict-qualified rows vectorise reliably

// kLanes values of the accumulation type, and integers of the same width (what comparing two
// of them gives; used for indices).
template <typename acc_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t index __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t index __attribute__((vector_size(kLanes * sizeof(double))));
};

template <typename V, typename scalar_t>
V load(const scalar_t* q) {
  V v;
  if constexpr (sizeof(scalar_t) * kLanes == sizeof(V)) {
    std::memcpy(&v, q, sizeof v);
  } else {
    for (int64_t j = 0; j < kLanes; ++j) v[j] = q[j];
  }
  return v;
}

template <typename V, typename scalar_t>
void store(scalar_t* q, const V& v) {
  if constexpr (sizeof(scalar_t) * kLanes == sizeof(V)) {
    std::memcpy(q, &v, sizeof v);
  } else {
    for (int64_t j = 0; j < kLanes; ++j) q[j] = scalar_t(v[j]);
  }
}

template <typename acc_t>
typename Lanes<acc_t>::type splat(acc_t value) {
  return typename Lanes<acc_t>::type{} + value;
}

// Lane j paired with lane j ^ S.
template <int S, typename V>
V swap_lanes(const V& v) {
  static_assert(kLanes == 16);
  return __builtin_shufflevector(v, v, 0 ^ S, 1 ^ S, 2 ^ S, 3 ^ S, 4 ^ S, 5 ^ S, 6 ^ S, 7 ^ S,
                                 8 ^ S, 9 ^ S, 10 ^ S, 11 ^ S, 12 ^ S, 13 ^ S, 14 ^ S, 15 ^ S);
}

// op over the lanes as a tree of 4 vector steps (a loop over 16 lanes costs 16 dependent
// scalar steps: at 4 x 4 maps, most of a row's time).
template <typename V, typename Op>
auto lane_reduce(V v, Op op) {
  v = op(v, swap_lanes<8>(v));
  v = op(v, swap_lanes<4>(v));
  v = op(v, swap_lanes<2>(v));
  v = op(v, swap_lanes<1>(v));
  return v[0];
}

template <typename acc_t>
acc_t lane_total(const typename Lanes<acc_t>::type& lanes) {
  return lane_reduce(lanes, [](auto a, auto b) { return a + b; });
}

// --------------------------------------------------------------------------- rows
// Each row function is one loop nest over contiguous memory.

// Per-(n, c) statistics of one contiguous slice (NCHW): a first loop for the sum, max and
// min (values only: that vectorises), a second over the slice, now in cache, for the sum of
// squared deviations (`Var`, for BatchNorm's batch statistics) and the first index of the max
// and of the min (`Index`, for the backward).
template <typename scalar_t, typename acc_t, bool Index, bool Var>
ROW stats_slice(const scalar_t* __restrict__ q, int64_t hw, acc_t* __restrict__ mean,
                acc_t* __restrict__ m2, acc_t* __restrict__ top, int32_t* __restrict__ top_at,
                acc_t* __restrict__ low, int32_t* __restrict__ low_at) {
  using V = typename Lanes<acc_t>::type;
  using I = typename Lanes<acc_t>::index;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t full = hw - hw % kLanes;
  V sum = splat<acc_t>(0), hi = splat<acc_t>(-inf), lo = splat<acc_t>(inf);
  for (int64_t i0 = 0; i0 < full; i0 += kLanes) {
    const V v = load<V>(q + i0);
    sum += v;
    hi = v > hi ? v : hi;
    lo = v < lo ? v : lo;
  }
  acc_t total = lane_total<acc_t>(sum);
  acc_t best_hi = lane_reduce(hi, [](auto a, auto b) { return a > b ? a : b; });
  acc_t best_lo = lane_reduce(lo, [](auto a, auto b) { return a < b ? a : b; });
  for (int64_t i = full; i < hw; ++i) {
    const acc_t v = q[i];
    total += v;
    best_hi = v > best_hi ? v : best_hi;
    best_lo = v < best_lo ? v : best_lo;
  }
  const acc_t m = total / hw;
  *mean = m;
  *top = best_hi;
  *low = best_lo;
  if constexpr (!Index && !Var) return;
  using index_t = decltype(I{}[0] + 0);
  const index_t none = std::numeric_limits<int32_t>::max();
  V d2 = splat<acc_t>(0);
  I hi_at = I{} + none, lo_at = I{} + none, at = I{};
  for (int64_t j = 0; j < kLanes; ++j) at[j] = index_t(j);
  const V vm = splat<acc_t>(m), v_hi = splat<acc_t>(best_hi), v_lo = splat<acc_t>(best_lo);
  const I v_none = I{} + none;
  for (int64_t i0 = 0; i0 < full; i0 += kLanes, at += index_t(kLanes)) {
    const V v = load<V>(q + i0);
    if constexpr (Var) d2 += (v - vm) * (v - vm);
    if constexpr (Index) {  // the first index per lane, as a running min (a 1-cycle chain)
      const I at_hi = v == v_hi ? at : v_none, at_lo = v == v_lo ? at : v_none;
      hi_at = at_hi < hi_at ? at_hi : hi_at;
      lo_at = at_lo < lo_at ? at_lo : lo_at;
    }
  }
  const auto lower = [](auto a, auto b) { return a < b ? a : b; };
  acc_t d2_total = lane_total<acc_t>(d2);
  index_t first_hi = lane_reduce(hi_at, lower), first_lo = lane_reduce(lo_at, lower);
  for (int64_t i = full; i < hw; ++i) {
    const acc_t v = q[i];
    d2_total += (v - m) * (v - m);
    if (v == best_hi && first_hi == none) first_hi = index_t(i);
    if (v == best_lo && first_lo == none) first_lo = index_t(i);
  }
  if constexpr (Var) *m2 = d2_total;
  if constexpr (Index) {
    *top_at = first_hi == none ? 0 : int32_t(first_hi);  // none: NaNs in the slice
    *low_at = first_lo == none ? 0 : int32_t(first_lo);
  }
}

// The same statistics for `count` channels of one sample, channels_last: position i's values
// are at q + i * stride (scalar running values per channel; the channels kLanes cannot fill).
template <typename scalar_t, typename acc_t, bool Index, bool Var>
ROW stats_sample(const scalar_t* __restrict__ q, int64_t hw, int64_t stride, int64_t count,
                 acc_t* __restrict__ mean, acc_t* __restrict__ m2, acc_t* __restrict__ hi,
                 int32_t* __restrict__ hi_at, acc_t* __restrict__ lo, int32_t* __restrict__ lo_at) {
  for (int64_t k = 0; k < count; ++k) {
    mean[k] = 0;
    hi[k] = lo[k] = q[k];
    if constexpr (Var) m2[k] = 0;
    if constexpr (Index) hi_at[k] = lo_at[k] = 0;
  }
  for (int64_t i = 0; i < hw; ++i) {
    const scalar_t* __restrict__ r = q + i * stride;
    const int32_t ii = int32_t(i);
    for (int64_t k = 0; k < count; ++k) {
      const acc_t v = r[k];
      mean[k] += v;
      const bool higher = v > hi[k], lower = v < lo[k];
      hi[k] = higher ? v : hi[k];
      lo[k] = lower ? v : lo[k];
      if constexpr (Index) {
        hi_at[k] = higher ? ii : hi_at[k];
        lo_at[k] = lower ? ii : lo_at[k];
      }
    }
  }
  for (int64_t k = 0; k < count; ++k) mean[k] /= hw;
  if constexpr (!Var) return;
  for (int64_t i = 0; i < hw; ++i) {
    const scalar_t* __restrict__ r = q + i * stride;
    for (int64_t k = 0; k < count; ++k) {
      const acc_t d = acc_t(r[k]) - mean[k];
      m2[k] += d * d;
    }
  }
}

// stats_sample for kLanes channels, their running values in registers: one cache line per
// position, and the variance's second loop reads the same hw x kLanes values, now in L1 or
// L2 (a whole sample's rows would come from L3 again).
template <typename scalar_t, typename acc_t, bool Index, bool Var>
ROW stats_lanes(const scalar_t* __restrict__ q, int64_t hw, int64_t stride,
                acc_t* __restrict__ mean, acc_t* __restrict__ m2, acc_t* __restrict__ hi,
                int32_t* __restrict__ hi_at, acc_t* __restrict__ lo, int32_t* __restrict__ lo_at) {
  using V = typename Lanes<acc_t>::type;
  using I = typename Lanes<acc_t>::index;
  using index_t = decltype(I{}[0] + 0);
  V sum = splat<acc_t>(0), top = load<V>(q), low = top;
  I top_at = I{}, low_at = I{};
  for (int64_t i = 0; i < hw; ++i) {
    const V v = load<V>(q + i * stride);
    sum += v;
    const I higher = v > top, lower = v < low;
    top = higher ? v : top;
    low = lower ? v : low;
    if constexpr (Index) {
      const I at = I{} + index_t(i);
      top_at = higher ? at : top_at;
      low_at = lower ? at : low_at;
    }
  }
  const V mu = sum / acc_t(hw);
  store(mean, mu);
  store(hi, top);
  store(lo, low);
  if constexpr (Index) {
    for (int64_t j = 0; j < kLanes; ++j) {
      hi_at[j] = int32_t(top_at[j]);
      lo_at[j] = int32_t(low_at[j]);
    }
  }
  if constexpr (Var) {
    V d2 = splat<acc_t>(0);
    for (int64_t i = 0; i < hw; ++i) {
      const V d = load<V>(q + i * stride) - mu;
      d2 += d * d;
    }
    store(m2, d2);
  }
}

// Channel pool, NCHW: `len` positions of one sample, running values per position (the sums
// become means at the end); the argmax only with `Index` (for a backward).
template <typename scalar_t, typename acc_t, bool Affine, bool Index>
ROW pool_positions(const scalar_t* __restrict__ p, int64_t c, int64_t hw, int64_t len,
                   const acc_t* __restrict__ a, const acc_t* __restrict__ bb,
                   const acc_t* __restrict__ g, acc_t* __restrict__ hi, acc_t* __restrict__ sum,
                   int32_t* __restrict__ hi_at) {
  for (int64_t i = 0; i < len; ++i) {
    hi[i] = -std::numeric_limits<acc_t>::infinity();
    sum[i] = 0;
    if constexpr (Index) hi_at[i] = 0;
  }
  for (int64_t k = 0; k < c; ++k) {
    const scalar_t* __restrict__ r = p + k * hw;
    const acc_t gk = g[k], ak = Affine ? a[k] : acc_t(1), bk = Affine ? bb[k] : acc_t(0);
    const int32_t kk = int32_t(k);
    for (int64_t i = 0; i < len; ++i) {
      const acc_t u = Affine ? (acc_t(r[i]) * ak + bk) * gk : acc_t(r[i]) * gk;
      sum[i] += u;
      const bool higher = u > hi[i];
      hi[i] = higher ? u : hi[i];
      if constexpr (Index) hi_at[i] = higher ? kk : hi_at[i];
    }
  }
  for (int64_t i = 0; i < len; ++i) sum[i] /= c;
}

// Channel pool, channels_last: one position, lanes along C; the argmax (with `Index`) in a
// second loop that recomputes u (bit for bit: the build disables floating-point contraction).
template <typename scalar_t, typename acc_t, bool Affine, bool Index>
ROW pool_channels(const scalar_t* __restrict__ r, int64_t c, const acc_t* __restrict__ a,
                  const acc_t* __restrict__ bb, const acc_t* __restrict__ g,
                  acc_t* __restrict__ top, acc_t* __restrict__ mean, int32_t* __restrict__ top_at) {
  using V = typename Lanes<acc_t>::type;
  using I = typename Lanes<acc_t>::index;
  using index_t = decltype(I{}[0] + 0);
  auto u_at = [&](int64_t k) -> acc_t {
    return Affine ? (acc_t(r[k]) * a[k] + bb[k]) * g[k] : acc_t(r[k]) * g[k];
  };
  auto u_lanes = [&](int64_t k0) -> V {
    const V v = load<V>(r + k0);
    return Affine ? (v * load<V>(a + k0) + load<V>(bb + k0)) * load<V>(g + k0)
                  : v * load<V>(g + k0);
  };
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  V sum = splat<acc_t>(0), hi = splat<acc_t>(-inf);
  const int64_t full = c - c % kLanes;
  for (int64_t k0 = 0; k0 < full; k0 += kLanes) {
    const V u = u_lanes(k0);
    sum += u;
    hi = u > hi ? u : hi;
  }
  acc_t total = lane_total<acc_t>(sum);
  acc_t best = lane_reduce(hi, [](auto a, auto b) { return a > b ? a : b; });
  for (int64_t k = full; k < c; ++k) {
    const acc_t u = u_at(k);
    total += u;
    best = u > best ? u : best;
  }
  *top = best;
  *mean = total / c;
  if constexpr (!Index) return;
  const index_t none = std::numeric_limits<int32_t>::max();
  const I v_none = I{} + none;
  const V v_best = splat<acc_t>(best);
  I first = v_none, at = I{};
  for (int64_t j = 0; j < kLanes; ++j) at[j] = index_t(j);
  for (int64_t k0 = 0; k0 < full; k0 += kLanes, at += index_t(kLanes)) {
    const I hit = u_lanes(k0) == v_best ? at : v_none;
    first = hit < first ? hit : first;
  }
  index_t found = lane_reduce(first, [](auto a, auto b) { return a < b ? a : b; });
  for (int64_t k = full; k < c && found == none; ++k) {
    if (u_at(k) == best) found = index_t(k);
  }
  *top_at = found == none ? 0 : int32_t(found);  // none only if every u is NaN
}

// Gates (and residual + ReLU) along a contiguous run: y = (a * b + bb) * g * ms. Per-channel
// values (a, bb, g) advance with `Step` (1: along channels, channels_last; 0: one channel,
// NCHW) and the per-position ms with 1 - Step.
template <typename scalar_t, typename acc_t, bool Affine, bool Block, int Step>
ROW gate_run(const scalar_t* __restrict__ p, const scalar_t* __restrict__ id, int64_t len,
             const acc_t* __restrict__ a, const acc_t* __restrict__ bb,
             const acc_t* __restrict__ g, const acc_t* __restrict__ ms, scalar_t* __restrict__ o) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t e = i * Step, v = i * (1 - Step);
    const acc_t x = Affine ? acc_t(p[i]) * a[e] + bb[e] : acc_t(p[i]);
    const acc_t y = x * g[e] * ms[v];
    if constexpr (Block) {
      const acc_t z = y + acc_t(id[i]);
      o[i] = z < 0 ? acc_t(0) : z;  // NaN stays NaN, as in torch.relu
    } else {
      o[i] = y;
    }
  }
}

// Backward's first pass along a contiguous run; see backward_reduce. Along positions (NCHW,
// `Step` 0: a, bb, g are one value, ms and g_ms per element; s0, s1 summed into *s0, *s1) or
// along channels (channels_last, `Step` 1: a, bb, g, s0, s1 per element, ms one value and
// g_ms summed into *g_ms).
template <typename scalar_t, typename acc_t, bool Affine, bool Block, int Step>
ROW reduce_run(const scalar_t* __restrict__ p, const scalar_t* __restrict__ go,
               const scalar_t* __restrict__ yo, scalar_t* __restrict__ gy, int64_t len,
               const acc_t* __restrict__ a, const acc_t* __restrict__ bb,
               const acc_t* __restrict__ g, const acc_t* __restrict__ ms,
               acc_t* __restrict__ g_ms, acc_t* __restrict__ s0, acc_t* __restrict__ s1) {
  using V = typename Lanes<acc_t>::type;
  V t0 = splat<acc_t>(0), t1 = splat<acc_t>(0), acc = splat<acc_t>(0);
  const int64_t full = len - len % kLanes;
  for (int64_t i0 = 0; i0 < full; i0 += kLanes) {
    V gv = load<V>(go + i0);
    if constexpr (Block) {
      gv = load<V>(yo + i0) > splat<acc_t>(0) ? gv : splat<acc_t>(0);
      store(gy + i0, gv);
    }
    const V v = load<V>(p + i0);
    if constexpr (Step == 0) {
      const V x = Affine ? v * a[0] + bb[0] : v;
      const V t = gv * load<V>(ms + i0);
      store(g_ms + i0, load<V>(g_ms + i0) + gv * x * g[0]);
      t0 += t;
      t1 += t * v;
    } else {
      const V x = Affine ? v * load<V>(a + i0) + load<V>(bb + i0) : v;
      const V t = gv * ms[0];
      acc += gv * x * load<V>(g + i0);
      store(s0 + i0, load<V>(s0 + i0) + t);
      store(s1 + i0, load<V>(s1 + i0) + t * v);
    }
  }
  acc_t r0 = 0, r1 = 0, r2 = 0;
  for (int64_t i = full; i < len; ++i) {
    acc_t gv = go[i];
    if constexpr (Block) {
      gv = yo[i] > scalar_t(0) ? gv : acc_t(0);
      gy[i] = gv;
    }
    const acc_t v = p[i];
    const acc_t x = Affine ? v * a[i * Step] + bb[i * Step] : v;
    const acc_t t = gv * ms[i * (1 - Step)];
    if constexpr (Step == 0) {
      g_ms[i] += gv * x * g[0];
      r0 += t;
      r1 += t * v;
    } else {
      r2 += gv * x * g[i];
      s0[i] += t;
      s1[i] += t * v;
    }
  }
  if constexpr (Step == 0) {
    *s0 = r0 + lane_total<acc_t>(t0);
    *s1 = r1 + lane_total<acc_t>(t1);
  } else {
    *g_ms = r2 + lane_total<acc_t>(acc);
  }
}

// Backward's last pass along a contiguous run: scale * (g_y * ms + g_mean) + k2 * b + shift,
// with scale, k2, shift per element (`Step` 1) or one value (0), ms and g_mean the reverse.
template <typename scalar_t, typename acc_t, bool WithK2, int Step>
ROW grad_run(const scalar_t* __restrict__ p, const scalar_t* __restrict__ gy, int64_t len,
             const acc_t* __restrict__ ms, const acc_t* __restrict__ g_mean,
             const acc_t* __restrict__ scale, const acc_t* __restrict__ k2,
             const acc_t* __restrict__ shift, scalar_t* __restrict__ o) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t e = i * Step, v = i * (1 - Step);
    const acc_t rest = WithK2 ? k2[e] * acc_t(p[i]) + shift[e] : shift[e];
    o[i] = scale[e] * (acc_t(gy[i]) * ms[v] + g_mean[v]) + rest;
  }
}

// --------------------------------------------------------------------------- forward

// Per (n, c), over H x W: mean, max and min (the min is the max of a BatchNorm output whose
// scale is negative); with `with_index` (for the backward) the first position of each, with
// `with_variance` (for BatchNorm's batch statistics) the sum of squared deviations from the
// mean. Those come from a second loop over data still in cache: BatchNorm's variance without
// E[x^2] - E[x]^2's cancellation. What is not asked for has no rows (a torch op returns no
// None).
std::vector<Tensor> hw_stats(const Tensor& x, bool with_index, bool with_variance) {
  check_map(x);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto fopt = x.options().dtype(acc_type(x));
  auto iopt = x.options().dtype(at::kInt);
  const int64_t index_rows = with_index ? n : 0, variance_rows = with_variance ? n : 0;
  Tensor mean = at::empty({n, c}, fopt), m2 = at::empty({variance_rows, c}, fopt);
  Tensor top = at::empty({n, c}, fopt), top_at = at::empty({index_rows, c}, iopt);
  Tensor low = at::empty({n, c}, fopt), low_at = at::empty({index_rows, c}, iopt);
  const bool cl = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hw_stats", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    acc_t *o_mean = mean.data_ptr<acc_t>(), *o_m2 = m2.data_ptr<acc_t>();
    acc_t *o_top = top.data_ptr<acc_t>(), *o_low = low.data_ptr<acc_t>();
    int32_t *o_top_at = top_at.data_ptr<int32_t>(), *o_low_at = low_at.data_ptr<int32_t>();
    with_flags([&](auto index_, auto var_) {
      if (cl) {
        // A task: kLanes channels of one sample (the last: the rest, one by one); without
        // indices or variance, whole samples: their running values in L1 cost less there
        // than kLanes-wide columns of a sample's rows.
        const int64_t lanes = index_ || var_ ? kLanes : c;
        const int64_t chunks = c / lanes + (c % lanes ? 1 : 0);
        at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / chunks, k0 = (task % chunks) * lanes, r = b * c + k0;
            const scalar_t* q = p + b * hw * c + k0;
            if (lanes == kLanes && k0 + kLanes <= c) {
              stats_lanes<scalar_t, acc_t, index_, var_>(q, hw, c, o_mean + r, o_m2 + r,
                                                         o_top + r, o_top_at + r, o_low + r,
                                                         o_low_at + r);
            } else {
              stats_sample<scalar_t, acc_t, index_, var_>(q, hw, c, c - k0, o_mean + r,
                                                          o_m2 + r, o_top + r, o_top_at + r,
                                                          o_low + r, o_low_at + r);
            }
          }
        });
      } else {
        at::parallel_for(0, n * c, 4, [&](int64_t begin, int64_t end) {
          for (int64_t nc = begin; nc < end; ++nc) {
            stats_slice<scalar_t, acc_t, index_, var_>(p + nc * hw, hw, o_mean + nc, o_m2 + nc,
                                                       o_top + nc, o_top_at + nc, o_low + nc,
                                                       o_low_at + nc);
          }
        });
      }
    }, with_index, with_variance);
  });
  return {mean, m2, top, top_at, low, low_at};
}

// Per position, over C, of u = x * mc[n, c]: the max and the mean, as an N x 2 x H x W map
// [max, mean] (in the accumulation type, NCHW), and with `with_index` the max's channel as
// N x 1 x H x W int32 (else an empty tensor).
std::pair<Tensor, Tensor> pool_over_channels(const Tensor& x, const Opt& alpha_in,
                                             const Opt& beta_in, const Tensor& mc_in,
                                             bool with_index) {
  check_map(x);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
  const Tensor alpha = vec(alpha_in, acc_type(x)), beta = vec(beta_in, acc_type(x));
  const Tensor mc = vec(mc_in, acc_type(x));
  Tensor pooled = at::empty({n, 2, h, w}, x.options().dtype(acc_type(x)));
  Tensor index = at::empty({with_index ? n : 0, 1, h, w}, x.options().dtype(at::kInt));
  const bool cl = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_pool", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    const acc_t *a = ptr<acc_t>(alpha), *bb = ptr<acc_t>(beta), *g = ptr<acc_t>(mc);
    acc_t* o = pooled.data_ptr<acc_t>();  // sample b: max at o + 2 b hw, mean hw further
    int32_t* idx = index.data_ptr<int32_t>();
    with_flags([&](auto affine, auto cl_, auto index_) {
      if constexpr (!cl_) {
        constexpr int64_t kChunk = 256;  // positions per task: the running values stay in L1
        const int64_t chunks = (hw + kChunk - 1) / kChunk;
        at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / chunks, i0 = (task % chunks) * kChunk;
            const int64_t at_ = 2 * b * hw + i0;
            pool_positions<scalar_t, acc_t, affine, index_>(
                p + b * c * hw + i0, c, hw, std::min(kChunk, hw - i0), a, bb, g + b * c, o + at_,
                o + at_ + hw, index_ ? idx + b * hw + i0 : nullptr);
          }
        });
      } else {
        at::parallel_for(0, n * hw, 16, [&](int64_t begin, int64_t end) {
          for (int64_t pos = begin; pos < end; ++pos) {
            const int64_t at_ = pos + (pos / hw) * hw;  // 2 b hw + i
            pool_channels<scalar_t, acc_t, affine, index_>(p + pos * c, c, a, bb,
                                                           g + (pos / hw) * c, o + at_,
                                                           o + at_ + hw, index_ ? idx + pos : nullptr);
          }
        });
      }
    }, alpha.defined(), cl, with_index);
  });
  return {pooled, index};
}

// The channel pools as the spatial conv takes them ([max, mean] in x's dtype) and the max's
// channel per position (int32: half the bytes of ATen's int64 indices, kept until the
// backward).
std::vector<Tensor> channel_pool(const Tensor& x, const Opt& alpha, const Opt& beta,
                                 const Tensor& mc, bool with_index) {
  auto [pooled, index] = pool_over_channels(x, alpha, beta, mc, with_index);
  return {pooled.to(x.scalar_type()), index};
}

// --------------------------------------------------------------------------- spatial conv
// The spatial gate's k x k conv (2 -> 1 channels, stride 1, "same" zero padding) and its
// backward, direct: a conv this small costs oneDNN ~100-200 us of set-up per call, three calls
// per block and training step, far more than its arithmetic. The maps are first copied with
// a zero border (`bordered`), so every product is a kLanes-wide load with no bounds to check:
// with per-row bounds the rows' short loops ran mostly scalar (28 x 28 maps at 6 GMAC/s).

// `maps` h x w maps as rows of `width` values with k - 1 zero rows and columns around them
// (pad before, the rest after) and zeros up to `width`: a row of output positions x0..x0 +
// kLanes - 1 reads x0 + kx for each kx < k, all within the row.
struct Bordered {
  Tensor data;
  int64_t rows, width;
};

// (Plain loops: zeros, narrow and copy_ cost ~23 us per call in the model, 5x the conv.)
Bordered bordered(const Tensor& maps_in, int64_t k, int64_t pad, at::ScalarType acc) {
  const Tensor maps = maps_in.to(acc).contiguous();
  const int64_t count = maps.size(0) * maps.size(1), h = maps.size(2), w = maps.size(3);
  const int64_t rows = h + k - 1, width = (w + kLanes - 1) / kLanes * kLanes + k - 1;
  Tensor data = at::empty({count, rows, width}, maps.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bordered", [&] {
    const scalar_t* m = maps.const_data_ptr<scalar_t>();
    scalar_t* d = data.data_ptr<scalar_t>();
    std::fill(d, d + count * rows * width, scalar_t(0));
    for (int64_t map = 0; map < count; ++map) {
      for (int64_t y = 0; y < h; ++y) {
        std::copy(m + (map * h + y) * w, m + (map * h + y + 1) * w,
                  d + (map * rows + y + pad) * width + pad);
      }
    }
  });
  return {data, rows, width};
}

// One output map from `cin` bordered input maps: out[y, x] = (sum over ci, ky, kx of
// kernel[ci, ky, kx] * in[ci, y + ky, x + kx]) * scale + shift, kLanes positions at a time.
template <typename acc_t>
ROW conv_one_map(const acc_t* __restrict__ in, int64_t cin, const Bordered& layout, int64_t h,
                 int64_t w, const acc_t* __restrict__ kernel, int64_t k, acc_t scale,
                 acc_t shift, acc_t* __restrict__ out) {
  using V = typename Lanes<acc_t>::type;
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x0 = 0; x0 < w; x0 += kLanes) {
      V sum = splat<acc_t>(0);
      for (int64_t ci = 0; ci < cin; ++ci) {
        for (int64_t ky = 0; ky < k; ++ky) {
          const acc_t* __restrict__ row = in + (ci * layout.rows + y + ky) * layout.width + x0;
          const acc_t* __restrict__ weights = kernel + (ci * k + ky) * k;
          for (int64_t kx = 0; kx < k; ++kx) sum += splat<acc_t>(weights[kx]) * load<V>(row + kx);
        }
      }
      sum = sum * scale + shift;
      acc_t* __restrict__ o = out + y * w + x0;
      if (x0 + kLanes <= w) {
        store(o, sum);
      } else {
        for (int64_t j = 0; j < w - x0; ++j) o[j] = sum[j];
      }
    }
  }
}

// One weight's grad, kernel[ci, ky, kx]: the sum over samples and positions of g[y, x] *
// in[ci, y + ky, x + kx], both bordered (g's border is `pad` wide: its zeros past w keep the
// lanes beyond the map out of the sum).
template <typename acc_t>
acc_t weight_grad(const acc_t* __restrict__ g, const acc_t* __restrict__ in, const Bordered& gb,
                  const Bordered& ib, int64_t n, int64_t h, int64_t w, int64_t pad, int64_t ci,
                  int64_t ky, int64_t kx) {
  using V = typename Lanes<acc_t>::type;
  V sum = splat<acc_t>(0);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t y = 0; y < h; ++y) {
      const acc_t* __restrict__ g_row = g + (s * gb.rows + y + pad) * gb.width + pad;
      const acc_t* __restrict__ row = in + ((s * 2 + ci) * ib.rows + y + ky) * ib.width + kx;
      for (int64_t x0 = 0; x0 < w; x0 += kLanes) sum += load<V>(g_row + x0) * load<V>(row + x0);
    }
  }
  return lane_total<acc_t>(sum);
}

void check_spatial_conv(const Tensor& input, const Tensor& weight, int64_t padding) {
  TORCH_CHECK(input.dim() == 4 && input.size(1) == 2, "the spatial conv's input must be N x 2 x H x W");
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
              "the spatial conv's input and kernel must be CPU tensors");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == 2 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "the spatial gate's kernel must be 1 x 2 x k x k with k odd");
  TORCH_CHECK(2 * padding + 1 == weight.size(2), "the spatial conv keeps the map's size: padding ",
              "must be (k - 1) / 2 = ", (weight.size(2) - 1) / 2, ", got ", padding);
}

// N x 1 x H x W: conv(input) * scale + shift, in input's dtype (arithmetic in float or double).
Tensor conv_maps(const Tensor& input, const Tensor& weight, int64_t padding, double scale,
                 double shift) {
  check_spatial_conv(input, weight, padding);
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3), k = weight.size(3);
  const at::ScalarType acc = acc_type(input);
  const Tensor kernel = vec(weight, acc);
  const Bordered in = bordered(input, k, padding, acc);
  Tensor out = at::empty({n, 1, h, w}, input.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "spatial_conv", [&] {
    const scalar_t *p = in.data.const_data_ptr<scalar_t>(), *kw = kernel.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / (h * w));  // small maps: one thread
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        conv_one_map<scalar_t>(p + s * 2 * in.rows * in.width, 2, in, h, w, kw, k,
                               scalar_t(scale), scalar_t(shift), o + s * h * w);
      }
    });
  });
  return out.to(input.scalar_type());
}

Tensor spatial_conv(const Tensor& input, const Tensor& weight, int64_t padding) {
  return conv_maps(input, weight, padding, 1.0, 0.0);
}

// The grads of the spatial conv's input (N x 2 x H x W, input's dtype) and weight (1 x 2 x k x
// k, weight's dtype) from the grad of its output g_s (N x 1 x H x W).
std::vector<Tensor> spatial_conv_backward(const Tensor& g_s_in, const Tensor& input,
                                          const Tensor& weight, int64_t padding) {
  check_spatial_conv(input, weight, padding);
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3), k = weight.size(3);
  TORCH_CHECK(g_s_in.sizes() == at::IntArrayRef({n, 1, h, w}),
              "the spatial conv's output grad must be N x 1 x H x W like its output, got ",
              g_s_in.sizes());
  const at::ScalarType acc = acc_type(input);
  // the input's grad: each input map is the output grad convolved with the flipped kernel
  const Tensor flipped = vec(weight, acc).view({2, k, k}).flip({1, 2}).contiguous();
  const Bordered g = bordered(g_s_in, k, padding, acc), in = bordered(input, k, padding, acc);
  Tensor g_in = at::empty({n, 2, h, w}, input.options().dtype(acc));
  Tensor g_weight = at::empty({1, 2, k, k}, g_in.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "spatial_conv_backward", [&] {
    const scalar_t *pg = g.data.const_data_ptr<scalar_t>(), *p = in.data.const_data_ptr<scalar_t>();
    const scalar_t* kf = flipped.const_data_ptr<scalar_t>();
    scalar_t *o = g_in.data_ptr<scalar_t>(), *o_w = g_weight.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / (h * w));
    at::parallel_for(0, n * 2, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {  // (sample, input map)
        const int64_t s = task / 2, ci = task % 2;
        conv_one_map<scalar_t>(pg + s * g.rows * g.width, 1, g, h, w, kf + ci * k * k, k,
                               scalar_t(1), scalar_t(0), o + task * h * w);
      }
    });
    const int64_t weights = 2 * k * k;  // one task each, summing over the batch
    at::parallel_for(0, weights, n * h * w >= 4096 ? 1 : weights, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        o_w[i] = weight_grad<scalar_t>(pg, p, g, in, n, h, w, padding, i / (k * k),
                                       (i / k) % k, i % k);
      }
    });
  });
  return {g_in.to(input.scalar_type()), g_weight.to(weight.scalar_type())};
}

// One value of a 1-element tensor (reading it directly: `item` is an ATen call).
double value_of(const Tensor& t) {
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  return t.item<double>();
}

// Ms = sigmoid(BN(conv(pooled))) with the BatchNorm(1) in eval mode, N x 1 x H x W in
// pooled's (accumulation) type.
Tensor spatial_gate_eval(const Tensor& pooled, const Tensor& conv_w, int64_t padding,
                         const Opt& bn_w, const Opt& bn_b, const Tensor& bn_rm,
                         const Tensor& bn_rv, double bn_eps) {
  const double invstd = 1.0 / std::sqrt(value_of(bn_rv) + bn_eps);
  const double scale = bn_w ? value_of(*bn_w) * invstd : invstd;
  const double shift = (bn_b ? value_of(*bn_b) : 0.0) - value_of(bn_rm) * scale;
  return conv_maps(pooled, conv_w, padding, scale, shift).sigmoid_();
}

// y = x * mc[n, c] * ms[n, h, w], or in a block relu(y + identity): a new map laid out as x,
// or x itself with `in_place` (each element is read before it is written).
Tensor gate(const Tensor& x, const Opt& alpha_in, const Opt& beta_in, const Tensor& mc_in,
            const Tensor& ms_in, const Opt& identity_in, bool in_place) {
  check_map(x);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const Tensor alpha = vec(alpha_in, acc_type(x)), beta = vec(beta_in, acc_type(x));
  const Tensor mc = vec(mc_in, acc_type(x)), ms = vec(ms_in, acc_type(x));
  const Tensor identity = identity_in.has_value() ? in_layout(*identity_in, x) : Tensor();
  Tensor out = in_place ? x : at::empty_like(x);
  const bool cl = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gate", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t *p = x.const_data_ptr<scalar_t>(), *id = ptr<scalar_t>(identity);
    const acc_t *a = ptr<acc_t>(alpha), *bb = ptr<acc_t>(beta);
    const acc_t *g = mc.const_data_ptr<acc_t>(), *m = ms.const_data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    with_flags([&](auto affine, auto block) {
      if (!cl) {  // one (n, c) row: the channel's values fixed, ms along it
        at::parallel_for(0, n * c, 4, [&](int64_t begin, int64_t end) {
          for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t k = nc % c, off = nc * hw;
            gate_run<scalar_t, acc_t, affine, block, 0>(
                p + off, block ? id + off : nullptr, hw, affine ? a + k : nullptr,
                affine ? bb + k : nullptr, g + nc, m + (nc / c) * hw, o + off);
          }
        });
        return;
      }
      at::parallel_for(0, n * hw, 16, [&](int64_t begin, int64_t end) {
        for (int64_t pos = begin; pos < end; ++pos) {
          const int64_t off = pos * c;
          gate_run<scalar_t, acc_t, affine, block, 1>(p + off, block ? id + off : nullptr, c, a,
                                                      bb, g + (pos / hw) * c, m + pos, o + off);
        }
      });
    }, alpha.defined(), identity.defined());
  });
  return out;
}

// --------------------------------------------------------------------------- whole passes
// The forward and the backward as one call each: the kernels above, the MLP's and BatchNorm's
// ATen calls, and the small per-channel and per-(n, c) steps as plain loops (as ATen ops on C
// or N x C values, called from Python, they cost ~1.5 ms per block and training step in
// dispatch and thread start-ups, more than the kernels' passes over the map at stages 2-4).
// fused_cbam.py has the same math written with ATen ops (its ATen path).

// The pool types from their names joined by commas, "avg,max" (a torch op takes no list of
// strings).
std::vector<std::string> split_pools(const std::string& names) {
  std::vector<std::string> pools;
  for (size_t begin = 0; begin <= names.size();) {
    const size_t end = std::min(names.find(',', begin), names.size());
    pools.push_back(names.substr(begin, end - begin));
    begin = end + 1;
  }
  return pools;
}

// The block BatchNorm as alpha * b + beta per channel, from its (mean, invstd), both C, in
// the accumulation type; `bn_w`, `bn_b` None: no affine part.
std::pair<Tensor, Tensor> affine(const Tensor& mean, const Tensor& invstd, const Opt& bn_w,
                                 const Opt& bn_b) {
  const int64_t c = mean.size(0);
  Tensor alpha = at::empty({c}, mean.options()), beta = at::empty({c}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "affine", [&] {
    const Tensor w = vec(bn_w, mean.scalar_type()), b = vec(bn_b, mean.scalar_type());
    const scalar_t *m = mean.const_data_ptr<scalar_t>(), *s = invstd.const_data_ptr<scalar_t>();
    const scalar_t *pw = ptr<scalar_t>(w), *pb = ptr<scalar_t>(b);
    scalar_t *a = alpha.data_ptr<scalar_t>(), *o = beta.data_ptr<scalar_t>();
    for (int64_t k = 0; k < c; ++k) {
      a[k] = pw ? s[k] * pw[k] : s[k];
      o[k] = pb ? pb[k] - m[k] * a[k] : -m[k] * a[k];
    }
  });
  return {alpha, beta};
}

// 1 / sqrt(var + eps), in the accumulation type.
Tensor invstd_of(const Tensor& var, double eps, at::ScalarType acc) {
  const Tensor v = vec(var, acc);
  Tensor out = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(acc, "invstd", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t k = 0; k < v.numel(); ++k) o[k] = scalar_t(1) / std::sqrt(p[k] + scalar_t(eps));
  });
  return out;
}

// The MLP's P x N x C input, in the accumulation type: per pool, the per-(n, c) means or the
// map's values at the H x W argmax (`at_max`), through the block BatchNorm's alpha * v + beta
// where there is one (alpha undefined: none).
Tensor pooled_vectors(const Tensor& means, const Tensor& at_max, const Tensor& alpha,
                      const Tensor& beta, const std::vector<std::string>& pools) {
  const int64_t n = means.size(0), c = means.size(1);
  Tensor pooled = at::empty({int64_t(pools.size()), n, c}, means.options());
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "pooled", [&] {
    const scalar_t *a = ptr<scalar_t>(alpha), *b = ptr<scalar_t>(beta);
    scalar_t* o = pooled.data_ptr<scalar_t>();
    for (const auto& pool : pools) {
      TORCH_CHECK(pool == "avg" || pool == "max", "the kernels pool by avg or max, not ", pool);
      const scalar_t* v = (pool == "avg" ? means : at_max).const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n * c; i += c) {
        for (int64_t k = 0; k < c; ++k, ++o) *o = a ? v[i + k] * a[k] + b[k] : v[i + k];
      }
    }
  });
  return pooled;
}

// The H x W max of the map the gates see, per (n, c), and its position (int32; undefined
// without `with_index`), from hw_stats' outputs: BatchNorm is monotone per channel, so the
// max of its output is at the max of its input, or at the min where the scale is negative.
std::pair<Tensor, Tensor> hw_max(const std::vector<Tensor>& stats, const Tensor& alpha,
                                 bool with_index) {
  if (!alpha.defined()) return {stats[2], with_index ? stats[3] : Tensor()};
  const int64_t n = stats[2].size(0), c = stats[2].size(1);
  Tensor top = at::empty_like(stats[2]);
  Tensor where = with_index ? at::empty_like(stats[3]) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(top.scalar_type(), "hw_max", [&] {
    const scalar_t *a = alpha.const_data_ptr<scalar_t>(), *hi = stats[2].const_data_ptr<scalar_t>();
    const scalar_t* lo = stats[4].const_data_ptr<scalar_t>();
    const int32_t *hi_at = stats[3].const_data_ptr<int32_t>(), *lo_at = stats[5].const_data_ptr<int32_t>();
    scalar_t* o = top.data_ptr<scalar_t>();
    int32_t* o_at = with_index ? where.data_ptr<int32_t>() : nullptr;
    for (int64_t i = 0; i < n * c; i += c) {
      for (int64_t k = 0; k < c; ++k) {
        const bool flip = a[k] < 0;
        o[i + k] = flip ? lo[i + k] : hi[i + k];
        if (o_at) o_at[i + k] = flip ? lo_at[i + k] : hi_at[i + k];
      }
    }
  });
  return {top, where};
}

// The MLP's layers: x W^T + bias_scale * b for an R x K x and a J x K W (R: the batch times
// the pools, 16-64 rows). Written here rather than calling MKL: in the model, the first GEMM
// of each block cost 35-75 us more than the same call repeated (its code and buffers come
// back cold after the passes over the map), more than the whole product at stages 1-3.
// dot_tile: the dot products of up to kTile rows of x with up to kTile rows of W, kLanes
// columns at a time, each loaded value used kTile times: dots[i * kTile + c] for x's row i
// and W's row c.
constexpr int64_t kTile = 4;

template <typename acc_t>
ROW dot_tile(const acc_t* __restrict__ x, int64_t rows, const acc_t* __restrict__ w,
             int64_t cols, int64_t k, acc_t* __restrict__ dots) {
  using V = typename Lanes<acc_t>::type;
  V sums[kTile][kTile];
  for (int64_t i = 0; i < kTile; ++i) {
    for (int64_t c = 0; c < kTile; ++c) sums[i][c] = splat<acc_t>(0);
  }
  const int64_t full = k - k % kLanes;
  for (int64_t k0 = 0; k0 < full; k0 += kLanes) {
    V xv[kTile], wv[kTile];
    for (int64_t i = 0; i < kTile; ++i) {
      xv[i] = i < rows ? load<V>(x + i * k + k0) : splat<acc_t>(0);
      wv[i] = i < cols ? load<V>(w + i * k + k0) : splat<acc_t>(0);
      // W comes cold from memory in the model: ask for it 2 KB ahead (its rows are one stream)
      if (i < cols) __builtin_prefetch(w + i * k + k0 + 2048 / sizeof(acc_t));
    }
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t c = 0; c < kTile; ++c) sums[i][c] += xv[i] * wv[c];
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      acc_t total = lane_total<acc_t>(sums[i][c]);
      for (int64_t kk = full; kk < k; ++kk) total += x[i * k + kk] * w[c * k + kk];
      dots[i * kTile + c] = total;
    }
  }
}

// R x J in x's dtype: x W^T + bias_scale * b (b may be None); float and double as plain loops,
// other dtypes through ATen.
Tensor linear(const Tensor& x_in, const Tensor& w_in, const Opt& b_in, double bias_scale) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == x_in.size(1), "an MLP layer's weight must be ",
              "outputs x ", x_in.size(1), " for its ", x_in.size(1), " inputs, got ", w_in.sizes());
  check_numel(b_in, w_in.size(0), "an MLP layer's bias");
  const at::ScalarType dtype = w_in.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) {
    const Tensor x = x_in.to(dtype);
    return b_in ? at::addmm(*b_in, x, w_in.t(), bias_scale) : at::mm(x, w_in.t());
  }
  const Tensor x = x_in.to(dtype).contiguous(), w = w_in.contiguous(), b = vec(b_in, dtype);
  const int64_t r = x.size(0), k = x.size(1), j = w.size(0);
  Tensor out = at::empty({r, j}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "linear", [&] {
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pw = w.const_data_ptr<scalar_t>();
    const scalar_t* pb = ptr<scalar_t>(b);
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t scale = scalar_t(bias_scale);
    // a task: kTile rows of W (~128k multiply-adds or more; smaller products stay on one thread)
    const int64_t tiles = (j + kTile - 1) / kTile;
    const int64_t per_tile = std::max<int64_t>(1, r * k * kTile);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / per_tile);
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      scalar_t dots[kTile * kTile];
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t c0 = tile * kTile, cols = std::min(kTile, j - c0);
        for (int64_t r0 = 0; r0 < r; r0 += kTile) {
          const int64_t rows = std::min(kTile, r - r0);
          dot_tile<scalar_t>(px + r0 * k, rows, pw + c0 * k, cols, k, dots);
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t c = 0; c < cols; ++c) {
              const scalar_t shift = pb ? scale * pb[c0 + c] : scalar_t(0);
              o[(r0 + i) * j + c0 + c] = dots[i * kTile + c] + shift;
            }
          }
        }
      }
    });
  });
  return out;
}

// Mc = sigmoid(sum over pools of MLP(pool)), N x C, and the hidden activations after the
// ReLU (P x N x hidden), in the MLP's dtype. The second layer is linear: applied once to the
// hidden activations summed over the pools, with P x b2, it gives the sum of the P outputs for
// half the work.
std::pair<Tensor, Tensor> channel_gate(const Tensor& pooled, const Tensor& w1, const Opt& b1,
                                       const Tensor& w2, const Opt& b2) {
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == pooled.size(2), "the MLP's second weight must have ",
              "one row per channel (", pooled.size(2), "), got ", w2.sizes());
  const int64_t npools = pooled.size(0), n = pooled.size(1);
  Tensor hidden = linear(pooled.flatten(0, 1), w1, b1, 1.0).view({npools, n, -1});
  Tensor summed = at::empty({hidden.size(1), hidden.size(2)}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "relu_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* h = hidden.data_ptr<scalar_t>();
    scalar_t* o = summed.data_ptr<scalar_t>();
    const int64_t size = summed.numel();
    for (int64_t i = 0; i < size; ++i) {
      acc_t total = 0;
      for (int64_t j = 0; j < npools; ++j) {
        const scalar_t v = std::max(h[j * size + i], scalar_t(0));
        h[j * size + i] = v;
        total += acc_t(v);
      }
      o[i] = scalar_t(total);
    }
  });
  Tensor mc = linear(summed, w2, b2, double(npools));
  return {mc.sigmoid_(), hidden};
}

// The whole forward in eval mode (BatchNorms on their running statistics, nothing kept for a
// backward). `block_*`: the block's BatchNorm (None outside a block); `spatial_*`: the spatial
// gate's BatchNorm(1). `in_place`: write the output over x (the caller's scratch: it saves a
// map).
Tensor forward_eval(const Tensor& x, const Opt& identity, const Opt& block_w, const Opt& block_b,
                    const Opt& block_rm, const Opt& block_rv, double block_eps,
                    const Tensor& w1, const Opt& b1, const Tensor& w2, const Opt& b2,
                    const std::string& pool_names, const Tensor& conv_w, int64_t padding,
                    const Opt& spatial_w, const Opt& spatial_b, const Tensor& spatial_rm,
                    const Tensor& spatial_rv, double spatial_eps, bool in_place) {
  check_map(x);
  check_block(block_w, block_b, block_rm, block_rv, x.size(1));
  const std::vector<std::string> pools = split_pools(pool_names);
  const at::ScalarType acc = acc_type(x);
  const std::vector<Tensor> stats = hw_stats(x, false, false);
  Tensor alpha, beta;
  if (block_rm.has_value()) {
    const Tensor mean = vec(*block_rm, acc);
    const Tensor invstd = invstd_of(*block_rv, block_eps, acc);
    std::tie(alpha, beta) = affine(mean, invstd, block_w, block_b);
  }
  const Tensor top = hw_max(stats, alpha, false).first;
  const Tensor mc = channel_gate(pooled_vectors(stats[0], top, alpha, beta, pools), w1, b1, w2,
                                 b2).first;
  const Tensor ms = spatial_gate_eval(pool_over_channels(x, alpha, beta, mc, false).first, conv_w,
                                      padding, spatial_w, spatial_b, spatial_rm, spatial_rv,
                                      spatial_eps);
  return gate(x, alpha, beta, mc, ms, identity, in_place);
}

// The forward whose backward will run (or whose BatchNorms use batch statistics): the output
// and what `backward_train` needs, {out, mc, hidden, ms, compressed, s, idx_c, idx_hw,
// spatial_stats, means, block_stats}:
// - hidden: the MLP's hidden activations (P x N x hidden), s: the spatial conv's output,
//   compressed: its input ([max, mean] over C), ms: the spatial gate;
// - idx_c, idx_hw: the argmax of the channel max (N x 1 x H x W) and of the H x W max (N x C;
//   no rows without max pooling), int32;
// - spatial_stats: what the spatial BatchNorm used: [mean, invstd] of the batch in training
//   (native_batch_norm's, in its dtype), [running mean, running var] in eval (copies: the
//   backward must see what the forward used);
// - means: per (n, c), the H x W mean of the block's conv output (or of x);
// - block_stats: 2 x C, the block BatchNorm's mean and invstd (batch statistics in training,
//   running ones in eval), no rows outside a block.
// In a block, x is the conv output the block's BatchNorm normalises (`block_*`), and the
// BatchNorm's running statistics are updated here, as its own forward would (Chan et al.'s
// pairwise combination of per-(n, c) means and squared deviations, in double). So are the
// spatial BatchNorm's.
std::vector<Tensor> forward_train(
    const Tensor& x, const Opt& identity, const Opt& block_w, const Opt& block_b,
    const Opt& block_rm, const Opt& block_rv, bool block_batch, double block_momentum,
    double block_eps, const Tensor& w1, const Opt& b1, const Tensor& w2, const Opt& b2,
    const std::string& pool_names, const Tensor& conv_w, int64_t padding,
    const Opt& spatial_w, const Opt& spatial_b, const Opt& spatial_rm, const Opt& spatial_rv,
    bool spatial_batch, double spatial_momentum, double spatial_eps) {
  check_map(x);
  check_block(block_w, block_b, block_rm, block_rv, x.size(1));
  const std::vector<std::string> pools = split_pools(pool_names);
  const bool block = identity.has_value();
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const at::ScalarType acc = acc_type(x);
  const std::vector<Tensor> stats = hw_stats(x, true, block && block_batch);
  const Tensor& means = stats[0];
  Tensor alpha, beta, block_stats = at::empty({0, c}, means.options());
  if (block) {
    block_stats = at::empty({2, c}, means.options());
    if (block_batch) {
      Tensor unbiased = at::empty({c}, means.options().dtype(at::kDouble));
      AT_DISPATCH_FLOATING_TYPES(acc, "batch_stats", [&] {
        const scalar_t *mu = means.const_data_ptr<scalar_t>(), *m2 = stats[1].const_data_ptr<scalar_t>();
        scalar_t *o_mean = block_stats.data_ptr<scalar_t>(), *o_invstd = o_mean + c;
        double* o_unbiased = unbiased.data_ptr<double>();
        const double count = double(n * hw);
        for (int64_t k = 0; k < c; ++k) {
          double mean = 0, total = 0;
          for (int64_t b = 0; b < n; ++b) mean += mu[b * c + k];
          mean /= n;
          for (int64_t b = 0; b < n; ++b) {
            const double d = mu[b * c + k] - mean;
            total += m2[b * c + k] + hw * d * d;
          }
          o_mean[k] = scalar_t(mean);
          o_invstd[k] = scalar_t(1) / std::sqrt(scalar_t(total / count) + scalar_t(block_eps));
          o_unbiased[k] = total / std::max(count - 1, 1.0);
        }
      });
      if (block_rm.has_value()) {
        block_rm->lerp_(block_stats[0].to(block_rm->scalar_type()), block_momentum);
        block_rv->lerp_(unbiased.to(block_rv->scalar_type()), block_momentum);
      }
    } else {
      block_stats[0].copy_(*block_rm);
      block_stats[1].copy_(invstd_of(*block_rv, block_eps, acc));
    }
    std::tie(alpha, beta) = affine(block_stats[0], block_stats[1], block_w, block_b);
  }
  auto [top, idx_hw] = hw_max(stats, alpha, true);
  auto [mc, hidden] = channel_gate(pooled_vectors(means, top, alpha, beta, pools), w1, b1, w2, b2);
  const std::vector<Tensor> pooled = channel_pool(x, alpha, beta, mc, true);
  const Tensor &compressed = pooled[0], &idx_c = pooled[1];
  const Tensor s = spatial_conv(compressed, conv_w, padding);
  // The backward takes the statistics this BatchNorm used, as BatchNorm's own backward does:
  // recomputed there from a half-precision s they broke its projection (bf16: a conv-weight
  // grad 60% off where the reference is 10% off).
  Tensor ms, spatial_stats;
  if (spatial_batch) {
    auto [normed, save_mean, save_invstd] = at::native_batch_norm(
        s, spatial_w, spatial_b, spatial_rm, spatial_rv, true, spatial_momentum, spatial_eps);
    ms = normed.sigmoid_();
    spatial_stats = at::cat({save_mean, save_invstd});
  } else {
    ms = at::batch_norm(s, spatial_w, spatial_b, spatial_rm, spatial_rv, false, spatial_momentum,
                        spatial_eps, false).sigmoid_();
    spatial_stats = at::cat({*spatial_rm, *spatial_rv});
  }
  const bool max_pool = std::find(pools.begin(), pools.end(), "max") != pools.end();
  if (!max_pool) idx_hw = at::empty({0, c}, idx_hw.options());
  const Tensor out = gate(x, alpha, beta, mc, ms, identity, false);
  return {out, mc, hidden, ms, compressed, s, idx_c, idx_hw, spatial_stats, means, block_stats};
}

// --------------------------------------------------------------------------- backward

// The backward's first pass. In a block g_y = g_out where the output is positive (the ReLU's
// backward; written out, as it is also the identity's gradient); outside one g_y is g_out and
// comes back empty (a torch op may not return its input). Per position,
// the spatial gate's gradient g_ms = sum over C of g_y * x * mc; per (n, c), s0 = sum over
// H x W of g_y * ms and s1 = the same of g_y * ms * b.
std::vector<Tensor> backward_reduce(const Tensor& g_out_in, const Opt& out_in, const Tensor& x,
                                    const Opt& alpha_in, const Opt& beta_in, const Tensor& mc_in,
                                    const Tensor& ms_in) {
  check_map(x);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
  const Tensor alpha = vec(alpha_in, acc_type(x)), beta = vec(beta_in, acc_type(x));
  const Tensor mc = vec(mc_in, acc_type(x)), ms = vec(ms_in, acc_type(x));
  const Tensor g_out = in_layout(g_out_in, x);
  const Tensor out = out_in.has_value() ? in_layout(*out_in, x) : Tensor();
  Tensor g_y = out.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  auto fopt = x.options().dtype(acc_type(x));
  Tensor g_ms = at::zeros({n, 1, h, w}, fopt), s0 = at::zeros({n, c}, fopt);
  Tensor s1 = at::zeros({n, c}, fopt);
  const bool cl = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "backward_reduce", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t *p = x.const_data_ptr<scalar_t>(), *go = g_out.const_data_ptr<scalar_t>();
    const scalar_t* yo = ptr<scalar_t>(out);
    scalar_t* gy = out.defined() ? g_y.data_ptr<scalar_t>() : nullptr;
    const acc_t *a = ptr<acc_t>(alpha), *bb = ptr<acc_t>(beta);
    const acc_t *g = mc.const_data_ptr<acc_t>(), *m = ms.const_data_ptr<acc_t>();
    acc_t *o_ms = g_ms.data_ptr<acc_t>(), *o_s0 = s0.data_ptr<acc_t>(), *o_s1 = s1.data_ptr<acc_t>();
    with_flags([&](auto affine, auto block) {
      // One sample per task: g_ms (NCHW) or s0, s1 (channels_last) accumulate across rows.
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t r = 0; r < (cl ? hw : c); ++r) {
            const int64_t off = (b * (cl ? hw : c) + r) * (cl ? c : hw);
            const scalar_t* yr = block ? yo + off : nullptr;
            scalar_t* gr = block ? gy + off : nullptr;
            if (!cl) {  // row = channel r of sample b, along positions
              reduce_run<scalar_t, acc_t, affine, block, 0>(
                  p + off, go + off, yr, gr, hw, affine ? a + r : nullptr,
                  affine ? bb + r : nullptr, g + b * c + r, m + b * hw, o_ms + b * hw,
                  o_s0 + b * c + r, o_s1 + b * c + r);
            } else {  // row = position r of sample b, along channels
              reduce_run<scalar_t, acc_t, affine, block, 1>(
                  p + off, go + off, yr, gr, c, a, bb, g + b * c, m + b * hw + r,
                  o_ms + b * hw + r, o_s0 + b * c, o_s1 + b * c);
            }
          }
        }
      });
    }, alpha.defined(), out.defined());
  });
  return {g_y, g_ms, s0, s1};
}

// The backward's last pass: grad = scale[n, c] * (g_y * ms + g_mean) + k2[c] * b + shift[n, c]
// (k2 None: no such term), laid out as b. The max pools' index scatters follow in ATen.
Tensor grad_input(const Tensor& g_y_in, const Tensor& x, const Tensor& ms_in,
                  const Tensor& g_mean_in, const Tensor& scale_in, const Opt& k2_in,
                  const Tensor& shift_in) {
  check_map(x);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const Tensor g_y = in_layout(g_y_in, x);
  const Tensor ms = vec(ms_in, acc_type(x)), g_mean = vec(g_mean_in, acc_type(x));
  const Tensor scale = vec(scale_in, acc_type(x)), k2v = vec(k2_in, acc_type(x));
  const Tensor shift = vec(shift_in, acc_type(x));
  Tensor out = at::empty_like(x);
  const bool cl = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grad_input", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t *p = x.const_data_ptr<scalar_t>(), *gy = g_y.const_data_ptr<scalar_t>();
    const acc_t *m = ms.const_data_ptr<acc_t>(), *gm = g_mean.const_data_ptr<acc_t>();
    const acc_t *sc = scale.const_data_ptr<acc_t>(), *k2 = ptr<acc_t>(k2v);
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    with_flags([&](auto with_k2, auto cl_) {
      if constexpr (!cl_) {
        at::parallel_for(0, n * c, 4, [&](int64_t begin, int64_t end) {
          for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t b = nc / c, k = nc % c, off = nc * hw;
            grad_run<scalar_t, acc_t, with_k2, 0>(p + off, gy + off, hw, m + b * hw, gm + b * hw,
                                                  sc + nc, with_k2 ? k2 + k : nullptr, sh + nc,
                                                  o + off);
          }
        });
      } else {
        at::parallel_for(0, n * hw, 16, [&](int64_t begin, int64_t end) {
          for (int64_t pos = begin; pos < end; ++pos) {
            const int64_t b = pos / hw, off = pos * c;
            grad_run<scalar_t, acc_t, with_k2, 1>(p + off, gy + off, c, m + pos, gm + pos,
                                                  sc + b * c, k2, sh + b * c, o + off);
          }
        });
      }
    }, k2v.defined(), cl);
  });
  return out;
}

// An op returns no undefined tensors: what was not computed comes back with no elements.
Tensor or_empty(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// Element (b, k, i) of a map laid out NCHW or channels_last.
inline int64_t at_(bool cl, int64_t b, int64_t k, int64_t i, int64_t c, int64_t hw) {
  return cl ? (b * hw + i) * c + k : (b * c + k) * hw + i;
}

// The backward of forward_train, from g_out and what it kept: {grad of x, g_y (the grad of
// the block's pre-ReLU sum, which is also the identity's; no elements outside a block),
// grads of the block BatchNorm's weight and bias, of w1, b1, w2, b2, of the spatial conv's
// kernel, of the spatial BatchNorm's weight and bias} (no elements where there is no such
// parameter). Two passes over the map (backward_reduce, grad_input) and one product (bmm).
//
// With u = x * Mc and g_u its grad: g_u = g_y * Ms + g_mean + g_max at the channel argmax
// (g_mean, g_max: the grads of the two compressed maps, g_mean divided by C); the grad of x is
// g_u * Mc + g_avg + g_max_hw at the H x W argmax; in a block the BatchNorm's backward maps it
// to its input b as k1 * (grad of x) + k2 * b + k3 per channel, with k1, k2, k3 from per-channel
// sums that the small tensors give (fused_cbam._batch_norm_backward_terms).
std::vector<Tensor> backward_train(
    const Tensor& g_out, const Opt& out, const Tensor& x, const Tensor& mc, const Tensor& hidden,
    const Tensor& ms, const Tensor& compressed, const Tensor& s, const Tensor& idx_c_in,
    const Tensor& idx_hw_in, const Tensor& spatial_stats, const Tensor& means_in,
    const Tensor& block_stats, const Opt& block_w, const Opt& block_b, bool block_batch,
    const Tensor& w1, const Opt& b1, const Tensor& w2, const Opt& b2,
    const std::string& pool_names, const Tensor& conv_w, int64_t padding,
    const Opt& spatial_w, const Opt& spatial_b, bool spatial_batch, double spatial_eps) {
  check_map(x);
  const std::vector<std::string> pools = split_pools(pool_names);
  const bool block = out.has_value(), cl = channels_last(x);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t npools = int64_t(pools.size());
  const bool max_pool = std::find(pools.begin(), pools.end(), "max") != pools.end();
  check_numel(mc, n * c, "mc");
  check_numel(ms, n * hw, "ms");
  check_numel(s, n * hw, "s");
  check_numel(idx_c_in, n * hw, "idx_c");
  check_numel(idx_hw_in, max_pool ? n * c : 0, "idx_hw");
  check_numel(means_in, n * c, "means");
  check_numel(block_stats, block ? 2 * c : 0, "block_stats");
  check_numel(spatial_stats, 2, "spatial_stats");
  check_block(block_w, block_b, std::nullopt, std::nullopt, c);
  const at::ScalarType acc = acc_type(x);
  const auto fopt = x.options().dtype(acc);
  Tensor alpha, beta, mean, invstd;
  if (block) {
    mean = vec(block_stats[0], acc);
    invstd = vec(block_stats[1], acc);
    std::tie(alpha, beta) = affine(mean, invstd, block_w, block_b);
  }
  const std::vector<Tensor> reduced = backward_reduce(g_out, out, x, alpha, beta, mc, ms);
  const Tensor g_y = block ? reduced[0] : g_out;

  // the spatial gate: sigmoid, BatchNorm2d(1) (with the statistics the forward used), the
  // k x k conv
  const Tensor g_normed = at::sigmoid_backward(reduced[1].to(ms.scalar_type()), ms);
  Tensor save_mean, save_invstd, run_mean, run_var;
  if (spatial_batch) {
    save_mean = spatial_stats.slice(0, 0, 1);
    save_invstd = spatial_stats.slice(0, 1, 2);
  } else {
    run_mean = spatial_stats.slice(0, 0, 1);
    run_var = spatial_stats.slice(0, 1, 2);
  }
  auto [g_s, g_spatial_w, g_spatial_b] = at::native_batch_norm_backward(
      g_normed, s, spatial_w, run_mean, run_var, save_mean, save_invstd, spatial_batch,
      spatial_eps, {true, spatial_w.has_value(), spatial_b.has_value()});
  const std::vector<Tensor> conv_grads = spatial_conv_backward(g_s, compressed, conv_w, padding);
  const Tensor g_compressed = vec(conv_grads[0], acc);  // N x 2 x H x W: [max, mean]
  const Tensor g_mean = (g_compressed.slice(1, 1, 2) / double(c)).contiguous();

  // per (n, c): u0, u1 = the sums over H x W of g_u and of g_u * b; the values of b at the
  // H x W argmax
  const Tensor idx_c = idx_c_in.contiguous(), idx_hw = idx_hw_in.contiguous();
  const Tensor base_dot = at::bmm(g_mean.to(x.scalar_type()).view({n, 1, hw}),
                                  x.flatten(2).transpose(1, 2));  // sum over HW of b * g_mean
  Tensor u0 = reduced[2].clone(), u1 = reduced[3] + base_dot.view({n, c});
  Tensor at_hw = at::empty({max_pool ? n : 0, c}, fopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_sums", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    const acc_t* gc = g_compressed.const_data_ptr<acc_t>();
    const int32_t *ic = idx_c.const_data_ptr<int32_t>(), *ih = idx_hw.const_data_ptr<int32_t>();
    acc_t *o0 = u0.data_ptr<acc_t>(), *o1 = u1.data_ptr<acc_t>(), *o_hw = at_hw.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t* g_max = gc + 2 * b * hw;
        acc_t g_mean_total = 0;
        for (int64_t i = 0; i < hw; ++i) g_mean_total += g_max[hw + i];
        g_mean_total /= c;
        for (int64_t k = 0; k < c; ++k) o0[b * c + k] += g_mean_total;
        for (int64_t i = 0; i < hw; ++i) {  // the channel max's grad goes to its argmax
          const int64_t k = ic[b * hw + i];
          TORCH_CHECK(k >= 0 && k < c, "idx_c holds channel ", k, ", outside 0..", c - 1);
          o0[b * c + k] += g_max[i];
          o1[b * c + k] += g_max[i] * acc_t(p[at_(cl, b, k, i, c, hw)]);
        }
        for (int64_t k = 0; max_pool && k < c; ++k) {
          const int64_t i = ih[b * c + k];
          TORCH_CHECK(i >= 0 && i < hw, "idx_hw holds position ", i, ", outside 0..", hw - 1);
          o_hw[b * c + k] = p[at_(cl, b, k, i, c, hw)];
        }
      }
    });
  });

  // the MLP: its input rebuilt as the forward built it, then its backward (fused_cbam.py's
  // _mlp_backward); g_mc = the sum over H x W of g_u * x
  const Tensor g_mc = block ? u1 * alpha + u0 * beta : u1;
  const Tensor means = vec(means_in, acc);
  const Tensor pooled = pooled_vectors(means, at_hw, alpha, beta, pools).to(w1.scalar_type());
  const Tensor g_logits = at::sigmoid_backward(g_mc.to(mc.scalar_type()), mc);
  const Tensor g_w2 = g_logits.t().mm(hidden.sum(0));
  const Tensor g_b2 = b2 ? g_logits.sum(0) * double(npools) : Tensor();
  const Tensor g_hidden = g_logits.mm(w2).unsqueeze(0) * (hidden > 0);  // P x N x hidden
  const Tensor g_w1 = g_hidden.flatten(0, 1).t().mm(pooled.flatten(0, 1));
  const Tensor g_b1 = b1 ? g_hidden.sum({0, 1}) : Tensor();
  const Tensor g_pooled = vec(g_hidden.matmul(w1), acc);  // P x N x C

  // the grad of x (or, in a block, of b) as scale * (g_y * ms + g_mean) + k2 * b + shift,
  // then the two max pools' scatters
  const int64_t avg_at = std::find(pools.begin(), pools.end(), "avg") - pools.begin();
  const int64_t max_at = std::find(pools.begin(), pools.end(), "max") - pools.begin();
  Tensor scale = at::empty({n, c}, fopt), shift = at::empty({n, c}, fopt), k1, k2;
  Tensor g_block_w, g_block_b;
  const Tensor mc_acc = vec(mc, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "grad_terms", [&] {
    const scalar_t *m = mc_acc.const_data_ptr<scalar_t>(), *gp = g_pooled.const_data_ptr<scalar_t>();
    const scalar_t *o0 = u0.const_data_ptr<scalar_t>(), *o1 = u1.const_data_ptr<scalar_t>();
    const scalar_t *mu = means.const_data_ptr<scalar_t>(), *hv = at_hw.const_data_ptr<scalar_t>();
    const scalar_t* g_avg = avg_at < npools ? gp + avg_at * n * c : nullptr;
    const scalar_t* g_max_hw = max_pool ? gp + max_at * n * c : nullptr;
    scalar_t *sc = scale.data_ptr<scalar_t>(), *sh = shift.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n * c; ++i) {
      sc[i] = m[i];
      sh[i] = g_avg ? g_avg[i] / hw : 0;
    }
    if (!block) return;
    // BatchNorm's per-channel sums of its output grad (sum_0) and of that times b (sum_1)
    std::vector<scalar_t> sum_0(c, 0), sum_1(c, 0);
    for (int64_t row = 0; row < n * c; row += c) {
      for (int64_t k = 0, i = row; k < c; ++k, ++i) {
        scalar_t t0 = m[i] * o0[i], t1 = m[i] * o1[i];
        if (g_avg) {
          t0 += g_avg[i];  // (g_avg / hw) * hw
          t1 += g_avg[i] * mu[i];
        }
        if (g_max_hw) {
          t0 += g_max_hw[i];
          t1 += g_max_hw[i] * hv[i];
        }
        sum_0[k] += t0;
        sum_1[k] += t1;
      }
    }
    // training: grad_b = w * invstd * (g - mean(g) - xhat * mean(g * xhat)); eval: w * invstd * g
    const Tensor bw = vec(block_w, acc);
    const scalar_t *pw = ptr<scalar_t>(bw), *mean_c = mean.const_data_ptr<scalar_t>();
    const scalar_t* inv = invstd.const_data_ptr<scalar_t>();
    k1 = at::empty({c}, fopt);
    k2 = block_batch ? at::empty({c}, fopt) : Tensor();
    g_block_w = block_w ? at::empty({c}, fopt) : Tensor();
    g_block_b = block_b ? at::empty({c}, fopt) : Tensor();
    scalar_t *o_k1 = k1.data_ptr<scalar_t>(), *o_k2 = block_batch ? k2.data_ptr<scalar_t>() : nullptr;
    scalar_t* o_w = block_w ? g_block_w.data_ptr<scalar_t>() : nullptr;
    scalar_t* o_b = block_b ? g_block_b.data_ptr<scalar_t>() : nullptr;
    const scalar_t count = scalar_t(n * hw);
    std::vector<scalar_t> k3(c, 0);
    for (int64_t k = 0; k < c; ++k) {
      const scalar_t sum_dy_xhat = inv[k] * (sum_1[k] - mean_c[k] * sum_0[k]);
      o_k1[k] = pw ? inv[k] * pw[k] : inv[k];
      if (o_w) o_w[k] = sum_dy_xhat;
      if (o_b) o_b[k] = sum_0[k];
      if (block_batch) {
        o_k2[k] = -o_k1[k] * inv[k] * sum_dy_xhat / count;
        k3[k] = -o_k1[k] * sum_0[k] / count - o_k2[k] * mean_c[k];
      }
    }
    for (int64_t row = 0; row < n * c; row += c) {
      for (int64_t k = 0, i = row; k < c; ++k, ++i) {
        sc[i] = o_k1[k] * m[i];
        sh[i] = o_k1[k] * sh[i] + k3[k];
      }
    }
  });
  Tensor grad = grad_input(g_y, x, ms, g_mean, scale, k2, shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_grads", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    scalar_t* o = grad.data_ptr<scalar_t>();
    const acc_t *gc = g_compressed.const_data_ptr<acc_t>(), *sc = scale.const_data_ptr<acc_t>();
    const acc_t* g_max_hw = max_pool ? g_pooled.const_data_ptr<acc_t>() + max_at * n * c : nullptr;
    const acc_t* k1v = ptr<acc_t>(k1);
    const int32_t *ic = idx_c.const_data_ptr<int32_t>(), *ih = idx_hw.const_data_ptr<int32_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < hw; ++i) {
          const int64_t k = ic[b * hw + i], e = at_(cl, b, k, i, c, hw);
          o[e] = scalar_t(acc_t(o[e]) + sc[b * c + k] * gc[2 * b * hw + i]);
        }
        for (int64_t k = 0; g_max_hw && k < c; ++k) {
          const int64_t e = at_(cl, b, k, ih[b * c + k], c, hw);
          const acc_t g = g_max_hw[b * c + k];
          o[e] = scalar_t(acc_t(o[e]) + (k1v ? k1v[k] * g : g));
        }
      }
    });
  });
  return {grad,
          block ? g_y : at::empty({0}, x.options()),
          or_empty(g_block_w, means),
          or_empty(g_block_b, means),
          g_w1,
          or_empty(g_b1, w1),
          g_w2,
          or_empty(g_b2, w2),
          conv_grads[1],
          or_empty(g_spatial_w, s),
          or_empty(g_spatial_b, s)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hw_stats", &hw_stats, "per (n, c): mean, squared deviations, max, argmax, min, argmin (int32)");
  m.def("channel_pool", &channel_pool, "per position: [max, mean] over C of x * mc, argmax (int32) if asked");
  m.def("gate", &gate, "x * mc * ms, or relu(x * mc * ms + identity)");
  m.def("forward_eval", &forward_eval, "the whole eval-mode forward in one call");
  m.def("spatial_conv", &spatial_conv, "the spatial gate's k x k conv, 2 -> 1 maps");
  m.def("spatial_conv_backward", &spatial_conv_backward, "its input's and weight's grads");
  m.def("backward_reduce", &backward_reduce, "g_y, g_ms, s0, s1");
  m.def("grad_input", &grad_input, "scale * (g_y * ms + g_mean) + k2 * b + shift");
  m.def("forward_train", &forward_train, "the forward whose backward will run, in one call");
  m.def("backward_train", &backward_train, "forward_train's backward, in one call");
}
