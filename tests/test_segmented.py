"""``segmented_loss`` (O(sqrt T) memory BPTT) against the loss over a plain loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import (
  CELLS,
  DTYPES,
  F32,
  GRAD_TOL,
  VALUE_TOL,
  assert_dtype,
  assert_grads_close,
  random_params,
)

import bptt_jax as bj

B, T, D, H, O = 3, 11, 4, 5, 2


def _step_loss(params, hs, ys):
  return jnp.sum((hs @ params["V"] - ys) ** 2, axis=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,remat,reduction", [
    ("lstm", "sqrt", "sum"), ("gru", 4, "mean"), ("rnn_tanh", 1, "sum"), ("lstm_ln", 4, "sum")])
def test_segmented_loss_equals_plain_loop(name, remat, reduction, dtype):
  spec = CELLS[name]
  cell = spec.make(H, dtype)
  rng = np.random.default_rng(0)
  params = {"cell": jax.tree_util.tree_map(
                jnp.asarray, random_params(jax.eval_shape(lambda k: cell.init(k, D),
                                                          jax.random.key(0)), 1)),
            "V": jnp.asarray(rng.normal(size=(H, O)), dtype)}
  xs = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  ys = jnp.asarray(rng.normal(size=(B, T, O)), dtype)
  lengths = np.array([11, 6, 0])

  def loss(params):
    return bj.segmented_loss(cell, params, xs, ys, _step_loss, lengths=lengths,
                             remat=remat, reduction=reduction)[0]

  # A Python loop over sequences and steps, differentiated op by op: one
  # compiled step (a jitted step called many times compiles far faster than
  # one jit of the whole unrolled loop).
  step = jax.jit(functools.partial(spec.step, jnp))

  def reference(params):
    total, count = 0.0, 0
    for b in range(B):
      n = int(lengths[b])
      if n == 0:
        continue
      carry = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), spec.zeros(1, H))
      for t in range(n):
        carry, h = step(params["cell"], carry, xs[b:b + 1, t])
        total = total + jnp.sum((h @ params["V"] - ys[b:b + 1, t]) ** 2)
      count += n
    return total / B if reduction == "sum" else total / count

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  ref_value, ref_grads = jax.value_and_grad(reference)(params)
  assert_dtype((value, grads, ref_value, ref_grads), dtype)
  np.testing.assert_allclose(value, ref_value, **VALUE_TOL[dtype])
  assert_grads_close(grads, ref_grads, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_loss_final_carry_is_each_sequence_end(dtype):
  cell = bj.gru(H, dtype=dtype)
  params = {"cell": cell.init(jax.random.key(0), D), "V": jnp.ones((H, O), dtype)}
  xs = jax.random.normal(jax.random.key(1), (B, T, D), dtype)
  lengths = np.array([11, 6, 0])
  _, final = jax.jit(lambda p: bj.segmented_loss(
      cell, p, xs, jnp.zeros((B, T, O), dtype), _step_loss, lengths=lengths, remat=3))(params)
  assert final.dtype == dtype
  cell_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["cell"])
  for b in range(B):
    n = int(lengths[b])
    h = np.zeros((1, H))
    for t in range(n):
      h, _ = CELLS["gru"].step(np, cell_params, h, np.asarray(xs[b:b + 1, t], np.float64))
    np.testing.assert_allclose(final[b], h[0], **VALUE_TOL[dtype])


def test_segmented_loss_plans_less_memory_than_unroll():
  cell = bj.lstm(64)
  params = {"cell": cell.init(jax.random.key(0), 8), "V": jnp.ones((64, O), F32)}
  xs, ys = jnp.ones((4, 400, 8), F32), jnp.zeros((4, 400, O), F32)

  def plain(p):
    _, hs = bj.unroll(cell, p["cell"], xs)
    return bj.sequence_loss(_step_loss(p, hs, ys))

  def segmented(p):
    return bj.segmented_loss(cell, p, xs, ys, _step_loss)[0]

  def temp_bytes(f):
    return jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(segmented) < 0.25 * temp_bytes(plain)


@pytest.mark.parametrize("kwargs,match", [
    ({"reduction": "median"}, "reduction"),
    ({"remat": 0}, "remat"),
    ({"lengths": np.array([1, 2, 3]), "mask": np.ones((B, T), bool)}, "not both"),
    ({"carry": jnp.zeros((B + 1, H))}, "carry has batch size 4"),
])
def test_segmented_loss_bad_settings(kwargs, match):
  cell = bj.rnn(H)
  params = {"cell": cell.init(jax.random.key(0), D), "V": jnp.ones((H, O))}
  with pytest.raises(ValueError, match=match):
    bj.segmented_loss(cell, params, jnp.ones((B, T, D)), jnp.ones((B, T, O)), _step_loss,
                      **kwargs)


def test_segmented_loss_targets_must_match_inputs():
  cell = bj.rnn(H)
  params = {"cell": cell.init(jax.random.key(0), D), "V": jnp.ones((H, O))}
  with pytest.raises(ValueError, match=r"xs and ys must share \[B, T\]"):
    bj.segmented_loss(cell, params, jnp.ones((B, T, D)), jnp.ones((B, T + 1, O)), _step_loss)
