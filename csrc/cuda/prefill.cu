// paged_prefill_attention: causal flash attention (Dao et al., FlashAttention, 2022) over the
// paged cache with the sink / window / block mask. Correctness over speed: one block per
// (query tile, query head); a warp owns kRowsPerWarp query rows, lane j scores key j of each
// 32-key tile, and every lane accumulates its dims d = lane + 32 i of the output.
//
// grid (ceil(T / kQueryTile) + B, Hq): x enumerates the query tiles of all sequences in order
// (a sequence of qlen queries has ceil(qlen / kQueryTile) tiles); blocks past the last exit.
#include <algorithm>

#include "common.cuh"

namespace attnserve::cuda {
namespace {

constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;
constexpr int kKeyTile = 32;

template <int HEAD_DIM>
struct PrefillTile {
  static constexpr int kRowsPerWarp = HEAD_DIM <= 128 ? 8 : 4;
  static constexpr int kQueryTile = kPrefillWarps * kRowsPerWarp;
  static constexpr int kDimsPerLane = ceil_div(HEAD_DIM, 32);
  static constexpr int kKeyRowStride = HEAD_DIM + 1;  // conflict-free column reads
  // Shared memory (fp32): q [kQueryTile][HEAD_DIM], k [kKeyTile][HEAD_DIM + 1],
  // v [kKeyTile][HEAD_DIM].
  static constexpr size_t kSharedBytes =
      sizeof(float) * (kQueryTile * HEAD_DIM + kKeyTile * kKeyRowStride + kKeyTile * HEAD_DIM);
};

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kPrefillThreads)
    paged_prefill_kernel(const PrefillAttentionArgs a) {
  using Tile = PrefillTile<HEAD_DIM>;
  constexpr int kRowsPerWarp = Tile::kRowsPerWarp;
  constexpr int kQueryTile = Tile::kQueryTile;
  constexpr int kDimsPerLane = Tile::kDimsPerLane;

  float* q_tile = dynamic_shared_memory<float>();
  float* k_tile = q_tile + kQueryTile * HEAD_DIM;
  float* v_tile = k_tile + kKeyTile * Tile::kKeyRowStride;
  __shared__ int tile_seq, tile_index;

  if (threadIdx.x == 0) {
    int remaining = blockIdx.x, found = -1;
    for (int b = 0; b < a.batch; ++b) {
      const int tiles = ceil_div(a.query_start_loc[b + 1] - a.query_start_loc[b], kQueryTile);
      if (remaining < tiles) {
        found = b;
        break;
      }
      remaining -= tiles;
    }
    tile_seq = found;
    tile_index = remaining;
  }
  __syncthreads();
  const int seq = tile_seq;
  if (seq < 0) return;

  const int head = blockIdx.y;
  const int kv_head = head / (a.num_q_heads / a.num_kv_heads);
  const int q_begin = a.query_start_loc[seq];
  const int q_len = a.query_start_loc[seq + 1] - q_begin;
  const int seq_len = a.seq_lens[seq];
  const int first_row = tile_index * kQueryTile;
  const int rows_here = min(kQueryTile, q_len - first_row);
  const int first_q_pos = seq_len - q_len + first_row;
  const int last_q_pos = first_q_pos + rows_here - 1;

  const T* query = static_cast<const T*>(a.query);
  for (int i = threadIdx.x; i < kQueryTile * HEAD_DIM; i += kPrefillThreads) {
    const int r = i / HEAD_DIM, d = i % HEAD_DIM;
    q_tile[i] = r < rows_here
                    ? to_float(query[(q_begin + first_row + r) * a.query_token_stride +
                                     head * a.query_head_stride + d]) *
                          a.scale
                    : 0.f;
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float running_max[kRowsPerWarp], running_sum[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    running_max[r] = -INFINITY;
    running_sum[r] = 0.f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[r][i] = 0.f;
  }

  const int32_t* block_row = a.block_table.data + seq * a.block_table.row_stride;
  const T* key_base = static_cast<const T*>(a.key.data) + kv_head * a.key.head_stride;
  const T* value_base = static_cast<const T*>(a.value.data) + kv_head * a.value.head_stride;
  const bool* mask_base =
      a.block_mask != nullptr
          ? a.block_mask + seq * a.block_mask_strides[0] + kv_head * a.block_mask_strides[1]
          : nullptr;
  // Lowest key position any row of the tile sees through the window (sinks aside).
  const int window_low = a.window >= 0 ? first_q_pos - a.window + 1 : 0;

  for (int key_begin = 0; key_begin <= last_q_pos; key_begin += kKeyTile) {
    const bool in_sink = key_begin < a.n_sink;
    if (a.window >= 0 && !in_sink && key_begin + kKeyTile - 1 < window_low) continue;

    __syncthreads();  // the previous tile is consumed
    constexpr int kVectorsPerKey = HEAD_DIM / 8;
    for (int i = threadIdx.x; i < kKeyTile * kVectorsPerKey; i += kPrefillThreads) {
      const int key = i / kVectorsPerKey, d0 = (i % kVectorsPerKey) * 8;
      const int position = key_begin + key;
      float k[8], v[8];
      if (position <= last_q_pos) {
        const int64_t block = block_row[position / a.page];
        const int offset = position % a.page;
        load8(key_base + block * a.key.block_stride + offset * a.key.token_stride + d0, k);
        load8(value_base + block * a.value.block_stride + offset * a.value.token_stride + d0, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) k[e] = v[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        k_tile[key * Tile::kKeyRowStride + d0 + e] = k[e];
        v_tile[key * HEAD_DIM + d0 + e] = v[e];
      }
    }
    __syncthreads();

    const int position = key_begin + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r >= rows_here) break;
      const int q_pos = first_q_pos + r;
      bool visible = position <= q_pos;
      if (a.window >= 0) visible = visible && (position < a.n_sink || q_pos - position < a.window);
      if (visible && mask_base != nullptr)
        visible = mask_base[(q_pos / a.mask_block) * a.block_mask_strides[2] +
                            (position / a.mask_block) * a.block_mask_strides[3]];
      float score = -INFINITY;
      if (visible) {
        const float* q_row = q_tile + r * HEAD_DIM;
        const float* k_row = k_tile + lane * Tile::kKeyRowStride;
        score = 0.f;
#pragma unroll 8
        for (int d = 0; d < HEAD_DIM; ++d) score = fmaf(q_row[d], k_row[d], score);
      }
      const float new_max = fmaxf(running_max[rr], warp_max(score));
      if (new_max == -INFINITY) continue;  // warp-uniform: nothing visible yet
      const float correction = __expf(running_max[rr] - new_max);
      const float weight = visible ? __expf(score - new_max) : 0.f;
      running_sum[rr] = running_sum[rr] * correction + warp_sum(weight);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) acc[rr][i] *= correction;
      for (int key = 0; key < kKeyTile; ++key) {
        const float key_weight = __shfl_sync(kFullMask, weight, key);
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < HEAD_DIM) acc[rr][i] = fmaf(key_weight, v_tile[key * HEAD_DIM + d], acc[rr][i]);
        }
      }
      running_max[rr] = new_max;
    }
  }

  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows_here) break;
    const int64_t row = (static_cast<int64_t>(q_begin) + first_row + r) * a.num_q_heads + head;
    const float inverse = running_sum[rr] > 0.f ? 1.f / running_sum[rr] : 0.f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < HEAD_DIM) out[row * HEAD_DIM + d] = from_float<T>(acc[rr][i] * inverse);
    }
  }
}

template <typename T, int HEAD_DIM>
cudaError_t launch_prefill(const PrefillAttentionArgs& a, cudaStream_t stream) {
  using Tile = PrefillTile<HEAD_DIM>;
  const auto kernel = paged_prefill_kernel<T, HEAD_DIM>;
  const size_t shared_bytes = Tile::kSharedBytes;
  if (shared_bytes > 48 * 1024) {
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (status != cudaSuccess) return status;
  }
  const dim3 grid(ceil_div(a.num_tokens, Tile::kQueryTile) + a.batch, a.num_q_heads);
  ATTNSERVE_LAUNCH(kernel, grid, kPrefillThreads, shared_bytes, stream)(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_paged_prefill_attention(const PrefillAttentionArgs& args,
                                           cudaStream_t stream) {
  if (args.num_tokens == 0 || args.batch == 0) return cudaSuccess;
  if (args.num_kv_heads <= 0 || args.num_q_heads % args.num_kv_heads != 0 ||
      (args.block_mask != nullptr && args.mask_block <= 0))
    return cudaErrorInvalidValue;
  return ATTNSERVE_DISPATCH_DTYPE(args.dtype, T, [&] {
    return ATTNSERVE_DISPATCH_HEAD_SIZE(args.head_size, kHeadDim,
                                        [&] { return launch_prefill<T, kHeadDim>(args, stream); });
  });
}

}  // namespace attnserve::cuda
