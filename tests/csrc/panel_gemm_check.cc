// Reads a product's sizes and operands on stdin, runs bptt_jax/csrc/panel_gemm.h on
// them and writes C on stdout, for tests/test_panel_gemm.py (which compiles this file
// once per instruction set and checks C against NumPy).
//
//   stdin:  M N K ldb trans beta blocked, then A [M, K], B (the floats that ldb and
//           trans describe), C [M, N] (read when beta is 1), whitespace-separated
//   stdout: the register tile it was built with (avx512, avx2 or plain), then C [M, N],
//           one float per line
#include <cstdio>
#include <vector>

#include "panel_gemm.h"

int main() {
  long M, N, K, ldb, trans, blocked;
  float beta;
  if (std::scanf("%ld %ld %ld %ld %ld %f %ld", &M, &N, &K, &ldb, &trans, &beta, &blocked) != 7)
    return 2;
  const long b_floats = trans ? N * ldb : K * ldb;
  std::vector<float> A(M * K), B(b_floats), C(M * N);
  for (float& x : A) std::scanf("%f", &x);
  for (float& x : B) std::scanf("%f", &x);
  for (float& x : C) std::scanf("%f", &x);
  std::vector<float> Ap(PanelFloats(M, K));
  PackPanels(A.data(), K, M, K, Ap.data());
  if (blocked) {  // B [K, N] row-major (ldb = N), put in blocks as the kernels do
    std::vector<float> Bp(BlockedFloats(K, N));
    for (long k = 0; k < K; ++k) BlockRow(B.data() + k * ldb, N, K, k, Bp.data());
    PanelGemmBlocked(M, N, K, Ap.data(), Bp.data(), beta, C.data(), N);
  } else {
    PanelGemm(M, N, K, Ap.data(), B.data(), ldb, trans != 0, beta, C.data(), N);
  }
#if defined(__AVX512F__)
  std::printf("avx512\n");
#elif defined(__AVX2__) && defined(__FMA__)
  std::printf("avx2\n");
#else
  std::printf("plain\n");
#endif
  for (float x : C) std::printf("%.9g\n", x);
  return 0;
}
