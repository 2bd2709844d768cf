// promptbake._C: the compiled kernels, bound with pybind11.
//
// Tensors cross this boundary as data pointers (integers), dtype codes and strides, so the module
// depends on no tensor library; python/promptbake/ops validates every argument before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "divergence.h"
#include "pool.h"
#include "sparse_linear.h"

namespace py = pybind11;
using promptbake::DivergenceArgs;

namespace {

// The DLPack ABI (dmlc/dlpack, v0.8 layout): enough to hand a pooled CPU buffer to any array
// library as a 1-D uint8 tensor whose deleter gives the memory back to the pool.
struct DLDevice {
  int32_t device_type;  // 1 = CPU
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 1 = unsigned int
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

struct PooledBuffer {
  DLManagedTensor managed;
  int64_t shape[1];
};

void release_pooled(DLManagedTensor* self) {
  promptbake::pool_release(self->dl_tensor.data);
  delete static_cast<PooledBuffer*>(self->manager_ctx);
}

py::object pooled_empty(size_t bytes, int threads) {
  void* data;
  {
    py::gil_scoped_release release;
    data = promptbake::pool_acquire(bytes, threads);
  }
  if (!data) return py::none();
  auto* buf = new PooledBuffer();
  buf->shape[0] = static_cast<int64_t>(bytes);
  buf->managed.dl_tensor = {data, {1, 0}, 1, {1, 8, 1}, buf->shape, nullptr, 0};
  buf->managed.manager_ctx = buf;
  buf->managed.deleter = release_pooled;
  // A consumer renames the capsule to "used_dltensor" and owns the buffer from then on; an
  // unconsumed capsule gives it back here.
  PyObject* capsule = PyCapsule_New(&buf->managed, "dltensor", [](PyObject* cap) {
    if (!PyCapsule_IsValid(cap, "dltensor")) return;
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    m->deleter(m);
  });
  if (!capsule) {
    release_pooled(&buf->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

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

void sparse_linear(uintptr_t x, int x_dtype, int64_t x_stride, uintptr_t bitmap, uintptr_t values,
                   int values_dtype, uintptr_t row_offsets, uintptr_t bias, int bias_dtype,
                   uintptr_t y, int64_t y_stride, int64_t batch, int64_t in_features,
                   int64_t out_features, int64_t nnz, int num_threads, const std::string& isa) {
  for (int code : {x_dtype, values_dtype, bias_dtype})
    if (code < 0 || code > 2)
      throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  if (!x || !bitmap || !row_offsets || !y || (!values && nnz > 0) || batch < 0 ||
      in_features <= 0 || out_features <= 0 || nnz < 0)
    throw std::invalid_argument("null pointer or empty shape passed to sparse_linear");
  promptbake::SparseLinearArgs a;
  a.x = ptr<const void>(x);
  a.x_dtype = static_cast<promptbake::DType>(x_dtype);
  a.x_stride = x_stride;
  a.bitmap = ptr<const uint32_t>(bitmap);
  a.values = ptr<const void>(values);
  a.values_dtype = static_cast<promptbake::DType>(values_dtype);
  a.row_offsets = ptr<const int64_t>(row_offsets);
  a.bias = ptr<const void>(bias);
  a.bias_dtype = static_cast<promptbake::DType>(bias_dtype);
  a.y = ptr<void>(y);
  a.y_stride = y_stride;
  a.batch = batch;
  a.in_features = in_features;
  a.out_features = out_features;
  a.nnz = nnz;
  a.num_threads = num_threads;
  bool ran;
  {
    py::gil_scoped_release release;
    ran = promptbake::sparse_linear(a, isa.c_str());
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
  m.def("sparse_linear", &sparse_linear, py::arg("x"), py::arg("x_dtype"), py::arg("x_stride"),
        py::arg("bitmap"), py::arg("values"), py::arg("values_dtype"), py::arg("row_offsets"),
        py::arg("bias"), py::arg("bias_dtype"), py::arg("y"), py::arg("y_stride"),
        py::arg("batch"), py::arg("in_features"), py::arg("out_features"), py::arg("nnz"),
        py::arg("num_threads"), py::arg("isa") = "",
        "y = x W^T + b for W as row bitmaps + packed values; see csrc/sparse_linear.h.");
  m.def("pooled_empty", &pooled_empty, py::arg("bytes"), py::arg("threads") = 0,
        "A DLPack capsule of at least `bytes` uninitialised bytes from the buffer pool (see "
        "csrc/pool.h), or None if the OS refuses the mapping.");
  m.def("pool_trim", &promptbake::pool_trim, "Unmap the pool's free blocks; returns bytes freed.");
  m.def("pool_mapped_bytes", &promptbake::pool_mapped_bytes,
        "Bytes the pool has mapped, in use and free.");
}
