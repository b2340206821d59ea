// The element-wise linear recurrence s_t = a_t * s_{t-1} + b_t and its BPTT, for XLA:CPU.
//
//   bptt_linear_scan_forward(a, b, s0) -> states
//   bptt_linear_scan_backward(a, s0, states, g) -> (da, db, ds0)
//
// a, b, states, g: [T, M] float32 (M = B * N, the units side by side); s0: [M].
// The backward pass is the reverse recurrence of the adjoint,
//
//   lambda_t = g_t + a_{t+1} lambda_{t+1},  da_t = lambda_t s_{t-1},  db_t = lambda_t,
//   ds0 = a_1 lambda_1,
//
// in one pass from the end. Units are independent: OpenMP threads take
// contiguous blocks of them, and each walks its block through time, so every
// thread streams through rows of the arrays once.

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

ffi::Error Forward(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> s0,
                   ffi::ResultBuffer<ffi::F32> states) {
  const int64_t T = a.dimensions()[0], M = a.dimensions()[1];
  const float* A = a.typed_data();
  const float* Bv = b.typed_data();
  const float* S0 = s0.typed_data();
  float* S = states->typed_data();
#pragma omp parallel num_threads(Threads(T * M))
  {
    int64_t lo, hi;
    Block(M, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    if (T > 0) {
      for (int64_t m = lo; m < hi; ++m) S[m] = A[m] * S0[m] + Bv[m];
    }
    for (int64_t t = 1; t < T; ++t) {
      const float* at = A + t * M;
      const float* bt = Bv + t * M;
      const float* prev = S + (t - 1) * M;
      float* st = S + t * M;
#pragma omp simd
      for (int64_t m = lo; m < hi; ++m) st[m] = at[m] * prev[m] + bt[m];
    }
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> s0,
                    ffi::Buffer<ffi::F32> states, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> db,
                    ffi::ResultBuffer<ffi::F32> ds0) {
  const int64_t T = a.dimensions()[0], M = a.dimensions()[1];
  const float* A = a.typed_data();
  const float* S0 = s0.typed_data();
  const float* S = states.typed_data();
  const float* G = g.typed_data();
  float* dA = da->typed_data();
  float* dB = db->typed_data();  // lambda, which the next (earlier) step reads back
  float* dS0 = ds0->typed_data();
#pragma omp parallel num_threads(Threads(T * M))
  {
    int64_t lo, hi;
    Block(M, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* gt = G + t * M;
      const float* prev = t > 0 ? S + (t - 1) * M : S0;
      float* lam = dB + t * M;
      float* dat = dA + t * M;
      if (t == T - 1) {
#pragma omp simd
        for (int64_t m = lo; m < hi; ++m) lam[m] = gt[m];
      } else {
        const float* a_next = A + (t + 1) * M;
        const float* lam_next = dB + (t + 1) * M;
#pragma omp simd
        for (int64_t m = lo; m < hi; ++m) lam[m] = gt[m] + a_next[m] * lam_next[m];
      }
#pragma omp simd
      for (int64_t m = lo; m < hi; ++m) dat[m] = lam[m] * prev[m];
    }
    for (int64_t m = lo; m < hi; ++m) dS0[m] = T > 0 ? A[m] * dB[m] : 0.0f;
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
