"""Strict numerics for every test: float64 by default, no implicit rank promotion.

Tests that need float32 pass the dtype explicitly.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
