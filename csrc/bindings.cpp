// promptbake._C: the compiled kernels, bound with pybind11.
//
// Tensors cross this boundary as data pointers (integers), dtype codes and strides, so the module
// depends on no tensor library; python/promptbake/ops validates every argument before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "divergence.h"
#include "memory.h"

namespace py = pybind11;
using promptbake::DivergenceArgs;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void divergence(uintptr_t student, int student_dtype, int64_t student_stride, uintptr_t teacher,
                int teacher_dtype, int64_t teacher_stride, uintptr_t mask, uintptr_t grad,
                int64_t grad_stride, uintptr_t row_loss, int64_t rows, int64_t vocab, int kind,
                double beta, double inv_temperature, double loss_scale, double grad_scale,
                bool teacher_is_logprobs, int num_threads, const std::string& isa) {
  if (student_dtype < 0 || student_dtype > 2 || teacher_dtype < 0 || teacher_dtype > 2)
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  if (kind < 0 || kind > 2)
    throw std::invalid_argument("kind code must be 0 (forward KL), 1 (reverse KL) or 2 (JSD)");
  if (!student || !teacher || !row_loss || rows < 0 || vocab <= 0)
    throw std::invalid_argument("null pointer or empty shape passed to divergence");
  DivergenceArgs a;
  a.student = ptr<const void>(student);
  a.student_dtype = static_cast<promptbake::DType>(student_dtype);
  a.student_stride = student_stride;
  a.teacher = ptr<const void>(teacher);
  a.teacher_dtype = static_cast<promptbake::DType>(teacher_dtype);
  a.teacher_stride = teacher_stride;
  a.mask = ptr<const uint8_t>(mask);
  a.grad = ptr<void>(grad);
  a.grad_stride = grad_stride;
  a.row_loss = ptr<float>(row_loss);
  a.rows = rows;
  a.vocab = vocab;
  a.kind = static_cast<promptbake::Kind>(kind);
  a.beta = beta;
  a.inv_temperature = inv_temperature;
  a.loss_scale = loss_scale;
  a.grad_scale = grad_scale;
  a.teacher_is_logprobs = teacher_is_logprobs;
  a.num_threads = num_threads;
  bool ran;
  {
    py::gil_scoped_release release;
    ran = promptbake::divergence(a, isa.c_str());
  }
  if (!ran) throw std::invalid_argument("instruction set '" + isa + "' is not available here");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "promptbake compiled kernels (raw pointers in, no tensor library)";
  m.attr("__version__") = PB_VERSION;
  m.def("isas", &promptbake::supported_isas,
        "Instruction sets compiled in and supported by this CPU, best first.");
  m.def("divergence", &divergence, py::arg("student"), py::arg("student_dtype"),
        py::arg("student_stride"), py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("teacher_stride"), py::arg("mask"), py::arg("grad"), py::arg("grad_stride"),
        py::arg("row_loss"), py::arg("rows"), py::arg("vocab"), py::arg("kind"),
        py::arg("beta"), py::arg("inv_temperature"), py::arg("loss_scale"),
        py::arg("grad_scale"), py::arg("teacher_is_logprobs"), py::arg("num_threads"),
        py::arg("isa") = "",
        "Fused divergence over rows of logits; see csrc/divergence.h for the arguments.");
  m.def("advise_hugepages", [](uintptr_t address, size_t bytes) {
    return promptbake::advise_hugepages(ptr<void>(address), bytes);
  }, py::arg("address"), py::arg("bytes"),
        "Hint that a fresh buffer should be backed by huge pages; see csrc/memory.h.");
}
