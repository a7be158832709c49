// Stand-in for cuda_fp16.h in the CPU emulation: IEEE half through the compiler's _Float16.
#pragma once

#include <cstdint>
#include <cstring>

#include "emulation.h"

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.bits, sizeof(value));
  return static_cast<float>(value);
}
inline __half __float2half_rn(float x) {
  const _Float16 value = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &value, sizeof(value));
  return h;
}
inline float2 __half22float2(__half2 pair) { return {__half2float(pair.x), __half2float(pair.y)}; }
