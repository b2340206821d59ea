"""Tests for bptt_jax/_training.py: the optimizer factory, guarded updates, train_step.

References are optax chains built here, numpy formulas, and updates the tests
apply themselves (``jax.grad`` of the loss, then ``tx.update``). The optimizer
tests compare with numpy formulas in float64; train_step runs in float32 and
float64.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cell_reference import DTYPES, F32, F64, assert_dtype

import bptt_jax as bj

dims = chex.Dimensions(B=3, T=4, D=2, H=5)
TOL = dict(rtol=1e-12, atol=1e-14)
# train_step against the same update written out: both run in ``dtype`` and
# differ only in the order of float operations (float32: measured within 1e-7
# relative).
TOLS = {F32: dict(rtol=1e-6, atol=1e-7), F64: TOL}


def to_np(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def leaves(tree):
  return jax.tree_util.tree_leaves(to_np(tree))


def assert_trees_close(a, b, **tol):
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(x, y, **(tol or TOL))


def assert_trees_equal(a, b):
  """Bit-identical leaves (same dtype, same bits)."""
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def np_global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, F64))) for x in leaves(tree))))


# ----------------------------------------------------------------------------
# optimizer(), in float64 against numpy formulas.

float64 = pytest.mark.float64
RNG = np.random.default_rng(0)
PARAMS = {"a": RNG.normal(size=(3, 4)), "b": RNG.normal(size=(4,))}
# Gradients with global norms on both sides of 1.0, so clipping matters.
GRADS = [jax.tree_util.tree_map(lambda p, s=s: RNG.normal(size=p.shape) * s, PARAMS)
         for s in (3.0, 0.1, 1.5, 0.05)]


def run_updates(tx, grads=GRADS, params=PARAMS):
  """The updates ``tx`` (jitted) gives for a sequence of gradients."""
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(to_np(u))
  return out


@float64
def test_default_optimizer_is_clip_then_adam():
  ours = run_updates(bj.optimizer(1e-2, max_norm=1.0))
  theirs = run_updates(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
  unclipped = run_updates(optax.adam(1e-2))
  for u, v in zip(ours, theirs, strict=True):
    assert_trees_close(u, v)
  # The test data make the clipping visible.
  assert not np.allclose(ours[-1]["a"], unclipped[-1]["a"], rtol=1e-3)


@float64
def test_sgd_with_global_norm_clipping_matches_numpy():
  lr, max_norm = 0.1, 1.0
  ours = run_updates(bj.optimizer(lr, name="sgd", max_norm=max_norm))
  for g, u in zip(GRADS, ours, strict=True):
    scale = min(1.0, max_norm / np_global_norm(g))
    for k in g:
      np.testing.assert_allclose(u[k], -lr * scale * g[k], **TOL)


@float64
def test_clip_value_is_element_wise():
  lr, c = 0.1, 0.5
  ours = run_updates(bj.optimizer(lr, name="sgd", max_norm=None, clip_value=c))
  for g, u in zip(GRADS, ours, strict=True):
    for k in g:
      np.testing.assert_allclose(u[k], -lr * np.clip(g[k], -c, c), **TOL)
  assert np.abs(GRADS[0]["a"]).max() > c  # some entries are clipped


@float64
def test_sgd_momentum_kwargs_reach_the_rule():
  lr, mu = 0.1, 0.9
  ours = run_updates(bj.optimizer(lr, name="sgd", max_norm=None, momentum=mu))
  trace = jax.tree_util.tree_map(np.zeros_like, PARAMS)
  for g, u in zip(GRADS, ours, strict=True):
    trace = {k: g[k] + mu * trace[k] for k in g}
    for k in g:
      np.testing.assert_allclose(u[k], -lr * trace[k], **TOL)


@float64
def test_adagrad_matches_numpy():
  """min-char-rnn's setup: element-wise clipping, then Adagrad."""
  lr, c = 0.1, 1.0
  ours = run_updates(bj.optimizer(lr, name="adagrad", max_norm=None, clip_value=c,
                                  initial_accumulator_value=0.1, eps=1e-7))
  acc = {k: np.full_like(v, 0.1) for k, v in PARAMS.items()}
  for g, u in zip(GRADS, ours, strict=True):
    for k in g:
      gc = np.clip(g[k], -c, c)
      acc[k] = acc[k] + gc ** 2
      np.testing.assert_allclose(u[k], -lr * gc / np.sqrt(acc[k] + 1e-7), rtol=1e-10)


@float64
@pytest.mark.parametrize("name, rule", [
    ("adam", optax.adam), ("adamw", optax.adamw), ("rmsprop", optax.rmsprop),
])
def test_named_rules_match_optax(name, rule):
  ours = run_updates(bj.optimizer(1e-2, name=name, max_norm=None))
  for u, v in zip(ours, run_updates(rule(1e-2)), strict=True):
    assert_trees_close(u, v)


@float64
def test_user_transform_after_clipping():
  ours = run_updates(bj.optimizer(name="not-used", transform=optax.scale(-0.5), max_norm=1.0))
  for g, u in zip(GRADS, ours, strict=True):
    scale = min(1.0, 1.0 / np_global_norm(g))
    for k in g:
      np.testing.assert_allclose(u[k], -0.5 * scale * g[k], **TOL)


@float64
def test_schedule_as_learning_rate():
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
  ours = run_updates(bj.optimizer(schedule, name="sgd", max_norm=None))
  for k_step, (g, u) in enumerate(zip(GRADS, ours, strict=True)):
    lr = 0.1 * (1 - k_step / 4)
    for k in g:  # optax evaluates the schedule in float32
      np.testing.assert_allclose(u[k], -lr * g[k], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="adamx"), r"name must be one of \['adagrad', 'adam', 'adamw', 'rmsprop', "
                         r"'sgd'\], got 'adamx'"),
    (dict(max_norm=0.0), "max_norm must be positive or None, got 0.0"),
    (dict(max_norm=-1.0), "max_norm must be positive or None, got -1.0"),
    (dict(clip_value=0), "clip_value must be positive or None, got 0"),
])
def test_bad_optimizer_settings_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bj.optimizer(1e-3, **kwargs)


def test_non_transformations_raise_type_error():
  with pytest.raises(TypeError, match="expected an optax.GradientTransformation, got str"):
    bj.optimizer(transform="adam")
  with pytest.raises(TypeError, match="expected an optax.GradientTransformation"):
    bj.TrainState.create(PARAMS, optax.adam)  # the factory, not a transformation
  with pytest.raises(TypeError, match="expected an optax.GradientTransformation"):
    bj.train_step(lambda p, b: 0.0, lambda g, s: g)


# ----------------------------------------------------------------------------
# train_step: one step written out by hand.


CELL = bj.rnn(dims.H)  # its params are made below, in the dtype under test


def make_params(seed=0, dtype=F32):
  rng = np.random.default_rng(seed)
  params = {
      "cell": {"W": rng.normal(size=(dims.D, dims.H)) * 0.7,
               "U": rng.normal(size=(dims.H, dims.H)) * 0.4, "b": np.zeros(dims.H)},
      "out": {"W": rng.normal(size=(dims.H, 1)), "b": np.zeros(1)},
  }
  return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)


def make_batch(seed=1, nan=False, dtype=F32):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(dims.B, dims.T, dims.D)).astype(dtype)
  if nan:
    xs[1, 2, 0] = np.nan
  return {"xs": xs, "ys": rng.normal(size=(dims.B, dims.T, 1)).astype(dtype)}


def loss_fn(params, batch):
  """Mean squared error of a linear readout of every hidden state."""
  _, hs = bj.unroll(CELL, params["cell"], batch["xs"])
  preds = hs @ params["out"]["W"] + params["out"]["b"][None, None]
  return jnp.mean(jnp.sum((preds - batch["ys"]) ** 2, axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def hand_step(tx, params, opt_state, batch):
  """One update written out: ``jax.grad`` of the loss, then ``tx.update``."""
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads


TX = bj.optimizer(1e-2, max_norm=1.0)
REF_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))  # built here
STEP = bj.train_step(loss_fn, TX, donate=False)  # the tests read old states again


def hand_run(batches, params=None, dtype=F32):
  """``hand_step`` with ``REF_TX`` over ``batches``: ``(params, opt_state, losses, grads)``."""
  params = make_params(dtype=dtype) if params is None else params
  opt_state, losses, grads = REF_TX.init(params), [], []
  for batch in batches:
    params, opt_state, loss, g = hand_step(REF_TX, params, opt_state, batch)
    losses.append(loss)
    grads.append(g)
  return params, opt_state, losses, grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_step_equals_hand_written_update(dtype):
  state = bj.TrainState.create(make_params(dtype=dtype), TX)
  batches = [make_batch(seed, dtype=dtype) for seed in (1, 2, 3)]
  tol = TOLS[dtype]
  for n, batch in enumerate(batches):  # the optimizer state is carried along
    state, metrics = STEP(state, batch)
    assert_dtype((state.params, metrics["loss"], metrics["grad_norm"]), dtype)
    ref_params, ref_opt, ref_losses, ref_grads = hand_run(batches[:n + 1], dtype=dtype)
    assert_trees_close(state.params, ref_params, **tol)
    assert_trees_close(state.opt_state.inner_state, ref_opt, **tol)
    np.testing.assert_allclose(metrics["loss"], ref_losses[-1], **tol)
    np.testing.assert_allclose(metrics["grad_norm"], np_global_norm(ref_grads[-1]), **tol)
    assert bool(metrics["finite"])
    assert int(metrics["nonfinite"]) == 0 and int(metrics["nonfinite_total"]) == 0
  assert int(state.step) == 3
  assert "clipped" not in metrics  # no max_norm given to train_step


GRAD = jax.jit(jax.grad(loss_fn))
MAX_NORM = 0.7
SCALED_STEP = bj.train_step(lambda p, b: b["scale"] * loss_fn(p, b),
                            bj.optimizer(0.1, name="sgd", max_norm=MAX_NORM), max_norm=MAX_NORM)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor, clipped", [(2.0, True), (0.5, False)])
def test_clipped_flag_and_clipped_update(factor, clipped, dtype):
  """The loss is scaled so that its gradient norm is ``factor * max_norm``."""
  params, batch = make_params(dtype=dtype), make_batch(dtype=dtype)
  grads = to_np(GRAD(params, batch))
  scale = dtype(factor * MAX_NORM / np_global_norm(grads))
  grads = jax.tree_util.tree_map(lambda g: np.asarray(scale, F64) * g, grads)
  state = bj.TrainState.create(params, bj.optimizer(0.1, name="sgd", max_norm=MAX_NORM))
  state, metrics = SCALED_STEP(state, dict(batch, scale=scale))

  assert_dtype((state.params, metrics["grad_norm"]), dtype)
  assert bool(metrics["clipped"]) is clipped
  tol = TOLS[dtype]
  np.testing.assert_allclose(metrics["grad_norm"], factor * MAX_NORM, **tol)  # before clipping
  shrink = min(1.0, 1.0 / factor)
  expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * shrink * g, params, grads)
  assert_trees_close(state.params, expected, **tol)


def test_train_step_does_not_retrace():
  traces = []

  def counted(params, batch):
    traces.append(None)
    return loss_fn(params, batch)

  tx = optax.sgd(0.1)
  step = bj.train_step(chex.assert_max_traces(counted, n=1), tx)
  state = bj.TrainState.create(make_params(), tx)
  for seed in (1, 2, 3):
    state, _ = step(state, make_batch(seed))
  assert len(traces) == 1
  assert int(state.step) == 3


def test_train_step_merges_dict_aux_into_metrics():
  def with_aux(params, batch):
    loss = loss_fn(params, batch)
    return loss, {"twice": 2 * loss}

  tx = optax.sgd(0.1)
  _, metrics = bj.train_step(with_aux, tx, has_aux=True)(
      bj.TrainState.create(make_params(), tx), make_batch())
  _, _, losses, _ = hand_run([make_batch()])
  np.testing.assert_allclose(metrics["twice"], 2 * losses[0], **TOLS[F32])


def test_train_step_without_jit_is_the_same_function():
  state = bj.TrainState.create(make_params(), TX)
  plain, _ = jax.jit(bj.train_step(loss_fn, TX, jit=False))(state, make_batch())
  ref_params, _, _, _ = hand_run([make_batch()])
  assert_trees_close(plain.params, ref_params, **TOLS[F32])


# ----------------------------------------------------------------------------
# Non-finite safety.


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_batch_is_skipped_and_training_resumes(dtype):
  s1, _ = STEP(bj.TrainState.create(make_params(dtype=dtype), TX), make_batch(1, dtype=dtype))
  s2, m2 = STEP(s1, make_batch(2, nan=True, dtype=dtype))

  assert_trees_equal(s2.params, s1.params)
  assert_trees_equal(s2.opt_state.inner_state, s1.opt_state.inner_state)
  assert not bool(m2["finite"]) and not np.isfinite(float(m2["loss"]))
  assert int(m2["nonfinite"]) == 1 and int(m2["nonfinite_total"]) == 1
  assert int(s2.step) == 2  # a skipped step still counts

  s3, m3 = STEP(s2, make_batch(2, nan=True, dtype=dtype))
  assert int(m3["nonfinite"]) == 2 and int(m3["nonfinite_total"]) == 2
  assert_trees_equal(s3.params, s1.params)

  # The next finite step trains as if the NaN steps had never happened.
  s4, m4 = STEP(s3, make_batch(3, dtype=dtype))
  ref_params, ref_opt, _, _ = hand_run([make_batch(1, dtype=dtype), make_batch(3, dtype=dtype)],
                                       dtype=dtype)
  assert_dtype(s4.params, dtype)
  assert_trees_close(s4.params, ref_params, **TOLS[dtype])
  assert_trees_close(s4.opt_state.inner_state, ref_opt, **TOLS[dtype])
  assert bool(m4["finite"])
  assert int(m4["nonfinite"]) == 0 and int(m4["nonfinite_total"]) == 2


def poisoned(params, batch):
  """A loss made non-finite by a constant: its gradients stay finite."""
  return loss_fn(params, batch) + jax.lax.stop_gradient(batch["poison"])


POISONED_STEP = bj.train_step(poisoned, optax.sgd(0.1), donate=False)
POISONED_GRAD = jax.jit(jax.grad(poisoned))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_loss_with_finite_grads_is_skipped(bad):
  batch = dict(make_batch(), poison=F32(bad))
  params = make_params()
  grads = POISONED_GRAD(params, batch)
  assert all(np.isfinite(x).all() for x in leaves(grads))
  state = bj.TrainState.create(params, optax.sgd(0.1))
  new, metrics = POISONED_STEP(state, batch)
  assert_trees_equal(new.params, state.params)
  assert not bool(metrics["finite"])
  assert int(metrics["nonfinite"]) == 1
  # The same step with a finite constant does update.
  moved, _ = POISONED_STEP(state, dict(batch, poison=F32(1.0)))
  assert not np.array_equal(moved.params["cell"]["W"], params["cell"]["W"])


@float64
def test_apply_gradients_skip_keeps_everything():
  tx = optax.adam(1e-2)
  state = bj.TrainState.create(PARAMS, tx)
  new, metrics = jax.jit(lambda s, g: bj.apply_gradients(tx, s, 1.0, g, skip=True))(
      state, GRADS[0])
  assert_trees_equal(new, state)
  np.testing.assert_allclose(metrics["grad_norm"], np_global_norm(GRADS[0]), **TOL)


@float64
def test_guard_leaves_params_and_state_alone_on_nan_gradients():
  tx = bj.guard(optax.adam(1e-2))
  state = tx.init(PARAMS)
  bad = dict(GRADS[0], b=np.full(4, np.nan))
  updates, new = jax.jit(tx.update)(bad, state, PARAMS)
  assert all(np.all(u == 0) for u in leaves(updates))
  assert_trees_equal(new.inner_state, state.inner_state)
  assert int(new.notfinite_count) == 1 and int(new.total_notfinite) == 1


def test_the_jitted_step_donates_the_old_state():
  """By default the input state's buffers are reused for the output: after a
  step the old params are deleted, and the values are those of a step that
  copies."""
  donating = bj.train_step(loss_fn, TX)
  old = bj.TrainState.create(jax.tree_util.tree_map(jnp.asarray, make_params()), TX)
  kept = jax.tree_util.tree_map(np.array, old)
  new, _ = donating(old, make_batch(1))
  assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(old.params))
  want, _ = STEP(kept, make_batch(1))
  assert_trees_equal(new.params, want.params)
  newer, _ = donating(new, make_batch(2))  # and it chains
  assert int(newer.step) == 2
