"""The written-out kernels' per-step GEMM (``bptt_jax/csrc/panel_gemm.h``) against NumPy.

A small program (``tests/csrc/panel_gemm_check.cc``) is compiled once per register tile
the header has (AVX-512, AVX2 with FMA, plain loops), each where this CPU runs it, and
its products are checked against the same product in float64: edges of every kind
(rows past the last full panel of 6, columns past the last full block of 16, more
than one pass of 256 rows of K), B given transposed and with a longer leading
dimension, B already in column blocks, and C added to.
"""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "csrc" / "panel_gemm_check.cc"
# The compiler the extension is built with (bptt_jax._kernel._build).
COMPILER = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
X86 = platform.machine().lower() in ("x86_64", "amd64")
TILES = {  # the flags that select each of the header's tiles (elsewhere: the plain loop)
    "avx512": ["-mavx512f", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma", "-mno-avx512f"],
    "plain": ["-mno-avx512f", "-mno-avx2", "-mno-fma"] if X86 else [],
}
NEEDS = {"avx512": {"avx512f"}, "avx2": {"avx2", "fma"}, "plain": set()}


def cpu_flags() -> set:
  try:
    with open("/proc/cpuinfo") as f:
      return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                  set())
  except OSError:
    return set()


@pytest.fixture(scope="module", params=sorted(TILES))
def program(request, tmp_path_factory):
  tile = request.param
  if COMPILER is None:
    pytest.skip("no C++ compiler (g++ or $CXX) to build the check")
  if tile != "plain" and not (X86 and NEEDS[tile] <= cpu_flags()):
    pytest.skip(f"this CPU does not run the {tile} tile")
  exe = tmp_path_factory.mktemp("panel_gemm") / f"check_{tile}"
  run = subprocess.run([COMPILER, "-O2", "-std=c++17", *TILES[tile],
                        f"-I{ROOT / 'bptt_jax' / 'csrc'}", str(SOURCE), "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return tile, exe


def product(exe, A, B, C, ldb, trans, beta, blocked):
  M, K = A.shape
  N = C.shape[1]
  head = f"{M} {N} {K} {ldb} {int(trans)} {beta} {int(blocked)}\n"
  body = "\n".join(" ".join(f"{x:.9g}" for x in a.ravel()) for a in (A, B, C))
  run = subprocess.run([str(exe)], input=head + body + "\n", capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, run.stderr
  tile, *values = run.stdout.split()
  return tile, np.array(values, np.float64).reshape(M, N)


# The last column block: 1, 16, 5, 5 or 13 of its 16 columns (AVX2 masks each half).
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (6, 16, 8), (13, 37, 300), (25, 5, 513),
                                     (7, 64, 256), (12, 29, 40), (5, 13, 3)])
@pytest.mark.parametrize("layout", ["rows", "transposed", "blocked"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_product_equals_numpy(program, M, N, K, layout, beta):
  tile, exe = program
  rng = np.random.default_rng(M * 1000 + N * 10 + K)
  A = rng.standard_normal((M, K)).astype(np.float32)
  C = rng.standard_normal((M, N)).astype(np.float32)
  Bt = rng.standard_normal((K, N)).astype(np.float32)  # the product's B [K, N]
  if layout == "transposed":  # B^T [N, K] with 3 more floats per row
    ldb, B = K + 3, np.concatenate([Bt.T, np.full((N, 3), np.nan, np.float32)], axis=1)
  elif layout == "rows":  # B [K, N] with 5 more floats per row
    ldb, B = N + 5, np.concatenate([Bt, np.full((K, 5), np.nan, np.float32)], axis=1)
  else:
    ldb, B = N, Bt
  built, got = product(exe, A, B, C, ldb, layout == "transposed", beta, layout == "blocked")
  assert built == tile
  a, b, c = A.astype(np.float64), Bt.astype(np.float64), C.astype(np.float64)
  want = a @ b + beta * c
  # float32 rounding of a sum of K products: bounded by K ulps of the sum of |terms|
  scale = np.abs(a) @ np.abs(b) + beta * np.abs(c)
  np.testing.assert_array_less(np.abs(got - want), 4 * K * np.finfo(np.float32).eps * scale + 1e-30)
