// Launchers of the attnserve CUDA kernels (docs/design.md section 4) on raw device pointers.
// Torch-free: csrc/cuda/binding.cpp checks tensors, allocates outputs and workspaces, and calls
// these on the current stream. Every launcher returns the launch status (cudaGetLastError()).
//
// Shapes: B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head size.
// Strides are in elements. Index tensors are int32 and contiguous unless a stride is given.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace attnserve::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Head sizes with compiled attention kernels; D must be one of them.
bool attention_head_size_supported(int head_size);

// One paged cache (K or V) viewed as [num_blocks, Hkv, page, D] with D contiguous.
// vLLM's CUDA flash layout [2, num_blocks, page, Hkv, D]: K = kv[0] with block_stride
// page * Hkv * D, head_stride D, token_stride Hkv * D. CPU layout [num_blocks, Hkv, page, 2 * D]:
// block_stride Hkv * page * 2D, head_stride page * 2D, token_stride 2D (V starts at +D).
// Rows must be 16-byte aligned (data and the three strides).
struct PagedCache {
  const void* data;
  int64_t block_stride;
  int64_t head_stride;
  int64_t token_stride;
};

// block_table [B, max_blocks]: logical token t of sequence b is in physical block
// data[b * row_stride + t / page], at offset t % page.
struct BlockTable {
  const int32_t* data;
  int64_t row_stride;
  int max_blocks;
};

// ---------------------------------------------------------------------------------------------
// 1. sparse_paged_attention: split-K flash-decoding over the selected tokens.
struct SparseAttentionArgs {
  const void* query;  // [B, Hq, D]
  int64_t query_seq_stride;
  int64_t query_head_stride;
  void* out;  // [B, Hq, D] contiguous, query dtype
  PagedCache key;
  PagedCache value;
  int page;
  BlockTable block_table;
  const int32_t* token_idx;  // [B, Hkv, K] contiguous, logical positions
  const int32_t* num_idx;    // [B, Hkv]
  float* mass;               // [B, Hkv, K] or nullptr
  int batch;
  int num_q_heads;
  int num_kv_heads;
  int head_size;
  int max_tokens;  // K
  float scale;
  DType dtype;  // of query, out and the caches
};

// Splits of the token list per (sequence, KV head) so that the grid fills num_sms SMs.
int sparse_attention_num_splits(int batch, int num_q_heads, int num_kv_heads, int max_tokens,
                                int num_sms);
// fp32 workspace the launcher needs (partial outputs, log-sum-exp, logits for the mass).
size_t sparse_attention_workspace_floats(int batch, int num_q_heads, int head_size,
                                         int max_tokens, int num_splits, bool want_mass);
cudaError_t launch_sparse_paged_attention(const SparseAttentionArgs& args, int num_splits,
                                          float* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 2. paged_prefill_attention: tiled flash attention with the causal / sink / window / block mask.
struct PrefillAttentionArgs {
  const void* query;  // [T, Hq, D]
  int64_t query_token_stride;
  int64_t query_head_stride;
  void* out;  // [T, Hq, D] contiguous
  PagedCache key;
  PagedCache value;
  int page;
  BlockTable block_table;
  const int32_t* query_start_loc;  // [B + 1]
  const int32_t* seq_lens;         // [B]
  const bool* block_mask;          // [B, Hkv, QB, KB] or nullptr
  int64_t block_mask_strides[4];
  int mask_block;
  int num_tokens;  // T
  int batch;
  int num_q_heads;
  int num_kv_heads;
  int head_size;
  float scale;
  int n_sink;
  int window;  // < 0: no window
  DType dtype;
};

cudaError_t launch_paged_prefill_attention(const PrefillAttentionArgs& args,
                                           cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 3./4. Per-chunk key summaries (landmark kmin/kmax, seer pooled max/min/mean), recomputed for
// every chunk touching tokens [start_pos[b], seq_lens[b]), partial chunks over filled tokens.
struct ChunkSummaryOutput {
  float* data;  // [num_blocks, Hkv, page / chunk, D] view (D contiguous); nullptr: not wanted
  int64_t block_stride;
  int64_t head_stride;
  int64_t slot_stride;
};

struct ChunkSummaryArgs {
  PagedCache key;
  int page;
  BlockTable block_table;
  const int32_t* start_pos;  // [B]
  const int32_t* seq_lens;   // [B]
  int chunk;                 // divides page
  int batch;
  int num_kv_heads;
  int head_size;
  DType dtype;
  ChunkSummaryOutput max;
  ChunkSummaryOutput min;
  ChunkSummaryOutput mean;
};

cudaError_t launch_chunk_summaries(const ChunkSummaryArgs& args, int num_sms,
                                   cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 3. landmark_select: Quest bound per chunk, the k_chunks best + first + newest, as tokens.
struct LandmarkSelectArgs {
  const void* query;  // [B, Hq, D]
  int64_t query_seq_stride;
  int64_t query_head_stride;
  DType query_dtype;
  ChunkSummaryOutput kmin;  // read only here
  ChunkSummaryOutput kmax;
  int page;
  BlockTable block_table;
  const int32_t* seq_lens;  // [B]
  int chunk;
  int k_chunks;
  int batch;
  int num_q_heads;
  int num_kv_heads;
  int head_size;
  int max_tokens;   // K = min((k_chunks + 2) * chunk, max_blocks * page)
  int32_t* token_idx;  // [B, Hkv, K] contiguous, 0 past num_idx
  int32_t* num_idx;    // [B, Hkv]
  bool group_max;      // a chunk's score: the max of the group's query heads' bounds (else their sum)
};

// fp32 workspace: one score per (sequence, KV head, chunk).
size_t landmark_select_workspace_floats(int batch, int num_kv_heads, int max_chunks);
cudaError_t launch_landmark_select(const LandmarkSelectArgs& args, float* workspace,
                                   cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 4. seer_select: softmax over blocks of q_gate . k_gate / sqrt(Dg), threshold or top-k + newest.
struct SeerSelectArgs {
  const void* q_gate;  // [B, Hkv, Dg]
  int64_t q_gate_strides[2];
  const void* k_gate;  // [B, Hkv, NB, Dg]
  int64_t k_gate_strides[3];
  DType gate_dtype;  // of q_gate and k_gate
  const int32_t* num_blocks;  // [B]
  const int32_t* seq_lens;    // [B]
  int pool;
  float threshold;
  int top_k;  // <= 0: threshold mode
  int batch;
  int num_kv_heads;
  int max_blocks;  // NB
  int gate_dim;    // Dg
  int max_tokens;  // K = NB * pool if top_k <= 0 else min(top_k + 1, NB) * pool
  int32_t* token_idx;  // [B, Hkv, K] contiguous
  int32_t* num_idx;    // [B, Hkv]
  float* probs;        // [B, Hkv, NB] contiguous, 0 past num_blocks
};

cudaError_t launch_seer_select(const SeerSelectArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 5. topk_from_mass: the k tokens of largest mass (ties: lower position), ascending by position.
struct TopkFromMassArgs {
  const float* mass;         // [B, Hkv, K] contiguous
  const int32_t* token_idx;  // [B, Hkv, K] contiguous
  const int32_t* num_idx;    // [B, Hkv]
  int batch;
  int num_kv_heads;
  int max_tokens;  // K
  int k;
  int32_t* sel_idx;  // [B, Hkv, k] contiguous, 0 past sel_num
  int32_t* sel_num;  // [B, Hkv]
};

// int32 workspace for the per-(sequence, KV head) sort when it does not fit in shared memory.
size_t topk_from_mass_workspace_ints(int batch, int num_kv_heads, int k);
cudaError_t launch_topk_from_mass(const TopkFromMassArgs& args, int32_t* workspace,
                                  cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 6. gather_kv: Recycled Attention's KV copy. For i < num_idx[b, g], token t = token_idx[b, g, i]
// of KV head g is copied (bit-exact) to slot s = dst_start[b] + i of the destination:
// dst[dst_block_table[b, s / dst_page], g, s % dst_page, :] = src[block_table[b, t / page], g,
// t % page, :], for K and V.

// A [num_blocks, Hkv, page, D] view with free strides (elements); the head dim or the token dim
// has stride 1 (vLLM's CPU K is token-contiguous per page).
struct StridedPages {
  const void* data;
  int64_t block_stride;
  int64_t head_stride;
  int64_t token_stride;
  int64_t dim_stride;
};

struct StridedPagesOut {
  void* data;
  int64_t block_stride;
  int64_t head_stride;
  int64_t token_stride;
  int64_t dim_stride;
};

struct GatherKvArgs {
  StridedPages key;
  StridedPages value;
  int page;
  BlockTable block_table;
  const int32_t* token_idx;  // [B, Hkv, K] contiguous, logical positions
  const int32_t* num_idx;    // [B, Hkv], clamped to [0, K]
  StridedPagesOut dst_key;   // [P, Hkv, dst_page, D], the cache dtype
  StridedPagesOut dst_value;
  int dst_page;
  BlockTable dst_block_table;
  const int32_t* dst_start;  // [B]
  int batch;
  int num_kv_heads;
  int head_size;
  int max_tokens;  // K
  DType dtype;     // of the caches and the destinations
};

// One block per (sequence, KV head) and tensor (K, V); threads over (token, 16-byte piece of the
// row) when rows are 16-byte aligned and dim-contiguous, else over (token, element).
cudaError_t launch_gather_kv(const GatherKvArgs& args, cudaStream_t stream);

}  // namespace attnserve::cuda
