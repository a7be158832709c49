// Shared helpers of the CPU kernels: row loads (fp32 / bf16 -> fp32), a vectorisable exp, runtime
// ISA selection and argument checks. Kernels are plain loops that GCC vectorises (`omp simd`);
// each hot loop is compiled several times with __attribute__((target(...))) and picked at run time,
// so the build needs no -march flag.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace attnserve {

#define ATTNSERVE_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define ATTNSERVE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define ATTNSERVE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// Isa::kAvx512Bf16: AVX-512 with AVX512_BF16 and AVX512_VBMI2.
#define ATTNSERVE_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,f16c")))

// 16 bf16 (raw bits) -> 16 fp32.
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE __m512 bf16x16_to_fp32(__m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// Ordered: each level includes the ones below it. kAvx512Bf16: AVX-512 with AVX512_BF16 and
// AVX512_VBMI2 (Zen 4, Sapphire Rapids and later).
enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

inline Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2") ? Isa::kAvx512Bf16
                                                                                         : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

// The ISA the kernels use: the CPU's, capped by ATTNSERVE_CPU_ISA (alias ATTNSERVE_ISA) at load or
// by set_cpu_isa_cap (parallel.cpp; tests run every level this CPU has).
Isa isa_cap();

inline Isa cpu_isa() {
  static const Isa detected = detect_isa();
  const Isa cap = isa_cap();
  return cap < detected ? cap : detected;
}

// The compiled variants of one kernel, one per ISA level; a level left empty has none of its own
// and uses the nearest level below that has one. Fn: a function pointer, or a struct that converts
// to bool (false: empty).
template <typename Fn>
struct IsaVariants {
  Fn avx512bf16{};
  Fn avx512{};
  Fn avx2{};
  Fn baseline{};  // Isa::kDefault: compiled without a target attribute
};

// The variant for cpu_isa(); empty when neither its level nor any below has one.
template <typename Fn>
Fn for_cpu_isa(const IsaVariants<Fn>& variants) {
  switch (cpu_isa()) {
    case Isa::kAvx512Bf16:
      if (variants.avx512bf16) return variants.avx512bf16;
      [[fallthrough]];
    case Isa::kAvx512:
      if (variants.avx512) return variants.avx512;
      [[fallthrough]];
    case Isa::kAvx2:
      if (variants.avx2) return variants.avx2;
      [[fallthrough]];
    case Isa::kDefault:
      break;
  }
  return variants.baseline;
}

ATTNSERVE_INLINE float bits_to_float(uint32_t bits) { return __builtin_bit_cast(float, bits); }

ATTNSERVE_INLINE float to_float(float x) { return x; }
ATTNSERVE_INLINE float to_float(c10::BFloat16 x) {
  return bits_to_float(static_cast<uint32_t>(x.x) << 16);
}

// n elements at row[0], row[stride], ... (fp32 or bf16) -> out [n] fp32; stride 1 vectorises.
ATTNSERVE_INLINE void load_row(const float* row, int64_t stride, float* out, int n) {
  if (stride == 1) {
#pragma omp simd
    for (int d = 0; d < n; ++d) out[d] = row[d];
  } else {
    for (int d = 0; d < n; ++d) out[d] = row[d * stride];
  }
}

ATTNSERVE_INLINE void load_row(const c10::BFloat16* row, int64_t stride, float* out, int n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  if (stride == 1) {
#pragma omp simd
    for (int d = 0; d < n; ++d) out[d] = bits_to_float(static_cast<uint32_t>(bits[d]) << 16);
  } else {
    for (int d = 0; d < n; ++d) {
      out[d] = bits_to_float(static_cast<uint32_t>(bits[d * stride]) << 16);
    }
  }
}

// exp(x) for x <= 0 (softmax arguments), relative error ~2e-7; vectorises inside `omp simd`.
// 2^t = 2^round(t) * 2^f, f in [-0.5, 0.5], 2^f by Cephes' exp2f polynomial.
ATTNSERVE_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float whole = __builtin_rintf(t);
  const float f = t - whole;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const uint32_t exponent = static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23;
  return p * bits_to_float(exponent);
}

// OpenMP threads for a kernel call of `work` units (~ one multiply-add each): 1 below the grain.
// A parallel region costs a fork and a join barrier; on a shared, loaded machine (vLLM binds one
// OpenMP thread per core) a descheduled team thread holds that barrier for a scheduler time slice
// (ms), so a few-microsecond decode op per layer could take milliseconds. Small work runs serially.
// The grain is process-wide: ATTNSERVE_PARALLEL_GRAIN at load, strategies._C.set_parallel_grain.
constexpr int64_t kDefaultParallelGrain = int64_t{1} << 24;

int64_t parallel_grain();

inline int threads_for(int64_t work) {
  return work < parallel_grain() ? 1 : at::get_num_threads();
}

inline void check_cache(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4, name, " must be [num_blocks, num_kv_heads, block_size, head_size]");
  TORCH_CHECK(cache.stride(3) == 1 || cache.stride(2) == 1, name,
              ": the head dim or the token dim must have stride 1");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", cache.scalar_type());
}

inline void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

inline void check_fp32_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 tensor");
}

// Element strides of a [num_blocks, Hkv, page, D] cache: vLLM's CPU K is token-contiguous
// (stride_token 1, stride_dim page), V and CUDA caches are dim-contiguous.
struct CacheView {
  const char* base;
  int64_t stride_block, stride_head, stride_token, stride_dim;  // in elements
};

template <typename scalar_t>
ATTNSERVE_INLINE const scalar_t* cache_row(const CacheView& c, int64_t block, int64_t head,
                                           int64_t token) {
  return reinterpret_cast<const scalar_t*>(c.base) + block * c.stride_block +
         head * c.stride_head + token * c.stride_token;
}

inline CacheView make_view(const at::Tensor& cache) {
  return CacheView{static_cast<const char*>(cache.data_ptr()), cache.stride(0), cache.stride(1),
                   cache.stride(2), cache.stride(3)};
}

}  // namespace attnserve
