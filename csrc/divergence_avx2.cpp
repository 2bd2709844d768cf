// The divergence kernel for the avx2 instruction set; flags are set in CMakeLists.txt.
#define PB_ISA isa_avx2
#define PB_LANES 8
#include "divergence_impl.h"
