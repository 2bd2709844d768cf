// A vector of PB_LANES floats written with GCC/Clang vector extensions.
//
// This header is compiled once per instruction set (see the divergence_<isa>.cpp files): the same
// source becomes AVX-512, AVX2 or baseline code, and a runtime check picks one. Everything lives
// in the namespace named by PB_ISA so the copies never collide at link time.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if !defined(PB_LANES) || !defined(PB_ISA)
#error "define PB_LANES (floats per vector) and PB_ISA (namespace) before including simd.h"
#endif

namespace promptbake {

// Storage types of the inputs, by their bits. The arithmetic is always fp32.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

namespace PB_ISA {

constexpr int kLanes = PB_LANES;
typedef float vf __attribute__((vector_size(4 * PB_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * PB_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * PB_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * PB_LANES)));

constexpr float kInf = std::numeric_limits<float>::infinity();

static inline vf splat(float x) { return vf{} + x; }

static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

static inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

static inline double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) to about 1 ulp (Cephes expf polynomial). Results below exp(-87) flush to 0, which
// is what the divergence needs: its arguments are logits minus the row maximum, so x <= 0.
// NaN propagates.
static inline vf vexp(vf x) {
  const vf lo = splat(-87.0f), hi = splat(88.7f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Round to nearest with the 1.5 * 2^23 trick: exact for |k| < 2^22.
  const vf magic = splat(12582912.0f);
  vf r = (xc * 1.44269504088896341f + magic) - magic;
  vf f = xc - r * 0.693359375f;
  f = f + r * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  vi n = __builtin_convertvector(r, vi);
  vf y = (vf)((vi)p + (n << 23));
  y = x < lo ? splat(0.0f) : y;
  y = x > hi ? splat(kInf) : y;
  return x == x ? y : x;
}

// log(x) for positive normal x (Cephes logf polynomial); the divergence only calls it on [1, 2].
static inline vf vlog(vf x) {
  vi xi = (vi)x;
  vi e = ((xi >> 23) & 0xff) - 126;
  vf m = (vf)((xi & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  vi small = m < 0.707106781186547524f;
  e = e + small;  // `small` is -1 where true
  m = small ? m + m - 1.0f : m - 1.0f;
  vf ef = __builtin_convertvector(e, vf);
  vf z = m * m;
  vf p = splat(7.0376836292e-2f);
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  vf y = p * m * z;
  y = y - 2.12194440e-4f * ef;
  y = y - 0.5f * z;
  return m + y + 0.693359375f * ef;
}

// Loads of kLanes values as fp32, and the tail of a row padded with `pad`.
static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline vf load(const bf16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline vf load(const f16_t* p) {
  // Exact half -> float by bit manipulation (no F16C needed), subnormals and inf/NaN included.
  vh h16;
  std::memcpy(&h16, p, sizeof h16);
  vu h = __builtin_convertvector(h16, vu);
  vu o = (h & 0x7fffu) << 13;
  vu exp = o & (0x7c00u << 13);
  o = o + ((127u - 15u) << 23);
  o = exp == (0x7c00u << 13) ? o + ((128u - 16u) << 23) : o;
  vf sub = (vf)(o + (1u << 23)) - (vf)(vu{} + (113u << 23));
  vf f = exp == 0 ? sub : (vf)o;
  return (vf)((vu)f | ((h & 0x8000u) << 16));
}

template <typename T>
static inline vf load_tail(const T* p, int n, float pad) {
  T buf[kLanes];
  std::memcpy(buf, p, sizeof(T) * n);
  vf v = load(buf);
  for (int i = n; i < kLanes; ++i) v[i] = pad;
  return v;
}

static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

static inline void store(bf16_t* p, vf v) {
  vu u = (vu)v;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  rounded = v == v ? rounded : vu{} + 0x7fc0u;
  vh h = __builtin_convertvector(rounded, vh);
  std::memcpy(p, &h, sizeof h);
}

static inline void store(f16_t* p, vf v) {
  for (int i = 0; i < kLanes; ++i) {
    _Float16 h = static_cast<_Float16>(v[i]);
    std::memcpy(&p[i], &h, sizeof h);
  }
}

template <typename T>
static inline void store_tail(T* p, vf v, int n) {
  T buf[kLanes];
  store(buf, v);
  std::memcpy(p, buf, sizeof(T) * n);
}

}  // namespace PB_ISA
}  // namespace promptbake
