// Cache of large CPU buffers (huge-page backed, reused across steps). See cpu/buffer_pool.cpp.
#pragma once

#include <cstddef>

namespace llkern {

// Buffers of at least kBufferPoolMinBytes come from the pool; smaller ones from the allocator.
constexpr size_t kBufferPoolMinBytes = size_t(4) << 20;

size_t buffer_pool_block_bytes(size_t nbytes);
void* buffer_pool_acquire(size_t nbytes);               // null on failure
// Caches the block, evicting the oldest cached ones beyond LLKERN_CPU_CACHE_MB (default 256).
void buffer_pool_release(void* block, size_t nbytes);
size_t buffer_pool_cached_bytes();
void buffer_pool_empty();

}  // namespace llkern
