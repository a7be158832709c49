// A CPU emulation of the CUDA subset the attnserve kernels use, so that tests can run the
// kernels without a GPU (tests/ops/test_cuda_ops.py). Not a CUDA implementation: one block runs
// at a time; each CUDA thread is a ucontext fiber on one OS thread; __syncthreads and warp
// shuffles are barriers between fibers; `__shared__` variables are function statics (shared by
// the block's fibers, reused by the next block); dynamic shared memory starts as NaN bytes.
// Included through the stand-in headers of this directory (cuda_runtime.h, ...), put first on
// the include path, with ATTNSERVE_CUDA_EMULATION defined.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "cuda_runtime_api.h"

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct float2 { float x, y; };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline uint32_t __float_as_uint(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

namespace attnserve::emulation {

constexpr size_t kFiberStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
  int shuffle_parity = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  int live = 0;
  uint64_t progress = 0;
  const std::function<void()>* body = nullptr;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived, warp_live;
  std::vector<uint64_t> warp_generation;
  std::vector<uint64_t> shuffle_slots;  // [warp][parity][lane]
  std::vector<unsigned char> dynamic_shared;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline void* dynamic_shared_memory() { return current_block()->dynamic_shared.data(); }

inline void yield_to_scheduler() {
  Block& b = *current_block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void syncthreads() {
  Block& b = *current_block();
  const uint64_t generation = b.block_generation;
  ++b.progress;
  if (++b.block_arrived == b.live) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  while (b.block_generation == generation) yield_to_scheduler();
}

inline void warp_barrier() {
  Block& b = *current_block();
  const int warp = threadIdx.x / 32;
  const uint64_t generation = b.warp_generation[warp];
  ++b.progress;
  if (++b.warp_arrived[warp] == b.warp_live[warp]) {
    b.warp_arrived[warp] = 0;
    ++b.warp_generation[warp];
    return;
  }
  while (b.warp_generation[warp] == generation) yield_to_scheduler();
}

// Every lane publishes its value, then reads lane `source`'s. Two slot sets alternate, so a lane
// may publish its next value while slower lanes still read this one.
template <typename T>
T shuffle(T value, int source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  Block& b = *current_block();
  Fiber& self = b.fibers[b.current];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t* slots = b.shuffle_slots.data() + (warp * 2 + self.shuffle_parity) * 32;
  self.shuffle_parity ^= 1;
  std::memcpy(&slots[lane], &value, sizeof(T));
  warp_barrier();
  T result;
  std::memcpy(&result, &slots[source & 31], sizeof(T));
  return result;
}

inline void fiber_main() {
  Block& b = *current_block();
  (*b.body)();
  Fiber& self = b.fibers[b.current];
  self.done = true;
  ++b.progress;
  --b.live;
  const int warp = b.current / 32;
  --b.warp_live[warp];
  // Exited threads no longer hold back the barriers the others wait at.
  if (b.block_arrived > 0 && b.block_arrived == b.live) {
    b.block_arrived = 0;
    ++b.block_generation;
  }
  if (b.warp_arrived[warp] > 0 && b.warp_arrived[warp] == b.warp_live[warp]) {
    b.warp_arrived[warp] = 0;
    ++b.warp_generation[warp];
  }
}

inline void run_block(const std::function<void()>& body, int threads, size_t shared_bytes) {
  static std::vector<Fiber> fiber_pool;
  Block b;
  b.fibers.swap(fiber_pool);
  b.fibers.resize(threads);
  b.body = &body;
  b.live = threads;
  const int warps = (threads + 31) / 32;
  b.warp_arrived.assign(warps, 0);
  b.warp_generation.assign(warps, 0);
  b.warp_live.assign(warps, 0);
  for (int t = 0; t < threads; ++t) ++b.warp_live[t / 32];
  b.shuffle_slots.assign(static_cast<size_t>(warps) * 64, 0);
  b.dynamic_shared.assign(shared_bytes + 16, 0xff);
  current_block() = &b;
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = b.fibers[t];
    fiber.done = false;
    fiber.shuffle_parity = 0;
    fiber.stack.resize(kFiberStackBytes);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &b.scheduler;
    makecontext(&fiber.context, fiber_main, 0);
  }
  while (b.live > 0) {
    const uint64_t progress_before = b.progress;
    for (int t = 0; t < threads; ++t) {
      if (b.fibers[t].done) continue;
      b.current = t;
      threadIdx = dim3(t, 0, 0);
      swapcontext(&b.scheduler, &b.fibers[t].context);
    }
    if (b.progress == progress_before) {
      std::fprintf(stderr, "cuda emulation: deadlock in block (%u, %u, %u)\n", blockIdx.x,
                   blockIdx.y, blockIdx.z);
      std::abort();
    }
  }
  current_block() = nullptr;
  fiber_pool.swap(b.fibers);
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(const Args&... args) const {
    gridDim = grid;
    blockDim = block;
    const int threads = static_cast<int>(block.x * block.y * block.z);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          const std::function<void()> body = [&] { kernel(args...); };
          run_block(body, threads, shared_bytes);
        }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                         cudaStream_t) {
  return Launch<Params...>{kernel, grid, block, shared_bytes};
}

}  // namespace attnserve::emulation

inline void __syncthreads() { attnserve::emulation::syncthreads(); }

template <typename T>
T __shfl_sync(unsigned, T value, int source) {
  return attnserve::emulation::shuffle(value, source);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return attnserve::emulation::shuffle(value, static_cast<int>(threadIdx.x % 32) ^ lane_mask);
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  const int lane = threadIdx.x % 32;
  const int source = lane - static_cast<int>(delta);
  return attnserve::emulation::shuffle(value, source < 0 ? lane : source);
}
