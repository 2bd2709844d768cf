// The sparse linear kernel for the generic instruction set; flags are set in CMakeLists.txt.
#define PB_ISA isa_generic
#define PB_LANES 4
#include "sparse_linear_impl.h"
