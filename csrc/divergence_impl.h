// The divergence kernel body, compiled once per instruction set by divergence_<isa>.cpp.
//
// Per row (token), in fp32 with double accumulation across blocks:
//   pass 1  row maxima of the (temperature-scaled) student and teacher logits
//   pass 2  exp of the shifted logits: both normalisers and the KL numerator in one sweep;
//           for fp32 students the student exps are parked in the gradient row
//   pass 3  (JSD only) the mixture terms, which need both normalisers first
//   last    the gradient, written once in the student's dtype
// A row of 2 x 151936 fp32 logits is 1.2 MB, so passes after the first read from cache.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "divergence.h"
#include "simd.h"

namespace promptbake {
namespace PB_ISA {

constexpr int64_t kBlock = 2048;  // values summed in fp32 lanes before flushing to double

template <typename T>
static inline vf load_n(const T* p, int64_t i, int n, float pad) {
  return n == kLanes ? load(p + i) : load_tail(p + i, n, pad);
}

template <typename T>
static inline void store_n(T* p, int64_t i, int n, vf v) {
  if (n == kLanes) store(p + i, v);
  else store_tail(p + i, v, n);
}

// Calls body(i, n) on every vector of a row (n < kLanes only for the tail) and flush() after
// every block, so fp32 partial sums never grow long.
template <typename Body, typename Flush>
static inline void sweep(int64_t vocab, Body&& body, Flush&& flush) {
  const int64_t full = vocab - vocab % kLanes;
  for (int64_t b = 0; b < full; b += kBlock) {
    const int64_t end = std::min(full, b + kBlock);
    for (int64_t i = b; i < end; i += kLanes) body(i, kLanes);
    flush();
  }
  if (full < vocab) {
    body(full, static_cast<int>(vocab - full));
    flush();
  }
}

static inline vf weighted(vf weight, vf value) {
  // An entry with no probability contributes nothing (0 * -inf = 0); NaN weights propagate.
  return weight == 0.0f ? splat(0.0f) : weight * value;
}

template <typename TS, typename TT, Kind K>
static void divergence_row(const DivergenceArgs& a, const TS* s, const TT* t, TS* grad,
                           float* row_loss) {
  const int64_t V = a.vocab;
  const float inv_t = static_cast<float>(a.inv_temperature);
  const float ninf = -kInf;

  // Pass 1: maxima. Log-probabilities at T = 1 are already shifted (max <= 0).
  const bool teacher_shifted = a.teacher_is_logprobs && a.inv_temperature == 1.0;
  vf mxs = splat(ninf), mxt = splat(ninf);
  sweep(V, [&](int64_t i, int n) {
    mxs = vmax(mxs, load_n(s, i, n, ninf));
    if (!teacher_shifted) mxt = vmax(mxt, load_n(t, i, n, ninf));
  }, [] {});
  const float max_s = hmax(mxs) * inv_t;
  const float max_t = teacher_shifted ? 0.0f : hmax(mxt) * inv_t;

  auto zs_at = [&](int64_t i, int n) { return load_n(s, i, n, ninf) * inv_t - max_s; };
  auto zt_at = [&](int64_t i, int n) { return load_n(t, i, n, ninf) * inv_t - max_t; };

  // Pass 2: normalisers, and for the KLs the numerator of the loss. When a gradient follows,
  // the exps are parked (student: in its own gradient row if fp32) so no exp is computed twice.
  vf acc_s = splat(0.0f), acc_t = splat(0.0f), acc_a = splat(0.0f);
  double sum_s = 0.0, sum_t = 0.0, sum_a = 0.0;
  float* parked = nullptr;
  float* parked_t = nullptr;
  if (grad && K != Kind::jsd) {
    constexpr bool fp32_grad = std::is_same<TS, float>::value;
    thread_local std::vector<float> scratch;
    scratch.resize((fp32_grad ? 0 : V) + (K == Kind::forward_kl ? V : 0));
    parked = fp32_grad ? reinterpret_cast<float*>(grad) : scratch.data();
    if (K == Kind::forward_kl) parked_t = scratch.data() + (fp32_grad ? 0 : V);
  }
  sweep(V, [&](int64_t i, int n) {
    const vf zs = zs_at(i, n), zt = zt_at(i, n);
    const vf es = vexp(zs), et = vexp(zt);
    acc_s += es;
    acc_t += et;
    if (K == Kind::forward_kl) acc_a += weighted(et, zt - zs);
    if (K == Kind::reverse_kl) acc_a += weighted(es, zs - zt);
    if (parked) store_n(parked, i, n, es);
    if (parked_t) store_n(parked_t, i, n, et);
  }, [&] {
    sum_s += hsum(acc_s);
    sum_t += hsum(acc_t);
    sum_a += hsum(acc_a);
    acc_s = acc_t = acc_a = splat(0.0f);
  });
  const double lz_s = std::log(sum_s), lz_t = std::log(sum_t);

  // With shifted logits z and normalisers Z: log q = z_s - log Z_s, log p = z_t - log Z_t.
  double loss = 0.0;
  if (K == Kind::forward_kl) loss = sum_a / sum_t + lz_s - lz_t;
  if (K == Kind::reverse_kl) loss = sum_a / sum_s + lz_t - lz_s;

  const float lzs = static_cast<float>(lz_s), lzt = static_cast<float>(lz_t);
  const float log_beta = static_cast<float>(std::log(a.beta));
  const float log_1mbeta = static_cast<float>(std::log1p(-a.beta));
  // log m for the mixture m = beta p + (1 - beta) q, stably in log space.
  auto log_mixture = [&](vf lp, vf lq) {
    const vf x = lp + log_beta, y = lq + log_1mbeta;
    const vf d = x - y;
    const vf ad = d < 0.0f ? -d : d;
    return vmax(x, y) + vlog(1.0f + vexp(-ad));
  };

  // Pass 3 (JSD): beta KL(p || m) + (1 - beta) KL(q || m); k = KL(q || m) enters the gradient.
  double k = 0.0;
  if (K == Kind::jsd) {
    double sum_p = 0.0, sum_q = 0.0;
    vf acc_p = splat(0.0f), acc_q = splat(0.0f);
    sweep(V, [&](int64_t i, int n) {
      const vf lq = zs_at(i, n) - lzs, lp = zt_at(i, n) - lzt;
      const vf lm = log_mixture(lp, lq);
      acc_p += weighted(vexp(lp), lp - lm);
      acc_q += weighted(vexp(lq), lq - lm);
    }, [&] {
      sum_p += hsum(acc_p);
      sum_q += hsum(acc_q);
      acc_p = acc_q = splat(0.0f);
    });
    k = sum_q;
    loss = a.beta * sum_p + (1.0 - a.beta) * sum_q;
  }
  if (K == Kind::reverse_kl) k = loss;
  *row_loss = static_cast<float>(loss * a.loss_scale);
  if (!grad) return;

  // Last pass: the gradient with respect to the student logits.
  const float c = static_cast<float>(a.grad_scale);
  if (K == Kind::forward_kl) {
    // d/dz_s KL(p || q) = q - p
    const float cs = static_cast<float>(a.grad_scale / sum_s);
    const float ct = static_cast<float>(a.grad_scale / sum_t);
    sweep(V, [&](int64_t i, int n) {
      store_n(grad, i, n, load_n(parked, i, n, 0.0f) * cs - load_n(parked_t, i, n, 0.0f) * ct);
    }, [] {});
  } else if (K == Kind::reverse_kl) {
    // d/dz_s KL(q || p) = q (log q - log p - KL)
    const float shift = static_cast<float>(lz_t - lz_s - k);
    sweep(V, [&](int64_t i, int n) {
      const vf q = load_n(parked, i, n, 0.0f) * static_cast<float>(1.0 / sum_s);
      store_n(grad, i, n, c * weighted(q, zs_at(i, n) - zt_at(i, n) + shift));
    }, [] {});
  } else {
    // d/dz_s JSD = (1 - beta) q (log q - log m - KL(q || m))
    const float cj = static_cast<float>(a.grad_scale * (1.0 - a.beta));
    const float kf = static_cast<float>(k);
    sweep(V, [&](int64_t i, int n) {
      const vf lq = zs_at(i, n) - lzs, lp = zt_at(i, n) - lzt;
      const vf q = vexp(lq);
      store_n(grad, i, n, cj * weighted(q, lq - log_mixture(lp, lq) - kf));
    }, [] {});
  }
}

template <typename TS, typename TT, Kind K>
static void run(const DivergenceArgs& a) {
  const TS* s = static_cast<const TS*>(a.student);
  const TT* t = static_cast<const TT*>(a.teacher);
  TS* g = static_cast<TS*>(a.grad);
#ifdef _OPENMP
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
#endif
  for (int64_t r = 0; r < a.rows; ++r) {
    TS* grow = g ? g + r * a.grad_stride : nullptr;
    if (a.mask && !a.mask[r]) {
      // Excluded rows (prompt, padding) cost one zero fill of their gradient.
      a.row_loss[r] = 0.0f;
      if (grow) std::memset(static_cast<void*>(grow), 0, sizeof(TS) * a.vocab);
      continue;
    }
    divergence_row<TS, TT, K>(a, s + r * a.student_stride, t + r * a.teacher_stride, grow,
                              a.row_loss + r);
  }
}

template <typename TS, typename TT>
static void run_kind(const DivergenceArgs& a) {
  switch (a.kind) {
    case Kind::forward_kl: return run<TS, TT, Kind::forward_kl>(a);
    case Kind::reverse_kl: return run<TS, TT, Kind::reverse_kl>(a);
    case Kind::jsd: return run<TS, TT, Kind::jsd>(a);
  }
}

template <typename TS>
static void run_teacher(const DivergenceArgs& a) {
  switch (a.teacher_dtype) {
    case DType::f32: return run_kind<TS, float>(a);
    case DType::bf16: return run_kind<TS, bf16_t>(a);
    case DType::f16: return run_kind<TS, f16_t>(a);
  }
}

void divergence(const DivergenceArgs& a) {
  switch (a.student_dtype) {
    case DType::f32: return run_teacher<float>(a);
    case DType::bf16: return run_teacher<bf16_t>(a);
    case DType::f16: return run_teacher<f16_t>(a);
  }
}

}  // namespace PB_ISA
}  // namespace promptbake
