// sparse_paged_attention on CPU: decode attention of one query per sequence over selected tokens.
//
// Work item = (sequence b, KV head g, token range [begin, end) of token_idx[b, g]). The G query
// heads of g are processed together, so each K/V row is read once. Long index lists are split
// into partitions (flash-decoding); partial (max, sum, acc) are merged in a second pass.
// Inside a partition: tiles of kTile tokens: scores of the tile, one online-softmax rescale per
// tile, then P @ V.
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace attnserve {
namespace {

constexpr int kTile = 64;
constexpr int kMaxGroup = 32;
constexpr int kMinPartition = 256;

struct DecodeProblem {
  const float* query;        // [B, Hq, D] fp32, pre-scaled by `scale`
  CacheView key, value;
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* token_idx;  // [B, Hkv, K]
  int Hkv, G, D, K, page;
  int page_shift;            // log2(page) when page is a power of two, else -1
  float* logits;             // [B, Hkv, G, K] raw scaled scores, or nullptr
};

struct Partial {  // one work item's unnormalised result: m [G], l [G], acc [G, D]
  float* m;
  float* l;
  float* acc;
};

template <typename scalar_t, int kD>
ATTNSERVE_INLINE void attend_range_body(const DecodeProblem& p, int b, int g, int begin, int end,
                                        Partial out) {
  const int D = kD > 0 ? kD : p.D;
  const int G = p.G;
  const float* q = p.query + (static_cast<int64_t>(b) * p.Hkv + g) * G * D;  // [G, D]
  const int32_t* idx = p.token_idx + (static_cast<int64_t>(b) * p.Hkv + g) * p.K;
  const int32_t* table = p.block_table + b * p.block_table_stride;
  float* logits = p.logits ? p.logits + (static_cast<int64_t>(b) * p.Hkv + g) * G * p.K : nullptr;

  float scores[kMaxGroup][kTile];
  alignas(64) float row[kD > 0 ? kD : 512];
  const scalar_t* keys[kTile];
  const scalar_t* values[kTile];

  for (int h = 0; h < G; ++h) {
    out.m[h] = -INFINITY;
    out.l[h] = 0.f;
    std::fill(out.acc + h * D, out.acc + (h + 1) * D, 0.f);
  }
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int n = std::min(kTile, end - t0);
    for (int i = 0; i < n; ++i) {
      const int pos = idx[t0 + i];
      const bool pow2 = p.page_shift >= 0;
      const int64_t block = table[pow2 ? pos >> p.page_shift : pos / p.page];
      const int offset = pow2 ? pos & (p.page - 1) : pos % p.page;
      keys[i] = cache_row<scalar_t>(p.key, block, g, offset);
      values[i] = cache_row<scalar_t>(p.value, block, g, offset);
    }
    if (p.key.stride_dim == 1) {  // K rows contiguous: one row, G dot products
      for (int i = 0; i < n; ++i) {
        load_row(keys[i], 1, row, D);
        for (int h = 0; h < G; ++h) {
          const float* qh = q + h * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < D; ++d) dot += qh[d] * row[d];
          scores[h][i] = dot;
        }
      }
    } else {  // K transposed (vLLM CPU): runs of consecutive tokens in one block, vectorised over tokens
      for (int h = 0; h < G; ++h) std::fill(scores[h], scores[h] + n, 0.f);
      const int64_t sd = p.key.stride_dim, st = p.key.stride_token;
      for (int i = 0; i < n;) {
        int j = i + 1;
        while (j < n && idx[t0 + j] == idx[t0 + j - 1] + 1 && keys[j] == keys[j - 1] + 1) ++j;
        const int run = j - i;
        alignas(64) float k_d[kTile];
        for (int d = 0; d < D; ++d) {
          load_row(keys[i] + d * sd, st, k_d, run);
          for (int h = 0; h < G; ++h) {
            const float qd = q[h * D + d];
            float* s = scores[h] + i;
#pragma omp simd
            for (int r = 0; r < run; ++r) s[r] += qd * k_d[r];
          }
        }
        i = j;
      }
    }
    for (int h = 0; h < G; ++h) {
      float* s = scores[h];
      if (logits) std::copy(s, s + n, logits + h * p.K + t0);
      float tile_max = -INFINITY;
#pragma omp simd reduction(max : tile_max)
      for (int i = 0; i < n; ++i) tile_max = std::max(tile_max, s[i]);
      const float new_max = std::max(out.m[h], tile_max);
      const float rescale = out.m[h] == -INFINITY ? 0.f : exp_nonpositive(out.m[h] - new_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < n; ++i) {
        s[i] = exp_nonpositive(s[i] - new_max);
        sum += s[i];
      }
      out.l[h] = out.l[h] * rescale + sum;
      out.m[h] = new_max;
      if (rescale != 1.f) {
        float* acc = out.acc + h * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) acc[d] *= rescale;
      }
    }
    for (int i = 0; i < n; ++i) {
      load_row(values[i], p.value.stride_dim, row, D);
      for (int h = 0; h < G; ++h) {
        float* acc = out.acc + h * D;
        const float w = scores[h][i];
#pragma omp simd
        for (int d = 0; d < D; ++d) acc[d] += w * row[d];
      }
    }
  }
}

using AttendRangeFn = void (*)(const DecodeProblem&, int, int, int, int, Partial);

template <typename scalar_t, int kD>
void attend_range_default(const DecodeProblem& p, int b, int g, int begin, int end, Partial out) {
  attend_range_body<scalar_t, kD>(p, b, g, begin, end, out);
}

#if defined(__x86_64__)
template <typename scalar_t, int kD>
ATTNSERVE_TARGET_AVX2 void attend_range_avx2(const DecodeProblem& p, int b, int g, int begin,
                                             int end, Partial out) {
  attend_range_body<scalar_t, kD>(p, b, g, begin, end, out);
}

template <typename scalar_t, int kD>
ATTNSERVE_TARGET_AVX512 void attend_range_avx512(const DecodeProblem& p, int b, int g, int begin,
                                                 int end, Partial out) {
  attend_range_body<scalar_t, kD>(p, b, g, begin, end, out);
}
#endif

#if defined(__x86_64__)
// AVX-512 path for vLLM's CPU bf16 layout: K transposed per block (token stride 1), V rows.
// Scores are vectorised over 16 consecutive tokens of a run (no horizontal sums); P @ V keeps the
// accumulators of up to kHeads query heads in registers across the tile.

ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE __m512 bf16x16_to_fp32(__m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// scores[h0 + hh][r0 .. r0 + 16) (masked) = q[h0 + hh] . K[token, :] for kH heads.
template <int kD, int kH>
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE void score_run_avx512(
    const uint16_t* k_t, int64_t stride_dim, __mmask16 mask, const float* q_heads,
    float (*scores)[kTile], int h0, int r0) {
  __m512 acc[kH];
  for (int hh = 0; hh < kH; ++hh) acc[hh] = _mm512_setzero_ps();
  for (int d = 0; d < kD; ++d) {
    const __m512 k = bf16x16_to_fp32(_mm256_maskz_loadu_epi16(mask, k_t + d * stride_dim));
    for (int hh = 0; hh < kH; ++hh) {
      acc[hh] = _mm512_fmadd_ps(_mm512_set1_ps(q_heads[hh * kD + d]), k, acc[hh]);
    }
  }
  for (int hh = 0; hh < kH; ++hh) _mm512_mask_storeu_ps(scores[h0 + hh] + r0, mask, acc[hh]);
}

// acc[h0 + hh] += sum_i scores[h0 + hh][i] * V[i] for kH heads over the n tokens of the tile.
template <int kD, int kH>
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE void accumulate_values_avx512(
    const uint16_t* const* values, int n, float (*scores)[kTile], float* acc_rows, int h0) {
  constexpr int kVec = kD / 16;
  __m512 acc[kH][kVec];
  for (int hh = 0; hh < kH; ++hh)
    for (int c = 0; c < kVec; ++c) acc[hh][c] = _mm512_loadu_ps(acc_rows + (h0 + hh) * kD + 16 * c);
  for (int i = 0; i < n; ++i) {
    __m512 v[kVec];
    for (int c = 0; c < kVec; ++c) {
      v[c] = bf16x16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values[i] + 16 * c)));
    }
    for (int hh = 0; hh < kH; ++hh) {
      const __m512 w = _mm512_set1_ps(scores[h0 + hh][i]);
      for (int c = 0; c < kVec; ++c) acc[hh][c] = _mm512_fmadd_ps(w, v[c], acc[hh][c]);
    }
  }
  for (int hh = 0; hh < kH; ++hh)
    for (int c = 0; c < kVec; ++c) _mm512_storeu_ps(acc_rows + (h0 + hh) * kD + 16 * c, acc[hh][c]);
}

template <int kD>
ATTNSERVE_TARGET_AVX512 void attend_range_bf16_kt_avx512(const DecodeProblem& p, int b, int g,
                                                         int begin, int end, Partial out) {
  constexpr int kValueHeads = kD == 64 ? 4 : 2;  // kValueHeads * kD / 16 <= 16 accumulators
  const int G = p.G;
  const float* q = p.query + (static_cast<int64_t>(b) * p.Hkv + g) * G * kD;  // [G, kD]
  const int32_t* idx = p.token_idx + (static_cast<int64_t>(b) * p.Hkv + g) * p.K;
  const int32_t* table = p.block_table + b * p.block_table_stride;
  float* logits = p.logits ? p.logits + (static_cast<int64_t>(b) * p.Hkv + g) * G * p.K : nullptr;
  alignas(64) float scores[kMaxGroup][kTile];
  const uint16_t* keys[kTile];
  const uint16_t* values[kTile];
  const int64_t stride_dim = p.key.stride_dim;

  for (int h = 0; h < G; ++h) {
    out.m[h] = -INFINITY;
    out.l[h] = 0.f;
    std::fill(out.acc + h * kD, out.acc + (h + 1) * kD, 0.f);
  }
  // Rows of tile t0 into keys / values. Where the tile's tokens are runs shorter than a tile
  // (landmark chunks, scattered tokens), the next tile's K lines (one per head dim per run) and V
  // rows are prefetched while this one computes: the hardware prefetcher does not follow them.
  const uint16_t* next_keys[kTile];
  const uint16_t* next_values[kTile];
  auto rows_of_tile = [&](int t0, const uint16_t** k_rows, const uint16_t** v_rows) {
    const int n = std::min(kTile, end - t0);
    const bool pow2 = p.page_shift >= 0;
    for (int i = 0; i < n; ++i) {
      const int pos = idx[t0 + i];
      const int64_t block = table[pow2 ? pos >> p.page_shift : pos / p.page];
      const int offset = pow2 ? pos & (p.page - 1) : pos % p.page;
      k_rows[i] = reinterpret_cast<const uint16_t*>(
          cache_row<c10::BFloat16>(p.key, block, g, offset));
      v_rows[i] = reinterpret_cast<const uint16_t*>(
          cache_row<c10::BFloat16>(p.value, block, g, offset));
    }
  };
  auto prefetch_tile = [&](int t0, const uint16_t* const* k_rows, const uint16_t* const* v_rows) {
    const int n = std::min(kTile, end - t0);
    int runs = 1;
    for (int i = 1; i < n; ++i) runs += k_rows[i] != k_rows[i - 1] + 1;
    if (runs == 1) return;  // one long run: the hardware prefetcher streams it
    for (int i = 0; i < n; ++i) {
      if (i == 0 || k_rows[i] != k_rows[i - 1] + 1) {
        for (int d = 0; d < kD; ++d) __builtin_prefetch(k_rows[i] + d * stride_dim);
      }
      for (int c = 0; c < kD * 2; c += 64) __builtin_prefetch(reinterpret_cast<const char*>(v_rows[i]) + c);
    }
  };
  if (begin < end) rows_of_tile(begin, next_keys, next_values);
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int n = std::min(kTile, end - t0);
    std::copy(next_keys, next_keys + n, keys);
    std::copy(next_values, next_values + n, values);
    if (t0 + kTile < end) {
      rows_of_tile(t0 + kTile, next_keys, next_values);
      prefetch_tile(t0 + kTile, next_keys, next_values);
    }
    for (int i = 0; i < n;) {  // runs of consecutive tokens inside one block
      int j = i + 1;
      while (j < n && idx[t0 + j] == idx[t0 + j - 1] + 1 && keys[j] == keys[j - 1] + 1) ++j;
      for (int r0 = i; r0 < j; r0 += 16) {
        const int len = std::min(16, j - r0);
        const __mmask16 mask = static_cast<__mmask16>((1u << len) - 1);
        const uint16_t* k_t = keys[i] + (r0 - i);
        for (int h0 = 0; h0 < G; h0 += 4) {
          const float* qh = q + h0 * kD;
          switch (std::min(4, G - h0)) {
            case 1: score_run_avx512<kD, 1>(k_t, stride_dim, mask, qh, scores, h0, r0); break;
            case 2: score_run_avx512<kD, 2>(k_t, stride_dim, mask, qh, scores, h0, r0); break;
            case 3: score_run_avx512<kD, 3>(k_t, stride_dim, mask, qh, scores, h0, r0); break;
            default: score_run_avx512<kD, 4>(k_t, stride_dim, mask, qh, scores, h0, r0); break;
          }
        }
      }
      i = j;
    }
    for (int h = 0; h < G; ++h) {  // online softmax, one rescale per tile
      float* s = scores[h];
      if (logits) std::copy(s, s + n, logits + h * p.K + t0);
      float tile_max = -INFINITY;
#pragma omp simd reduction(max : tile_max)
      for (int i = 0; i < n; ++i) tile_max = std::max(tile_max, s[i]);
      const float new_max = std::max(out.m[h], tile_max);
      const float rescale = out.m[h] == -INFINITY ? 0.f : exp_nonpositive(out.m[h] - new_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < n; ++i) {
        s[i] = exp_nonpositive(s[i] - new_max);
        sum += s[i];
      }
      out.l[h] = out.l[h] * rescale + sum;
      out.m[h] = new_max;
      if (rescale != 1.f) {
        float* acc = out.acc + h * kD;
#pragma omp simd
        for (int d = 0; d < kD; ++d) acc[d] *= rescale;
      }
    }
    for (int h0 = 0; h0 < G; h0 += kValueHeads) {
      switch (std::min(kValueHeads, G - h0)) {
        case 1: accumulate_values_avx512<kD, 1>(values, n, scores, out.acc, h0); break;
        case 2: accumulate_values_avx512<kD, 2>(values, n, scores, out.acc, h0); break;
        case 3: accumulate_values_avx512<kD, kValueHeads >= 3 ? 3 : 2>(values, n, scores, out.acc, h0); break;
        default: accumulate_values_avx512<kD, kValueHeads>(values, n, scores, out.acc, h0); break;
      }
    }
  }
}
#endif

template <typename scalar_t, int kD>
AttendRangeFn pick_isa() {
#if defined(__x86_64__)
  switch (cpu_isa()) {
    case Isa::kAvx512: return attend_range_avx512<scalar_t, kD>;
    case Isa::kAvx2: return attend_range_avx2<scalar_t, kD>;
    default: break;
  }
#endif
  return attend_range_default<scalar_t, kD>;
}

template <typename scalar_t>
AttendRangeFn pick_kernel(int D, const at::Tensor& key_cache, const at::Tensor& value_cache) {
#if defined(__x86_64__)
  // vLLM's CPU layout (bf16, K token-contiguous, V rows): the hand-vectorised path
  if (std::is_same_v<scalar_t, c10::BFloat16> && cpu_isa() == Isa::kAvx512 &&
      key_cache.stride(2) == 1 && value_cache.stride(3) == 1) {
    if (D == 64) return attend_range_bf16_kt_avx512<64>;
    if (D == 128) return attend_range_bf16_kt_avx512<128>;
  }
#endif
  if (D == 64) return pick_isa<scalar_t, 64>();
  if (D == 128) return pick_isa<scalar_t, 128>();
  return pick_isa<scalar_t, 0>();
}

// mass[j] += exp(logits[j] - max) * inv_sum, j < n: the probabilities of one query head. Compiled
// per ISA: at the baseline (SSE2) exp_nonpositive's rint is a libm call, ~10x slower.
ATTNSERVE_INLINE void add_probabilities_body(const float* logits, int n, float max, float inv_sum,
                                             float* mass) {
#pragma omp simd
  for (int j = 0; j < n; ++j) mass[j] += exp_nonpositive(logits[j] - max) * inv_sum;
}

#if defined(__x86_64__)
ATTNSERVE_TARGET_AVX512 void add_probabilities_avx512(const float* logits, int n, float max,
                                                      float inv_sum, float* mass) {
  add_probabilities_body(logits, n, max, inv_sum, mass);
}

ATTNSERVE_TARGET_AVX2 void add_probabilities_avx2(const float* logits, int n, float max,
                                                  float inv_sum, float* mass) {
  add_probabilities_body(logits, n, max, inv_sum, mass);
}
#endif

void add_probabilities(const float* logits, int n, float max, float inv_sum, float* mass) {
#if defined(__x86_64__)
  switch (cpu_isa()) {
    case Isa::kAvx512: return add_probabilities_avx512(logits, n, max, inv_sum, mass);
    case Isa::kAvx2: return add_probabilities_avx2(logits, n, max, inv_sum, mass);
    default: break;
  }
#endif
  add_probabilities_body(logits, n, max, inv_sum, mass);
}

struct WorkItem {
  int b, g, begin, end, partial;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_paged_attention_cpu(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& token_idx, const at::Tensor& num_idx,
    double scale, bool want_mass) {
  check_cache(key_cache, "key_cache");
  check_cache(value_cache, "value_cache");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "K/V dtypes differ");
  check_int32(block_table, "block_table");
  check_int32(token_idx, "token_idx");
  check_int32(num_idx, "num_idx");
  TORCH_CHECK(query.dim() == 3 && token_idx.dim() == 3 && num_idx.dim() == 2, "bad ranks");
  const int B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int Hkv = key_cache.size(1), page = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && value_cache.size(3) == D, "head size mismatch");
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, "Hq must be a multiple of Hkv, G <= 32");
  TORCH_CHECK(D <= 512, "head size <= 512");
  TORCH_CHECK(token_idx.size(0) == B && token_idx.size(1) == Hkv, "token_idx must be [B, Hkv, K]");
  const int G = Hq / Hkv, K = token_idx.size(2);

  const at::Tensor q = (query.to(at::kFloat) * scale).contiguous();
  const at::Tensor idx = token_idx.contiguous();
  const at::Tensor counts = num_idx.contiguous();
  const at::Tensor table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  at::Tensor logits = want_mass ? at::empty({B, Hkv, G, K}, q.options()) : at::Tensor();

  // Partition so that batch 1 still gives every thread work.
  const int32_t* count_ptr = counts.data_ptr<int32_t>();
  int64_t total = 0;
  for (int i = 0; i < B * Hkv; ++i) total += std::max(0, std::min(count_ptr[i], K));
  // ~ total * G * D * 2 multiply-adds (scores and P @ V)
  const int threads = threads_for(total * G * D * 2);
  int partition = static_cast<int>((total + 4 * threads - 1) / (4 * threads));
  partition = std::max(kMinPartition, (partition + kTile - 1) / kTile * kTile);

  std::vector<WorkItem> items;
  std::vector<int> first_item(B * Hkv + 1);
  for (int b = 0; b < B; ++b) {
    for (int g = 0; g < Hkv; ++g) {
      const int n = std::max(0, std::min(count_ptr[b * Hkv + g], K));
      first_item[b * Hkv + g] = items.size();
      for (int begin = 0; begin < n; begin += partition) {
        items.push_back({b, g, begin, std::min(n, begin + partition), (int)items.size()});
      }
    }
  }
  first_item[B * Hkv] = items.size();
  const int64_t partial_stride = static_cast<int64_t>(G) * (D + 2);
  std::vector<float> partials(std::max<size_t>(1, items.size() * partial_stride));

  DecodeProblem problem{q.data_ptr<float>(), make_view(key_cache), make_view(value_cache),
                        table.data_ptr<int32_t>(), table.stride(0), idx.data_ptr<int32_t>(),
                        Hkv, G, D, K, page, (page & (page - 1)) == 0 ? __builtin_ctz(page) : -1,
                        want_mass ? logits.data_ptr<float>() : nullptr};
  const AttendRangeFn attend = key_cache.scalar_type() == at::kBFloat16
                                   ? pick_kernel<c10::BFloat16>(D, key_cache, value_cache)
                                   : pick_kernel<float>(D, key_cache, value_cache);
  auto partial_of = [&](int item) {
    float* base = partials.data() + item * partial_stride;
    return Partial{base, base + G, base + 2 * G};
  };

  const int n_items = items.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int i = 0; i < n_items; ++i) {
    const WorkItem& w = items[i];
    attend(problem, w.b, w.g, w.begin, w.end, partial_of(w.partial));
  }

  // Merge partitions: out_h = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  at::Tensor mass = want_mass ? at::zeros({B, Hkv, K}, q.options())
                              : at::empty({0}, q.options());
  float* out_ptr = out.data_ptr<float>();
  float* mass_ptr = want_mass ? mass.data_ptr<float>() : nullptr;
  float* logit_ptr = problem.logits;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int bg = 0; bg < B * Hkv; ++bg) {
    std::vector<float> row_max(G, -INFINITY), row_sum(G, 0.f);
    float* o = out_ptr + static_cast<int64_t>(bg) * G * D;  // [G, D] of head group bg
    std::fill(o, o + G * D, 0.f);
    for (int it = first_item[bg]; it < first_item[bg + 1]; ++it) {
      const Partial part = partial_of(it);
      for (int h = 0; h < G; ++h) row_max[h] = std::max(row_max[h], part.m[h]);
    }
    for (int it = first_item[bg]; it < first_item[bg + 1]; ++it) {
      const Partial part = partial_of(it);
      for (int h = 0; h < G; ++h) {
        const float w = std::exp(part.m[h] - row_max[h]);
        row_sum[h] += w * part.l[h];
        for (int d = 0; d < D; ++d) o[h * D + d] += w * part.acc[h * D + d];
      }
    }
    for (int h = 0; h < G; ++h) {
      const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
      for (int d = 0; d < D; ++d) o[h * D + d] *= inv;
    }
    if (mass_ptr) {
      const int n = std::max(0, std::min(count_ptr[bg], K));
      float* m = mass_ptr + static_cast<int64_t>(bg) * K;
      for (int h = 0; h < G; ++h) {
        const float* s = logit_ptr + (static_cast<int64_t>(bg) * G + h) * K;
        const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
        add_probabilities(s, n, row_max[h], inv, m);
      }
    }
  }
  return {out.to(query.scalar_type()), mass};
}

}  // namespace attnserve
