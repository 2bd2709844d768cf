// The sparse linear kernel for the avx512 instruction set; flags are set in CMakeLists.txt.
#define PB_ISA isa_avx512
#define PB_LANES 16
#include "sparse_linear_impl.h"
