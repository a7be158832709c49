// paged_prefill_attention on CPU: causal attention of each sequence's last qlen positions, with
// optional attention sinks + sliding window and a block mask (SeerAttention-style).
//
// Work item = (sequence b, KV head g, tile of kQueryTile queries); its G * kQueryTile rows share
// every K/V tile. K tiles are transposed to [D, kKeyTile] so scores vectorise over keys; tiles that
// the causal / window / block mask hides entirely are skipped before any KV is read.
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "common.h"
#include "ops.h"

namespace attnserve {
namespace {

constexpr int kQueryTile = 16;
constexpr int kKeyTile = 32;
constexpr int kMaxGroup = 32;

struct PrefillProblem {
  const float* query;  // [T, Hq, D] fp32, pre-scaled
  float* out;          // [T, Hq, D] fp32
  CacheView key, value;
  const int32_t* block_table;
  int64_t block_table_stride;
  const bool* block_mask;  // [B, Hkv, QB, KB] or nullptr
  int64_t mask_qb, mask_kb;
  int mask_block, n_sink, window;
  int Hq, Hkv, G, D, page;
};

struct QueryTile {
  int b, g, first_row;  // first_row: index into query of the tile's first query
  int seq_len, q_pos, n_queries;  // q_pos: position of the first query
};

struct Visibility {
  const PrefillProblem& p;
  const bool* mask;  // block_mask[b, g] or nullptr

  ATTNSERVE_INLINE bool visible(int q_pos, int k_pos) const {
    if (k_pos > q_pos) return false;
    if (p.window >= 0 && k_pos >= p.n_sink && q_pos - k_pos >= p.window) return false;
    return !mask || mask[(q_pos / p.mask_block) * p.mask_kb + k_pos / p.mask_block];
  }

  // Whether any (q, k) with q in [q0, q1], k in [k0, k1] can be visible.
  ATTNSERVE_INLINE bool any_visible(int q0, int q1, int k0, int k1) const {
    if (k0 > q1) return false;
    if (p.window >= 0 && k0 >= p.n_sink && q0 - k1 >= p.window) return false;
    if (!mask) return true;
    for (int qb = q0 / p.mask_block; qb <= q1 / p.mask_block; ++qb) {
      for (int kb = k0 / p.mask_block; kb <= k1 / p.mask_block; ++kb) {
        if (mask[qb * p.mask_kb + kb]) return true;
      }
    }
    return false;
  }
};

#if defined(__x86_64__)
static_assert(kKeyTile == 32, "the AVX-512 helpers hold a key tile in two vectors");

// s[0..32) = q . keys_t[:, 0..32) (keys_t [kD, kKeyTile]), accumulators in registers.
template <int kD>
ATTNSERVE_TARGET_AVX512 inline void tile_scores_avx512(const float* q,
                                                                 const float* keys_t, float* s) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (int d = 0; d < kD; ++d) {
    const __m512 qd = _mm512_set1_ps(q[d]);
    s0 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys_t + d * kKeyTile), s0);
    s1 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys_t + d * kKeyTile + 16), s1);
  }
  _mm512_storeu_ps(s, s0);
  _mm512_storeu_ps(s + 16, s1);
}

// a[0..kD) += sum_i w[i] * values[i, :] over n keys, accumulators in registers.
template <int kD>
ATTNSERVE_TARGET_AVX512 inline void tile_values_avx512(const float* w,
                                                                 const float* values, int n,
                                                                 float* a) {
  constexpr int kVec = kD / 16;
  __m512 acc[kVec];
  for (int c = 0; c < kVec; ++c) acc[c] = _mm512_loadu_ps(a + 16 * c);
  for (int i = 0; i < n; ++i) {
    const __m512 wi = _mm512_set1_ps(w[i]);
    for (int c = 0; c < kVec; ++c) {
      acc[c] = _mm512_fmadd_ps(wi, _mm512_loadu_ps(values + i * kD + 16 * c), acc[c]);
    }
  }
  for (int c = 0; c < kVec; ++c) _mm512_storeu_ps(a + 16 * c, acc[c]);
}
#endif

template <typename scalar_t, int kD, bool kAvx512 = false>
ATTNSERVE_INLINE void prefill_tile_body(const PrefillProblem& p, const QueryTile& tile,
                                        float* scratch) {
  const int D = kD > 0 ? kD : p.D;
  const int G = p.G, rows = tile.n_queries * G;  // row r = query j * G + head h
  float* acc = scratch;                 // [rows, D]
  float* row_max = acc + rows * D;      // [rows]
  float* row_sum = row_max + rows;      // [rows]
  float* keys_t = row_sum + rows;       // [D, kKeyTile]
  float* values = keys_t + D * kKeyTile;  // [kKeyTile, D]
  alignas(64) float s[kKeyTile];
  bool seen[kQueryTile][kKeyTile];

  std::fill(acc, acc + rows * D, 0.f);
  std::fill(row_max, row_max + rows, -INFINITY);
  std::fill(row_sum, row_sum + rows, 0.f);
  const Visibility vis{p, p.block_mask ? p.block_mask + ((int64_t)tile.b * p.Hkv + tile.g) *
                                                            p.mask_qb * p.mask_kb
                                       : nullptr};
  const int32_t* table = p.block_table + tile.b * p.block_table_stride;
  const int q_last = tile.q_pos + tile.n_queries - 1;

  for (int k0 = 0; k0 <= q_last; k0 += kKeyTile) {
    const int n = std::min(kKeyTile, q_last + 1 - k0);
    if (!vis.any_visible(tile.q_pos, q_last, k0, k0 + n - 1)) continue;
    alignas(64) float row[kD > 0 ? kD : 512];
    // K tile transposed to keys_t [D, kKeyTile]; V tile to values [kKeyTile, D] (zero padded).
    const bool one_block = k0 / p.page == (k0 + n - 1) / p.page;
    if (p.key.stride_token == 1 && one_block) {  // vLLM CPU K is already [D, page]
      const scalar_t* base = cache_row<scalar_t>(p.key, table[k0 / p.page], tile.g, k0 % p.page);
      for (int d = 0; d < D; ++d) {
        load_row(base + d * p.key.stride_dim, 1, keys_t + d * kKeyTile, n);
        std::fill(keys_t + d * kKeyTile + n, keys_t + (d + 1) * kKeyTile, 0.f);
      }
    }
    for (int i = 0; i < kKeyTile; ++i) {
      if (i < n) {
        const int pos = k0 + i;
        const int64_t block = table[pos / p.page];
        load_row(cache_row<scalar_t>(p.value, block, tile.g, pos % p.page), p.value.stride_dim,
                 values + i * D, D);
        if (p.key.stride_token == 1 && one_block) continue;
        load_row(cache_row<scalar_t>(p.key, block, tile.g, pos % p.page), p.key.stride_dim, row, D);
      } else {
        std::fill(values + i * D, values + (i + 1) * D, 0.f);
        if (p.key.stride_token == 1 && one_block) continue;
        std::fill(row, row + D, 0.f);
      }
      for (int d = 0; d < D; ++d) keys_t[d * kKeyTile + i] = row[d];
    }
    for (int j = 0; j < tile.n_queries; ++j) {
      for (int i = 0; i < kKeyTile; ++i) seen[j][i] = i < n && vis.visible(tile.q_pos + j, k0 + i);
    }
    for (int j = 0; j < tile.n_queries; ++j) {
      for (int h = 0; h < G; ++h) {
        const int r = j * G + h;
        const float* q = p.query + ((int64_t)(tile.first_row + j) * p.Hq + tile.g * G + h) * D;
#if defined(__x86_64__)
        if constexpr (kAvx512 && kD > 0) {
          tile_scores_avx512<kD>(q, keys_t, s);
        } else
#endif
        {
#pragma omp simd
          for (int i = 0; i < kKeyTile; ++i) s[i] = 0.f;
          for (int d = 0; d < D; ++d) {
            const float qd = q[d];
            const float* kd = keys_t + d * kKeyTile;
#pragma omp simd
            for (int i = 0; i < kKeyTile; ++i) s[i] += qd * kd[i];
          }
        }
        float tile_max = -INFINITY;
        for (int i = 0; i < kKeyTile; ++i) {
          if (seen[j][i]) tile_max = std::max(tile_max, s[i]);
        }
        if (tile_max == -INFINITY) continue;  // nothing visible for this row in the tile
        const float new_max = std::max(row_max[r], tile_max);
        const float rescale = row_max[r] == -INFINITY ? 0.f : exp_nonpositive(row_max[r] - new_max);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < kKeyTile; ++i) {
          s[i] = seen[j][i] ? exp_nonpositive(s[i] - new_max) : 0.f;
          sum += s[i];
        }
        row_sum[r] = row_sum[r] * rescale + sum;
        row_max[r] = new_max;
        float* a = acc + (int64_t)r * D;
        if (rescale != 1.f) {
#pragma omp simd
          for (int d = 0; d < D; ++d) a[d] *= rescale;
        }
#if defined(__x86_64__)
        if constexpr (kAvx512 && kD > 0) {
          tile_values_avx512<kD>(s, values, n, a);
          continue;
        }
#endif
        for (int i = 0; i < n; ++i) {
          const float w = s[i];
          if (w == 0.f) continue;
          const float* v = values + i * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) a[d] += w * v[d];
        }
      }
    }
  }
  for (int j = 0; j < tile.n_queries; ++j) {
    for (int h = 0; h < G; ++h) {
      const int r = j * G + h;
      const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
      float* o = p.out + ((int64_t)(tile.first_row + j) * p.Hq + tile.g * G + h) * D;
      for (int d = 0; d < D; ++d) o[d] = acc[(int64_t)r * D + d] * inv;
    }
  }
}

using PrefillTileFn = void (*)(const PrefillProblem&, const QueryTile&, float*);

template <typename scalar_t, int kD>
void prefill_tile_default(const PrefillProblem& p, const QueryTile& t, float* scratch) {
  prefill_tile_body<scalar_t, kD>(p, t, scratch);
}

#if defined(__x86_64__)
template <typename scalar_t, int kD>
ATTNSERVE_TARGET_AVX2 void prefill_tile_avx2(const PrefillProblem& p, const QueryTile& t,
                                             float* scratch) {
  prefill_tile_body<scalar_t, kD>(p, t, scratch);
}

template <typename scalar_t, int kD>
ATTNSERVE_TARGET_AVX512 void prefill_tile_avx512(const PrefillProblem& p, const QueryTile& t,
                                                 float* scratch) {
  prefill_tile_body<scalar_t, kD, true>(p, t, scratch);
}
#endif

template <typename scalar_t, int kD>
PrefillTileFn prefill_tile_for_cpu() {
  return for_cpu_isa<PrefillTileFn>({
#if defined(__x86_64__)
      .avx512 = prefill_tile_avx512<scalar_t, kD>,
      .avx2 = prefill_tile_avx2<scalar_t, kD>,
#endif
      .baseline = prefill_tile_default<scalar_t, kD>});
}

template <typename scalar_t>
PrefillTileFn pick_kernel(int D) {
  if (D == 64) return prefill_tile_for_cpu<scalar_t, 64>();
  if (D == 128) return prefill_tile_for_cpu<scalar_t, 128>();
  return prefill_tile_for_cpu<scalar_t, 0>();
}

}  // namespace

at::Tensor paged_prefill_attention_cpu(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
    double scale, int64_t n_sink, int64_t window, const std::optional<at::Tensor>& block_mask,
    int64_t mask_block) {
  check_cache(key_cache, "key_cache");
  check_cache(value_cache, "value_cache");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "K/V dtypes differ");
  check_int32(block_table, "block_table");
  check_int32(query_start_loc, "query_start_loc");
  check_int32(seq_lens, "seq_lens");
  const int T = query.size(0), Hq = query.size(1), D = query.size(2);
  const int Hkv = key_cache.size(1), B = seq_lens.size(0);
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup && D <= 512, "unsupported head layout");
  TORCH_CHECK(key_cache.size(3) == D, "head size mismatch");

  const at::Tensor q = (query.to(at::kFloat) * scale).contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor starts = query_start_loc.contiguous(), lens = seq_lens.contiguous();
  at::Tensor mask;
  if (block_mask.has_value()) {
    TORCH_CHECK(mask_block > 0 && block_mask->dim() == 4, "block_mask [B, Hkv, QB, KB]");
    mask = block_mask->to(at::kBool).contiguous();
  }
  at::Tensor out = at::zeros({T, Hq, D}, q.options());
  PrefillProblem problem{q.data_ptr<float>(), out.data_ptr<float>(), make_view(key_cache),
                         make_view(value_cache), table.data_ptr<int32_t>(), table.stride(0),
                         mask.defined() ? mask.data_ptr<bool>() : nullptr,
                         mask.defined() ? mask.size(2) : 0, mask.defined() ? mask.size(3) : 0,
                         (int)std::max<int64_t>(1, mask_block), (int)n_sink, (int)window,
                         Hq, Hkv, Hq / Hkv, D, (int)key_cache.size(2)};

  const int32_t* start_ptr = starts.data_ptr<int32_t>();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  std::vector<QueryTile> tiles;
  for (int b = 0; b < B; ++b) {
    const int qlen = start_ptr[b + 1] - start_ptr[b];
    for (int g = 0; g < Hkv; ++g) {
      for (int j = 0; j < qlen; j += kQueryTile) {
        tiles.push_back({b, g, start_ptr[b] + j, len_ptr[b], len_ptr[b] - qlen + j,
                         std::min(kQueryTile, qlen - j)});
      }
    }
  }
  const PrefillTileFn run_tile = key_cache.scalar_type() == at::kBFloat16
                                     ? pick_kernel<c10::BFloat16>(D)
                                     : pick_kernel<float>(D);
  const int64_t scratch_size = (int64_t)kQueryTile * problem.G * (D + 2) + 2 * D * kKeyTile;
  const int n_tiles = tiles.size();
  // Work bound: every tile's queries against (at most) its causal keys.
  int64_t work = 0;
  for (const QueryTile& t : tiles) work += (int64_t)t.n_queries * (t.q_pos + t.n_queries);
  const int threads = threads_for(work * problem.G * D * 2);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(scratch_size);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < n_tiles; ++i) run_tile(problem, tiles[i], scratch.data());
  }
  return out.to(query.scalar_type());
}

}  // namespace attnserve
