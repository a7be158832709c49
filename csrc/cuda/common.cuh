// Device helpers shared by the attnserve kernels. Written against the torch extension flags
// (__CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ / ...): explicit conversions only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "kernels.h"

namespace attnserve::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

#ifdef ATTNSERVE_CUDA_EMULATION
#define ATTNSERVE_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::attnserve::emulation::launch(kernel, grid, block, shared_bytes, stream)
#else
#define ATTNSERVE_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<grid, block, shared_bytes, stream>>>
#endif

// The block's dynamic shared memory (16-byte aligned).
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef ATTNSERVE_CUDA_EMULATION
  return static_cast<T*>(::attnserve::emulation::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char attnserve_dynamic_shared[];
  return reinterpret_cast<T*>(attnserve_dynamic_shared);
#endif
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

__host__ __device__ constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads 8 consecutive elements as fp32; p is 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void load8(const __half* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Sum / max over aligned groups of WIDTH lanes (WIDTH a power of two <= 32); all 32 lanes of
// the warp must call it.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <int WIDTH>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1)
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) { return group_sum<32>(x); }
__device__ __forceinline__ float warp_max(float x) { return group_max<32>(x); }

// Block-wide reductions; `scratch` holds at least 32 floats; every thread gets the result.
__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = ceil_div(blockDim.x, 32);
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : -INFINITY;
  return warp_max(x);
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = ceil_div(blockDim.x, 32);
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : 0.f;
  return warp_sum(x);
}

// Block-wide exclusive prefix sum of ints; `scratch` holds at least 33 ints; total gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int x, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = ceil_div(blockDim.x, 32);
  int inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int warp_total = lane < num_warps ? scratch[lane] : 0;
    int warp_inclusive = warp_total;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(kFullMask, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += other;
    }
    scratch[lane] = warp_inclusive - warp_total;  // exclusive offset of warp `lane`
    if (lane == 31) scratch[32] = warp_inclusive;
  }
  __syncthreads();
  total = scratch[32];
  return scratch[warp] + inclusive - x;
}

// Float -> uint32 whose unsigned order is the float order (-inf < ... < +inf).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Selection key: larger score first, then lower tie id. Never 0 for tie_id < 2^32 - 1, so 0 can
// mark an excluded element.
__device__ __forceinline__ uint64_t selection_key(float score, uint32_t tie_id) {
  return (static_cast<uint64_t>(ordered_bits(score)) << 32) | (0xffffffffu - tie_id);
}

struct RadixSelectShared {
  unsigned histogram[256];
  unsigned long long prefix;
  int remaining;
};

// The rank-th largest (1-based, 1 <= rank <= count of keys) of the 64-bit keys key_of(i),
// i < n, by 8 passes of 8-bit histograms. Keys must be distinct for the result to split them
// exactly: then exactly `rank` keys are >= the result. All threads of the block call it.
template <typename KeyOf>
__device__ uint64_t block_radix_select(int n, int rank, KeyOf key_of, RadixSelectShared& shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t prefix = 0, prefix_mask = 0;
  if (threadIdx.x == 0) shared.remaining = rank;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) shared.histogram[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = key_of(i);
      if ((key & prefix_mask) == prefix)
        atomicAdd(&shared.histogram[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      // lane l owns digits [255 - 8l - 7, 255 - 8l], scanned from the top.
      const int remaining = shared.remaining;
      unsigned lane_count = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) lane_count += shared.histogram[255 - 8 * lane - i];
      unsigned inclusive = lane_count;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned other = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      const unsigned before = inclusive - lane_count;
      const bool crosses = before < static_cast<unsigned>(remaining) &&
                           inclusive >= static_cast<unsigned>(remaining);
      if (crosses) {
        unsigned cumulative = before;
        for (int i = 0; i < 8; ++i) {
          const int digit = 255 - 8 * lane - i;
          const unsigned count = shared.histogram[digit];
          if (cumulative + count >= static_cast<unsigned>(remaining)) {
            shared.prefix = static_cast<unsigned long long>(digit);
            shared.remaining = remaining - static_cast<int>(cumulative);
            break;
          }
          cumulative += count;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(shared.prefix) << shift;
    prefix_mask |= static_cast<uint64_t>(0xff) << shift;
    __syncthreads();
  }
  return prefix;
}

// Writes the tokens of the selected chunks (c < n_chunks with is_selected(c)) ascending:
// chunk c holds tokens [c * chunk, min((c + 1) * chunk, seq_len)). Pads out[count, capacity)
// with 0 and returns count (<= capacity). All threads of the block call it.
template <typename IsSelected>
__device__ int block_expand_chunks(int n_chunks, int chunk, int seq_len, IsSelected is_selected,
                                   int32_t* out, int capacity, int* scan_scratch) {
  int written = 0;
  for (int base = 0; base < n_chunks; base += blockDim.x) {
    const int c = base + threadIdx.x;
    const bool selected = c < n_chunks && is_selected(c);
    const int tokens = selected ? min(chunk, seq_len - c * chunk) : 0;
    int tile_total;
    const int offset = written + block_exclusive_scan(max(tokens, 0), scan_scratch, tile_total);
    for (int t = 0; t < tokens; ++t)
      if (offset + t < capacity) out[offset + t] = c * chunk + t;
    written += tile_total;
  }
  written = min(written, capacity);
  for (int i = written + threadIdx.x; i < capacity; i += blockDim.x) out[i] = 0;
  return written;
}

}  // namespace attnserve::cuda

#define ATTNSERVE_DISPATCH_DTYPE(DTYPE, SCALAR, ...)          \
  [&]() -> cudaError_t {                                      \
    switch (DTYPE) {                                          \
      case ::attnserve::cuda::DType::kFloat32: {              \
        using SCALAR = float;                                 \
        return __VA_ARGS__();                                 \
      }                                                       \
      case ::attnserve::cuda::DType::kFloat16: {              \
        using SCALAR = __half;                                \
        return __VA_ARGS__();                                 \
      }                                                       \
      case ::attnserve::cuda::DType::kBFloat16: {             \
        using SCALAR = __nv_bfloat16;                         \
        return __VA_ARGS__();                                 \
      }                                                       \
    }                                                         \
    return cudaErrorInvalidValue;                             \
  }()

#define ATTNSERVE_DISPATCH_HEAD_SIZE(HEAD_SIZE, CONST_NAME, ...) \
  [&]() -> cudaError_t {                                         \
    switch (HEAD_SIZE) {                                         \
      case 64: {                                                 \
        constexpr int CONST_NAME = 64;                           \
        return __VA_ARGS__();                                    \
      }                                                          \
      case 96: {                                                 \
        constexpr int CONST_NAME = 96;                           \
        return __VA_ARGS__();                                    \
      }                                                          \
      case 128: {                                                \
        constexpr int CONST_NAME = 128;                          \
        return __VA_ARGS__();                                    \
      }                                                          \
      case 256: {                                                \
        constexpr int CONST_NAME = 256;                          \
        return __VA_ARGS__();                                    \
      }                                                          \
    }                                                            \
    return cudaErrorInvalidValue;                                \
  }()
