// Memory hints for large output buffers.
#pragma once

#include <cstddef>

namespace promptbake {

// Asks the kernel to back the 2 MiB-aligned interior of [ptr, ptr + bytes) with transparent huge
// pages before it is first written. A fresh N x V gradient is otherwise faulted in 4 KiB at a
// time, which costs as much as the divergence itself. A hint only: returns false where
// unsupported (not Linux, THP disabled) and the memory behaves as before.
bool advise_hugepages(void* ptr, size_t bytes);

}  // namespace promptbake
