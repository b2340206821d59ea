"""residual_block against a Python loop written from its equations, on every unroll path,
in a stack with minGRU and GRU layers; its errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import (
  DTYPES,
  GRAD_TOL,
  VALUE_TOL,
  assert_grads_close,
  gru_step,
  layer_norm,
  loop_unroll,
  random_params,
  sigmoid,
  stack_step,
)

import bptt_jax as bj

B, T, D, H, RATIO = 3, 7, 4, 5, 2
LENGTHS = np.array([7, 3, 0])


def min_gru_step(xp, p, h, x):
  pre = x @ p["W"] + p["b"][None]
  z = sigmoid(xp, pre[:, :H])
  h = (1.0 - z) * h + z * pre[:, H:]
  return h, h


def gelu(xp, a):  # the tanh approximation
  return 0.5 * a * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))


def block_step(inner):
  """The block's equations: pre-norm cell, residual, pre-norm MLP, residual."""

  def step(xp, p, carry, x):
    carry, h = inner(xp, p["cell"], carry, layer_norm(xp, x, p["norm"]["g"], p["norm"]["b"]))
    y = x + h
    u = layer_norm(xp, y, p["mlp_norm"]["g"], p["mlp_norm"]["b"])
    return carry, y + gelu(xp, u @ p["W1"] + p["b1"][None]) @ p["W2"] + p["b2"][None]

  return step


def _setup(dtype, seed=0):
  cell = bj.stack(bj.min_gru(H, dtype=dtype), bj.residual_block(bj.min_gru(H, dtype=dtype),
                                                                mlp_ratio=RATIO, dtype=dtype),
                  bj.residual_block(bj.gru(H, dtype=dtype), mlp_ratio=RATIO, dtype=dtype))
  step = stack_step(min_gru_step, block_step(min_gru_step), block_step(gru_step))
  shapes = jax.eval_shape(lambda k: cell.init(k, D), jax.random.key(0))
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), random_params(shapes, seed))
  rng = np.random.default_rng(seed + 1)
  xs = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  carry = tuple(jnp.asarray(rng.normal(size=(B, H)) * 0.5, dtype) for _ in range(3))
  return cell, step, params, xs, carry


def test_init_shapes_and_values():
  block = bj.residual_block(bj.min_gru(H), mlp_ratio=RATIO)
  params = block.init(jax.random.key(0), H)
  assert params["W1"].shape == (H, RATIO * H) and params["W2"].shape == (RATIO * H, H)
  assert params["cell"]["W"].shape == (H, 2 * H)
  np.testing.assert_array_equal(params["norm"]["g"], np.ones(H))
  np.testing.assert_array_equal(params["mlp_norm"]["b"], np.zeros(H))
  np.testing.assert_array_equal(params["b1"], np.zeros(RATIO * H))
  limit = math.sqrt(6.0 / (H + RATIO * H))  # Glorot uniform
  assert 0.5 * limit < np.abs(params["W1"]).max() <= limit
  assert block.hidden_size == H and block.name == "residual_block(min_gru)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_equal_python_loop_on_every_path(dtype):
  cell, step, params, xs, carry = _setup(dtype)
  for reverse in (False, True):
    ref_final, ref_hs = loop_unroll(step, params, xs, carry, H, lengths=LENGTHS,
                                    reverse=reverse)
    for kwargs in ({}, {"fused": False}, {"remat": 2}):
      final, hs = jax.jit(lambda p, x, c, kw=kwargs, reverse=reverse: bj.unroll(
          cell, p, x, lengths=LENGTHS, carry=c, reverse=reverse, **kw))(params, xs, carry)
      np.testing.assert_allclose(hs, ref_hs, **VALUE_TOL[dtype])
      for got, want in zip(final, ref_final):
        np.testing.assert_allclose(got, want, **VALUE_TOL[dtype])
  # One step of the cell: the same block.
  _, h1 = jax.jit(cell.step)(params, carry, xs[:, 0])
  np.testing.assert_allclose(h1, step(np, jax.tree.map(np.asarray, params),
                                      jax.tree.map(np.asarray, carry),
                                      np.asarray(xs[:, 0]))[1], **VALUE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_equal_python_loop(dtype):
  cell, step, params, xs, carry = _setup(dtype, seed=2)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, H)), dtype)

  def loss(params, xs, carry):
    final, hs = bj.unroll(cell, params, xs, lengths=LENGTHS, carry=carry)
    return jnp.sum(w * jnp.tanh(hs)) + sum(jnp.sum(c ** 2) for c in final)

  def reference(params, xs, carry):
    hs = []
    for t in range(T):
      new, h = step(jnp, params, carry, xs[:, t])
      keep = jnp.asarray(t < LENGTHS)[:, None]
      carry = tuple(jnp.where(keep, n, c) for n, c in zip(new, carry))
      hs.append(jnp.where(keep, h, 0.0))
    return jnp.sum(w * jnp.tanh(jnp.stack(hs, 1))) + sum(jnp.sum(c ** 2) for c in carry)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)
  want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(params, xs, carry)
  assert_grads_close(got, want, **GRAD_TOL[dtype])


def test_parallel_method_reaches_the_inner_cell_and_nan_padding_stays_out():
  cell = bj.stack(bj.min_gru(H), bj.residual_block(bj.min_gru(H)))
  params = cell.init(jax.random.key(0), D)
  xs = jax.random.normal(jax.random.key(1), (B, T, D))
  nan_xs = xs.at[1, 3:].set(jnp.nan).at[2].set(jnp.inf)

  def loss(params, xs, method):
    final, hs = bj.unroll(cell, params, xs, lengths=LENGTHS, method=method)
    return jnp.sum(jnp.sin(hs)) + sum(jnp.sum(c) for c in final)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  value, (gp, _) = grad(params, xs, "sequential")
  for method in ("parallel", "sequential"):
    nan_value, (nan_gp, nan_gx) = grad(params, nan_xs, method)
    np.testing.assert_allclose(nan_value, value, rtol=1e-5)
    assert_grads_close(nan_gp, gp, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(nan_gx)[1, 3:] == 0) and np.all(np.asarray(nan_gx)[2] == 0)


def test_segmented_loss_and_tbptt_take_it():
  cell = bj.stack(bj.gru(H), bj.residual_block(bj.min_gru(H)))
  params = {"cell": cell.init(jax.random.key(0), D)}
  xs = jax.random.normal(jax.random.key(1), (B, 12, D))
  ys = jax.random.normal(jax.random.key(2), (B, 12, H))

  def step_loss(params, hs, ys):
    return jnp.sum((hs - ys) ** 2, axis=-1)

  def plain(params):
    _, hs = bj.unroll(cell, params["cell"], xs, fused=False)
    return jnp.sum(step_loss(params, hs, ys)) / B

  value, grads = jax.jit(jax.value_and_grad(lambda p: bj.segmented_loss(
      cell, p, xs, ys, step_loss, remat=3, reduction="sum")[0]))(params)
  want_value, want_grads = jax.jit(jax.value_and_grad(plain))(params)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  assert_grads_close(grads, want_grads, rtol=1e-4, atol=1e-5)

  tx = bj.optimizer(1e-2)
  state = bj.TrainState.create(params, tx, carry=cell.initial_carry(B))
  step = bj.tbptt_step(cell, step_loss, tx, k1=4)
  state, metrics = step(state, {"xs": xs, "ys": ys})
  assert np.all(np.isfinite(metrics["loss"])) and int(state.step) == 3  # one update per chunk


def test_bad_arguments():
  with pytest.raises(TypeError, match="wraps a bptt_jax.Cell, got function"):
    bj.residual_block(lambda p, c, x: (c, x))
  with pytest.raises(ValueError, match="needs a cell with hidden_size"):
    bj.residual_block(bj.as_cell(lambda p, c, x: (c, x)))
  with pytest.raises(ValueError, match="mlp_ratio must be a positive int, got 0"):
    bj.residual_block(bj.min_gru(H), mlp_ratio=0)
  with pytest.raises(ValueError, match=r"input_size must be H = 5, got 4; put a plain cell"):
    bj.residual_block(bj.min_gru(H)).init(jax.random.key(0), 4)
