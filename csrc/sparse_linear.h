// y = x W^T + b for a sparse W stored as row bitmaps plus packed values.
//
// The format, chosen for batch-1 decode (memory-bound: the kernel is as fast as it reads few
// bytes) and small batches:
//   bitmap       [out, words] uint32, words = ceil(in / 32); bit j of word w marks column 32 w + j
//   values       [nnz] fp32, bf16 or fp16: the kept weights, row by row, in column order
//   row_offsets  [out + 1] int64: row r's values are values[row_offsets[r] : row_offsets[r + 1]]
// A kept weight costs its value's bytes plus 1/8 byte per column of the bitmap, so at 70%
// unstructured sparsity fp32 weights read 1.33 bytes per column instead of dense's 4 (CSR with
// 16-bit indices: 1.8), and 2:4 reads 2.13. The kernel expands each 8 or 16 columns' packed
// values into a dense vector (AVX-512 vexpandps, AVX2 a permute from a table) and multiplies it
// with every batch row, so each weight is read once per call whatever the batch.
#pragma once

#include <cstdint>

#include "divergence.h"  // DType

namespace promptbake {

struct SparseLinearArgs {
  const void* x = nullptr;        // [batch, in], last dimension contiguous
  DType x_dtype = DType::f32;
  int64_t x_stride = 0;           // elements between rows of x
  const uint32_t* bitmap = nullptr;
  const void* values = nullptr;
  DType values_dtype = DType::f32;
  const int64_t* row_offsets = nullptr;
  const void* bias = nullptr;     // [out] or null
  DType bias_dtype = DType::f32;
  void* y = nullptr;              // [batch, out] in x_dtype
  int64_t y_stride = 0;
  int64_t batch = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t nnz = 0;                // length of values: no read goes past it
  int num_threads = 0;            // 0: OpenMP default
};

// Runs the kernel for `isa` ("avx512", "avx2", "generic"), or the best one this CPU supports
// when `isa` is empty. Returns false if `isa` is unknown or unsupported here.
bool sparse_linear(const SparseLinearArgs& args, const char* isa);

namespace isa_avx512 { void sparse_linear(const SparseLinearArgs& args); }
namespace isa_avx2 { void sparse_linear(const SparseLinearArgs& args); }
namespace isa_generic { void sparse_linear(const SparseLinearArgs& args); }

}  // namespace promptbake
