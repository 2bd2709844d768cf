// The divergence kernel for the avx512 instruction set; flags are set in CMakeLists.txt.
#define PB_ISA isa_avx512
#define PB_LANES 16
#include "divergence_impl.h"
