#include "pool.h"

#include <cstdint>
#include <mutex>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define PB_HAVE_MMAP 1
#endif

#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and fault lazily
#endif

namespace promptbake {
namespace {

constexpr size_t kHuge = size_t{1} << 21;
constexpr size_t kKeepFree = 2;  // free blocks kept mapped for reuse

struct Block {
  void* ptr;
  size_t bytes;
};

struct Pool {
  std::mutex mutex;
  std::vector<Block> in_use, free_blocks;
};

// Never destroyed: tensors still alive at interpreter exit give their blocks back after static
// destructors have run.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void* map_block(size_t bytes, int threads) {
#ifdef PB_HAVE_MMAP
  void* p = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  // Keep the 2 MiB-aligned part, so every page of the block can be a huge page.
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (raw + kHuge - 1) & ~(kHuge - 1);
  if (aligned > raw) munmap(p, aligned - raw);
  const uintptr_t tail = aligned + bytes, raw_end = raw + bytes + kHuge;
  if (raw_end > tail) munmap(reinterpret_cast<void*>(tail), raw_end - tail);
#ifdef __linux__
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
  // Fault the block in now, in parallel: lazily faulted huge pages stall on compaction.
  const int64_t chunk = int64_t{16} << 20;
  const int64_t chunks = static_cast<int64_t>((bytes + chunk - 1) / chunk);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    const size_t from = static_cast<size_t>(c * chunk);
    const size_t len = from + chunk < bytes ? chunk : bytes - from;
    madvise(reinterpret_cast<void*>(aligned + from), len, MADV_POPULATE_WRITE);
  }
#endif
  (void)threads;
  return reinterpret_cast<void*>(aligned);
#else
  (void)bytes;
  (void)threads;
  return nullptr;
#endif
}

void unmap_block(const Block& b) {
#ifdef PB_HAVE_MMAP
  munmap(b.ptr, b.bytes);
#endif
}

}  // namespace

void* pool_acquire(size_t bytes, int threads) {
  bytes = (bytes + kHuge - 1) & ~(kHuge - 1);
  Pool& P = pool();
  auto& free_blocks = P.free_blocks;
  auto& in_use = P.in_use;
  {
    std::lock_guard<std::mutex> lock(P.mutex);
    // The smallest free block that fits without wasting more than half of itself.
    size_t best = free_blocks.size();
    for (size_t i = 0; i < free_blocks.size(); ++i) {
      const size_t have = free_blocks[i].bytes;
      if (have >= bytes && have <= 2 * bytes && (best == free_blocks.size() || have < free_blocks[best].bytes))
        best = i;
    }
    if (best < free_blocks.size()) {
      in_use.push_back(free_blocks[best]);
      free_blocks.erase(free_blocks.begin() + static_cast<std::ptrdiff_t>(best));
      return in_use.back().ptr;
    }
  }
  void* p = map_block(bytes, threads);
  if (p) {
    std::lock_guard<std::mutex> lock(P.mutex);
    in_use.push_back({p, bytes});
  }
  return p;
}

void pool_release(void* ptr) {
  Pool& P = pool();
  auto& free_blocks = P.free_blocks;
  auto& in_use = P.in_use;
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(P.mutex);
    for (size_t i = 0; i < in_use.size(); ++i) {
      if (in_use[i].ptr != ptr) continue;
      free_blocks.push_back(in_use[i]);
      in_use.erase(in_use.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
    while (free_blocks.size() > kKeepFree) {  // the oldest go first
      drop.push_back(free_blocks.front());
      free_blocks.erase(free_blocks.begin());
    }
  }
  for (const Block& b : drop) unmap_block(b);
}

size_t pool_trim() {
  Pool& P = pool();
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(P.mutex);
    drop.swap(P.free_blocks);
  }
  size_t freed = 0;
  for (const Block& b : drop) {
    unmap_block(b);
    freed += b.bytes;
  }
  return freed;
}

size_t pool_mapped_bytes() {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mutex);
  size_t total = 0;
  for (const Block& b : P.in_use) total += b.bytes;
  for (const Block& b : P.free_blocks) total += b.bytes;
  return total;
}

}  // namespace promptbake
