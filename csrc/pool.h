// A pool of large host buffers that stay mapped, and faulted in, between uses.
//
// A training step allocates a fresh N x V gradient every time; the OS then faults it in page by
// page (and zeroes it), which on these machines costs as much as the divergence itself. Blocks
// from this pool are backed by transparent huge pages, faulted in once, and recycled when the
// tensor that used them is freed (the DLPack deleter calls pool_release).
#pragma once

#include <cstddef>

namespace promptbake {

// A buffer of at least `bytes`, 2 MiB aligned; nullptr if the OS refuses the mapping.
void* pool_acquire(size_t bytes, int threads);
// Gives the buffer back; the pool keeps a few free blocks mapped and unmaps the rest.
void pool_release(void* ptr);
// Unmaps every free block; returns the bytes given back to the OS.
size_t pool_trim();
// Bytes mapped by the pool, in use and free.
size_t pool_mapped_bytes();

}  // namespace promptbake
