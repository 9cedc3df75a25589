// A CPU stand-in for the parts of the CUDA runtime and device language that llkern's kernels use, so
// that csrc/cuda/*.cu run, unchanged, on a machine without a GPU (tests/cuda_emu/build.py compiles them
// with this directory first on the include path, after rewriting each `kernel<<<grid, block, shmem,
// stream>>>(args)` as `cuda_emu::launch(kernel, cuda_emu::Config(grid, block, shmem, stream), args)`).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; the blocks of a grid run one after
// another. A fiber runs until it reaches a synchronising call (__syncthreads, __syncwarp, a shuffle, a
// ballot) and waits there until every thread the call names has arrived, so warp-level data exchange
// and shared memory behave as on the GPU wherever the kernel synchronises as CUDA requires. What it
// catches that a plain host port would not:
//   - a shuffle or ballot whose mask names a lane that has exited, or lanes of one warp meeting at
//     different kinds of call or masks (undefined behaviour on the GPU) -> an error naming the call;
//   - a block whose threads wait on each other forever (deadlock) -> an error;
//   - a missing __syncthreads between a write and another thread's read of shared memory: threads run
//     in order 0..n-1 (or n-1..0 with LLKERN_EMU_ORDER=reverse) each until its next synchronising call,
//     so the reader sees the stale value and the test's comparison fails; and a missing barrier before
//     shared memory is written again, with LLKERN_EMU_ORDER=warps (each warp runs ahead as far as the
//     barriers let it);
//   - with build.load(sanitize=True) under AddressSanitizer, reads and writes out of a tensor's bounds;
//   - grid-stride loops and one-wave grids with several iterations at small sizes: the device reports
//     LLKERN_EMU_SMS (default 2) multiprocessors.
// What it cannot: data races between threads that synchronise (it is sequentially consistent), timing,
// and the GPU's rounding of approximate intrinsics (it computes them exactly on the host).
#pragma once

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Block-shared memory: build.py rewrites `__shared__ T name[dims];` as
// `auto& name = ::cuda_emu::shared_memory<T[dims], id>();`, one static object per declaration (the blocks
// of a grid run one after another, so it serves each block in turn). Every block starts by filling all of
// them with 0xff bytes (NaN, or -1): a read before the block's own write shows, instead of finding the
// last block's values. A declaration the rewrite missed does not compile.
#define __shared__ __shared___declaration_not_rewritten_by_tests_cuda_emu_build_py

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace cuda_emu {

constexpr int kWarpSize = 32;

// The device's shape as the kernels' launch code sees it.
inline int multiprocessors() {
  const char* s = std::getenv("LLKERN_EMU_SMS");
  const int n = s ? std::atoi(s) : 2;
  return n > 0 ? n : 2;
}
// How a block's fibers take turns (LLKERN_EMU_ORDER):
//   forward  thread 0, 1, ..., n-1, each until its next synchronising call, then again;
//   reverse  the same from thread n-1 down;
//   warps    warp 0's lanes until all of them wait at __syncthreads (or have exited), then warp 1's, ...:
//            a warp runs as far ahead of the others as the barriers allow, so a missing barrier before
//            shared memory is reused (a write after another warp's read) shows.
enum class Order { kForward, kReverse, kWarps };
inline Order order() {
  const char* s = std::getenv("LLKERN_EMU_ORDER");
  if (s && std::strcmp(s, "reverse") == 0) return Order::kReverse;
  if (s && std::strcmp(s, "warps") == 0) return Order::kWarps;
  return Order::kForward;
}

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class SyncKind { kNone, kShflXor, kShflDown, kShflUp, kShflIdx, kBallot, kSyncwarp };

inline const char* sync_name(SyncKind k) {
  switch (k) {
    case SyncKind::kShflXor: return "__shfl_xor_sync";
    case SyncKind::kShflDown: return "__shfl_down_sync";
    case SyncKind::kShflUp: return "__shfl_up_sync";
    case SyncKind::kShflIdx: return "__shfl_sync";
    case SyncKind::kBallot: return "__ballot_sync";
    case SyncKind::kSyncwarp: return "__syncwarp";
    default: return "?";
  }
}

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
  dim3 idx;
  int linear = 0;           // threadIdx as one number
  bool done = false;
  bool waiting = false;     // inside a synchronising call, not yet released
  unsigned warp_generation = 0;
  unsigned block_generation = 0;
};

// One warp's meeting point. Generations alternate between two slots: a lane can be at most one meeting
// ahead of the slowest lane of its warp (the next meeting needs everyone), so the slow lanes still read
// their meeting's values while the fast ones write the next.
struct WarpMeeting {
  int arrived = 0, left = 0;
  unsigned mask = 0;
  SyncKind kind = SyncKind::kNone;
  uint64_t value[kWarpSize] = {};
  int32_t predicate[kWarpSize] = {};
};

struct BlockState {
  std::vector<Fiber> fibers;
  std::vector<std::vector<WarpMeeting>> warps;  // [warp][generation & 1]
  int barrier_arrived[2] = {0, 0}, barrier_left[2] = {0, 0};
  int done = 0;
  unsigned long progress = 0;  // bumped by every arrival, release and exit: no change over a pass = deadlock
};

struct Runtime {
  ucontext_t scheduler;
  BlockState block;
  Fiber* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  std::string failure;  // set inside a fiber; the scheduler throws it
  std::vector<char*> stacks;
  std::vector<std::pair<void*, size_t>> shared_regions;
  size_t stack_bytes = 256 * 1024;
  size_t page = 4096;
  void* scheduler_fake_stack = nullptr;  // AddressSanitizer's view of the launching thread's stack
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline Fiber& self() {
  Runtime& r = runtime();
  if (!r.current) throw Error("cuda_emu: a device function was called outside a kernel launch");
  return *r.current;
}

// Under AddressSanitizer (build.py with sanitize=True) every switch of stacks is announced, so that it
// follows the fibers' stacks; elsewhere these do nothing.
#if defined(__SANITIZE_ADDRESS__)
inline void asan_enter_fiber(Fiber& f) {
  Runtime& r = runtime();
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, f.stack, f.stack_size);
}
inline void asan_back_in_scheduler() { __sanitizer_finish_switch_fiber(runtime().scheduler_fake_stack, nullptr, nullptr); }
inline void asan_leave_fiber(bool exiting) {
  Runtime& r = runtime();
  __sanitizer_start_switch_fiber(exiting ? nullptr : &r.current->fake_stack, r.scheduler_stack, r.scheduler_stack_size);
}
inline void asan_in_fiber(bool first) {
  Runtime& r = runtime();
  __sanitizer_finish_switch_fiber(first ? nullptr : r.current->fake_stack, first ? &r.scheduler_stack : nullptr,
                                  first ? &r.scheduler_stack_size : nullptr);
}
inline void asan_clear_stack(void* p, size_t bytes) { __asan_unpoison_memory_region(p, bytes); }
#else
inline void asan_enter_fiber(Fiber&) {}
inline void asan_back_in_scheduler() {}
inline void asan_leave_fiber(bool) {}
inline void asan_in_fiber(bool) {}
inline void asan_clear_stack(void*, size_t) {}
#endif

// Back to the scheduler; it resumes this fiber on its next pass.
inline void yield() {
  Runtime& r = runtime();
  Fiber* f = r.current;
  asan_leave_fiber(false);
  swapcontext(&f->context, &r.scheduler);
  asan_in_fiber(false);
}

// An error inside a kernel: recorded, and this fiber never resumes (the scheduler stops the launch).
[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = runtime();
  if (r.failure.empty()) {
    const Fiber& f = *r.current;
    r.failure = "cuda_emu: block (" + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + "," +
                std::to_string(r.block_idx.z) + ") thread (" + std::to_string(f.idx.x) + "," +
                std::to_string(f.idx.y) + "," + std::to_string(f.idx.z) + "): " + what;
  }
  for (;;) yield();
}

inline int lane_of(const Fiber& f) { return f.linear % kWarpSize; }
inline int warp_of(const Fiber& f) { return f.linear / kWarpSize; }

// The lanes of this fiber's warp that exist (a block whose size is not a multiple of 32 has a short
// last warp).
inline unsigned existing_lanes(const Fiber& f) {
  const Runtime& r = runtime();
  const int threads = int(r.block.fibers.size());
  const int first = warp_of(f) * kWarpSize;
  const int count = threads - first < kWarpSize ? threads - first : kWarpSize;
  return count == kWarpSize ? 0xffffffffu : ((1u << count) - 1u);
}

// Every lane of `mask` (that exists) meets here; returns the meeting's slot, whose value[] and
// predicate[] hold every participant's contribution. The caller reads it and then calls leave().
inline WarpMeeting& meet(SyncKind kind, unsigned mask, uint64_t value, int32_t predicate) {
  Runtime& r = runtime();
  Fiber& f = self();
  const int lane = lane_of(f);
  if (!(mask >> lane & 1u)) fail(std::string(sync_name(kind)) + " called with a mask that omits the calling lane");
  const unsigned participants = mask & existing_lanes(f);
  // Each lane counts its own meetings, and the two slots alternate with that count: a mask that leaves
  // out lanes of the warp would put them out of step. llkern's kernels use full masks.
  if (participants != existing_lanes(f)) {
    fail(std::string(sync_name(kind)) + ": masks naming part of a warp are not emulated");
  }
  WarpMeeting& m = r.block.warps[warp_of(f)][f.warp_generation & 1u];
  if (m.arrived == 0) {
    m.kind = kind;
    m.mask = mask;
  } else if (m.kind != kind || m.mask != mask) {
    fail(std::string("lanes of warp ") + std::to_string(warp_of(f)) + " meet at different calls: " +
         sync_name(m.kind) + " and " + sync_name(kind) + " (divergent warp synchronisation)");
  }
  m.value[lane] = value;
  m.predicate[lane] = predicate;
  ++m.arrived;
  ++r.block.progress;
  f.waiting = true;
  while (m.arrived < __builtin_popcount(participants)) {
    const int base = warp_of(f) * kWarpSize;
    for (int l = 0; l < kWarpSize; ++l) {
      if ((participants >> l & 1u) && r.block.fibers[base + l].done) {
        fail(std::string(sync_name(kind)) + ": lane " + std::to_string(l) +
             " named in the mask has exited (undefined behaviour on the GPU)");
      }
    }
    yield();
  }
  f.waiting = false;
  return m;
}

inline void leave(WarpMeeting& m, unsigned participants_mask) {
  Runtime& r = runtime();
  Fiber& f = self();
  ++f.warp_generation;
  ++r.block.progress;
  if (++m.left == __builtin_popcount(participants_mask & existing_lanes(f))) {
    m.arrived = m.left = 0;
    m.kind = SyncKind::kNone;
  }
}

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T shuffle(SyncKind kind, unsigned mask, T v, int arg, int width) {
  Fiber& f = self();
  const int lane = lane_of(f);
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32");
  WarpMeeting& m = meet(kind, mask, to_bits(v), 0);
  const int group = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case SyncKind::kShflXor: src = lane ^ arg; if (src >= group + width) src = lane; break;
    case SyncKind::kShflDown: src = lane + arg; if (src >= group + width) src = lane; break;
    case SyncKind::kShflUp: src = lane - arg; if (src < group) src = lane; break;
    case SyncKind::kShflIdx: src = group + (arg % width); break;
    default: break;
  }
  src &= kWarpSize - 1;
  if (!(m.mask >> src & 1u) || !(existing_lanes(f) >> src & 1u)) {
    leave(m, mask);
    fail(std::string(sync_name(kind)) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
         ((m.mask >> src & 1u) ? ", which does not exist in this block's last warp"
                               : ", which is not in the mask") + " (undefined value on the GPU)");
  }
  const T out = from_bits<T>(m.value[src]);
  leave(m, mask);
  return out;
}

// __syncthreads: every thread of the block that has not exited.
inline void barrier() {
  Runtime& r = runtime();
  Fiber& f = self();
  BlockState& b = r.block;
  const int g = int(f.block_generation & 1u);
  ++b.barrier_arrived[g];
  ++b.progress;
  f.waiting = true;
  while (b.barrier_arrived[g] + b.done < int(b.fibers.size())) yield();
  f.waiting = false;
  ++f.block_generation;
  ++b.progress;
  if (++b.barrier_left[g] == b.barrier_arrived[g]) b.barrier_arrived[g] = b.barrier_left[g] = 0;
}

inline void fiber_main() {
  asan_in_fiber(true);
  Runtime& r = runtime();
  (*r.body)();
  r.current->done = true;
  ++r.block.done;
  ++r.block.progress;
  asan_leave_fiber(true);
  swapcontext(&r.current->context, &r.scheduler);  // never resumed
}

inline void ensure_stacks(size_t count) {
  Runtime& r = runtime();
  r.page = size_t(sysconf(_SC_PAGESIZE));
  while (r.stacks.size() < count) {
    // A guard page below each stack: an overflow faults instead of corrupting its neighbour.
    void* p = mmap(nullptr, r.stack_bytes + r.page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw Error("cuda_emu: cannot map a fiber stack");
    mprotect(p, r.page, PROT_NONE);
    r.stacks.push_back(static_cast<char*>(p));
  }
}

// Runs fiber f until it next yields or exits; a failure inside it becomes an exception here.
inline void resume(Fiber& f) {
  Runtime& r = runtime();
  if (f.done) return;
  r.current = &f;
  asan_enter_fiber(f);
  swapcontext(&r.scheduler, &f.context);
  asan_back_in_scheduler();
  r.current = nullptr;
  if (!r.failure.empty()) {
    std::string what;
    what.swap(r.failure);
    throw Error(what);
  }
}

inline void run_block(unsigned threads) {
  Runtime& r = runtime();
  BlockState& b = r.block;
  for (const auto& region : r.shared_regions) std::memset(region.first, 0xff, region.second);
  b.fibers.assign(threads, Fiber{});
  b.warps.assign((threads + kWarpSize - 1) / kWarpSize, std::vector<WarpMeeting>(2));
  b.barrier_arrived[0] = b.barrier_arrived[1] = b.barrier_left[0] = b.barrier_left[1] = 0;
  b.done = 0;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = int(t);
    f.idx = dim3(t % r.block_dim.x, (t / r.block_dim.x) % r.block_dim.y, t / (r.block_dim.x * r.block_dim.y));
    getcontext(&f.context);
    f.stack = r.stacks[t] + r.page;
    f.stack_size = r.stack_bytes;
    asan_clear_stack(f.stack, f.stack_size);  // frames a fiber of the last block left poisoned
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = f.stack_size;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  const Order how = order();
  const unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
  while (b.done < int(threads)) {
    const unsigned long before = b.progress;
    if (how == Order::kWarps) {
      for (unsigned w = 0; w < warps; ++w) {
        const unsigned first = w * kWarpSize, last = first + kWarpSize < threads ? first + kWarpSize : threads;
        unsigned long mark;
        do {  // this warp's lanes until none of them moves
          mark = b.progress;
          for (unsigned t = first; t < last; ++t) resume(b.fibers[t]);
        } while (b.progress != mark);
      }
    } else {
      for (unsigned i = 0; i < threads; ++i) resume(b.fibers[how == Order::kReverse ? threads - 1 - i : i]);
    }
    if (b.progress == before) {
      std::string waiting;
      for (const Fiber& f : b.fibers) {
        if (!f.done && waiting.size() < 200) waiting += " " + std::to_string(f.linear);
      }
      throw Error("cuda_emu: deadlock in block (" + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) +
                  "," + std::to_string(r.block_idx.z) + "): threads waiting forever:" + waiting);
    }
  }
}

template <typename T, int kId>
T& shared_memory() {
  static T storage;
  static const bool registered = [] {
    runtime().shared_regions.emplace_back(&storage, sizeof(T));
    std::memset(&storage, 0xff, sizeof(T));  // first use, inside a block that started before it was known
    return true;
  }();
  (void)registered;
  return storage;
}

struct Config {
  dim3 grid, block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shared_bytes(s), stream(st) {}
};

// kernel<<<config>>>(args...): the arguments are converted to the kernel's parameter types at the launch,
// as CUDA copies them.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const Config& c, Args&&... args) {
  Runtime& r = runtime();
  if (r.current) throw Error("cuda_emu: a kernel launched from inside a kernel (dynamic parallelism)");
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 ||
      c.grid.z > 65535 || c.block.z > 64) {
    throw Error("cuda_emu: invalid launch configuration: grid (" + std::to_string(c.grid.x) + "," +
                std::to_string(c.grid.y) + "," + std::to_string(c.grid.z) + "), block (" + std::to_string(c.block.x) +
                "," + std::to_string(c.block.y) + "," + std::to_string(c.block.z) + ")");
  }
  if (c.shared_bytes != 0) throw Error("cuda_emu: dynamic shared memory is not emulated");
  std::tuple<Params...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  ensure_stacks(threads);
  r.body = &body;
  r.block_dim = c.block;
  r.grid_dim = c.grid;
  for (unsigned z = 0; z < c.grid.z; ++z) {
    for (unsigned y = 0; y < c.grid.y; ++y) {
      for (unsigned x = 0; x < c.grid.x; ++x) {
        r.block_idx = dim3(x, y, z);
        run_block(unsigned(threads));
      }
    }
  }
  r.body = nullptr;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::self().idx)
#define blockIdx (::cuda_emu::runtime().block_idx)
#define blockDim (::cuda_emu::runtime().block_dim)
#define gridDim (::cuda_emu::runtime().grid_dim)
#define warpSize 32

inline void __syncthreads() { cuda_emu::barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::WarpMeeting& m = cuda_emu::meet(cuda_emu::SyncKind::kSyncwarp, mask, 0, 0);
  cuda_emu::leave(m, mask);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  cuda_emu::WarpMeeting& m = cuda_emu::meet(cuda_emu::SyncKind::kBallot, mask, 0, predicate != 0);
  unsigned out = 0;
  for (int l = 0; l < cuda_emu::kWarpSize; ++l) {
    if ((m.mask >> l & 1u) && m.predicate[l]) out |= 1u << l;
  }
  cuda_emu::leave(m, mask);
  return out;
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::SyncKind::kShflXor, mask, v, lane_mask, width);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::SyncKind::kShflDown, mask, v, int(delta), width);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::SyncKind::kShflUp, mask, v, int(delta), width);
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::SyncKind::kShflIdx, mask, v, src, width);
}

// Fibers run one at a time: a read-modify-write is atomic.
template <typename T> inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline float __int_as_float(int v) { return cuda_emu::from_bits<float>(uint32_t(v)); }
inline int __float_as_int(float v) { return int(uint32_t(cuda_emu::to_bits(v))); }
inline double __longlong_as_double(long long v) { return cuda_emu::from_bits<double>(uint64_t(v)); }
inline long long __double_as_longlong(double v) { return (long long)cuda_emu::to_bits(v); }
// Round-to-nearest products and sums, never contracted into an FMA (the build passes -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = cuda_emu::multiprocessors();
  return cudaSuccess;
}
// Two resident blocks per multiprocessor, whatever the kernel: small one-wave grids, many grid-stride steps.
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "cuda_emu error"; }
