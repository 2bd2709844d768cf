// Runtime choice among the instruction sets the divergence kernel was compiled for.
#include <cstring>

#include "divergence.h"

namespace promptbake {
namespace {

struct Isa {
  const char* name;
  void (*fn)(const DivergenceArgs&);
  bool supported;
};

// Best first. The x86 variants exist only where CMake compiled them (PB_X86_KERNELS).
const Isa* table(int* count) {
  static const Isa isas[] = {
#ifdef PB_X86_KERNELS
      {"avx512", isa_avx512::divergence,
       __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")},
      {"avx2", isa_avx2::divergence,
       __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c")},
#endif
      {"generic", isa_generic::divergence, true},
  };
  *count = sizeof(isas) / sizeof(isas[0]);
  return isas;
}

}  // namespace

std::vector<std::string> supported_isas() {
  int n = 0;
  const Isa* isas = table(&n);
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i)
    if (isas[i].supported) names.emplace_back(isas[i].name);
  return names;
}

bool divergence(const DivergenceArgs& args, const char* isa) {
  int n = 0;
  const Isa* isas = table(&n);
  for (int i = 0; i < n; ++i) {
    if (!isas[i].supported) continue;
    if (isa == nullptr || *isa == '\0' || std::strcmp(isa, isas[i].name) == 0) {
      isas[i].fn(args);
      return true;
    }
  }
  return false;
}

}  // namespace promptbake
