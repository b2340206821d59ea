"""``segmented_loss`` (O(sqrt T) memory BPTT) against the loss over a plain loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import CELLS, random_params, run_sequence

import bptt_jax as bj

B, T, D, H, O = 3, 11, 4, 5, 2


def _step_loss(params, hs, ys):
  return jnp.sum((hs @ params["V"] - ys) ** 2, axis=-1)


@pytest.mark.parametrize("name,remat,reduction", [
    ("lstm", "sqrt", "sum"), ("gru", 4, "mean"), ("rnn_tanh", 1, "sum"), ("lstm_ln", 4, "sum")])
def test_segmented_loss_equals_plain_loop(name, remat, reduction):
  spec = CELLS[name]
  cell = spec.make(H)
  rng = np.random.default_rng(0)
  params = {"cell": jax.tree_util.tree_map(
                jnp.asarray, random_params(cell.init(jax.random.key(0), D), 1)),
            "V": jnp.asarray(rng.normal(size=(H, O)))}
  xs = jnp.asarray(rng.normal(size=(B, T, D)))
  ys = jnp.asarray(rng.normal(size=(B, T, O)))
  lengths = np.array([11, 6, 0])

  def loss(params):
    return bj.segmented_loss(cell, params, xs, ys, _step_loss, lengths=lengths,
                             remat=remat, reduction=reduction)[0]

  def reference(params):
    total, count = 0.0, 0
    for b in range(B):
      n = int(lengths[b])
      if n == 0:
        continue
      carry = jax.tree_util.tree_map(lambda a: jnp.asarray(a), spec.zeros(1, H))
      _, hs = run_sequence(jnp, spec.step, params["cell"], xs[b:b + 1, :n], carry)
      for t, h in enumerate(hs):
        total = total + jnp.sum((h @ params["V"] - ys[b:b + 1, t]) ** 2)
      count += n
    return total / B if reduction == "sum" else total / count

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_segmented_loss_final_carry_is_each_sequence_end():
  cell = bj.gru(H, dtype=jnp.float64)
  params = {"cell": cell.init(jax.random.key(0), D), "V": jnp.ones((H, O))}
  xs = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float64)
  lengths = np.array([11, 6, 0])
  _, final = jax.jit(lambda p: bj.segmented_loss(
      cell, p, xs, jnp.zeros((B, T, O)), _step_loss, lengths=lengths, remat=3))(params)
  for b in range(B):
    n = int(lengths[b])
    h = np.zeros((1, H))
    for t in range(n):
      h, _ = CELLS["gru"].step(np, jax.tree_util.tree_map(np.asarray, params["cell"]), h,
                               np.asarray(xs[b:b + 1, t]))
    np.testing.assert_allclose(final[b], h[0], atol=1e-12)


def test_segmented_loss_plans_less_memory_than_unroll():
  cell = bj.lstm(64)
  params = {"cell": cell.init(jax.random.key(0), 8), "V": jnp.ones((64, O), jnp.float32)}
  xs, ys = jnp.ones((4, 400, 8), jnp.float32), jnp.zeros((4, 400, O), jnp.float32)

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
