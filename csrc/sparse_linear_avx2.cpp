// The sparse linear kernel for the avx2 instruction set; flags are set in CMakeLists.txt.
#define PB_ISA isa_avx2
#define PB_LANES 8
#include "sparse_linear_impl.h"
