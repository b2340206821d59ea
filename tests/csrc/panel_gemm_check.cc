// Reads a product's sizes and operands on stdin, runs bptt_jax/csrc/panel_gemm.h on
// them and writes C on stdout, for tests/test_panel_gemm.py (which compiles this file
// once per instruction set and checks C against NumPy).
//
//   stdin:  M N K k0 k1 ldb add blocked, then A [M, K], B, C [M, N] (read when add is
//           1), whitespace-separated: C (+)= A[:, k0:k1] B with B [k1 - k0, N] row-major
//           with leading dimension ldb, or, with blocked, B [K, N] (ldb = N) of which
//           rows [k0, k1) count, put in column blocks as the kernels do
//   stdout: the register tile it was built with (avx512, avx2 or plain), then C [M, N],
//           one float per line
#include <cstdio>
#include <vector>

#include "panel_gemm.h"

int main() {
  long M, N, K, k0, k1, ldb, add, blocked;
  if (std::scanf("%ld %ld %ld %ld %ld %ld %ld %ld", &M, &N, &K, &k0, &k1, &ldb, &add,
                 &blocked) != 8)
    return 2;
  std::vector<float> A(M * K), B((blocked ? K : k1 - k0) * ldb), C(M * N);
  for (float& x : A) std::scanf("%f", &x);
  for (float& x : B) std::scanf("%f", &x);
  for (float& x : C) std::scanf("%f", &x);
  std::vector<float> Ap(PanelFloats(M, K));
  PackPanels(A.data(), K, M, K, Ap.data());
  if (blocked) {
    std::vector<float> Bp(BlockedFloats(K, N));
    for (long k = 0; k < K; ++k) BlockRow(B.data() + k * ldb, N, K, k, Bp.data());
    PanelGemmBlocked(M, N, K, k0, k1, Ap.data(), Bp.data(), add != 0, C.data(), N);
  } else {
    PanelGemmRange(M, N, K, k0, k1, Ap.data(), B.data(), ldb, add != 0, C.data(), N);
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
