// CPU implementations of the attnserve ops (schemas: csrc/bindings.cpp, docs/design.md section 4).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace attnserve {

std::tuple<at::Tensor, at::Tensor> sparse_paged_attention_cpu(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& token_idx, const at::Tensor& num_idx,
    double scale, bool want_mass);

at::Tensor paged_prefill_attention_cpu(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
    double scale, int64_t n_sink, int64_t window, const std::optional<at::Tensor>& block_mask,
    int64_t mask_block);

void landmark_update_summaries_cpu(const at::Tensor& key_cache, const at::Tensor& block_table,
                                   const at::Tensor& start_pos, const at::Tensor& seq_lens,
                                   int64_t chunk, at::Tensor& kmin, at::Tensor& kmax);

std::tuple<at::Tensor, at::Tensor> landmark_select_cpu(
    const at::Tensor& query, const at::Tensor& kmin, const at::Tensor& kmax,
    const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t chunk, int64_t k_chunks,
    bool group_max);

void seer_pool_keys_cpu(const at::Tensor& key_cache, const at::Tensor& block_table,
                        const at::Tensor& start_pos, const at::Tensor& seq_lens, int64_t pool,
                        at::Tensor& pooled);

std::tuple<at::Tensor, at::Tensor, at::Tensor> seer_select_cpu(
    const at::Tensor& q_gate, const at::Tensor& k_gate, const at::Tensor& num_blocks,
    int64_t pool, const at::Tensor& seq_lens, double threshold, int64_t top_k);

std::tuple<at::Tensor, at::Tensor> topk_from_mass_cpu(const at::Tensor& mass,
                                                      const at::Tensor& token_idx,
                                                      const at::Tensor& num_idx, int64_t k);

void gather_kv_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& block_table, const at::Tensor& token_idx,
                   const at::Tensor& num_idx, const at::Tensor& dst_block_table,
                   const at::Tensor& dst_start, at::Tensor& dst_key, at::Tensor& dst_value);

}  // namespace attnserve
