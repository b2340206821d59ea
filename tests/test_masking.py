"""Padding that holds NaN or Inf reaches no value and no gradient, on every path.

For every cell and every way of running it (the fused backward pass, autodiff
through the scan, the hoisted projection, ``remat``, a stack, ``segmented_loss``
and ``tbptt_step``; every path for the LSTM and GRU, the defining ones for the
others) the loss and the gradients with NaN- or Inf-padded inputs
and targets are bit for bit those with zero padding, and the gradient at a
padded input is exactly zero. Float32, as users run it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax as bj

B, T, D, H, O = 4, 9, 3, 5, 2
LENGTHS = np.array([9, 6, 1, 0], np.int32)
PADDED = np.arange(T)[None, :] >= LENGTHS[:, None]  # [B, T]

CELLS = {
    "rnn_tanh": lambda: bj.rnn(H),
    "rnn_relu": lambda: bj.rnn(H, "relu"),
    "lstm": lambda: bj.lstm(H),
    "gru": lambda: bj.gru(H),
    "lstm_ln": lambda: bj.lstm(H, layer_norm=True),
    "stack": lambda: bj.stack(bj.lstm(H), bj.gru(H)),
}
PATHS = {
    "fused": {},
    "autodiff": {"fused": False},
    "hoisted": {"hoist": True},
    "remat": {"remat": 3},
    "unroll2": {"unroll": 2},
}


def _data(fill, seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  ys = rng.normal(size=(B, T, O)).astype(np.float32)
  xs[PADDED], ys[PADDED] = fill, fill
  return jnp.asarray(xs), jnp.asarray(ys)


def _params(cell, seed=1):
  k_cell, k_out = jax.random.split(jax.random.key(seed))
  return {"cell": cell.init(k_cell, D), "out": bj.init_readout(k_out, H, O)}


def _step_loss(params, hs, ys):
  return bj.mse(bj.readout(params["out"], hs), ys)


def _assert_identical(got, want):
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _unroll_loss(cell, kwargs, by):
  def loss(params, xs, ys):
    mask = None if by == "lengths" else ~jnp.asarray(PADDED)
    lengths = LENGTHS if by == "lengths" else None
    final, hs = bj.unroll(cell, params["cell"], xs, lengths=lengths, mask=mask, **kwargs)
    final_term = sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(final))
    return bj.sequence_loss(_step_loss(params, hs, ys), lengths=LENGTHS) + final_term
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


# Every path for two fused cells; the layer-norm LSTM has no fused path
# (its default is autodiff), a ReLU RNN and a stack differ only in the step.
CASES = ([(name, path) for name in ("lstm", "gru") for path in sorted(PATHS)]
         + [("rnn_tanh", "fused"), ("rnn_tanh", "autodiff"), ("lstm_ln", "autodiff"),
            ("lstm_ln", "remat"), ("rnn_relu", "fused"), ("stack", "fused"),
            ("stack", "hoisted")])


@pytest.mark.parametrize("name,path", CASES)
def test_unroll_nan_and_inf_padding_equal_zero_padding(name, path):
  cell = CELLS[name]()
  params = _params(cell)
  by = "mask" if path == "unroll2" else "lengths"
  run = _unroll_loss(cell, PATHS[path], by)
  xs0, _ = _data(0.0)
  ys = _data(0.0)[1]  # finite targets here: the unroll is under test
  want_loss, (want_g, want_dx) = run(params, xs0, ys)
  assert np.all(np.asarray(want_dx)[PADDED] == 0)
  for fill in (np.nan, np.inf, -np.inf):
    xs, _ = _data(fill)
    loss, (g, dx) = run(params, xs, ys)
    _assert_identical(loss, want_loss)
    _assert_identical(g, want_g)
    _assert_identical(dx, want_dx)


@pytest.mark.parametrize("name", ["rnn_tanh", "lstm", "gru", "stack"])
def test_fused_final_carry_and_outputs_ignore_nan_padding(name):
  cell = CELLS[name]()
  params = _params(cell)["cell"]
  run = jax.jit(lambda xs: bj.unroll(cell, params, xs, lengths=LENGTHS))
  want_final, want_hs = run(_data(0.0)[0])
  final, hs = run(_data(np.nan)[0])
  _assert_identical(final, want_final)
  _assert_identical(hs, want_hs)
  assert np.all(np.asarray(hs)[PADDED] == 0)


@pytest.mark.parametrize("name", ["rnn_tanh", "lstm", "gru", "lstm_ln", "stack"])
def test_segmented_loss_nan_padding_in_inputs_and_targets(name):
  cell = CELLS[name]()
  params = _params(cell)

  @jax.jit
  def run(params, xs, ys):
    return jax.value_and_grad(lambda p: bj.segmented_loss(
        cell, p, xs, ys, _step_loss, lengths=LENGTHS, remat=3)[0])(params)

  want = run(params, *_data(0.0))
  for fill in (np.nan, np.inf):
    _assert_identical(run(params, *_data(fill)), want)


@pytest.mark.parametrize("name", ["rnn_tanh", "lstm", "gru", "lstm_ln", "stack"])
@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5)])
def test_tbptt_nan_padding_in_inputs_and_targets(name, k1, k2):
  cell = CELLS[name]()
  params = _params(cell)
  tx = optax.sgd(0.1)
  step = bj.tbptt_step(cell, _step_loss, tx, k1=k1, k2=k2, donate=False)
  results = []
  for fill in (0.0, np.nan, np.inf):
    xs, ys = _data(fill)
    state, metrics = step(bj.TrainState.create(params, tx),
                          {"xs": xs, "ys": ys, "lengths": LENGTHS})
    results.append((state.params, metrics["loss"], metrics["grad_norm"]))
    assert np.all(np.asarray(metrics["finite"]))
  for got in results[1:]:
    _assert_identical(got, results[0])


def test_train_step_with_model_loss_ignores_nan_padding():
  cell = bj.lstm(H)
  params = _params(cell)
  tx = optax.adam(1e-2)
  step = bj.train_step(bj.model_loss(cell, _step_loss), tx, donate=False)
  results = []
  for fill in (0.0, np.nan):
    xs, ys = _data(fill)
    state, metrics = step(bj.TrainState.create(params, tx),
                          {"xs": xs, "ys": ys, "mask": ~PADDED})
    assert bool(metrics["finite"])
    results.append((state.params, metrics["loss"]))
  _assert_identical(results[1], results[0])


@pytest.mark.parametrize("name", ["rnn_tanh", "lstm", "gru"])
def test_gradient_diagnostics_ignore_nan_padding(name):
  cell = CELLS[name]()
  params = _params(cell)["cell"]
  loss_of_hs = lambda hs: jnp.sum(hs ** 2)  # noqa: E731
  flow = jax.jit(lambda xs: bj.gradient_flow(cell, params, xs, loss_of_hs, lengths=LENGTHS))
  jac = jax.jit(lambda xs: bj.jacobian_norms(cell, params, xs, lengths=LENGTHS))
  _assert_identical(flow(_data(np.nan)[0]), flow(_data(0.0)[0]))
  _assert_identical(jac(_data(np.nan)[0]), jac(_data(0.0)[0]))


def test_rnn_bptt_ignores_nan_padding():
  cell = bj.rnn(H)
  params = _params(cell)["cell"]
  dhs = jnp.ones((B, T, H), jnp.float32)
  run = jax.jit(lambda xs: bj.rnn_bptt(params, xs, dhs, lengths=LENGTHS))
  _assert_identical(run(_data(np.nan)[0]).grads, run(_data(0.0)[0]).grads)


def test_sequence_loss_value_ignores_nan_at_masked_steps():
  losses = jnp.where(jnp.asarray(PADDED), jnp.nan, 1.0)
  np.testing.assert_allclose(bj.sequence_loss(losses, lengths=LENGTHS, reduction="mean"), 1.0)
  grad = jax.grad(lambda l: bj.sequence_loss(l, lengths=LENGTHS))(losses)
  assert np.all(np.asarray(grad)[PADDED] == 0)
