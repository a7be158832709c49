// CUDA implementations of the attnserve ops (schemas in csrc/bindings.cpp, docs/design.md
// section 4): shape / dtype checks, output and workspace allocation, and the launchers of
// csrc/cuda/kernels.h on the current stream.
//
// Built with ATTNSERVE_CUDA_EMULATION (tests/ops/test_cuda_ops.py, no GPU needed), the same code
// registers for CPU tensors and runs the kernels on the CPU emulation in csrc/cuda/emulation/.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#ifndef ATTNSERVE_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "kernels.h"

namespace attnserve::cuda {
namespace {

#ifdef ATTNSERVE_CUDA_EMULATION
#define ATTNSERVE_DEVICE_GUARD(tensor)
constexpr int kEmulatedSms = 4;
cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
int sm_count(const at::Tensor&) { return kEmulatedSms; }
#else
#define ATTNSERVE_DEVICE_GUARD(tensor) \
  const c10::cuda::OptionalCUDAGuard device_guard(device_of(tensor))
cudaStream_t current_stream(const at::Tensor& tensor) {
  return at::cuda::getCurrentCUDAStream(tensor.device().index()).stream();
}
int sm_count(const at::Tensor& tensor) {
  return at::cuda::getDeviceProperties(tensor.device().index())->multiProcessorCount;
}
#endif

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "attnserve::", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

DType kernel_dtype(const at::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", tensor.scalar_type());
  return DType::kFloat32;
}

void check_same_device(const at::Tensor& tensor, const at::Tensor& reference, const char* name) {
  TORCH_CHECK(tensor.device() == reference.device(), name, " is on ", tensor.device(),
              " but the op's first tensor is on ", reference.device());
}

void check_shape(const at::Tensor& tensor, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(tensor.sizes() == expected, name, " must have shape ", expected, ", got ",
              tensor.sizes());
}

// int32 tensor of the given shape on the device of `like`, made contiguous.
at::Tensor int32_input(const at::Tensor& tensor, const char* name, at::IntArrayRef expected,
                       const at::Tensor& like) {
  check_same_device(tensor, like, name);
  TORCH_CHECK(tensor.scalar_type() == at::kInt, name, " must be int32, got ",
              tensor.scalar_type());
  check_shape(tensor, name, expected);
  return tensor.contiguous();
}

// A [num_blocks, Hkv, page, D] cache view with D contiguous and 16-byte aligned rows.
PagedCache paged_cache(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4, name, " must be [num_blocks, num_kv_heads, page, head_size], got ",
              cache.sizes());
  TORCH_CHECK(cache.stride(3) == 1 || cache.size(3) == 1, name,
              " must have a contiguous last dim, got strides ", cache.strides());
  const int64_t element = cache.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0 &&
                       (cache.stride(0) * element) % 16 == 0 &&
                       (cache.stride(1) * element) % 16 == 0 &&
                       (cache.stride(2) * element) % 16 == 0;
  TORCH_CHECK(aligned, name, " rows must be 16-byte aligned (data pointer and strides ",
              cache.strides(), ")");
  return PagedCache{cache.data_ptr(), cache.stride(0), cache.stride(1), cache.stride(2)};
}

BlockTable block_table_of(const at::Tensor& block_table, int64_t batch, const at::Tensor& like,
                          const char* name = "block_table") {
  check_same_device(block_table, like, name);
  TORCH_CHECK(block_table.scalar_type() == at::kInt, name, " must be int32, got ",
              block_table.scalar_type());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch, name,
              " must be [B, max_blocks] with B = ", batch, ", got ", block_table.sizes());
  TORCH_CHECK(block_table.stride(1) == 1 || block_table.size(1) <= 1, name,
              " must have a contiguous last dim");
  return BlockTable{block_table.data_ptr<int32_t>(), block_table.stride(0),
                    static_cast<int>(block_table.size(1))};
}

// Checks key_cache / value_cache against the query: same dtype, [NB, Hkv, page, D] with
// Hq % Hkv == 0 and a supported head size.
void check_caches(const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, int64_t num_q_heads, int64_t head_size) {
  check_same_device(key_cache, query, "key_cache");
  check_same_device(value_cache, query, "value_cache");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() &&
                  value_cache.scalar_type() == query.scalar_type(),
              "key_cache and value_cache must have the query dtype ", query.scalar_type(),
              ", got ", key_cache.scalar_type(), " and ", value_cache.scalar_type());
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "key_cache and value_cache must both be [num_blocks, num_kv_heads, page, head_size]"
              ", got ", key_cache.sizes(), " and ", value_cache.sizes());
  const int64_t num_kv_heads = key_cache.size(1);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads (", num_q_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(key_cache.size(3) == head_size, "key_cache head size ", key_cache.size(3),
              " differs from the query head size ", head_size);
  TORCH_CHECK(attention_head_size_supported(static_cast<int>(head_size)),
              "head size ", head_size, " has no CUDA kernel; supported: 64, 96, 128, 256");
}

void check_query(const at::Tensor& query, const char* name) {
  TORCH_CHECK(query.dim() == 3, name, " must be 3-D, got ", query.sizes());
  TORCH_CHECK(query.stride(2) == 1, name, " must have a contiguous last dim");
  kernel_dtype(query, name);
}

at::TensorOptions int32_options(const at::Tensor& like) { return like.options().dtype(at::kInt); }
at::TensorOptions float_options(const at::Tensor& like) {
  return like.options().dtype(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> sparse_paged_attention(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& token_idx, const at::Tensor& num_idx,
    double scale, bool want_mass) {
  ATTNSERVE_DEVICE_GUARD(query);
  check_query(query, "query");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  check_caches(query, key_cache, value_cache, Hq, D);
  const int64_t Hkv = key_cache.size(1);
  TORCH_CHECK(token_idx.dim() == 3 && token_idx.size(0) == B && token_idx.size(1) == Hkv,
              "token_idx must be [B, Hkv, K] = [", B, ", ", Hkv, ", K], got ", token_idx.sizes());
  const int64_t K = token_idx.size(2);
  const at::Tensor tokens = int32_input(token_idx, "token_idx", {B, Hkv, K}, query);
  const at::Tensor counts = int32_input(num_idx, "num_idx", {B, Hkv}, query);

  at::Tensor out = at::empty({B, Hq, D}, query.options());
  at::Tensor mass = want_mass ? at::empty({B, Hkv, K}, float_options(query))
                              : at::empty({0}, float_options(query));
  if (B == 0) return {out, mass};

  SparseAttentionArgs args{};
  args.query = query.data_ptr();
  args.query_seq_stride = query.stride(0);
  args.query_head_stride = query.stride(1);
  args.out = out.data_ptr();
  args.key = paged_cache(key_cache, "key_cache");
  args.value = paged_cache(value_cache, "value_cache");
  args.page = static_cast<int>(key_cache.size(2));
  args.block_table = block_table_of(block_table, B, query);
  args.token_idx = tokens.data_ptr<int32_t>();
  args.num_idx = counts.data_ptr<int32_t>();
  args.mass = want_mass ? mass.data_ptr<float>() : nullptr;
  args.batch = static_cast<int>(B);
  args.num_q_heads = static_cast<int>(Hq);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.head_size = static_cast<int>(D);
  args.max_tokens = static_cast<int>(K);
  args.scale = static_cast<float>(scale);
  args.dtype = kernel_dtype(query, "query");

  const int splits = sparse_attention_num_splits(args.batch, args.num_q_heads, args.num_kv_heads,
                                                 args.max_tokens, sm_count(query));
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(sparse_attention_workspace_floats(
          args.batch, args.num_q_heads, args.head_size, args.max_tokens, splits, want_mass))},
      float_options(query));
  check_launch(launch_sparse_paged_attention(args, splits, workspace.data_ptr<float>(),
                                             current_stream(query)),
               "sparse_paged_attention");
  return {out, mass};
}

at::Tensor paged_prefill_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& block_table,
                                   const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                   double scale, int64_t n_sink, int64_t window,
                                   const std::optional<at::Tensor>& block_mask,
                                   int64_t mask_block) {
  ATTNSERVE_DEVICE_GUARD(query);
  check_query(query, "query");
  const int64_t T = query.size(0), Hq = query.size(1), D = query.size(2);
  check_caches(query, key_cache, value_cache, Hq, D);
  const int64_t Hkv = key_cache.size(1);
  TORCH_CHECK(seq_lens.dim() == 1, "seq_lens must be [B], got ", seq_lens.sizes());
  const int64_t B = seq_lens.size(0);
  const at::Tensor starts = int32_input(query_start_loc, "query_start_loc", {B + 1}, query);
  const at::Tensor lens = int32_input(seq_lens, "seq_lens", {B}, query);

  // Rows outside query_start_loc[0] .. query_start_loc[B] (padding) stay 0.
  at::Tensor out = at::zeros({T, Hq, D}, query.options());
  if (T == 0 || B == 0) return out;

  PrefillAttentionArgs args{};
  args.query = query.data_ptr();
  args.query_token_stride = query.stride(0);
  args.query_head_stride = query.stride(1);
  args.out = out.data_ptr();
  args.key = paged_cache(key_cache, "key_cache");
  args.value = paged_cache(value_cache, "value_cache");
  args.page = static_cast<int>(key_cache.size(2));
  args.block_table = block_table_of(block_table, B, query);
  args.query_start_loc = starts.data_ptr<int32_t>();
  args.seq_lens = lens.data_ptr<int32_t>();
  if (block_mask.has_value()) {
    const at::Tensor& mask = *block_mask;
    check_same_device(mask, query, "block_mask");
    TORCH_CHECK(mask.scalar_type() == at::kBool, "block_mask must be bool, got ",
                mask.scalar_type());
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.size(1) == Hkv,
                "block_mask must be [B, Hkv, QB, KB] = [", B, ", ", Hkv, ", QB, KB], got ",
                mask.sizes());
    TORCH_CHECK(mask_block > 0, "mask_block must be > 0 with a block_mask, got ", mask_block);
    args.block_mask = mask.data_ptr<bool>();
    for (int i = 0; i < 4; ++i) args.block_mask_strides[i] = mask.stride(i);
  }
  args.mask_block = static_cast<int>(mask_block);
  args.num_tokens = static_cast<int>(T);
  args.batch = static_cast<int>(B);
  args.num_q_heads = static_cast<int>(Hq);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.head_size = static_cast<int>(D);
  args.scale = static_cast<float>(scale);
  args.n_sink = static_cast<int>(std::clamp<int64_t>(n_sink, 0, INT32_MAX));
  args.window = static_cast<int>(std::clamp<int64_t>(window, -1, INT32_MAX));
  args.dtype = kernel_dtype(query, "query");
  check_launch(launch_paged_prefill_attention(args, current_stream(query)),
               "paged_prefill_attention");
  return out;
}

// kmin / kmax / pooled: fp32 [num_blocks, Hkv, page / chunk, width] with a contiguous last dim.
ChunkSummaryOutput summary_output(const at::Tensor& summary, const char* name,
                                  const at::Tensor& key_cache, int64_t chunk, int64_t width,
                                  int64_t offset) {
  check_same_device(summary, key_cache, name);
  TORCH_CHECK(summary.scalar_type() == at::kFloat, name, " must be float32, got ",
              summary.scalar_type());
  check_shape(summary, name,
              {key_cache.size(0), key_cache.size(1), key_cache.size(2) / chunk, width});
  TORCH_CHECK(summary.stride(3) == 1, name, " must have a contiguous last dim");
  return ChunkSummaryOutput{summary.data_ptr<float>() + offset, summary.stride(0),
                            summary.stride(1), summary.stride(2)};
}

ChunkSummaryArgs summary_args(const at::Tensor& key_cache, const at::Tensor& block_table,
                              int64_t chunk, const at::Tensor& starts, const at::Tensor& lens) {
  ChunkSummaryArgs args{};
  args.key = paged_cache(key_cache, "key_cache");
  args.page = static_cast<int>(key_cache.size(2));
  args.block_table = block_table_of(block_table, lens.size(0), key_cache);
  args.start_pos = starts.data_ptr<int32_t>();
  args.seq_lens = lens.data_ptr<int32_t>();
  args.chunk = static_cast<int>(chunk);
  args.batch = static_cast<int>(lens.size(0));
  args.num_kv_heads = static_cast<int>(key_cache.size(1));
  args.head_size = static_cast<int>(key_cache.size(3));
  args.dtype = kernel_dtype(key_cache, "key_cache");
  return args;
}

void check_summary_inputs(const at::Tensor& key_cache, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, int64_t chunk, const char* chunk_name) {
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [num_blocks, Hkv, page, D], got ",
              key_cache.sizes());
  check_same_device(block_table, key_cache, "block_table");
  check_same_device(seq_lens, key_cache, "seq_lens");
  TORCH_CHECK(seq_lens.dim() == 1, "seq_lens must be [B], got ", seq_lens.sizes());
  TORCH_CHECK(chunk > 0 && key_cache.size(2) % chunk == 0, chunk_name,
              " must be > 0 and divide the page size ", key_cache.size(2), ", got ", chunk);
}

void landmark_update_summaries(const at::Tensor& key_cache, const at::Tensor& block_table,
                               const at::Tensor& start_pos, const at::Tensor& seq_lens,
                               int64_t chunk, at::Tensor& kmin, at::Tensor& kmax) {
  ATTNSERVE_DEVICE_GUARD(key_cache);
  check_summary_inputs(key_cache, block_table, seq_lens, chunk, "chunk");
  const int64_t B = seq_lens.size(0), D = key_cache.size(3);
  const at::Tensor starts = int32_input(start_pos, "start_pos", {B}, key_cache);
  const at::Tensor lens = int32_input(seq_lens, "seq_lens", {B}, key_cache);
  if (B == 0) return;
  ChunkSummaryArgs args = summary_args(key_cache, block_table, chunk, starts, lens);
  args.max = summary_output(kmax, "kmax", key_cache, chunk, D, 0);
  args.min = summary_output(kmin, "kmin", key_cache, chunk, D, 0);
  check_launch(launch_chunk_summaries(args, sm_count(key_cache), current_stream(key_cache)),
               "landmark_update_summaries");
}

void seer_pool_keys(const at::Tensor& key_cache, const at::Tensor& block_table,
                    const at::Tensor& start_pos, const at::Tensor& seq_lens, int64_t pool,
                    at::Tensor& pooled) {
  ATTNSERVE_DEVICE_GUARD(key_cache);
  check_summary_inputs(key_cache, block_table, seq_lens, pool, "pool");
  const int64_t B = seq_lens.size(0), D = key_cache.size(3);
  const at::Tensor starts = int32_input(start_pos, "start_pos", {B}, key_cache);
  const at::Tensor lens = int32_input(seq_lens, "seq_lens", {B}, key_cache);
  if (B == 0) return;
  ChunkSummaryArgs args = summary_args(key_cache, block_table, pool, starts, lens);
  // pooled [..., 3 * D] = (max, min, mean)
  args.max = summary_output(pooled, "pooled", key_cache, pool, 3 * D, 0);
  args.min = summary_output(pooled, "pooled", key_cache, pool, 3 * D, D);
  args.mean = summary_output(pooled, "pooled", key_cache, pool, 3 * D, 2 * D);
  check_launch(launch_chunk_summaries(args, sm_count(key_cache), current_stream(key_cache)),
               "seer_pool_keys");
}

std::tuple<at::Tensor, at::Tensor> landmark_select(const at::Tensor& query,
                                                   const at::Tensor& kmin,
                                                   const at::Tensor& kmax,
                                                   const at::Tensor& block_table,
                                                   const at::Tensor& seq_lens, int64_t chunk,
                                                   int64_t k_chunks, bool group_max) {
  ATTNSERVE_DEVICE_GUARD(query);
  check_query(query, "query");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
  TORCH_CHECK(kmin.dim() == 4 && kmin.sizes() == kmax.sizes(),
              "kmin and kmax must both be [num_blocks, Hkv, page / chunk, D], got ",
              kmin.sizes(), " and ", kmax.sizes());
  TORCH_CHECK(kmin.scalar_type() == at::kFloat && kmax.scalar_type() == at::kFloat,
              "kmin and kmax must be float32");
  TORCH_CHECK(kmin.stride(3) == 1 && kmax.stride(3) == 1,
              "kmin and kmax must have a contiguous last dim");
  check_same_device(kmin, query, "kmin");
  check_same_device(kmax, query, "kmax");
  const int64_t Hkv = kmin.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "num_q_heads (", Hq,
              ") must be a multiple of num_kv_heads (", Hkv, ")");
  TORCH_CHECK(kmin.size(3) == D, "kmin head size ", kmin.size(3), " differs from the query's ",
              D);
  const at::Tensor lens = int32_input(seq_lens, "seq_lens", {B}, query);
  const BlockTable table = block_table_of(block_table, B, query);
  const int64_t page = kmin.size(2) * chunk;
  const int64_t K = std::min((std::max<int64_t>(k_chunks, 0) + 2) * chunk, table.max_blocks * page);

  at::Tensor token_idx = at::empty({B, Hkv, K}, int32_options(query));
  at::Tensor num_idx = at::empty({B, Hkv}, int32_options(query));
  if (B == 0) return {token_idx, num_idx};

  LandmarkSelectArgs args{};
  args.query = query.data_ptr();
  args.query_seq_stride = query.stride(0);
  args.query_head_stride = query.stride(1);
  args.query_dtype = kernel_dtype(query, "query");
  args.kmin = ChunkSummaryOutput{kmin.data_ptr<float>(), kmin.stride(0), kmin.stride(1),
                                 kmin.stride(2)};
  args.kmax = ChunkSummaryOutput{kmax.data_ptr<float>(), kmax.stride(0), kmax.stride(1),
                                 kmax.stride(2)};
  args.page = static_cast<int>(page);
  args.block_table = table;
  args.seq_lens = lens.data_ptr<int32_t>();
  args.chunk = static_cast<int>(chunk);
  args.k_chunks = static_cast<int>(std::clamp<int64_t>(k_chunks, 0, INT32_MAX));
  args.batch = static_cast<int>(B);
  args.num_q_heads = static_cast<int>(Hq);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.head_size = static_cast<int>(D);
  args.max_tokens = static_cast<int>(K);
  args.token_idx = token_idx.data_ptr<int32_t>();
  args.num_idx = num_idx.data_ptr<int32_t>();
  args.group_max = group_max;
  const int max_chunks = table.max_blocks * static_cast<int>(kmin.size(2));
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(landmark_select_workspace_floats(args.batch, args.num_kv_heads,
                                                             max_chunks))},
      float_options(query));
  check_launch(launch_landmark_select(args, workspace.data_ptr<float>(), current_stream(query)),
               "landmark_select");
  return {token_idx, num_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seer_select(
    const at::Tensor& q_gate, const at::Tensor& k_gate, const at::Tensor& num_blocks,
    int64_t pool, const at::Tensor& seq_lens, double threshold, int64_t top_k) {
  ATTNSERVE_DEVICE_GUARD(q_gate);
  TORCH_CHECK(pool > 0, "pool must be > 0, got ", pool);
  TORCH_CHECK(k_gate.dim() == 4, "k_gate must be [B, Hkv, NB, Dg], got ", k_gate.sizes());
  const int64_t B = k_gate.size(0), Hkv = k_gate.size(1), NB = k_gate.size(2),
                Dg = k_gate.size(3);
  check_shape(q_gate, "q_gate", {B, Hkv, Dg});
  check_same_device(k_gate, q_gate, "k_gate");
  TORCH_CHECK(q_gate.scalar_type() == k_gate.scalar_type(), "q_gate (", q_gate.scalar_type(),
              ") and k_gate (", k_gate.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(q_gate.stride(2) == 1 && k_gate.stride(3) == 1,
              "q_gate and k_gate must have a contiguous last dim");
  const at::Tensor counts = int32_input(num_blocks, "num_blocks", {B}, q_gate);
  const at::Tensor lens = int32_input(seq_lens, "seq_lens", {B}, q_gate);
  const int64_t K = top_k <= 0 ? NB * pool : std::min(top_k + 1, NB) * pool;

  at::Tensor token_idx = at::empty({B, Hkv, K}, int32_options(q_gate));
  at::Tensor num_idx = at::empty({B, Hkv}, int32_options(q_gate));
  at::Tensor probs = at::empty({B, Hkv, NB}, float_options(q_gate));
  if (B == 0 || Hkv == 0) return {token_idx, num_idx, probs};

  SeerSelectArgs args{};
  args.q_gate = q_gate.data_ptr();
  args.q_gate_strides[0] = q_gate.stride(0);
  args.q_gate_strides[1] = q_gate.stride(1);
  args.k_gate = k_gate.data_ptr();
  for (int i = 0; i < 3; ++i) args.k_gate_strides[i] = k_gate.stride(i);
  args.gate_dtype = kernel_dtype(q_gate, "q_gate");
  args.num_blocks = counts.data_ptr<int32_t>();
  args.seq_lens = lens.data_ptr<int32_t>();
  args.pool = static_cast<int>(pool);
  args.threshold = static_cast<float>(threshold);
  args.top_k = static_cast<int>(std::clamp<int64_t>(top_k, -1, INT32_MAX));
  args.batch = static_cast<int>(B);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.max_blocks = static_cast<int>(NB);
  args.gate_dim = static_cast<int>(Dg);
  args.max_tokens = static_cast<int>(K);
  args.token_idx = token_idx.data_ptr<int32_t>();
  args.num_idx = num_idx.data_ptr<int32_t>();
  args.probs = probs.data_ptr<float>();
  check_launch(launch_seer_select(args, current_stream(q_gate)), "seer_select");
  return {token_idx, num_idx, probs};
}

std::tuple<at::Tensor, at::Tensor> topk_from_mass(const at::Tensor& mass,
                                                  const at::Tensor& token_idx,
                                                  const at::Tensor& num_idx, int64_t k) {
  ATTNSERVE_DEVICE_GUARD(mass);
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(token_idx.dim() == 3, "token_idx must be [B, Hkv, K], got ", token_idx.sizes());
  const int64_t B = token_idx.size(0), Hkv = token_idx.size(1), K = token_idx.size(2);
  TORCH_CHECK(mass.scalar_type() == at::kFloat, "mass must be float32, got ",
              mass.scalar_type());
  check_shape(mass, "mass", {B, Hkv, K});
  check_same_device(token_idx, mass, "token_idx");
  const at::Tensor weights = mass.contiguous();
  const at::Tensor tokens = int32_input(token_idx, "token_idx", {B, Hkv, K}, mass);
  const at::Tensor counts = int32_input(num_idx, "num_idx", {B, Hkv}, mass);

  at::Tensor sel_idx = at::empty({B, Hkv, k}, int32_options(mass));
  at::Tensor sel_num = at::empty({B, Hkv}, int32_options(mass));
  if (B == 0 || Hkv == 0) return {sel_idx, sel_num};

  TopkFromMassArgs args{};
  args.mass = weights.data_ptr<float>();
  args.token_idx = tokens.data_ptr<int32_t>();
  args.num_idx = counts.data_ptr<int32_t>();
  args.batch = static_cast<int>(B);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.max_tokens = static_cast<int>(K);
  args.k = static_cast<int>(k);
  args.sel_idx = sel_idx.data_ptr<int32_t>();
  args.sel_num = sel_num.data_ptr<int32_t>();
  const size_t workspace_ints = topk_from_mass_workspace_ints(args.batch, args.num_kv_heads,
                                                              args.k);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_ints)}, int32_options(mass));
  check_launch(launch_topk_from_mass(args,
                                     workspace_ints > 0 ? workspace.data_ptr<int32_t>() : nullptr,
                                     current_stream(mass)),
               "topk_from_mass");
  return {sel_idx, sel_num};
}

// A [num_blocks, Hkv, page, D] view of the gather: free strides, head or token dim of stride 1.
StridedPages strided_pages(const at::Tensor& tensor, const char* name, const at::Tensor& like) {
  check_same_device(tensor, like, name);
  TORCH_CHECK(tensor.dim() == 4, name, " must be [num_blocks, num_kv_heads, page, head_size], got ",
              tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == like.scalar_type(), name, " must have the dtype of key_cache (",
              like.scalar_type(), "), got ", tensor.scalar_type());
  TORCH_CHECK(tensor.stride(3) == 1 || tensor.stride(2) == 1, name,
              ": the head dim or the token dim must have stride 1, got strides ",
              tensor.strides());
  return StridedPages{tensor.data_ptr(), tensor.stride(0), tensor.stride(1), tensor.stride(2),
                      tensor.stride(3)};
}

void gather_kv(const at::Tensor& key_cache, const at::Tensor& value_cache,
               const at::Tensor& block_table, const at::Tensor& token_idx,
               const at::Tensor& num_idx, const at::Tensor& dst_block_table,
               const at::Tensor& dst_start, at::Tensor& dst_key, at::Tensor& dst_value) {
  ATTNSERVE_DEVICE_GUARD(key_cache);
  const DType dtype = kernel_dtype(key_cache, "key_cache");
  const StridedPages key = strided_pages(key_cache, "key_cache", key_cache);
  const StridedPages value = strided_pages(value_cache, "value_cache", key_cache);
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of "
              "key_cache ", key_cache.sizes(), ", got ", value_cache.sizes());
  const int64_t Hkv = key_cache.size(1), page = key_cache.size(2), D = key_cache.size(3);
  const StridedPages out_key = strided_pages(dst_key, "dst_key", key_cache);
  const StridedPages out_value = strided_pages(dst_value, "dst_value", key_cache);
  TORCH_CHECK(dst_key.size(1) == Hkv && dst_key.size(3) == D,
              "dst_key must be [P, Hkv, dst_page, D] with Hkv = ", Hkv, ", D = ", D, ", got ",
              dst_key.sizes());
  TORCH_CHECK(dst_value.sizes() == dst_key.sizes(), "dst_value must have the shape of dst_key ",
              dst_key.sizes(), ", got ", dst_value.sizes());
  TORCH_CHECK(token_idx.dim() == 3 && token_idx.size(1) == Hkv,
              "token_idx must be [B, Hkv, K] with Hkv = ", Hkv, ", got ", token_idx.sizes());
  const int64_t B = token_idx.size(0), K = token_idx.size(2);
  const BlockTable table = block_table_of(block_table, B, key_cache);
  const BlockTable dst_table = block_table_of(dst_block_table, B, key_cache, "dst_block_table");
  const at::Tensor tokens = int32_input(token_idx, "token_idx", {B, Hkv, K}, key_cache);
  const at::Tensor counts = int32_input(num_idx, "num_idx", {B, Hkv}, key_cache);
  const at::Tensor starts = int32_input(dst_start, "dst_start", {B}, key_cache);
  if (B == 0 || Hkv == 0 || K == 0 || D == 0) return;
  TORCH_CHECK(page > 0 && dst_key.size(2) > 0, "page sizes must be > 0");

  GatherKvArgs args{};
  args.key = key;
  args.value = value;
  args.page = static_cast<int>(page);
  args.block_table = table;
  args.token_idx = tokens.data_ptr<int32_t>();
  args.num_idx = counts.data_ptr<int32_t>();
  args.dst_key = StridedPagesOut{dst_key.data_ptr(), out_key.block_stride, out_key.head_stride,
                                 out_key.token_stride, out_key.dim_stride};
  args.dst_value = StridedPagesOut{dst_value.data_ptr(), out_value.block_stride,
                                   out_value.head_stride, out_value.token_stride,
                                   out_value.dim_stride};
  args.dst_page = static_cast<int>(dst_key.size(2));
  args.dst_block_table = dst_table;
  args.dst_start = starts.data_ptr<int32_t>();
  args.batch = static_cast<int>(B);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.head_size = static_cast<int>(D);
  args.max_tokens = static_cast<int>(K);
  args.dtype = dtype;
  check_launch(launch_gather_kv(args, current_stream(key_cache)), "gather_kv");
}

}  // namespace
}  // namespace attnserve::cuda

namespace {

void register_kernels(torch::Library& m) {
  m.impl("sparse_paged_attention", &attnserve::cuda::sparse_paged_attention);
  m.impl("paged_prefill_attention", &attnserve::cuda::paged_prefill_attention);
  m.impl("landmark_update_summaries", &attnserve::cuda::landmark_update_summaries);
  m.impl("landmark_select", &attnserve::cuda::landmark_select);
  m.impl("seer_pool_keys", &attnserve::cuda::seer_pool_keys);
  m.impl("seer_select", &attnserve::cuda::seer_select);
  m.impl("topk_from_mass", &attnserve::cuda::topk_from_mass);
  m.impl("gather_kv", &attnserve::cuda::gather_kv);
}

}  // namespace

#ifdef ATTNSERVE_CUDA_EMULATION
TORCH_LIBRARY_IMPL(attnserve, CPU, m) { register_kernels(m); }
#else
TORCH_LIBRARY_IMPL(attnserve, CUDA, m) { register_kernels(m); }
#endif
