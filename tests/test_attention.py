"""Attention and the attentional decoder cell against references written by hand.

The attention references are numpy: the scores, the masked softmax and the
context typed again from the docstrings, and their backward pass derived by
hand (no autodiff). The decoder cell is checked against a Python loop over
time steps built from those numpy functions and ``cell_reference.lstm_step``,
and its gradients against ``jax.grad`` of the same loop written in jax.numpy
(float64, 1e-10); float32 runs are compared with the float64 numpy result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cell_reference import DTYPES, F32, F64, GRAD_TOL, VALUE_TOL, lstm_step, random_params

import bptt_jax as bj

B, S, Q, M, A, T, D = 3, 5, 4, 6, 3, 4, 2
LENGTHS = np.array([5, 2, 0], np.int32)  # a full row, a padded row, an empty row
MASK = np.arange(S)[None, :] < LENGTHS[:, None]
ATTENTIONS = {"additive": lambda dt: bj.additive_attention(A, dtype=dt),
              "dot": lambda dt: bj.dot_attention(),
              "dot_scaled": lambda dt: bj.dot_attention(scale=True),
              "general": lambda dt: bj.general_attention(dtype=dt)}


def query_size(name):
  return M if name.startswith("dot") else Q


# ----------------------------------------------------------------------------
# numpy references: forward and a backward pass by hand.


def np_scores(name, p, q, k):
  """``e [B, S]`` for query ``q [B, Q]`` and memory ``k [B, S, M]``."""
  if name == "additive":
    u = np.tanh((q @ p["W_q"])[:, None, :] + k @ p["W_k"])  # [B, S, A]
    return u @ p["v"]
  if name == "general":
    return np.einsum("bsm,bm->bs", k, q @ p["W_a"])
  e = np.einsum("bsm,bm->bs", k, q)
  return e / np.sqrt(M) if name == "dot_scaled" else e


def np_attend(name, p, q, k, mask):
  """``(context [B, M], weights [B, S])``: softmax over the valid positions only."""
  weights = np.zeros(mask.shape)
  e = np_scores(name, p, q, np.where(mask[..., None], k, 0.0))
  for b in range(mask.shape[0]):
    n = int(mask[b].sum())
    if n:
      z = np.exp(e[b, :n] - e[b, :n].max())
      weights[b, :n] = z / z.sum()
  return np.einsum("bs,bsm->bm", weights, np.where(mask[..., None], k, 0.0)), weights


def np_attend_grads(name, p, q, k, mask, g_ctx, g_w):
  """Gradients of ``sum(ctx * g_ctx) + sum(w * g_w)`` w.r.t. params, query and memory."""
  k = np.where(mask[..., None], k, 0.0)
  ctx, w = np_attend(name, p, q, k, mask)
  dw = g_w + np.einsum("bsm,bm->bs", k, g_ctx)           # through w and c = sum_s w_s k_s
  de = w * (dw - np.sum(w * dw, axis=1, keepdims=True))  # softmax backward (0 where w = 0)
  dk = w[..., None] * g_ctx[:, None, :]                  # c's direct dependence on k
  grads = {}
  if name == "additive":
    u = np.tanh((q @ p["W_q"])[:, None, :] + k @ p["W_k"])
    du = de[..., None] * p["v"][None, None, :]
    dz = du * (1 - u ** 2)                                # [B, S, A]
    grads = {"v": np.einsum("bsa,bs->a", u, de),
             "W_q": q.T @ dz.sum(axis=1),
             "W_k": np.einsum("bsm,bsa->ma", k, dz)}
    dq = dz.sum(axis=1) @ p["W_q"].T
    dk = dk + dz @ p["W_k"].T
  elif name == "general":
    qw = q @ p["W_a"]
    dqw = np.einsum("bs,bsm->bm", de, k)
    grads = {"W_a": q.T @ dqw}
    dq = dqw @ p["W_a"].T
    dk = dk + de[..., None] * qw[:, None, :]
  else:
    c = 1 / np.sqrt(M) if name == "dot_scaled" else 1.0
    dq = c * np.einsum("bs,bsm->bm", de, k)
    dk = dk + c * de[..., None] * q[:, None, :]
  return grads, dq, np.where(mask[..., None], dk, 0.0)


def random_inputs(name, dtype, seed=0):
  rng = np.random.default_rng(seed)
  attention = ATTENTIONS[name](dtype)
  p = random_params(jax.eval_shape(lambda: attention.init(jax.random.key(0), query_size(name),
                                                          M)), seed, scale=0.7)
  q = rng.normal(size=(B, query_size(name))).astype(dtype)
  k = rng.normal(size=(B, S, M)).astype(dtype)
  return attention, p, q, k


# ----------------------------------------------------------------------------
# Attention.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_attend_values_and_gradients_equal_the_numpy_reference(name, dtype):
  attention, p, q, k = random_inputs(name, dtype)
  rng = np.random.default_rng(1)
  g_ctx, g_w = rng.normal(size=(B, M)), rng.normal(size=(B, S))

  @jax.jit
  def run(p, q, k):
    return bj.attend(attention, p, q, k, lengths=LENGTHS)

  def objective(p, q, k):
    ctx, w = run(p, q, k)
    return jnp.sum(ctx * g_ctx.astype(dtype)) + jnp.sum(w * g_w.astype(dtype))

  ctx, w = run(p, q, k)
  f64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, F64), t)  # noqa: E731
  want_ctx, want_w = np_attend(name, *f64((p, q, k)), MASK)
  np.testing.assert_allclose(ctx, want_ctx, **VALUE_TOL[dtype])
  np.testing.assert_allclose(w, want_w, **VALUE_TOL[dtype])
  assert ctx.dtype == w.dtype == dtype
  np.testing.assert_array_equal(np.asarray(w)[~MASK], 0.0)  # exactly zero weight
  np.testing.assert_allclose(np.asarray(w).sum(axis=1), [1, 1, 0], rtol=1e-6)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(p, q, k)
  want = np_attend_grads(name, *f64((p, q, k)), MASK, g_ctx, g_w)
  for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want),
                      strict=True):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=GRAD_TOL[dtype]["rtol"],
                               atol=GRAD_TOL[dtype]["atol"] * scale)
  assert np.abs(want[1]).max() > 1e-2  # the query's gradient is there to be wrong


@pytest.mark.parametrize("name", ["additive", "general"])
def test_nan_source_padding_reaches_neither_values_nor_gradients(name):
  attention, p, q, k = random_inputs(name, F32)
  poisoned = np.where(MASK[..., None], k, np.nan).astype(F32)
  poisoned[1, 3, 0] = np.inf

  def objective(p, q, k):
    ctx, w = bj.attend(attention, p, q, k, mask=MASK)
    return jnp.sum(ctx ** 2) + jnp.sum(w[:, 0])

  run = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))
  clean_loss, clean_grads = run(p, q, np.where(MASK[..., None], k, 0.0).astype(F32))
  loss, grads = run(p, q, poisoned)
  assert np.isfinite(loss) and loss == clean_loss  # bit for bit
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(clean_grads)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(grads[2])[~MASK], 0.0)  # padded memory: zero
  assert np.abs(np.asarray(grads[2])[MASK]).max() > 0


def test_attention_errors_name_what_is_wrong():
  attention, p, q, k = random_inputs("general", F32)
  with pytest.raises(ValueError, match=r"memory must be encoder states \[B, S, M\]"):
    bj.attend(attention, p, q, k[:, 0])
  with pytest.raises(ValueError, match=r"query must be \[B, Q\] with B = 3"):
    bj.attend(attention, p, q[:2], k)
  with pytest.raises(ValueError, match=r"W_a has shape \(4, 6\) but the query and memory need"):
    bj.attend(attention, p, q, k[..., :5])
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 5\]"):
    bj.attend(attention, p, q, k, lengths=np.array([6, 1, 1]))
  with pytest.raises(ValueError, match="dot_attention needs queries and memory of one size"):
    bj.attend(bj.dot_attention(), {}, q, k)
  with pytest.raises(TypeError, match="expected a bptt_jax.Attention"):
    bj.attend(lambda *a: 0, p, q, k)
  with pytest.raises(ValueError, match="units must be a positive int"):
    bj.additive_attention(0)


# ----------------------------------------------------------------------------
# The decoder cell.

H = Q  # the decoder's hidden size (the query)
TGT_LENGTHS = np.array([4, 3, 2], np.int32)
TGT_MASK = np.arange(T)[None, :] < TGT_LENGTHS[:, None]
DECODERS = {  # (attention, style, input feeding)
    "luong_additive": ("additive", "luong", False),
    "luong_general_input_feeding": ("general", "luong", True),
    "bahdanau_additive": ("additive", "bahdanau", False),
}


def decoder_and_params(name, dtype, seed=2):
  att, style, feeding = DECODERS[name]
  cell = bj.attention_cell(bj.lstm(H, dtype=dtype), ATTENTIONS[att](dtype), memory_size=M,
                           attention_size=A, input_feeding=feeding, style=style, dtype=dtype)
  return cell, random_params(jax.eval_shape(lambda: cell.init(jax.random.key(0), D)), seed)


def ref_decoder_step(xp, name, p, carry, x, memory, mask):
  """One step written from the attention_cell docstring; ``xp`` numpy or jax.numpy."""
  att, style, feeding = DECODERS[name]
  inner, a_prev = carry
  if style == "luong":
    x_in = xp.concatenate([x, a_prev], axis=-1) if feeding else x
    inner, h = lstm_step(xp, p["cell"], inner, x_in)
    ctx, w = ref_attend(xp, att, p["attention"], h, memory, mask)
  else:
    ctx, w = ref_attend(xp, att, p["attention"], inner[0], memory, mask)
    inner, h = lstm_step(xp, p["cell"], inner, xp.concatenate([x, ctx], axis=-1))
  a = xp.tanh(xp.concatenate([ctx, h], axis=-1) @ p["W_c"] + p["b_c"][None])
  return (inner, a), a, w


def ref_attend(xp, name, p, q, k, mask):
  if xp is np:
    return np_attend(name, p, q, k, mask)
  e = (jnp.tanh((q @ p["W_q"])[:, None, :] + k @ p["W_k"]) @ p["v"] if name == "additive"
       else jnp.einsum("bsm,bm->bs", k, q @ p["W_a"]))
  e = jnp.where(mask, e, -1e300)
  w = jnp.where(mask, jnp.exp(e - e.max(axis=1, keepdims=True)), 0.0)
  w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-300)
  return jnp.einsum("bs,bsm->bm", w, k), w


def ref_decoder_loop(xp, name, p, xs, memory, h0):
  """Each row alone, for its own number of steps; outputs zero past it."""
  outs, finals, weights = np.zeros((B, T, A)), [], np.zeros((B, S))
  outs = [] if xp is jnp else outs
  for b in range(B):
    carry = (bj.LSTMState(h0[0][b:b + 1], h0[1][b:b + 1]), xp.zeros((1, A)))
    row = []
    for t in range(T):
      if t < TGT_LENGTHS[b]:
        carry, a, w = ref_decoder_step(xp, name, p, carry, xs[b:b + 1, t], memory[b:b + 1],
                                       MASK[b:b + 1])
        if xp is np:
          weights[b] = w[0]
      else:
        a = xp.zeros((1, A))
      row.append(a)
    if xp is np:
      outs[b] = np.concatenate(row)
    else:
      outs.append(jnp.concatenate(row))
    finals.append(carry)
  return (outs if xp is np else jnp.stack(outs)), finals, weights


def decoder_inputs(dtype, seed=3):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(B, T, D)).astype(dtype)
  memory = np.where(MASK[..., None], rng.normal(size=(B, S, M)), np.nan).astype(dtype)
  h0 = (0.5 * rng.normal(size=(B, H))).astype(dtype), (0.5 * rng.normal(size=(B, H))).astype(dtype)
  return xs, memory, h0


@pytest.mark.parametrize("fused, dtype", [
    pytest.param(None, F32, id="sequence-float32"),
    pytest.param(None, F64, id="sequence-float64", marks=pytest.mark.float64),
    pytest.param(False, F32, id="per_step-float32")])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_cell_under_unroll_equals_the_step_loop(name, fused, dtype):
  """The cell's whole-sequence path (keys once) and its per-step path, with target
  lengths and NaN in the padded memory, against the numpy loop."""
  cell, p = decoder_and_params(name, dtype)
  xs, memory, h0 = decoder_inputs(dtype)

  @jax.jit
  def run(p, xs, memory, h0):
    carry = bj.attention_carry(p, bj.LSTMState(*h0), memory, lengths=LENGTHS)
    return bj.unroll(cell, p, xs, lengths=TGT_LENGTHS, carry=carry, fused=fused)

  final, outs = run(p, xs, memory, h0)
  f64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, F64), t)  # noqa: E731
  want_outs, want_finals, want_w = ref_decoder_loop(np, name, f64(p), f64(xs),
                                                    np.nan_to_num(f64(memory)), f64(h0))
  np.testing.assert_allclose(outs, want_outs, **VALUE_TOL[dtype])
  np.testing.assert_array_equal(np.asarray(outs)[~TGT_MASK], 0.0)
  for b in range(B):
    (h, c), a = want_finals[b]
    np.testing.assert_allclose(final.cell.h[b], h[0], **VALUE_TOL[dtype])
    np.testing.assert_allclose(final.cell.c[b], c[0], **VALUE_TOL[dtype])
    np.testing.assert_allclose(final.attention[b], a[0], **VALUE_TOL[dtype])
  np.testing.assert_allclose(final.weights, want_w, **VALUE_TOL[dtype])
  np.testing.assert_array_equal(final.memory, np.where(MASK[..., None], memory, 0))
  assert final.cell.h.dtype == dtype


@pytest.mark.float64
@pytest.mark.parametrize("name", ["luong_general_input_feeding"])
def test_decoder_gradients_equal_autodiff_of_the_loop(name):
  """Gradients w.r.t. params, inputs, memory and the starting state (the encoder's
  way in) through the sequence path, against jax.grad of the jnp loop."""
  cell, p = decoder_and_params(name, F64)
  xs, memory, h0 = decoder_inputs(F64)
  memory = np.nan_to_num(memory)
  g = np.random.default_rng(4).normal(size=(B, T, A))

  def loss(p, xs, memory, h0):
    carry = bj.attention_carry(p, bj.LSTMState(*h0), memory, lengths=LENGTHS)
    return jnp.sum(bj.unroll(cell, p, xs, lengths=TGT_LENGTHS, carry=carry)[1] * g)

  def ref(p, xs, memory, h0):
    return jnp.sum(ref_decoder_loop(jnp, name, p, xs, memory, h0)[0] * g)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(p, xs, memory, h0)
  want = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3)))(p, xs, memory, h0)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(b).max()))
  assert np.abs(np.asarray(got[2])).max() > 1e-3  # the memory's gradient is there


def test_decoder_cell_trains_through_the_model_contract():
  """train_step (segmented_loss from a carry built inside the loss) and streamed
  tbptt_step on a decoder whose carry holds the encoder states, against the numpy
  loop; gradient_flow reads the same carry."""
  name = "luong_general_input_feeding"
  cell, p = decoder_and_params(name, F32)
  xs, memory, h0 = decoder_inputs(F32)
  params = {"cell": p, "head": random_params({"W_hy": np.zeros((A, 2)), "b_y": np.zeros(2)}, 5)}
  ys = np.random.default_rng(6).normal(size=(B, T, 2)).astype(F32)
  step_loss = lambda params, outs, ys: bj.mse(bj.readout(params["head"], outs), ys)  # noqa: E731
  f64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, F64), t)  # noqa: E731
  outs, _, _ = ref_decoder_loop(np, name, f64(p), f64(xs), np.nan_to_num(f64(memory)), f64(h0))
  preds = outs @ f64(params["head"]["W_hy"]) + f64(params["head"]["b_y"])[None, None]
  want = ((preds - ys) ** 2).sum(-1)[TGT_MASK].sum() / B  # "sum": over steps, mean over B

  def loss_fn(params, batch):  # the encoder's states come in with the batch
    carry = bj.attention_carry(params["cell"], bj.LSTMState(*h0), batch["memory"],
                               lengths=LENGTHS)
    return bj.segmented_loss(cell, params, xs, ys, step_loss, lengths=TGT_LENGTHS, carry=carry,
                             remat=2, reduction="sum")[0]

  tx = optax.sgd(0.1)
  new, metrics = bj.train_step(loss_fn, tx, donate=False)(bj.TrainState.create(params, tx),
                                                           {"memory": memory})
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0

  # Streamed TBPTT: the carry (memory inside) flows from chunk to chunk. With sgd(0)
  # the params stay, so the chunks' losses add up to the whole sequence's.
  carry = bj.attention_carry(p, bj.LSTMState(*h0), memory, lengths=LENGTHS)
  tbptt = bj.tbptt_step(bj.cell_model(cell), step_loss, optax.sgd(0.0), k1=2, reduction="sum",
                        donate=False)
  state = bj.TrainState.create(params, optax.sgd(0.0), carry=carry)
  state, m = tbptt(state, {"xs": xs, "ys": ys, "lengths": TGT_LENGTHS})
  np.testing.assert_allclose(m["loss"].sum(), want, rtol=1e-5)
  np.testing.assert_array_equal(state.carry.memory, carry.memory)  # carried along, unchanged
  np.testing.assert_array_equal(state.carry.mask, MASK)

  _, norms = bj.gradient_flow(cell, p, xs, lambda hs: jnp.sum(hs[:, -1] ** 2), carry=carry)
  assert norms.shape == (B, T) and np.isfinite(np.asarray(norms)).all()
  assert (np.asarray(norms) > 0).all()  # input feeding: every a_t reaches the last step


def test_decoder_cell_errors_name_what_is_wrong():
  cell, p = decoder_and_params("luong_additive", F32)
  xs, memory, h0 = decoder_inputs(F32)
  with pytest.raises(ValueError, match="has no initial_carry: pass carry="):
    bj.unroll(cell, p, xs)
  with pytest.raises(ValueError, match="the carry must be an AttentionState"):
    bj.unroll(cell, p, xs, carry=bj.LSTMState(*h0))
  carry = bj.attention_carry(p, bj.LSTMState(*h0), memory[..., :5], lengths=LENGTHS)
  with pytest.raises(ValueError, match="memory has M = 5 features but the cell was built for"):
    bj.unroll(cell, p, xs, carry=carry)
  with pytest.raises(ValueError, match="cell's carry has batch size 2 but memory has B = 3"):
    bj.attention_carry(p, bj.LSTMState(h0[0][:2], h0[1][:2]), memory)
  with pytest.raises(ValueError, match="inputs have 3 features but the params expect D = 2"):
    bj.unroll(cell, p, np.zeros((B, T, 3), F32),
              carry=bj.attention_carry(p, bj.LSTMState(*h0), memory))
  with pytest.raises(ValueError, match="input_feeding is for style='luong'"):
    bj.attention_cell(bj.lstm(H), bj.dot_attention(), memory_size=M, input_feeding=True,
                      style="bahdanau")
  with pytest.raises(ValueError, match="style must be one of"):
    bj.attention_cell(bj.lstm(H), bj.dot_attention(), memory_size=M, style="other")
