// Whole-sequence LSTM kernels for XLA:CPU, written out: one GEMM per step, the gates in place.
//
//   bptt_fused_forward(xs, h0, c0, W, U, bias) -> (hs, h_T, c_T, workspace)
//   bptt_fused_backward(xs, h0, c0, W, U, bias, hs, h_T, c_T, workspace, dhs, dh_T, dc_T)
//       -> (dxs, dh0, dc0, dW, dU, dbias)
//
// The same calls and layouts as the oneDNN handlers (onednn_rnn.cc): float32,
// time-major xs [T, B, D] and hs [T, B, H], states [B, H], W [D, 4H], U [H, 4H],
// bias [4H], gate blocks (i, f, g, o).
//
// The hidden units are split into one block per thread. Gates are kept
// transposed, one row per (gate, unit) and one column per (step, row of the
// batch): a matrix [4H, T*B] whose rows are ordered block by block, so that a
// thread's gates are contiguous rows. Each step a thread computes its rows,
//
//   gates[rows, t] += U^T[rows] h_{t-1}^T     (M = 4 * block, N = B, K = H)
//
// and then its units' cell and hidden states, and waits for the others (one
// barrier per step). The GEMM reads h_{t-1} straight out of hs (the
// transposed operand of oneDNN's sgemm), and a product with the gates as the
// rows runs near the machine's peak even for small B, where the [B, H] x [H,
// 4H] product does not. The input projection for all steps is one GEMM before
// the loop; the backward pass is the same loop in reverse (dh_{t-1}^T = U_p
// dgates_t, one GEMM per step and block) and then four large GEMMs for dW, dU
// and dxs. The forward pass leaves the gates (after their nonlinearities) and
// the cell states in the workspace for it.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kept.h"
#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------
// exp, sigmoid and tanh in float32 that the compiler vectorizes (no calls, no
// branches). Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6
// polynomial for e^r and 2^n put into the exponent bits; about 1 ulp. Beyond
// the float range: 0 and +inf. NaN stays NaN (every comparison keeps it).

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

constexpr int64_t kGates = 4;
constexpr int64_t kHeader = 16;  // floats before the workspace's arrays: [0] the block count

// Units [Start(k), Start(k + 1)) form block k; the gate rows of block k start at 4 Start(k).
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
  // The row of gate g of unit j.
  int64_t Row(int64_t g, int64_t j) const {
    const int64_t k = Block(j);
    return kGates * Start(k) + g * Size(k) + (j - Start(k));
  }
};

int64_t BlockCount(int64_t H) {
  // One block per thread, each of at least 8 units.
  return std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), H / 8));
}

int64_t WorkspaceFloats(int64_t T, int64_t B, int64_t H) {
  return kHeader + kGates * H * T * B + H * (T + 1) * B;  // gates [T, 4H, B], cells [T+1, H, B]
}

// W [D, 4H] -> Wp [4H, D] with the rows in block order (and U alike).
void PackTransposed(const Blocks& blk, const float* W, int64_t D, float* Wp) {
  const int64_t H = blk.H;
  for (int64_t g = 0; g < kGates; ++g)
    for (int64_t j = 0; j < H; ++j) {
      float* row = Wp + blk.Row(g, j) * D;
      for (int64_t d = 0; d < D; ++d) row[d] = W[d * kGates * H + g * H + j];
    }
}

// out [cols, rows] = in [rows, cols]^T, for row-major arrays with leading dimensions.
void Transpose(const float* in, int64_t rows, int64_t cols, int64_t ld_in, float* out,
               int64_t ld_out) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
          out[c * ld_out + r] = in[r * ld_in + c];
}

struct Shape {
  int64_t T, B, D, H;
};

Shape ShapeOf(ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& h0) {
  auto x = xs.dimensions();
  return {x[0], x[1], x[2], h0.dimensions()[1]};
}

// The forward pass. `gates` [T, 4H, B] (rows in block order) and `cells`
// [T+1, H, B] (cells[0] = c0^T) are the workspace's arrays, or kept buffers for
// inference. Each step's gates are one contiguous [4H, B] block.
void LstmForward(const Shape& s, const Blocks& blk, const float* xs, const float* h0,
                 const float* c0, const float* W, const float* U, const float* bias, float* hs,
                 float* h_t, float* c_t, float* gates, float* cells) {
  const int64_t T = s.T, B = s.B, D = s.D, H = s.H, G = kGates * H;
  float* Wp = static_cast<float*>(Kept(kPackedW, sizeof(float) * G * D));
  float* Up = static_cast<float*>(Kept(kPackedU, sizeof(float) * G * H));
  float* bp = static_cast<float*>(Kept(kPackedBias, sizeof(float) * G));
  PackTransposed(blk, W, D, Wp);
  PackTransposed(blk, U, H, Up);
  for (int64_t g = 0; g < kGates; ++g)
    for (int64_t j = 0; j < H; ++j) bp[blk.Row(g, j)] = bias[g * H + j];
  Transpose(c0, B, H, H, cells, B);

#pragma omp parallel
  {
    const int64_t nthr = omp_get_num_threads(), tid = omp_get_thread_num();
    std::vector<float> h_block;
    for (int64_t t = 0; t < T; ++t) {
      const float* h_prev = t == 0 ? h0 : hs + (t - 1) * B * H;
      for (int64_t k = tid; k < blk.n; k += nthr) {
        const int64_t j0 = blk.Start(k), hb = blk.Size(k), r0 = kGates * j0;
        float* gt = gates + (t * G + r0) * B;
        // gates_t[rows] = Wp[rows] x_t^T + Up[rows] h_{t-1}^T
        Gemm('N', 'T', kGates * hb, B, D, Wp + r0 * D, D, xs + t * B * D, D, 0.0f, gt, B);
        Gemm('N', 'T', kGates * hb, B, H, Up + r0 * H, H, h_prev, H, 1.0f, gt, B);
        h_block.resize(hb * B);
        for (int64_t u = 0; u < hb; ++u) {
          float* gi = gt + (0 * hb + u) * B;
          float* gf = gt + (1 * hb + u) * B;
          float* gg = gt + (2 * hb + u) * B;
          float* go = gt + (3 * hb + u) * B;
          const float bi = bp[r0 + u], bf = bp[r0 + hb + u], bg = bp[r0 + 2 * hb + u],
                      bo = bp[r0 + 3 * hb + u];
          const float* c_prev = cells + (t * H + j0 + u) * B;
          float* c_row = cells + ((t + 1) * H + j0 + u) * B;
          float* h_row = h_block.data() + u * B;
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
        Transpose(h_block.data(), hb, B, B, hs + t * B * H + j0, H);
      }
#pragma omp barrier
    }
  }
  std::memcpy(h_t, hs + (T - 1) * B * H, sizeof(float) * B * H);
  Transpose(cells + T * H * B, H, B, B, c_t, H);
}

void LstmBackward(const Shape& s, const Blocks& blk, const float* xs, const float* h0,
                  const float* W, const float* U, const float* hs, const float* gates,
                  const float* cells, const float* dhs, const float* dh_t, const float* dc_t,
                  float* dxs, float* dh0, float* dc0, float* dW, float* dU, float* dbias) {
  const int64_t T = s.T, B = s.B, D = s.D, H = s.H, TB = T * B, G = kGates * H;
  // U with its columns in block order, [H, 4H]: dh_{t-1}^T = U_p dgates_t.
  float* Up = static_cast<float*>(Kept(kPackedU, sizeof(float) * H * G));
  for (int64_t k = 0; k < H; ++k)
    for (int64_t g = 0; g < kGates; ++g)
      for (int64_t j = 0; j < H; ++j) Up[k * G + blk.Row(g, j)] = U[k * G + g * H + j];
  // dgates [T, 4H, B] step by step, then as rows [T*B, 4H] for the weight gradients.
  float* dgates = static_cast<float*>(Kept(kGrads, sizeof(float) * 2 * G * TB));
  float* drows = dgates + G * TB;
  float* dh_next = static_cast<float*>(Kept(kStateGrads, sizeof(float) * 2 * H * B));
  float* dc_next = dh_next + H * B;  // both [H, B]
  Transpose(dh_t, B, H, H, dh_next, B);
  Transpose(dc_t, B, H, H, dc_next, B);

#pragma omp parallel
  {
    const int64_t nthr = omp_get_num_threads(), tid = omp_get_thread_num();
    std::vector<float> dh_out;
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t k = tid; k < blk.n; k += nthr) {
        const int64_t j0 = blk.Start(k), hb = blk.Size(k), r0 = kGates * j0;
        const float* gt = gates + (t * G + r0) * B;
        float* dt = dgates + (t * G + r0) * B;
        dh_out.resize(hb * B);
        Transpose(dhs + t * B * H + j0, B, hb, H, dh_out.data(), B);
        for (int64_t u = 0; u < hb; ++u) {
          const float* gi = gt + (0 * hb + u) * B;
          const float* gf = gt + (1 * hb + u) * B;
          const float* gg = gt + (2 * hb + u) * B;
          const float* go = gt + (3 * hb + u) * B;
          float* di = dt + (0 * hb + u) * B;
          float* df = dt + (1 * hb + u) * B;
          float* dg = dt + (2 * hb + u) * B;
          float* do_ = dt + (3 * hb + u) * B;
          const float* c_prev = cells + (t * H + j0 + u) * B;
          const float* c_row = cells + ((t + 1) * H + j0 + u) * B;
          const float* dh_o = dh_out.data() + u * B;
          float* dh_row = dh_next + (j0 + u) * B;
          float* dc_row = dc_next + (j0 + u) * B;
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) {
            const float i = gi[b], f = gf[b], g = gg[b], o = go[b];
            const float tc = Tanh(c_row[b]);
            const float dh = dh_o[b] + dh_row[b];
            const float dc = dc_row[b] + dh * o * (1.0f - tc * tc);
            di[b] = dc * g * i * (1.0f - i);
            df[b] = dc * c_prev[b] * f * (1.0f - f);
            dg[b] = dc * i * (1.0f - g * g);
            do_[b] = dh * tc * o * (1.0f - o);
            dc_row[b] = dc * f;
          }
        }
      }
#pragma omp barrier
      for (int64_t k = tid; k < blk.n; k += nthr) {
        const int64_t j0 = blk.Start(k), hb = blk.Size(k);
        Gemm('N', 'N', hb, B, G, Up + j0 * G, G, dgates + t * G * B, B, 0.0f, dh_next + j0 * B,
             B);
      }
      // No barrier: the next step's element-wise part reads only this thread's rows of
      // dh_next and writes another step's block of dgates than the GEMMs read.
    }
#pragma omp barrier
#pragma omp for
    for (int64_t t = 0; t < T; ++t) Transpose(dgates + t * G * B, G, B, B, drows + t * B * G, G);
  }
  Transpose(dh_next, H, B, B, dh0, H);
  Transpose(dc_next, H, B, B, dc0, H);

  // Weight gradients in block order, then back to the gate order.
  float* dWp = static_cast<float*>(Kept(kPackedW, sizeof(float) * std::max(D, H) * G));
  // dU_p = [h0; hs[0 .. T-2]]^T drows
  Gemm('T', 'N', H, G, B, h0, H, drows, G, 0.0f, dWp, G);
  Gemm('T', 'N', H, G, TB - B, hs, H, drows + B * G, G, 1.0f, dWp, G);
  for (int64_t k = 0; k < H; ++k)
    for (int64_t g = 0; g < kGates; ++g)
      for (int64_t j = 0; j < H; ++j) dU[k * G + g * H + j] = dWp[k * G + blk.Row(g, j)];
  // dW_p = xs^T drows
  Gemm('T', 'N', D, G, TB, xs, D, drows, G, 0.0f, dWp, G);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t g = 0; g < kGates; ++g)
      for (int64_t j = 0; j < H; ++j) dW[d * G + g * H + j] = dWp[d * G + blk.Row(g, j)];
  // dbias = the column sums of drows
  float* sums = dWp;
  std::fill(sums, sums + G, 0.0f);
  for (int64_t r = 0; r < TB; ++r) {
    const float* row = drows + r * G;
#pragma omp simd
    for (int64_t c = 0; c < G; ++c) sums[c] += row[c];
  }
  for (int64_t g = 0; g < kGates; ++g)
    for (int64_t j = 0; j < H; ++j) dbias[g * H + j] = sums[blk.Row(g, j)];
  // dxs = drows W_p, with W_p [4H, D] (rows in block order)
  float* Wp = static_cast<float*>(Kept(kPackedU, sizeof(float) * G * D));
  PackTransposed(blk, W, D, Wp);
  Gemm('N', 'N', TB, D, G, drows, G, Wp, D, 0.0f, dxs, D);
}

float* Floats(ffi::ResultBuffer<ffi::U8>& buffer) {
  return reinterpret_cast<float*>(buffer->typed_data());
}

ffi::Error CheckShapes(const char* who, const Shape& s, int64_t kind) {
  if (kind != 2)
    return ffi::Error::InvalidArgument(std::string(who) +
                                       ": only the LSTM (kind 2) is written out, got kind " +
                                       std::to_string(kind));
  if (s.T <= 0 || s.B <= 0 || s.H <= 0)
    return ffi::Error::InvalidArgument(std::string(who) + ": empty shapes are not supported");
  return ffi::Error::Success();
}

ffi::Error Forward(int64_t kind, int64_t training, ffi::Buffer<ffi::F32> xs,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> h_t,
                   ffi::ResultBuffer<ffi::F32> c_t, ffi::ResultBuffer<ffi::U8> workspace) {
  const Shape s = ShapeOf(xs, h0);
  if (auto err = CheckShapes("bptt_fused_forward", s, kind); err.failure()) return err;
  return Guarded("bptt_fused_forward", [&]() -> ffi::Error {
    const Blocks blk{BlockCount(s.H), s.H};
    const int64_t floats = WorkspaceFloats(s.T, s.B, s.H);
    float* base;
    if (training) {
      if (workspace->size_bytes() != static_cast<int64_t>(sizeof(float)) * floats)
        return ffi::Error::InvalidArgument("bptt_fused_forward: workspace of " +
                                           std::to_string(workspace->size_bytes()) +
                                           " bytes, expected " +
                                           std::to_string(sizeof(float) * floats));
      base = Floats(workspace);
    } else {
      base = static_cast<float*>(Kept(kInference, sizeof(float) * floats));
    }
    base[0] = static_cast<float>(blk.n);
    float* gates = base + kHeader;
    float* cells = gates + kGates * s.H * s.T * s.B;
    LstmForward(s, blk, xs.typed_data(), h0.typed_data(), c0.typed_data(), w.typed_data(),
                u.typed_data(), bias.typed_data(), hs->typed_data(), h_t->typed_data(),
                c_t->typed_data(), gates, cells);
    return ffi::Error::Success();
  });
}

ffi::Error Backward(int64_t kind, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h0,
                    ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> u,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> hs,
                    ffi::Buffer<ffi::F32> h_t, ffi::Buffer<ffi::F32> c_t,
                    ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::F32> dhs,
                    ffi::Buffer<ffi::F32> dh_t, ffi::Buffer<ffi::F32> dc_t,
                    ffi::ResultBuffer<ffi::F32> dxs, ffi::ResultBuffer<ffi::F32> dh0,
                    ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dw,
                    ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> dbias) {
  const Shape s = ShapeOf(xs, h0);
  if (auto err = CheckShapes("bptt_fused_backward", s, kind); err.failure()) return err;
  return Guarded("bptt_fused_backward", [&]() -> ffi::Error {
    const float* base = reinterpret_cast<const float*>(workspace.typed_data());
    const Blocks blk{static_cast<int64_t>(base[0]), s.H};
    const float* gates = base + kHeader;
    const float* cells = gates + kGates * s.H * s.T * s.B;
    LstmBackward(s, blk, xs.typed_data(), h0.typed_data(), w.typed_data(), u.typed_data(),
                 hs.typed_data(), gates, cells, dhs.typed_data(),
                 dh_t.typed_data(), dc_t.typed_data(), dxs->typed_data(), dh0->typed_data(),
                 dc0->typed_data(), dw->typed_data(), du->typed_data(), dbias->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttFusedForward, Forward,
                              ffi::Ffi::Bind()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("training")
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // U
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_T
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttFusedBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Attr<int64_t>("kind")
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // U
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c_T
                                  .Arg<ffi::Buffer<ffi::U8>>()   // workspace
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dc_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dxs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dU
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias

extern "C" {

// The training workspace of the written-out LSTM in bytes.
int64_t bptt_fused_workspace_bytes(int64_t T, int64_t B, int64_t H) {
  return static_cast<int64_t>(sizeof(float)) * WorkspaceFloats(T, B, H);
}

}  // extern "C"
