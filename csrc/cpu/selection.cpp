// Block summaries and token selection on CPU: landmark (Quest min/max bound), seer (pooled keys,
// block gate) and top-k by attention mass. Parallel over (sequence, KV head) or over chunks.
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <numeric>
#include <vector>

#include "common.h"
#include "ops.h"

namespace attnserve {
namespace {

struct Chunk {  // one summary slot to recompute: tokens [first, last) of sequence b
  int b, first, last;
  int64_t block;
  int slot;
};

// Chunks touching [start_pos[b], seq_lens[b]) for every b; a summary slot is (block, slot).
std::vector<Chunk> chunks_to_update(const at::Tensor& block_table, const at::Tensor& start_pos,
                                    const at::Tensor& seq_lens, int chunk, int page) {
  const at::Tensor starts = start_pos.contiguous(), lens = seq_lens.contiguous();
  const int32_t* s = starts.data_ptr<int32_t>();
  const int32_t* l = lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  std::vector<Chunk> chunks;
  for (int b = 0; b < starts.size(0); ++b) {
    for (int c = std::max(0, s[b]) / chunk; c * chunk < l[b]; ++c) {
      const int first = c * chunk;
      chunks.push_back({b, first, std::min(first + chunk, (int)l[b]),
                        table[b * block_table.stride(0) + first / page], (first % page) / chunk});
    }
  }
  return chunks;
}

ATTNSERVE_INLINE void store_summary(float x, float* out) { *out = x; }
ATTNSERVE_INLINE void store_summary(float x, c10::BFloat16* out) { *out = c10::BFloat16(x); }

// int8 summaries (landmark on CPU, a quarter of fp32's bytes): a row is D int8 values then their
// fp32 scale (D + 4 bytes), value_d ~ q_d * scale with scale = max_d |x_d| / 127. kmin is rounded
// down and kmax up, so that Quest's score (kmax . P + kmin . N, P >= 0 >= N) stays an upper bound
// of q.k, as it is with exact summaries.
constexpr int kQ8ScaleBytes = 4;

ATTNSERVE_INLINE constexpr int summary_row_width(bool int8_rows, int D) {
  return int8_rows ? D + kQ8ScaleBytes : D;
}

template <typename T>
constexpr bool kInt8Rows = std::is_same_v<T, int8_t>;

ATTNSERVE_INLINE float q8_scale(const int8_t* row, int D) {
  float scale;
  std::memcpy(&scale, row + D, sizeof(float));
  return scale;
}

// What a row's values are multiplied by: its scale for int8 rows, 1 otherwise.
template <typename T>
ATTNSERVE_INLINE float row_scale(const T* row, int D) {
  if constexpr (kInt8Rows<T>) return q8_scale(row, D);
  else return 1.f;
}

void store_q8_row(const float* x, int D, bool round_up, int8_t* out) {
  float largest = 0.f;
  for (int d = 0; d < D; ++d) largest = std::max(largest, std::fabs(x[d]));
  const float scale = largest / 127.f;
  for (int d = 0; d < D; ++d) {
    const float steps = scale > 0.f ? (round_up ? std::ceil(x[d] / scale) : std::floor(x[d] / scale)) : 0.f;
    out[d] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, steps)));
  }
  std::memcpy(out + D, &scale, sizeof(float));
}

// kmin / kmax as out_t (landmark: fp32, or bf16 to halve the bytes each decode step scores);
// kmean (seer) is fp32.
template <typename scalar_t, typename out_t = float>
void summarise_chunks(const at::Tensor& key_cache, const std::vector<Chunk>& chunks,
                      int chunk, out_t* kmin, out_t* kmax, float* kmean) {
  // Output slot (block, head, slot) is [D] at ((block * Hkv + head) * slots + slot) * width.
  const CacheView view = make_view(key_cache);
  const int Hkv = key_cache.size(1), page = key_cache.size(2), D = key_cache.size(3);
  const int slots = page / chunk;
  // seer: (max, min, mean) in one row; landmark: D, or D int8 + their scale
  const int width = kmean ? 3 * D : summary_row_width(kInt8Rows<out_t>, D);
  const int n = chunks.size();
  const int threads = threads_for((int64_t)n * Hkv * chunk * D * 3);
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int i = 0; i < n * Hkv; ++i) {
    const Chunk& c = chunks[i / Hkv];
    const int g = i % Hkv;
    std::vector<float> row(D), lo(D, INFINITY), hi(D, -INFINITY), sum(D, 0.f);
    for (int t = c.first; t < c.last; ++t) {
      load_row(cache_row<scalar_t>(view, c.block, g, t % page), view.stride_dim, row.data(), D);
      for (int d = 0; d < D; ++d) {
        lo[d] = std::min(lo[d], row[d]);
        hi[d] = std::max(hi[d], row[d]);
        sum[d] += row[d];
      }
    }
    const int64_t offset = ((c.block * Hkv + g) * slots + c.slot) * width;
    if (kmean) {  // seer: [max | min | mean]
      float* out = kmean + offset;
      const float inv = 1.f / (c.last - c.first);
      for (int d = 0; d < D; ++d) {
        out[d] = hi[d];
        out[D + d] = lo[d];
        out[2 * D + d] = sum[d] * inv;
      }
    } else if constexpr (kInt8Rows<out_t>) {
      store_q8_row(lo.data(), D, false, kmin + offset);
      store_q8_row(hi.data(), D, true, kmax + offset);
    } else {
      for (int d = 0; d < D; ++d) {
        store_summary(lo[d], kmin + offset + d);
        store_summary(hi[d], kmax + offset + d);
      }
    }
  }
}

// Ascending ids: `forced` + the k best of the others by score (desc; ties: lower id).
std::vector<int> top_with_forced(const std::vector<float>& scores, int k, int forced_a,
                                 int forced_b) {
  const int n = scores.size();
  std::vector<int> others;
  for (int j = 0; j < n; ++j) {
    if (j != forced_a && j != forced_b) others.push_back(j);
  }
  const int keep = std::max(0, std::min<int>(k, others.size()));
  auto better = [&](int a, int b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
  if (keep < (int)others.size()) {  // the keep best in linear time; their order does not matter
    std::nth_element(others.begin(), others.begin() + keep, others.end(), better);
    others.resize(keep);
  }
  if (forced_a >= 0 && forced_a < n) others.push_back(forced_a);
  if (forced_b >= 0 && forced_b < n && forced_b != forced_a) others.push_back(forced_b);
  std::sort(others.begin(), others.end());
  return others;
}

// Tokens of ascending chunks (< seq_len) into out; returns their count (<= K).
int expand_chunks(const std::vector<int>& chunks, int chunk, int seq_len, int K, int32_t* out) {
  int n = 0;
  for (int c : chunks) {
    for (int t = c * chunk; t < std::min((c + 1) * chunk, seq_len) && n < K; ++t) out[n++] = t;
  }
  return n;
}

// Quest's bound of landmark_select folded over the query group: kmax >= kmin, so
// max(q * hi, q * lo) = max(q, 0) * hi + min(q, 0) * lo and
// sum_h sum_d max(q_hd * hi_d, q_hd * lo_d) = hi . P + lo . N with P_d = sum_h max(q_hd, 0),
// N_d = sum_h min(q_hd, 0): two D-long dots per chunk, whatever the group size.
struct LandmarkScoring {
  const void* kmin;  // [num_blocks, Hkv, slots, D] contiguous, fp32 or bf16 (int8: [.., D + 4])
  const void* kmax;
  const int32_t* table_row;  // block_table[b]
  int Hkv, g, slots, chunk, page, D;
};

ATTNSERVE_INLINE float summary_value(const float* p, int d) { return p[d]; }
ATTNSERVE_INLINE float summary_value(const c10::BFloat16* p, int d) {
  return bits_to_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[d]) << 16);
}
ATTNSERVE_INLINE float summary_value(const int8_t* p, int d) { return static_cast<float>(p[d]); }

// Page by page (one block-table lookup per page, its chunks' summaries contiguous); the kmax . P and
// kmin . N sums are scaled by their rows' scales (1 but for int8 rows) at the end.
template <typename summary_t, int kD>
ATTNSERVE_INLINE void landmark_scores_body(const LandmarkScoring& s, const float* pos,
                                           const float* neg, int n_chunks, float* scores) {
  const int D = kD > 0 ? kD : s.D;
  const int width = summary_row_width(kInt8Rows<summary_t>, D);
  const summary_t* kmin = static_cast<const summary_t*>(s.kmin);
  const summary_t* kmax = static_cast<const summary_t*>(s.kmax);
  for (int c0 = 0; c0 < n_chunks; c0 += s.slots) {
    const int64_t offset = (s.table_row[c0 / s.slots] * s.Hkv + s.g) * s.slots * width;
    for (int slot = 0; slot < std::min(s.slots, n_chunks - c0); ++slot) {
      const summary_t* lo = kmin + offset + slot * width;
      const summary_t* hi = kmax + offset + slot * width;
      float upper = 0.f, lower = 0.f;
#pragma omp simd reduction(+ : upper, lower)
      for (int d = 0; d < D; ++d) {
        upper += summary_value(hi, d) * pos[d];
        lower += summary_value(lo, d) * neg[d];
      }
      scores[c0 + slot] = upper * row_scale(hi, D) + lower * row_scale(lo, D);
    }
  }
}

using LandmarkScoresFn = void (*)(const LandmarkScoring&, const float*, const float*, int, float*);

template <typename summary_t, int kD>
void landmark_scores_default(const LandmarkScoring& s, const float* pos, const float* neg,
                             int n_chunks, float* scores) {
  landmark_scores_body<summary_t, kD>(s, pos, neg, n_chunks, scores);
}

#if defined(__x86_64__)
template <typename summary_t, int kD>
ATTNSERVE_TARGET_AVX2 void landmark_scores_avx2(const LandmarkScoring& s, const float* pos,
                                                const float* neg, int n_chunks, float* scores) {
  landmark_scores_body<summary_t, kD>(s, pos, neg, n_chunks, scores);
}

template <typename summary_t, int kD>
ATTNSERVE_TARGET_AVX512 void landmark_scores_avx512(const LandmarkScoring& s, const float* pos,
                                                    const float* neg, int n_chunks,
                                                    float* scores) {
  landmark_scores_body<summary_t, kD>(s, pos, neg, n_chunks, scores);
}
#endif

#if defined(__x86_64__)
// 16 summary values as fp32: bf16 rows (D values), int8 rows (D steps, then their scale).
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE __m512 widen_x16(const uint16_t* x) {
  return bf16x16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
// (gcc 12 warns, where widen_x16 is inlined, about the intrinsics' own _mm512_undefined_* placeholders)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE __m512 widen_x16(const int8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}

// bf16 (E = uint16_t) or int8 (E = int8_t) summaries, kD a multiple of 16: 16 dims per step, the
// kmax . P and kmin . N sums scaled by their rows' scales (1 for bf16) at the end.
template <typename E, int kD>
ATTNSERVE_TARGET_AVX512 void landmark_scores_rows_avx512(const LandmarkScoring& s, const float* pos,
                                                         const float* neg, int n_chunks, float* scores) {
  constexpr int kWidth = summary_row_width(kInt8Rows<E>, kD);
  const E* kmin = static_cast<const E*>(s.kmin);
  const E* kmax = static_cast<const E*>(s.kmax);
  __m512 p[kD / 16], q[kD / 16];
  for (int c = 0; c < kD / 16; ++c) {
    p[c] = _mm512_loadu_ps(pos + 16 * c);
    q[c] = _mm512_loadu_ps(neg + 16 * c);
  }
  const int64_t page_elements = static_cast<int64_t>(s.slots) * kWidth;
  for (int c0 = 0; c0 < n_chunks; c0 += s.slots) {
    const int64_t offset = (s.table_row[c0 / s.slots] * s.Hkv + s.g) * page_elements;
    const int count = std::min(s.slots, n_chunks - c0);
    if (c0 + s.slots < n_chunks) {  // the next page's summaries: scattered blocks defeat the prefetcher
      const int64_t next = (s.table_row[c0 / s.slots + 1] * s.Hkv + s.g) * page_elements;
      for (int64_t e = 0; e < page_elements; e += 64 / sizeof(E)) {
        _mm_prefetch(reinterpret_cast<const char*>(kmin + next + e), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(kmax + next + e), _MM_HINT_T0);
      }
    }
    for (int slot = 0; slot < count; ++slot) {
      const E* lo = kmin + offset + slot * kWidth;
      const E* hi = kmax + offset + slot * kWidth;
      __m512 upper = _mm512_mul_ps(widen_x16(hi), p[0]);
      __m512 lower = _mm512_mul_ps(widen_x16(lo), q[0]);
      for (int c = 1; c < kD / 16; ++c) {
        upper = _mm512_fmadd_ps(widen_x16(hi + 16 * c), p[c], upper);
        lower = _mm512_fmadd_ps(widen_x16(lo + 16 * c), q[c], lower);
      }
      scores[c0 + slot] = _mm512_reduce_add_ps(upper) * row_scale(hi, kD) +
                          _mm512_reduce_add_ps(lower) * row_scale(lo, kD);
    }
  }
}
#pragma GCC diagnostic pop

// The AVX-512 variant: for bf16 and int8 rows of a multiple of 16 dims, the hand-vectorised one.
template <typename summary_t, int kD>
LandmarkScoresFn landmark_scores_avx512_variant() {
  constexpr bool bf16 = std::is_same_v<summary_t, c10::BFloat16>;
  if constexpr ((bf16 || kInt8Rows<summary_t>) && kD > 0 && kD % 16 == 0) {
    using Element = std::conditional_t<bf16, uint16_t, summary_t>;  // bf16 as its bits
    return landmark_scores_rows_avx512<Element, kD>;
  } else {
    return landmark_scores_avx512<summary_t, kD>;
  }
}
#endif

template <typename summary_t, int kD>
LandmarkScoresFn landmark_scores_for_cpu() {
  return for_cpu_isa<LandmarkScoresFn>({
#if defined(__x86_64__)
      .avx512 = landmark_scores_avx512_variant<summary_t, kD>(),
      .avx2 = landmark_scores_avx2<summary_t, kD>,
#endif
      .baseline = landmark_scores_default<summary_t, kD>});
}

template <typename summary_t>
LandmarkScoresFn pick_landmark_scores(int D) {
  if (D == 64) return landmark_scores_for_cpu<summary_t, 64>();
  if (D == 128) return landmark_scores_for_cpu<summary_t, 128>();
  return landmark_scores_for_cpu<summary_t, 0>();
}

// kmin / kmax of landmark: contiguous, the same dtype, fp32, bf16 or int8 (rows of D + 4 bytes),
// [num_blocks, Hkv, slots, width] with width D (int8: D + 4).
void check_landmark_summaries(const at::Tensor& kmin, const at::Tensor& kmax, int64_t Hkv, int64_t D) {
  TORCH_CHECK(kmin.is_contiguous() && kmax.is_contiguous(), "kmin and kmax must be contiguous");
  const at::ScalarType type = kmin.scalar_type();
  TORCH_CHECK(type == kmax.scalar_type() &&
                  (type == at::kFloat || type == at::kBFloat16 || type == at::kChar),
              "kmin and kmax must both be float32, both bfloat16 or both int8, got ", kmin.scalar_type(),
              " and ", kmax.scalar_type());
  const int64_t width = summary_row_width(type == at::kChar, D);
  TORCH_CHECK(kmin.dim() == 4 && kmin.sizes() == kmax.sizes() && kmin.size(1) == Hkv && kmin.size(3) == width,
              "kmin/kmax must be [num_blocks, ", Hkv, ", page / chunk, ", width, "], got ", kmin.sizes());
}

}  // namespace

void landmark_update_summaries_cpu(const at::Tensor& key_cache, const at::Tensor& block_table,
                                   const at::Tensor& start_pos, const at::Tensor& seq_lens,
                                   int64_t chunk, at::Tensor& kmin, at::Tensor& kmax) {
  check_cache(key_cache, "key_cache");
  check_int32(block_table, "block_table");
  check_int32(start_pos, "start_pos");
  check_int32(seq_lens, "seq_lens");
  check_landmark_summaries(kmin, kmax, key_cache.size(1), key_cache.size(3));
  const int page = key_cache.size(2);
  TORCH_CHECK(chunk > 0 && page % chunk == 0, "chunk must divide the page size");
  TORCH_CHECK(kmin.size(2) == page / chunk, "kmin/kmax must have page / chunk slots");
  const at::Tensor table = block_table.contiguous();
  const auto chunks = chunks_to_update(table, start_pos, seq_lens, chunk, page);
  const bool bf16_cache = key_cache.scalar_type() == at::kBFloat16;
  if (kmin.scalar_type() == at::kChar) {
    auto* lo = kmin.data_ptr<int8_t>();
    auto* hi = kmax.data_ptr<int8_t>();
    if (bf16_cache) summarise_chunks<c10::BFloat16>(key_cache, chunks, chunk, lo, hi, nullptr);
    else summarise_chunks<float>(key_cache, chunks, chunk, lo, hi, nullptr);
  } else if (kmin.scalar_type() == at::kBFloat16) {
    auto* lo = kmin.data_ptr<c10::BFloat16>();
    auto* hi = kmax.data_ptr<c10::BFloat16>();
    if (bf16_cache) summarise_chunks<c10::BFloat16>(key_cache, chunks, chunk, lo, hi, nullptr);
    else summarise_chunks<float>(key_cache, chunks, chunk, lo, hi, nullptr);
  } else {
    float* lo = kmin.data_ptr<float>();
    float* hi = kmax.data_ptr<float>();
    if (bf16_cache) summarise_chunks<c10::BFloat16>(key_cache, chunks, chunk, lo, hi, nullptr);
    else summarise_chunks<float>(key_cache, chunks, chunk, lo, hi, nullptr);
  }
}

void seer_pool_keys_cpu(const at::Tensor& key_cache, const at::Tensor& block_table,
                        const at::Tensor& start_pos, const at::Tensor& seq_lens, int64_t pool,
                        at::Tensor& pooled) {
  check_cache(key_cache, "key_cache");
  check_int32(block_table, "block_table");
  check_int32(start_pos, "start_pos");
  check_int32(seq_lens, "seq_lens");
  check_fp32_contiguous(pooled, "pooled");
  const int page = key_cache.size(2);
  TORCH_CHECK(pool > 0 && page % pool == 0, "pool must divide the page size");
  TORCH_CHECK(pooled.dim() == 4 && pooled.size(1) == key_cache.size(1) &&
                  pooled.size(2) == page / pool && pooled.size(3) == 3 * key_cache.size(3),
              "pooled must be [num_blocks, Hkv, page / pool, 3 * D]");
  const at::Tensor table = block_table.contiguous();
  const auto chunks = chunks_to_update(table, start_pos, seq_lens, pool, page);
  if (key_cache.scalar_type() == at::kBFloat16) {
    summarise_chunks<c10::BFloat16>(key_cache, chunks, pool, static_cast<float*>(nullptr),
                                    static_cast<float*>(nullptr), pooled.data_ptr<float>());
  } else {
    summarise_chunks<float>(key_cache, chunks, pool, static_cast<float*>(nullptr),
                            static_cast<float*>(nullptr), pooled.data_ptr<float>());
  }
}

std::tuple<at::Tensor, at::Tensor> landmark_select_cpu(
    const at::Tensor& query, const at::Tensor& kmin, const at::Tensor& kmax,
    const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t chunk, int64_t k_chunks,
    bool group_max) {
  check_int32(block_table, "block_table");
  check_int32(seq_lens, "seq_lens");
  const int B = query.size(0), Hq = query.size(1), D = query.size(2);
  check_landmark_summaries(kmin, kmax, kmin.size(1), D);
  const int Hkv = kmin.size(1), slots = kmin.size(2);
  const int page = slots * chunk, G = Hq / Hkv;
  TORCH_CHECK(Hq % Hkv == 0, "query heads must be a multiple of the summaries' KV heads");
  const int K = std::min<int64_t>((k_chunks + 2) * chunk, block_table.size(1) * (int64_t)page);
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  at::Tensor token_idx = at::zeros({B, Hkv, K}, table.options());
  at::Tensor num_idx = at::zeros({B, Hkv}, table.options());
  const float* q_ptr = q.data_ptr<float>();
  const void* lo_ptr = kmin.data_ptr();
  const void* hi_ptr = kmax.data_ptr();
  const int32_t* table_ptr = table.data_ptr<int32_t>();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  int32_t* idx_ptr = token_idx.data_ptr<int32_t>();
  int32_t* num_ptr = num_idx.data_ptr<int32_t>();
  const int64_t table_stride = table.size(1);
  int64_t work = 0;
  for (int b = 0; b < B; ++b) work += (int64_t)Hkv * D * 2 * ((len_ptr[b] + chunk - 1) / chunk) * (group_max ? G : 1);
  const int threads = threads_for(work);
  const LandmarkScoresFn score_chunks = kmin.scalar_type() == at::kChar       ? pick_landmark_scores<int8_t>(D)
                                         : kmin.scalar_type() == at::kBFloat16 ? pick_landmark_scores<c10::BFloat16>(D)
                                                                               : pick_landmark_scores<float>(D);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int bg = 0; bg < B * Hkv; ++bg) {
    const int b = bg / Hkv, g = bg % Hkv;
    const int seq_len = len_ptr[b];
    const int n_chunks = (seq_len + chunk - 1) / chunk;
    std::vector<float> scores(n_chunks);
    // Query heads [h0, h1) of the group folded into P (positive parts) and N (negative parts).
    const float* q_group = q_ptr + (int64_t)bg * G * D;
    std::vector<float> folded(2 * D);
    float* pos = folded.data();
    float* neg = pos + D;
    const auto fold = [&](int h0, int h1) {
      std::fill(folded.begin(), folded.end(), 0.f);
      for (int h = h0; h < h1; ++h) {
        for (int d = 0; d < D; ++d) {
          pos[d] += std::max(q_group[h * D + d], 0.f);
          neg[d] += std::min(q_group[h * D + d], 0.f);
        }
      }
    };
    const LandmarkScoring scoring{lo_ptr, hi_ptr, table_ptr + b * table_stride, Hkv, g, slots,
                                  (int)chunk, page, D};
    if (!group_max) {  // the sum of the heads' bounds: one scoring of the whole group's fold
      fold(0, G);
      score_chunks(scoring, pos, neg, n_chunks, scores.data());
    } else {  // the max of the heads' bounds: a scoring per head
      std::vector<float> head_scores(n_chunks);
      for (int h = 0; h < G; ++h) {
        fold(h, h + 1);
        score_chunks(scoring, pos, neg, n_chunks, h == 0 ? scores.data() : head_scores.data());
        for (int c = 0; h > 0 && c < n_chunks; ++c) scores[c] = std::max(scores[c], head_scores[c]);
      }
    }
    const auto chosen = n_chunks > 0 ? top_with_forced(scores, k_chunks, 0, n_chunks - 1)
                                     : std::vector<int>{};
    num_ptr[bg] = expand_chunks(chosen, chunk, seq_len, K, idx_ptr + (int64_t)bg * K);
  }
  return {token_idx, num_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seer_select_cpu(
    const at::Tensor& q_gate, const at::Tensor& k_gate, const at::Tensor& num_blocks,
    int64_t pool, const at::Tensor& seq_lens, double threshold, int64_t top_k) {
  check_int32(num_blocks, "num_blocks");
  check_int32(seq_lens, "seq_lens");
  TORCH_CHECK(q_gate.dim() == 3 && k_gate.dim() == 4, "q_gate [B, Hkv, Dg], k_gate [B, Hkv, NB, Dg]");
  const int B = k_gate.size(0), Hkv = k_gate.size(1), NB = k_gate.size(2), Dg = k_gate.size(3);
  const int K = top_k <= 0 ? NB * pool : std::min<int64_t>(top_k + 1, NB) * pool;
  // k_gate may be a strided view (seer's per-block cache gathered by pages): only Dg contiguous
  const at::Tensor q = q_gate.to(at::kFloat).contiguous();
  const at::Tensor k = k_gate.scalar_type() == at::kFloat && k_gate.stride(3) == 1 ? k_gate
                                                                                : k_gate.to(at::kFloat).contiguous();
  const int64_t k_stride_b = k.stride(0), k_stride_h = k.stride(1), k_stride_j = k.stride(2);
  const at::Tensor counts = num_blocks.contiguous(), lens = seq_lens.contiguous();
  const auto index_options = num_blocks.options();
  at::Tensor token_idx = at::zeros({B, Hkv, K}, index_options);
  at::Tensor num_idx = at::zeros({B, Hkv}, index_options);
  at::Tensor probs = at::zeros({B, Hkv, NB}, q.options());
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k.data_ptr<float>();
  const int32_t* count_ptr = counts.data_ptr<int32_t>();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  int32_t* idx_ptr = token_idx.data_ptr<int32_t>();
  int32_t* num_ptr = num_idx.data_ptr<int32_t>();
  float* prob_ptr = probs.data_ptr<float>();
  const float inv_sqrt = 1.f / std::sqrt((float)Dg);
  const int threads = threads_for((int64_t)B * Hkv * NB * (Dg + 16));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int bg = 0; bg < B * Hkv; ++bg) {
    const int b = bg / Hkv;
    const int nb = std::min(count_ptr[b], NB);
    if (nb <= 0) continue;
    const float* qv = q_ptr + (int64_t)bg * Dg;
    std::vector<float> p(nb);
    float max_logit = -INFINITY;
    for (int j = 0; j < nb; ++j) {
      const float* kv = k_ptr + b * k_stride_b + (bg % Hkv) * k_stride_h + j * k_stride_j;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int d = 0; d < Dg; ++d) dot += qv[d] * kv[d];
      p[j] = dot * inv_sqrt;
      max_logit = std::max(max_logit, p[j]);
    }
    float sum = 0.f;
    for (int j = 0; j < nb; ++j) sum += (p[j] = std::exp(p[j] - max_logit));
    for (int j = 0; j < nb; ++j) prob_ptr[(int64_t)bg * NB + j] = (p[j] /= sum);
    std::vector<int> chosen;
    if (top_k <= 0) {
      for (int j = 0; j < nb; ++j) {
        if (p[j] >= threshold || j == nb - 1) chosen.push_back(j);
      }
    } else {
      chosen = top_with_forced(p, top_k, nb - 1, -1);
    }
    num_ptr[bg] = expand_chunks(chosen, pool, len_ptr[b], K, idx_ptr + (int64_t)bg * K);
  }
  return {token_idx, num_idx, probs};
}

namespace {

// Order-preserving map of a float to uint32 (negative values below positive ones) and back.
ATTNSERVE_INLINE uint32_t order_key(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}
ATTNSERVE_INLINE float from_order_key(uint32_t key) {
  return __builtin_bit_cast(float, key & 0x80000000u ? key & 0x7FFFFFFFu : ~key);
}

// The keep-th largest of w[0, n) (1 <= keep <= n; no NaN): a radix select on the order keys,
// 11 + 11 + 10 bits, each pass over the candidates left by the previous one (O(n), no sort).
float kth_largest(const float* w, int n, int keep) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kBins[3] = {2048, 2048, 1024};
  std::vector<uint32_t> candidates(n);
  for (int i = 0; i < n; ++i) candidates[i] = order_key(w[i]);
  int count = n, needed = keep;  // the keep-th largest is the needed-th largest candidate
  uint32_t prefix = 0;
  uint32_t histogram[2048];
  for (int pass = 0; pass < 3; ++pass) {
    const uint32_t bins = kBins[pass];
    std::fill(histogram, histogram + bins, 0u);
    for (int i = 0; i < count; ++i) ++histogram[(candidates[i] >> kShift[pass]) & (bins - 1)];
    uint32_t bin = bins - 1;
    for (;; --bin) {  // from the top: the bin holding the needed-th largest
      if (histogram[bin] >= static_cast<uint32_t>(needed)) break;
      needed -= histogram[bin];
    }
    prefix |= bin << kShift[pass];
    int kept = 0;
    for (int i = 0; i < count; ++i) {
      if (((candidates[i] >> kShift[pass]) & (bins - 1)) == bin) candidates[kept++] = candidates[i];
    }
    count = kept;
  }
  return from_order_key(prefix);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_from_mass_cpu(const at::Tensor& mass,
                                                      const at::Tensor& token_idx,
                                                      const at::Tensor& num_idx, int64_t k) {
  check_int32(token_idx, "token_idx");
  check_int32(num_idx, "num_idx");
  const int B = token_idx.size(0), Hkv = token_idx.size(1), K = token_idx.size(2);
  TORCH_CHECK(k >= 0, "k must be >= 0");
  const at::Tensor m = mass.to(at::kFloat).contiguous();
  const at::Tensor idx = token_idx.contiguous(), counts = num_idx.contiguous();
  at::Tensor sel_idx = at::zeros({B, Hkv, k}, idx.options());
  at::Tensor sel_num = at::zeros({B, Hkv}, idx.options());
  const float* m_ptr = m.data_ptr<float>();
  const int32_t* idx_ptr = idx.data_ptr<int32_t>();
  const int32_t* count_ptr = counts.data_ptr<int32_t>();
  int32_t* out_ptr = sel_idx.data_ptr<int32_t>();
  int32_t* out_num = sel_num.data_ptr<int32_t>();
  const int threads = threads_for((int64_t)B * Hkv * K * 16);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int bg = 0; bg < B * Hkv; ++bg) {
    const int n = std::max(0, std::min(count_ptr[bg], K));
    const float* w = m_ptr + (int64_t)bg * K;
    const int32_t* pos = idx_ptr + (int64_t)bg * K;
    const int keep = std::min<int64_t>(k, n);
    int32_t* out = out_ptr + (int64_t)bg * k;
    // The `keep` heaviest in the strict order (mass descending, then position ascending): every
    // entry above the keep-th largest mass, then the threshold's ties by position. One O(n)
    // nth_element over a copy of the masses (contiguous, no index indirection).
    int taken = 0;
    if (keep == n) {
      for (int i = 0; i < n; ++i) out[taken++] = pos[i];
      std::sort(out, out + keep);
    } else if (keep > 0) {
      const float threshold = kth_largest(w, n, keep);
      int above = 0;
      for (int i = 0; i < n; ++i) above += w[i] > threshold;
      bool ascending = true;
      for (int i = 1; i < n && ascending; ++i) ascending = pos[i] > pos[i - 1];
      if (ascending) {  // the usual case (dense positions): one pass, output already in order
        int ties_left = keep - above;
        for (int i = 0; i < n; ++i) {
          if (w[i] > threshold || (w[i] == threshold && ties_left-- > 0)) out[taken++] = pos[i];
        }
      } else {
        std::vector<int32_t> ties;
        for (int i = 0; i < n; ++i) {
          if (w[i] > threshold) {
            out[taken++] = pos[i];
          } else if (w[i] == threshold) {
            ties.push_back(pos[i]);
          }
        }
        const int from_ties = keep - taken;
        std::nth_element(ties.begin(), ties.begin() + (from_ties - 1), ties.end());
        std::copy(ties.begin(), ties.begin() + from_ties, out + taken);
        std::sort(out, out + keep);
      }
    }
    out_num[bg] = keep;
  }
  return {sel_idx, sel_num};
}

}  // namespace attnserve
