"""Stacks run layer by layer, each layer on its fused path; fused settings are honoured.

References: a Python loop over time of the stack's one-step function
(``stack.step``, which advances every layer by one step) differentiated by
``jax.grad``. Float64 to 1e-10, and float32 at float32 tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj

B, T, D, H = 3, 8, 2, 4
LENGTHS = np.array([8, 5, 0], np.int32)


def _stack(dtype):
  return bj.stack(bj.lstm(H, dtype=dtype), bj.gru(H + 1, dtype=dtype), bj.rnn(H, dtype=dtype))


def _loop_loss(cell, params, xs, lengths):
  """``sum(hs^2) + sum(final carry)`` by a Python loop over ``cell.step``."""
  carry = cell.initial_carry(B, xs.dtype)
  total = 0.0
  for t in range(T):
    new, h = cell.step(params, carry, xs[:, t])
    on = jnp.asarray(t < lengths)
    carry = jax.tree_util.tree_map(
        lambda n, o, on=on: jnp.where(on.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, carry)
    total = total + jnp.sum(jnp.where(on[:, None], h, 0.0) ** 2)
  return total + sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(carry))


def _unroll_loss(cell, params, xs, lengths, **kwargs):
  final, hs = bj.unroll(cell, params, xs, lengths=lengths, **kwargs)
  return jnp.sum(hs ** 2) + sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(final))


@pytest.mark.parametrize("dtype,tol", [
    ("float64", dict(rtol=1e-10, atol=1e-12)), ("float32", dict(rtol=2e-5, atol=2e-6))])
@pytest.mark.parametrize("kwargs", [{}, {"remat": 3}, {"hoist": True}])
def test_stack_values_and_gradients_equal_the_step_loop(dtype, tol, kwargs):
  with jax.enable_x64(dtype == "float64"):
    cell = _stack(jnp.dtype(dtype))
    params = cell.init(jax.random.key(0), D)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, D)), dtype)
    got, grads = jax.jit(jax.value_and_grad(
        lambda p, x: _unroll_loss(cell, p, x, LENGTHS, **kwargs), argnums=(0, 1)))(params, xs)
    want, want_grads = jax.value_and_grad(
        lambda p, x: _loop_loss(cell, p, x, LENGTHS), argnums=(0, 1))(params, xs)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(got, want, **tol)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads),
                    strict=True):
      assert a.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(a, b, **tol)


def _fused_calls(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call")


def test_each_stacked_layer_takes_its_fused_path():
  cell = bj.stack(bj.lstm(H), bj.gru(H), bj.lstm(H, layer_norm=True))
  params = cell.init(jax.random.key(0), D)
  xs = jnp.ones((B, T, D))
  loss = lambda **kw: (lambda p: _unroll_loss(cell, p, xs, LENGTHS, **kw))  # noqa: E731
  assert _fused_calls(loss(), params) == 2  # LSTM and GRU; layer norm has no fused path
  assert _fused_calls(loss(fused=False), params) == 0
  with pytest.raises(ValueError, match="lstm_ln has no fused sequence"):
    loss(fused=True)(params)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_fused_path_honours_unroll(name):
  cell = {"rnn": bj.rnn, "lstm": bj.lstm, "gru": bj.gru}[name](H)
  params = cell.init(jax.random.key(0), D)
  xs = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, D)), jnp.float32)
  run = jax.jit(jax.value_and_grad(lambda p, n: _unroll_loss(cell, p, xs, LENGTHS, unroll=n)),
                static_argnums=1)
  one, three = run(params, 1), run(params, 3)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(three)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # unroll=3 reaches the pure-JAX fused scans: their loops advance three steps per
  # iteration (the CPU kernels, on by default, have no scan to unroll).
  with bj.use_kernels(False):
    jaxpr = str(jax.make_jaxpr(lambda p: _unroll_loss(cell, p, xs, LENGTHS, unroll=3))(params))
  assert "custom_vjp_call" in jaxpr and "unroll=3" in jaxpr


def test_contradicting_fused_settings_raise():
  cell = bj.lstm(H)
  params = cell.init(jax.random.key(0), D)
  with pytest.raises(ValueError, match="hoist=True needs fused=False"):
    bj.unroll(cell, params, jnp.ones((B, T, D)), fused=True, hoist=True)
  with pytest.raises(ValueError, match="unroll must be a positive int"):
    bj.unroll(cell, params, jnp.ones((B, T, D)), unroll=0)
  stack = bj.stack(cell, cell)
  with pytest.raises(ValueError, match="one entry per layer"):
    bj.unroll(stack, (params,), jnp.ones((B, T, D)))
