"""Tests for bptt_jax/_unroll.py: unroll against Python loops, masking, remat, errors."""

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
  run_sequence,
  take_rows,
  to_f64,
)

import bptt_jax as bj

KEY = jax.random.key(0)
# Masking and reverse do not depend on the cell's equations, only on the carry's
# structure, an array (RNN, GRU) or a tuple (LSTM), and on the code path: the
# fused backward pass (plain RNN and LSTM, the default on CPU) or a scan over the
# step (layer-norm GRU).
MASK_CELLS = ["rnn_tanh", "lstm", "gru_ln"]


def _setup(name, D, H, seed=1, dtype=F32):
  spec = CELLS[name]
  cell = spec.make(H, dtype)
  params = random_params(jax.eval_shape(lambda k: cell.init(k, D), KEY), seed)
  return spec, cell, params


def _readout(H, O, seed=3, dtype=F64):
  return random_params(jax.eval_shape(lambda k: bj.init_readout(k, H, O, dtype), KEY), seed)


def _inputs(shape, seed=2, dtype=F64):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _pad_with_garbage(xs, lengths, seed=9):
  """Fills ``xs[b, t >= lengths[b]]`` with large values that must never matter."""
  xs = np.array(xs)
  junk = 5.0 * np.random.default_rng(seed).normal(size=xs.shape) + 3.0
  invalid = np.arange(xs.shape[1])[None, :] >= np.asarray(lengths)[:, None]
  xs[invalid] = junk[invalid]
  return xs


# ----------------------------------------------------------------------------
# Values against a per-step Python loop over numpy equations.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CELL_NAMES)
def test_hoisted_per_step_and_fused_paths_match_python_loop(name, dtype):
  B, T, D, H = 3, 7, 3, 4
  spec, cell, params = _setup(name, D, H, dtype=dtype)
  xs = _inputs((B, T, D), dtype=dtype)

  @jax.jit
  def run(params, xs):
    out = [bj.unroll(cell, params, xs, hoist=True),
           bj.unroll(cell, params, xs, hoist=False, fused=False)]
    if cell.sequence is not None:  # the fused pass, default on CPU
      out.append(bj.unroll(cell, params, xs, hoist=False, fused=True))
    return out

  want_final, want_hs = loop_unroll(spec.step, params, xs, spec.zeros(B, H), H)
  tol = VALUE_TOL[dtype]
  for final, hs in run(params, xs):
    chex.assert_shape(hs, (B, T, H))
    assert_dtype((final, hs), dtype)
    np.testing.assert_allclose(hs, want_hs, **tol)
    assert_tree_allclose(final, want_final, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reverse_time_major_carry_and_scan_unroll_match_python_loop(dtype):
  B, T, D, H = 2, 6, 3, 4
  spec, cell, params = _setup("lstm", D, H, dtype=dtype)
  xs = _inputs((B, T, D), dtype=dtype)
  carry = bj.LSTMState(_inputs((B, H), seed=3, dtype=dtype), _inputs((B, H), seed=4, dtype=dtype))

  @jax.jit
  def run(params, xs, carry):
    return {
        "reverse": bj.unroll(cell, params, xs, carry=carry, reverse=True, hoist=True),
        "reverse_step": bj.unroll(cell, params, xs, carry=carry, reverse=True, hoist=False),
        "time_major": bj.unroll(cell, params, jnp.swapaxes(xs, 0, 1), carry=carry,
                                time_major=True),
        "unroll2": bj.unroll(cell, params, xs, carry=carry, unroll=2),
    }

  got = run(params, xs, carry)
  assert_dtype(got, dtype)
  fwd_final, fwd_hs = loop_unroll(spec.step, params, xs, carry, H)
  rev_final, rev_hs = loop_unroll(spec.step, params, xs, carry, H, reverse=True)
  tol = VALUE_TOL[dtype]
  for key in ("reverse", "reverse_step"):
    np.testing.assert_allclose(got[key][1], rev_hs, **tol)
    assert_tree_allclose(got[key][0], rev_final, **tol)
  np.testing.assert_allclose(got["time_major"][1], np.swapaxes(fwd_hs, 0, 1), **tol)
  assert_tree_allclose(got["time_major"][0], fwd_final, **tol)
  np.testing.assert_allclose(got["unroll2"][1], fwd_hs, **tol)
  # Sanity check of the reference: reversing really changes the result.
  assert not np.allclose(rev_hs, fwd_hs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_user_step_function_with_explicit_carry(dtype):
  B, T, D, H = 2, 5, 3, 2
  rng = np.random.default_rng(0)
  params = {"A": rng.normal(size=(D, H)).astype(dtype), "C": rng.normal(size=(H, H)).astype(dtype)}

  def user_step(params, h, x):
    h = jnp.tanh(x @ params["A"] + h @ params["C"])
    return h, 2.0 * h

  def ref_step(xp, params, h, x):
    h = np.tanh(x @ params["A"] + h @ params["C"])
    return h, 2.0 * h

  xs, h0 = _inputs((B, T, D), dtype=dtype), _inputs((B, H), seed=5, dtype=dtype)
  lengths = np.array([5, 3])
  final, hs = jax.jit(
      lambda p, xs, h0: bj.unroll(user_step, p, xs, carry=h0, lengths=lengths))(params, xs, h0)
  assert_dtype((final, hs), dtype)
  want_final, want_hs = loop_unroll(ref_step, params, xs, h0, H, lengths=lengths)
  np.testing.assert_allclose(hs, want_hs, **VALUE_TOL[dtype])
  np.testing.assert_allclose(final, want_final, **VALUE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_general_mask_matches_python_loop(dtype):
  B, T, D, H = 2, 6, 3, 4
  spec, cell, params = _setup("gru", D, H, dtype=dtype)
  xs = _inputs((B, T, D), dtype=dtype)
  mask = np.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], bool)
  final, hs = jax.jit(lambda p, xs, m: bj.unroll(cell, p, xs, mask=m))(params, xs, mask)
  assert_dtype((final, hs), dtype)
  tol = VALUE_TOL[dtype]
  ref_params, ref_xs = to_f64((params, xs))
  h = np.zeros((B, H))
  for t in range(T):  # step only where the mask is on; zero output elsewhere
    new, out = spec.step(np, ref_params, h, ref_xs[:, t])
    m = mask[:, t:t + 1]
    h = np.where(m, new, h)
    np.testing.assert_allclose(hs[:, t], np.where(m, out, 0.0), **tol)
  np.testing.assert_allclose(final, h, **tol)


@pytest.mark.float64
def test_float32_stays_float32():
  """With x64 on, so that a float64 constant or cast inside unroll would show."""
  B, T, D, H = 2, 5, 3, 4
  spec = CELLS["lstm"]
  cell = bj.lstm(H, dtype=jnp.float32)
  params32 = random_params(jax.eval_shape(lambda k: cell.init(k, D), KEY), seed=1)
  xs32 = _inputs((B, T, D), dtype=F32)

  def loss(params, xs, hoist):
    final, hs = bj.unroll(cell, params, xs, lengths=np.array([5, 3]), hoist=hoist)
    return jnp.sum(hs ** 2), (final, hs)

  run = jax.jit(lambda p, xs: [jax.value_and_grad(loss, has_aux=True)(p, xs, hoist)
                               for hoist in (False, True)])
  want_final, want_hs = loop_unroll(spec.step, params32, xs32, spec.zeros(B, H), H,
                                    lengths=[5, 3])
  for (value, (final, hs)), grads in run(params32, xs32):
    assert_dtype((value, final, hs, grads), F32)
    np.testing.assert_allclose(hs, want_hs, **VALUE_TOL[F32])
    assert_tree_allclose(final, want_final, **VALUE_TOL[F32])


# ----------------------------------------------------------------------------
# Masking: a padded batch against each sequence run alone.


def _seq_loss(step, params, ro, x, y, carry):
  """Numpy, one unpadded sequence: the summed squared error of the readout.

  Returns ``(loss, final_carry, hs)``.
  """
  carry, hs = run_sequence(np, step, params, x, carry)
  total = sum(np.sum((h @ ro["W_hy"] + ro["b_y"][None] - y[:, t]) ** 2)
              for t, h in enumerate(hs))
  return total, carry, hs


def _carry_loss(xp, carry):
  """``sum ||leaf||^2`` over the carry: a loss that reaches the final state."""
  return sum(xp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(carry))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MASK_CELLS)
def test_padded_batch_matches_each_sequence_alone(name, dtype):
  B, T, D, H, O = 4, 6, 3, 4, 2
  spec, cell, params = _setup(name, D, H, dtype=dtype)
  ro = _readout(H, O, dtype=dtype)
  lengths = np.array([6, 3, 1, 0])
  xs = _pad_with_garbage(_inputs((B, T, D), dtype=dtype), lengths)
  ys = _inputs((B, T, O), seed=4, dtype=dtype)

  def loss(params, ro, xs):
    final, hs = bj.unroll(cell, params, xs, lengths=lengths)
    per_step = bj.mse(bj.readout(ro, hs), ys)
    value = bj.sequence_loss(per_step, lengths=lengths)
    mean = bj.sequence_loss(per_step, lengths=lengths, reduction="mean")
    return value + _carry_loss(jnp, final), (value, mean, final, hs)

  run = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
  out = run(params, ro, xs)
  assert_dtype(out, dtype)
  (_, (value, mean_value, final, hs)), (g_params, g_ro, g_xs) = out

  # Reference: each sequence alone, cut to its own length, in float64 numpy.
  tol = VALUE_TOL[dtype]
  params, ro, xs, ys = to_f64((params, ro, xs, ys))
  zeros, row = spec.zeros(B, H), take_rows
  seqs = [(b, n) for b, n in enumerate(lengths) if n > 0]
  total = 0.0
  for b, n in seqs:
    l_b, c_b, hs_b = _seq_loss(spec.step, params, ro, xs[b:b + 1, :n], ys[b:b + 1], row(zeros, b))
    total += l_b
    np.testing.assert_allclose(hs[b, :n], np.concatenate(hs_b), **tol)
    np.testing.assert_array_equal(hs[b, n:], 0.0)  # padded outputs are zero
    assert_tree_allclose(row(final, b), c_b, **tol)  # the state at its own end
  assert_tree_allclose(row(final, 3), row(zeros, 3), atol=0)  # length 0: untouched
  np.testing.assert_array_equal(hs[3], 0.0)
  np.testing.assert_allclose(value, total / B, **tol)
  np.testing.assert_allclose(mean_value, total / lengths.sum(), **tol)

  def batch_loss(tree):  # each sequence run alone: (1/B) sum of losses + final states
    p, r, x_seqs = tree
    total = 0.0
    for (b, _), x in zip(seqs, x_seqs, strict=True):
      l_b, c_b, _ = _seq_loss(spec.step, p, r, x, ys[b:b + 1], row(zeros, b))
      total += l_b / B + _carry_loss(np, c_b)
    return total

  want_p, want_r, want_x = numerical_grad(batch_loss,
                                          (params, ro, [xs[b:b + 1, :n] for b, n in seqs]))
  # Central differences in float64 are good to about 1e-8.
  fd_tol = {F32: GRAD_TOL[F32], F64: dict(rtol=1e-6, atol=1e-8)}[dtype]
  assert_grads_close((g_params, g_ro), (want_p, want_r), **fd_tol)
  for (b, n), g in zip(seqs, want_x, strict=True):
    assert_grads_close(g_xs[b, :n], g[0], **fd_tol)
    np.testing.assert_array_equal(g_xs[b, n:], 0.0)  # padding gets no gradient
  np.testing.assert_array_equal(g_xs[3], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MASK_CELLS)
def test_reverse_with_lengths_matches_flipped_sequences(name, dtype):
  B, T, D, H = 3, 6, 3, 4
  spec, cell, params = _setup(name, D, H, dtype=dtype)
  lengths = np.array([4, 6, 0])
  xs = _pad_with_garbage(_inputs((B, T, D), dtype=dtype), lengths)

  @jax.jit
  def run(params, xs, lengths):
    return [bj.unroll(cell, params, xs, lengths=lengths, reverse=True, hoist=h)
            for h in (True, False)]

  tol = VALUE_TOL[dtype]
  for final, hs in run(params, xs, lengths):
    assert_dtype((final, hs), dtype)
    for b, n in enumerate(lengths):
      c0 = take_rows(spec.zeros(B, H), b)
      x_rev = np.flip(xs[b:b + 1, :n], axis=1)
      c_b, hs_b = loop_unroll(spec.step, params, x_rev, c0, H)
      np.testing.assert_allclose(hs[b, :n], np.flip(hs_b[0], axis=0), **tol)
      np.testing.assert_array_equal(hs[b, n:], 0.0)
      assert_tree_allclose(take_rows(final, b), c_b, **tol)


def test_empty_sequences_give_zero_loss_and_zero_gradients():
  B, T, D, H, O = 3, 5, 3, 4, 2
  spec, cell, params = _setup("lstm", D, H)
  ro = _readout(H, O, dtype=F32)
  xs, ys = _inputs((B, T, D), dtype=F32), _inputs((B, T, O), seed=4, dtype=F32)
  carry = bj.LSTMState(_inputs((B, H), seed=5, dtype=F32), _inputs((B, H), seed=6, dtype=F32))
  lengths = np.zeros(B, int)

  def losses(params, ro, xs, carry):
    final, hs = bj.unroll(cell, params, xs, carry=carry, lengths=lengths)
    per_step = bj.mse(bj.readout(ro, hs), ys)
    last = bj.mse(bj.readout(ro, bj.last_step(hs, lengths)), ys[:, -1])
    values = {
        "sum": bj.sequence_loss(per_step, lengths=lengths),
        "mean": bj.sequence_loss(per_step, lengths=lengths, reduction="mean"),
        "final": bj.final_loss(last, lengths),
    }
    return values, (values, final)

  # One Jacobian: d{sum, mean, final}/d(params, readout, xs, carry).
  run = jax.jit(jax.jacrev(losses, (0, 1, 2, 3), has_aux=True))
  jacobians, (values, final) = run(params, ro, xs, carry)
  for k in ("sum", "mean", "final"):
    assert np.isfinite(values[k]) and values[k] == 0.0, (k, values[k])
    for leaf in jax.tree_util.tree_leaves(jacobians[k]):
      np.testing.assert_array_equal(leaf, 0.0)
  assert_tree_allclose(final, carry, atol=0)


# ----------------------------------------------------------------------------
# Memory-saving BPTT.


# Forward on the default CPU path (the LSTM's fused pass), reverse on a scan
# over the hoisted projection.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse,hoist", [(False, False), (True, True)])
def test_remat_gives_same_values_and_gradients(reverse, hoist, dtype):
  B, T, D, H = 3, 10, 2, 3
  spec, cell, params = _setup("lstm", D, H, dtype=dtype)
  lengths = np.array([10, 7, 0])
  xs = _pad_with_garbage(_inputs((B, T, D), dtype=dtype), lengths)
  ys = _inputs((B, T, H), seed=4, dtype=dtype)

  def loss(params, xs, remat, lens):
    final, hs = bj.unroll(cell, params, xs, lengths=lens, reverse=reverse, remat=remat,
                          hoist=hoist)
    return jnp.sum((hs - ys) ** 2) + jnp.sum(final.c ** 2), hs

  # On T = 10, remat=3 and "sqrt" make segments of 4, 4 and 2 steps (the last
  # one padded); the loss reaches every output and the final carry.
  cases = (None, 3, "sqrt")

  @jax.jit
  def run(params, xs):
    return [jax.value_and_grad(loss, (0, 1), has_aux=True)(params, xs, remat, lengths)
            for remat in cases]

  got = run(params, xs)
  assert_dtype(got, dtype)
  out = dict(zip(cases, got, strict=True))
  _, want_hs = loop_unroll(spec.step, params, xs, spec.zeros(B, H), H, lengths=lengths,
                           reverse=reverse)
  (base, base_hs), base_grads = out[None]
  tol = VALUE_TOL[dtype]
  np.testing.assert_allclose(base_hs, want_hs, **tol)
  for remat in (3, "sqrt"):
    (value, hs), grads = out[remat]
    np.testing.assert_allclose(hs, want_hs, **tol)
    np.testing.assert_allclose(value, base, **tol)
    assert_grads_close(grads, base_grads, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_remat_segment_counts(dtype):
  # T = 7 without lengths: 7 segments of one step, and more segments than steps.
  B, T, D, H = 2, 7, 2, 3
  spec, cell, params = _setup("gru", D, H, dtype=dtype)
  xs = _inputs((B, T, D), dtype=dtype)
  run = jax.jit(lambda p, xs: [bj.unroll(cell, p, xs, remat=r)[1] for r in (7, 100)])
  _, want_hs = loop_unroll(spec.step, params, xs, spec.zeros(B, H), H)
  for hs in run(params, xs):
    assert hs.dtype == dtype
    np.testing.assert_allclose(hs, want_hs, **VALUE_TOL[dtype])


# ----------------------------------------------------------------------------
# Bidirectional.


@pytest.mark.parametrize("dtype", DTYPES)
def test_bidirectional_matches_python_loops(dtype):
  B, T, D = 3, 5, 2
  fcell, bcell = bj.gru(3, dtype=dtype), bj.lstm(2, dtype=dtype)
  params = random_params(jax.eval_shape(lambda k: (fcell.init(k, D), bcell.init(k, D)), KEY),
                         seed=1)
  lengths = np.array([5, 2, 1])
  xs = _pad_with_garbage(_inputs((B, T, D), dtype=dtype), lengths)
  (f_final, b_final), hs = jax.jit(
      lambda p, xs, n: bj.bidirectional(fcell, bcell, p, xs, lengths=n))(params, xs, lengths)
  chex.assert_shape(hs, (B, T, 5))
  assert_dtype((f_final, b_final, hs), dtype)
  want_f_final, want_f = loop_unroll(gru_step, params[0], xs, np.zeros((B, 3)), 3,
                                     lengths=lengths)
  zeros = bj.LSTMState(np.zeros((B, 2)), np.zeros((B, 2)))
  want_b_final, want_b = loop_unroll(lstm_step, params[1], xs, zeros, 2, lengths=lengths,
                                     reverse=True)
  tol = VALUE_TOL[dtype]
  np.testing.assert_allclose(hs, np.concatenate([want_f, want_b], axis=-1), **tol)
  assert_tree_allclose((f_final, b_final), (want_f_final, want_b_final), **tol)


# ----------------------------------------------------------------------------
# Tracing.


def test_jitted_unroll_does_not_retrace():
  B, T, D, H = 2, 6, 3, 4
  _, cell, params = _setup("lstm", D, H)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(params, xs, lengths):
    _, hs = bj.unroll(cell, params, xs, lengths=lengths, remat=2)
    return jnp.sum(hs ** 2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, xs, lengths):
    grads = jax.grad(lambda p: jnp.sum(bj.unroll(cell, p, xs, lengths=lengths)[1] ** 2))(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

  for seed in (1, 2):  # new values, same shapes
    params_s = random_params(params, seed)
    xs, lengths = _inputs((B, T, D), seed, dtype=F32), np.array([seed + 3, T - seed])
    loss(params_s, xs, lengths)
    train_step(params_s, xs, lengths)
  # A new shape traces again, and the counter notices it.
  with pytest.raises(AssertionError, match="traced > 1 times"):
    loss(params, _inputs((B, T + 1, D), dtype=F32), lengths)


def test_length_mask():
  got = jax.jit(bj.length_mask, static_argnums=1)(np.array([0, 2, 4]), 4)
  want = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(got, want)


def _jaxpr(cell, params, xs, **kwargs):
  return str(jax.make_jaxpr(lambda p, xs: bj.unroll(cell, p, xs, **kwargs))(params, xs))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default")
def test_cpu_default_projects_per_step_and_takes_the_fused_path():
  """On CPU, unroll without hoist= or fused= traces exactly what hoist=False
  traces: the fused sequence (a custom_vjp) for a cell that has one, a scan
  over the step for one that has not."""
  assert bj.default_hoist() is False
  B, T, D, H = 2, 5, 3, 4
  xs = _inputs((B, T, D), dtype=F32)
  _, lstm, params = _setup("lstm", D, H)
  default = _jaxpr(lstm, params, xs)
  assert "custom_vjp_call" in default
  assert default == _jaxpr(lstm, params, xs, fused=True)
  assert default == _jaxpr(lstm, params, xs, hoist=False)
  assert "custom_vjp_call" not in _jaxpr(lstm, params, xs, fused=False)
  assert default != _jaxpr(lstm, params, xs, hoist=True)
  _, lstm_ln, params = _setup("lstm_ln", D, H)  # no fused sequence: a scan over cell.step
  default = _jaxpr(lstm_ln, params, xs)
  assert "custom_vjp_call" not in default
  assert default == _jaxpr(lstm_ln, params, xs, hoist=False)
  assert default != _jaxpr(lstm_ln, params, xs, hoist=True)


# ----------------------------------------------------------------------------
# Bad inputs.


def _unroll_error(exc, match, xs, *, params=None, cell=None, **kwargs):
  cell = bj.rnn(4) if cell is None else cell
  if params is None:
    params = random_params(jax.eval_shape(lambda k: cell.init(k, 3), KEY), seed=0)
  with pytest.raises(exc, match=match):
    jax.jit(lambda p, xs: bj.unroll(cell, p, xs, **kwargs))(params, xs)


def test_bad_inputs_raise():
  xs = np.zeros((2, 5, 3), F32)
  _unroll_error(ValueError, r"xs must have rank 3 .* got shape \(5, 3\)", xs[0])
  _unroll_error(ValueError, "rnn_tanh: inputs have 2 features but the params expect D = 3",
                xs[..., :2])
  _unroll_error(ValueError, r"lengths must have shape \[B\] = \(2,\), got \(3,\)", xs,
                lengths=np.array([1, 2, 3]))
  _unroll_error(ValueError, r"lengths must lie in \[0, T\] = \[0, 5\], got values from 0 to 6",
                xs, lengths=np.array([0, 6]))
  _unroll_error(ValueError, r"lengths must lie in \[0, T\] = \[0, 5\], got values from -1 to 2",
                xs, lengths=jnp.array([-1, 2]))
  _unroll_error(TypeError, "lengths must be integers, got dtype float64", xs,
                lengths=np.array([1.0, 2.0]))
  _unroll_error(ValueError, "carry has batch size 3 but xs has B = 2", xs,
                carry=np.zeros((3, 4)))
  _unroll_error(ValueError, "remat must be None, True, 'sqrt' or a positive number of "
                "segments, got 0", xs, remat=0)
  _unroll_error(ValueError, "give lengths or mask, not both", xs, lengths=np.array([1, 2]),
                mask=np.ones((2, 5), bool))

  def user_step(params, carry, x):
    return carry, carry

  _unroll_error(ValueError, "user_step has no initial_carry: pass carry=", xs,
                cell=user_step, params={})
  _unroll_error(TypeError, "expected a bptt_jax.Cell or a step function", xs, cell=3, params={})


def test_bidirectional_stack_errors():
  """Its values are checked against PyTorch's bidirectional layers in test_torch.py."""
  pair = (bj.rnn(2), bj.rnn(2))
  xs = np.zeros((1, 3, 2), np.float32)
  with pytest.raises(ValueError, match=r"params must hold one entry per layer \(2\), got 1"):
    bj.bidirectional_stack([pair, pair], [({}, {})], xs)
  with pytest.raises(ValueError, match="layer 0 must be a .forward_cell, backward_cell. pair"):
    bj.bidirectional_stack([bj.rnn(2)], [({}, {})], xs)
