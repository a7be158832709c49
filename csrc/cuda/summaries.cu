// Per-chunk key summaries: landmark_update_summaries (kmin / kmax, Quest: Tang et al. 2024) and
// seer_pool_keys ((max, min, mean) pooling of SeerAttention's K gate, Gao et al. 2024).
//
// grid (chunk_slices, Hkv, B): block x handles the chunks first_chunk + x, + gridDim.x, ... of
// sequence b that touch [start_pos[b], seq_lens[b]); thread d reduces dim d over the chunk's
// filled tokens (one coalesced row read per token).
#include <algorithm>

#include "common.cuh"

namespace attnserve::cuda {
namespace {

constexpr int kSummaryThreads = 128;

__device__ __forceinline__ void store_summary(const ChunkSummaryOutput& out, int64_t block,
                                              int kv_head, int slot, int d, float value) {
  if (out.data != nullptr)
    out.data[block * out.block_stride + kv_head * out.head_stride + slot * out.slot_stride + d] =
        value;
}

template <typename T>
__global__ void __launch_bounds__(kSummaryThreads)
    chunk_summaries_kernel(const ChunkSummaryArgs a) {
  const int kv_head = blockIdx.y, seq = blockIdx.z;
  const int start = a.start_pos[seq], seq_len = a.seq_lens[seq];
  if (start >= seq_len) return;
  const int first_chunk = max(start, 0) / a.chunk;
  const int end_chunk = ceil_div(seq_len, a.chunk);
  const int32_t* block_row = a.block_table.data + seq * a.block_table.row_stride;
  const T* key_base = static_cast<const T*>(a.key.data) + kv_head * a.key.head_stride;

  for (int c = first_chunk + blockIdx.x; c < end_chunk; c += gridDim.x) {
    const int first_token = c * a.chunk;
    const int tokens = min(a.chunk, seq_len - first_token);
    const int64_t block = block_row[first_token / a.page];
    const int slot = (first_token % a.page) / a.chunk;
    const int first_offset = first_token % a.page;  // the chunk lies inside one page
    const T* chunk_keys = key_base + block * a.key.block_stride;
    for (int d = threadIdx.x; d < a.head_size; d += kSummaryThreads) {
      float high = -INFINITY, low = INFINITY, total = 0.f;
      for (int t = 0; t < tokens; ++t) {
        const float x = to_float(chunk_keys[(first_offset + t) * a.key.token_stride + d]);
        high = fmaxf(high, x);
        low = fminf(low, x);
        total += x;
      }
      store_summary(a.max, block, kv_head, slot, d, high);
      store_summary(a.min, block, kv_head, slot, d, low);
      store_summary(a.mean, block, kv_head, slot, d, total / static_cast<float>(tokens));
    }
  }
}

}  // namespace

cudaError_t launch_chunk_summaries(const ChunkSummaryArgs& args, int num_sms,
                                   cudaStream_t stream) {
  if (args.batch == 0 || args.num_kv_heads == 0) return cudaSuccess;
  if (args.chunk <= 0 || args.page % args.chunk != 0) return cudaErrorInvalidValue;
  // Enough blocks to fill the GPU for a long prefill; a decode step touches one chunk per
  // sequence, and the extra blocks exit at once.
  const int max_chunks = std::max(1, args.block_table.max_blocks * (args.page / args.chunk));
  const int wanted = ceil_div(4 * std::max(num_sms, 1), args.batch * args.num_kv_heads);
  const dim3 grid(std::max(1, std::min(max_chunks, wanted)), args.num_kv_heads, args.batch);
  return ATTNSERVE_DISPATCH_DTYPE(args.dtype, T, [&] {
    const auto kernel = chunk_summaries_kernel<T>;
    ATTNSERVE_LAUNCH(kernel, grid, kSummaryThreads, 0, stream)(args);
    return cudaGetLastError();
  });
}

}  // namespace attnserve::cuda
