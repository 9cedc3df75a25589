// Kernels that test the emulator itself (tests/test_cuda_emulated.py): each either computes a known
// answer through the synchronising calls, or breaks a CUDA rule the emulator must report.
// torch.ops.cuda_emu_selftest.run(case, blocks, threads) -> int32 tensor of blocks * threads.
#include <cuda_runtime.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace {

constexpr int kMaxThreads = 1024;

// Thread t of each block reads what thread t + 1 wrote to shared memory.
template <bool kBarrier>
__global__ void neighbour(int32_t* out) {
  __shared__ int32_t values[kMaxThreads];
  const int t = threadIdx.x;
  values[t] = int32_t(blockIdx.x) * 1000 + t;
  if (kBarrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = values[(t + 1) % blockDim.x];
}

// Two rounds through one shared array: each warp's lane 0 writes its slot, and after a barrier every
// thread adds all slots. Without the barrier that closes round 1, a warp that runs ahead overwrites its
// slot with round 2's value while another warp still reads round 1's.
template <bool kClosingBarrier>
__global__ void reuse(int32_t* out) {
  __shared__ int32_t slots[kMaxThreads / 32];
  const int warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  int32_t total = 0;
  for (int round = 1; round <= 2; ++round) {
    if (threadIdx.x % 32 == 0) slots[warp] = round * 100 + warp;
    __syncthreads();
    for (int w = 0; w < warps; ++w) total += slots[w] * round;
    if (kClosingBarrier) __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

// Per lane: its warp's sum by xor shuffles (bits 0..15), by down shuffles at lane 0 (bits 16..29)...
// written as three outputs through out[]: sum_xor, then sum_down on lane 0, then the ballot of odd lanes.
__global__ void warp_ops(int32_t* out) {
  const int t = threadIdx.x;
  const int lane = t % 32;
  int32_t v = t + 1;
  int32_t sum_xor = v;
  for (int offset = 16; offset > 0; offset >>= 1) sum_xor += __shfl_xor_sync(0xffffffffu, sum_xor, offset);
  int32_t sum_down = v;
  for (int offset = 16; offset > 0; offset >>= 1) sum_down += __shfl_down_sync(0xffffffffu, sum_down, offset);
  const unsigned odd = __ballot_sync(0xffffffffu, lane % 2 == 1);
  const int32_t from_lane_3 = __shfl_sync(0xffffffffu, v, 3);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + t;
  out[4 * i + 0] = sum_xor;
  out[4 * i + 1] = lane == 0 ? sum_down : -7;
  out[4 * i + 2] = int32_t(odd);
  out[4 * i + 3] = from_lane_3;
}

// Lanes 16..31 have returned when lanes 0..15 shuffle with a full mask.
__global__ void exited_lane(int32_t* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 1);
}

// Even lanes shuffle while odd lanes vote: one warp, two different synchronising calls.
__global__ void divergent(int32_t* out) {
  const int lane = threadIdx.x % 32;
  if (lane % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 2);
  } else {
    out[threadIdx.x] = int32_t(__ballot_sync(0xffffffffu, 1));
  }
}

// A shuffle among the even lanes only.
__global__ void partial_mask(int32_t* out) {
  const int lane = threadIdx.x % 32;
  if (lane % 2 == 0) out[threadIdx.x] = __shfl_xor_sync(0x55555555u, lane, 2);
}

// Lane 0 waits for its warp while the others wait for the block.
__global__ void deadlock(int32_t* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Thread t writes out[t + 1]: the last thread writes one element past the end.
__global__ void past_the_end(int32_t* out) { out[blockIdx.x * blockDim.x + threadIdx.x + 1] = 1; }

at::Tensor run(c10::string_view which, int64_t blocks, int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && blocks >= 1, "bad launch shape");
  const std::string name(which);
  at::Tensor out = at::full({blocks * threads * (name == "warp_ops" ? 4 : 1)}, -9, at::kInt);
  int32_t* o = out.data_ptr<int32_t>();
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  if (name == "barrier") {
    neighbour<true><<<grid, block>>>(o);
  } else if (name == "missing_barrier") {
    neighbour<false><<<grid, block>>>(o);
  } else if (name == "reuse") {
    reuse<true><<<grid, block>>>(o);
  } else if (name == "reuse_without_barrier") {
    reuse<false><<<grid, block>>>(o);
  } else if (name == "warp_ops") {
    warp_ops<<<grid, block>>>(o);
  } else if (name == "exited_lane") {
    exited_lane<<<grid, block>>>(o);
  } else if (name == "divergent") {
    divergent<<<grid, block>>>(o);
  } else if (name == "past_the_end") {
    past_the_end<<<grid, block>>>(o);
  } else if (name == "partial_mask") {
    partial_mask<<<grid, block>>>(o);
  } else if (name == "deadlock") {
    deadlock<<<grid, block>>>(o);
  } else {
    TORCH_CHECK(false, "unknown case ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(cuda_emu_selftest, m) { m.def("run(str which, int blocks, int threads) -> Tensor", &run); }
