"""The hand-written sequence backward passes (``bptt_jax._fused``) against references.

The reference is a Python loop over time of the cell equations typed again in
``cell_reference`` and differentiated by ``jax.grad``; masked (variable-length)
batches are checked against each sequence run alone at its own length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import CELLS, random_params, run_sequence
from jax.test_util import check_grads

import bptt_jax as bj

FUSED = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
B, T, D, H = 3, 7, 4, 5


def _setup(name, seed=0):
  spec = CELLS[name]
  cell = spec.make(H)
  assert cell.sequence is not None, f"{name} should have a fused sequence"
  params = jax.tree_util.tree_map(jnp.asarray,
                                  random_params(cell.init(jax.random.key(seed), D), seed))
  rng = np.random.default_rng(seed + 1)
  xs = jnp.asarray(rng.normal(size=(B, T, D)))
  carry = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 + 0 * np.asarray(a)),
                                 spec.zeros(B, H))
  weights = jnp.asarray(rng.normal(size=(B, T, H)))
  return spec, cell, params, xs, carry, weights


def _objective(hs, final, weights):
  """A loss that reads every output and the final carry."""
  leaves = jax.tree_util.tree_leaves(final)
  return jnp.sum(hs * weights) + sum(jnp.sum(leaf ** 2) for leaf in leaves)


@pytest.mark.parametrize("name", FUSED)
def test_fused_gradients_equal_reference_loop(name):
  spec, cell, params, xs, carry, weights = _setup(name)

  def fused_loss(params, xs, carry):
    final, hs = bj.unroll(cell, params, xs, carry=carry, fused=True)
    return _objective(hs, final, weights)

  def reference_loss(params, xs, carry):
    final, hs = run_sequence(jnp, spec.step, params, xs, carry)
    return _objective(jnp.stack(hs, axis=1), final, weights)

  value, grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1, 2)))(params, xs, carry)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1, 2)))(
      params, xs, carry)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUSED)
def test_fused_gradients_equal_finite_differences(name):
  _, cell, params, xs, carry, weights = _setup(name, seed=3)

  def loss(params, xs):
    final, hs = bj.unroll(cell, params, xs, carry=carry, fused=True)
    return _objective(hs, final, weights)

  # ReLU's kink makes central differences a little less exact.
  tol = 1e-5 if name == "rnn_relu" else 1e-6
  check_grads(jax.jit(loss), (params, xs), order=1, modes=["rev"], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_masked_batch_equals_each_sequence_alone(name, reverse):
  spec, cell, params, xs, carry, weights = _setup(name, seed=5)
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
      c, h = run_sequence(jnp, spec.step, params, x, c)
      h = jnp.stack(h, axis=1) if n else jnp.zeros((1, 0, H))
      if reverse:
        h = h[:, ::-1]
      h = jnp.concatenate([h, jnp.zeros((1, T - n, H))], axis=1)
      outs.append(h)
      total = total + _objective(h, c, weights[b:b + 1])
    return total, jnp.concatenate(outs, axis=0)

  (ref_value, ref_hs), ref_grads = jax.jit(jax.value_and_grad(
      alone_loss, argnums=(0, 1, 2), has_aux=True))(params, xs, carry)
  np.testing.assert_allclose(hs, ref_hs, atol=1e-12)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("remat", [3, "sqrt"])
def test_fused_with_segment_remat_matches_reference(name, remat):
  spec, cell, params, xs, carry, weights = _setup(name, seed=7)
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
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fused_is_the_cpu_default_and_can_be_refused():
  cell = bj.lstm(H)
  assert bj.lstm(H, layer_norm=True).sequence is None
  assert cell.sequence is not None
  with pytest.raises(ValueError, match="no fused sequence"):
    bj.unroll(bj.gru(H, layer_norm=True), bj.gru(H, layer_norm=True).init(jax.random.key(0), D),
              jnp.zeros((B, T, D)), fused=True)


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
  np.testing.assert_allclose(hs_got, hs_want, rtol=1e-5, atol=1e-6)
  # Without a gradient the fused path runs its own forward (LSTM: per-gate slices).
  forward = jax.jit(lambda p: bj.unroll(cell, p, xs, fused=True)[1])(params)
  np.testing.assert_allclose(forward, hs_want, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [bj.rnn, bj.lstm, bj.gru])
def test_fused_gradients_take_the_params_dtype(make):
  """float32 params with float64 inputs: gradients are float32, as autodiff gives them."""
  cell = make(4)
  params = cell.init(jax.random.key(0), 3)
  xs = jnp.ones((2, 5, 3), jnp.float64)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(bj.unroll(cell, p, xs, fused=True)[1])))(params)
  assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
