// gather_kv: Recycled Attention's "recycled KV" copy (Xu et al. 2024). At a full step the tokens
// with the most attention mass are copied out of the paged caches into a compact per-request
// buffer; each later step appends one token the same way.
//
// grid (Hkv, B), one launch for K and one for V: block (g, b) copies the num_idx[b, g] listed
// tokens of KV head g of sequence b; thread e handles piece e % width of token e / width, so
// consecutive threads copy consecutive pieces of a row (coalesced over d). A piece is 16 bytes
// when both rows are dim-contiguous and 16-byte aligned, else one element. Bit-exact: the bits
// are moved as unsigned integers.
#include <algorithm>

#include "common.cuh"

namespace attnserve::cuda {
namespace {

constexpr int kGatherThreads = 256;

// One tensor's copy (K or V); strides in pieces (Unit).
struct GatherCopy {
  const void* src;
  int64_t src_block, src_head, src_token, src_dim;
  void* dst;
  int64_t dst_block, dst_head, dst_token, dst_dim;
  int row_units;  // pieces per row
};

template <typename Unit>
__global__ void __launch_bounds__(kGatherThreads)
    gather_kv_kernel(const GatherKvArgs a, const GatherCopy c) {
  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int64_t list = static_cast<int64_t>(seq) * a.num_kv_heads + kv_head;
  const int n = min(max(a.num_idx[list], 0), a.max_tokens);
  const int32_t* tokens = a.token_idx + list * a.max_tokens;
  const int start = a.dst_start[seq];
  const int32_t* block_row = a.block_table.data + seq * a.block_table.row_stride;
  const int32_t* dst_block_row = a.dst_block_table.data + seq * a.dst_block_table.row_stride;
  const Unit* src = static_cast<const Unit*>(c.src) + kv_head * c.src_head;
  Unit* dst = static_cast<Unit*>(c.dst) + kv_head * c.dst_head;
  const int width = c.row_units;
  const int total = n * width;
  for (int e = threadIdx.x; e < total; e += kGatherThreads) {
    const int i = e / width, piece = e - i * width;
    const int t = tokens[i], s = start + i;
    const int64_t from = block_row[t / a.page] * c.src_block + (t % a.page) * c.src_token +
                         piece * c.src_dim;
    const int64_t to = dst_block_row[s / a.dst_page] * c.dst_block +
                       (s % a.dst_page) * c.dst_token + piece * c.dst_dim;
    dst[to] = src[from];
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

template <typename Unit>
cudaError_t launch_copy(const GatherKvArgs& a, const GatherCopy& c, cudaStream_t stream) {
  const dim3 grid(a.num_kv_heads, a.batch);
  const auto kernel = gather_kv_kernel<Unit>;
  ATTNSERVE_LAUNCH(kernel, grid, kGatherThreads, 0, stream)(a, c);
  return cudaGetLastError();
}

// Element: the bits of one element (uint32_t for fp32, uint16_t for fp16 / bf16).
template <typename Element>
cudaError_t gather_one(const GatherKvArgs& a, const StridedPages& src,
                       const StridedPagesOut& dst, cudaStream_t stream) {
  constexpr int64_t kPerPiece = sizeof(uint4) / sizeof(Element);
  const bool vectorised = src.dim_stride == 1 && dst.dim_stride == 1 &&
                          a.head_size % kPerPiece == 0 && aligned16(src.data) &&
                          aligned16(dst.data) && src.block_stride % kPerPiece == 0 &&
                          src.head_stride % kPerPiece == 0 && src.token_stride % kPerPiece == 0 &&
                          dst.block_stride % kPerPiece == 0 && dst.head_stride % kPerPiece == 0 &&
                          dst.token_stride % kPerPiece == 0;
  const int64_t per = vectorised ? kPerPiece : 1;
  const GatherCopy c{src.data,
                     src.block_stride / per,
                     src.head_stride / per,
                     src.token_stride / per,
                     vectorised ? 1 : src.dim_stride,
                     dst.data,
                     dst.block_stride / per,
                     dst.head_stride / per,
                     dst.token_stride / per,
                     vectorised ? 1 : dst.dim_stride,
                     static_cast<int>(a.head_size / per)};
  return vectorised ? launch_copy<uint4>(a, c, stream) : launch_copy<Element>(a, c, stream);
}

template <typename Element>
cudaError_t gather_both(const GatherKvArgs& a, cudaStream_t stream) {
  const cudaError_t status = gather_one<Element>(a, a.key, a.dst_key, stream);
  if (status != cudaSuccess) return status;
  return gather_one<Element>(a, a.value, a.dst_value, stream);
}

}  // namespace

cudaError_t launch_gather_kv(const GatherKvArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.num_kv_heads == 0 || args.max_tokens == 0 || args.head_size == 0)
    return cudaSuccess;
  if (args.page <= 0 || args.dst_page <= 0) return cudaErrorInvalidValue;
  return args.dtype == DType::kFloat32 ? gather_both<uint32_t>(args, stream)
                                       : gather_both<uint16_t>(args, stream);
}

}  // namespace attnserve::cuda
