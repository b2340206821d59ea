"""Tests for bptt_jax/_cells.py: cell equations, initializers, gradients, adapters."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import (
  CELL_NAMES,
  CELLS,
  DTYPES,
  F32,
  F64,
  GRAD_TOL,
  VALUE_TOL,
  assert_dtype,
  assert_grads_close,
  assert_tree_allclose,
  gru_step,
  loop_unroll,
  lstm_step,
  numerical_grad,
  random_params,
  rnn_step,
  run_sequence,
  stack_step,
  to_f64,
  zeros_h,
  zeros_hc,
)
from flax import linen as nn
from jax.test_util import check_grads

import bptt_jax as bj

KEY = jax.random.key(0)
dims = chex.Dimensions(B=2, T=5, D=3, H=4)


def _init(cell, input_size, seed=1):
  """Random params in the cell's dtype with the structure of ``cell.init`` (traced, not run)."""
  return random_params(jax.eval_shape(lambda k: cell.init(k, input_size), KEY), seed)


def _readout(H, O, seed=4):
  return random_params(jax.eval_shape(lambda k: bj.init_readout(k, H, O, F64), KEY), seed)


def _inputs(shape, seed=2, dtype=F64):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ----------------------------------------------------------------------------
# Equations: two steps against numpy.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CELL_NAMES)
def test_two_steps_match_numpy_equations(name, dtype):
  spec = CELLS[name]
  B, D, H = dims.B, dims.D, dims.H
  cell = spec.make(H, dtype)
  params = _init(cell, D)
  xs = _inputs((B, 2, D), dtype=dtype)
  c0 = jax.tree_util.tree_map(lambda a: (a + _inputs(a.shape, seed=3)).astype(dtype),
                              spec.zeros(B, H))

  ref = to_f64((params, c0, xs))
  c1, h1 = spec.step(np, *ref[:2], ref[2][:, 0])
  c2, h2 = spec.step(np, ref[0], c1, ref[2][:, 1])

  @jax.jit
  def two_steps(params, c0, xs):
    c1, h1 = cell.step(params, c0, xs[:, 0])
    c2, h2 = cell.step(params, c1, xs[:, 1])
    return (c1, h1), (c2, h2), cell.hidden(c2)

  got = two_steps(params, c0, xs)
  (got_c1, got_h1), (got_c2, got_h2), hidden = got
  chex.assert_shape([got_h1, got_h2], (B, H))
  assert_dtype(got, dtype)
  tol = VALUE_TOL[dtype]
  np.testing.assert_allclose(got_h1, h1, **tol)
  np.testing.assert_allclose(got_h2, h2, **tol)
  assert_tree_allclose((got_c1, got_c2), (c1, c2), **tol)
  np.testing.assert_allclose(hidden, h2, **tol)


@pytest.mark.float64
def test_rnn_tanh_by_hand():
  # H = D = 1: W = 0.5, U = -1, b = 0.1; x = (1, 2).
  cell = bj.rnn(1, "tanh", dtype=F64)
  params = {"W": np.array([[0.5]]), "U": np.array([[-1.0]]), "b": np.array([0.1])}
  h1 = math.tanh(0.5 * 1 + 0.1)
  h2 = math.tanh(0.5 * 2 - h1 + 0.1)
  _, hs = jax.jit(lambda p, xs: bj.unroll(cell, p, xs))(params, np.array([[[1.0], [2.0]]]))
  np.testing.assert_allclose(hs[0, :, 0], [h1, h2], rtol=1e-14)
  np.testing.assert_allclose([h1, h2], [0.5370495669980353, 0.5101632506598709], rtol=1e-14)


@pytest.mark.float64
def test_lstm_gate_order_by_hand():
  # H = D = 1, one step from zeros: z = x W + b with x = 1, gates (i, f, g, o).
  cell = bj.lstm(1, dtype=F64)
  params = {"W": np.array([[0.1, 0.2, 0.3, 0.4]]), "U": np.zeros((1, 4)),
            "b": np.array([0.0, 1.0, 0.0, 0.0])}
  carry = bj.LSTMState(np.array([[0.0]]), np.array([[2.0]]))
  sig = lambda a: 1 / (1 + math.exp(-a))
  c = sig(0.2 + 1.0) * 2.0 + sig(0.1) * math.tanh(0.3)
  h = sig(0.4) * math.tanh(c)
  new, out = jax.jit(cell.step)(params, carry, np.array([[1.0]]))
  np.testing.assert_allclose([new.h[0, 0], new.c[0, 0], out[0, 0]], [h, c, h], rtol=1e-14)


@pytest.mark.float64
def test_gru_reset_gate_multiplies_recurrent_bias_by_hand():
  # H = D = 1, one step: a = x W + b, u = h U; n = tanh(a_n + r (u_n + b_hn)).
  cell = bj.gru(1, dtype=F64)
  params = {"W": np.array([[0.1, 0.2, 0.3]]), "U": np.array([[0.4, 0.5, 0.6]]),
            "b": np.array([0.01, 0.02, 0.03]), "b_hn": np.array([0.7])}
  x, h0 = 1.5, -0.8
  sig = lambda a: 1 / (1 + math.exp(-a))
  r = sig(0.1 * x + 0.01 + 0.4 * h0)
  z = sig(0.2 * x + 0.02 + 0.5 * h0)
  n = math.tanh(0.3 * x + 0.03 + r * (0.6 * h0 + 0.7))
  h = (1 - z) * n + z * h0
  new, out = jax.jit(cell.step)(params, np.array([[h0]]), np.array([[x]]))
  np.testing.assert_allclose([new[0, 0], out[0, 0]], [h, h], rtol=1e-14)


@pytest.mark.float64
def test_gru_reset_gate_before_the_recurrent_matmul_by_hand():
  # H = 2, D = 1, one step: n_i = tanh(a_n_i + sum_k r_k h_k U_n[k, i]), no b_hn.
  # (With H = 1 the two GRU forms without b_hn coincide: r (h U_n) = (r h) U_n.)
  cell = bj.gru(2, reset_after=False, dtype=F64)
  assert cell.name == "gru_reset_before" and cell.sequence is None
  W = np.array([[0.1, -0.2, 0.3, 0.4, -0.5, 0.6]])  # blocks (r, z, n), 2 columns each
  U = np.array([[0.7, -0.1, 0.2, 0.3, 0.9, -0.4],
                [-0.6, 0.5, -0.3, 0.1, 0.8, 1.1]])
  b = np.array([0.01, 0.02, 0.03, -0.04, 0.05, -0.06])
  params = {"W": W, "U": U, "b": b}
  x, h0 = 1.5, (-0.8, 0.6)
  sig = lambda a: 1 / (1 + math.exp(-a))
  r = [sig(W[0, i] * x + b[i] + h0[0] * U[0, i] + h0[1] * U[1, i]) for i in range(2)]
  z = [sig(W[0, 2 + i] * x + b[2 + i] + h0[0] * U[0, 2 + i] + h0[1] * U[1, 2 + i])
       for i in range(2)]
  n = [math.tanh(W[0, 4 + i] * x + b[4 + i] + r[0] * h0[0] * U[0, 4 + i]
                 + r[1] * h0[1] * U[1, 4 + i]) for i in range(2)]
  h = [(1 - z[i]) * n[i] + z[i] * h0[i] for i in range(2)]
  new, out = jax.jit(cell.step)(params, np.array([h0]), np.array([[x]]))
  np.testing.assert_allclose(new[0], h, rtol=1e-14)
  np.testing.assert_allclose(out[0], h, rtol=1e-14)
  # The PyTorch form (b_hn = 0) on the same weights gives another state.
  after, _ = jax.jit(bj.gru(2, dtype=F64).step)(dict(params, b_hn=np.zeros(2)),
                                                np.array([h0]), np.array([[x]]))
  assert np.abs(np.asarray(after[0]) - h).max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_reset_before_with_lengths_matches_loop_and_finite_differences(dtype):
  """Both scan paths (hoisted and per step) of ``gru(reset_after=False)``, variable lengths
  and a given carry: values against the numpy loop over each sequence alone, gradients
  against central differences of that loop (float64) and, in float64, against ``jax.grad``
  of the same loop written in ``jax.numpy``."""
  B, T, D, H = 3, 5, 3, 4
  spec = CELLS["gru_reset_before"]
  cell = spec.make(H, dtype)
  params = _init(cell, D)
  lengths = np.array([5, 2, 0])
  xs = _inputs((B, T, D), dtype=dtype)
  xs[1, 2:] = 1e3  # padding: must reach no value and no gradient
  carry = (0.5 * _inputs((B, H), seed=7)).astype(dtype)
  w = _inputs((B, T, H), seed=8)

  def loss(params, xs, carry, hoist):
    final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lengths, hoist=hoist)
    return jnp.sum(jnp.asarray(w, dtype) * hs) + jnp.sum(final ** 2), (final, hs)

  tol = VALUE_TOL[dtype]
  want_final, want_hs = loop_unroll(spec.step, params, xs, carry, H, lengths=lengths)
  seqs = [(b, n) for b, n in enumerate(lengths) if n > 0]
  p64, x64, c64 = to_f64((params, xs, carry))

  def ref_loss(xp, tree):  # each sequence alone, cut to its own length
    p, x_seqs, c = tree
    total = 0.0
    for (b, _), x in zip(seqs, x_seqs, strict=True):
      c_b, hs_b = run_sequence(xp, spec.step, p, x, c[b:b + 1])
      total += sum(xp.sum(w[b:b + 1, t] * h) for t, h in enumerate(hs_b))
      total += xp.sum(c_b ** 2)
    return total + sum(xp.sum(c[b] ** 2) for b, n in enumerate(lengths) if n == 0)

  ref_tree = (p64, [x64[b:b + 1, :n] for b, n in seqs], c64)
  fd = numerical_grad(lambda tree: ref_loss(np, tree), ref_tree)
  # Central differences in float64 are good to about 1e-8.
  fd_tol = {F32: GRAD_TOL[F32], F64: dict(rtol=1e-6, atol=1e-8)}[dtype]
  if dtype == F64:
    exact = jax.jit(jax.grad(lambda tree: ref_loss(jnp, tree)))(ref_tree)
  run = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
  for hoist in (True, False):
    (_, (final, hs)), grads = run(params, xs, carry, hoist)
    assert_dtype((final, hs, grads), dtype)
    np.testing.assert_allclose(hs, want_hs, **tol)
    np.testing.assert_allclose(final, want_final, **tol)
    np.testing.assert_array_equal(hs[1, 2:], 0.0)
    np.testing.assert_array_equal(hs[2], 0.0)
    np.testing.assert_array_equal(final[2], carry[2])  # length 0: the carry as given
    g_params, g_xs, g_carry = grads
    got_xs = [g_xs[b:b + 1, :n] for b, n in seqs]
    np.testing.assert_array_equal(g_xs[1, 2:], 0.0)
    np.testing.assert_array_equal(g_xs[2], 0.0)
    assert_grads_close((g_params, got_xs, g_carry), fd, **fd_tol)
    if dtype == F64:
      assert_grads_close((g_params, got_xs, g_carry), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.float64
def test_layer_norm_lstm_normalizes_cell_state_for_output_by_hand():
  # W = U = 0: the gates are b; c = σ(f) c0 + σ(i) tanh(g); h = σ(o) tanh(LN(c)).
  H = 3
  cell = bj.lstm(H, layer_norm=True, dtype=F64)
  params = _init(cell, 2, seed=5)
  params["W"], params["U"] = np.zeros((2, 4 * H)), np.zeros((H, 4 * H))
  # With zero W and U, LN(0) = beta, so the gate pre-activation is beta_x + beta_h + b.
  z = params["beta_x"] + params["beta_h"] + params["b"]
  c0 = np.array([0.3, -1.0, 2.0])
  sig = lambda a: 1 / (1 + np.exp(-a))
  c = sig(z[H:2 * H]) * c0 + sig(z[:H]) * np.tanh(z[2 * H:3 * H])
  c_hat = (c - c.mean()) / np.sqrt(c.var() + 1e-5) * params["g_c"] + params["beta_c"]
  h = sig(z[3 * H:]) * np.tanh(c_hat)
  carry = bj.LSTMState(np.zeros((1, H)), c0[None])
  new, out = jax.jit(cell.step)(params, carry, np.ones((1, 2)))
  np.testing.assert_allclose(new.c[0], c, rtol=1e-12)
  np.testing.assert_allclose(out[0], h, rtol=1e-12)


# ----------------------------------------------------------------------------
# Initializers and carries.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CELL_NAMES)
def test_param_shapes_and_initial_carry(name, dtype):
  spec = CELLS[name]
  B, D, H = dims.B, dims.D, dims.H
  cell = spec.make(H, dtype)
  params = jax.eval_shape(lambda k: cell.init(k, D), KEY)  # shapes only; values: below
  G = {"lstm": 4, "gru": 3}.get(name.split("_")[0], 1)
  want = {"W": (D, G * H), "U": (H, G * H), "b": (G * H,)}
  if name.endswith("_ln"):
    want.update({k: (G * H,) for k in ("g_x", "beta_x", "g_h", "beta_h")})
  if name == "lstm_ln":
    want.update(g_c=(H,), beta_c=(H,))
  if name.startswith("gru") and name != "gru_reset_before":
    want.update(b_hn=(H,))
  assert {k: v.shape for k, v in params.items()} == want
  assert_dtype(params, dtype)
  assert cell.hidden_size == H and cell.input_size(params) == D
  carry = jax.jit(cell.initial_carry, static_argnums=(0, 1))(B, dtype)
  assert_tree_allclose(carry, spec.zeros(B, H), atol=0)
  assert_dtype(carry, dtype)
  default = jax.jit(cell.initial_carry, static_argnums=0)(B)  # float32 unless asked
  assert_dtype(default, F32)
  # The factories' default parameter dtype is float32 (with x64 on, too).
  base = name.removesuffix("_ln")
  make = {"rnn_tanh": lambda: bj.rnn(H, "tanh"), "rnn_relu": lambda: bj.rnn(H, "relu"),
          "irnn": lambda: bj.irnn(H), "lstm": lambda: bj.lstm(H), "gru": lambda: bj.gru(H),
          "gru_reset_before": lambda: bj.gru(H, reset_after=False)}[base]
  assert_dtype(jax.eval_shape(lambda k: make().init(k, D), KEY), F32)


def test_lstm_default_init():
  # Orthogonal [H, H] block per gate, zero biases but the forget block, unit LN gains.
  D, H = 3, 4
  p = jax.jit(bj.lstm(H, forget_bias=2.5, layer_norm=True).init, static_argnums=1)(KEY, D)
  assert_dtype(p, F32)  # the default
  for k in range(4):
    block = np.asarray(p["U"][:, k * H:(k + 1) * H], F64)
    np.testing.assert_allclose(block.T @ block, np.eye(H), atol=VALUE_TOL[F32]["atol"])
  assert not np.allclose(p["U"][:, :H], p["U"][:, H:2 * H])  # a fresh key per gate
  np.testing.assert_array_equal(p["b"], np.r_[np.zeros(H), 2.5 * np.ones(H), np.zeros(2 * H)])
  for k in ("g_x", "g_h", "g_c"):
    np.testing.assert_array_equal(p[k], np.ones_like(p[k]))
  for k in ("beta_x", "beta_h", "beta_c"):
    np.testing.assert_array_equal(p[k], np.zeros_like(p[k]))
  # Glorot uniform: |W| <= sqrt(6 / (fan_in + fan_out)).
  assert np.abs(p["W"]).max() <= math.sqrt(6 / (D + 4 * H))


def test_gru_identity_init_and_hidden_bias():
  p = jax.jit(bj.gru(3, recurrent_init="identity").init, static_argnums=1)(KEY, 2)
  np.testing.assert_array_equal(p["U"], np.concatenate([np.eye(3)] * 3, axis=1))
  np.testing.assert_array_equal(p["b_hn"], np.zeros(3))
  np.testing.assert_array_equal(p["b"], np.zeros(9))


def test_irnn_init_follows_le_et_al():
  # IRNN (Le et al. 2015): U = I, b = 0, W ~ N(0, input_std^2).
  D = H = 40
  p = jax.jit(bj.irnn(H, input_std=0.1).init, static_argnums=1)(KEY, D)
  np.testing.assert_array_equal(p["U"], np.eye(H))
  np.testing.assert_array_equal(p["b"], np.zeros(H))
  assert abs(float(np.std(p["W"])) - 0.1) < 0.01
  assert abs(float(np.mean(p["W"]))) < 0.01


# ----------------------------------------------------------------------------
# Gradients against central finite differences.


# (hoist, with lengths) per cell. ``hoist=False`` is the default on CPU: a scan
# over the step, or for the plain RNN, LSTM and GRU their fused backward pass
# (one per cell type, with separate code with and without a mask). The hoisted
# path is autodiff of a scan over ``recur``. Between them the cells cover every
# path; tests/test_unroll.py checks more paths against a Python-loop reference.
GRAD_PATHS = {
    "rnn_tanh": [(False, False)],
    "rnn_relu": [(True, True)],
    "irnn": [(False, True)],
    "lstm": [(False, True), (False, False)],
    "gru": [(False, True), (False, False)],
    "gru_reset_before": [(False, True), (True, False)],
    "rnn_tanh_ln": [(True, True)],
    "rnn_relu_ln": [(False, True)],
    "lstm_ln": [(False, True)],
    "gru_ln": [(True, True)],
}


@pytest.mark.float64
@pytest.mark.parametrize("name", CELL_NAMES)
def test_gradients_match_finite_differences(name):
  spec = CELLS[name]
  B, T, D, H = dims.B, dims.T, dims.D, dims.H
  cell = spec.make(H)
  params = _init(cell, D)
  ro = _readout(H, 2)
  xs, ys = _inputs((B, T, D)), _inputs((B, T, 2), seed=6)
  carry = jax.tree_util.tree_map(lambda a: 0.5 * _inputs(a.shape, seed=7), spec.zeros(B, H))
  lengths = np.array([T, T - 2])

  def loss(params, xs, carry, ro):
    total = 0.0
    for hoist, lens in GRAD_PATHS[name]:
      lens = lengths if lens else None
      final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lens, hoist=hoist)
      total += bj.sequence_loss(bj.mse(bj.readout(ro, hs), ys), lengths=lens)
      total += sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(final))
    return total

  check_grads(jax.jit(loss), (params, xs, carry, ro), order=1, modes=["rev"])


# ----------------------------------------------------------------------------
# Combinators and adapters.


def rnn_step_relu(xp, p, h, x):
  return rnn_step(xp, p, h, x, activation="relu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_stack_matches_loop_over_layers_and_time(dtype):
  B, T, D = 3, 6, 3
  cell = bj.stack(bj.lstm(4, dtype=dtype), bj.gru(3, dtype=dtype), bj.rnn(5, "relu", dtype=dtype))
  params = _init(cell, D)
  chex.assert_shape([params[0]["W"], params[1]["W"], params[2]["W"]],
                    [(D, 16), (4, 9), (3, 5)])
  xs = _inputs((B, T, D), dtype=dtype)
  lengths = np.array([6, 2, 0])
  ref_step = stack_step(lstm_step, gru_step, rnn_step_relu)
  carry0 = (zeros_hc(B, 4), zeros_h(B, 3), zeros_h(B, 5))
  tol = VALUE_TOL[dtype]
  for lens in (None, lengths):
    final, hs = jax.jit(lambda p, xs, lens=lens: bj.unroll(cell, p, xs, lengths=lens))(params, xs)
    assert_dtype((final, hs), dtype)
    want_final, want_hs = loop_unroll(ref_step, params, xs, carry0, 5, lengths=lens)
    np.testing.assert_allclose(hs, want_hs, **tol)
    assert_tree_allclose(final, want_final, **tol)
    np.testing.assert_allclose(cell.hidden(final), want_final[-1], **tol)
  assert cell.hidden_size == 5


def test_stack_errors():
  xs = np.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="at least one cell, got none"):
    jax.jit(lambda xs: bj.unroll(bj.stack(), (), xs))(xs)

  def user_step(params, carry, x):
    return carry, carry

  with pytest.raises(ValueError, match="'user_step' must declare hidden_size"):
    jax.jit(lambda xs: bj.unroll(bj.stack(user_step, bj.rnn(2)), (), xs))(xs)


FLAX_CELLS = [nn.LSTMCell, nn.GRUCell, nn.SimpleCell, nn.OptimizedLSTMCell]


@pytest.mark.float64
@pytest.mark.parametrize("make", FLAX_CELLS, ids=lambda m: m.__name__)
def test_from_flax_matches_flax_rnn(make):
  B, T, D, H = 3, 5, 3, 4
  cell = bj.from_flax(make(features=H, param_dtype=F64))
  assert cell.hidden_size == H
  params = _init(cell, D)
  xs = _inputs((B, T, D))
  flax_rnn = nn.RNN(make(features=H, param_dtype=F64), return_carry=True)

  @jax.jit
  def ours(params, xs):
    return bj.unroll(cell, params, xs)

  @jax.jit
  def theirs(params, xs):
    return flax_rnn.apply({"params": {"cell": params}}, xs)

  (final, hs), (flax_final, flax_hs) = ours(params, xs), theirs(params, xs)
  np.testing.assert_allclose(hs, flax_hs, rtol=1e-12, atol=1e-12)
  assert_tree_allclose(final, flax_final, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(cell.hidden(final), flax_hs[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.float64
def test_from_flax_lengths_match_flax_seq_lengths():
  B, T, D, H = 3, 6, 2, 4
  cell = bj.from_flax(nn.LSTMCell(features=H, param_dtype=F64))
  params = _init(cell, D)
  xs = _inputs((B, T, D))
  lengths = np.array([6, 4, 1])
  flax_rnn = nn.RNN(nn.LSTMCell(features=H, param_dtype=F64), return_carry=True)

  final, hs = jax.jit(lambda p, xs, n: bj.unroll(cell, p, xs, lengths=n))(params, xs, lengths)
  flax_final, flax_hs = jax.jit(
      lambda p, xs, n: flax_rnn.apply({"params": {"cell": p}}, xs, seq_lengths=n)
  )(params, xs, lengths)
  valid = np.arange(T)[None, :] < lengths[:, None]
  np.testing.assert_allclose(hs[valid], flax_hs[valid], rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(hs[~valid], 0.0)
  assert_tree_allclose(final, flax_final, rtol=1e-12, atol=1e-12)


def test_from_flax_errors():
  xs = np.zeros((2, 3, 5), F32)
  cell = bj.from_flax(nn.GRUCell(features=4))
  params = _init(cell, 3)
  with pytest.raises(ValueError, match="flax.GRUCell: inputs have 5 features but the params "
                                       "expect D = 3"):
    jax.jit(lambda p, xs: bj.unroll(cell, p, xs))(params, xs)
  with pytest.raises(TypeError, match="expected a Flax recurrent cell .*got Dense"):
    jax.jit(lambda xs: bj.unroll(bj.from_flax(nn.Dense(3)), {}, xs))(xs)


# ----------------------------------------------------------------------------
# Bad arguments.


def test_as_cell_rejects_non_callable():
  xs = np.zeros((1, 2, 3))
  with pytest.raises(TypeError, match="expected a bptt_jax.Cell or a step function .* got int"):
    jax.jit(lambda xs: bj.unroll(42, {}, xs, carry=xs[:, 0]))(xs)


def test_factory_errors():
  xs = np.zeros((1, 2, 3))
  cases = [
      (lambda: bj.rnn(4, "sigmoid"),
       r"activation must be one of \['relu', 'tanh'\], got 'sigmoid'"),
      (lambda: bj.lstm(0), "hidden_size must be a positive int, got 0"),
      (lambda: bj.gru(2.5), "hidden_size must be a positive int, got 2.5"),
      (lambda: bj.rnn(4, input_init="zeros"),
       r"input_init must be one of \['glorot_uniform', 'lecun_normal'\] or a callable, "
       "got 'zeros'"),
      (lambda: bj.gru(4, recurrent_init="eye"),
       "recurrent_init must be 'orthogonal', 'identity' or a callable, got 'eye'"),
  ]
  for make, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.jit(lambda xs, make=make: bj.unroll(make(), {}, xs))(xs)
  with pytest.raises(ValueError, match="input_size must be a positive int, got 0"):
    jax.jit(bj.rnn(3).init, static_argnums=1)(KEY, 0)


def test_gru_reset_after_errors():
  with pytest.raises(TypeError, match="reset_after must be a bool, got 'False'"):
    bj.gru(4, reset_after="False")
  with pytest.raises(ValueError, match=r"layer_norm=True, reset_after=False.*\(r \* h\) U_n"):
    bj.gru(4, reset_after=False, layer_norm=True)
  assert bj.gru(4, reset_after=np.bool_(False)).name == "gru_reset_before"
  xs = np.zeros((1, 2, 3), F32)
  cell = bj.gru(4, reset_after=False)
  params = _init(cell, 3)
  with pytest.raises(ValueError, match="gru_reset_before has no fused sequence implementation"):
    jax.jit(lambda p, xs: bj.unroll(cell, p, xs, fused=True))(params, xs)
