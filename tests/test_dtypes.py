"""The dtype rule: float32 params with bf16/float16 inputs or compute, on every path.

The compute dtype is ``dtype=`` if given, else the params' float dtype; params
and floating inputs are cast to it, the carry is kept in it, and gradients come
back in the params' own dtype. The reduced-precision runs are compared with the
float32 run of the same model and data, at tolerances stated per dtype (bf16
keeps 8 bits of mantissa: about 2-3 significant digits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax as bj

B, T, D, H, O = 4, 16, 3, 8, 2
LENGTHS = np.array([16, 11, 5, 0], np.int32)
# Relative tolerance of a loss (or hidden states) computed in the reduced dtype
# against float32: bf16 rounds to 2^-8 = 0.4%, float16 to 2^-11.
LOSS_RTOL = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}
CELLS = {"rnn": lambda: bj.rnn(H), "lstm": lambda: bj.lstm(H), "gru": lambda: bj.gru(H),
         "lstm_ln": lambda: bj.lstm(H, layer_norm=True)}


def _params(cell):
  k_cell, k_out = jax.random.split(jax.random.key(0))
  return {"cell": cell.init(k_cell, D), "out": bj.init_readout(k_out, H, O)}


def _data():
  rng = np.random.default_rng(1)
  return (rng.normal(size=(B, T, D)).astype(np.float32),
          rng.normal(size=(B, T, O)).astype(np.float32))


def _step_loss(params, hs, ys):
  return bj.mse(bj.readout(params["out"], hs.astype(jnp.float32)), ys)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.mark.parametrize("name,fused", [("lstm", None), ("gru", False), ("lstm_ln", None)])
def test_bf16_inputs_with_float32_params_compute_in_float32(name, fused):
  cell = CELLS[name]()
  params = _params(cell)["cell"]
  xs, _ = _data()
  run = jax.jit(lambda xs: bj.unroll(cell, params, xs, lengths=LENGTHS, fused=fused))
  final, hs = run(jnp.asarray(xs, jnp.bfloat16))
  want_final, want_hs = run(jnp.asarray(xs, jnp.bfloat16).astype(jnp.float32))
  assert hs.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(final))
  np.testing.assert_array_equal(hs, want_hs)  # the same float32 computation


@pytest.mark.parametrize("name,fused,dtype", [
    *[(name, None, jnp.bfloat16) for name in sorted(CELLS)],  # the default path of each cell
    ("lstm", False, jnp.bfloat16), ("gru", False, jnp.bfloat16),  # autodiff
    ("lstm", None, jnp.float16), ("rnn", False, jnp.float16)])
def test_reduced_precision_unroll_is_close_to_float32(name, fused, dtype):
  cell = CELLS[name]()
  params = _params(cell)
  xs, ys = _data()

  def loss(params, dtype):
    _, hs = bj.unroll(cell, params["cell"], xs, lengths=LENGTHS, fused=fused, dtype=dtype)
    return bj.sequence_loss(_step_loss(params, hs, ys), lengths=LENGTHS), hs

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (value, hs), grads = grad(params, dtype)
  (want, want_hs), want_grads = grad(params, None)
  assert hs.dtype == dtype
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
  assert _rel(value, want) < LOSS_RTOL[dtype]
  assert _rel(hs, want_hs) < 4 * LOSS_RTOL[dtype]
  for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    assert _rel(g, w) < 10 * LOSS_RTOL[dtype]


def test_train_step_tbptt_and_segmented_loss_run_in_bf16():
  cell = bj.lstm(H)
  params = _params(cell)
  xs, ys = _data()
  batch = {"xs": xs, "ys": ys, "lengths": LENGTHS}
  tx = optax.adam(1e-2)
  losses = {}
  for dtype in (None, jnp.bfloat16):
    train = bj.train_step(bj.model_loss(cell, _step_loss, dtype=dtype), tx, donate=False)
    state, m = train(bj.TrainState.create(params, tx), batch)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
    losses["train", dtype] = m["loss"]

    tbptt = bj.tbptt_step(cell, _step_loss, tx, k1=4, k2=6, dtype=dtype, donate=False)
    carry = bj.stream_carry(cell.initial_carry(B), xs, k1=4, k2=6)  # float32 carry
    state = bj.TrainState.create(params, tx, carry=carry)
    state, m = tbptt(state, batch)
    state, m2 = tbptt(state, batch)  # the carry came back float32: no new structure
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.carry.carry))
    assert tbptt._cache_size() == 1
    losses["tbptt", dtype] = m["loss"]

    seg = jax.jit(lambda p, dtype=dtype: bj.segmented_loss(
        cell, p, xs, ys, _step_loss, lengths=LENGTHS, dtype=dtype)[0])
    losses["segmented", dtype] = seg(params)
  for path in ("train", "tbptt", "segmented"):
    assert np.all(np.isfinite(np.asarray(losses[path, jnp.bfloat16])))
    assert _rel(losses[path, jnp.bfloat16], losses[path, None]) < LOSS_RTOL[jnp.bfloat16]


def test_float64_stays_exact():
  with jax.enable_x64(True):
    cell = bj.gru(H, dtype=jnp.float64)
    params = cell.init(jax.random.key(0), D)
    xs = np.random.default_rng(0).normal(size=(B, T, D))
    final, hs = jax.jit(lambda p, xs: bj.unroll(cell, p, xs, lengths=LENGTHS))(params, xs)
    assert hs.dtype == final.dtype == jnp.float64
    # The float32 inputs of a float64 model are computed in float64 as well.
    _, hs32 = bj.unroll(cell, params, xs.astype(np.float32), lengths=LENGTHS)
    assert hs32.dtype == jnp.float64
    np.testing.assert_allclose(hs32, hs, rtol=1e-6, atol=1e-7)


def test_the_compute_dtype_rule():
  f32 = {"W": jnp.ones((2, 2), jnp.float32), "ids": jnp.ones(2, jnp.int32)}
  assert bj.compute_dtype(f32) == jnp.float32
  assert bj.compute_dtype(f32, jnp.bfloat16) == jnp.bfloat16
  assert bj.compute_dtype({}, fallback=jnp.float16) == jnp.float16
  assert bj.compute_dtype({"ids": jnp.ones(2, jnp.int32)}) == jnp.float32
  with pytest.raises(TypeError, match="dtype must be a floating dtype"):
    bj.compute_dtype(f32, jnp.int32)
  with pytest.raises(TypeError, match="dtype must be a floating dtype"):
    bj.unroll(bj.rnn(H), bj.rnn(H).init(jax.random.key(0), D), jnp.ones((B, T, D)),
              dtype=jnp.int8)
