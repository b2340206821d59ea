"""Tests for bptt_jax/_keras.py: Keras 3 (JAX backend) outputs and gradients, same weights.

Keras masks through ``mask=``; its gradients come from ``jax.grad`` of
``layer.stateless_call`` with respect to the layer's own variables, ours from
``jax.grad`` through ``from_keras(layer, weights)``: both in Keras' layout.
"""

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj

if "keras" not in sys.modules:
  os.environ["KERAS_BACKEND"] = "jax"  # read when keras is first imported
keras = pytest.importorskip("keras", reason="Keras 3 is not installed (pip install -e '.[dev]')")
if keras.backend.backend() != "jax":
  pytest.skip(f"Keras runs on {keras.backend.backend()!r}, these tests need KERAS_BACKEND=jax",
              allow_module_level=True)

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, D, H = 4, 6, 3, 5
LENGTHS = np.array([6, 3, 1, 5])
LAYERS = {
    "simple_rnn_relu_no_bias": lambda **kw: keras.layers.SimpleRNN(
        H, activation="relu", use_bias=False, **kw),
    "lstm": lambda **kw: keras.layers.LSTM(H, **kw),
    "gru": lambda **kw: keras.layers.GRU(H, **kw),
    "gru_reset_before": lambda **kw: keras.layers.GRU(H, reset_after=False, **kw),
}


def _layer(name, seed=0, **kwargs):
  # Zeros to build fast (no eager orthogonal init): every weight is set just below.
  kwargs = {"return_sequences": True, "return_state": True, **kwargs}
  layer = LAYERS[name](kernel_initializer="zeros", recurrent_initializer="zeros", **kwargs)
  with jax.numpy_rank_promotion("allow"):  # Keras broadcasts freely
    layer.build((B, T, D))
  rng = np.random.default_rng(seed)  # every weight random, biases included
  layer.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(np.float32)
                     for w in layer.get_weights()])
  return layer


@pytest.mark.parametrize("name", list(LAYERS))  # SimpleRNN's tanh: the next test
def test_matches_keras_outputs_and_gradients(name):
  layer = _layer(name)
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  valid = np.arange(T)[None, :] < LENGTHS[:, None]
  cot = np.where(valid[..., None], rng.normal(size=(B, T, H)), 0.0).astype(np.float32)
  weights = [jnp.asarray(v) for v in layer.get_weights()]
  trainable = [v.value for v in layer.trainable_variables]
  fixed = [v.value for v in layer.non_trainable_variables]  # the dropout seed
  assert len(trainable) == len(weights)

  @jax.jit
  def keras_loss(trainable, xs):
    with jax.numpy_rank_promotion("allow"):
      (out, *states), _ = layer.stateless_call(trainable, fixed, xs, mask=jnp.asarray(valid))
    # Keras repeats the last output over masked steps: the loss reads valid steps only.
    return jnp.sum(out * cot), (out, states)

  @jax.jit
  def our_loss(weights, xs):
    cell, params = bj.from_keras(layer, weights)
    final, hs = bj.unroll(cell, params, xs, lengths=LENGTHS)
    return jnp.sum(hs * cot), (hs, final)

  (_, (out, states)), (k_grads, k_dx) = jax.value_and_grad(
      keras_loss, argnums=(0, 1), has_aux=True)(trainable, xs)
  (_, (hs, final)), (grads, dx) = jax.value_and_grad(
      our_loss, argnums=(0, 1), has_aux=True)(weights, xs)
  np.testing.assert_allclose(hs[valid], np.asarray(out)[valid], **TOL)
  np.testing.assert_array_equal(hs[~valid], 0.0)
  if isinstance(final, bj.LSTMState):  # Keras' LSTM states are [h, c]
    np.testing.assert_allclose(final.h, states[0], **TOL)
    np.testing.assert_allclose(final.c, states[1], **TOL)
  else:
    np.testing.assert_allclose(final, states[0], **TOL)
  for w, ours, theirs in zip(layer.trainable_variables, grads, k_grads):
    np.testing.assert_allclose(ours, theirs, err_msg=w.path, **TOL)
  np.testing.assert_allclose(dx, k_dx, **TOL)


def test_layer_weights_convert_by_gate():
  """The GRU's (z, r, h) blocks land in bptt_jax's (r, z, n) places, by hand."""
  layer = _layer("gru")
  kernel, recurrent, bias = layer.get_weights()
  cell, params = bj.from_keras(layer)
  assert cell.name == "gru" and cell.hidden_size == H
  z, r, h = np.split(kernel, 3, axis=1)
  np.testing.assert_array_equal(params["W"], np.concatenate([r, z, h], axis=1))
  np.testing.assert_allclose(params["b"][:H], bias[0, H:2 * H] + bias[1, H:2 * H], rtol=1e-6)
  np.testing.assert_array_equal(params["b_hn"], bias[1, 2 * H:])
  # reset_after=False: one [3H] bias, on the input term; no b_hn.
  layer = _layer("gru_reset_before", seed=2)
  kernel, recurrent, bias = layer.get_weights()
  cell, params = bj.from_keras(layer)
  assert cell.name == "gru_reset_before" and cell.hidden_size == H
  assert sorted(params) == ["U", "W", "b"]
  rzn = lambda a: np.concatenate([a[..., H:2 * H], a[..., :H], a[..., 2 * H:]], axis=-1)
  for key, theirs in (("W", kernel), ("U", recurrent), ("b", bias)):
    np.testing.assert_array_equal(params[key], rzn(theirs))
  no_bias = _layer("gru_reset_before", use_bias=False)
  cell, params = bj.from_keras(no_bias.cell)
  assert cell.name == "gru_reset_before"
  np.testing.assert_array_equal(params["b"], np.zeros(3 * H))
  cell, params = bj.from_keras(_layer("lstm").cell)  # a cell converts as its layer
  assert cell.name == "lstm" and params["W"].shape == (D, 4 * H)
  tanh = keras.layers.SimpleRNN(H)  # tanh by default; the weights as they are
  weights = [np.full((D, H), 0.1, np.float32), np.eye(H, dtype=np.float32),
             np.arange(H, dtype=np.float32)]
  cell, params = bj.from_keras(tanh, weights)
  assert cell.name == "rnn_tanh"
  for ours, theirs in zip((params["W"], params["U"], params["b"]), weights):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["gru", "gru_reset_before"])
def test_last_output_without_return_sequences_is_the_final_state(name):
  """``return_sequences=False``: Keras' one output is the state at each sequence's own end."""
  layer = _layer(name, seed=3, return_sequences=False, return_state=False)
  xs = np.random.default_rng(4).normal(size=(B, T, D)).astype(np.float32)
  valid = np.arange(T)[None, :] < LENGTHS[:, None]
  trainable = [v.value for v in layer.trainable_variables]
  fixed = [v.value for v in layer.non_trainable_variables]

  @jax.jit
  def keras_last(trainable, xs):
    with jax.numpy_rank_promotion("allow"):
      return layer.stateless_call(trainable, fixed, xs, mask=jnp.asarray(valid))[0]

  cell, params = bj.from_keras(layer)
  final, hs = jax.jit(lambda p, xs: bj.unroll(cell, p, xs, lengths=LENGTHS))(params, xs)
  out = keras_last(trainable, xs)
  np.testing.assert_allclose(final, out, **TOL)
  np.testing.assert_allclose(bj.last_step(hs, LENGTHS), out, **TOL)


def test_errors():
  layer = _layer("gru_reset_before")
  with pytest.raises(ValueError, match=r"expected kernel \[D, 15\], recurrent_kernel \[5, 15\], "
                                       r"bias \[15\], got .*\(2, 15\)"):
    bj.from_keras(layer, layer.get_weights()[:2] + [np.zeros((2, 3 * H), np.float32)])
  with pytest.raises(ValueError, match="recurrent_activation='hard_sigmoid'.*'sigmoid'"):
    bj.from_keras(keras.layers.LSTM(H, recurrent_activation="hard_sigmoid"))
  with pytest.raises(ValueError, match="activation='relu'.*'tanh'"):
    bj.from_keras(keras.layers.GRU(H, activation="relu"))
  with pytest.raises(ValueError, match="go_backwards=True.*reverse=True"):
    bj.from_keras(keras.layers.LSTM(H, go_backwards=True))
  with pytest.raises(ValueError, match="LSTM is not built"):
    bj.from_keras(keras.layers.LSTM(H))
  with pytest.raises(TypeError, match="expected a Keras SimpleRNN, LSTM or GRU.*got Dense"):
    bj.from_keras(keras.layers.Dense(3))
  layer = _layer("lstm")
  with pytest.raises(ValueError, match=r"expected kernel \[D, 20\], recurrent_kernel \[5, 20\]"):
    bj.from_keras(layer, [w[:, :-1] if w.ndim == 2 else w for w in layer.get_weights()])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bj.from_keras(_layer("lstm").__class__(H, dropout=0.2), layer.get_weights())
  assert any("dropout=0.2" in str(w.message) for w in caught)
