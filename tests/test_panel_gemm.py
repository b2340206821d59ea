"""The written-out kernels' per-step GEMM (``bptt_jax/csrc/panel_gemm.h``) against NumPy.

A small program (``tests/csrc/panel_gemm_check.cc``) is compiled once per register tile
the header has (AVX-512, AVX2 with FMA, plain loops), each where this CPU runs it, and
its products are checked against the same product in float64: edges of every kind
(rows past the last full panel of 6, columns past the last full block of 16, more
than one pass of 256 rows of K), part of K's range, B read where it lies with a longer
leading dimension or in column blocks, and C added to.
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


def product(exe, A, B, C, k0, k1, ldb, add, blocked):
  M, K = A.shape
  N = C.shape[1]
  head = f"{M} {N} {K} {k0} {k1} {ldb} {int(add)} {int(blocked)}\n"
  body = "\n".join(" ".join(f"{x:.9g}" for x in a.ravel()) for a in (A, B, C))
  run = subprocess.run([str(exe)], input=head + body + "\n", capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, run.stderr
  tile, *values = run.stdout.split()
  return tile, np.array(values, np.float64).reshape(M, N)


# The last column block: 1, 16, 5, 5 or 13 of its 16 columns (AVX2 masks each half).
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (6, 16, 8), (13, 37, 300), (25, 5, 513),
                                     (7, 64, 256), (12, 29, 40), (5, 13, 3)])
@pytest.mark.parametrize("layout", ["rows", "blocked"])
@pytest.mark.parametrize("part", ["all", "range"])
@pytest.mark.parametrize("add", [False, True])
def test_product_equals_numpy(program, M, N, K, layout, part, add):
  tile, exe = program
  rng = np.random.default_rng(M * 1000 + N * 10 + K)
  A = rng.standard_normal((M, K)).astype(np.float32)
  C = rng.standard_normal((M, N)).astype(np.float32)
  Bt = rng.standard_normal((K, N)).astype(np.float32)  # the product's B [K, N]
  # a part: (0, 1) at K = 1, (1, 3) at K = 3, (64, 449) at K = 513 (two passes of 256)
  k0, k1 = (0, K) if part == "all" else (min(K - 1, max(1, K // 8)), K - K // 8)
  if layout == "rows":  # B's rows [k0, k1) with 5 more floats per row
    ldb = N + 5
    B = np.concatenate([Bt[k0:k1], np.full((k1 - k0, 5), np.nan, np.float32)], axis=1)
  else:
    ldb, B = N, Bt
  built, got = product(exe, A, B, C, k0, k1, ldb, add, layout == "blocked")
  assert built == tile
  a, b, c = A[:, k0:k1].astype(np.float64), Bt[k0:k1].astype(np.float64), C.astype(np.float64)
  want = a @ b + add * c
  # float32 rounding of a sum of K products: bounded by K ulps of the sum of |terms|
  scale = np.abs(a) @ np.abs(b) + add * np.abs(c)
  np.testing.assert_array_less(np.abs(got - want), 4 * K * np.finfo(np.float32).eps * scale + 1e-30)
