// A small cache of large, huge-page-backed CPU buffers. No torch headers.
//
// malloc hands multi-megabyte blocks back to the kernel on free, so every training step pays
// for page faults and the kernel's zeroing of fresh pages before a kernel writes a byte (for a
// 16 MiB gradient that is as much as the write). Keeping a few freed blocks for reuse, as the
// CUDA caching allocator does, removes that cost for the same shapes step after step.
#include "../kernels/buffer_pool.h"

#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace llkern {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

struct Pool {
  std::mutex mutex;
  std::list<std::pair<size_t, void*>> free_blocks;  // (rounded size, block), oldest first
  size_t cached_bytes = 0;
  size_t limit_bytes = size_t(256) << 20;

  Pool() {
    if (const char* env = std::getenv("LLKERN_CPU_CACHE_MB")) limit_bytes = size_t(std::strtoull(env, nullptr, 10)) << 20;
  }
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: deleters may run during interpreter exit
  return *instance;
}

}  // namespace

size_t buffer_pool_block_bytes(size_t nbytes) { return (nbytes + kHugePage - 1) / kHugePage * kHugePage; }

void* buffer_pool_acquire(size_t nbytes) {
  const size_t size = buffer_pool_block_bytes(nbytes);
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it) {  // a handful of entries
      if (it->first == size) {
        void* block = it->second;
        p.free_blocks.erase(it);
        p.cached_bytes -= size;
        return block;
      }
    }
  }
  void* block = std::aligned_alloc(kHugePage, size);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (block != nullptr) madvise(block, size, MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
  return block;
}

void buffer_pool_release(void* block, size_t nbytes) {
  const size_t size = buffer_pool_block_bytes(nbytes);
  Pool& p = pool();
  std::list<std::pair<size_t, void*>> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (size > p.limit_bytes) {
      evicted.emplace_back(size, block);
    } else {
      // Oldest first: sizes no longer used (a last partial batch, evaluation shapes) make room.
      while (p.cached_bytes + size > p.limit_bytes) {
        p.cached_bytes -= p.free_blocks.front().first;
        evicted.splice(evicted.end(), p.free_blocks, p.free_blocks.begin());
      }
      p.free_blocks.emplace_back(size, block);
      p.cached_bytes += size;
    }
  }
  for (auto& entry : evicted) std::free(entry.second);
}

size_t buffer_pool_cached_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.cached_bytes;
}

void buffer_pool_empty() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  for (auto& entry : p.free_blocks) std::free(entry.second);
  p.free_blocks.clear();
  p.cached_bytes = 0;
}

}  // namespace llkern
