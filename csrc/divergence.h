// Fused softmax divergence between student and teacher logits, one row per token.
//
// Framework-agnostic: raw pointers, sizes and row strides in; no libtorch. For every row that the
// mask keeps, one call computes both log-sum-exps, the divergence and (optionally) its gradient
// with respect to the student logits, already multiplied by `grad_scale`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace promptbake {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// forward KL(teacher || student) is Eq. 1 of the paper; JSD is the generalised JSD(beta) with
// mixture beta * teacher + (1 - beta) * student, 0 < beta < 1 (the endpoints map to the KLs).
enum class Kind : int { forward_kl = 0, reverse_kl = 1, jsd = 2 };

struct DivergenceArgs {
  const void* student = nullptr;  // [rows, vocab], last dimension contiguous
  DType student_dtype = DType::f32;
  int64_t student_stride = 0;     // elements between rows
  const void* teacher = nullptr;
  DType teacher_dtype = DType::f32;
  int64_t teacher_stride = 0;
  const uint8_t* mask = nullptr;  // [rows], nonzero keeps the row; null keeps all
  void* grad = nullptr;           // [rows, vocab] in student_dtype; null: loss only
  int64_t grad_stride = 0;
  float* row_loss = nullptr;      // [rows]; 0 for masked rows
  int64_t rows = 0;
  int64_t vocab = 0;
  Kind kind = Kind::forward_kl;
  double beta = 0.5;
  double inv_temperature = 1.0;
  double loss_scale = 1.0;        // multiplies row_loss (T^2 scaling)
  double grad_scale = 1.0;        // multiplies the gradient (reduction, 1/T, T^2)
  bool teacher_is_logprobs = false;
  int num_threads = 0;            // 0: OpenMP default
};

// Runs the kernel compiled for `isa` ("avx512", "avx2", "generic"), or for the best instruction
// set this CPU supports when `isa` is empty. Returns false if `isa` is unknown or unsupported here.
bool divergence(const DivergenceArgs& args, const char* isa);

// The instruction sets compiled in and supported by the running CPU, best first.
std::vector<std::string> supported_isas();

namespace isa_avx512 { void divergence(const DivergenceArgs& args); }
namespace isa_avx2 { void divergence(const DivergenceArgs& args); }
namespace isa_generic { void divergence(const DivergenceArgs& args); }

}  // namespace promptbake
