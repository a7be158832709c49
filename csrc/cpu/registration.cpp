// CPU kernels of the attnserve ops.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(attnserve, CPU, m) {
  m.impl("sparse_paged_attention", &attnserve::sparse_paged_attention_cpu);
  m.impl("paged_prefill_attention", &attnserve::paged_prefill_attention_cpu);
  m.impl("landmark_update_summaries", &attnserve::landmark_update_summaries_cpu);
  m.impl("landmark_select", &attnserve::landmark_select_cpu);
  m.impl("seer_pool_keys", &attnserve::seer_pool_keys_cpu);
  m.impl("seer_select", &attnserve::seer_select_cpu);
  m.impl("topk_from_mass", &attnserve::topk_from_mass_cpu);
  m.impl("gather_kv", &attnserve::gather_kv_cpu);
}
