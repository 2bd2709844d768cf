// The sparse linear kernel body, compiled once per instruction set by sparse_linear_<isa>.cpp.
//
// Per output row and per group of up to 8 batch rows: walk the row's bitmap kLanes columns at a
// time, expand that many packed values into a dense vector (zeros where the bitmap is clear) and
// multiply-add it with the same columns of every batch row of x. x is first copied into an fp32
// scratch whose rows are zero-padded to whole bitmap words, so no load needs a bounds check.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "simd.h"
#include "sparse_linear.h"

namespace promptbake {
namespace PB_ISA {
namespace sparse {

constexpr int kMaxBatch = 8;           // batch rows sharing one read of a weight row
constexpr int64_t kRowBlock = 16;      // output rows per scheduled task
constexpr int64_t kParallelBytes = 48 << 10;  // reading less, a 2nd thread costs more than it saves
constexpr uint32_t kLaneBits = kLanes >= 32 ? ~0u : (1u << kLanes) - 1u;

#if PB_LANES == 16 && defined(__AVX512F__)
static inline vf expand(vf packed, uint32_t bits) {
  return (vf)_mm512_maskz_expand_ps(static_cast<__mmask16>(bits), (__m512)packed);
}
#elif PB_LANES == 8 && defined(__AVX2__)
// AVX2 has no expand: for each byte of bitmap, lane j takes packed[rank of bit j] (one
// permute), and an AND with that byte's lane mask zeroes the lanes whose bit is clear.
struct ExpandTable {
  int32_t index[256][8];
  uint32_t keep[256][8];
};
static constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int m = 0; m < 256; ++m) {
    int rank = 0;
    for (int j = 0; j < 8; ++j) {
      const bool set = m >> j & 1;
      t.index[m][j] = set ? rank++ : 0;
      t.keep[m][j] = set ? ~0u : 0u;
    }
  }
  return t;
}
alignas(64) static constexpr ExpandTable kExpand = make_expand_table();

static inline vf expand(vf packed, uint32_t bits) {
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.index[bits]));
  const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(kExpand.keep[bits]));
  return (vf)_mm256_and_ps(_mm256_permutevar8x32_ps((__m256)packed, index), keep);
}
#else
static inline vf expand(vf packed, uint32_t bits) {
  vf out = splat(0.0f);
  int k = 0;
  for (int j = 0; j < kLanes; ++j)
    if (bits >> j & 1) out[j] = packed[k++];
  return out;
}
#endif

static inline float load_scalar(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::bf16: {
      uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
      float f;
      std::memcpy(&f, &u, sizeof f);
      return f;
    }
    case DType::f16: {
      _Float16 h;
      std::memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
      return static_cast<float>(h);
    }
    default:
      return static_cast<const float*>(p)[i];
  }
}

static inline void store_scalar(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::bf16: {
      uint32_t u;
      std::memcpy(&u, &v, sizeof u);
      const uint16_t h = v == v ? static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)
                                : static_cast<uint16_t>(0x7fc0u);  // round to nearest even
      static_cast<uint16_t*>(p)[i] = h;
      return;
    }
    case DType::f16: {
      const _Float16 h = static_cast<_Float16>(v);
      std::memcpy(static_cast<uint16_t*>(p) + i, &h, sizeof h);
      return;
    }
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Output rows [r0, r1) for B batch rows: xs holds them in fp32, `padded` floats apart.
template <typename TW, int B>
static void rows(const SparseLinearArgs& a, const float* xs, int64_t padded, int64_t b0,
                 int64_t r0, int64_t r1) {
  const int64_t words = padded / 32;
  constexpr int kChunks = 32 / kLanes;
  constexpr int P = B == 1 ? 2 : 1;  // independent FMA chains: a single row needs two
  const TW* values = static_cast<const TW*>(a.values);
  thread_local std::vector<TW> tail;
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* bits = a.bitmap + r * words;
    const int64_t begin = a.row_offsets[r], end = a.row_offsets[r + 1];
    const TW* v = values + begin;
    // A vector load reads kLanes values from wherever the row has got to: near the end of the
    // array it reads a zero-padded copy instead of past the allocation.
    if (end + kLanes > a.nnz) {
      tail.assign(static_cast<size_t>(end - begin + kLanes), TW{});
      if (end > begin) std::memcpy(static_cast<void*>(tail.data()), v, sizeof(TW) * (end - begin));
      v = tail.data();
    }
    vf acc[B][P];
    for (int b = 0; b < B; ++b)
      for (int p = 0; p < P; ++p) acc[b][p] = splat(0.0f);
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t word = bits[w];
      if (word == 0) continue;
      const float* xw = xs + w * 32;
      for (int c = 0; c < kChunks; ++c) {
        // Each chunk finds its values from the bits below it, so the chunks of a word do not
        // wait on one another; only the step to the next word is serial.
        const uint32_t below = c == 0 ? 0u : word & ((1u << (c * kLanes)) - 1u);
        const uint32_t bits_here = (word >> (c * kLanes)) & kLaneBits;
        const vf wv = expand(load(v + __builtin_popcount(below)), bits_here);
        for (int b = 0; b < B; ++b) acc[b][c % P] += wv * load(xw + b * padded + c * kLanes);
      }
      v += __builtin_popcount(word);
    }
    const float bias = a.bias ? load_scalar(a.bias, a.bias_dtype, r) : 0.0f;
    for (int b = 0; b < B; ++b) {
      vf s = acc[b][0];
      for (int p = 1; p < P; ++p) s += acc[b][p];
      store_scalar(a.y, a.x_dtype, (b0 + b) * a.y_stride + r, static_cast<float>(hsum(s)) + bias);
    }
  }
}

template <typename TW>
static void rows_any_batch(const SparseLinearArgs& a, const float* xs, int64_t padded,
                           int64_t r0, int64_t r1) {
  for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxBatch) {
    const float* x = xs + b0 * padded;
    switch (std::min<int64_t>(kMaxBatch, a.batch - b0)) {
      case 1: rows<TW, 1>(a, x, padded, b0, r0, r1); break;
      case 2: rows<TW, 2>(a, x, padded, b0, r0, r1); break;
      case 3: rows<TW, 3>(a, x, padded, b0, r0, r1); break;
      case 4: rows<TW, 4>(a, x, padded, b0, r0, r1); break;
      case 5: rows<TW, 5>(a, x, padded, b0, r0, r1); break;
      case 6: rows<TW, 6>(a, x, padded, b0, r0, r1); break;
      case 7: rows<TW, 7>(a, x, padded, b0, r0, r1); break;
      default: rows<TW, 8>(a, x, padded, b0, r0, r1); break;
    }
  }
}

// True while the machine's 1-minute load average exceeds its CPUs by more than one. A parallel
// region then waits for a second thread to get a core: measured at 10-20 ms per call with ten
// runnable processes on two cores, for a layer that takes 0.1 ms on one thread. Refreshed at
// most every 250 ms (one read of /proc/loadavg).
static bool machine_busy() {
  static std::atomic<int64_t> checked_at{-1};
  static std::atomic<bool> busy{false};
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
  const int64_t last = checked_at.load(std::memory_order_relaxed);
  if (last < 0 || now - last > 250) {
    checked_at.store(now, std::memory_order_relaxed);
    double load = 0.0;
    const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
    busy.store(getloadavg(&load, 1) == 1 && load > cpus + 1.0, std::memory_order_relaxed);
  }
  return busy.load(std::memory_order_relaxed);
}

template <typename TW>
static void run(const SparseLinearArgs& a) {
  const int64_t padded = (a.in_features + 31) / 32 * 32;
  // The calling thread's scratch: grown once, then reused by every call.
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(a.batch * padded));
  for (int64_t b = 0; b < a.batch; ++b) {
    float* dst = scratch.data() + b * padded;
    if (a.x_dtype == DType::f32) {
      std::memcpy(dst, static_cast<const float*>(a.x) + b * a.x_stride,
                  sizeof(float) * a.in_features);
    } else {
      for (int64_t i = 0; i < a.in_features; ++i)
        dst[i] = load_scalar(a.x, a.x_dtype, b * a.x_stride + i);
    }
    std::fill(dst + a.in_features, dst + padded, 0.0f);
  }
  const float* xs = scratch.data();
  const int64_t blocks = (a.out_features + kRowBlock - 1) / kRowBlock;
#ifdef _OPENMP
  int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  if (threads > 1 && machine_busy()) threads = 1;
  const int64_t bytes = a.nnz * static_cast<int64_t>(sizeof(TW)) + a.out_features * padded / 8;
  // Dynamic scheduling: on a shared machine a thread that loses its core hands its rows over.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) \
    if (threads > 1 && bytes >= kParallelBytes && blocks > 1)
#endif
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kRowBlock;
    rows_any_batch<TW>(a, xs, padded, r0, std::min(a.out_features, r0 + kRowBlock));
  }
}

}  // namespace sparse

void sparse_linear(const SparseLinearArgs& a) {
  switch (a.values_dtype) {
    case DType::f32: return sparse::run<float>(a);
    case DType::bf16: return sparse::run<bf16_t>(a);
    case DType::f16: return sparse::run<f16_t>(a);
  }
}

}  // namespace PB_ISA
}  // namespace promptbake
