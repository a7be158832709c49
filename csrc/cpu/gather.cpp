// gather_kv on CPU: Recycled Attention's "recycled KV" copy (Xu et al. 2024). Tokens of vLLM's
// paged K / V caches are copied (bit-exact) into a second paged buffer, e.g. at a full step the
// ~1/8 of tokens with the most attention mass, then one appended token per later step.
//
// Per (sequence, KV head), in parallel when the call is large (threads_for). Token-contiguous
// sources (vLLM's CPU K: element (t, d) of a page at d * page + t) are read page by page: the
// selected tokens of one source page are copied together, row d = 0..D-1 of the page read
// sequentially and scattered into the destination rows. Dim-contiguous source and destination
// (V, and K on the other layout): one row memcpy per token.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "common.h"
#include "ops.h"

namespace attnserve {
namespace {

// A [num_blocks, Hkv, page, D] view; strides in elements.
struct Pages {
  char* base;
  int64_t stride_block, stride_head, stride_token, stride_dim;
};

Pages pages_of(const at::Tensor& t) {
  return Pages{static_cast<char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2),
               t.stride(3)};
}

struct GatherProblem {
  const int32_t* table;      // [B, MB] contiguous
  const int32_t* dst_table;  // [B, MP] contiguous
  const int32_t* tokens;     // [B, Hkv, K] contiguous
  const int32_t* counts;     // [B, Hkv]
  const int32_t* starts;     // [B]
  int64_t max_blocks, max_dst_blocks;
  int Hkv, K, page, dst_page, D;
};

ATTNSERVE_INLINE int count_of(const GatherProblem& p, int64_t bg) {
  return std::max(0, std::min<int>(p.counts[bg], p.K));
}

#if defined(__x86_64__)
// Row d of one source page, the tokens of `mask` (page / 32 words) packed in order -> dst[0, count).
ATTNSERVE_TARGET_AVX512_BF16 ATTNSERVE_INLINE void compress_row(const uint16_t* src, const uint32_t* mask,
                                                                 int words, uint16_t* dst) {
  int written = 0;
  for (int w = 0; w < words; ++w) {
    if (mask[w] == 0) continue;
    const __m512i packed = _mm512_maskz_compress_epi16(mask[w], _mm512_loadu_si512(src + 32 * w));
    const int count = __builtin_popcount(mask[w]);
    const __mmask32 lanes = count == 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
    _mm512_mask_storeu_epi16(dst + written, lanes, packed);
    written += count;
  }
}

// Token-contiguous bf16 source and destination (vLLM's CPU K into recycled's pool K): the listed
// tokens of one source page, when they ascend within the page and go to consecutive destination
// slots, are packed per head-dim row with vpcompressw. Returns false (nothing copied) when the list
// is not of that shape.
ATTNSERVE_TARGET_AVX512_BF16 bool copy_compressed_runs(const GatherProblem& p, const Pages& src,
                                                        const Pages& dst, int b, int g, const int32_t* tokens,
                                                        const int* order, int n, int start) {
  for (int j = 1; j < n; ++j) {
    if (order[j] != order[j - 1] + 1 || tokens[order[j]] <= tokens[order[j - 1]]) return false;
  }
  const int32_t* table = p.table + b * p.max_blocks;
  const int32_t* dst_table = p.dst_table + b * p.max_dst_blocks;
  const uint16_t* src_base = reinterpret_cast<const uint16_t*>(src.base) + g * src.stride_head;
  uint16_t* dst_base = reinterpret_cast<uint16_t*>(dst.base) + g * dst.stride_head;
  const int words = p.page / 32;
  uint32_t mask[64];
  if (words > 64) return false;
  // segments: tokens of one source page going to one destination page
  for (int j0 = 0; j0 < n;) {
    const int first = tokens[order[j0]];
    const int page_index = first / p.page;
    const int slot0 = start + order[j0];
    const int dst_page_end = (slot0 / p.dst_page + 1) * p.dst_page;
    int j1 = j0;
    std::fill(mask, mask + words, 0u);
    for (; j1 < n && tokens[order[j1]] / p.page == page_index && start + order[j1] < dst_page_end; ++j1) {
      const int offset = tokens[order[j1]] % p.page;
      mask[offset / 32] |= 1u << (offset % 32);
    }
    const uint16_t* page_base = src_base + table[page_index] * src.stride_block;
    uint16_t* out = dst_base + dst_table[slot0 / p.dst_page] * dst.stride_block + slot0 % p.dst_page;
    // the next segment's source page, row by row while this one is packed (pages are scattered)
    const uint16_t* next_page =
        j1 < n && tokens[order[j1]] / p.page != page_index
            ? src_base + table[tokens[order[j1]] / p.page] * src.stride_block : nullptr;
    for (int d = 0; d < p.D; ++d) {
      if (next_page != nullptr) {
        for (int w = 0; w < words; ++w) _mm_prefetch(reinterpret_cast<const char*>(next_page + d * src.stride_dim + 32 * w), _MM_HINT_T0);
      }
      compress_row(page_base + d * src.stride_dim, mask, words, out + d * dst.stride_dim);
    }
    j0 = j1;
  }
  return true;
}

using CopyCompressedRunsFn = bool (*)(const GatherProblem&, const Pages&, const Pages&, int, int,
                                      const int32_t*, const int*, int, int);
#endif

// Copies the n tokens tokens[order[j]] (j < n) of KV head g of sequence b from src to dst;
// token tokens[i] goes to destination slot start + i. E: the element's bits (uint32 / uint16).
template <typename E>
void copy_tokens(const GatherProblem& p, const Pages& src, const Pages& dst, int b, int g,
                 const int32_t* tokens, const int* order, int n, int start,
                 std::vector<E*>& dst_rows, std::vector<int>& offsets) {
  const int32_t* table = p.table + b * p.max_blocks;
  const int32_t* dst_table = p.dst_table + b * p.max_dst_blocks;
  const E* src_base = reinterpret_cast<const E*>(src.base) + g * src.stride_head;
  E* dst_base = reinterpret_cast<E*>(dst.base) + g * dst.stride_head;
  const int D = p.D;
  const auto dst_row = [&](int i) {
    const int s = start + i;
    return dst_base + dst_table[s / p.dst_page] * dst.stride_block +
           (s % p.dst_page) * dst.stride_token;
  };
  if (src.stride_dim == 1 && dst.stride_dim == 1) {  // rows on both sides
    // Scattered rows: each is a memory latency unless fetched ahead; kAhead rows in flight.
    constexpr int kAhead = 16;
    const auto src_row = [&](int j) {
      const int t = tokens[order[j]];
      return src_base + table[t / p.page] * src.stride_block + (t % p.page) * src.stride_token;
    };
    const int row_bytes = static_cast<int>(sizeof(E)) * D;
    for (int j = 0; j < std::min(n, kAhead); ++j) {
      for (int c = 0; c < row_bytes; c += 64) __builtin_prefetch(reinterpret_cast<const char*>(src_row(j)) + c);
    }
    for (int j = 0; j < n; ++j) {
      if (j + kAhead < n) {
        const char* ahead = reinterpret_cast<const char*>(src_row(j + kAhead));
        for (int c = 0; c < row_bytes; c += 64) __builtin_prefetch(ahead + c);
      }
      std::memcpy(dst_row(order[j]), src_row(j), row_bytes);
    }
    return;
  }
  if (src.stride_token != 1) {  // rows in, token-contiguous out: strided writes
    for (int j = 0; j < n; ++j) {
      const int i = order[j], t = tokens[i];
      const E* row = src_base + table[t / p.page] * src.stride_block +
                     (t % p.page) * src.stride_token;
      E* out = dst_row(i);
      for (int d = 0; d < D; ++d) out[d * dst.stride_dim] = row[d * src.stride_dim];
    }
    return;
  }
  // Token-contiguous source: the run of listed tokens in one source page at a time.
#if defined(__x86_64__)
  if constexpr (sizeof(E) == 2) {
    if (dst.stride_token == 1 && p.page % 32 == 0) {
      const CopyCompressedRunsFn copy_compressed =
          for_cpu_isa<CopyCompressedRunsFn>({.avx512bf16 = copy_compressed_runs});
      if (copy_compressed != nullptr && copy_compressed(p, src, dst, b, g, tokens, order, n, start)) return;
    }
  }
#endif
  dst_rows.resize(n);
  offsets.resize(n);
  for (int j0 = 0; j0 < n;) {
    const int logical_page = tokens[order[j0]] / p.page;
    int j1 = j0;
    for (; j1 < n && tokens[order[j1]] / p.page == logical_page; ++j1) {
      const int i = order[j1];
      offsets[j1 - j0] = tokens[i] % p.page;
      dst_rows[j1 - j0] = dst_row(i);
    }
    const int run = j1 - j0;
    const E* page_base = src_base + table[logical_page] * src.stride_block;
    const int* off = offsets.data();
    E* const* out = dst_rows.data();
    if (dst.stride_dim == 1) {
      for (int d = 0; d < D; ++d) {
        const E* row = page_base + d * src.stride_dim;  // token-contiguous row d of the page
        for (int r = 0; r < run; ++r) out[r][d] = row[off[r]];
      }
    } else {
      for (int d = 0; d < D; ++d) {
        const E* row = page_base + d * src.stride_dim;
        const int64_t to = d * dst.stride_dim;
        for (int r = 0; r < run; ++r) out[r][to] = row[off[r]];
      }
    }
    j0 = j1;
  }
}

template <typename E>
void gather_kv_impl(const GatherProblem& p, const Pages& key, const Pages& value,
                    const Pages& dst_key, const Pages& dst_value, int B, int64_t work) {
  const int threads = threads_for(work);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int bg = 0; bg < B * p.Hkv; ++bg) {
    const int b = bg / p.Hkv, g = bg % p.Hkv;
    const int n = count_of(p, bg);
    if (n == 0) continue;
    const int32_t* tokens = p.tokens + (int64_t)bg * p.K;
    // Visit order: list order when it is ascending by source page (the usual case: ascending
    // positions), otherwise sorted by position so that each source page is read once.
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    bool by_page = true;
    for (int i = 1; i < n && by_page; ++i) by_page = tokens[i] / p.page >= tokens[i - 1] / p.page;
    if (!by_page) {
      std::stable_sort(order.begin(), order.end(),
                       [&](int x, int y) { return tokens[x] < tokens[y]; });
    }
    std::vector<E*> dst_rows;
    std::vector<int> offsets;
    const int start = p.starts[b];
    copy_tokens<E>(p, key, dst_key, b, g, tokens, order.data(), n, start, dst_rows, offsets);
    copy_tokens<E>(p, value, dst_value, b, g, tokens, order.data(), n, start, dst_rows, offsets);
  }
}

void check_pages(const at::Tensor& t, const char* name, const at::Tensor& like,
                 int64_t num_kv_heads, int64_t head_size) {
  TORCH_CHECK(t.dim() == 4, name, " must be [num_blocks, num_kv_heads, page, head_size], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the cache dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(1) == num_kv_heads && t.size(3) == head_size, name,
              " must have num_kv_heads ", num_kv_heads, " and head_size ", head_size, ", got ",
              t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.stride(2) == 1, name,
              ": the head dim or the token dim must have stride 1, got strides ", t.strides());
}

}  // namespace

void gather_kv_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& block_table, const at::Tensor& token_idx,
                   const at::Tensor& num_idx, const at::Tensor& dst_block_table,
                   const at::Tensor& dst_start, at::Tensor& dst_key, at::Tensor& dst_value) {
  check_cache(key_cache, "key_cache");
  check_cache(value_cache, "value_cache");
  check_int32(block_table, "block_table");
  check_int32(token_idx, "token_idx");
  check_int32(num_idx, "num_idx");
  check_int32(dst_block_table, "dst_block_table");
  check_int32(dst_start, "dst_start");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() &&
                  key_cache.scalar_type() == value_cache.scalar_type(),
              "key_cache and value_cache must have the same shape and dtype, got ",
              key_cache.sizes(), " ", key_cache.scalar_type(), " and ", value_cache.sizes(), " ",
              value_cache.scalar_type());
  const int64_t Hkv = key_cache.size(1), page = key_cache.size(2), D = key_cache.size(3);
  check_pages(dst_key, "dst_key", key_cache, Hkv, D);
  check_pages(dst_value, "dst_value", key_cache, Hkv, D);
  TORCH_CHECK(dst_key.sizes() == dst_value.sizes(), "dst_key and dst_value shapes differ: ",
              dst_key.sizes(), " and ", dst_value.sizes());
  TORCH_CHECK(block_table.dim() == 2, "block_table must be [B, max_blocks], got ",
              block_table.sizes());
  const int64_t B = block_table.size(0);
  TORCH_CHECK(token_idx.dim() == 3 && token_idx.size(0) == B && token_idx.size(1) == Hkv,
              "token_idx must be [B, Hkv, K] = [", B, ", ", Hkv, ", K], got ", token_idx.sizes());
  TORCH_CHECK(num_idx.sizes() == at::IntArrayRef({B, Hkv}), "num_idx must be [B, Hkv] = [", B,
              ", ", Hkv, "], got ", num_idx.sizes());
  TORCH_CHECK(dst_block_table.dim() == 2 && dst_block_table.size(0) == B,
              "dst_block_table must be [B, max_dst_blocks] with B = ", B, ", got ",
              dst_block_table.sizes());
  TORCH_CHECK(dst_start.sizes() == at::IntArrayRef({B}), "dst_start must be [B] = [", B,
              "], got ", dst_start.sizes());
  const int64_t K = token_idx.size(2);
  if (B == 0 || Hkv == 0 || K == 0) return;

  const at::Tensor table = block_table.contiguous(), dst_table = dst_block_table.contiguous();
  const at::Tensor tokens = token_idx.contiguous(), counts = num_idx.contiguous();
  const at::Tensor starts = dst_start.contiguous();
  GatherProblem p{table.data_ptr<int32_t>(), dst_table.data_ptr<int32_t>(),
                  tokens.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                  starts.data_ptr<int32_t>(), table.size(1), dst_table.size(1),
                  (int)Hkv, (int)K, (int)page, (int)dst_key.size(2), (int)D};

  // Every index in range (a bad one would write out of bounds): serial, O(selected tokens).
  const int64_t num_blocks = key_cache.size(0), num_dst_blocks = dst_key.size(0);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t bg = b * Hkv + g;
      const int n = count_of(p, bg);
      if (n == 0) continue;
      total += n;
      const int64_t first = p.starts[b], last = first + n - 1;
      TORCH_CHECK(first >= 0 && last < p.max_dst_blocks * p.dst_page, "gather_kv: sequence ", b,
                  " head ", g, " writes slots [", first, ", ", last, "] outside dst_block_table's ",
                  p.max_dst_blocks, " blocks of ", p.dst_page);
      for (int s = first / p.dst_page; s <= last / p.dst_page; ++s) {
        const int32_t block = p.dst_table[b * p.max_dst_blocks + s];
        TORCH_CHECK(block >= 0 && block < num_dst_blocks, "gather_kv: dst_block_table[", b, ", ",
                    s, "] = ", block, " is not a block of dst_key (", num_dst_blocks, ")");
      }
      const int32_t* list = p.tokens + bg * K;
      for (int i = 0; i < n; ++i) {
        const int64_t t = list[i];
        TORCH_CHECK(t >= 0 && t < p.max_blocks * page, "gather_kv: token_idx[", b, ", ", g, ", ",
                    i, "] = ", t, " is outside block_table's ", p.max_blocks, " blocks of ",
                    page);
        const int32_t block = p.table[b * p.max_blocks + t / page];
        TORCH_CHECK(block >= 0 && block < num_blocks, "gather_kv: block_table[", b, ", ",
                    t / page, "] = ", block, " is not a block of the cache (", num_blocks, ")");
      }
    }
  }
  const int64_t work = total * D * 2;
  const Pages key = pages_of(key_cache), value = pages_of(value_cache);
  const Pages out_key = pages_of(dst_key), out_value = pages_of(dst_value);
  if (key_cache.scalar_type() == at::kBFloat16) {
    gather_kv_impl<uint16_t>(p, key, value, out_key, out_value, (int)B, work);
  } else {
    gather_kv_impl<uint32_t>(p, key, value, out_key, out_value, (int)B, work);
  }
}

}  // namespace attnserve
