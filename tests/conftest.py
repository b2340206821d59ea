"""Strict numerics for every test: no implicit rank promotion, float32 by default.

float32 is what users run, so tests run with ``jax_enable_x64`` off. A test whose
exactness needs float64 (comparisons near 1e-10, finite differences,
``check_grads``) is marked ``@pytest.mark.float64`` and runs inside
``jax.enable_x64(True)``; a ``pytest.param(..., marks=pytest.mark.float64)``
does the same for one parametrization. Arrays such a test uses must be made
inside it (or be numpy arrays): a ``jnp`` array made at import time is float32.

Test arrays are tiny, so compiling dominates: XLA's backend optimizations are
turned down for the suite (and the experiment scripts it starts), which changes
no result a test checks, only how long LLVM works on each kernel.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS"),
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
]))

import jax  # noqa: E402  (XLA_FLAGS must be set before JAX starts its backend)
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "float64: run the test with jax_enable_x64 on (jax.enable_x64(True))")


@pytest.fixture(autouse=True)
def _float64_when_marked(request):
  if request.node.get_closest_marker("float64") is None:
    yield
    return
  with jax.enable_x64(True):
    yield
