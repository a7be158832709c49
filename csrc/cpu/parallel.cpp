// Process-wide settings of the CPU kernels: the work grain below which they run on one thread
// (common.h threads_for) and the cap on the ISA they use (common.h cpu_isa).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace attnserve {
namespace {

int64_t grain_from_environment() {
  const char* text = std::getenv("ATTNSERVE_PARALLEL_GRAIN");
  if (text == nullptr || *text == '\0') return kDefaultParallelGrain;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return (end != text && *end == '\0' && value >= 0) ? value : kDefaultParallelGrain;
}

std::atomic<int64_t>& grain() {
  static std::atomic<int64_t> value{grain_from_environment()};
  return value;
}

constexpr const char* kIsaNames[] = {"default", "avx2", "avx512", "avx512bf16"};

int isa_from_name(const char* text) {
  for (int i = 0; i < 4; ++i) {
    if (text != nullptr && std::strcmp(text, kIsaNames[i]) == 0) return i;
  }
  return -1;
}

// ATTNSERVE_CPU_ISA, or its alias ATTNSERVE_ISA where it is unset or empty.
const char* isa_cap_from_environment() {
  const char* text = std::getenv("ATTNSERVE_CPU_ISA");
  return text != nullptr && *text != '\0' ? text : std::getenv("ATTNSERVE_ISA");
}

std::atomic<int>& cap() {
  static std::atomic<int> value{[] {
    const int from_env = isa_from_name(isa_cap_from_environment());
    return from_env < 0 ? 3 : from_env;
  }()};
  return value;
}

}  // namespace

Isa isa_cap() { return static_cast<Isa>(cap().load(std::memory_order_relaxed)); }

const char* cpu_isa_name() { return kIsaNames[static_cast<int>(cpu_isa())]; }

const char* set_isa_cap(const char* name) {
  const int level = isa_from_name(name);
  if (level < 0) return nullptr;
  return kIsaNames[cap().exchange(level)];
}

int64_t parallel_grain() { return grain().load(std::memory_order_relaxed); }

int64_t set_parallel_grain(int64_t value) { return grain().exchange(value); }

}  // namespace attnserve
