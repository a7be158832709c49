// Selection ops: landmark_select (Quest's chunk bound, Tang et al. 2024), seer_select
// (SeerAttention's block gate, Gao et al. 2024) and topk_from_mass (Recycled Attention's refresh,
// Xu et al. 2024). Chunk / block scores come from a wide kernel (kScoreChunksPerBlock per block,
// a warp per chunk); the selection is one block per (KV head, sequence): an exact block-level
// radix select on 64-bit keys (score, then lower id on ties), chunk lists expanded to ascending
// tokens by a block scan, and topk_from_mass's positions sorted by a bitonic sort.
#include <algorithm>
#include <climits>

#include "common.cuh"

namespace attnserve::cuda {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kSharedSortCapacity = 8192;  // ints sorted in shared memory; more: workspace
constexpr int kScoreChunksPerBlock = 64;   // chunks (blocks) scored per block of a score kernel

// grid (ceil(max_chunks / kScoreChunksPerBlock), Hkv, B): chunk_scores[b, g, c] = Quest's bound
// sum over the group's heads h and dims d of max(q_hd * kmax_d, q_hd * kmin_d); a warp per chunk.
// Folded over the group (kmax >= kmin): kmax . P + kmin . N with P_d = sum_h max(q_hd, 0),
// N_d = sum_h min(q_hd, 0), as the CPU kernel and the reference compute it. With a.group_max, the
// max over the group's heads of each head's own bound (P and N per head).
template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    landmark_score_kernel(const LandmarkSelectArgs a, float* chunk_scores, int max_chunks) {
  float* folded = dynamic_shared_memory<float>();  // [heads][2][D]: P, N (heads: G with group_max, else 1)
  const int kv_head = blockIdx.y, seq = blockIdx.z;
  const int seq_len = a.seq_lens[seq];
  const int n_chunks = min(ceil_div(max(seq_len, 0), a.chunk), max_chunks);
  const int first_chunk = blockIdx.x * kScoreChunksPerBlock;
  if (first_chunk >= n_chunks) return;

  const int group_size = a.num_q_heads / a.num_kv_heads;
  const int D = a.head_size;
  const T* query = static_cast<const T*>(a.query) + seq * a.query_seq_stride;
  const int heads = a.group_max ? group_size : 1;
  for (int d = threadIdx.x; d < D; d += kSelectThreads) {
    float positive = 0.f, negative = 0.f;
    for (int h = 0; h < group_size; ++h) {
      const float q = to_float(query[(kv_head * group_size + h) * a.query_head_stride + d]);
      if (a.group_max) {
        folded[h * 2 * D + d] = fmaxf(q, 0.f);
        folded[h * 2 * D + D + d] = fminf(q, 0.f);
      } else {
        positive += fmaxf(q, 0.f);
        negative += fminf(q, 0.f);
      }
    }
    if (!a.group_max) {
      folded[d] = positive;
      folded[D + d] = negative;
    }
  }
  __syncthreads();

  const int64_t list = static_cast<int64_t>(seq) * a.num_kv_heads + kv_head;
  float* scores = chunk_scores + list * max_chunks;
  const int32_t* block_row = a.block_table.data + seq * a.block_table.row_stride;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int end_chunk = min(first_chunk + kScoreChunksPerBlock, n_chunks);
  for (int c = first_chunk + warp; c < end_chunk; c += kSelectThreads / 32) {
    const int first_token = c * a.chunk;
    const int64_t block = block_row[first_token / a.page];
    const int slot = (first_token % a.page) / a.chunk;
    const float* high = a.kmax.data + block * a.kmax.block_stride +
                        kv_head * a.kmax.head_stride + slot * a.kmax.slot_stride;
    const float* low = a.kmin.data + block * a.kmin.block_stride +
                       kv_head * a.kmin.head_stride + slot * a.kmin.slot_stride;
    float best = -INFINITY;
    for (int h = 0; h < heads; ++h) {
      const float* p = folded + h * 2 * D;
      float bound = 0.f;
      for (int d = lane; d < D; d += 32) bound += high[d] * p[d] + low[d] * p[D + d];
      best = fmaxf(best, warp_sum(bound));
    }
    if (lane == 0) scores[c] = best;
  }
}

// grid (Hkv, B): the chunk list of one (sequence, KV head) from its scores.
__global__ void __launch_bounds__(kSelectThreads)
    landmark_select_kernel(const LandmarkSelectArgs a, const float* chunk_scores,
                           int max_chunks) {
  __shared__ RadixSelectShared radix;
  __shared__ int scan_scratch[33];
  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int seq_len = a.seq_lens[seq];
  const int n_chunks = min(ceil_div(max(seq_len, 0), a.chunk), max_chunks);
  const int64_t list = static_cast<int64_t>(seq) * a.num_kv_heads + kv_head;
  const float* scores = chunk_scores + list * max_chunks;

  // The first and the newest chunk are forced; the k_chunks best of the others join them.
  const int forced = min(n_chunks, 2);
  const int others = n_chunks - forced;
  const int take = min(max(a.k_chunks, 0), others);
  const auto is_forced = [&](int c) { return c == 0 || c == n_chunks - 1; };
  const auto key_of = [&](int c) -> uint64_t {
    return is_forced(c) ? 0 : selection_key(scores[c], static_cast<uint32_t>(c));
  };
  uint64_t threshold = 0;
  if (take > 0 && take < others) threshold = block_radix_select(n_chunks, take, key_of, radix);
  const auto is_selected = [&](int c) {
    if (is_forced(c) || take == others) return true;
    return take > 0 && key_of(c) >= threshold;
  };
  const int written = block_expand_chunks(n_chunks, a.chunk, seq_len, is_selected,
                                          a.token_idx + list * a.max_tokens, a.max_tokens,
                                          scan_scratch);
  if (threadIdx.x == 0) a.num_idx[list] = written;
}

// grid (ceil(NB / kScoreChunksPerBlock), Hkv, B): probs[b, g, j] = q_gate . k_gate[j] / sqrt(Dg)
// for j < num_blocks[b] (the select kernel turns them into probabilities); a warp per block.
template <typename T>
__global__ void __launch_bounds__(kSelectThreads) seer_logits_kernel(const SeerSelectArgs a) {
  float* gate_query = dynamic_shared_memory<float>();  // [Dg]
  const int kv_head = blockIdx.y, seq = blockIdx.z;
  const int n_blocks = min(max(a.num_blocks[seq], 0), a.max_blocks);
  const int first_block = blockIdx.x * kScoreChunksPerBlock;
  if (first_block >= n_blocks) return;

  const int Dg = a.gate_dim;
  const T* q_gate = static_cast<const T*>(a.q_gate) + seq * a.q_gate_strides[0] +
                    kv_head * a.q_gate_strides[1];
  for (int d = threadIdx.x; d < Dg; d += kSelectThreads) gate_query[d] = to_float(q_gate[d]);
  __syncthreads();

  float* probs = a.probs + (static_cast<int64_t>(seq) * a.num_kv_heads + kv_head) * a.max_blocks;
  const T* k_gate = static_cast<const T*>(a.k_gate) + seq * a.k_gate_strides[0] +
                    kv_head * a.k_gate_strides[1];
  const float inverse_sqrt_dim = 1.f / sqrtf(static_cast<float>(Dg));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int end_block = min(first_block + kScoreChunksPerBlock, n_blocks);
  for (int j = first_block + warp; j < end_block; j += kSelectThreads / 32) {
    const T* k_row = k_gate + j * a.k_gate_strides[2];
    float logit = 0.f;
    for (int d = lane; d < Dg; d += 32) logit = fmaf(gate_query[d], to_float(k_row[d]), logit);
    logit = warp_sum(logit);
    if (lane == 0) probs[j] = logit * inverse_sqrt_dim;
  }
}

// grid (Hkv, B): softmax over the logits, then the block list of one (sequence, KV head).
__global__ void __launch_bounds__(kSelectThreads) seer_select_kernel(const SeerSelectArgs a) {
  __shared__ RadixSelectShared radix;
  __shared__ int scan_scratch[33];
  __shared__ float reduce_scratch[32];

  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int64_t list = static_cast<int64_t>(seq) * a.num_kv_heads + kv_head;
  const int n_blocks = min(max(a.num_blocks[seq], 0), a.max_blocks);
  const int seq_len = a.seq_lens[seq];
  float* probs = a.probs + list * a.max_blocks;

  float local_max = -INFINITY;
  for (int j = threadIdx.x; j < n_blocks; j += kSelectThreads)
    local_max = fmaxf(local_max, probs[j]);
  const float logit_max = block_max(local_max, reduce_scratch);
  float local_sum = 0.f;
  for (int j = threadIdx.x; j < n_blocks; j += kSelectThreads)
    local_sum += expf(probs[j] - logit_max);
  const float inverse_sum = 1.f / block_sum(local_sum, reduce_scratch);
  __syncthreads();
  for (int j = threadIdx.x; j < a.max_blocks; j += kSelectThreads)
    probs[j] = j < n_blocks ? expf(probs[j] - logit_max) * inverse_sum : 0.f;
  __syncthreads();

  // The newest block is forced; the threshold or the top_k best of the others join it.
  const int newest = n_blocks - 1;
  const int others = max(n_blocks - 1, 0);
  const int take = a.top_k > 0 ? min(a.top_k, others) : 0;
  const auto key_of = [&](int j) -> uint64_t {
    return j == newest ? 0 : selection_key(probs[j], static_cast<uint32_t>(j));
  };
  uint64_t top_threshold = 0;
  if (a.top_k > 0 && take > 0 && take < others)
    top_threshold = block_radix_select(n_blocks, take, key_of, radix);
  const auto is_selected = [&](int j) {
    if (j == newest) return true;
    if (a.top_k <= 0) return probs[j] >= a.threshold;
    return take == others || (take > 0 && key_of(j) >= top_threshold);
  };
  const int written = block_expand_chunks(n_blocks, a.pool, seq_len, is_selected,
                                          a.token_idx + list * a.max_tokens, a.max_tokens,
                                          scan_scratch);
  if (threadIdx.x == 0) a.num_idx[list] = written;
}

__global__ void __launch_bounds__(kSelectThreads)
    topk_from_mass_kernel(const TopkFromMassArgs a, int32_t* sort_workspace, int sort_size) {
  int32_t* shared_sort = dynamic_shared_memory<int32_t>();
  __shared__ RadixSelectShared radix;
  __shared__ int scan_scratch[33];

  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int64_t list = static_cast<int64_t>(seq) * a.num_kv_heads + kv_head;
  const int n = min(max(a.num_idx[list], 0), a.max_tokens);
  const int take = min(max(a.k, 0), n);
  const float* mass = a.mass + list * a.max_tokens;
  const int32_t* positions = a.token_idx + list * a.max_tokens;
  int32_t* sorted = sort_size <= kSharedSortCapacity ? shared_sort
                                                     : sort_workspace + list * sort_size;
  const auto key_of = [&](int j) {
    return selection_key(mass[j], static_cast<uint32_t>(positions[j]));
  };
  uint64_t threshold = 0;
  if (take > 0 && take < n) threshold = block_radix_select(n, take, key_of, radix);

  // Chosen positions, in list order, then sorted ascending (padding INT_MAX sorts last).
  int written = 0;
  if (take > 0) {
    for (int base = 0; base < n; base += kSelectThreads) {
      const int j = base + threadIdx.x;
      const bool chosen = j < n && (take == n || key_of(j) >= threshold);
      int tile_total;
      const int offset = written + block_exclusive_scan(chosen ? 1 : 0, scan_scratch, tile_total);
      if (chosen && offset < take) sorted[offset] = positions[j];
      written += tile_total;
    }
  }
  const int sort_count = next_pow2(max(take, 1));
  for (int i = take + threadIdx.x; i < sort_count; i += kSelectThreads) sorted[i] = INT_MAX;
  __syncthreads();
  for (int size = 2; size <= sort_count; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < sort_count / 2; i += kSelectThreads) {
        const int low = 2 * i - (i & (stride - 1));
        const int high = low + stride;
        const bool ascending = (low & size) == 0;
        const int32_t x = sorted[low], y = sorted[high];
        if ((x > y) == ascending) {
          sorted[low] = y;
          sorted[high] = x;
        }
      }
      __syncthreads();
    }
  }
  int32_t* out = a.sel_idx + list * a.k;
  for (int i = threadIdx.x; i < a.k; i += kSelectThreads) out[i] = i < take ? sorted[i] : 0;
  if (threadIdx.x == 0) a.sel_num[list] = take;
}

cudaError_t set_dynamic_shared(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace

size_t landmark_select_workspace_floats(int batch, int num_kv_heads, int max_chunks) {
  return static_cast<size_t>(batch) * num_kv_heads * std::max(max_chunks, 1);
}

cudaError_t launch_landmark_select(const LandmarkSelectArgs& args, float* workspace,
                                   cudaStream_t stream) {
  if (args.batch == 0 || args.num_kv_heads == 0) return cudaSuccess;
  if (args.chunk <= 0 || args.page % args.chunk != 0 || args.num_q_heads % args.num_kv_heads != 0)
    return cudaErrorInvalidValue;
  const int max_chunks = std::max(1, args.block_table.max_blocks * (args.page / args.chunk));
  const size_t shared_bytes =   // P and N, per query head with group_max
      sizeof(float) * 2 * args.head_size * (args.group_max ? args.num_q_heads / args.num_kv_heads : 1);
  const dim3 score_grid(ceil_div(max_chunks, kScoreChunksPerBlock), args.num_kv_heads,
                        args.batch);
  const cudaError_t status = ATTNSERVE_DISPATCH_DTYPE(args.query_dtype, T, [&] {
    const auto kernel = landmark_score_kernel<T>;
    const cudaError_t attribute = set_dynamic_shared(reinterpret_cast<const void*>(kernel),
                                                     shared_bytes);
    if (attribute != cudaSuccess) return attribute;
    ATTNSERVE_LAUNCH(kernel, score_grid, kSelectThreads, shared_bytes, stream)(args, workspace,
                                                                               max_chunks);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  const dim3 select_grid(args.num_kv_heads, args.batch);
  ATTNSERVE_LAUNCH(landmark_select_kernel, select_grid, kSelectThreads, 0, stream)(
      args, workspace, max_chunks);
  return cudaGetLastError();
}

cudaError_t launch_seer_select(const SeerSelectArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.num_kv_heads == 0) return cudaSuccess;
  if (args.pool <= 0 || args.gate_dim <= 0) return cudaErrorInvalidValue;
  const size_t shared_bytes = sizeof(float) * args.gate_dim;
  const dim3 logits_grid(ceil_div(std::max(args.max_blocks, 1), kScoreChunksPerBlock),
                         args.num_kv_heads, args.batch);
  const cudaError_t status = ATTNSERVE_DISPATCH_DTYPE(args.gate_dtype, T, [&] {
    const auto kernel = seer_logits_kernel<T>;
    const cudaError_t attribute = set_dynamic_shared(reinterpret_cast<const void*>(kernel),
                                                     shared_bytes);
    if (attribute != cudaSuccess) return attribute;
    ATTNSERVE_LAUNCH(kernel, logits_grid, kSelectThreads, shared_bytes, stream)(args);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  const dim3 select_grid(args.num_kv_heads, args.batch);
  ATTNSERVE_LAUNCH(seer_select_kernel, select_grid, kSelectThreads, 0, stream)(args);
  return cudaGetLastError();
}

size_t topk_from_mass_workspace_ints(int batch, int num_kv_heads, int k) {
  const int sort_size = next_pow2(std::max(k, 1));
  return sort_size <= kSharedSortCapacity ? 0
                                          : static_cast<size_t>(batch) * num_kv_heads * sort_size;
}

cudaError_t launch_topk_from_mass(const TopkFromMassArgs& args, int32_t* workspace,
                                  cudaStream_t stream) {
  if (args.batch == 0 || args.num_kv_heads == 0) return cudaSuccess;
  if (args.k < 0) return cudaErrorInvalidValue;
  const int sort_size = next_pow2(std::max(args.k, 1));
  if (sort_size > kSharedSortCapacity && workspace == nullptr) return cudaErrorInvalidValue;
  const size_t shared_bytes = sort_size <= kSharedSortCapacity ? sizeof(int32_t) * sort_size : 0;
  const dim3 grid(args.num_kv_heads, args.batch);
  ATTNSERVE_LAUNCH(topk_from_mass_kernel, grid, kSelectThreads, shared_bytes, stream)(
      args, workspace, sort_size);
  return cudaGetLastError();
}

}  // namespace attnserve::cuda
