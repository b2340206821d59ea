"""The hand-written sequence backward passes (``bptt_jax._fused``) against references.

The reference is a Python loop over time of the cell equations typed again in
``cell_reference`` and differentiated by ``jax.grad``; masked (variable-length)
batches are checked against each sequence run alone at its own length.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import (
  CELLS,
  DTYPES,
  F32,
  F64,
  GRAD_TOL,
  VALUE_TOL,
  assert_dtype,
  assert_grads_close,
  random_params,
  run_sequence,
)
from jax.test_util import check_grads

import bptt_jax as bj

FUSED = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
B, T, D, H = 3, 7, 4, 5


def _setup(name, seed=0, dtype=F64):
  """Cell, params, inputs ``[B, T, D]``, carry and loss weights ``[B, T, H]`` in ``dtype``."""
  spec = CELLS[name]
  cell = spec.make(H, dtype)
  assert cell.sequence is not None, f"{name} should have a fused sequence"
  params = jax.tree_util.tree_map(
      jnp.asarray, random_params(jax.eval_shape(lambda k: cell.init(k, D), jax.random.key(seed)),
                                 seed))
  rng = np.random.default_rng(seed + 1)
  xs = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  carry = jax.tree_util.tree_map(lambda a: jnp.full(np.shape(a), 0.3, dtype), spec.zeros(B, H))
  weights = jnp.asarray(rng.normal(size=(B, T, H)), dtype)
  return spec, cell, params, xs, carry, weights


@functools.lru_cache(maxsize=None)
def _jitted_step(name):
  """The reference step of cell ``name`` in ``jax.numpy``, jitted on its own.

  A Python loop over it, differentiated op by op, compiles one step instead of
  the whole unrolled loop (which XLA compiles many times slower).
  """
  step = jax.jit(functools.partial(CELLS[name].step, jnp))
  return lambda xp, params, carry, x: step(params, carry, x)


def _objective(hs, final, targets):
  """A loss that reads every output and the final carry.

  A sum of squares: its terms do not cancel, so its float32 value is as exact
  as the outputs are.
  """
  leaves = jax.tree_util.tree_leaves(final)
  return jnp.sum((hs - targets) ** 2) + sum(jnp.sum(leaf ** 2) for leaf in leaves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUSED)
def test_fused_gradients_equal_reference_loop(name, dtype):
  spec, cell, params, xs, carry, weights = _setup(name, dtype=dtype)

  def fused_loss(params, xs, carry):
    final, hs = bj.unroll(cell, params, xs, carry=carry, fused=True)
    return _objective(hs, final, weights)

  def reference_loss(params, xs, carry):
    final, hs = run_sequence(jnp, _jitted_step(name), params, xs, carry)
    return _objective(jnp.stack(hs, axis=1), final, weights)

  value, grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1, 2)))(params, xs, carry)
  ref_value, ref_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2))(params, xs, carry)
  assert_dtype((value, grads), dtype)
  np.testing.assert_allclose(value, ref_value, **VALUE_TOL[dtype])
  assert_grads_close(grads, ref_grads, **GRAD_TOL[dtype])


@pytest.mark.float64
@pytest.mark.parametrize("name", FUSED)
def test_fused_gradients_equal_finite_differences(name):
  _, cell, params, xs, carry, weights = _setup(name, seed=3)

  def loss(params, xs):
    final, hs = bj.unroll(cell, params, xs, carry=carry, fused=True)
    return _objective(hs, final, weights)

  # ReLU's kink makes central differences a little less exact. A step of 1e-5
  # (not the default 1e-4) keeps the truncation error of the squared loss small.
  tol = 1e-5 if name == "rnn_relu" else 1e-6
  check_grads(jax.jit(loss), (params, xs), order=1, modes=["rev"], atol=tol, rtol=tol,
              eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_masked_batch_equals_each_sequence_alone(name, reverse, dtype):
  spec, cell, params, xs, carry, weights = _setup(name, seed=5, dtype=dtype)
  lengths = np.array([7, 3, 0])

  def fused_loss(params, xs, carry):
    final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lengths, reverse=reverse,
                          fused=True)
    return _objective(hs, final, weights), hs

  (value, hs), grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1, 2), has_aux=True))(
      params, xs, carry)

  def alone_loss(params, xs, carry):
    total, outs = 0.0, []
    for b in range(B):
      n = int(lengths[b])
      c = jax.tree_util.tree_map(lambda a, b=b: a[b:b + 1], carry)
      x = xs[b:b + 1, :n]
      if reverse:
        x = x[:, ::-1]
      c, h = run_sequence(jnp, _jitted_step(name), params, x, c)
      h = jnp.stack(h, axis=1) if n else jnp.zeros((1, 0, H), dtype)
      if reverse:
        h = h[:, ::-1]
      h = jnp.concatenate([h, jnp.zeros((1, T - n, H), dtype)], axis=1)
      outs.append(h)
      total = total + _objective(h, c, weights[b:b + 1])
    return total, jnp.concatenate(outs, axis=0)

  (ref_value, ref_hs), ref_grads = jax.value_and_grad(
      alone_loss, argnums=(0, 1, 2), has_aux=True)(params, xs, carry)
  assert_dtype((value, hs, grads), dtype)
  np.testing.assert_allclose(hs, ref_hs, **VALUE_TOL[dtype])
  np.testing.assert_allclose(value, ref_value, **VALUE_TOL[dtype])
  assert_grads_close(grads, ref_grads, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("remat", [3, "sqrt"])
def test_fused_with_segment_remat_matches_reference(name, remat, dtype):
  spec, cell, params, xs, carry, weights = _setup(name, seed=7, dtype=dtype)
  lengths = np.array([7, 5, 2])

  def loss(params, remat):
    final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lengths, remat=remat,
                          fused=True)
    return _objective(hs, final, weights)

  def reference_loss(params):
    final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lengths, fused=False)
    return _objective(hs, final, weights)

  got = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
  want = jax.jit(jax.grad(reference_loss))(params)
  assert_dtype(got, dtype)
  assert_grads_close(got, want, **GRAD_TOL[dtype])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default")
@pytest.mark.parametrize("name", FUSED)
def test_fused_is_the_cpu_default_and_can_be_refused(name):
  """Without fused= the built-in cells take their fused path on CPU: the same
  computation as fused=True, bit for bit, values and gradients, and not the
  autodiff one (fused=False)."""
  _, cell, params, xs, carry, weights = _setup(name, seed=2, dtype=F32)
  lengths = np.array([7, 4, 0])

  def loss(params, xs, fused):
    final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lengths, fused=fused)
    return _objective(hs, final, weights), hs

  def run(fused):
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(
        params, xs, fused)

  default, fused, autodiff = run(None), run(True), run(False)
  for a, b in zip(jax.tree_util.tree_leaves(default), jax.tree_util.tree_leaves(fused),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert_grads_close(default, autodiff, **GRAD_TOL[F32])
  jaxpr = lambda fused: str(jax.make_jaxpr(loss, static_argnums=2)(params, xs, fused))  # noqa: E731
  assert jaxpr(None) == jaxpr(True) != jaxpr(False)
  assert "custom_vjp_call" in jaxpr(None) and "custom_vjp_call" not in jaxpr(False)


def test_cells_without_a_fused_path_refuse_fused_true():
  cell = bj.gru(H, layer_norm=True)
  assert cell.sequence is None and bj.lstm(H, layer_norm=True).sequence is None
  with pytest.raises(ValueError, match="gru_ln has no fused sequence implementation"):
    jax.jit(lambda p, xs: bj.unroll(cell, p, xs, fused=True))(
        cell.init(jax.random.key(0), D), jnp.zeros((B, T, D)))


@pytest.mark.parametrize("make", [bj.rnn, bj.lstm, bj.gru])
def test_fused_float32_close_to_autodiff(make):
  """In float32 too: the fused forwards (with and without a backward pass) and gradients."""
  cell = make(32)
  params = cell.init(jax.random.key(0), 8)
  xs = jax.random.normal(jax.random.key(1), (4, 50, 8), jnp.float32)

  def loss(params, fused):
    _, hs = bj.unroll(cell, params, xs, fused=fused)
    return jnp.sum(hs[:, -1] ** 2) + jnp.mean(hs ** 2), hs

  (_, hs_got), got = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, True)
  (_, hs_want), want = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, False)
  assert hs_got.dtype == jnp.float32
  # Over T = 50 steps each float32 path is within about 5e-7 of the float64
  # result (measured), so the two are within twice that of each other.
  tol = dict(rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(hs_got, hs_want, **tol)
  # Without a gradient the fused path runs its own forward (LSTM: per-gate slices).
  forward = jax.jit(lambda p: bj.unroll(cell, p, xs, fused=True)[1])(params)
  np.testing.assert_allclose(forward, hs_want, **tol)
  assert_dtype(got, F32)
  assert_grads_close(got, want, **GRAD_TOL[F32])


@pytest.mark.float64
@pytest.mark.parametrize("make", [bj.rnn, bj.lstm, bj.gru])
def test_fused_gradients_take_the_params_dtype(make):
  """float32 params with float64 inputs: gradients are float32, as autodiff gives them."""
  cell = make(4)
  params = cell.init(jax.random.key(0), 3)
  xs = jnp.ones((2, 5, 3), jnp.float64)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(bj.unroll(cell, p, xs, fused=True)[1])))(params)
  assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
