"""Tests for bptt_jax/_flax.py: Flax linen and NNX both ways, against Flax's own outputs and
gradients with the same weights and inputs, variable lengths, float32.

Flax's ``RNN`` leaves padded outputs as they come, so outputs are compared at
valid steps (ours are zero elsewhere) and losses read valid steps only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import bptt_jax as bj

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, D, H = 3, 6, 2, 4
LENGTHS = np.array([6, 4, 1])
VALID = np.arange(T)[None, :] < LENGTHS[:, None]
# Against Flax's outputs and gradients; the other layouts are checked the other way round
# (test_bptt_weights_run_in_flax: Flax's forward on our weights) and by the round trip.
LINEN = [nn.LSTMCell, nn.GRUCell]  # OptimizedLSTMCell has LSTMCell's params
NNX = [nnx.OptimizedLSTMCell, nnx.GRUCell]


def _data(seed=1):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  cot = np.where(VALID[..., None], rng.normal(size=(B, T, H)), 0.0).astype(np.float32)
  return xs, cot


def _random(tree, seed=5):
  """Every leaf uniform in [-0.6, 0.6] (biases too), same structure."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(rng.uniform(-0.6, 0.6, a.shape).astype(np.float32))
                for a in leaves])


def _abstract_init(cell):
  return jax.eval_shape(lambda k: cell.init(k, D), jax.random.key(0))


def _hidden(carry):
  return carry[-1] if isinstance(carry, tuple) else carry


def _assert_same_run(ours, theirs):
  """(carry, hs) of bptt_jax against Flax's (carry, hs): valid steps and final hidden."""
  (carry, hs), (f_carry, f_hs) = ours, theirs
  np.testing.assert_allclose(hs[VALID], f_hs[VALID], **TOL)
  np.testing.assert_array_equal(hs[~VALID], 0.0)
  h = carry.h if isinstance(carry, bj.LSTMState) else _hidden(carry)
  np.testing.assert_allclose(h, _hidden(f_carry), **TOL)
  if isinstance(carry, bj.LSTMState):  # Flax's LSTM carry is (c, h)
    np.testing.assert_allclose(carry.c, f_carry[0], **TOL)


# ----------------------------------------------------------------------------
# Flax cells in bptt_jax: converted weights (fused path) and Flax's step as a cell.


@pytest.mark.parametrize("make", LINEN, ids=lambda m: m.__name__)
def test_linen_weights_match_linen_rnn(make):
  xs, cot = _data()
  flax_rnn = nn.RNN(make(features=H), return_carry=True)
  flax_params = _random(jax.eval_shape(flax_rnn.init, jax.random.key(0), xs)["params"]["cell"])

  def theirs(p, xs):
    carry, hs = flax_rnn.apply({"params": {"cell": p}}, xs, seq_lengths=LENGTHS)
    return jnp.sum(jnp.where(VALID[..., None], hs, 0.0) * cot), (carry, hs)

  def ours(p, xs):
    cell, params = bj.from_flax_weights(make(features=H), p)
    carry, hs = bj.unroll(cell, params, xs, lengths=LENGTHS)
    return jnp.sum(hs * cot), (carry, hs)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
  (_, run), (dp, dx) = grad(ours)(flax_params, xs)
  (_, f_run), (f_dp, f_dx) = grad(theirs)(flax_params, xs)
  _assert_same_run(run, f_run)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), dp, f_dp)
  np.testing.assert_allclose(dx, f_dx, **TOL)


@pytest.mark.parametrize("make", NNX, ids=lambda m: m.__name__)
def test_nnx_cells_match_nnx_rnn(make):
  """from_flax_weights (bptt_jax's cell); for the LSTM also from_flax (NNX's own step)."""
  xs, cot = _data()
  zeros = nnx.initializers.zeros  # quick to build: every weight is set just below
  module = make(D, H, kernel_init=zeros, recurrent_kernel_init=zeros, rngs=nnx.Rngs(0))
  nnx.update(module, _random(nnx.state(module, nnx.Param)))
  flax_rnn = nnx.RNN(module, return_carry=True)

  def theirs(rnn, xs):
    carry, hs = rnn(xs, seq_lengths=LENGTHS)
    return jnp.sum(jnp.where(VALID[..., None], hs, 0.0) * cot), (carry, hs)

  (_, f_run), (f_grads, f_dx) = nnx.jit(nnx.value_and_grad(
      theirs, argnums=(0, 1), has_aux=True))(flax_rnn, xs)
  f_dp = nnx.to_pure_dict(f_grads)["cell"]
  state = nnx.state(module, nnx.Param)

  def converted(p, xs):
    cell, params = bj.from_flax_weights(module, p)
    assert cell.sequence is not None  # the hand-written backward pass
    carry, hs = bj.unroll(cell, params, xs, lengths=LENGTHS)
    return jnp.sum(hs * cot), (carry, hs)

  wrapped_cell = bj.from_flax(module)

  def wrapped(p, xs):
    carry, hs = bj.unroll(wrapped_cell, p, xs, lengths=LENGTHS)
    return jnp.sum(hs * cot), (carry, hs)

  for f in (converted, wrapped) if make is nnx.OptimizedLSTMCell else (converted,):
    (_, run), (dp, dx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, xs)
    _assert_same_run(run, f_run)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), nnx.to_pure_dict(dp), f_dp)
    np.testing.assert_allclose(dx, f_dx, **TOL)


def test_from_flax_reads_the_input_size_from_the_module():
  zeros = nnx.initializers.zeros
  cell = bj.from_flax(nnx.GRUCell(3, H, kernel_init=zeros, recurrent_kernel_init=zeros,
                                  rngs=nnx.Rngs(0)))
  assert cell.hidden_size == H and cell.name == "flax.nnx.GRUCell"
  with pytest.raises(ValueError, match="built for in_features = 3, got input_size = 2"):
    cell.init(jax.random.key(0), 2)
  params = cell.init(jax.random.key(0), 3)
  with pytest.raises(ValueError, match="flax.nnx.GRUCell: inputs have 2 features but the "
                                       "params expect D = 3"):
    bj.unroll(cell, params, np.zeros((B, T, 2), np.float32))
  # linen: from the input kernel of Flax's own classes (not a guess over names).
  cell = bj.from_flax(nn.SimpleCell(features=H, recurrent_kernel_init=zeros))
  assert cell.input_size(cell.init(jax.random.key(0), 5)) == 5


# ----------------------------------------------------------------------------
# bptt_jax weights into Flax cells.


ALL_FLAX = [(nn.LSTMCell, "lstm"), (nn.OptimizedLSTMCell, "lstm"), (nn.GRUCell, "gru"),
            (nn.SimpleCell, "rnn_tanh"), (nnx.LSTMCell, "lstm"), (nnx.OptimizedLSTMCell, "lstm"),
            (nnx.GRUCell, "gru"), (nnx.SimpleCell, "rnn_tanh")]


def _flax_cell(make):
  if make.__module__.startswith("flax.linen"):
    return make(features=H)
  return nnx.eval_shape(lambda: make(D, H, rngs=nnx.Rngs(0)))  # shapes only


def test_to_flax_weights_inverts_from_flax_weights():
  """Every layout round-trips exactly; with the parity tests above, to_flax_weights puts each
  weight where Flax reads it."""
  cells = {"lstm": bj.lstm(H), "gru": bj.gru(H), "rnn_tanh": bj.rnn(H)}
  for make, name in ALL_FLAX:
    module = _flax_cell(make)
    params = _random(_abstract_init(cells[name]), seed=7)
    if make is nnx.GRUCell:
      params["b_hn"] = jnp.zeros(H)  # NNX's GRUCell has none: see test_errors
    cell, back = bj.from_flax_weights(module, bj.to_flax_weights(cells[name], params, module))
    assert cell.name == name, make
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_bptt_weights_run_in_flax(kind):
  """Flax's own RNN on our params (to_flax_weights) gives our outputs: a ReLU RNN in linen's
  SimpleCell, an LSTM in NNX's LSTMCell."""
  xs, _ = _data()
  cell = bj.rnn(H, "relu") if kind == "linen" else bj.lstm(H)
  params = _random(_abstract_init(cell), seed=7)
  if kind == "linen":
    module = nn.SimpleCell(features=H, activation_fn=jax.nn.relu)
    flax_params = bj.to_flax_weights(cell, params, module)
    theirs = nn.RNN(module, return_carry=True).apply(
        {"params": {"cell": flax_params}}, xs, seq_lengths=LENGTHS)
  else:
    zeros = nnx.initializers.zeros
    module = nnx.LSTMCell(D, H, kernel_init=zeros, recurrent_kernel_init=zeros,
                          rngs=nnx.Rngs(0))
    nnx.update(module, bj.to_flax_weights(cell, params, module))
    theirs = nnx.RNN(module, return_carry=True)(xs, seq_lengths=LENGTHS)
  _assert_same_run(jax.jit(bj.unroll, static_argnums=0)(cell, params, xs, lengths=LENGTHS),
                   theirs)


# ----------------------------------------------------------------------------
# bptt_jax cells inside Flax models.


class _OursLinen(nn.Module):
  @nn.compact
  def __call__(self, xs, lengths):
    _, hs = bj.LinenRNN(bj.lstm(H))(xs, lengths=lengths)
    return nn.Dense(1)(bj.last_step(hs, lengths))


class _FlaxLinen(nn.Module):
  @nn.compact
  def __call__(self, xs, lengths):
    hs = nn.RNN(nn.LSTMCell(features=H))(xs, seq_lengths=lengths)
    return nn.Dense(1)(bj.last_step(hs, lengths))


def test_linen_rnn_in_a_flax_model_matches_flax_lstm():
  xs, _ = _data()
  ys = np.random.default_rng(2).normal(size=(B, 1)).astype(np.float32)
  flax_vars = _random(jax.eval_shape(_FlaxLinen().init, jax.random.key(0), xs, LENGTHS))
  ours_vars = jax.eval_shape(_OursLinen().init, jax.random.key(0), xs, LENGTHS)
  assert jax.tree.map(jnp.shape, ours_vars["params"]["LinenRNN_0"]) == {
      "cell": {"W": (D, 4 * H), "U": (H, 4 * H), "b": (4 * H,)}}
  dense = flax_vars["params"]["Dense_0"]

  def ours(flax_cell, dense):  # our layer on the converted weights: grads in Flax's layout
    _, p = bj.from_flax_weights(nn.LSTMCell(features=H), flax_cell)
    out = _OursLinen().apply({"params": {"LinenRNN_0": {"cell": p}, "Dense_0": dense}},
                             xs, LENGTHS)
    return jnp.mean((out - ys) ** 2)

  def theirs(flax_cell, dense):
    out = _FlaxLinen().apply({"params": {"LSTMCell_0": flax_cell, "Dense_0": dense}},
                             xs, LENGTHS)
    return jnp.mean((out - ys) ** 2)

  cell_params = flax_vars["params"]["LSTMCell_0"]
  loss, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(cell_params, dense)
  f_loss, f_grads = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1)))(cell_params, dense)
  np.testing.assert_allclose(loss, f_loss, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, f_grads)


def _layers():  # identity recurrent init: quick to build (every weight is set in the test)
  return bj.stack(bj.gru(H, recurrent_init="identity"), bj.lstm(H, recurrent_init="identity"))


class _OursNNX(nnx.Module):
  def __init__(self, rngs):
    self.rnn = bj.NNXRNN(_layers(), D, rngs=rngs)
    self.head = nnx.Linear(H, 1, rngs=rngs)

  def __call__(self, xs, lengths):
    _, hs = self.rnn(xs, lengths=lengths)
    return self.head(bj.last_step(hs, lengths))


def test_nnx_rnn_trains_with_nnx_optimizer_as_optax_on_the_pure_function():
  """One nnx.Optimizer(adam) step on a model holding NNXRNN(stack) equals optax applied to
  the gradients of the same loss written with bj.unroll on plain params."""
  xs, _ = _data()
  ys = np.random.default_rng(2).normal(size=(B, 1)).astype(np.float32)
  model = _OursNNX(nnx.Rngs(0))
  nnx.update(model, _random(nnx.state(model, nnx.Param)))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  layers = _layers()
  tx = optax.adam(1e-2)

  def pure_loss(p):
    rnn = (p["rnn"]["params"][0], p["rnn"]["params"][1])
    _, hs = bj.unroll(layers, rnn, xs, lengths=LENGTHS)
    out = bj.last_step(hs, LENGTHS) @ p["head"]["kernel"] + p["head"]["bias"][None, :]
    return jnp.mean((out - ys) ** 2)

  @jax.jit
  def pure_step(p):
    loss, grads = jax.value_and_grad(pure_loss)(p)
    updates, _ = tx.update(grads, tx.init(p), p)
    return loss, optax.apply_updates(p, updates)

  expected_loss, expected = pure_step(pure)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(xs, LENGTHS) - ys) ** 2))(model)
    optimizer.update(model, g)
    return loss

  np.testing.assert_allclose(train_step(model, optimizer), expected_loss, **TOL)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, expected)
  assert not np.allclose(got["head"]["kernel"], pure["head"]["kernel"])


# ----------------------------------------------------------------------------
# Errors.


def test_errors():
  zeros = nnx.initializers.zeros  # quick to build
  gru_params = _random(_abstract_init(bj.gru(H)))
  gru_params["b_hn"] = jnp.full((H,), 0.25)
  with pytest.raises(ValueError, match=r"NNX's GRUCell has no b_hn.*max \|b_hn\| = 0.25"):
    bj.to_flax_weights(bj.gru(H), gru_params, nnx.GRUCell(
        D, H, kernel_init=zeros, recurrent_kernel_init=zeros, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="'lstm' does not match linen GRUCell"):
    bj.to_flax_weights(bj.lstm(H), _random(_abstract_init(bj.lstm(H))), nn.GRUCell(features=H))
  with pytest.raises(ValueError, match=r"gru params must have the keys \['U', 'W', 'b', "
                                       r"'b_hn'\], got \['U', 'W', 'b'\]"):
    bj.to_flax_weights(bj.gru(H), {k: gru_params[k] for k in "WUb"}, nn.GRUCell(features=H))
  with pytest.raises(ValueError, match="'gru_ln' has no Flax equivalent"):
    bj.to_flax_weights(bj.gru(H, layer_norm=True), {}, nn.GRUCell(features=H))
  before = bj.gru(H, reset_after=False)
  with pytest.raises(ValueError, match=r"gru\(reset_after=False\) has no Flax equivalent.*"
                                       r"\(r \* h\) U_n"):
    bj.to_flax_weights(before, _random(_abstract_init(before)), nn.GRUCell(features=H))
  with pytest.raises(ValueError, match="residual=True.*no bptt_jax equivalent"):
    bj.from_flax_weights(nn.SimpleCell(features=H, residual=True), {})
  with pytest.raises(ValueError, match="gate_fn='hard_sigmoid' has no bptt_jax equivalent"):
    bj.from_flax_weights(nnx.LSTMCell(D, H, gate_fn=jax.nn.hard_sigmoid, kernel_init=zeros,
                                      recurrent_kernel_init=zeros, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="linen MGUCell has no built-in bptt_jax equivalent"):
    bj.from_flax_weights(nn.MGUCell(features=H), {})
  with pytest.raises(ValueError, match="a linen cell holds no weights"):
    bj.from_flax_weights(nn.LSTMCell(features=H))
  with pytest.raises(ValueError, match=r"Flax params have no 'kernel' under ir \(found \[\]\)"):
    bj.from_flax_weights(nn.GRUCell(features=H), {"ir": {}})
  with pytest.raises(TypeError, match="expected a Flax recurrent cell .* got Dense"):
    bj.from_flax(nn.Dense(3))
  with pytest.raises(ValueError, match=r"takes the unroll settings .* got \['lengths'\]"):
    bj.NNXRNN(bj.lstm(H, recurrent_init="identity"), D, rngs=nnx.Rngs(0), lengths=LENGTHS)
  with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
    bj.NNXRNN(bj.lstm(H), 0, rngs=nnx.Rngs(0))
