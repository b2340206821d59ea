"""The model contract: models that are not one cell train through every path.

Two models: an embedding + 2-layer LSTM + readout over token ids, and a GRU
encoder whose states feed an LSTM decoder (two different cells, a tuple
carry). Each trains through ``segmented_loss``, ``model_loss`` + ``train_step``
and ``tbptt_step(k1, k2)``; the reference is a Python loop over time steps
built from the cells' one-step functions (never ``unroll``), differentiated by
``jax.grad``, and for TBPTT a Python loop over chunks with the optax update
applied by hand. Float64, compared to 1e-10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax as bj

B, T, V, E, H, O = 3, 12, 7, 4, 5, 3
F64 = jnp.float64
LENGTHS = np.array([12, 7, 0], np.int32)
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _where_rows(m, new, old):
  return jax.tree_util.tree_map(
      lambda n, o: jnp.where(m.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


# ----------------------------------------------------------------------------
# Model 1: token ids -> embedding -> LSTM -> LSTM -> readout (logits).

STACK = bj.stack(bj.lstm(H, dtype=F64), bj.lstm(H, dtype=F64))


def lm_apply(params, carry, tokens, mask):
  emb = params["embed"][tokens]  # [B, K, E]
  carry, hs = bj.unroll(STACK, params["rnn"], emb, mask=mask, carry=carry)
  return carry, bj.readout(params["out"], hs)


def lm_ref_step(params, carry, token_t, m_t):
  new, h = STACK.step(params["rnn"], carry, params["embed"][token_t])
  return _where_rows(m_t, new, carry), bj.readout(params["out"], h)


def lm_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"embed": jax.random.normal(k[0], (V, E), F64),
          "rnn": STACK.init(k[1], E), "out": bj.init_readout(k[2], H, O, F64)}


def lm_data(seed=1):
  rng = np.random.default_rng(seed)
  return rng.integers(0, V, size=(B, T)).astype(np.int32), rng.integers(0, O, size=(B, T))


def ce_loss(params, logits, labels):
  return bj.softmax_cross_entropy(logits, labels.astype(jnp.int32))


LM = bj.Model(lm_apply, initial_carry=STACK.initial_carry, name="lm")


# ----------------------------------------------------------------------------
# Model 2: a GRU encoder; an LSTM decoder reads [x_t, encoder h_t].

ENC, DEC = bj.gru(H, dtype=F64), bj.lstm(H, dtype=F64)


def ed_apply(params, carry, xs, mask):
  c_enc, h_enc = bj.unroll(ENC, params["enc"], xs, mask=mask, carry=carry[0])
  c_dec, h_dec = bj.unroll(DEC, params["dec"], jnp.concatenate([xs, h_enc], axis=-1),
                           mask=mask, carry=carry[1])
  return (c_enc, c_dec), bj.readout(params["out"], h_dec)


def ed_ref_step(params, carry, x_t, m_t):
  c_enc, h_enc = ENC.step(params["enc"], carry[0], x_t)
  c_dec, h_dec = DEC.step(params["dec"], carry[1], jnp.concatenate([x_t, h_enc], axis=-1))
  return _where_rows(m_t, (c_enc, c_dec), carry), bj.readout(params["out"], h_dec)


def ed_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"enc": ENC.init(k[0], 2), "dec": DEC.init(k[1], 2 + H),
          "out": bj.init_readout(k[2], H, O, F64)}


def ed_data(seed=1):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, T, 2)), rng.normal(size=(B, T, O))


def mse_loss(params, preds, ys):
  return bj.mse(preds, ys)


ED = bj.Model(ed_apply, initial_carry=lambda b, dt: (ENC.initial_carry(b, dt),
                                                     DEC.initial_carry(b, dt)), name="enc_dec")

MODELS = {
    "embedding_stack_readout": (LM, lm_ref_step, lm_params, lm_data, ce_loss),
    "gru_encoder_lstm_decoder": (ED, ed_ref_step, ed_params, ed_data, mse_loss),
}


# ----------------------------------------------------------------------------
# References: Python loops over steps and chunks.


def ref_run(ref_step, params, carry, xs, mask, lo, hi):
  """Steps ``[lo, hi)`` (those < 0 skipped) from ``carry``: ``(carry, [outputs])``."""
  outs = []
  for t in range(lo, hi):
    if t < 0:
      continue
    carry, out = ref_step(params, carry, xs[:, t], jnp.asarray(mask[:, t]))
    outs.append(out)
  return carry, outs


def ref_loss(ref_step, step_loss, model, params, xs, ys, mask, carry=None, lo=0, first=0,
             hi=T):
  """Mean loss over the valid steps ``[first, hi)`` of a run over ``[lo, hi)``."""
  carry = model.initial_carry(B, F64) if carry is None else carry
  _, outs = ref_run(ref_step, params, carry, xs, mask, lo, hi)
  total, count = 0.0, 0
  for t, out in zip(range(max(lo, 0), hi), outs):
    if t < first:
      continue
    step = step_loss(params, out[:, None], ys[:, t:t + 1])[:, 0]
    total = total + jnp.sum(jnp.where(jnp.asarray(mask[:, t]), step, 0.0))
    count += int(mask[:, t].sum())
  return total / max(count, 1)


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


MASK = np.arange(T)[None, :] < LENGTHS[:, None]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_segmented_loss_and_its_gradient_equal_the_step_loop(name):
  model, ref_step, make_params, make_data, step_loss = MODELS[name]
  params, (xs, ys) = make_params(), make_data()
  got, grads = jax.jit(jax.value_and_grad(lambda p: bj.segmented_loss(
      model, p, xs, ys, step_loss, lengths=LENGTHS, remat=3, reduction="mean")[0]))(params)
  want, want_grads = jax.value_and_grad(
      lambda p: ref_loss(ref_step, step_loss, model, p, xs, ys, MASK))(params)
  np.testing.assert_allclose(got, want, **TOL)
  assert_trees_close(grads, want_grads)
  assert float(optax.global_norm(want_grads)) > 1e-3  # a gradient that can be wrong


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_step_with_model_loss_equals_sgd_on_the_reference_gradient(name):
  model, ref_step, make_params, make_data, step_loss = MODELS[name]
  params, (xs, ys) = make_params(), make_data()
  tx = optax.sgd(0.1)
  step = bj.train_step(bj.model_loss(model, step_loss, remat="sqrt"), tx, donate=False)
  new, metrics = step(bj.TrainState.create(params, tx),
                      {"xs": xs, "ys": ys, "lengths": LENGTHS})
  want, grads = jax.value_and_grad(
      lambda p: ref_loss(ref_step, step_loss, model, p, xs, ys, MASK))(params)
  np.testing.assert_allclose(metrics["loss"], want, **TOL)
  assert_trees_close(new.params, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads))


def ref_tbptt(model, ref_step, step_loss, params, batches, k1, k2, lr):
  """TBPTT(k1, k2) over streamed batches as a Python loop over chunks (SGD by hand)."""
  front = k2 - k1
  xs = np.concatenate([b[0] for b in batches], axis=1)
  ys = np.concatenate([b[1] for b in batches], axis=1)
  mask = np.ones(xs.shape[:2], bool)
  start = model.initial_carry(B, F64)  # the carry at step n k1 - front
  losses = []
  for n in range(xs.shape[1] // k1):
    lo, first, hi = n * k1 - front, n * k1, (n + 1) * k1
    loss, grads = jax.value_and_grad(lambda p, c=start, lo=lo, first=first, hi=hi: ref_loss(
        ref_step, step_loss, model, p, xs, ys, mask, c, lo, first, hi))(params)
    start, _ = ref_run(ref_step, params, start, xs, mask, lo, lo + k1)
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    losses.append(loss)
  return params, np.array(losses)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streamed_tbptt_equals_the_chunk_loop(name):
  model, ref_step, make_params, make_data, step_loss = MODELS[name]
  params = make_params()
  b1, b2 = make_data(seed=1), make_data(seed=2)
  k1, k2, lr = 4, 6, 0.2
  tx = optax.sgd(lr)
  step = bj.tbptt_step(model, step_loss, tx, k1=k1, k2=k2, donate=False)
  carry = bj.stream_carry(model.initial_carry(B, F64), b1[0], k1=k1, k2=k2)
  state = bj.TrainState.create(params, tx, carry=carry)
  state, m1 = step(state, {"xs": b1[0], "ys": b1[1]})
  state, m2 = step(state, {"xs": b2[0], "ys": b2[1]})
  want_params, want_losses = ref_tbptt(model, ref_step, step_loss, params, [b1, b2], k1, k2, lr)
  np.testing.assert_allclose(np.concatenate([m1["loss"], m2["loss"]]), want_losses, **TOL)
  assert_trees_close(state.params, want_params)


def test_a_model_without_initial_carry_restarts_reset_rows_from_zeros():
  """``reset`` and the restart of non-finite rows are honoured for any model:
  without ``initial_carry``, a restarted row starts from zeros."""
  apply = LM.apply
  bare = bj.Model(apply)  # no initial_carry
  params, (tokens, labels) = lm_params(), lm_data()
  tx = optax.sgd(0.0)
  step = bj.tbptt_step(bare, ce_loss, tx, k1=4, donate=False)
  carry = jax.tree_util.tree_map(lambda a: a + 0.5, STACK.initial_carry(B, F64))
  carry = jax.tree_util.tree_map(lambda a: a.at[2].set(jnp.nan), carry)  # row 2 non-finite
  state = bj.TrainState.create(params, tx, carry=carry)
  new, _ = step(state, {"xs": tokens, "ys": labels, "reset": np.array([True, False, False])})
  zeros = STACK.initial_carry(B, F64)
  want_fresh, _ = ref_run(lm_ref_step, params, zeros, tokens, np.ones((B, T), bool), 0, T)
  want_kept, _ = ref_run(lm_ref_step, params, carry, tokens, np.ones((B, T), bool), 0, T)
  for got, fresh, kept in zip(jax.tree_util.tree_leaves(new.carry),
                              jax.tree_util.tree_leaves(want_fresh),
                              jax.tree_util.tree_leaves(want_kept)):
    np.testing.assert_allclose(got[0], fresh[0], **TOL)  # reset
    np.testing.assert_allclose(got[2], fresh[2], **TOL)  # non-finite
    np.testing.assert_allclose(got[1], kept[1], **TOL)  # continued
  with pytest.raises(ValueError, match="has no initial_carry"):
    step(bj.TrainState.create(params, tx), {"xs": tokens, "ys": labels})


def test_model_errors_name_what_is_wrong():
  with pytest.raises(TypeError, match="expected a bptt_jax.Model or a Cell"):
    bj.as_model(3)
  with pytest.raises(ValueError, match="set by the training path"):
    bj.cell_model(bj.lstm(H), mask=np.ones((B, T), bool))
  with pytest.raises(TypeError, match="batch must be a dict"):
    bj.model_loss(LM, ce_loss)(lm_params(), lm_data())
