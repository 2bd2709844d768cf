// Runtime choice among the instruction sets the sparse linear kernel was compiled for: the same
// ones, with the same CPU checks, as the divergence kernel (supported_isas, csrc/divergence.cpp).
#include <cstring>
#include <string>
#include <vector>

#include "sparse_linear.h"

namespace promptbake {

bool sparse_linear(const SparseLinearArgs& args, const char* isa) {
  static const std::vector<std::string> supported = supported_isas();  // best first
  for (const std::string& name : supported) {
    if (isa != nullptr && *isa != '\0' && name != isa) continue;
#ifdef PB_X86_KERNELS
    if (name == "avx512") return isa_avx512::sparse_linear(args), true;
    if (name == "avx2") return isa_avx2::sparse_linear(args), true;
#endif
    if (name == "generic") return isa_generic::sparse_linear(args), true;
  }
  return false;
}

}  // namespace promptbake
