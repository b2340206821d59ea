// C = A B (+ C) for the written-out kernels' per-step products, with A packed once per
// call and no memory taken from the allocator per product.
//
// oneDNN's sgemm allocates a 16 KB buffer on every call. The kernels call it once per
// step and thread, both threads at the same moment after each barrier; with glibc's
// allocator limited to one arena (MALLOC_ARENA_MAX=1) the two calls queue on its lock
// and search a heap fragmented by XLA's buffers, which cost the long LSTM's training
// step 16-23% (measured with the buffer cached per thread). A step's A is a block of
// weight rows that stays the same for the whole sequence, so it is packed once per
// call into panels of kMr rows, [K][kMr] each; B [K, N] is kept in blocks of kNr
// columns, [K][kNr] each, that the kernels write as they compute its rows (BlockRow)
// and that stay in the L2 cache (or, PanelGemmRange, read where it lies, for a B that
// is already there), and a kMr x kNr register tile runs over both: with AVX-512 one
// 16-float vector per row (single-threaded, 104-113 GFLOP/s against 86-94 for the
// AVX2 tile of two 8-float vectors per row, at the kernels' step shapes on an AMD EPYC
// with AVX-512), else AVX2 and FMA, else plain loops.

#ifndef BPTT_JAX_CSRC_PANEL_GEMM_H_
#define BPTT_JAX_CSRC_PANEL_GEMM_H_

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMr = 6;    // rows of A per panel and register tile
constexpr int64_t kNr = 16;   // B's columns per register tile (one 16-float or two 8-float vectors)
constexpr int64_t kKc = 256;  // rows of B per pass over the panels

// Floats that PackPanels writes for M rows and K columns (the last panel padded).
inline int64_t PanelFloats(int64_t M, int64_t K) { return (M + kMr - 1) / kMr * kMr * K; }

// Rows [0, M) of A (row-major, lda) -> panels of kMr rows, panel i at Ap + i * kMr * K
// holding [K][kMr]; the last panel's missing rows are zeros.
inline void PackPanels(const float* A, int64_t lda, int64_t M, int64_t K, float* Ap) {
  for (int64_t p = 0; p < M; p += kMr) {
    float* panel = Ap + p * K;
    const int64_t rows = std::min(kMr, M - p);
    for (int64_t i = 0; i < kMr; ++i) {
      const float* a = A + (p + i) * lda;
      for (int64_t k = 0; k < K; ++k) panel[k * kMr + i] = i < rows ? a[k] : 0.0f;
    }
  }
}

#if defined(__AVX512F__)
// C[rows, 16] (ldc; only the columns set in `mask` when kMasked, and only those of b
// read) = A-panel part ap [K][kMr] times b [K, 16] (ldb), added to C when `add`.
template <bool kMasked>
inline void PanelTile(int64_t K, const float* ap, const float* b, int64_t ldb, float* c,
                      int64_t ldc, int64_t rows, bool add, __mmask16 mask) {
  __m512 acc[kMr];
  for (int i = 0; i < kMr; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 bk = kMasked ? _mm512_maskz_loadu_ps(mask, b + k * ldb)
                              : _mm512_loadu_ps(b + k * ldb);
    const float* ak = ap + k * kMr;
    for (int i = 0; i < kMr; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(ak[i]), bk, acc[i]);
  }
  for (int i = 0; i < kMr; ++i) {
    if (i >= rows) break;
    float* ci = c + i * ldc;
    if (kMasked) {
      if (add) acc[i] = _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(mask, ci));
      _mm512_mask_storeu_ps(ci, mask, acc[i]);
    } else {
      if (add) acc[i] = _mm512_add_ps(acc[i], _mm512_loadu_ps(ci));
      _mm512_storeu_ps(ci, acc[i]);
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// C[rows, 16] (ldc; only the columns where the masks are set when kMasked, and only
// those of b read) = A-panel part ap [K][kMr] times b [K, 16] (ldb), added to C when `add`.
template <bool kMasked>
inline void PanelTile(int64_t K, const float* ap, const float* b, int64_t ldb, float* c,
                      int64_t ldc, int64_t rows, bool add, __m256i m0, __m256i m1) {
  __m256 c0[kMr], c1[kMr];
  for (int i = 0; i < kMr; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    const __m256 b0 = kMasked ? _mm256_maskload_ps(bk, m0) : _mm256_loadu_ps(bk);
    const __m256 b1 = kMasked ? _mm256_maskload_ps(bk + 8, m1) : _mm256_loadu_ps(bk + 8);
    const float* ak = ap + k * kMr;
    for (int i = 0; i < kMr; ++i) {
      const __m256 a = _mm256_broadcast_ss(ak + i);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < kMr; ++i) {
    if (i >= rows) break;
    float* ci = c + i * ldc;
    if (kMasked) {
      if (add) {
        c0[i] = _mm256_add_ps(c0[i], _mm256_maskload_ps(ci, m0));
        c1[i] = _mm256_add_ps(c1[i], _mm256_maskload_ps(ci + 8, m1));
      }
      _mm256_maskstore_ps(ci, m0, c0[i]);
      _mm256_maskstore_ps(ci + 8, m1, c1[i]);
    } else {
      if (add) {
        c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(ci));
        c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(ci + 8));
      }
      _mm256_storeu_ps(ci, c0[i]);
      _mm256_storeu_ps(ci + 8, c1[i]);
    }
  }
}
#endif

// Where a product's B is in blocks of kNr columns: block j of rows [k0, k0 + kc) at
// Bp + j * stride, [kc][kNr].
inline int64_t BlockedFloats(int64_t K, int64_t N) { return (N + kNr - 1) / kNr * kNr * K; }

// C [M, N] (ldc) = (C if add) + A's columns [k0, k0 + kc) times B's rows [k0, k0 + kc):
// A as PackPanels left it (K columns), B's rows in blocks of kNr columns at Bp (block j
// at Bp + j * stride, its rows ldb apart).
inline void PanelPass(int64_t M, int64_t N, int64_t K, int64_t k0, int64_t kc, const float* Ap,
                      const float* Bp, int64_t ldb, int64_t stride, bool add, float* C,
                      int64_t ldc) {
  const int64_t blocks = (N + kNr - 1) / kNr;
  for (int64_t p = 0; p < M; p += kMr) {
    const float* ap = Ap + p * K + k0 * kMr;
    const int64_t rows = std::min(kMr, M - p);
    for (int64_t j = 0; j < blocks; ++j) {
      const float* bp = Bp + j * stride;
      float* c = C + p * ldc + j * kNr;
      const int64_t w = std::min(kNr, N - j * kNr);
#if defined(__AVX512F__)
      if (w == kNr)
        PanelTile<false>(kc, ap, bp, ldb, c, ldc, rows, add, 0xFFFF);
      else  // the last columns, stored under a mask
        PanelTile<true>(kc, ap, bp, ldb, c, ldc, rows, add,
                        static_cast<__mmask16>((1u << w) - 1));
#elif defined(__AVX2__) && defined(__FMA__)
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const int wi = static_cast<int>(w);
      if (w == kNr)
        PanelTile<false>(kc, ap, bp, ldb, c, ldc, rows, add, lane, lane);
      else  // the last columns, stored under masks
        PanelTile<true>(kc, ap, bp, ldb, c, ldc, rows, add,
                        _mm256_cmpgt_epi32(_mm256_set1_epi32(wi), lane),
                        _mm256_cmpgt_epi32(_mm256_set1_epi32(wi - 8), lane));
#else
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t n = 0; n < w; ++n) {
          float total = add ? c[i * ldc + n] : 0.0f;
          for (int64_t k = 0; k < kc; ++k) total += ap[k * kMr + i] * bp[k * ldb + n];
          c[i * ldc + n] = total;
        }
#endif
    }
  }
}

inline void ZeroRows(int64_t M, int64_t N, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) std::fill_n(C + m * ldc, N, 0.0f);
}

// C [M, N] (ldc) = (C if add) + A's columns [k0, k1) times B's rows [k0, k1), with A as
// PackPanels left it (K columns) and B [K, N] in blocks of kNr columns, [blocks][K][kNr]
// (as BlockRow writes it).
inline void PanelGemmBlocked(int64_t M, int64_t N, int64_t K, int64_t k0, int64_t k1,
                             const float* Ap, const float* Bp, bool add, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (k1 == k0 && !add) ZeroRows(M, N, C, ldc);
  for (int64_t k = k0; k < k1; k += kKc)
    PanelPass(M, N, K, k, std::min(kKc, k1 - k), Ap, Bp + k * kNr, kNr, K * kNr, add || k > k0,
              C, ldc);
}

// C [M, N] (ldc) = (C if add) + A's columns [k0, k1) times B [k1 - k0, N], read where it
// lies (row-major, ldb; only its first N columns): A as PackPanels left it (K columns).
inline void PanelGemmRange(int64_t M, int64_t N, int64_t K, int64_t k0, int64_t k1,
                           const float* Ap, const float* B, int64_t ldb, bool add, float* C,
                           int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (k1 == k0 && !add) ZeroRows(M, N, C, ldc);
  for (int64_t k = k0; k < k1; k += kKc)
    PanelPass(M, N, K, k, std::min(kKc, k1 - k), Ap, B + (k - k0) * ldb, ldb, kNr,
              add || k > k0, C, ldc);
}

// Row k of a B [K, N] in blocks (as PanelGemmBlocked reads it) = row [N].
inline void BlockRow(const float* row, int64_t N, int64_t K, int64_t k, float* Bp) {
  for (int64_t n0 = 0; n0 < N; n0 += kNr) {
    float* dst = Bp + n0 * K + k * kNr;
    const int64_t w = std::min(kNr, N - n0);
    for (int64_t n = 0; n < w; ++n) dst[n] = row[n0 + n];
  }
}

}  // namespace

#endif  // BPTT_JAX_CSRC_PANEL_GEMM_H_
