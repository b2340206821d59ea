"""minGRU, minLSTM and LRU against Python loops written from their equations; the parallel
and sequential scans against each other; the hand-written backward pass against autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import (
  DTYPES,
  F32,
  F64,
  GRAD_TOL,
  VALUE_TOL,
  assert_grads_close,
  loop_unroll,
  random_params,
  run_sequence,
)

import bptt_jax as bj

B, T, D, H, N = 3, 9, 4, 5, 3
LENGTHS = np.array([9, 4, 0])


# The cells' equations, typed again from the factory docstrings (xp: numpy or jax.numpy).


def _sigmoid(xp, a):
  return 1.0 / (1.0 + xp.exp(-a))


def min_gru_step(xp, p, h, x):
  pre = x @ p["W"] + p["b"][None]
  k, h_tilde = pre[:, :H], pre[:, H:]
  z = _sigmoid(xp, k)
  h = (1.0 - z) * h + z * h_tilde
  return h, h


def min_lstm_step(xp, p, h, x):
  pre = x @ p["W"] + p["b"][None]
  f, i, h_tilde = pre[:, :H], pre[:, H:2 * H], pre[:, 2 * H:]
  sf, si = _sigmoid(xp, f), _sigmoid(xp, i)
  h = sf / (sf + si) * h + si / (sf + si) * h_tilde
  return h, h


def lru_step(xp, p, carry, x):
  s = carry[:, :N] + 1j * carry[:, N:]
  lam = xp.exp(-xp.exp(p["nu_log"]) + 1j * xp.exp(p["theta_log"]))
  gamma = xp.exp(p["gamma_log"])
  s = lam[None] * s + gamma[None] * (x @ (p["B_re"] + 1j * p["B_im"]))
  y = xp.real(s @ (p["C_re"] + 1j * p["C_im"])) + p["D"][None] * x
  return xp.concatenate([xp.real(s), xp.imag(s)], axis=-1), y


CASES = {
    # name: (factory, reference step, input size, carry width)
    "min_gru": (lambda dtype: bj.min_gru(H, dtype=dtype), min_gru_step, D, H),
    "min_lstm": (lambda dtype: bj.min_lstm(H, dtype=dtype), min_lstm_step, D, H),
    "lru": (lambda dtype: bj.lru(H, N, r_min=0.5, dtype=dtype), lru_step, H, 2 * N),
}


def _setup(name, dtype, seed=0):
  make, step, d_in, width = CASES[name]
  cell = make(dtype)
  shapes = jax.eval_shape(lambda k: cell.init(k, d_in), jax.random.key(0))
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), random_params(shapes, seed))
  rng = np.random.default_rng(seed + 1)
  xs = jnp.asarray(rng.normal(size=(B, T, d_in)), dtype)
  carry = jnp.asarray(rng.normal(size=(B, width)) * 0.5, dtype)
  return cell, step, params, xs, carry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_values_equal_python_loop(name, dtype):
  cell, step, params, xs, carry = _setup(name, dtype)
  ref_final, ref_hs = loop_unroll(step, params, xs, carry, H, lengths=LENGTHS)
  for kwargs in ({"method": "parallel"}, {"method": "sequential"}, {"fused": False}):
    run = jax.jit(lambda p, x, c, kw=kwargs: bj.unroll(cell, p, x, lengths=LENGTHS, carry=c,
                                                       **kw))
    final, hs = run(params, xs, carry)
    assert hs.dtype == dtype and final.dtype == dtype
    np.testing.assert_allclose(hs, ref_hs, **VALUE_TOL[dtype])
    np.testing.assert_allclose(final, ref_final, **VALUE_TOL[dtype])


@pytest.mark.parametrize("name,method,dtype", [
    pytest.param("min_gru", "parallel", F64, marks=pytest.mark.float64),
    pytest.param("min_lstm", "sequential", F64, marks=pytest.mark.float64),
    pytest.param("lru", "parallel", F64, marks=pytest.mark.float64),
    pytest.param("min_gru", "sequential", F32),
    pytest.param("min_lstm", "parallel", F32),
    pytest.param("lru", "sequential", F32),
])
def test_gradients_equal_python_loop(name, method, dtype):
  cell, step, params, xs, carry = _setup(name, dtype, seed=2)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, H)), dtype)

  def loss(params, xs, carry):
    final, hs = bj.unroll(cell, params, xs, carry=carry, method=method)
    return jnp.sum(w * jnp.tanh(hs)) + jnp.sum(final ** 2)

  def reference(params, xs, carry):
    final, hs = run_sequence(jnp, step, params, xs, carry)
    return jnp.sum(w * jnp.tanh(jnp.stack(hs, axis=1))) + jnp.sum(final ** 2)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)
  want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(params, xs, carry)
  assert_grads_close(got, want, **GRAD_TOL[dtype])


@pytest.mark.parametrize("name", ["min_lstm", "lru"])
def test_parallel_equals_sequential_with_lengths_reverse_and_carry(name):
  dtype = F32
  cell, _, params, xs, carry = _setup(name, dtype, seed=3)
  w = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, H)), dtype)

  def loss(params, xs, carry, method, reverse):
    final, hs = bj.unroll(cell, params, xs, lengths=LENGTHS, carry=carry, reverse=reverse,
                          method=method)
    return jnp.sum(w * hs) + jnp.sum(jnp.sin(final)), (final, hs)

  for reverse in (False, True):
    outs = {}
    for method in ("parallel", "sequential"):
      grad = jax.jit(jax.grad(functools.partial(loss, method=method, reverse=reverse),
                              argnums=(0, 1, 2), has_aux=True))
      outs[method] = grad(params, xs, carry)
    (g_p, (f_p, h_p)), (g_s, (f_s, h_s)) = outs["parallel"], outs["sequential"]
    np.testing.assert_allclose(h_p, h_s, **VALUE_TOL[dtype])
    np.testing.assert_allclose(f_p, f_s, **VALUE_TOL[dtype])
    assert_grads_close(g_p, g_s, **GRAD_TOL[dtype])
    # Past each sequence's length the outputs are zero and the carry is its own end's.
    assert np.all(np.asarray(h_p)[1, 4:] == 0) and np.all(np.asarray(h_p)[2] == 0)
    np.testing.assert_allclose(f_p[2], carry[2], **VALUE_TOL[dtype])


def _masked_loop(step, params, xs, carry, lengths):
  """``(final, hs)`` of a jax.numpy loop over time; steps past ``lengths`` keep the carry
  and output zeros (differentiable, unlike :func:`loop_unroll`)."""
  hs = []
  for t in range(xs.shape[1]):
    new, h = step(jnp, params, carry, xs[:, t])
    keep = jnp.asarray(t < lengths)[:, None]
    carry = jnp.where(keep, new, carry)
    hs.append(jnp.where(keep, h, 0.0))
  return carry, jnp.stack(hs, axis=1)


@pytest.mark.parametrize("dtype", [pytest.param(F64, marks=pytest.mark.float64), F32])
@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_sequential_chunks_equal_python_loop(name, size, dtype, monkeypatch):
  """The sequential method runs ``size`` steps per chunk (T = 9: a short chunk left over
  for 4): values, carry and the gradients of weights, inputs and carry equal a
  Python loop's, with lengths, reversed, and with several steps per loop iteration."""
  from bptt_jax import _linear_rnn

  monkeypatch.setattr(_linear_rnn, "chunk_size", lambda *args: size)
  cell, step, params, xs, carry = _setup(name, dtype, seed=4)
  lengths = np.array([9, 6, 1])
  for reverse, unroll in ((False, 1), (True, 3)):
    final, hs = jax.jit(lambda p, x, c, reverse=reverse, unroll=unroll: bj.unroll(
        cell, p, x, lengths=lengths, carry=c, reverse=reverse, unroll=unroll,
        method="sequential"))(params, xs, carry)
    ref_final, ref_hs = loop_unroll(step, params, xs, carry, H, lengths=lengths,
                                    reverse=reverse)
    np.testing.assert_allclose(hs, ref_hs, **VALUE_TOL[dtype])
    np.testing.assert_allclose(final, ref_final, **VALUE_TOL[dtype])
  w = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, H)), dtype)

  def loss(params, xs, carry):
    final, hs = bj.unroll(cell, params, xs, lengths=lengths, carry=carry, unroll=3,
                          method="sequential")
    return jnp.sum(w * jnp.tanh(hs)) + jnp.sum(final ** 2)

  def reference(params, xs, carry):
    final, hs = _masked_loop(step, params, xs, carry, lengths)
    return jnp.sum(w * jnp.tanh(hs)) + jnp.sum(final ** 2)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)
  want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(params, xs, carry)
  assert_grads_close(got, want, **GRAD_TOL[dtype])


def test_chunk_size_holds_a_fixed_number_of_bytes():
  from bptt_jax import _linear_rnn

  assert _linear_rnn.chunk_size(16, 256, 4) * 16 * 256 * 4 == _linear_rnn.CHUNK_BYTES
  assert _linear_rnn.chunk_size(1 << 12, 1 << 12, 8) == 1  # never below one step


SCAN_TOL = {F32: (dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-5)),
            F64: (dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-10, atol=1e-12))}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("unroll", [1, 4])
@pytest.mark.parametrize("time_axis", [0, 1])
@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_linear_scan_backward_equals_autodiff_through_lax_scan(method, time_axis, unroll,
                                                               complex_, dtype):
  """The hand-written scan and its backward pass (time-major through ``linear_scan``,
  batch-major through the internal ``_scan`` that ``unroll`` uses) against ``jax.vjp``
  of a plain ``lax.scan`` loop."""
  from bptt_jax._linear_rnn import _scan

  rng = np.random.default_rng(7)
  shape = (T, B, N)

  def draw(*s):
    a = rng.uniform(-1.0, 1.0, size=s)
    a = a + 1j * rng.uniform(-1.0, 1.0, size=s) if complex_ else a
    return jnp.asarray(a, jnp.result_type(dtype, 1j) if complex_ else dtype)

  a, b, s0, g = draw(*shape), draw(*shape), draw(B, N), draw(*shape)

  def autodiff_reference(a, b, s0):
    def body(s, ab):
      s = ab[0] * s + ab[1]
      return s, s
    return jax.lax.scan(body, s0, (a, b))[1]

  def scan(a, b, s0):  # time-major in and out, whatever the time axis inside
    if time_axis == 0:
      return bj.linear_scan((method, unroll), a, b, s0)
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    return swap(_scan((method, unroll, 1), swap(a), swap(b), s0))

  value_tol, grad_tol = SCAN_TOL[dtype]
  got, vjp = jax.vjp(jax.jit(scan), a, b, s0)
  want, vjp_ref = jax.vjp(autodiff_reference, a, b, s0)
  np.testing.assert_allclose(got, want, **value_tol)
  for x, y in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(x, y, **grad_tol)
  # A coefficient shared by all steps and rows ([1, 1, N]) gets its gradient summed.
  a_shared = a[:1, :1]
  _, vjp = jax.vjp(jax.jit(lambda a: scan(a, b, s0)), a_shared)
  _, vjp_ref = jax.vjp(lambda a: autodiff_reference(jnp.broadcast_to(a, shape), b, s0), a_shared)
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], **grad_tol)


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_nan_padding_reaches_no_value_or_gradient(method):
  cell, _, params, xs, carry = _setup("min_lstm", F32)
  xs = xs.at[1, 4:].set(jnp.nan).at[2].set(jnp.inf)

  def loss(params, xs):
    final, hs = bj.unroll(cell, params, xs, lengths=LENGTHS, carry=carry, method=method)
    return jnp.sum(hs) + jnp.sum(final)

  value, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(gp))
  assert np.all(np.asarray(gx)[1, 4:] == 0) and np.all(np.asarray(gx)[2] == 0)


def test_carry_streams_across_chunks_and_segmented_loss():
  """A carry handed from one chunk to the next gives the whole sequence's states, so
  segmented_loss (and streaming TBPTT) work; its gradient equals the plain loss's."""
  cell = bj.min_lstm(H)
  params = cell.init(jax.random.key(0), D)
  xs = jax.random.normal(jax.random.key(1), (B, 12, D))
  ys = jax.random.normal(jax.random.key(2), (B, 12, H))
  run = jax.jit(lambda x, c: bj.unroll(cell, params, x, carry=c, method="parallel"))
  whole_carry, whole = run(xs, cell.initial_carry(B))
  c, first = run(xs[:, :5], cell.initial_carry(B))
  c, second = run(xs[:, 5:], c)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c, whole_carry, rtol=1e-5, atol=1e-6)

  def step_loss(params, hs, ys):
    return jnp.sum((hs - ys) ** 2, axis=-1)

  def plain(params):
    _, hs = bj.unroll(cell, params["cell"], xs, fused=False)
    return jnp.sum(step_loss(params, hs, ys)) / B

  seg = jax.jit(jax.value_and_grad(lambda p: bj.segmented_loss(
      cell, p, xs, ys, step_loss, remat=3, reduction="sum")[0]))
  value, grads = seg({"cell": params})
  want_value, want_grads = jax.jit(jax.value_and_grad(plain))({"cell": params})
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  assert_grads_close(grads, want_grads, rtol=1e-4, atol=1e-5)


def test_tbptt_step_trains_a_min_gru_stack():
  cell = bj.stack(bj.min_gru(8), bj.min_gru(8))
  params = {"cell": cell.init(jax.random.key(0), 2), "head": bj.init_readout(
      jax.random.key(1), 8, 1)}
  model = bj.Model(
      apply=lambda p, c, x, m: (lambda out: (out[0], bj.readout(p["head"], out[1])))(
          bj.unroll(cell, p["cell"], x, mask=m, carry=c)),
      initial_carry=cell.initial_carry)
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(4, 40, 2)), F32)
  ys = jnp.cumsum(xs[..., :1], axis=1) * 0.1  # a running sum: needs the carry across chunks

  def step_loss(params, outs, ys):
    return jnp.sum((outs - ys) ** 2, axis=-1)

  tx = bj.optimizer(1e-2)
  step = bj.tbptt_step(model, step_loss, tx, k1=10)
  state = bj.TrainState.create(params, tx)
  first = None
  for _ in range(30):
    state, metrics = step(state, {"xs": xs, "ys": ys})  # one update per chunk of 10
    loss = float(jnp.mean(metrics["loss"]))
    first = loss if first is None else first
  assert loss < 0.5 * first


def test_gradient_flow_of_min_gru_is_the_product_of_forget_coefficients():
  """For L = sum(h_T), dL/dh_t = prod_{k>t} (1 - z_k): worked out from the equations."""
  cell = bj.min_gru(H)
  params = cell.init(jax.random.key(0), D)
  xs = jax.random.normal(jax.random.key(1), (B, T, D))
  _, norms = bj.gradient_flow(cell, params, xs, lambda hs: jnp.sum(hs[:, -1]))
  k = np.asarray(xs @ params["W"][:, :H] + params["b"][None, None, :H], F64)
  a = 1.0 / (1.0 + np.exp(k))  # 1 - sigmoid(k)
  expected = np.stack([np.linalg.norm(np.prod(a[:, t + 1:], axis=1), axis=-1)
                       for t in range(T)], axis=1)
  np.testing.assert_allclose(norms, expected, rtol=1e-5)


def test_lru_initialization_ring_and_normalization():
  cell = bj.lru(16, 64, r_min=0.4, r_max=0.9, max_phase=np.pi)
  p = cell.init(jax.random.key(0), 16)
  radius = np.exp(-np.exp(np.asarray(p["nu_log"], F64)))
  phase = np.exp(np.asarray(p["theta_log"], F64))
  assert radius.min() >= 0.4 - 1e-6 and radius.max() <= 0.9 + 1e-6
  assert phase.min() >= 0 and phase.max() <= np.pi + 1e-6
  np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - radius ** 2), rtol=1e-5)
  assert p["B_re"].shape == (16, 64) and p["C_im"].shape == (64, 16) and p["D"].shape == (16,)


def test_default_method_and_jit_does_not_retrace():
  cell, _, params, xs, carry = _setup("min_gru", F32)
  expected = "sequential" if jax.default_backend() == "cpu" else "parallel"
  assert bj.default_linear_method(T) == expected
  traces = []

  @jax.jit
  def run(params, xs):
    traces.append(1)
    return bj.unroll(cell, params, xs)[1]

  run(params, xs)
  run(params, xs + 1)
  assert len(traces) == 1


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda: bj.min_gru(H), {"method": "deer"}, "method must be one of"),
    (lambda: bj.min_gru(H), {"method": "parallel", "fused": False}, "takes no method"),
    (lambda: bj.min_gru(H), {"hoist": False}, "hoist=False needs fused=False"),
    (lambda: bj.gru(H), {"method": "parallel"}, "not linear in its state"),
])
def test_bad_settings(make, kwargs, match):
  cell = make()
  params = cell.init(jax.random.key(0), D)
  with pytest.raises(ValueError, match=match):
    bj.unroll(cell, params, jnp.ones((B, T, D)), **kwargs)


def test_bad_construction():
  with pytest.raises(ValueError, match="input_size must be 5, got 4"):
    bj.lru(5).init(jax.random.key(0), 4)
  with pytest.raises(ValueError, match="r_min < r_max"):
    bj.lru(5, r_min=0.9, r_max=0.5)
  with pytest.raises(ValueError, match="hidden_size must be a positive int"):
    bj.min_gru(0)
  with pytest.raises(ValueError, match="inputs have 3 features but the params expect D = 4"):
    cell = bj.min_lstm(H)
    bj.unroll(cell, cell.init(jax.random.key(0), D), jnp.ones((B, T, 3)))
