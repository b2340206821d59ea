// The element-wise linear recurrence s_t = a_t * s_{t-1} + b_t and its BPTT, for XLA:CPU.
//
//   bptt_linear_scan_forward(a, b, s0) -> states
//   bptt_linear_scan_backward(a, s0, states, g) -> (da, db, ds0)
//
// a, b, states, g: [P, T, Q] float32, P independent blocks of Q units over T
// steps (time-major [T, B, N] is P = 1, Q = B * N; batch-major [B, T, N] is
// P = B, Q = N); s0: [P, Q].
// The backward pass is the reverse recurrence of the adjoint,
//
//   lambda_t = g_t + a_{t+1} lambda_{t+1},  da_t = lambda_t s_{t-1},  db_t = lambda_t,
//   ds0 = a_1 lambda_1,
//
// in one pass from the end. Units are independent: OpenMP threads take
// contiguous ranges of the Q units (in every block), and each walks its range
// through time, so every thread streams through rows of the arrays once.

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// [begin, end) of the units thread `k` of `n` takes, in blocks of 16 (a cache line of floats).
void Block(int64_t M, int k, int n, int64_t* begin, int64_t* end) {
  const int64_t lines = (M + 15) / 16;
  *begin = std::min(M, lines * k / n * 16);
  *end = std::min(M, lines * (k + 1) / n * 16);
}

int Threads(int64_t work) {  // below ~64K element-steps one thread is faster than waking two
  return work < (1 << 16) ? 1 : omp_get_max_threads();
}

struct Shape {
  int64_t P, T, Q;
};

Shape ShapeOf(ffi::Buffer<ffi::F32>& x) {
  auto d = x.dimensions();
  return Shape{d[0], d[1], d[2]};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> s0,
                   ffi::ResultBuffer<ffi::F32> states) {
  const auto [P, T, Q] = ShapeOf(a);
  const float* A = a.typed_data();
  const float* Bv = b.typed_data();
  const float* S0 = s0.typed_data();
  float* S = states->typed_data();
#pragma omp parallel num_threads(Threads(P * T * Q))
  {
    int64_t lo, hi;
    Block(Q, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    for (int64_t p = 0; p < P && T > 0; ++p) {
      const int64_t base = p * T * Q;
      for (int64_t q = lo; q < hi; ++q) S[base + q] = A[base + q] * S0[p * Q + q] + Bv[base + q];
      for (int64_t t = 1; t < T; ++t) {
        const float* at = A + base + t * Q;
        const float* bt = Bv + base + t * Q;
        const float* prev = S + base + (t - 1) * Q;
        float* st = S + base + t * Q;
#pragma omp simd
        for (int64_t q = lo; q < hi; ++q) st[q] = at[q] * prev[q] + bt[q];
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> s0,
                    ffi::Buffer<ffi::F32> states, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> db,
                    ffi::ResultBuffer<ffi::F32> ds0) {
  const auto [P, T, Q] = ShapeOf(a);
  const float* A = a.typed_data();
  const float* S0 = s0.typed_data();
  const float* S = states.typed_data();
  const float* G = g.typed_data();
  float* dA = da->typed_data();
  float* dB = db->typed_data();  // lambda, which the next (earlier) step reads back
  float* dS0 = ds0->typed_data();
#pragma omp parallel num_threads(Threads(P * T * Q))
  {
    int64_t lo, hi;
    Block(Q, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t base = p * T * Q;
      for (int64_t t = T - 1; t >= 0; --t) {
        const float* gt = G + base + t * Q;
        const float* prev = t > 0 ? S + base + (t - 1) * Q : S0 + p * Q;
        float* lam = dB + base + t * Q;
        float* dat = dA + base + t * Q;
        if (t == T - 1) {
#pragma omp simd
          for (int64_t q = lo; q < hi; ++q) lam[q] = gt[q];
        } else {
          const float* a_next = A + base + (t + 1) * Q;
          const float* lam_next = lam + Q;
#pragma omp simd
          for (int64_t q = lo; q < hi; ++q) lam[q] = gt[q] + a_next[q] * lam_next[q];
        }
#pragma omp simd
        for (int64_t q = lo; q < hi; ++q) dat[q] = lam[q] * prev[q];
      }
      for (int64_t q = lo; q < hi; ++q) dS0[p * Q + q] = T > 0 ? A[base + q] * dB[base + q] : 0.0f;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttLinearScanForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // states

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttLinearScanBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // states
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // da
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Ret<ffi::Buffer<ffi::F32>>());  // ds0
