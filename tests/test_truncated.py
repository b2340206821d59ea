"""Tests for bptt_jax/_truncated.py: TBPTT(k1, k2) against Python loops over chunks.

The reference never calls ``tbptt_step``, ``unroll`` or autodiff: it slices each
window itself, runs a tanh RNN in numpy step by step, backpropagates through
the window by hand (the BPTT recursion, stopped at the window's start) and
applies the optax update itself, chunk after chunk. The reference always runs
in float64 (its optax updates inside ``jax.enable_x64``). The library runs in
float64, where updates are compared to 1e-10, and, for the main comparisons,
also in float32, from the same params and data rounded to float32.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cell_reference import assert_dtype

import bptt_jax as bj

F32, F64 = np.float32, np.float64
dims = chex.Dimensions(B=3, D=2, H=4, O=1)
T = 10  # one sequence length for most tests, so compiled steps are shared
TOL = dict(rtol=1e-10, atol=1e-10)
# float32 against the float64 reference. After one update, or SGD updates,
# float32 params, losses and carries are within 4e-7 of it (measured).
TOLS = {F32: dict(rtol=1e-5, atol=1e-6), F64: TOL}
# After several clipped Adam updates, within 7e-6 (measured, 8 updates): Adam
# divides each gradient entry by its own running magnitude, so the float32
# rounding of a small entry (about 1e-7 of the largest) becomes a relative error
# of that entry's update; later losses and carries inherit the params' error.
ADAM_TOLS = {F32: dict(rtol=1e-5, atol=2e-5), F64: TOL}
DTYPES = [pytest.param(F32, id="float32"),
          pytest.param(F64, id="float64", marks=pytest.mark.float64)]
float64 = pytest.mark.float64


# ----------------------------------------------------------------------------
# Model and data.


def step_loss(params, hs, ys):
  """Squared error of a linear readout, per step: ``[B, K, H] -> [B, K]``."""
  preds = hs @ params["out"]["W"] + params["out"]["b"][None, None]
  return jnp.sum((preds - ys) ** 2, axis=-1)


def make_params(seed=0, *, D=dims.D, H=dims.H, O=dims.O, dtype=F64):
  rng = np.random.default_rng(seed)
  params = {
      "cell": {"W": rng.normal(size=(D, H)) * 0.8, "U": rng.normal(size=(H, H)) * 0.5,
               "b": rng.normal(size=(H,)) * 0.1},
      "out": {"W": rng.normal(size=(H, O)), "b": rng.normal(size=(O,)) * 0.1},
  }
  return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)


def make_batch(T=T, seed=1, *, B=dims.B, D=dims.D, O=dims.O, dtype=F64):
  rng = np.random.default_rng(seed)
  return {"xs": rng.normal(size=(B, T, D)).astype(dtype),
          "ys": rng.normal(size=(B, T, O)).astype(dtype)}


def to_np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def assert_trees_close(a, b, **tol):
  la, lb = jax.tree_util.tree_leaves(to_np(a)), jax.tree_util.tree_leaves(to_np(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(x, y, **(tol or TOL))


# ----------------------------------------------------------------------------
# The reference: numpy forward pass, hand-written BPTT, optax update.


def np_forward(p, h, xs, mask, t0, t1):
  """``h_t = tanh(x_t W + h_{t-1} U + b)`` over steps ``t0 .. t1 - 1`` (clipped
  to ``[0, T)``); a masked step keeps the carry.

  Returns:
    ``(carries, news)``: the carry before each step and after the last
    (``len(steps) + 1`` entries), and each step's new state.
  """
  W, U, b = (np.asarray(p[k], np.float64) for k in ("W", "U", "b"))
  carries, news = [np.asarray(h, np.float64)], []
  for t in range(max(t0, 0), min(t1, xs.shape[1])):
    new = np.tanh(xs[:, t] @ W + carries[-1] @ U + b[None])
    news.append(new)
    carries.append(np.where(mask[:, t][:, None], new, carries[-1]))
  return carries, news


def np_backward(p, xs, mask, t0, carries, news, dnews):
  """BPTT by hand: the cell's gradients given ``dL/d new_t`` (one per step).

  The carry before the first step is a constant (stop-gradient): nothing is
  propagated past it.
  """
  U = np.asarray(p["U"], np.float64)
  g = {k: np.zeros(np.shape(p[k])) for k in ("W", "U", "b")}
  dc = np.zeros_like(carries[0])  # dL/d(carry after step t)
  for i in reversed(range(len(news))):
    t, m = max(t0, 0) + i, mask[:, max(t0, 0) + i][:, None]
    da = (np.where(m, dc, 0.0) + dnews[i]) * (1.0 - news[i] ** 2)
    g["W"] += xs[:, t].T @ da
    g["U"] += carries[i].T @ da
    g["b"] += da.sum(0)
    dc = np.where(m, 0.0, dc) + da @ U.T
  return g


def np_window(params, h0, xs, ys, mask, lo, first, hi, reduction):
  """Loss, loss-term count and gradients of one update's window ``[lo, hi)``,
  with the loss on steps ``[first, hi)`` only."""
  carries, news = np_forward(params["cell"], h0, xs, mask, lo, hi)
  Wo, bo = np.asarray(params["out"]["W"]), np.asarray(params["out"]["b"])
  B, start = xs.shape[0], max(lo, 0)
  count = int(sum(mask[:, t].sum() for t in range(first, min(hi, xs.shape[1]))))
  denom = max(count, 1) if reduction == "mean" else B
  total, dnews = 0.0, []
  g_out = {"W": np.zeros(Wo.shape), "b": np.zeros(bo.shape)}
  for i, new in enumerate(news):
    t = start + i
    if t < first:
      dnews.append(np.zeros_like(new))
      continue
    err = new @ Wo + bo[None] - ys[:, t]
    total += np.sum(np.where(mask[:, t], np.sum(err ** 2, axis=-1), 0.0))
    d_pred = np.where(mask[:, t][:, None], 2.0 * err / denom, 0.0)
    g_out["W"] += new.T @ d_pred
    g_out["b"] += d_pred.sum(0)
    dnews.append(d_pred @ Wo.T)
  grads = {"cell": np_backward(params["cell"], xs, mask, lo, carries, news, dnews),
           "out": g_out}
  return total / denom, count, grads, carries[-1]


@functools.lru_cache(maxsize=None)
def jitted_update(tx):
  return jax.jit(tx.update)


def batch_mask(batch):
  B, T = np.shape(batch["xs"])[:2]
  if batch.get("lengths") is not None:
    return np.arange(T)[None, :] < np.asarray(batch["lengths"])[:, None]
  if batch.get("mask") is not None:
    return np.asarray(batch["mask"], bool)
  return np.ones((B, T), bool)


def reference_tbptt(params, batch, tx, *, k1, k2=None, reduction="mean", carry=None,
                    n_chunks=None, opt_state=None):
  """TBPTT(k1, k2) as a Python loop over chunks.

  Update ``n`` backpropagates through steps ``[(n+1) k1 - k2, (n+1) k1)`` from
  the carry at that window's start, and its loss is the mean (or batch-mean
  sum) over chunk ``n``'s valid steps ``[n k1, (n+1) k1)``; a chunk without a
  valid step makes no update. The carry advances ``k1`` steps per update,
  computed with the params before it.

  Returns:
    A dict: ``params``, ``losses`` ``[N]``, ``counts`` ``[N]``, ``carries``
    after each chunk ``[N, B, H]``, the final ``carry`` and ``opt_state``.
  """
  with jax.enable_x64(True):  # the optax updates in float64 too
    return _reference_tbptt(params, batch, tx, k1=k1, k2=k2, reduction=reduction, carry=carry,
                            n_chunks=n_chunks, opt_state=opt_state)


def _reference_tbptt(params, batch, tx, *, k1, k2, reduction, carry, n_chunks, opt_state):
  k2 = k1 if k2 is None else k2
  xs = np.asarray(batch["xs"], np.float64)
  ys = np.asarray(batch["ys"], np.float64)
  mask = batch_mask(batch)
  B, T = xs.shape[:2]
  N = math.ceil(T / k1) if n_chunks is None else n_chunks
  h = np.zeros((B, np.shape(params["cell"]["U"])[0])) if carry is None else np.asarray(carry, F64)
  params = to_np(params)
  opt_state = tx.init(params) if opt_state is None else to_np(opt_state)
  losses, counts, ends = [], [], []
  for n in range(N):
    lo, first, hi = (n + 1) * k1 - k2, n * k1, (n + 1) * k1
    loss, count, grads, end = np_window(params, h, xs, ys, mask, lo, first, hi, reduction)
    h = np_forward(params["cell"], h, xs, mask, lo, lo + k1)[0][-1]
    if count > 0:
      updates, opt_state = jitted_update(tx)(grads, opt_state, params)
      params = to_np(optax.apply_updates(params, updates))
    losses.append(loss)
    counts.append(count)
    ends.append(end)
  return {"params": params, "losses": np.array(losses), "counts": np.array(counts),
          "carries": np.stack(ends), "carry": ends[-1], "opt_state": opt_state}


def final_h(params, xs, h0=None):
  """The carry after one uninterrupted pass over ``xs``, from ``h0`` (zeros)."""
  xs = np.asarray(xs)
  h0 = np.zeros((xs.shape[0], dims.H)) if h0 is None else np.asarray(h0)
  return np_forward(params["cell"], h0, xs, np.ones(xs.shape[:2], bool), 0, xs.shape[1])[0][-1]


@float64
def test_reference_gradients_equal_autodiff():
  """The hand-written BPTT of the reference against ``jax.grad`` of the same window."""
  params, batch = make_params(), make_batch()
  mask = batch_mask(batch)
  mask[1, 4] = False  # a masked step before the loss: the carry passes through
  mask[2, 6] = False  # a masked loss step
  h0 = np.random.default_rng(3).normal(size=(dims.B, dims.H)) * 0.5
  lo, first, hi = 2, 5, 8

  def window_loss(p):
    h, total, count = jnp.asarray(h0), 0.0, 0
    for t in range(lo, hi):
      new = jnp.tanh(batch["xs"][:, t] @ p["cell"]["W"] + h @ p["cell"]["U"]
                     + p["cell"]["b"][None])
      if t >= first:
        l_t = step_loss(p, new[:, None], batch["ys"][:, t:t + 1])[:, 0]
        total += jnp.sum(jnp.where(mask[:, t], l_t, 0.0))
        count += mask[:, t].sum()
      h = jnp.where(mask[:, t][:, None], new, h)
    return total / count

  loss, _, grads, _ = np_window(params, h0, batch["xs"], batch["ys"], mask, lo, first, hi,
                                "mean")
  np.testing.assert_allclose(loss, window_loss(params), **TOL)
  assert_trees_close(grads, jax.jit(jax.grad(window_loss))(params))


# ----------------------------------------------------------------------------
# The library's step, built once per setting.

CELL = bj.rnn(dims.H)  # its params are made by make_params, in the dtype under test
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
SGD = optax.sgd(0.1)
FROZEN = optax.sgd(0.0)  # params never move: carries are those of one forward pass
TRACES = []  # shapes of hs each time the library traces its step_loss


def traced_step_loss(params, hs, ys):
  TRACES.append(hs.shape)
  return step_loss(params, hs, ys)


@functools.lru_cache(maxsize=None)
def _tbptt(k1, k2, tx, reduction, remat):
  return bj.tbptt_step(CELL, traced_step_loss, tx, k1=k1, k2=k2, reduction=reduction,
                       return_carries=True, remat=remat, donate=False)


def tbptt(k1, k2=None, *, tx=TX, reduction="mean", remat=None):
  """``bj.tbptt_step`` on the float64 RNN, one per setting (one compile per shape)."""
  return _tbptt(k1, k2, tx, reduction, remat)


def stream_state(params, tx, k1=3, k2=None, dtype=F64):
  carry = bj.stream_carry(jnp.zeros((dims.B, dims.H), dtype), make_batch(dtype=dtype)["xs"],
                          k1=k1, k2=k2)
  return bj.TrainState.create(params, tx, carry=carry)


def no_reset(batch):
  """The batch with an all-false ``reset``: same structure as a batch that resets."""
  return dict(batch, reset=np.zeros(dims.B, bool))


def mean_loss(params, batch):
  """Full-BPTT mean loss over all steps (for ``train_step``)."""
  _, hs = bj.unroll(CELL, params["cell"], batch["xs"])
  return jnp.mean(step_loss(params, hs, batch["ys"]))


FULL_STEP = bj.train_step(mean_loss, TX, donate=False)
UNROLL = jax.jit(lambda p, x: bj.unroll(CELL, p, x))


# ----------------------------------------------------------------------------
# K >= T: one chunk, the full-BPTT update.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [T, T + 3])
def test_one_chunk_equals_full_bptt(K, dtype):
  params, batch = make_params(dtype=dtype), make_batch(dtype=dtype)
  state = bj.TrainState.create(params, TX)
  s_tbptt, m = tbptt(K)(state, batch)
  s_full, m_full = FULL_STEP(state, batch)
  ref = reference_tbptt(params, batch, TX, k1=K)

  assert m["loss"].shape == (1,)
  assert_dtype((s_tbptt.params, m["loss"], m["grad_norm"]), dtype)
  tol = TOLS[dtype]
  assert_trees_close(s_tbptt.params, s_full.params, **tol)
  assert_trees_close(s_tbptt.params, ref["params"], **tol)
  np.testing.assert_allclose(m["loss"][0], m_full["loss"], **tol)
  np.testing.assert_allclose(m["loss"], ref["losses"], **tol)
  np.testing.assert_allclose(m["grad_norm"][0], m_full["grad_norm"], **tol)
  assert int(m["steps"][0]) == dims.B * T
  assert int(s_tbptt.step) == 1


# ----------------------------------------------------------------------------
# K < T: chunk after chunk against the Python loop.


@pytest.mark.parametrize("k1, k2, reduction", [
    (3, None, "mean"),  # a partial last chunk of 1 step
    (2, 5, "mean"),  # TBPTT(k1, k2) with k2 > 2 k1
    (3, 4, "sum"),  # k2 > k1 and a partial last chunk
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_match_python_loop(k1, k2, reduction, dtype):
  params, batch = make_params(dtype=dtype), make_batch(dtype=dtype)
  new, m = tbptt(k1, k2, reduction=reduction)(bj.TrainState.create(params, TX), batch)
  ref = reference_tbptt(params, batch, TX, k1=k1, k2=k2, reduction=reduction)

  assert m["loss"].shape == (math.ceil(T / k1),)
  assert_dtype((new.params, m["loss"]), dtype)
  tol = ADAM_TOLS[dtype]
  np.testing.assert_allclose(m["loss"], ref["losses"], **tol)
  np.testing.assert_array_equal(m["steps"], ref["counts"])
  assert_trees_close(new.params, ref["params"], **tol)
  assert_trees_close(new.opt_state.inner_state, ref["opt_state"], **tol)
  assert int(new.step) == math.ceil(T / k1)
  assert new.carry is None  # not streaming: nothing handed on


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, k1, k2", [("lengths", 3, None), ("mask", 2, 5)])
def test_chunks_with_lengths_or_mask_match_python_loop(kind, k1, k2, dtype):
  params, batch = make_params(dtype=dtype), make_batch(dtype=dtype)
  if kind == "lengths":
    # Chunks 2 and 3 (steps 6-9) hold no valid step: no update, not counted.
    batch["lengths"] = np.array([6, 5, 0], np.int32)
    n_valid, n_updates = 11, 2
  else:
    m = np.random.default_rng(5).random((dims.B, T)) < 0.6
    m[:, -1] = [True, False, False]
    batch["mask"] = m
    n_valid, n_updates = int(m.sum()), math.ceil(T / k1)
  new, metrics = tbptt(k1, k2)(bj.TrainState.create(params, TX), batch)
  ref = reference_tbptt(params, batch, TX, k1=k1, k2=k2)

  assert int(np.sum(metrics["steps"])) == n_valid  # every valid step counted once
  np.testing.assert_array_equal(metrics["steps"], ref["counts"])
  assert_dtype((new.params, metrics["loss"]), dtype)
  tol = ADAM_TOLS[dtype]
  np.testing.assert_allclose(metrics["loss"], ref["losses"], **tol)
  assert_trees_close(new.params, ref["params"], **tol)
  assert_trees_close(new.opt_state.inner_state, ref["opt_state"], **tol)  # skipped: untouched
  assert int(new.step) == n_updates


# ----------------------------------------------------------------------------
# The carry handed across chunk boundaries.


@float64
@pytest.mark.parametrize("k1, k2, streaming", [(3, None, True), (3, 5, True), (2, 6, False)])
def test_carries_at_boundaries_equal_one_forward_pass(k1, k2, streaming):
  """With the params fixed (lr 0) the carry after chunk ``n`` is ``h`` at step
  ``min((n+1) K, T) - 1`` of one uninterrupted pass (from zeros, or from a
  zero streaming carry)."""
  params, batch = make_params(), make_batch()
  if streaming:
    state, batch = stream_state(params, FROZEN, k1, k2), no_reset(batch)
  else:
    state = bj.TrainState.create(params, FROZEN)
  new, m = tbptt(k1, k2, tx=FROZEN)(state, batch)

  N = math.ceil(T / k1)
  boundaries = [min((n + 1) * k1, T) - 1 for n in range(N)]
  _, hs = UNROLL(params["cell"], batch["xs"])
  loop = [final_h(params, batch["xs"][:, :b + 1]) for b in boundaries]

  assert m["carry"].shape == (N, dims.B, dims.H)
  assert m["carry"].dtype == F64
  np.testing.assert_allclose(m["carry"], np.swapaxes(np.asarray(hs)[:, boundaries], 0, 1),
                             **TOL)
  np.testing.assert_allclose(m["carry"], np.stack(loop), **TOL)
  assert_trees_close(new.params, params, rtol=0, atol=0)  # lr 0: nothing moved


# ----------------------------------------------------------------------------
# TBPTT(k1, k2): which steps an update backpropagates through.

DOT_H = 3


@functools.lru_cache(maxsize=None)
def dot_tbptt(k1, k2):
  dot_loss = lambda p, hs, ys: jnp.sum(hs * ys, axis=-1)  # noqa: E731
  return bj.tbptt_step(bj.rnn(DOT_H, dtype=F64), dot_loss, optax.sgd(1.0), k1=k1, k2=k2,
                       reduction="sum")


@float64
@pytest.mark.parametrize("k1, k2, chunks", [(2, 5, (0, 2, 4)), (3, 3, (1, 3))])
def test_update_backpropagates_through_exactly_k2_steps(k1, k2, chunks):
  """One-hot time markers as inputs make row ``t`` of ``dL/dW`` the error
  ``delta_t`` of step ``t``: nonzero exactly on the steps backpropagated through.

  The only nonzero target sits on the last step of chunk ``n``, so update ``n``
  is the only one with a gradient; with SGD at lr 1 the change of the params
  is minus that gradient.
  """
  H, N = DOT_H, math.ceil(T / k1)
  rng = np.random.default_rng(7)
  params = {"cell": {"W": rng.normal(size=(T, H)) * 0.5, "U": rng.normal(size=(H, H)) * 0.6,
                     "b": rng.normal(size=(H,)) * 0.1}}
  xs = np.eye(T)[None]  # x_t = e_t, B = 1
  mask = np.ones((1, T), bool)
  for n in chunks:
    s = min((n + 1) * k1, T) - 1  # last step of chunk n
    ys = np.zeros((1, T, H))
    ys[0, s] = rng.normal(size=H)
    new, m = dot_tbptt(k1, k2)(bj.TrainState.create(params, optax.sgd(1.0)),
                               {"xs": xs, "ys": ys})
    change = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, new.params, params)

    start = (n + 1) * k1 - k2
    window = np.zeros(T, bool)
    window[max(start, 0):s + 1] = True
    np.testing.assert_array_equal(np.any(change["cell"]["W"] != 0, axis=1), window)

    # The same gradient by hand: the carry up to the window's start, then BPTT
    # from the loss y_s . h_s back to the window's start.
    h0 = np_forward(params["cell"], np.zeros((1, H)), xs, mask, 0, start)[0][-1]
    carries, news = np_forward(params["cell"], h0, xs, mask, start, s + 1)
    dnews = [np.zeros((1, H))] * (len(news) - 1) + [ys[:, s]]
    grads = np_backward(params["cell"], xs, mask, start, carries, news, dnews)
    assert_trees_close(change["cell"], {k: -g for k, g in grads.items()})
    expected_norm = np.zeros(N)
    expected_norm[n] = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    np.testing.assert_allclose(m["grad_norm"], expected_norm, **TOL)


# ----------------------------------------------------------------------------
# T not a multiple of K.


@float64
def test_partial_last_chunk_is_trained_without_retrace():
  """T = 10, K = 3: the last chunk holds one step; it is trained, and a second
  batch of the same shape reuses the compiled step."""
  K, params = 3, make_params()
  step = tbptt(K)
  s1, m1 = step(bj.TrainState.create(params, TX), make_batch(seed=1))
  n_traces = len(TRACES)
  s2, m2 = step(s1, make_batch(seed=2))
  step(s2, make_batch(seed=3))

  assert len(TRACES) == n_traces  # no retrace
  np.testing.assert_array_equal(m1["steps"], [dims.B * K] * 3 + [dims.B * 1])
  assert int(np.sum(m2["steps"])) == dims.B * T
  # The partial chunk's update: params after 4 updates differ from those after
  # the 3 full chunks, and match the reference that trains all 4.
  ref_all = reference_tbptt(params, make_batch(seed=1), TX, k1=K)["params"]
  ref_3 = reference_tbptt(params, make_batch(seed=1), TX, k1=K, n_chunks=3)["params"]
  assert_trees_close(s1.params, ref_all)
  assert float(m1["grad_norm"][-1]) > 0
  diff = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - b).max(), s1.params, ref_3)
  assert min(jax.tree_util.tree_leaves(diff)) > 1e-4
  assert int(s2.step) == 8


# ----------------------------------------------------------------------------
# Streaming: the carry continues from one batch to the next.


@float64
@pytest.mark.parametrize("k1, k2", [(3, None), (3, 5)])
def test_streaming_carry_continues_across_batches(k1, k2):
  params = make_params()
  step = tbptt(k1, k2, tx=FROZEN)
  T = 12  # a multiple of k1 (else the last chunk is partial; see the next test)
  b1, b2 = no_reset(make_batch(T, seed=1)), no_reset(make_batch(T, seed=2))
  s1, _ = step(stream_state(params, FROZEN, k1, k2), b1)
  s2, m2 = step(s1, b2)

  both = np.concatenate([b1["xs"], b2["xs"]], axis=1)
  _, hs = UNROLL(params["cell"], both)
  front = 0 if k2 is None else k2 - k1
  c1, c2 = (s1.carry, s2.carry) if not front else (s1.carry.carry, s2.carry.carry)
  # The streamed carry is the state k2 - k1 steps before each batch's end.
  np.testing.assert_allclose(c1, final_h(params, b1["xs"][:, :T - front]), **TOL)
  np.testing.assert_allclose(c2, hs[:, 2 * T - front - 1], **TOL)
  np.testing.assert_allclose(c2, final_h(params, both[:, :2 * T - front]), **TOL)
  np.testing.assert_allclose(m2["carry"][0], hs[:, T + k1 - 1], **TOL)
  if front:  # with the inputs of those last steps
    np.testing.assert_array_equal(s2.carry.xs, b2["xs"][:, T - front:])
    np.testing.assert_array_equal(s2.carry.mask, np.ones((dims.B, front), bool))


@float64
def test_streaming_after_a_partial_last_chunk_starts_from_the_batch_end():
  """T = 10, k1 = 3: the last chunk is partial (padded, masked), so the stream
  continues from the carry at the batch's end, with no steps of history."""
  params = make_params()
  s1, _ = tbptt(3, 5, tx=FROZEN)(stream_state(params, FROZEN, 3, 5), no_reset(make_batch()))
  np.testing.assert_allclose(s1.carry.carry, final_h(params, make_batch()["xs"]), **TOL)
  np.testing.assert_array_equal(s1.carry.mask, np.zeros((dims.B, 2), bool))


@float64
@pytest.mark.parametrize("k1, k2, reduction", [(3, 5, "mean"), (2, 7, "sum"), (5, 5, "mean")])
def test_streamed_batches_equal_one_run_over_their_concatenation(k1, k2, reduction):
  """TBPTT(k1, k2) over two streamed batches gives the updates (params after
  both, per-chunk losses) of one run over the concatenated stream: the first
  window of the second batch reaches k2 - k1 steps back into the first."""
  params = make_params()
  T1 = 2 * k1 * 2  # a multiple of k1: chunk boundaries fall where they fall in one run
  b1, b2 = make_batch(T=T1, seed=1), make_batch(T=T1, seed=2)
  both = {k: np.concatenate([b1[k], b2[k]], axis=1) for k in ("xs", "ys")}
  step = bj.tbptt_step(CELL, step_loss, TX, k1=k1, k2=k2, reduction=reduction,
                       return_carries=True)

  def start():
    carry = bj.stream_carry(jnp.zeros((dims.B, dims.H), F64), b1["xs"], k1=k1, k2=k2)
    return bj.TrainState.create(params, TX, carry=carry)

  s1, m1 = step(start(), b1)
  s2, m2 = step(s1, b2)
  ref = reference_tbptt(params, both, TX, k1=k1, k2=k2, reduction=reduction)
  np.testing.assert_allclose(np.concatenate([m1["loss"], m2["loss"]]), ref["losses"], **TOL)
  assert_trees_close(s2.params, ref["params"])
  one = step(bj.TrainState.create(params, TX, carry=bj.stream_carry(
      jnp.zeros((dims.B, dims.H), F64), both["xs"], k1=k1, k2=k2)), both)[1]
  np.testing.assert_allclose(np.concatenate([m1["loss"], m2["loss"]]), one["loss"], **TOL)
  np.testing.assert_allclose(np.concatenate([m1["carry"], m2["carry"]]), one["carry"], **TOL)


def test_streaming_with_k2_above_k1_needs_a_stream_carry():
  step = tbptt(3, 5, tx=FROZEN)
  state = bj.TrainState.create(make_params(dtype=F32), FROZEN,
                               carry=jnp.zeros((dims.B, dims.H), F32))
  with pytest.raises(ValueError, match=r"start from bj.stream_carry"):
    step(state, make_batch(dtype=F32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_matches_python_loop_while_training(dtype):
  """With lr > 0 each chunk's carry is computed with the params current at that chunk."""
  params = make_params(dtype=dtype)
  step = tbptt(3)
  b1, b2 = make_batch(seed=1, dtype=dtype), make_batch(seed=2, dtype=dtype)
  s1, _ = step(stream_state(params, TX, dtype=dtype), b1)
  s2, m2 = step(s1, b2)
  assert_dtype((s1.params, s1.carry, s2.params, s2.carry, m2["loss"], m2["carry"]), dtype)

  # The second batch's reference continues from the first's, all in float64.
  r1 = reference_tbptt(params, b1, TX, k1=3)
  r2 = reference_tbptt(r1["params"], b2, TX, k1=3, carry=r1["carry"], opt_state=r1["opt_state"])
  tol = ADAM_TOLS[dtype]
  assert_trees_close(s1.params, r1["params"], **tol)
  np.testing.assert_allclose(s1.carry, r1["carry"], **tol)
  np.testing.assert_allclose(m2["loss"], r2["losses"], **tol)
  np.testing.assert_allclose(m2["carry"], r2["carries"], **tol)
  assert_trees_close(s2.params, r2["params"], **tol)
  np.testing.assert_allclose(s2.carry, r2["carry"], **tol)


@float64
def test_reset_restarts_chosen_rows_from_zeros():
  params = make_params()
  step = tbptt(3, tx=FROZEN)
  b1 = no_reset(make_batch(seed=1))
  b2 = dict(make_batch(seed=2), reset=np.array([True, False, True]))
  s1, _ = step(stream_state(params, FROZEN), b1)
  s2, _ = step(s1, b2)

  fresh = final_h(params, b2["xs"])
  continued = final_h(params, b2["xs"], h0=s1.carry)
  np.testing.assert_allclose(s2.carry[0], fresh[0], **TOL)
  np.testing.assert_allclose(s2.carry[2], fresh[2], **TOL)
  np.testing.assert_allclose(s2.carry[1], continued[1], **TOL)
  assert not np.allclose(fresh[1], continued[1])  # the reset makes a difference


@float64
def test_nan_in_stream_resets_rows_and_keeps_params_finite():
  K = 3
  params = make_params()
  b1 = no_reset(make_batch(seed=1))
  b1["xs"][0, 4, 1] = np.nan  # row 0, chunk 1

  # Params fixed: row 0 restarts from zeros after the poisoned chunk.
  s, m = tbptt(K, tx=FROZEN)(stream_state(params, FROZEN), b1)
  np.testing.assert_array_equal(np.asarray(m["finite"]), [True, False, True, True])
  np.testing.assert_array_equal(m["carry"][1, 0], np.zeros(dims.H))
  np.testing.assert_allclose(s.carry[0], final_h(params, b1["xs"][:, 2 * K:])[0], **TOL)
  np.testing.assert_allclose(s.carry[1:], final_h(params, b1["xs"])[1:], **TOL)

  # Training: the poisoned chunk is skipped, the others train, all stays finite.
  step = tbptt(K, tx=SGD)
  s1, m1 = step(stream_state(params, SGD), b1)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(s1))
  np.testing.assert_array_equal(m1["nonfinite_total"], [0, 1, 1, 1])
  np.testing.assert_array_equal(m1["nonfinite"], [0, 1, 0, 0])
  s2, m2 = step(s1, no_reset(make_batch(seed=2)))
  assert np.all(np.asarray(m2["finite"]))
  assert np.isfinite(np.asarray(s2.carry)).all()
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                 s2.params, s1.params)
  assert min(jax.tree_util.tree_leaves(moved)) > 0


# ----------------------------------------------------------------------------
# Memory-saving BPTT and dtypes.


@float64
def test_remat_gives_the_same_updates():
  """Memory-saving BPTT (3 segments per unroll) changes nothing but rounding."""
  params, batch = make_params(), make_batch()
  state = bj.TrainState.create(params, TX)
  plain, m_plain = tbptt(2, 5)(state, batch)
  saved, m_saved = tbptt(2, 5, remat=3)(state, batch)
  np.testing.assert_allclose(m_saved["grad_norm"], m_plain["grad_norm"], rtol=1e-12)
  assert_trees_close(saved.params, plain.params, rtol=1e-12, atol=1e-14)


@float64
def test_float32_cell_keeps_a_float32_carry():
  """The initial carry takes the params' and inputs' dtype: float32 here, with x64
  on, so that a float64 constant or cast in the step would show."""
  cell = bj.rnn(dims.H, dtype=jnp.float32)
  params, batch = make_params(dtype=F32), make_batch(dtype=F32)
  new, m = bj.tbptt_step(cell, step_loss, SGD, k1=3, return_carries=True)(
      bj.TrainState.create(params, SGD), batch)
  assert_dtype((new.params, new.opt_state, m["carry"], m["loss"], m["grad_norm"]), F32)
  ref = reference_tbptt(params, batch, SGD, k1=3)
  assert_trees_close(new.params, ref["params"], **TOLS[F32])


# ----------------------------------------------------------------------------
# Bad configurations.


@pytest.mark.parametrize("kwargs, match", [
    (dict(k1=0), "k1 must be a positive int"),
    (dict(k1=-2), "k1 must be a positive int"),
    (dict(k1=2.0), "k1 must be a positive int"),
    (dict(k1=3, k2=2), "k2 must be >= k1"),
    (dict(k1=3, reduction="median"), "reduction must be 'sum' or 'mean'"),
    (dict(k1=3, lengths=np.ones(3, np.int32)), "lengths= is set by the training path"),
    (dict(k1=3, fused=True, hoist=True), None),
])
def test_bad_settings_raise(kwargs, match):
  if match is None:  # contradicting unroll settings: raised at the first trace
    step = bj.tbptt_step(CELL, step_loss, SGD, **kwargs)
    with pytest.raises(ValueError, match="hoist=True needs fused=False"):
      step(bj.TrainState.create(make_params(dtype=F32), SGD), make_batch(dtype=F32))
    return
  with pytest.raises(ValueError, match=match):
    bj.tbptt_step(CELL, step_loss, SGD, **kwargs)


def test_model_with_unroll_settings_raises():
  model = bj.cell_model(CELL)
  with pytest.raises(ValueError, match="given to cell_model"):
    bj.tbptt_step(model, step_loss, SGD, k1=3, fused=False)


def test_bad_optimizer_raises_type_error():
  with pytest.raises(TypeError, match="optax.GradientTransformation"):
    bj.tbptt_step(CELL, step_loss, "adam", k1=2)


@pytest.mark.parametrize("update, carry_rows, match", [
    ({"ys": np.zeros((3, T - 1, 1))}, None, r"xs and ys must share \[B, T\]"),
    ({"ys": np.zeros((2, T, 1))}, None, r"xs and ys must share \[B, T\]"),
    ({"mask": np.ones((3, T - 1), bool)}, None, r"mask must have shape \[B, T\]"),
    ({"mask": np.ones((T, 3), bool)}, None, r"mask must have shape \[B, T\]"),
    ({"reset": np.ones(2, bool)}, 3, r"reset must be \[B\] = \(3,\), got \(2,\)"),
    ({"reset": np.ones((3, 1), bool)}, None, r"reset must be \[B\]"),
    ({}, 2, "carry has batch size 2 but xs has B = 3"),
    ({"lengths": np.ones(2, np.int32)}, None, r"lengths must have shape \[B\]"),
])
def test_bad_batches_raise(update, carry_rows, match):
  state = bj.TrainState.create(make_params(dtype=F32), SGD)
  if carry_rows is not None:
    state = state._replace(carry=jnp.zeros((carry_rows, dims.H), F32))
  batch = dict(make_batch(dtype=F32), **update)
  with pytest.raises(ValueError, match=match):
    tbptt(3, tx=SGD)(state, batch)


def test_bad_step_loss_shape_and_batch_type_raise():
  bad_loss = lambda p, hs, ys: jnp.sum(step_loss(p, hs, ys), axis=1)  # noqa: E731
  state = bj.TrainState.create(make_params(dtype=F32), SGD)
  with pytest.raises(ValueError, match=r"step_loss must return per-step losses \[B, K\]"):
    bj.tbptt_step(CELL, bad_loss, SGD, k1=3)(state, make_batch(dtype=F32))
  batch = make_batch(dtype=F32)
  with pytest.raises(TypeError, match="batch must be a dict"):
    tbptt(3, tx=SGD)(state, (batch["xs"], batch["ys"]))


def test_step_function_cell_needs_a_carry():
  """A bare step function has no initial carry: the state must bring one."""
  def step_fn(p, h, x):
    h = jnp.tanh(x @ p["W"] + h @ p["U"] + p["b"][None])
    return h, h

  step = bj.tbptt_step(step_fn, step_loss, FROZEN, k1=3)
  with pytest.raises(ValueError, match="has no initial_carry: pass a carry"):
    step(bj.TrainState.create(make_params(dtype=F32), FROZEN), make_batch(dtype=F32))
