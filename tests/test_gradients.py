"""Tests for bptt_jax/_gradients.py: explicit BPTT and gradient-flow diagnostics."""

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
  numerical_grad,
  random_params,
  rnn_step,
  take_rows,
  to_f64,
)

import bptt_jax as bj

KEY = jax.random.key(0)
B, T, D, H, O = 3, 6, 2, 4, 2


def _inputs(shape, seed=2, dtype=F64):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _params(cell, seed=1):
  return random_params(jax.eval_shape(lambda k: cell.init(k, D), KEY), seed)


def _readout(seed=3, dtype=F64):
  return random_params(jax.eval_shape(lambda k: bj.init_readout(k, H, O, dtype), KEY), seed)


def _loss_of_hs(kind, ro, ys, lengths):
  """``loss_of_hs(hs [B, T, H]) -> scalar`` for a sequence-to-one or -to-sequence task."""
  if kind == "seq2one":  # readout of each sequence's last valid step
    return lambda hs: bj.final_loss(bj.mse(bj.readout(ro, bj.last_step(hs, lengths)),
                                           ys[:, -1]), lengths)
  return lambda hs: bj.sequence_loss(bj.mse(bj.readout(ro, hs), ys), lengths=lengths)


def _numpy_loss(kind, ro, ys, lengths):
  """The numpy twin of :func:`_loss_of_hs`, written from the formulas."""
  n = np.full(B, T) if lengths is None else lengths
  sq = lambda h, y: np.sum((h @ ro["W_hy"] + ro["b_y"] - y) ** 2)  # noqa: E731
  if kind == "seq2one":
    return lambda hs: np.mean([sq(hs[b, n[b] - 1], ys[b, -1]) for b in range(B) if n[b] > 0])
  return lambda hs: sum(sq(hs[b, t], ys[b, t]) for b in range(B) for t in range(n[b])) / B


def _perturbed_dh(activation, params, xs, h0, lengths, loss):
  """``dL/dh_t`` ``[B, T, H]``: central differences w.r.t. ``eps_t`` added to ``h_t``.

  A numpy loop over time; ``loss`` is a numpy function of ``hs`` ``[B, T, H]``.
  """
  n = np.full(B, T) if lengths is None else lengths

  def loss_of_eps(eps):
    h, hs = h0, np.zeros((B, T, H))
    for t in range(T):
      new, _ = rnn_step(np, params, h, xs[:, t], activation=activation)
      m = (t < n)[:, None]
      h = np.where(m, new + eps[:, t], h)
      hs[:, t] = np.where(m, h, 0.0)
    return loss(hs)

  return numerical_grad(loss_of_eps, np.zeros((B, T, H)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_lengths", [False, True])
@pytest.mark.parametrize("kind", ["seq2one", "seq2seq"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_explicit_bptt_equals_autodiff_through_unroll(activation, kind, use_lengths, dtype):
  cell = bj.rnn(H, activation, dtype=dtype)
  params, ro = _params(cell, seed=4), _readout(dtype=dtype)  # seed 4: no dead ReLU at the end
  xs, ys = _inputs((B, T, D), dtype=dtype), _inputs((B, T, O), seed=4, dtype=dtype)
  h0 = 0.5 * _inputs((B, H), seed=5, dtype=dtype)
  lengths = np.array([6, 3, 0]) if use_lengths else None
  loss_of_hs = _loss_of_hs(kind, ro, ys, lengths)

  def direct(params, h0):  # the same loss through bj.unroll, differentiated by JAX
    _, hs = bj.unroll(cell, params, xs, carry=h0, lengths=lengths, fused=False)
    return loss_of_hs(hs)

  @jax.jit
  def run(params, h0):
    return (bj.rnn_value_and_grad(params, xs, loss_of_hs, activation=activation, carry=h0,
                                  lengths=lengths, per_step=True),
            jax.value_and_grad(direct, (0, 1))(params, h0))

  out = run(params, h0)
  assert_dtype(out, dtype)
  (loss, g), (want_loss, (want_grads, want_dh0)) = out
  tol = GRAD_TOL[dtype]
  np.testing.assert_allclose(loss, want_loss, **VALUE_TOL[dtype])
  for k in ("W", "U", "b"):
    assert_grads_close(g.grads[k], want_grads[k], **tol)
    assert_grads_close(g.per_step[k].sum(axis=0), want_grads[k], **tol)
    assert g.per_step[k].shape == (T,) + want_grads[k].shape
  assert_grads_close(g.dcarry, want_dh0, **tol)
  params, ro, xs, ys, h0 = to_f64((params, ro, xs, ys, h0))
  want_dh = _perturbed_dh(activation, params, xs, h0, lengths,
                          _numpy_loss(kind, ro, ys, lengths))
  # Central differences in float64 are good to about 1e-8.
  assert_grads_close(g.dh, want_dh, **{F32: tol, F64: dict(rtol=1e-6, atol=1e-8)}[dtype])
  if use_lengths:  # padded steps contribute nothing to the weight gradients
    for k in ("W", "U", "b"):
      np.testing.assert_array_equal(g.per_step[k][lengths.max():], 0.0)
  assert np.abs(want_grads["U"]).max() > 1e-3  # the test is not vacuous


@pytest.mark.parametrize("dtype", DTYPES)
def test_rnn_bptt_without_per_step_and_default_carry(dtype):
  cell = bj.rnn(H, dtype=dtype)
  params = _params(cell)
  xs, dhs = _inputs((B, T, D), dtype=dtype), _inputs((B, T, H), seed=6, dtype=dtype)

  def direct(params, h0):  # sum_t <dhs_t, h_t> has direct gradient dhs
    _, hs = bj.unroll(cell, params, xs, carry=h0, fused=False)
    return jnp.sum(hs * dhs)

  @jax.jit
  def run(params):
    return (bj.rnn_bptt(params, xs, dhs),
            jax.grad(direct, (0, 1))(params, jnp.zeros((B, H), dtype)))

  g, (want, want_dh0) = run(params)
  assert g.per_step is None
  assert_dtype((g, want), dtype)
  assert_grads_close(g.grads, want, **GRAD_TOL[dtype])
  assert_grads_close(g.dcarry, want_dh0, **GRAD_TOL[dtype])


@pytest.mark.float64
def test_rnn_bptt_gradient_passes_through_padded_steps():
  # rnn_bptt's docstring: a padded step copies h forward, so a gradient given
  # there (dhs nonzero at t >= lengths[b]) flows back to the last valid step.
  cell = bj.rnn(H, dtype=F64)
  params = _params(cell)
  xs, dhs, h0 = _inputs((B, T, D)), _inputs((B, T, H), seed=6), _inputs((B, H), seed=7)
  lengths = np.array([6, 3, 0])
  g = jax.jit(lambda p, xs, dhs, h0: bj.rnn_bptt(p, xs, dhs, carry=h0, lengths=lengths))(
      params, xs, dhs, h0)

  def loss(tree):  # sum_t <dhs_t, h_t>, h_t copied forward on padded steps (numpy)
    p, h = tree
    total = 0.0
    for t in range(T):
      new, _ = rnn_step(np, p, h, xs[:, t])
      h = np.where((t < lengths)[:, None], new, h)
      total += np.sum(dhs[:, t] * h)
    return total

  want_grads, want_dh0 = numerical_grad(loss, (params, h0))
  for k in ("W", "U", "b"):
    np.testing.assert_allclose(g.grads[k], want_grads[k], rtol=1e-7, atol=1e-8)
  np.testing.assert_allclose(g.dcarry, want_dh0, rtol=1e-7, atol=1e-8)
  np.testing.assert_allclose(g.dcarry[2], dhs[2].sum(axis=0), rtol=1e-12)  # length 0


# ----------------------------------------------------------------------------
# Gradient flow.


def _numpy_dh(activation, params, ro, xs, ys, lengths):
  """``dL/dh_t`` for the per-step squared-error loss, by the BPTT recursion in numpy.

  ``L = (1/B) sum_{b, t < n_b} ||h_bt W_hy + b_y - y_bt||^2``; a padded step
  copies ``h`` forward, so its gradient passes through unchanged.
  """
  W, U, b = params["W"], params["U"], params["b"]
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(float)[..., None]
  h, hs, fprime = np.zeros((B, H)), [], []
  for t in range(T):
    a = xs[:, t] @ W + h @ U + b
    new = np.tanh(a) if activation == "tanh" else np.maximum(a, 0.0)
    fprime.append(1 - new ** 2 if activation == "tanh" else (a > 0).astype(float))
    h = mask[:, t] * new + (1 - mask[:, t]) * h
    hs.append(h)
  loss = sum(mask[bb, t, 0] * np.sum((hs[t][bb] @ ro["W_hy"] + ro["b_y"] - ys[bb, t]) ** 2)
             for bb in range(B) for t in range(T)) / B
  dh = np.zeros((B, T, H))
  dh_next = np.zeros((B, H))
  for t in reversed(range(T)):
    direct = mask[:, t] * 2.0 / B * (hs[t] @ ro["W_hy"] + ro["b_y"] - ys[:, t]) @ ro["W_hy"].T
    dh[:, t] = direct + dh_next
    da = mask[:, t] * dh[:, t] * fprime[t]
    dh_next = da @ U.T + (1 - mask[:, t]) * dh[:, t]
  return loss, dh, mask[..., 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradient_flow_rnn_matches_numpy_recursion(activation, dtype):
  cell = bj.rnn(H, activation, dtype=dtype)
  params, ro = _params(cell), _readout(dtype=dtype)
  xs, ys = _inputs((B, T, D), dtype=dtype), _inputs((B, T, O), seed=4, dtype=dtype)
  lengths = np.array([6, 4, 0])
  loss_of_hs = _loss_of_hs("seq2seq", ro, ys, lengths)
  loss, norms = jax.jit(lambda p, xs: bj.gradient_flow(cell, p, xs, loss_of_hs,
                                                       lengths=lengths))(params, xs)
  assert_dtype((loss, norms), dtype)
  want_loss, dh, mask = _numpy_dh(activation, *to_f64((params, ro, xs, ys)), lengths)
  np.testing.assert_allclose(loss, want_loss, **VALUE_TOL[dtype])
  assert_grads_close(norms, np.linalg.norm(dh, axis=-1) * mask, **GRAD_TOL[dtype])
  assert norms.shape == (B, T) and norms[0].min() > 0


def _perturbed_h_grads(spec, params, xs, lengths, loss):
  """``dL/dh_t`` ``[B, T, H]``: central differences w.r.t. ``eps_t`` added to ``h_t`` only.

  A numpy loop over time; for the LSTM the cell state is left unperturbed.
  """

  def loss_of_eps(eps):
    carry, hs = spec.zeros(B, H), np.zeros((B, T, H))
    for t in range(T):
      new, _ = spec.step(np, params, carry, xs[:, t])
      m = (t < lengths)[:, None]
      if isinstance(new, tuple):  # LSTM: (h, c)
        carry = type(new)(np.where(m, new[0] + eps[:, t], carry[0]), np.where(m, new[1], carry[1]))
        hs[:, t] = np.where(m, carry[0], 0.0)
      else:
        carry = np.where(m, new + eps[:, t], carry)
        hs[:, t] = np.where(m, carry, 0.0)
    return loss(hs)

  return numerical_grad(loss_of_eps, np.zeros((B, T, H)))


@pytest.mark.float64
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_gradient_flow_matches_perturbation_loop(name):
  spec = CELLS[name]
  cell = spec.make(H)
  params, ro = _params(cell), _readout()
  xs, ys = _inputs((B, T, D)), _inputs((B, T, O), seed=4)
  lengths = np.array([6, 2, 5])
  loss_of_hs = _loss_of_hs("seq2one", ro, ys, lengths)
  _, norms = jax.jit(lambda p, xs: bj.gradient_flow(cell, p, xs, loss_of_hs,
                                                    lengths=lengths))(params, xs)
  want = np.linalg.norm(
      _perturbed_h_grads(spec, params, xs, lengths, _numpy_loss("seq2one", ro, ys, lengths)),
      axis=-1)
  np.testing.assert_allclose(norms, want, rtol=1e-6, atol=1e-8)
  assert want[1, 1] > 0 and want[1, 2] == 0  # the last valid step and a padded one


def _hidden(carry):
  return carry[0] if isinstance(carry, tuple) else carry


def _final_h_from(spec, xp, params, carry_t, xs_after, h):
  """``h_t -> h_{n-1}``: from the carry after step ``t`` with ``h`` as its hidden state.

  The LSTM cell state ``c_t`` is kept; ``xs_after`` ``[1, n - 1 - t, D]`` holds
  the remaining inputs.
  """
  c = type(carry_t)(h, carry_t[1]) if isinstance(carry_t, tuple) else h
  for s in range(xs_after.shape[1]):
    c, _ = spec.step(xp, params, c, xs_after[:, s])
  return _hidden(c)


def _fd_jacobian(f, h):
  """``df/dh`` ``[H, H]`` of ``f: [1, H] -> [1, H]`` by central differences (numpy)."""
  return np.stack([numerical_grad(lambda h, i=i: f(h)[0, i], h)[0] for i in range(H)])


# The reference Jacobian: jax.jacobian of a jax.numpy Python loop, or central
# differences of the numpy loop.
@pytest.mark.float64
@pytest.mark.parametrize("name,use_lengths,how", [("rnn_tanh", True, "jax"),
                                                  ("lstm", False, "fd")])
def test_jacobian_norms_match_jacobian_of_python_loop(name, use_lengths, how):
  spec = CELLS[name]
  cell = spec.make(H)
  params = _params(cell)
  xs = _inputs((B, T, D))
  lengths = np.array([6, 3, 1]) if use_lengths else np.full(B, T)
  norms = jax.jit(lambda p, xs: bj.jacobian_norms(
      cell, p, xs, lengths=lengths if use_lengths else None))(params, xs)

  xp = jnp if how == "jax" else np
  want = np.zeros((B, T))
  for b in range(B):
    x_b = xs[b:b + 1, :lengths[b]]
    carry, carries = take_rows(spec.zeros(B, H), b), []
    for t in range(x_b.shape[1]):  # the states along sequence b
      carry, _ = spec.step(np, params, carry, x_b[:, t])
      carries.append(carry)
    for t, carry_t in enumerate(carries):
      final_h = functools.partial(_final_h_from, spec, xp, params, carry_t, x_b[:, t + 1:])
      if how == "jax":
        jac = np.asarray(jax.jacobian(final_h)(jnp.asarray(_hidden(carry_t)))).reshape(H, H)
      else:
        jac = _fd_jacobian(final_h, _hidden(carry_t))
      want[b, t] = np.linalg.norm(jac)
  tol = dict(rtol=1e-10, atol=1e-12) if how == "jax" else dict(rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(norms, want, **tol)
  np.testing.assert_allclose(norms[0, T - 1], np.sqrt(H), rtol=1e-12)  # dh_T/dh_T = I
  if use_lengths:
    np.testing.assert_array_equal(norms[2, 1:], 0.0)  # after the end of sequence 2


# ----------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise():
  params = {"W": np.zeros((D, H), F32), "U": np.zeros((H, H), F32), "b": np.zeros(H, F32)}
  xs, dhs = np.zeros((B, T, D), F32), np.zeros((B, T, H), F32)

  def raises(exc, match, fn, *args):
    with pytest.raises(exc, match=match):
      jax.jit(fn)(*args)

  raises(ValueError, r"activation must be one of \['relu', 'tanh'\], got 'gelu'",
         functools.partial(bj.rnn_bptt, activation="gelu"), params, xs, dhs)
  raises(ValueError, r"activation must be one of \['relu', 'tanh'\], got 'gelu'",
         lambda p, xs: bj.rnn_value_and_grad(p, xs, jnp.sum, activation="gelu"), params, xs)
  raises(ValueError, "params must hold W, U and b, missing 'b'", bj.rnn_bptt,
         {"W": params["W"], "U": params["U"]}, xs, dhs)
  raises(ValueError, r"W must be \[D, H\] = \(3, 4\) for inputs with D = 3, got \(2, 4\)",
         bj.rnn_bptt, params, np.zeros((B, T, 3)), dhs)
  raises(ValueError, r"dhs must be \[B, T, H\] = \(3, 6, 4\), got \(3, 5, 4\)",
         bj.rnn_bptt, params, xs, dhs[:, :5])
  raises(ValueError, r"xs must have rank 3 .* got shape \(6, 2\)", bj.rnn_bptt, params, xs[0],
         dhs)
  raises(ValueError, r"lengths must have shape \[B\] = \(3,\), got \(2,\)",
         lambda p, xs: bj.rnn_bptt(p, xs, dhs, lengths=np.array([1, 2])), params, xs)
  cell = bj.rnn(H)
  raises(ValueError, "rnn_tanh: inputs have 3 features but the params expect D = 2",
         lambda p, xs: bj.gradient_flow(cell, p, xs, jnp.sum), params, np.zeros((B, T, 3), F32))
  raises(ValueError, r"lengths must lie in \[0, T\] = \[0, 6\], got values from 0 to 7",
         lambda p, xs: bj.jacobian_norms(cell, p, xs, lengths=np.array([0, 7, 1])), params, xs)
