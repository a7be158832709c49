// The process-wide work grain below which the CPU kernels run on one thread (common.h threads_for).
#include <atomic>
#include <cstdlib>

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

}  // namespace

int64_t parallel_grain() { return grain().load(std::memory_order_relaxed); }

int64_t set_parallel_grain(int64_t value) { return grain().exchange(value); }

}  // namespace attnserve
