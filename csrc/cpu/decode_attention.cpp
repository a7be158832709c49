// sparse_paged_attention on CPU: decode attention of one query per sequence over selected tokens.
//
// Work item = (sequence b, KV head g, token range [begin, end) of token_idx[b, g]). The G query
// heads of g are processed together, so each K/V row is read once. Long index lists are split
// into partitions (flash-decoding); partial (max, sum, acc) are merged in a second pass.
// Inside a partition: tiles of kTile tokens: scores of the tile, one online-softmax rescale per
// tile, then P @ V.
#include <omp.h>
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
  const float* query;        // [B, Hq, D] fp32, pre-scaled by `scale` (nullptr on the bf16-dot path)
  const uint32_t* query_pairs;  // [B, Hq, D / 2] the bf16 query as (d, d + 1) pairs, unscaled (bf16-dot path)
  float scale;               // applied to the scores on the bf16-dot path
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

ATTNSERVE_INLINE void clear_partial(Partial out, int G, int D) {
  for (int h = 0; h < G; ++h) {
    out.m[h] = -INFINITY;
    out.l[h] = 0.f;
    std::fill(out.acc + h * D, out.acc + (h + 1) * D, 0.f);
  }
}

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

  clear_partial(out, G, D);
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
// AVX-512 paths for vLLM's CPU bf16 layout: K transposed per block (token stride 1), V rows.
// A tile's tokens are cut into pieces of up to 16 consecutive tokens of one page; scores are
// vectorised over a piece's tokens (no horizontal sums), four pieces per pass so that the
// accumulators form independent FMA chains; P @ V keeps up to kValueHeads heads' accumulators in
// registers across the tile. Two variants: fp32 FMAs (any query dtype), and, where the CPU has
// AVX512_BF16 and the query is bf16, bf16 dot products (vdpbf16ps: two bf16 products per fp32
// lane, exact products, fp32 sums) for q.K and for P @ V with P rounded to bf16 as FlashAttention
// does, half the instructions and no bf16 -> fp32 conversions.

struct Piece {
  const uint16_t* k;  // K of the piece's first token at head dim 0
  __mmask16 mask;     // its tokens
  int r0;             // its first token's column in the tile's scores
};
constexpr int kPiecesPerPass = 4;

// Rows and pieces of one tile (tokens [t0, t0 + n) of a work item's index list).
struct TileRows {
  const uint16_t* keys[kTile];
  const uint16_t* values[kTile];
  Piece pieces[kTile + kPiecesPerPass];
  int n_pieces;  // a multiple of kPiecesPerPass: the last pass is padded with empty pieces
};

ATTNSERVE_INLINE void cut_tile(const DecodeProblem& p, const int32_t* idx, const int32_t* table, int g,
                               int n, TileRows& tile) {
  const bool pow2 = p.page_shift >= 0;
  int count = 0, run_start = 0;
  for (int i = 0; i < n; ++i) {
    const int pos = idx[i];
    const int64_t block = table[pow2 ? pos >> p.page_shift : pos / p.page];
    const int offset = pow2 ? pos & (p.page - 1) : pos % p.page;
    tile.keys[i] = reinterpret_cast<const uint16_t*>(cache_row<c10::BFloat16>(p.key, block, g, offset));
    tile.values[i] = reinterpret_cast<const uint16_t*>(cache_row<c10::BFloat16>(p.value, block, g, offset));
    // a piece ends before a token that does not follow its predecessor in the same page
    if (i > 0 && (i - run_start == 16 || pos != idx[i - 1] + 1 || tile.keys[i] != tile.keys[i - 1] + 1)) {
      tile.pieces[count++] = Piece{tile.keys[run_start], static_cast<__mmask16>((1u << (i - run_start)) - 1),
                                   run_start};
      run_start = i;
    }
  }
  tile.pieces[count++] = Piece{tile.keys[run_start], static_cast<__mmask16>((1u << (n - run_start)) - 1),
                               run_start};
  const int padded = (count + kPiecesPerPass - 1) / kPiecesPerPass * kPiecesPerPass;
  for (int c = count; c < padded; ++c) tile.pieces[c] = Piece{tile.keys[0], 0, 0};
  tile.n_pieces = padded;
}

// exp(x) for x <= 0, 16 lanes: exp_nonpositive (common.h) vectorised.
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE __m512 exp_nonpositive_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 poly = _mm512_set1_ps(1.535336188319500e-4f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.339887440266574e-3f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.618437357674640e-3f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.550332471162809e-2f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.402264791363012e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.931472028550421e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
  const __m512i exponent =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(poly, _mm512_castsi512_ps(exponent));
}

ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE __mmask16 lanes_below(int count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : count <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << count) - 1);
}

// Online softmax over one tile, per head: scores[h][0, n) * scale -> (logits) -> probabilities
// e^(s - m) in place, lanes past n zeroed up to the next multiple of 16; m, l and acc rescaled.
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE void softmax_tile_avx512(float (*scores)[kTile], int n, int G, int D,
                                                                  float scale, float* logits, int logits_stride,
                                                                  Partial out) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const int vectors = (n + 15) / 16;
  for (int h = 0; h < G; ++h) {
    float* s = scores[h];
    __m512 v[kTile / 16];
    __m512 tile_max = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < vectors; ++c) {
      const __mmask16 mask = lanes_below(n - 16 * c);
      v[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), mask, _mm512_loadu_ps(s + 16 * c), scale_v);
      if (logits) _mm512_mask_storeu_ps(logits + h * logits_stride + 16 * c, mask, v[c]);
      tile_max = _mm512_max_ps(tile_max, v[c]);
    }
    const float new_max = std::max(out.m[h], _mm512_reduce_max_ps(tile_max));
    const float rescale = out.m[h] == -INFINITY ? 0.f : exp_nonpositive(out.m[h] - new_max);
    const __m512 max_v = _mm512_set1_ps(new_max);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < vectors; ++c) {
      const __m512 e = _mm512_maskz_mov_ps(lanes_below(n - 16 * c), exp_nonpositive_avx512(_mm512_sub_ps(v[c], max_v)));
      _mm512_storeu_ps(s + 16 * c, e);
      sum = _mm512_add_ps(sum, e);
    }
    out.l[h] = out.l[h] * rescale + _mm512_reduce_add_ps(sum);
    out.m[h] = new_max;
    if (rescale != 1.f) {
      float* acc = out.acc + h * D;
      for (int d = 0; d < D; d += 16) {
        _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(rescale)));
      }
    }
  }
}

// scores[h0 + hh][piece tokens] = q[h0 + hh] . K[token, :] for kH heads and kPiecesPerPass pieces,
// head dim outermost.
template <int kD, int kH>
ATTNSERVE_TARGET_AVX512 ATTNSERVE_INLINE void score_pieces_avx512(
    const Piece* pieces, int64_t stride_dim, const float* q_heads, float (*scores)[kTile], int h0) {
  constexpr int kP = kPiecesPerPass;
  __m512 acc[kP][kH];
  for (int pc = 0; pc < kP; ++pc)
    for (int hh = 0; hh < kH; ++hh) acc[pc][hh] = _mm512_setzero_ps();
  for (int d = 0; d < kD; ++d) {
    __m512 k[kP];
    for (int pc = 0; pc < kP; ++pc) {
      k[pc] = bf16x16_to_fp32(_mm256_maskz_loadu_epi16(pieces[pc].mask, pieces[pc].k + d * stride_dim));
    }
    for (int hh = 0; hh < kH; ++hh) {
      const __m512 qd = _mm512_set1_ps(q_heads[hh * kD + d]);
      for (int pc = 0; pc < kP; ++pc) acc[pc][hh] = _mm512_fmadd_ps(qd, k[pc], acc[pc][hh]);
    }
  }
  for (int pc = 0; pc < kP; ++pc)
    for (int hh = 0; hh < kH; ++hh)
      _mm512_mask_storeu_ps(scores[h0 + hh] + pieces[pc].r0, pieces[pc].mask, acc[pc][hh]);
}

// acc[h0 + hh] += sum_i p[h0 + hh][i] * V[i] for kH heads over the n tokens of the tile.
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

// Heads per P @ V pass: kValueHeads * kD / 16 accumulators <= 16 registers.
template <int kD>
constexpr int kValueHeads = kD == 64 ? 4 : 2;

template <int kD>
ATTNSERVE_TARGET_AVX512 void attend_range_bf16_kt_avx512(const DecodeProblem& p, int b, int g,
                                                         int begin, int end, Partial out) {
  const int G = p.G;
  const float* q = p.query + (static_cast<int64_t>(b) * p.Hkv + g) * G * kD;  // [G, kD]
  const int32_t* idx = p.token_idx + (static_cast<int64_t>(b) * p.Hkv + g) * p.K;
  const int32_t* table = p.block_table + b * p.block_table_stride;
  float* logits = p.logits ? p.logits + (static_cast<int64_t>(b) * p.Hkv + g) * G * p.K : nullptr;
  alignas(64) float scores[kMaxGroup][kTile];
  TileRows tile;
  clear_partial(out, G, kD);
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int n = std::min(kTile, end - t0);
    cut_tile(p, idx + t0, table, g, n, tile);
    for (int c = 0; c < tile.n_pieces; c += kPiecesPerPass) {
      for (int h0 = 0; h0 < G; h0 += 4) {
        const float* qh = q + h0 * kD;
        switch (std::min(4, G - h0)) {
          case 1: score_pieces_avx512<kD, 1>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
          case 2: score_pieces_avx512<kD, 2>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
          case 3: score_pieces_avx512<kD, 3>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
          default: score_pieces_avx512<kD, 4>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
        }
      }
    }
    softmax_tile_avx512(scores, n, G, kD, 1.f, logits ? logits + t0 : nullptr, p.K, out);
    constexpr int kV = kValueHeads<kD>;
    for (int h0 = 0; h0 < G; h0 += kV) {
      switch (std::min(kV, G - h0)) {
        case 1: accumulate_values_avx512<kD, 1>(tile.values, n, scores, out.acc, h0); break;
        case 2: accumulate_values_avx512<kD, 2>(tile.values, n, scores, out.acc, h0); break;
        case 3: accumulate_values_avx512<kD, kV >= 3 ? 3 : 2>(tile.values, n, scores, out.acc, h0); break;
        default: accumulate_values_avx512<kD, kV>(tile.values, n, scores, out.acc, h0); break;
      }
    }
  }
}

// The bf16-dot variant. Scores: lane t of a pass register holds (K[d][t], K[d + 1][t]), dotted with
// the query pair (q[d], q[d + 1]). P @ V: lane j holds (V[i][dim], V[i + 1][dim]) for two tokens,
// dotted with (p[i], p[i + 1]); the unpack that builds those pairs permutes the head dims within
// each 32-dim group, so the accumulators run in that order and are put back at the end.
template <int kD, int kH>
ATTNSERVE_TARGET_AVX512_BF16 ATTNSERVE_INLINE void score_pieces_dot(
    const Piece* pieces, int64_t stride_dim, const uint32_t* q_pairs, float (*scores)[kTile], int h0) {
  constexpr int kP = kPiecesPerPass;
  // word 2t <- row d token t (first source), word 2t + 1 <- row d + 1 token t (second source)
  const __m512i interleave = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  __m512 acc[kP][kH];
  for (int pc = 0; pc < kP; ++pc)
    for (int hh = 0; hh < kH; ++hh) acc[pc][hh] = _mm512_setzero_ps();
  for (int d = 0; d < kD; d += 2) {
    __m512i k[kP];
    for (int pc = 0; pc < kP; ++pc) {
      const __m256i row0 = _mm256_maskz_loadu_epi16(pieces[pc].mask, pieces[pc].k + d * stride_dim);
      const __m256i row1 = _mm256_maskz_loadu_epi16(pieces[pc].mask, pieces[pc].k + (d + 1) * stride_dim);
      k[pc] = _mm512_permutex2var_epi16(_mm512_castsi256_si512(row0), interleave, _mm512_castsi256_si512(row1));
    }
    for (int hh = 0; hh < kH; ++hh) {
      const __m512i qd = _mm512_set1_epi32(static_cast<int>(q_pairs[hh * (kD / 2) + d / 2]));
      for (int pc = 0; pc < kP; ++pc) {
        acc[pc][hh] = _mm512_dpbf16_ps(acc[pc][hh], (__m512bh)k[pc], (__m512bh)qd);
      }
    }
  }
  for (int pc = 0; pc < kP; ++pc)
    for (int hh = 0; hh < kH; ++hh)
      _mm512_mask_storeu_ps(scores[h0 + hh] + pieces[pc].r0, pieces[pc].mask, acc[pc][hh]);
}

// probs[h] (bf16, [kTile]) <- scores[h][0, n) rounded to nearest even, zero past n (P @ V reads pairs).
ATTNSERVE_TARGET_AVX512_BF16 ATTNSERVE_INLINE void probabilities_to_bf16(float (*scores)[kTile], int n, int G,
                                                                         uint16_t (*probs)[kTile]) {
  for (int h = 0; h < G; ++h) {
    for (int i0 = 0; i0 < n; i0 += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(lanes_below(n - i0), scores[h] + i0);
      const __m512 hi = _mm512_maskz_loadu_ps(lanes_below(n - i0 - 16), scores[h] + i0 + 16);
      _mm512_storeu_si512(probs[h] + i0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

template <int kD, int kH>
ATTNSERVE_TARGET_AVX512_BF16 ATTNSERVE_INLINE void accumulate_values_dot(
    const uint16_t* const* values, int n, uint16_t (*probs)[kTile], float* acc_rows, int h0) {
  constexpr int kVec = kD / 16;
  __m512 acc[kH][kVec];
  for (int hh = 0; hh < kH; ++hh)
    for (int c = 0; c < kVec; ++c) acc[hh][c] = _mm512_loadu_ps(acc_rows + (h0 + hh) * kD + 16 * c);
  for (int i = 0; i < n; i += 2) {
    const uint16_t* v0 = values[i];
    const uint16_t* v1 = i + 1 < n ? values[i + 1] : values[i];  // its probability is 0
    __m512i pairs[kVec];
    for (int c = 0; c < kVec / 2; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + 32 * c);
      const __m512i b = _mm512_loadu_si512(v1 + 32 * c);
      pairs[2 * c] = _mm512_unpacklo_epi16(a, b);
      pairs[2 * c + 1] = _mm512_unpackhi_epi16(a, b);
    }
    for (int hh = 0; hh < kH; ++hh) {
      uint32_t pair;
      std::memcpy(&pair, probs[h0 + hh] + i, sizeof(pair));
      const __m512i w = _mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < kVec; ++c) acc[hh][c] = _mm512_dpbf16_ps(acc[hh][c], (__m512bh)pairs[c], (__m512bh)w);
    }
  }
  for (int hh = 0; hh < kH; ++hh)
    for (int c = 0; c < kVec; ++c) _mm512_storeu_ps(acc_rows + (h0 + hh) * kD + 16 * c, acc[hh][c]);
}

// Register c lane j of the unpacked P @ V accumulators holds head dim
// 32 (c / 2) + 8 (j / 4) + 4 (c % 2) + j % 4.
template <int kD>
ATTNSERVE_INLINE void unpermute_value_dims(float* acc_rows, int G) {
  float natural[kD];
  for (int h = 0; h < G; ++h) {
    float* row = acc_rows + h * kD;
    for (int c = 0; c < kD / 16; ++c)
      for (int j = 0; j < 16; ++j) natural[32 * (c / 2) + 8 * (j / 4) + 4 * (c % 2) + j % 4] = row[16 * c + j];
    std::copy(natural, natural + kD, row);
  }
}

template <int kD>
ATTNSERVE_TARGET_AVX512_BF16 void attend_range_bf16_kt_dot(const DecodeProblem& p, int b, int g, int begin,
                                                           int end, Partial out) {
  const int G = p.G;
  const uint32_t* q_pairs = p.query_pairs + (static_cast<int64_t>(b) * p.Hkv + g) * G * (kD / 2);
  const int32_t* idx = p.token_idx + (static_cast<int64_t>(b) * p.Hkv + g) * p.K;
  const int32_t* table = p.block_table + b * p.block_table_stride;
  float* logits = p.logits ? p.logits + (static_cast<int64_t>(b) * p.Hkv + g) * G * p.K : nullptr;
  alignas(64) float scores[kMaxGroup][kTile];
  alignas(64) uint16_t probs[kMaxGroup][kTile];
  TileRows tile;
  clear_partial(out, G, kD);
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int n = std::min(kTile, end - t0);
    cut_tile(p, idx + t0, table, g, n, tile);
    for (int c = 0; c < tile.n_pieces; c += kPiecesPerPass) {
      for (int h0 = 0; h0 < G; h0 += 4) {
        const uint32_t* qh = q_pairs + h0 * (kD / 2);
        switch (std::min(4, G - h0)) {
          case 1: score_pieces_dot<kD, 1>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
          case 2: score_pieces_dot<kD, 2>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
          case 3: score_pieces_dot<kD, 3>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
          default: score_pieces_dot<kD, 4>(tile.pieces + c, p.key.stride_dim, qh, scores, h0); break;
        }
      }
    }
    softmax_tile_avx512(scores, n, G, kD, p.scale, logits ? logits + t0 : nullptr, p.K, out);
    probabilities_to_bf16(scores, n, G, probs);
    constexpr int kV = kValueHeads<kD>;
    for (int h0 = 0; h0 < G; h0 += kV) {
      switch (std::min(kV, G - h0)) {
        case 1: accumulate_values_dot<kD, 1>(tile.values, n, probs, out.acc, h0); break;
        case 2: accumulate_values_dot<kD, 2>(tile.values, n, probs, out.acc, h0); break;
        case 3: accumulate_values_dot<kD, kV >= 3 ? 3 : 2>(tile.values, n, probs, out.acc, h0); break;
        default: accumulate_values_dot<kD, kV>(tile.values, n, probs, out.acc, h0); break;
      }
    }
  }
  unpermute_value_dims<kD>(out.acc, G);
}
#endif

// attend_range_body compiled for the CPU's ISA level.
template <typename scalar_t, int kD>
AttendRangeFn attend_range_for_cpu() {
  return for_cpu_isa<AttendRangeFn>({
#if defined(__x86_64__)
      .avx512 = attend_range_avx512<scalar_t, kD>,
      .avx2 = attend_range_avx2<scalar_t, kD>,
#endif
      .baseline = attend_range_default<scalar_t, kD>});
}

// A work-item kernel and the query it reads.
struct DecodeKernel {
  AttendRangeFn attend{};
  bool reads_bf16_query = false;  // DecodeProblem::query_pairs (bf16, unscaled), not query
  explicit operator bool() const { return attend != nullptr; }
};

template <typename scalar_t>
DecodeKernel pick_kernel(int D, bool bf16_query, const at::Tensor& key_cache, const at::Tensor& value_cache) {
#if defined(__x86_64__)
  // vLLM's CPU layout (bf16, K token-contiguous, V rows): the hand-vectorised paths, with bf16 dot
  // products on a bf16 query where the CPU has AVX512_BF16
  if (std::is_same_v<scalar_t, c10::BFloat16> && key_cache.stride(2) == 1 && value_cache.stride(3) == 1 &&
      (D == 64 || D == 128)) {
    const DecodeKernel dot{D == 64 ? attend_range_bf16_kt_dot<64> : attend_range_bf16_kt_dot<128>, true};
    const DecodeKernel fp32{D == 64 ? attend_range_bf16_kt_avx512<64> : attend_range_bf16_kt_avx512<128>};
    if (const DecodeKernel kernel =
            for_cpu_isa<DecodeKernel>({.avx512bf16 = bf16_query ? dot : DecodeKernel{}, .avx512 = fp32})) {
      return kernel;
    }
  }
#endif
  if (D == 64) return {attend_range_for_cpu<scalar_t, 64>()};
  if (D == 128) return {attend_range_for_cpu<scalar_t, 128>()};
  return {attend_range_for_cpu<scalar_t, 0>()};
}

// mass[j] += exp(logits[j] - max) * inv_sum, j < n: the probabilities of one query head. Compiled
// per ISA: at the baseline (SSE2) exp_nonpositive's rint is a libm call, ~10x slower.
ATTNSERVE_INLINE void add_probabilities_body(const float* logits, int n, float max, float inv_sum,
                                             float* mass) {
#pragma omp simd
  for (int j = 0; j < n; ++j) mass[j] += exp_nonpositive(logits[j] - max) * inv_sum;
}

using AddProbabilitiesFn = void (*)(const float*, int, float, float, float*);

void add_probabilities_default(const float* logits, int n, float max, float inv_sum, float* mass) {
  add_probabilities_body(logits, n, max, inv_sum, mass);
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

AddProbabilitiesFn add_probabilities_for_cpu() {
  return for_cpu_isa<AddProbabilitiesFn>({
#if defined(__x86_64__)
      .avx512 = add_probabilities_avx512,
      .avx2 = add_probabilities_avx2,
#endif
      .baseline = add_probabilities_default});
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

  const DecodeKernel kernel =
      key_cache.scalar_type() == at::kBFloat16
          ? pick_kernel<c10::BFloat16>(D, query.scalar_type() == at::kBFloat16, key_cache, value_cache)
          : pick_kernel<float>(D, false, key_cache, value_cache);
  const bool dot = kernel.reads_bf16_query;
  const at::TensorOptions fp32 = query.options().dtype(at::kFloat);
  const at::Tensor q = dot ? query.contiguous() : (query.to(at::kFloat) * scale).contiguous();
  const at::Tensor idx = token_idx.contiguous();
  const at::Tensor counts = num_idx.contiguous();
  const at::Tensor table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  at::Tensor logits = want_mass ? at::empty({B, Hkv, G, K}, fp32) : at::Tensor();

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

  DecodeProblem problem{dot ? nullptr : q.data_ptr<float>(),
                        dot ? static_cast<const uint32_t*>(q.data_ptr()) : nullptr, static_cast<float>(scale),
                        make_view(key_cache), make_view(value_cache),
                        table.data_ptr<int32_t>(), table.stride(0), idx.data_ptr<int32_t>(),
                        Hkv, G, D, K, page, (page & (page - 1)) == 0 ? __builtin_ctz(page) : -1,
                        want_mass ? logits.data_ptr<float>() : nullptr};
  const AttendRangeFn attend = kernel.attend;
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
  at::Tensor out = at::empty({B, Hq, D}, fp32);
  at::Tensor mass = want_mass ? at::zeros({B, Hkv, K}, fp32)
                              : at::empty({0}, fp32);
  float* out_ptr = out.data_ptr<float>();
  float* mass_ptr = want_mass ? mass.data_ptr<float>() : nullptr;
  float* logit_ptr = problem.logits;
  const AddProbabilitiesFn add_probabilities = add_probabilities_for_cpu();
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
