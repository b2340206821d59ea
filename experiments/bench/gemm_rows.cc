// The oneDNN sgemm calls of the written-out kernels (bptt_jax/csrc/fused_rnn.cc), timed
// alone: the weight-gradient product with rows whose length is a multiple of a high power
// of two and with the rows padded as the kernels pad them (Ld), and the per-step products.
//
//   g++ -O3 -march=native -fopenmp experiments/bench/gemm_rows.cc -o /tmp/gemm_rows
//       -I.venv/include -L.venv/lib -ldnnl -Wl,-rpath,$PWD/.venv/lib    (one line)
//   /tmp/gemm_rows 16 2000 256 4     # B T H G: the long LSTM
//
// Prints the best of a few calls on two threads, each computing half of the result:
//   dU, [T*B, G*H] rows   dU_p = hs^T dgates with dgates as [T*B, G*H] (the kernels' layout
//                         until it changed), rows G*H floats apart (4 KiB for the long
//                         LSTM) and Ld(G*H) apart
//   dU, [G*H, T*B] rows   dU_p^T = dgates hs with dgates as [G*H, T*B] (the layout now),
//                         rows T*B and Ld(T*B) apart
//   backward step         dh_{t-1}^T [H/2, B] = U_p [H/2, G*H] dgates_t [G*H, B], U_p's rows
//                         G*H and Ld(G*H) apart
//   forward step          gates_t[rows] = U_p[rows] h_{t-1}^T, G*H/2 rows, N = B, K = H,
//                         U_p's rows H and Ld(H) apart

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "oneapi/dnnl/dnnl.h"

namespace {

int64_t Ld(int64_t n) {  // as in fused_rnn.cc
  const int64_t m = (n + 15) / 16 * 16;
  return (m / 16) % 2 == 1 ? m : m + 16;
}

// n floats, each 1/100, 64-byte aligned as the kernels' kept buffers are.
std::unique_ptr<float[], decltype(&std::free)> Floats(int64_t n) {
  float* p = static_cast<float*>(std::aligned_alloc(64, (4 * n + 63) / 64 * 64));
  for (int64_t i = 0; i < n; ++i) p[i] = 0.01f;
  return {p, &std::free};
}

template <class F>
double Best(F f, int repeats) {
  f();
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// C [M, N] = A [M, K] B [K, N], the rows of A and C split over two threads.
void Split(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
           int64_t ldb, float* C, int64_t ldc) {
#pragma omp parallel num_threads(2)
  {
    const int64_t t = omp_get_thread_num(), m0 = t * M / 2, m1 = (t + 1) * M / 2;
    dnnl_sgemm('N', 'N', m1 - m0, N, K, 1.0f, A + m0 * lda, lda, B, ldb, 0.0f, C + m0 * ldc, ldc);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s B T H G (batch, steps, hidden units, gates)\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atol(argv[1]), T = std::atol(argv[2]), H = std::atol(argv[3]),
                G = std::atol(argv[4]);
  const int64_t GH = G * H, TB = T * B;
  auto hs = Floats(TB * H), dU = Floats(GH * Ld(GH)), dgates = Floats(GH * Ld(TB));
  const auto report = [](const char* what, int64_t ld, double s, double flops) {
    std::printf("%-22s rows %6lld apart %9.1f us %6.1f GFLOP/s\n", what,
                static_cast<long long>(ld), s * 1e6, flops / s / 1e9);
  };
  const double flops = 2.0 * GH * H * TB;
  for (const int64_t ld : {GH, Ld(GH)}) {  // [T*B, G*H]: the columns of dU split
    const double s = Best([&] {
#pragma omp parallel num_threads(2)
      {
        const int64_t t = omp_get_thread_num(), n0 = t * GH / 2, n1 = (t + 1) * GH / 2;
        dnnl_sgemm('T', 'N', H, n1 - n0, TB, 1.0f, hs.get(), H, dgates.get() + n0, ld, 0.0f,
                   dU.get() + n0, ld);
      }
    }, 3);
    report("dU, [T*B, G*H] rows", ld, s, flops);
  }
  for (const int64_t ld : {TB, Ld(TB)}) {  // [G*H, T*B]: the rows of dU^T split
    const double s = Best([&] { Split(GH, H, TB, dgates.get(), ld, hs.get(), H, dU.get(), H); }, 3);
    report("dU, [G*H, T*B] rows", ld, s, flops);
  }
  auto Up = Floats(H * Ld(GH)), dg = Floats(GH * B), dh = Floats(H * B);
  for (const int64_t ld : {GH, Ld(GH)}) {
    const double s = Best([&] { Split(H, B, GH, Up.get(), ld, dg.get(), B, dh.get(), B); }, 500);
    report("backward step", ld, s, 2.0 * GH * H * B);
  }
  auto Wp = Floats(GH * Ld(H)), h = Floats(B * H), gates = Floats(GH * B);
  for (const int64_t ld : {H, Ld(H)}) {
    const double s = Best([&] {
#pragma omp parallel num_threads(2)
      {
        const int64_t t = omp_get_thread_num(), r0 = t * GH / 2, r1 = (t + 1) * GH / 2;
        dnnl_sgemm('N', 'T', r1 - r0, B, H, 1.0f, Wp.get() + r0 * ld, ld, h.get(), H, 0.0f,
                   gates.get() + r0 * B, B);
      }
    }, 500);
    report("forward step", ld, s, 2.0 * GH * H * B);
  }
  return 0;
}
