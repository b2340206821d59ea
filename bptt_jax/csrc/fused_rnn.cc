// Whole-sequence RNN, LSTM and GRU kernels for XLA:CPU, written out: one GEMM per step
// and thread, the gates computed in place.
//
//   bptt_fused_forward(xs, h0, c0, W, U, bias, lengths; batch_major, kind, training)
//       -> (hs, h_T, c_T, workspace)
//   bptt_fused_backward(xs, h0, c0, W, U, bias, hs, h_T, c_T, workspace, dhs, dh_T, dc_T,
//                       lengths; batch_major, kind) -> (dxs, dh0, dc0, dW, dU, dbias)
//   bptt_dense_backward(x, W, g) -> (dx, dW)    (a dense layer's backward pass, below)
//
// The same calls and layouts as the oneDNN handlers (onednn_rnn.cc): float32,
// time-major xs [T, B, D] and hs [T, B, H] (or, with batch_major = 1, [B, T, D] and
// [B, T, H], read and written where they lie: no transposes or copies around the
// call), states [B, H], W [D, G*H], U [H, G*H], bias [G'*H], the gate blocks in
// oneDNN's order: (i, f, g, o) for the LSTM, (z, r, n) and a fourth bias block b_hn for
// the GRU (linear before reset); c0 and c_T are empty except for the LSTM. `kind` is 0
// (tanh RNN), 1 (ReLU RNN), 2 (LSTM) or 3 (GRU). With lengths (int32 [B]; empty: none),
// a step past a sequence's end keeps its states (selected from the step before), writes
// zeros to hs, and in the backward pass has zero gate gradients and hands dh (and dc)
// on unchanged; its inputs must be finite (the caller zeros them).
//
// The hidden units are split into one block per thread, and the rows of the gates (a
// row per gate and unit) are ordered block by block so that a thread's are contiguous.
// Each step a thread computes its rows of the gates, transposed,
//
//   gates_t[rows] = [W_p U_p][rows] [x_t; h_{t-1}]^T    (M = G * block, N = B, K = D + H)
//
// with panel_gemm.h (its rows of [W_p U_p] packed once per call, [x_t; h_{t-1}]^T in
// column blocks that the step before wrote: each block its units' h_{t-1} and a share of
// x_t's rows), computes its units' states, and waits for the others: one barrier per
// step. A product with the gates as its rows runs near the machine's peak even for small
// B, where [B, H] x [H, G*H] does not. The forward pass leaves what the backward pass
// reads in the workspace, step by step ([T, S*H, B]: a step's rows of a block in one
// stretch, which the backward pass reads in order): the LSTM's gates after their
// nonlinearities (written over their pre-activations) and its cell states; the GRU's
// z, r, n and h U_n + b_hn; nothing for the RNN (its outputs are its hidden states). In
// inference (training = 0) nothing is saved, and the LSTM keeps the cell states of two
// steps only.
//
// The backward pass is the same loop in reverse (dh_{t-1}^T = U_p dgates_t, one GEMM
// per step and block). Each thread keeps its rows of the gate gradients for a chunk of
// steps (kChunkColumns columns, in the cache) and, at the chunk's first step, adds the
// chunk's products into its rows of the weight gradients, dU_p^T += dgates [h_{t-1}]
// and dW_p^T += dgates [x_t] over the chunk's K = steps * B columns, and into the bias
// gradients; dxs = dgates^T W_p takes each thread's part, summed after the next
// barrier. No array over all steps of the gate gradients exists. An empty dxs asks
// for no dxs (xs is not differentiated: its products are skipped), an empty dhs stands
// for zeros (hs is not used).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kept.h"
#include "panel_gemm.h"
#include "rnn_calls.h"
#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------
// exp, sigmoid and tanh in float32 that the compiler vectorizes (no calls, no
// branches; built with -fno-trapping-math). Cephes' expf: x = n ln 2 + r,
// |r| <= ln 2 / 2, a degree-6 polynomial for e^r and 2^n put into the exponent
// bits; about 1 ulp. Beyond the float range: 0 and +inf. NaN stays NaN (every
// comparison keeps it).

inline float Exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504019f;
  const float y0 = x > hi ? hi : (x < lo ? lo : x);
  const float n = std::floor(y0 * 1.44269504088896341f + 0.5f);
  float r = y0 - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x > hi ? INFINITY : (x < lo ? 0.0f : e);
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + Exp(-x)); }

// tanh: Cephes' odd polynomial below |x| = 0.625, else 1 - 2 / (e^{2|x|} + 1) with the sign.
inline float Tanh(float x) {
  const float a = std::fabs(x);
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * x + x;
  const float big = 1.0f - 2.0f / (Exp(2.0f * a) + 1.0f);
  return a < 0.625f ? small : std::copysign(big, x);
}

#if defined(__AVX512F__)
// The same functions on 16 floats with AVX-512 intrinsics, where the auto-vectorized
// ones above cost about 11% of the long LSTM's forward call (README): 2^n by vscalefps
// in place of the integer conversions and the range's final select (x is clamped, so
// e^88.38 = 3.4e38 and e^-87.34 stand for +inf and 0, which 1 / (1 + e) and 2 / (e + 1)
// round the same), and the divisions by vrcp14ps and a Newton step (about 1 ulp more
// than a division). NaN stays NaN: max and min return their second operand, x, for it.
inline __m512 Exp16(__m512 x) {
  const __m512 y = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f),
                                 _mm512_max_ps(_mm512_set1_ps(-87.3365447504019f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 Reciprocal16(__m512 d) {  // 1 / d
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

inline __m512 Sigmoid16(__m512 x) {
  const __m512 e = Exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return Reciprocal16(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

inline __m512 Tanh16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x), s = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, s), x, x);
  const __m512 e = Exp16(_mm512_add_ps(a, a));
  const __m512 big = _mm512_fnmadd_ps(_mm512_set1_ps(2.0f),
                                      Reciprocal16(_mm512_add_ps(e, _mm512_set1_ps(1.0f))),
                                      _mm512_set1_ps(1.0f));
  const __m512 sign = _mm512_and_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(INT32_MIN)));
  const __mmask16 below = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(below, _mm512_or_ps(big, sign), small);
}

// The LSTM's step for one unit over the batch, in place: the gate pre-activations gi,
// gf, gg, go [B] (plus their biases) become i, f, g, o, and c_row, h_row get the cell and
// hidden states from c_prev. Masked loads and stores for the last B % 16.
inline void LstmCells(float* gi, float* gf, float* gg, float* go, float bi, float bf,
                      float bg, float bo, const float* c_prev, float* c_row, float* h_row,
                      int64_t B) {
  for (int64_t b = 0; b < B; b += 16) {
    const __mmask16 m = B - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (B - b)) - 1);
    const __m512 i = Sigmoid16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, gi + b), _mm512_set1_ps(bi)));
    const __m512 f = Sigmoid16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, gf + b), _mm512_set1_ps(bf)));
    const __m512 g = Tanh16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, gg + b), _mm512_set1_ps(bg)));
    const __m512 o = Sigmoid16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, go + b), _mm512_set1_ps(bo)));
    const __m512 c = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c_prev + b), _mm512_mul_ps(i, g));
    _mm512_mask_storeu_ps(gi + b, m, i);
    _mm512_mask_storeu_ps(gf + b, m, f);
    _mm512_mask_storeu_ps(gg + b, m, g);
    _mm512_mask_storeu_ps(go + b, m, o);
    _mm512_mask_storeu_ps(c_row + b, m, c);
    _mm512_mask_storeu_ps(h_row + b, m, _mm512_mul_ps(o, Tanh16(c)));
  }
}
#else  // the same, auto-vectorized
inline void LstmCells(float* gi, float* gf, float* gg, float* go, float bi, float bf,
                      float bg, float bo, const float* c_prev, float* c_row, float* h_row,
                      int64_t B) {
#pragma omp simd
  for (int64_t b = 0; b < B; ++b) {
    const float i = Sigmoid(gi[b] + bi), f = Sigmoid(gf[b] + bf);
    const float g = Tanh(gg[b] + bg), o = Sigmoid(go[b] + bo);
    const float c = f * c_prev[b] + i * g;
    gi[b] = i, gf[b] = f, gg[b] = g, go[b] = o;
    c_row[b] = c;
    h_row[b] = o * Tanh(c);
  }
}
#endif

// ---------------------------------------------------------------------------

void Gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // oneDNN refuses K = 0: C = beta C
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
    return;
  }
  const dnnl_status_t status = dnnl_sgemm(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
  if (status != dnnl_success)
    throw std::runtime_error("oneDNN's sgemm failed with status " + std::to_string(status));
}

// Denormal results and inputs flushed to zero in this thread while it lives, as XLA's
// CPU computations do. Besides matching them, it keeps vanishing gradients (which
// reach the denormal range over long sequences) off the processor's slow path.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

#if defined(__AVX__)
// out[c * ld_out + r] = in[r * ld_in + c] for an 8 x 8 tile, in registers.
inline void Transpose8x8(const float* in, int64_t ld_in, float* out, int64_t ld_out) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ld_in);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ld_out, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ld_out, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// out [cols, rows] = in [rows, cols]^T, for row-major arrays with leading dimensions.
void Transpose(const float* in, int64_t rows, int64_t cols, int64_t ld_in, float* out,
               int64_t ld_out) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      int64_t r8 = r0, c8 = c0;  // the tile's part in whole 8 x 8 blocks: [r0, r8) x [c0, c8)
#if defined(__AVX__)
      r8 = r0 + (r1 - r0) / 8 * 8, c8 = c0 + (c1 - c0) / 8 * 8;
      for (int64_t r = r0; r < r8; r += 8)
        for (int64_t c = c0; c < c8; c += 8)
          Transpose8x8(in + r * ld_in + c, ld_in, out + c * ld_out + r, ld_out);
#endif
      for (int64_t r = r0; r < r1; ++r)  // the rest: a right-hand strip and a bottom one
        for (int64_t c = r < r8 ? c8 : c0; c < c1; ++c) out[c * ld_out + r] = in[r * ld_in + c];
    }
}

// Asks for the cache lines of n floats from p ahead of their use: the backward pass's
// next step's saved rows while this step computes.
inline void Prefetch(const float* p, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(p + c, 0, 3);
}

enum Kind : int64_t { kRnnTanh = 0, kRnnRelu = 1, kLstm = 2, kGru = 3 };

int64_t Gates(int64_t kind) { return kind == kLstm ? 4 : kind == kGru ? 3 : 1; }
// Rows per unit and step that the forward pass saves for the backward pass.
int64_t Saved(int64_t kind) { return kind == kLstm || kind == kGru ? 4 : 0; }

constexpr int64_t kHeader = 16;  // floats before the workspace's arrays: [0] the block count

// Units [Start(k), Start(k + 1)) form block k. With `rows` rows per unit, the
// rows of block k start at rows * Start(k), one run of Size(k) per gate.
struct Blocks {
  int64_t n, H;
  int64_t Start(int64_t k) const { return k * H / n; }
  int64_t Size(int64_t k) const { return Start(k + 1) - Start(k); }
  int64_t Block(int64_t j) const {  // the block of unit j
    int64_t k = std::min(n - 1, j * n / H);
    while (Start(k) > j) --k;
    while (Start(k + 1) <= j) ++k;
    return k;
  }
  // The row of gate g of unit j, with `rows` rows per unit.
  int64_t Row(int64_t rows, int64_t g, int64_t j) const {
    const int64_t k = Block(j);
    return rows * Start(k) + g * Size(k) + (j - Start(k));
  }
};

// One block per thread, each of at least 8 units; at most `threads` blocks when it is
// positive (bptt_jax/_kernel.py asks for one where a call is too small to share).
int64_t BlockCount(int64_t H, int64_t threads) {
  const int64_t most = threads > 0 ? std::min<int64_t>(threads, omp_get_max_threads())
                                   : omp_get_max_threads();
  return std::max<int64_t>(1, std::min<int64_t>(most, H / 8));
}

// The threads of a call's parallel regions: one per block, at most the OpenMP threads.
int Threads(const Blocks& blk) {
  return static_cast<int>(std::min<int64_t>(blk.n, omp_get_max_threads()));
}

// The leading dimension of a row of n floats in the kernels' own arrays: a multiple of
// 16 floats (64 bytes) that is an odd multiple of 16, so that the rows of a matrix
// spread over the cache sets. With a power of two (a row of 1024 floats, 4 KiB) every
// row maps to the same few sets and a large GEMM reading such a matrix runs at half
// its speed.
int64_t Ld(int64_t n) {
  const int64_t m = (n + 15) / 16 * 16;
  return (m / 16) % 2 == 1 ? m : m + 16;
}

// Inference keeps nothing for a backward pass: only the LSTM's cell states of two steps.
int64_t InferenceFloats(int64_t kind, int64_t B, int64_t H) {
  return kHeader + (kind == kLstm ? 2 * H * B : 0);
}

// The saved rows, step by step: [T, S*H, B], step t's rows of block k contiguous at
// t * S*H*B + S * Start(k) * B.
int64_t SavedFloats(int64_t kind, int64_t T, int64_t B, int64_t H) {
  return Saved(kind) * H * T * B;
}

int64_t WorkspaceFloats(int64_t kind, int64_t T, int64_t B, int64_t H) {
  // the saved rows; the LSTM's cell states [T+1, H, B]
  return kHeader + SavedFloats(kind, T, B, H) + (kind == kLstm ? H * (T + 1) * B : 0);
}

// Gate g's columns of block k in a [K, G*H] matrix (gate order) are the run of Size(k)
// rows from `RunRow(G, g, k)` in block order: packing is a transpose per run.
int64_t RunRow(const Blocks& blk, int64_t G, int64_t g, int64_t k) {
  return G * blk.Start(k) + g * blk.Size(k);
}

// Where block k's panels (PackPanels of its `rows` * Size(k) rows) begin, in rows of
// a buffer of PanelRows(rows) rows: each block's last panel may be padded.
int64_t PanelRow(const Blocks& blk, int64_t rows, int64_t k) {
  return rows * blk.Start(k) + kMr * k;
}
int64_t PanelRows(const Blocks& blk, int64_t rows) { return PanelRow(blk, rows, blk.n); }

// W [D, G*H] -> Wp [G*H, ld] with the rows in block order (U alike), the runs split over
// the threads.
void PackTransposed(const Blocks& blk, int64_t G, const float* W, int64_t D, float* Wp,
                    int64_t ld) {
  const int64_t H = blk.H, runs = G * blk.n;
#pragma omp parallel for num_threads(Threads(blk))
  for (int64_t run = 0; run < runs; ++run) {
    const int64_t g = run / blk.n, k = run % blk.n;
    Transpose(W + g * H + blk.Start(k), D, blk.Size(k), G * H, Wp + RunRow(blk, G, g, k) * ld,
              ld);
  }
}

// Wt [G*H, ld] (rows in block order, K columns) -> W [K, G*H] (columns in gate order).
void UnpackTransposed(const Blocks& blk, int64_t G, const float* Wt, int64_t ld, int64_t K,
                      float* W) {
  const int64_t H = blk.H, runs = G * blk.n;
#pragma omp parallel for num_threads(Threads(blk))
  for (int64_t run = 0; run < runs; ++run) {
    const int64_t g = run / blk.n, k = run % blk.n;
    Transpose(Wt + RunRow(blk, G, g, k) * ld, blk.Size(k), K, ld, W + g * H + blk.Start(k),
              G * H);
  }
}

// U [H, G*H] -> Up [H, ld] with the columns in block order.
void PackColumns(const Blocks& blk, int64_t G, const float* U, float* Up, int64_t ld) {
  const int64_t H = blk.H;
#pragma omp parallel for num_threads(Threads(blk))
  for (int64_t r = 0; r < H; ++r)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < blk.n; ++k)
        std::memcpy(Up + r * ld + RunRow(blk, G, g, k), U + r * G * H + g * H + blk.Start(k),
                    sizeof(float) * blk.Size(k));
}

// The sizes, and where step t's rows of a sequence [.., C] lie: time-major [T, B, C]
// (rows C apart, steps B*C apart) or batch-major [B, T, C] (rows T*C apart, steps C).
struct Shape {
  int64_t T, B, D, H;
  bool batch_major;
  int64_t Step(int64_t C) const { return batch_major ? C : B * C; }
  int64_t Row(int64_t C) const { return batch_major ? T * C : C; }
};

Shape ShapeOf(ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& h0, int64_t batch_major) {
  auto x = xs.dimensions();
  return batch_major ? Shape{x[1], x[0], x[2], h0.dimensions()[1], true}
                     : Shape{x[0], x[1], x[2], h0.dimensions()[1], false};
}

// Rows [d0, d1) of x_t^T [D, B] into rows [d0, d1) of a B operand [K, B] in blocks of kNr
// columns (as BlockRow writes them), x_t's rows read where they lie.
void BlockInputs(const Shape& s, const float* xs, int64_t t, int64_t d0, int64_t d1, int64_t K,
                 float* Bp) {
  const float* x = xs + t * s.Step(s.D);
  for (int64_t b = 0; b < s.B; ++b) {
    const float* row = x + b * s.Row(s.D);
    float* column = Bp + b / kNr * kNr * K + b % kNr;
    for (int64_t d = d0; d < d1; ++d) column[d * kNr] = row[d];
  }
}

// The barrier between the steps of a loop: the threads of one parallel region wait for
// each other by spinning for a while, then sleep on a futex until the last one arrives.
// libgomp's barrier spins briefly and then sleeps when it manages more threads than there
// are cores, which under XLA it does (a team for each XLA thread that calls a kernel);
// a sleep and a wake-up took about 20 us, as long as a small step (alone, in
// experiments/bench/kernel_loop.cc, the small LSTM's inference call 3.3-3.8 -> 5.3-5.8 ms
// with OMP_WAIT_POLICY=passive). Under XLA, a spinning barrier in place of libgomp's: the
// small LSTM's inference step 6.2-6.7 -> 4.1-5.3 ms, the long RNN's training step
// 229-271 -> 141-151 ms (medians, two alternating runs each). But a thread that only
// spins (and yields) holds its core when the others cannot run: with two processes on two
// cores, each timing an LSTM's training step on the kernels (B = 32, H = 128, T = 100),
// the step took 15x its time alone. So the spinning stops after kSpins pauses (longer
// than the threads' usual difference at a step) and the thread sleeps: 160-177 -> 39 ms
// in the pair, level alone (README, Threads).
class StepBarrier {
 public:
  // Called by one thread of the region (`omp single`, whose own barrier publishes it).
  void SetThreads(int threads) { threads_ = threads; }
  void Wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) Wake();
      return;
    }
    for (int64_t spins = 0; spins < kSpins; ++spins) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      Pause();
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (generation_.load(std::memory_order_seq_cst) == generation) Sleep(generation);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  static constexpr int64_t kSpins = 1 << 12;  // pauses: about 100 us here (README, Threads)
  static void Pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }
  // Until generation_ is no longer `seen` (or a spurious wake-up): a futex wait on Linux.
  void Sleep(uint32_t seen) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), FUTEX_WAIT_PRIVATE, seen,
            nullptr, nullptr, 0);
#else
    (void)seen;
    std::this_thread::yield();
#endif
  }
  void Wake() {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), FUTEX_WAKE_PRIVATE, INT32_MAX,
            nullptr, nullptr, 0);
#endif
  }
  int threads_ = 1;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "a futex word");
  std::atomic<int> sleepers_{0};
};

// Inside a parallel region: `step(t, k, j0, hb)` for t = 0 .. T-1 and each block k of
// this thread (its units j0 .. j0 + hb - 1), with a barrier after each step.
template <typename Step>
void Steps(const Blocks& blk, int64_t T, StepBarrier& barrier, Step step) {
  const int64_t nthr = omp_get_num_threads(), tid = omp_get_thread_num();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = tid; k < blk.n; k += nthr) step(t, k, blk.Start(k), blk.Size(k));
    barrier.Wait();
  }
}

// Whether step t of each sequence is one of its own (t < lengths[b]), as 1 or 0, into
// live [B]; all ones without lengths. Returns whether any sequence has ended by step t.
bool LiveSteps(const int32_t* lengths, int64_t t, int64_t B, float* live) {
  bool ended = false;
  for (int64_t b = 0; b < B; ++b) {
    const bool on = lengths == nullptr || t < lengths[b];
    live[b] = on ? 1.0f : 0.0f;
    ended |= !on;
  }
  return ended;
}

void Forward(int64_t kind, const Shape& s, const Blocks& blk, const float* xs, const float* h0,
             const float* c0, const float* W, const float* U, const float* bias,
             const int32_t* lengths, float* hs, float* h_t, float* c_t, float* saved,
             float* cells, bool training) {
  const int64_t T = s.T, B = s.B, D = s.D, H = s.H, G = Gates(kind), S = Saved(kind);
  const int64_t GH = G * H, K = D + H, ldk = Ld(K);
  // W and U transposed side by side, [G*H, K] (rows in block order): row r holds W's
  // column r, then U's.
  float* WUp = static_cast<float*>(Kept(kPackedW, sizeof(float) * GH * ldk));
  float* bp = static_cast<float*>(Kept(kPackedBias, sizeof(float) * (GH + H)));
  // The hidden states transposed, [H, B], in two slots: step t reads h_{t-1} from slot
  // (t + 1) % 2 (the GRU's z h_{t-1}) and writes h_t into slot t % 2, to go to hs.
  float* h_slots = static_cast<float*>(Kept(kStateGrads, sizeof(float) * 2 * H * B));
  // The step's product runs on panel_gemm.h, [W_p U_p] [x_t; h_{t-1}]^T in one pass over
  // K = D + H: each block's rows of [W_p U_p] in panels, and [x_t; h_{t-1}]^T in two slots
  // of column blocks. Step t - 1 writes slot t's rows: each block its units' h_{t-1} as it
  // computes them, and its share of x_t's D rows.
  const int64_t kbf = BlockedFloats(K, B);
  float* panels = static_cast<float*>(Kept(kPanels, sizeof(float) * PanelRows(blk, G) * K));
  float* blocked = static_cast<float*>(Kept(kBlocked, sizeof(float) * 2 * kbf));
  std::fill_n(blocked, 2 * kbf, 0.0f);  // the columns past B stay zero
  PackTransposed(blk, G, W, D, WUp, ldk);
  PackTransposed(blk, G, U, H, WUp + D, ldk);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < H; ++j) bp[blk.Row(G, g, j)] = bias[g * H + j];
  if (kind == kGru) std::memcpy(bp + GH, bias + GH, sizeof(float) * H);  // b_hn, in unit order
  Transpose(h0, B, H, H, h_slots + H * B, B);
  for (int64_t j = 0; j < H; ++j) BlockRow(h_slots + H * B + j * B, B, K, D + j, blocked + kbf);
  BlockInputs(s, xs, 0, 0, D, K, blocked + kbf);
  if (kind == kLstm) Transpose(c0, B, H, H, cells, B);
  // A step's gates go to a small buffer, except the LSTM's in training: they go
  // straight to the step's saved rows, where their activations then replace them. In
  // inference the LSTM's cell states take two [H, B] slots in turn instead of T + 1.
  const int64_t cell_steps = training ? T + 1 : 2;
  const bool in_saved = kind == kLstm && training;

  StepBarrier barrier;
#pragma omp parallel num_threads(Threads(blk))
  {
    FlushDenormals flush;
    omp_set_num_threads(1);  // oneDNN's sgemm inside runs on this thread, in a team of one too
#pragma omp single
    barrier.SetThreads(omp_get_num_threads());
    const int64_t most = (H + blk.n - 1) / blk.n + 1;
    std::vector<float> px(in_saved ? 0 : G * most * B), ph(kind == kGru ? G * most * B : 0);
    std::vector<float> live(B);
    const int64_t nthr = omp_get_num_threads(), tid = omp_get_thread_num();
    for (int64_t k = tid; k < blk.n; k += nthr) {  // this thread's blocks' panels
      const int64_t r0 = G * blk.Start(k), rows = G * blk.Size(k), at = PanelRow(blk, G, k);
      PackPanels(WUp + r0 * ldk, ldk, rows, K, panels + at * K);
    }
    Steps(blk, T, barrier, [&](int64_t t, int64_t k, int64_t j0, int64_t hb) {
      const int64_t r0 = G * j0, at = PanelRow(blk, G, k);
      const float* h_prev = h_slots + ((t + 1) % 2) * H * B;  // [H, B]
      float* h_next = h_slots + (t % 2) * H * B;
      // Where a sequence has ended (lengths), its states stay and its output is zero.
      const bool ended = LiveSteps(lengths, t, B, live.data());
      const float* on = live.data();
      // this block's saved rows at step t (none in inference), and its gates [G*hb, B]
      float* st = training ? saved + t * S * H * B + S * j0 * B : nullptr;
      float* gt = in_saved ? st : px.data();
      const float* ap = panels + at * K;
      const float* operand = blocked + ((t + 1) % 2) * kbf;  // [x_t; h_{t-1}]^T
      if (kind == kGru) {  // the sides apart: the reset gate scales U_n h_{t-1}
        PanelGemmBlocked(G * hb, B, K, 0, D, ap, operand, false, gt, B);
        PanelGemmBlocked(G * hb, B, K, D, K, ap, operand, false, ph.data(), B);
      } else {
        PanelGemmBlocked(G * hb, B, K, 0, K, ap, operand, false, gt, B);
      }
      float* next = blocked + (t % 2) * kbf;  // [x_{t+1}; h_t]^T
      for (int64_t u = 0; u < hb; ++u) {
        const int64_t j = j0 + u;
        float* h_row = h_next + j * B;
        if (kind == kLstm) {  // training: st == gt, the activations overwrite the gates
          float* gi = gt + (0 * hb + u) * B;
          float* gf = gt + (1 * hb + u) * B;
          float* gg = gt + (2 * hb + u) * B;
          float* go = gt + (3 * hb + u) * B;
          const float bi = bp[r0 + u], bf = bp[r0 + hb + u], bg = bp[r0 + 2 * hb + u],
                      bo = bp[r0 + 3 * hb + u];
          const float* c_prev = cells + ((t % cell_steps) * H + j) * B;
          float* c_row = cells + (((t + 1) % cell_steps) * H + j) * B;
          LstmCells(gi, gf, gg, go, bi, bf, bg, bo, c_prev, c_row, h_row, B);
          if (ended)  // the states of the sequences that have ended stay
            for (int64_t b = 0; b < B; ++b)
              if (on[b] == 0.0f) c_row[b] = c_prev[b], h_row[b] = h_prev[j * B + b];
        } else if (kind == kGru) {
          const float* xz = gt + (0 * hb + u) * B;
          const float* xr = gt + (1 * hb + u) * B;
          const float* xn = gt + (2 * hb + u) * B;
          const float* uz = ph.data() + (0 * hb + u) * B;
          const float* ur = ph.data() + (1 * hb + u) * B;
          const float* un = ph.data() + (2 * hb + u) * B;
          float *sz = nullptr, *sr = nullptr, *sn = nullptr, *shn = nullptr;
          if (training) {
            sz = st + (0 * hb + u) * B, sr = st + (1 * hb + u) * B;
            sn = st + (2 * hb + u) * B, shn = st + (3 * hb + u) * B;
          }
          const float bz = bp[r0 + u], br = bp[r0 + hb + u], bn = bp[r0 + 2 * hb + u],
                      bhn = bp[GH + j];
          const float* hpt = h_prev + j * B;
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) {
            const float z = Sigmoid(xz[b] + bz + uz[b]), r = Sigmoid(xr[b] + br + ur[b]);
            const float hn = un[b] + bhn;
            const float n = Tanh(xn[b] + bn + r * hn);
            const float h = (1.0f - z) * n + z * hpt[b];
            if (training) sz[b] = z, sr[b] = r, sn[b] = n, shn[b] = hn;
            h_row[b] = h;
          }
          if (ended)
            for (int64_t b = 0; b < B; ++b)
              if (on[b] == 0.0f) h_row[b] = hpt[b];
        } else {
          const float* a = gt + u * B;
          const float bj = bp[r0 + u];
          if (kind == kRnnTanh) {
#pragma omp simd
            for (int64_t b = 0; b < B; ++b) h_row[b] = Tanh(a[b] + bj);
          } else {
#pragma omp simd
            for (int64_t b = 0; b < B; ++b) h_row[b] = std::max(a[b] + bj, 0.0f);
          }
          if (ended)
            for (int64_t b = 0; b < B; ++b)
              if (on[b] == 0.0f) h_row[b] = h_prev[j * B + b];
        }
      }
      for (int64_t j = j0; j < j0 + hb; ++j) BlockRow(h_next + j * B, B, K, D + j, next);
      if (t + 1 < T) BlockInputs(s, xs, t + 1, D * k / blk.n, D * (k + 1) / blk.n, K, next);
      Transpose(h_next + j0 * B, hb, B, B, hs + t * s.Step(H) + j0, s.Row(H));
      if (ended)
        for (int64_t b = 0; b < B; ++b)
          if (on[b] == 0.0f) std::fill_n(hs + t * s.Step(H) + b * s.Row(H) + j0, hb, 0.0f);
    });
  }
  Transpose(h_slots + ((T - 1) % 2) * H * B, H, B, B, h_t, H);
  if (kind == kLstm) Transpose(cells + (T % cell_steps) * H * B, H, B, B, c_t, H);
}

// Columns of a chunk of gate gradients: the backward pass keeps the gate gradients of
// ChunkSteps(B) steps, multiplies them into the weight gradients and starts again, so
// they stay in the cache, where an array of them over all steps ([G*H, T*B], 131 MB
// for the long LSTM) would go to memory and back.
constexpr int64_t kChunkColumns = 256;
int64_t ChunkSteps(int64_t B) { return std::max<int64_t>(1, kChunkColumns / B); }

// Rows [K, C] of the steps [t0, t0 + K / B) of a sequence [.., C] (step t's batch b at
// row (t - t0) * B + b): where they lie when time-major, else copied into `copy`. With
// `first` (h0 [B, C]), step t stands for step t - 1 of the sequence, step -1 for first.
const float* ChunkRows(const Shape& s, const float* seq, const float* first, int64_t C,
                       int64_t t0, int64_t K, std::vector<float>& copy) {
  const int64_t B = s.B, shift = first != nullptr ? 1 : 0;
  if (!s.batch_major && t0 - shift >= 0) return seq + (t0 - shift) * B * C;
  copy.resize(K * C);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t t = t0 + i / B - shift, b = i % B;
    const float* row = t < 0 ? first + b * C : seq + t * s.Step(C) + b * s.Row(C);
    std::memcpy(copy.data() + i * C, row, sizeof(float) * C);
  }
  return copy.data();
}

void Backward(int64_t kind, const Shape& s, const Blocks& blk, const float* xs, const float* h0,
              const float* W, const float* U, const int32_t* lengths, const float* hs,
              const float* saved, const float* cells, const float* dhs, const float* dh_t,
              const float* dc_t, float* dxs, float* dh0, float* dc0, float* dW, float* dU,
              float* dbias) {
  const int64_t T = s.T, B = s.B, D = s.D, H = s.H, G = Gates(kind), S = Saved(kind);
  const int64_t GH = G * H, ldg = Ld(GH), ldd = Ld(D), ldh = Ld(H);
  const bool two = kind == kGru;  // separate input-side and recurrent-side gate gradients
  // With lengths, a step past a sequence's end passes dh (and the LSTM's dc) straight to
  // the step before, and its gate gradients are zero: the rows of dh_next then hold that
  // direct path before the step's GEMM adds U's, as the GRU's always do.
  const bool direct = two || lengths != nullptr;
  // U with its columns in block order, [H, G*H]: dh_{t-1}^T = U_p dgates_t.
  float* Up = static_cast<float*>(Kept(kPackedU, sizeof(float) * H * ldg));
  PackColumns(blk, G, U, Up, ldg);
  // The step's product on panel_gemm.h, split over the gate rows: each thread multiplies
  // its blocks' columns of Up (in panels, [H, G*hb] each) by its own gate gradients, read
  // where the element-wise part left them, into its part of dh_{t-1} for all the units,
  // [H, B], in one of two slots (step by step); the next step's element-wise part adds
  // the threads' parts for its own units. Per step a thread reads hb*B floats from each
  // of the others, where each read all the threads' G*H*B gate gradients, copied into
  // column blocks (the long LSTM's backward call 221-246 -> 202-214 ms, kernel_loop).
  const int64_t nthr_max = omp_get_max_threads();
  float* Upn = static_cast<float*>(Kept(kPanels, sizeof(float) * PanelFloats(H, GH)));
  float* dh_parts = static_cast<float*>(Kept(kBlocked, sizeof(float) * 2 * nthr_max * H * B));
  auto dh_part = [&](int64_t slot, int64_t q) { return dh_parts + (slot * nthr_max + q) * H * B; };
  // The gate gradients of a chunk of steps, [R*H, ldc], R rows per unit in block order:
  // the G gates' input-side gradients, and for the GRU a fourth row, its n gate's
  // recurrent-side one (the z and r rows serve both sides).
  const int64_t R = two ? G + 1 : G, tau = ChunkSteps(B), ldc = Ld(tau * B);
  float* chunk = static_cast<float*>(Kept(kGrads, sizeof(float) * R * H * ldc));
  // The weight gradients transposed, dU_p^T [G*H, ldh] and dW_p^T [G*H, ldd] with the
  // rows in block order, and the bias gradients in the chunk's row order, accumulated
  // chunk by chunk (the first chunk sets them).
  float* dUt = static_cast<float*>(Kept(kWeightGrads, sizeof(float) * (GH * (ldh + ldd) + R * H)));
  float* dWt = dUt + GH * ldh;
  float* sums = dWt + GH * ldd;
  // dxs = dgates_x^T W_p: each thread's blocks' part of a chunk's rows, [tau*B, D], in two
  // slots (chunk by chunk), summed over the threads after the step's barrier.
  float* Wp = nullptr;
  float* partials = nullptr;
  if (dxs != nullptr) {
    Wp = static_cast<float*>(Kept(kPackedW, sizeof(float) * GH * ldd));
    PackTransposed(blk, G, W, D, Wp, ldd);
    partials = static_cast<float*>(Kept(kPartials, sizeof(float) * 2 * nthr_max * tau * B * D));
  }
  // dh_{t-1}'s direct path (dh_T to begin with, and dh0 at the end) and the LSTM's dc.
  float* dh_next = static_cast<float*>(Kept(kStateGrads, sizeof(float) * 2 * H * B));
  float* dc_next = dh_next + H * B;  // both [H, B]
  Transpose(dh_t, B, H, H, dh_next, B);
  if (kind == kLstm) Transpose(dc_t, B, H, H, dc_next, B);

  StepBarrier barrier;
#pragma omp parallel num_threads(Threads(blk))
  {
    FlushDenormals flush;
    omp_set_num_threads(1);  // oneDNN's sgemm inside runs on this thread, in a team of one too
#pragma omp single
    barrier.SetThreads(omp_get_num_threads());
    const int64_t most = (H + blk.n - 1) / blk.n + 1;
    std::vector<float> dh_out(most * B), h_own(most * B), live(B), dh_sum(B), h_rows, x_rows;
    const int64_t nthr = std::min<int64_t>(omp_get_num_threads(), nthr_max);
    const int64_t tid = omp_get_thread_num();
    const int64_t writers = std::min(nthr, blk.n);  // the threads with blocks
    for (int64_t k = tid; k < blk.n; k += nthr)  // this thread's blocks' panels
      PackPanels(Up + G * blk.Start(k), ldg, H, G * blk.Size(k),
                 Upn + PanelFloats(H, G * blk.Start(k)));
    // dh_t of unit j at step t: its direct path (the dh_T row at the last step) plus the
    // threads' parts of step t + 1's product.
    auto dh_in = [&](int64_t t, int64_t j) -> const float* {
      const float* row = dh_next + j * B;
      if (t == T - 1) return row;
      float* sum = dh_sum.data();
      const float* part = dh_part((t + 1) % 2, 0) + j * B;
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) sum[b] = direct ? row[b] + part[b] : part[b];
      for (int64_t q = 1; q < writers; ++q) {
        part = dh_part((t + 1) % 2, q) + j * B;
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) sum[b] += part[b];
      }
      return sum;
    };
    // The chunk's weight gradient products, this thread's blocks: at its first step t0
    // (the last the loop reaches).
    auto flush_chunk = [&](int64_t t0, int64_t t1) {
      const int64_t K = (t1 - t0) * B;
      const float beta = t1 == T ? 0.0f : 1.0f;  // the first chunk sets the sums
      if (tid >= blk.n) return;
      const float* hr = ChunkRows(s, hs, h0, H, t0, K, h_rows);
      const float* xr = ChunkRows(s, xs, nullptr, D, t0, K, x_rows);
      float* part = dxs != nullptr ? partials + (((t0 / tau) % 2) * nthr_max + tid) * tau * B * D
                                   : nullptr;
      for (int64_t k = tid; k < blk.n; k += nthr) {
        const int64_t j0 = blk.Start(k), hb = blk.Size(k), r0 = G * j0;
        const float* cx = chunk + R * j0 * ldc;  // the input side's G * hb rows
        // dU_p^T += dgates_h [h_{t-1}]: for the GRU the z and r rows, then n's own
        if (two) {
          Gemm('N', 'N', 2 * hb, H, K, cx, ldc, hr, H, beta, dUt + r0 * ldh, ldh);
          Gemm('N', 'N', hb, H, K, cx + 3 * hb * ldc, ldc, hr, H, beta,
               dUt + (r0 + 2 * hb) * ldh, ldh);
        } else {
          Gemm('N', 'N', G * hb, H, K, cx, ldc, hr, H, beta, dUt + r0 * ldh, ldh);
        }
        Gemm('N', 'N', G * hb, D, K, cx, ldc, xr, D, beta, dWt + r0 * ldd, ldd);
        for (int64_t r = 0; r < R * hb; ++r) {
          const float* row = cx + r * ldc;
          float total = 0.0f;
#pragma omp simd reduction(+ : total)
          for (int64_t c = 0; c < K; ++c) total += row[c];
          sums[R * j0 + r] = beta == 0.0f ? total : sums[R * j0 + r] + total;
        }
        if (part != nullptr)  // this block's part of dxs: [K, G*hb] x [G*hb, D]
          Gemm('T', 'N', K, D, G * hb, cx, ldc, Wp + r0 * ldd, ldd, k == tid ? 0.0f : 1.0f,
               part, D);
      }
    };
    // dxs's rows of the chunk from t0 that this thread sums: the threads' parts.
    auto sum_partials = [&](int64_t t0, int64_t t1) {
      const int64_t K = (t1 - t0) * B, i0 = tid * K / nthr, i1 = (tid + 1) * K / nthr;
      const float* slot = partials + ((t0 / tau) % 2) * nthr_max * tau * B * D;
      for (int64_t i = i0; i < i1; ++i) {
        float* dst = dxs + (t0 + i / B) * s.Step(D) + (i % B) * s.Row(D);
        std::memcpy(dst, slot + i * D, sizeof(float) * D);
        for (int64_t p = 1; p < writers; ++p) {
          const float* src = slot + (p * tau * B + i) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
        }
      }
    };
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t t0 = t / tau * tau, t1 = std::min(T, t0 + tau);
      for (int64_t k = tid; k < blk.n; k += nthr) {
        const int64_t j0 = blk.Start(k), hb = blk.Size(k);
        const float* st = saved + t * S * H * B + S * j0 * B;  // [S*hb, B]
        float* dx = chunk + R * j0 * ldc + (t - t0) * B;  // this step's gate gradient rows
        if (dhs != nullptr)
          Transpose(dhs + t * s.Step(H) + j0, B, hb, s.Row(H), dh_out.data(), B);
        LiveSteps(lengths, t, B, live.data());
        const float* on = live.data();
        if (t > 0 && S > 0) Prefetch(st - S * H * B, S * hb * B);  // the next step's
        if (kind == kGru && t == 0)  // h_{t-1} of these units
          Transpose(h0 + j0, B, hb, H, h_own.data(), B);
        else if (kind == kGru)
          Transpose(hs + (t - 1) * s.Step(H) + j0, B, hb, s.Row(H), h_own.data(), B);
        else if (kind != kLstm)  // h_t of these units
          Transpose(hs + t * s.Step(H) + j0, B, hb, s.Row(H), h_own.data(), B);
        for (int64_t u = 0; u < hb; ++u) {
          const int64_t j = j0 + u;
          const float* dho = dh_out.data() + u * B;
          const float* dh = dh_in(t, j);
          float* dh_row = dh_next + j * B;  // the direct path to step t - 1
          if (kind == kLstm) {
            const float* gi = st + (0 * hb + u) * B;
            const float* gf = st + (1 * hb + u) * B;
            const float* gg = st + (2 * hb + u) * B;
            const float* go = st + (3 * hb + u) * B;
            float* di = dx + (0 * hb + u) * ldc;
            float* df = dx + (1 * hb + u) * ldc;
            float* dg = dx + (2 * hb + u) * ldc;
            float* do_ = dx + (3 * hb + u) * ldc;
            const float* c_prev = cells + (t * H + j) * B;
            const float* c_row = cells + ((t + 1) * H + j) * B;
            float* dc_row = dc_next + j * B;
#pragma omp simd
            for (int64_t b = 0; b < B; ++b) {
              const float i = gi[b], f = gf[b], g = gg[b], o = go[b];
              const float tc = Tanh(c_row[b]);
              const bool live_b = on[b] != 0.0f;
              const float d = live_b ? dho[b] + dh[b] : dh[b];
              const float dc = dc_row[b] + d * o * (1.0f - tc * tc);
              di[b] = live_b ? dc * g * i * (1.0f - i) : 0.0f;
              df[b] = live_b ? dc * c_prev[b] * f * (1.0f - f) : 0.0f;
              dg[b] = live_b ? dc * i * (1.0f - g * g) : 0.0f;
              do_[b] = live_b ? d * tc * o * (1.0f - o) : 0.0f;
              dc_row[b] = live_b ? dc * f : dc_row[b];
              if (direct) dh_row[b] = live_b ? 0.0f : d;
            }
          } else if (kind == kGru) {
            const float* sz = st + (0 * hb + u) * B;
            const float* sr = st + (1 * hb + u) * B;
            const float* sn = st + (2 * hb + u) * B;
            const float* shn = st + (3 * hb + u) * B;
            const float* hp = h_own.data() + u * B;
            float* dz = dx + (0 * hb + u) * ldc;
            float* dr = dx + (1 * hb + u) * ldc;
            float* dxn = dx + (2 * hb + u) * ldc;
            float* dhn = dx + (3 * hb + u) * ldc;
#pragma omp simd
            for (int64_t b = 0; b < B; ++b) {
              const float z = sz[b], r = sr[b], n = sn[b];
              const bool live_b = on[b] != 0.0f;
              const float d = live_b ? dho[b] + dh[b] : dh[b];
              const float dan = live_b ? d * (1.0f - z) * (1.0f - n * n) : 0.0f;
              const float daz = live_b ? d * (hp[b] - n) * z * (1.0f - z) : 0.0f;
              const float dar = live_b ? dan * shn[b] * r * (1.0f - r) : 0.0f;
              dz[b] = daz, dr[b] = dar, dxn[b] = dan;
              dhn[b] = live_b ? dan * r : 0.0f;
              dh_row[b] = live_b ? d * z : d;
            }
          } else {
            const float* h = h_own.data() + u * B;
            float* da = dx + u * ldc;
            const bool tanh = kind == kRnnTanh;
#pragma omp simd
            for (int64_t b = 0; b < B; ++b) {
              const bool live_b = on[b] != 0.0f;
              const float d = dho[b] + dh[b];
              const float grad = tanh ? d * (1.0f - h[b] * h[b]) : (h[b] > 0.0f ? d : 0.0f);
              da[b] = live_b ? grad : 0.0f;
              if (direct) dh_row[b] = live_b ? 0.0f : dh[b];
            }
          }
        }
        // this block's part of dh_{t-1} for all the units: the recurrent-side gate
        // gradients, for the GRU its z and r rows and n's own
        const float* Ak = Upn + PanelFloats(H, G * j0);
        float* part = dh_part(t % 2, tid);
        const bool add = k != tid;
        if (two) {
          PanelGemmRange(H, B, G * hb, 0, 2 * hb, Ak, dx, ldc, add, part, B);
          PanelGemmRange(H, B, G * hb, 2 * hb, 3 * hb, Ak, dx + 3 * hb * ldc, ldc, true, part, B);
        } else {
          PanelGemmRange(H, B, G * hb, 0, G * hb, Ak, dx, ldc, add, part, B);
        }
      }
      // The chunk's rows are this thread's own, as is the slot of dxs parts it writes.
      if (t == t0) flush_chunk(t0, t1);
      barrier.Wait();
      if (t == t0 && dxs != nullptr) sum_partials(t0, t1);
    }
    for (int64_t k = tid; k < blk.n; k += nthr)  // dh0 of these units
      for (int64_t j = blk.Start(k); j < blk.Start(k + 1); ++j)
        std::copy_n(dh_in(-1, j), B, dh_next + j * B);
  }
  Transpose(dh_next, H, B, B, dh0, H);
  if (kind == kLstm) Transpose(dc_next, H, B, B, dc0, H);
  UnpackTransposed(blk, G, dUt, ldh, H, dU);
  UnpackTransposed(blk, G, dWt, ldd, D, dW);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < H; ++j) dbias[g * H + j] = sums[blk.Row(R, g, j)];
  if (two)
    for (int64_t j = 0; j < H; ++j) dbias[GH + j] = sums[blk.Row(R, 3, j)];
}

float* Floats(ffi::ResultBuffer<ffi::U8>& buffer) {
  return reinterpret_cast<float*>(buffer->typed_data());
}

ffi::Error CheckArgs(const char* who, const Shape& s, int64_t kind,
                     ffi::Buffer<ffi::S32>& lengths) {
  if (kind < kRnnTanh || kind > kGru)
    return ffi::Error::InvalidArgument(std::string(who) + ": kind must be 0..3, got " +
                                       std::to_string(kind));
  if (s.T <= 0 || s.B <= 0 || s.H <= 0)
    return ffi::Error::InvalidArgument(std::string(who) + ": empty shapes are not supported");
  if (lengths.element_count() != 0 && lengths.element_count() != static_cast<size_t>(s.B))
    return ffi::Error::InvalidArgument(std::string(who) + ": lengths must be empty or [B]");
  return ffi::Error::Success();
}

// The lengths [B], or nullptr where every sequence runs all T steps (empty lengths).
const int32_t* LengthsOrNone(ffi::Buffer<ffi::S32>& lengths) {
  return lengths.element_count() == 0 ? nullptr : lengths.typed_data();
}

ffi::Error ForwardHandler(int64_t batch_major, int64_t kind, int64_t training,
                          int64_t threads,
                          ffi::Buffer<ffi::F32> xs,
                          ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> u,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> lengths,
                          ffi::ResultBuffer<ffi::F32> hs,
                          ffi::ResultBuffer<ffi::F32> h_t, ffi::ResultBuffer<ffi::F32> c_t,
                          ffi::ResultBuffer<ffi::U8> workspace) {
  const Shape s = ShapeOf(xs, h0, batch_major);
  if (auto err = CheckArgs("bptt_fused_forward", s, kind, lengths); err.failure()) return err;
  return Guarded("bptt_fused_forward", [&]() -> ffi::Error {
    const Blocks blk{BlockCount(s.H, threads), s.H};
    const int64_t floats = training ? WorkspaceFloats(kind, s.T, s.B, s.H)
                                    : InferenceFloats(kind, s.B, s.H);
    float* base;
    if (training) {
      if (workspace->size_bytes() != static_cast<int64_t>(sizeof(float)) * floats)
        return ffi::Error::InvalidArgument("bptt_fused_forward: workspace of " +
                                           std::to_string(workspace->size_bytes()) +
                                           " bytes, expected " +
                                           std::to_string(sizeof(float) * floats));
      base = Floats(workspace);
      AdviseHugePages(base, workspace->size_bytes());
    } else {
      base = static_cast<float*>(Kept(kInference, sizeof(float) * floats));
    }
    AdviseHugePages(hs->typed_data(), hs->size_bytes());
    base[0] = static_cast<float>(blk.n);
    float* saved = training ? base + kHeader : nullptr;
    float* cells = training ? saved + SavedFloats(kind, s.T, s.B, s.H) : base + kHeader;
    Forward(kind, s, blk, xs.typed_data(), h0.typed_data(), c0.typed_data(), w.typed_data(),
            u.typed_data(), bias.typed_data(), LengthsOrNone(lengths), hs->typed_data(),
            h_t->typed_data(), c_t->typed_data(), saved, cells, training != 0);
    return ffi::Error::Success();
  });
}

ffi::Error BackwardHandler(int64_t batch_major, int64_t kind, ffi::Buffer<ffi::F32> xs,
                           ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h_t,
                           ffi::Buffer<ffi::F32> c_t, ffi::Buffer<ffi::U8> workspace,
                           ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dh_t,
                           ffi::Buffer<ffi::F32> dc_t, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> dxs,
                           ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0,
                           ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> du,
                           ffi::ResultBuffer<ffi::F32> dbias) {
  const Shape s = ShapeOf(xs, h0, batch_major);
  if (auto err = CheckArgs("bptt_fused_backward", s, kind, lengths); err.failure()) return err;
  return Guarded("bptt_fused_backward", [&]() -> ffi::Error {
    const float* base = reinterpret_cast<const float*>(workspace.typed_data());
    const Blocks blk{static_cast<int64_t>(base[0]), s.H};
    const float* saved = base + kHeader;
    const float* cells = saved + SavedFloats(kind, s.T, s.B, s.H);
    AdviseHugePages(dxs->typed_data(), dxs->size_bytes());
    // An empty dhs is zero (hs is not used), an empty dxs is not wanted (xs is data).
    const float* dhs_or_zero = dhs.element_count() == 0 ? nullptr : dhs.typed_data();
    float* dxs_or_none = dxs->element_count() == 0 ? nullptr : dxs->typed_data();
    Backward(kind, s, blk, xs.typed_data(), h0.typed_data(), w.typed_data(), u.typed_data(),
             LengthsOrNone(lengths), hs.typed_data(), saved, cells, dhs_or_zero, dh_t.typed_data(),
             dc_t.typed_data(), dxs_or_none, dh0->typed_data(), dc0->typed_data(),
             dw->typed_data(), du->typed_data(), dbias->typed_data());
    return ffi::Error::Success();
  });
}

// A dense layer's backward pass, y = x W over the rows of x [N, I] (its leading axes
// flattened into N): dx = g W^T [N, I] and dW = x^T g [I, O] from g [N, O], by oneDNN's
// sgemm, one after the other. An empty dx or dW result is not wanted. XLA:CPU's dot
// runs dW's shape, a long contraction into a small result, well below the machine's
// peak, and beside it XLA would run dx on its own threads at the same time.
ffi::Error DenseBackwardHandler(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                                ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions(), wd = w.dimensions(), gd = g.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || gd.size() != 2 || xd[0] != gd[0] ||
      xd[1] != wd[0] || wd[1] != gd[1])
    return ffi::Error::InvalidArgument(
        "bptt_dense_backward: expected x [N, I], W [I, O] and g [N, O]");
  const int64_t N = xd[0], I = xd[1], O = wd[1];
  const bool want_dx = dx->element_count() != 0, want_dw = dw->element_count() != 0;
  if ((want_dx && dx->element_count() != static_cast<size_t>(N * I)) ||
      (want_dw && dw->element_count() != static_cast<size_t>(I * O)))
    return ffi::Error::InvalidArgument(
        "bptt_dense_backward: dx must be [N, I] or empty, dW [I, O] or empty");
  return Guarded("bptt_dense_backward", [&]() -> ffi::Error {
    if (want_dx) AdviseHugePages(dx->typed_data(), dx->size_bytes());
    if (want_dx) Gemm('N', 'T', N, I, O, g.typed_data(), O, w.typed_data(), O, 0.0f,
                      dx->typed_data(), I);
    if (want_dw) Gemm('T', 'N', I, O, N, x.typed_data(), I, g.typed_data(), O, 0.0f,
                      dw->typed_data(), O);
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttFusedForward, ForwardHandler, ForwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttFusedBackward, BackwardHandler, BackwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttDenseBackward, DenseBackwardHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [N, I]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W [I, O]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g [N, O]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [N, I] or empty
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dW [I, O] or empty

extern "C" {

// The training workspace of a kind and shape in bytes.
int64_t bptt_fused_workspace_bytes(int64_t kind, int64_t T, int64_t B, int64_t H) {
  return static_cast<int64_t>(sizeof(float)) * WorkspaceFloats(kind, T, B, H);
}

// The sets of kept buffers the written-out kernels' calls have made: the most calls
// that ran at once, whichever threads ran them.
int64_t bptt_fused_kept_sets() { return Pool().Made(); }

}  // extern "C"
