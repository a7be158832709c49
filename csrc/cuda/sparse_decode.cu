// sparse_paged_attention: decode attention over a per-(sequence, KV head) token list, as split-K
// flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023).
//
// Split kernel: grid (split, Hkv * group_tiles, B); the G query heads of a KV head (up to
// kGroupTile per block) share every K/V load. A token is handled by a lane group of
// kLanesPerToken lanes holding 8 consecutive dims each (one 16-byte load per lane for 16-bit
// caches); each lane group keeps its own online softmax, and the block merges them in shared
// memory. With one split the block writes the normalised output; otherwise it writes partial
// (acc, max, sum) and the reduce kernel merges the splits. The mass kernel turns the stored
// logits into per-token probabilities summed over the group's heads.
#include <algorithm>

#include "common.cuh"

namespace attnserve::cuda {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kUnroll = 2;  // list entries per lane group in flight
constexpr int kMinTokensPerSplit = 64;
constexpr int kMaxSplits = 256;

// Workspace layout (fp32): partial_acc [B, Hq, S, D], partial_max [B, Hq, S],
// partial_sum [B, Hq, S], lse [B, Hq], logits [B, Hq, K] (only when the mass is wanted).
struct DecodeWorkspace {
  float* partial_acc;
  float* partial_max;
  float* partial_sum;
  float* lse;
  float* logits;
};

// Query heads per block: the whole group up to 8 (1, 4 or 8 compiled).
constexpr int group_tile(int group_size) {
  return group_size == 1 ? 1 : group_size <= 4 ? 4 : 8;
}

struct DecodeParams {
  SparseAttentionArgs args;
  DecodeWorkspace ws;
  int num_splits;
  int tokens_per_split;
  int group_size;
  int group_tiles;
};

template <typename T, int HEAD_DIM, int GROUP_TILE>
__global__ void __launch_bounds__(kDecodeThreads)
    sparse_decode_split_kernel(const DecodeParams p) {
  constexpr int kLanesPerToken = next_pow2(HEAD_DIM / 8);
  constexpr int kTokensPerWarp = 32 / kLanesPerToken;
  constexpr int kLaneGroups = kDecodeWarps * kTokensPerWarp;
  static_assert(HEAD_DIM % 8 == 0 && kLanesPerToken <= 32, "head size");

  __shared__ float group_max_shared[kLaneGroups][GROUP_TILE];
  __shared__ float group_sum_shared[kLaneGroups][GROUP_TILE];
  __shared__ float head_max_shared[GROUP_TILE];
  __shared__ float head_sum_shared[GROUP_TILE];
  __shared__ float acc_shared[GROUP_TILE][HEAD_DIM];

  const SparseAttentionArgs& a = p.args;
  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.group_tiles;
  const int tile = blockIdx.y % p.group_tiles;
  const int seq = blockIdx.z;
  const int head_begin = kv_head * p.group_size + tile * GROUP_TILE;
  const int heads_here = min(GROUP_TILE, p.group_size - tile * GROUP_TILE);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int token_slot = lane / kLanesPerToken;  // lane group within the warp
  const int group_lane = lane % kLanesPerToken;
  const int lane_group = warp * kTokensPerWarp + token_slot;
  const int dim0 = group_lane * 8;
  const bool lane_has_dims = dim0 < HEAD_DIM;

  const int list = seq * a.num_kv_heads + kv_head;
  const int num_tokens = a.num_idx[list];
  const int begin = split * p.tokens_per_split;
  const int end = min(begin + p.tokens_per_split, num_tokens);

  // q [GROUP_TILE][8]: this lane's dims of each head, pre-scaled.
  float q[GROUP_TILE][8];
  const T* query = static_cast<const T*>(a.query) + seq * a.query_seq_stride;
#pragma unroll
  for (int h = 0; h < GROUP_TILE; ++h)
#pragma unroll
    for (int i = 0; i < 8; ++i)
      q[h][i] = (h < heads_here && lane_has_dims)
                    ? to_float(query[(head_begin + h) * a.query_head_stride + dim0 + i]) * a.scale
                    : 0.f;

  float running_max[GROUP_TILE], running_sum[GROUP_TILE], acc[GROUP_TILE][8];
#pragma unroll
  for (int h = 0; h < GROUP_TILE; ++h) {
    running_max[h] = -INFINITY;
    running_sum[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  const int32_t* positions = a.token_idx + static_cast<int64_t>(list) * a.max_tokens;
  const int32_t* block_row = a.block_table.data + seq * a.block_table.row_stride;
  const T* key_base = static_cast<const T*>(a.key.data) + kv_head * a.key.head_stride + dim0;
  const T* value_base =
      static_cast<const T*>(a.value.data) + kv_head * a.value.head_stride + dim0;
  float* logits = p.ws.logits;

  // A warp takes kTokensPerWarp * kUnroll consecutive list entries per step, issuing all their
  // K / V loads before the math. The loop bound is uniform per warp so that the lane-group
  // shuffles stay converged.
  constexpr int kWarpStep = kTokensPerWarp * kUnroll;
  for (int warp_begin = begin + warp * kWarpStep; warp_begin < end;
       warp_begin += kDecodeWarps * kWarpStep) {
    float k[kUnroll][8], v[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = warp_begin + u * kTokensPerWarp + token_slot;
      if (j < end && lane_has_dims) {
        const int position = positions[j];
        const int64_t block = block_row[position / a.page];
        const int offset = position % a.page;
        load8(key_base + block * a.key.block_stride + offset * a.key.token_stride, k[u]);
        load8(value_base + block * a.value.block_stride + offset * a.value.token_stride, v[u]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) k[u][i] = v[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = warp_begin + u * kTokensPerWarp + token_slot;
      const bool active = j < end;
#pragma unroll
      for (int h = 0; h < GROUP_TILE; ++h) {
        if (h >= heads_here) break;
        float score = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) score = fmaf(q[h][i], k[u][i], score);
        score = group_sum<kLanesPerToken>(score);
        if (!active) continue;
        if (logits != nullptr && group_lane == 0)
          logits[(static_cast<int64_t>(seq) * a.num_q_heads + head_begin + h) * a.max_tokens +
                 j] = score;
        const float new_max = fmaxf(running_max[h], score);
        const float correction = __expf(running_max[h] - new_max);
        const float weight = __expf(score - new_max);
        running_sum[h] = running_sum[h] * correction + weight;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(acc[h][i], correction, weight * v[u][i]);
        running_max[h] = new_max;
      }
    }
  }

  // Merge the lane groups: max and sum per head, then rescaled accumulators.
  if (group_lane == 0) {
#pragma unroll
    for (int h = 0; h < GROUP_TILE; ++h) {
      group_max_shared[lane_group][h] = running_max[h];
      group_sum_shared[lane_group][h] = running_sum[h];
    }
  }
  for (int i = threadIdx.x; i < GROUP_TILE * HEAD_DIM; i += kDecodeThreads)
    (&acc_shared[0][0])[i] = 0.f;
  __syncthreads();
  if (threadIdx.x < GROUP_TILE) {
    const int h = threadIdx.x;
    float head_max = -INFINITY;
    for (int g = 0; g < kLaneGroups; ++g) head_max = fmaxf(head_max, group_max_shared[g][h]);
    float head_sum = 0.f;
    if (head_max != -INFINITY)
      for (int g = 0; g < kLaneGroups; ++g)
        head_sum += group_sum_shared[g][h] * __expf(group_max_shared[g][h] - head_max);
    head_max_shared[h] = head_max;
    head_sum_shared[h] = head_sum;
  }
  __syncthreads();
  if (lane_has_dims) {
#pragma unroll
    for (int h = 0; h < GROUP_TILE; ++h) {
      if (h >= heads_here || running_max[h] == -INFINITY) continue;
      const float factor = __expf(running_max[h] - head_max_shared[h]);
#pragma unroll
      for (int i = 0; i < 8; ++i) atomicAdd(&acc_shared[h][dim0 + i], acc[h][i] * factor);
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < heads_here * HEAD_DIM; i += kDecodeThreads) {
    const int h = i / HEAD_DIM, d = i % HEAD_DIM;
    const int64_t head_row = static_cast<int64_t>(seq) * a.num_q_heads + head_begin + h;
    const float head_sum = head_sum_shared[h];
    if (p.num_splits == 1) {
      const float value = head_sum > 0.f ? acc_shared[h][d] / head_sum : 0.f;
      static_cast<T*>(a.out)[head_row * HEAD_DIM + d] = from_float<T>(value);
      if (d == 0)
        p.ws.lse[head_row] = head_sum > 0.f ? head_max_shared[h] + __logf(head_sum) : -INFINITY;
    } else {
      const int64_t partial = head_row * p.num_splits + split;
      p.ws.partial_acc[partial * HEAD_DIM + d] = acc_shared[h][d];
      if (d == 0) {
        p.ws.partial_max[partial] = head_max_shared[h];
        p.ws.partial_sum[partial] = head_sum;
      }
    }
  }
}

// grid (Hq, B): merges the splits of one head.
template <typename T>
__global__ void sparse_decode_reduce_kernel(const DecodeParams p) {
  const SparseAttentionArgs& a = p.args;
  const int64_t head_row = static_cast<int64_t>(blockIdx.y) * a.num_q_heads + blockIdx.x;
  const float* partial_max = p.ws.partial_max + head_row * p.num_splits;
  const float* partial_sum = p.ws.partial_sum + head_row * p.num_splits;
  float head_max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) head_max = fmaxf(head_max, partial_max[s]);
  float head_sum = 0.f;
  if (head_max != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s)
      head_sum += partial_sum[s] * __expf(partial_max[s] - head_max);
  const int D = a.head_size;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float value = 0.f;
    if (head_sum > 0.f) {
      for (int s = 0; s < p.num_splits; ++s)
        if (partial_max[s] != -INFINITY)
          value += p.ws.partial_acc[(head_row * p.num_splits + s) * D + d] *
                   __expf(partial_max[s] - head_max);
      value /= head_sum;
    }
    static_cast<T*>(a.out)[head_row * D + d] = from_float<T>(value);
  }
  if (threadIdx.x == 0)
    p.ws.lse[head_row] = head_sum > 0.f ? head_max + __logf(head_sum) : -INFINITY;
}

// grid (Hkv, B): mass[b, g, j] = sum over the group's heads of exp(logit - lse), 0 past num_idx.
__global__ void sparse_decode_mass_kernel(const DecodeParams p) {
  const SparseAttentionArgs& a = p.args;
  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int64_t list = static_cast<int64_t>(seq) * a.num_kv_heads + kv_head;
  const int num_tokens = a.num_idx[list];
  const int64_t first_head = static_cast<int64_t>(seq) * a.num_q_heads + kv_head * p.group_size;
  for (int j = threadIdx.x; j < a.max_tokens; j += blockDim.x) {
    float mass = 0.f;
    if (j < num_tokens)
      for (int h = 0; h < p.group_size; ++h)
        mass += __expf(p.ws.logits[(first_head + h) * a.max_tokens + j] - p.ws.lse[first_head + h]);
    a.mass[list * a.max_tokens + j] = mass;
  }
}

template <typename T, int HEAD_DIM, int GROUP_TILE>
cudaError_t launch_decode(DecodeParams p, cudaStream_t stream) {
  const SparseAttentionArgs& a = p.args;
  p.group_tiles = ceil_div(p.group_size, GROUP_TILE);
  const dim3 split_grid(p.num_splits, a.num_kv_heads * p.group_tiles, a.batch);
  const auto split_kernel = sparse_decode_split_kernel<T, HEAD_DIM, GROUP_TILE>;
  ATTNSERVE_LAUNCH(split_kernel, split_grid, kDecodeThreads, 0, stream)(p);
  if (p.num_splits > 1) {
    const auto reduce_kernel = sparse_decode_reduce_kernel<T>;
    const dim3 reduce_grid(a.num_q_heads, a.batch);
    ATTNSERVE_LAUNCH(reduce_kernel, reduce_grid, 128, 0, stream)(p);
  }
  if (a.mass != nullptr) {
    const dim3 mass_grid(a.num_kv_heads, a.batch);
    ATTNSERVE_LAUNCH(sparse_decode_mass_kernel, mass_grid, 256, 0, stream)(p);
  }
  return cudaGetLastError();
}

}  // namespace

bool attention_head_size_supported(int head_size) {
  return head_size == 64 || head_size == 96 || head_size == 128 || head_size == 256;
}

int sparse_attention_num_splits(int batch, int num_q_heads, int num_kv_heads, int max_tokens,
                                int num_sms) {
  const int group_size = num_q_heads / num_kv_heads;
  const int group_tiles = ceil_div(group_size, group_tile(group_size));
  const int blocks_per_split = std::max(1, batch * num_kv_heads * group_tiles);
  const int wanted = ceil_div(4 * std::max(num_sms, 1), blocks_per_split);
  const int by_length = ceil_div(std::max(max_tokens, 1), kMinTokensPerSplit);
  return std::max(1, std::min({wanted, by_length, kMaxSplits}));
}

size_t sparse_attention_workspace_floats(int batch, int num_q_heads, int head_size,
                                         int max_tokens, int num_splits, bool want_mass) {
  const size_t heads = static_cast<size_t>(batch) * num_q_heads;
  const size_t partial = num_splits > 1 ? heads * num_splits * (head_size + 2) : 0;
  return partial + heads + (want_mass ? heads * max_tokens : 0);
}

cudaError_t launch_sparse_paged_attention(const SparseAttentionArgs& args, int num_splits,
                                          float* workspace, cudaStream_t stream) {
  if (args.batch == 0 || args.num_q_heads == 0) return cudaSuccess;
  if (args.num_kv_heads <= 0 || args.num_q_heads % args.num_kv_heads != 0 || num_splits < 1)
    return cudaErrorInvalidValue;
  DecodeParams p{};
  p.args = args;
  p.num_splits = num_splits;
  p.tokens_per_split = std::max(1, ceil_div(args.max_tokens, num_splits));
  p.group_size = args.num_q_heads / args.num_kv_heads;
  const size_t heads = static_cast<size_t>(args.batch) * args.num_q_heads;
  float* cursor = workspace;
  if (num_splits > 1) {
    p.ws.partial_acc = cursor;
    cursor += heads * num_splits * args.head_size;
    p.ws.partial_max = cursor;
    cursor += heads * num_splits;
    p.ws.partial_sum = cursor;
    cursor += heads * num_splits;
  }
  p.ws.lse = cursor;
  cursor += heads;
  p.ws.logits = args.mass != nullptr ? cursor : nullptr;

  return ATTNSERVE_DISPATCH_DTYPE(args.dtype, T, [&] {
    return ATTNSERVE_DISPATCH_HEAD_SIZE(args.head_size, kHeadDim, [&] {
      switch (group_tile(p.group_size)) {
        case 1:
          return launch_decode<T, kHeadDim, 1>(p, stream);
        case 4:
          return launch_decode<T, kHeadDim, 4>(p, stream);
        default:
          return launch_decode<T, kHeadDim, 8>(p, stream);
      }
    });
  });
}

}  // namespace attnserve::cuda
