"""DEER and quasi-DEER against the sequential scan: trajectories, gradients, fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_reference import CELLS, F32, F64, assert_grads_close, random_params

import bptt_jax as bj

B, T, D, H = 3, 40, 4, 6
LENGTHS = np.array([40, 17, 0])
# float32 agreement: the solve stops at a residual of 1.2e-5 per step, and the
# deviation from the sequential trajectory is that residual carried through a
# contracting recurrence (a few times it); gradients are then good to about 1e-4
# of their scale. float64 stops at 2.2e-14 and agrees to 1e-10.
TOL = {F32: dict(value=1e-4, rtol=1e-3, atol=1e-4), F64: dict(value=1e-10, rtol=1e-9,
                                                               atol=1e-10)}


def _setup(name, dtype, seed=0, scale=0.5):
  cell = CELLS[name].make(H, dtype)
  shapes = jax.eval_shape(lambda k: cell.init(k, D), jax.random.key(0))
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype),
                                  random_params(shapes, seed, scale=scale))
  rng = np.random.default_rng(seed + 1)
  xs = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  carry = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, dtype), cell.initial_carry(B))
  return cell, params, xs, carry


@pytest.mark.parametrize("name,quasi,dtype", [
    pytest.param("gru", False, F64, id="gru-deer-float64", marks=pytest.mark.float64),
    pytest.param("gru", True, F64, id="gru-quasi_deer-float64", marks=pytest.mark.float64),
    pytest.param("gru_reset_before", True, F32, id="gru_reset_before-quasi_deer-float32"),
    pytest.param("lstm", True, F32, id="lstm-quasi_deer-float32"),
    pytest.param("rnn_tanh", False, F32, id="rnn_tanh-deer-float32"),
])
def test_trajectory_and_gradients_equal_sequential(name, quasi, dtype):
  cell, params, xs, carry = _setup(name, dtype)
  w = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, H)), dtype)
  method = bj.Deer(quasi=quasi)

  def loss(params, xs, carry, **kwargs):
    final, hs = bj.unroll(cell, params, xs, lengths=LENGTHS, carry=carry, **kwargs)
    return (jnp.sum(w * jnp.tanh(hs))
            + sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(final)))

  solve = jax.jit(lambda p, x, c: bj.deer_unroll(cell, p, x, method=method, lengths=LENGTHS,
                                                 carry=c))
  final, hs, info = solve(params, xs, carry)
  ref_final, ref_hs = jax.jit(lambda p, x, c: bj.unroll(cell, p, x, lengths=LENGTHS, carry=c,
                                                        fused=False))(params, xs, carry)
  assert bool(info.converged) and not bool(info.fell_back)
  assert 1 <= int(info.iterations) <= method.max_iter
  assert float(info.residual) <= 100 * np.finfo(dtype).eps
  tol = TOL[dtype]
  np.testing.assert_allclose(hs, ref_hs, rtol=0, atol=tol["value"])
  for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(ref_final)):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol["value"])
  assert np.all(np.asarray(hs)[1, 17:] == 0) and np.all(np.asarray(hs)[2] == 0)

  got = jax.jit(jax.grad(lambda *a: loss(*a, method=method), argnums=(0, 1, 2)))(
      params, xs, carry)
  want = jax.jit(jax.grad(lambda *a: loss(*a, fused=False), argnums=(0, 1, 2)))(
      params, xs, carry)
  assert_grads_close(got, want, rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("name", ["gru", "gru_reset_before", "lstm", "rnn_tanh", "rnn_relu",
                                  "gru_ln"])
def test_quasi_diagonal_equals_the_jacobians_diagonal(name):
  """The diagonal written from the equations (or, with layer norm, from chunked Jacobians)
  against ``jnp.diagonal`` of ``jax.jacfwd`` of the step."""
  from bptt_jax import _deer

  cell, params, xs, carry = _setup(name, F32, seed=4, scale=1.0)
  flat = _deer._flat_spec(carry)
  s = flat.flatten(carry)
  x = xs[:, 0]
  got = _deer._diagonal(cell, flat, params, s, x, None)

  def row(s_row, x_row):
    new, _ = cell.step(params, flat.unflatten(s_row[None]), x_row[None])
    return flat.flatten(new)[0]

  want = jax.vmap(lambda a, b: jnp.diagonal(jax.jacfwd(row)(a, b)))(s, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reverse_and_layer_norm_cell_by_quasi_deer():
  cell, params, xs, carry = _setup("lstm_ln", F32, seed=5)
  def run(**kwargs):
    return jax.jit(lambda: bj.unroll(cell, params, xs, lengths=LENGTHS, carry=carry,
                                     reverse=True, **kwargs))()

  final, hs = run(method="quasi_deer")
  ref_final, ref_hs = run(fused=False)
  np.testing.assert_allclose(hs, ref_hs, rtol=0, atol=1e-4)
  np.testing.assert_allclose(final.c, ref_final.c, rtol=0, atol=1e-4)


def test_chaotic_rnn_falls_back_to_the_sequential_scan():
  """A tanh RNN with large recurrent weights (U ~ N(0, 9/H)) is chaotic: small errors grow
  along the sequence and Newton's iterations do not settle within the cap."""
  cell = bj.rnn(32)
  params = cell.init(jax.random.key(0), D)
  params["U"] = 3.0 * jax.random.normal(jax.random.key(1), (32, 32)) / np.sqrt(32)
  xs = jax.random.normal(jax.random.key(2), (2, 300, D))
  reference = jax.jit(lambda p: bj.unroll(cell, p, xs, fused=False))(params)[1]

  def run(quasi, fallback):
    method = bj.Deer(quasi=quasi, max_iter=8, fallback=fallback)
    return jax.jit(lambda p: bj.deer_unroll(cell, p, xs, method=method)[1:])(params)

  hs, info = run(False, "sequential")
  assert not bool(info.converged) and bool(info.fell_back)
  # Stopped at the cap, or as soon as the iterate overflowed (products of large Jacobians).
  assert 1 <= int(info.iterations) <= 8
  # The same scan compiled in another program: the chaos grows float32 rounding that
  # differs with the CPU's vector width (1.1e-6 seen with AVX-512), far below an error.
  np.testing.assert_allclose(hs, reference, rtol=0, atol=1e-5)
  hs, info = run(True, "none")
  assert not bool(info.converged) and not bool(info.fell_back)
  assert not np.allclose(hs, reference, atol=1e-2)  # the last iterate, not the answer

  # Its gradient at the fallback trajectory is still BPTT's (the adjoint is linear).
  def loss(p, **kw):
    return jnp.sum(jnp.tanh(bj.unroll(cell, p, xs[:, :60], **kw)[1]))

  got = jax.jit(jax.grad(lambda p: loss(p, method=bj.Deer(quasi=True, max_iter=8))))(params)
  want = jax.jit(jax.grad(lambda p: loss(p, fused=False)))(params)
  assert_grads_close(got, want, rtol=1e-3, atol=1e-4)


def test_stack_of_gru_layers_by_deer():
  cell = bj.stack(bj.gru(H), bj.gru(H))
  params = cell.init(jax.random.key(0), D)
  xs = jax.random.normal(jax.random.key(1), (B, 20, D))
  _, hs = jax.jit(lambda p: bj.unroll(cell, p, xs, method="deer"))(params)
  _, ref = jax.jit(lambda p: bj.unroll(cell, p, xs))(params)
  np.testing.assert_allclose(hs, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda: bj.gru(H), {"method": "deer", "fused": True}, "neither fused=True, hoist= nor"),
    (lambda: bj.gru(H), {"method": "quasi_deer", "unroll": 4}, r"nor unroll= .*unroll=4\)"),
    (lambda: bj.gru(H), {"method": "newton"}, "expected 'deer', 'quasi_deer'"),
    (lambda: bj.gru(H), {"method": bj.Deer(max_iter=0)}, "max_iter must be a positive int"),
    (lambda: bj.gru(H), {"method": bj.Deer(tol=-1.0)}, "tol must be a positive number"),
    (lambda: bj.gru(H), {"method": bj.Deer(fallback="raise")}, "fallback must be one of"),
])
def test_bad_settings(make, kwargs, match):
  cell = make()
  with pytest.raises(ValueError, match=match):
    bj.unroll(cell, cell.init(jax.random.key(0), D), jnp.ones((B, T, D)), **kwargs)


def test_deer_unroll_rejects_linear_cells_and_stacks():
  for cell in (bj.min_gru(H), bj.stack(bj.gru(H))):
    with pytest.raises(ValueError, match="single cell that is not linear"):
      bj.deer_unroll(cell, cell.init(jax.random.key(0), D), jnp.ones((B, T, D)))
