"""Strict numerics for every test: no implicit rank promotion, float32 by default.

float32 is what users run, so tests run with ``jax_enable_x64`` off. A test whose
exactness needs float64 (comparisons near 1e-10, finite differences,
``check_grads``) is marked ``@pytest.mark.float64`` and runs inside
``jax.enable_x64(True)``; a ``pytest.param(..., marks=pytest.mark.float64)``
does the same for one parametrization. Arrays such a test uses must be made
inside it (or be numpy arrays): a ``jnp`` array made at import time is float32.
"""

import jax
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
