"""Hand-written BPTT for the built-in cells: one ``jax.custom_vjp`` over the sequence.

Autodiff through ``lax.scan`` saves every intermediate of the step and does a
small weight-gradient matmul at every step of the backward loop. Here the
backward step is written as what it is, linear in ``dh`` (and ``dc``): the
forward step saves the coefficients of that linear map, the backward loop
carries only ``dh`` (and ``dc``) and writes each step's gate gradients ``dZ``
over the step's gate coefficients (read for the last time there), and the
weight gradients are then computed after the loop as large matmuls:
``dW = X^T dZ``, ``dU = H_prev^T dZ``, ``dX = dZ W^T``. Each loop body is a
few fused kernels and one matmul. The results equal autodiff to float
rounding (tested).

All arrays here are time-major; ``mask`` is ``None`` or ``[T, B, 1]``
booleans: where it is false the carry is kept and the output is zero, as in
:func:`bptt_jax.unroll`. Masked steps are selected out (``jnp.where``), never
multiplied by zero, and their inputs must already be zeros (``unroll`` does
that), so padding that holds NaN reaches no value and no gradient. ``unroll``
is ``jax.lax.scan``'s, for the forward and the backward loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bptt_jax._common import LSTMState

_sigmoid = jax.nn.sigmoid


def _shifted(first, stacked):
  """``[first, stacked[0], ..., stacked[T-2]]``: the value before each step."""
  return jnp.concatenate([first[None], stacked[:-1]], axis=0)


def _flat(a):
  return a.reshape(-1, a.shape[-1])


def _keep(m, new, old):
  """The carry after a step: ``new`` where the mask is on (no mask: always)."""
  return new if m is None else jnp.where(m, new, old)


def _on(m, a):
  """``a`` where the mask is on, 0 elsewhere."""
  return a if m is None else jnp.where(m, a, jnp.zeros((), a.dtype))


def _off(m, a):
  """``a`` where the mask is off, 0 elsewhere (nothing without a mask)."""
  return 0.0 if m is None else jnp.where(m, jnp.zeros((), a.dtype), a)


def _zeros_like(tree):
  return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _cotangents(primals, grads):
  """``grads`` with each leaf cast to its primal's dtype (as autodiff returns them).

  The last primal is the boolean mask (or ``None``): its cotangent is ``None``,
  a symbolic zero.
  """
  cast = jax.tree_util.tree_map(lambda p, g: g.astype(p.dtype), primals[:-1], grads)
  return (*cast, None)


# ----------------------------------------------------------------------------
# Vanilla RNN: h_t = f(x_t W + h_{t-1} U + b).


def _rnn_forward(config, params, xs, h0, mask):
  activation, unroll = config
  f = jnp.tanh if activation == "tanh" else jax.nn.relu
  WU = jnp.concatenate([params["W"], params["U"]], axis=0)

  def body(h, inp):
    x_t, m_t = inp
    h_new = f(jnp.concatenate([x_t, h], axis=-1) @ WU + params["b"][None])
    h = _keep(m_t, h_new, h)
    return h, (_on(m_t, h_new), None if m_t is None else h)

  h_T, (hs, carried) = jax.lax.scan(body, h0, (xs, mask), unroll=unroll)
  return h_T, hs, hs if carried is None else carried


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rnn_sequence(config, params, xs, h0, mask):
  """``(h_T, hs)`` for the vanilla RNN, with a hand-written backward pass.

  ``config`` is ``(activation, unroll)``.
  """
  h_T, hs, _ = _rnn_forward(config, params, xs, h0, mask)
  return h_T, hs


def _rnn_fwd(config, params, xs, h0, mask):
  h_T, hs, carried = _rnn_forward(config, params, xs, h0, mask)
  h_new = hs if mask is None else carried  # f(a_t) where the mask is on
  return (h_T, hs), (params, xs, h0, mask, h_new, _shifted(h0, carried))


def _rnn_bwd(config, res, cotangents):
  activation, unroll = config
  params, xs, h0, mask, h_new, h_prev = res
  dh_T, dys = cotangents
  U_T = params["U"].T

  def body(dh, inp):
    y_t, dy_t, m_t = inp
    fprime = (1.0 - y_t ** 2) if activation == "tanh" else (y_t > 0).astype(y_t.dtype)
    da = _on(m_t, dy_t + dh) * fprime
    return da @ U_T + _off(m_t, dh), da

  dh0, das = jax.lax.scan(body, dh_T, (h_new, dys, mask), reverse=True, unroll=unroll)
  grads = {
      "W": _flat(xs).T @ _flat(das),
      "U": _flat(h_prev).T @ _flat(das),
      "b": jnp.sum(das, axis=(0, 1)),
  }
  return _cotangents((params, xs, h0, mask), (
      {**_zeros_like(params), **grads}, das @ params["W"].T, dh0))


rnn_sequence.defvjp(_rnn_fwd, _rnn_bwd)


# ----------------------------------------------------------------------------
# LSTM, gates (i, f, g, o).


def _lstm_gates(z, H):
  """``[sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)]`` in one elementwise pass.

  ``tanh(x) = 2 sigmoid(2x) - 1``, so scaling the g block by 2 before and after
  one sigmoid over all four blocks gives every gate from a single fused loop.
  """
  ones = jnp.ones((H,), z.dtype)
  scale = jnp.concatenate([ones, ones, 2 * ones, ones])[None]
  return _sigmoid(z * scale) * scale - (scale - 1)


def _lstm_scan(unroll, params, xs, carry, mask, keep):
  """The forward loop; with ``keep``, also the backward coefficients of each step.

  The backward step is linear in ``(dh, dc)`` with coefficients that depend
  only on the forward pass, so the forward step saves them: the four gate
  derivatives ``K`` ``[B, 4H]`` (``dz = [dc, dc, dc, dh] * K``), and
  ``[o (1 - tanh(c)^2), f]`` ``[B, 2H]`` (``dh -> dc`` and ``dc -> dc_prev``).
  """
  H = params["U"].shape[0]

  def body(c, inp):
    x_t, m_t = inp
    z = x_t @ params["W"] + c.h @ params["U"] + params["b"][None]
    if keep:  # K needs every gate in one [B, 4H] layout: one pass over all four
      gates = _lstm_gates(z, H)
      i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
    else:  # per slice, fused into the state update (measured faster without a backward)
      zi, zf, zg, zo = (z[:, k * H:(k + 1) * H] for k in range(4))
      i, f, g, o = _sigmoid(zi), _sigmoid(zf), jnp.tanh(zg), _sigmoid(zo)
    c_new = f * c.c + i * g
    tc = jnp.tanh(c_new)
    h_new = o * tc
    new = c._replace(h=_keep(m_t, h_new, c.h), c=_keep(m_t, c_new, c.c))
    y = _on(m_t, h_new)
    if not keep:
      return new, y
    k = jnp.concatenate([
        g * i * (1.0 - i), c.c * f * (1.0 - f), i * (1.0 - g * g), tc * o * (1.0 - o)], axis=-1)
    of = jnp.concatenate([o * (1.0 - tc * tc), f], axis=-1)
    return new, (y, k, of, None if m_t is None else new.h)

  return jax.lax.scan(body, carry, (xs, mask), unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lstm_sequence(unroll, params, xs, carry, mask):
  """``(LSTMState at T, hs)`` for the LSTM, with a hand-written backward pass."""
  return _lstm_scan(unroll, params, xs, carry, mask, keep=False)


def _lstm_fwd(unroll, params, xs, carry, mask):
  final, (hs, ks, ofs, carried) = _lstm_scan(unroll, params, xs, carry, mask, keep=True)
  h_prev = _shifted(carry.h, hs if carried is None else carried)
  return (final, hs), (params, xs, carry.c, mask, ks, ofs, h_prev)


def _lstm_bwd(unroll, res, cotangents):
  params, xs, c0, mask, ks, ofs, h_prev = res
  (dh_T, dc_T), dys = cotangents
  H = params["U"].shape[0]
  U_T = params["U"].T

  def body(d, inp):
    dh, dc, buffer = d
    t, dy_t, m_t, of = inp
    dh_new = _on(m_t, dy_t + dh)
    dc_new = _on(m_t, dc) + dh_new * of[:, :H]
    k = jax.lax.dynamic_index_in_dim(buffer, t, keepdims=False)
    dz = jnp.concatenate([dc_new, dc_new, dc_new, dh_new], axis=-1) * k
    dh_prev = dz @ U_T + _off(m_t, dh)
    dc_prev = dc_new * of[:, H:] + _off(m_t, dc)
    return (dh_prev, dc_prev, jax.lax.dynamic_update_index_in_dim(buffer, dz, t, 0)), None

  # dZ_t overwrites K_t, the last read of it: no new [T, B, 4H] buffer.
  (dh0, dc0, dzs), _ = jax.lax.scan(
      body, (dh_T, dc_T, ks), (jnp.arange(xs.shape[0]), dys, mask, ofs), reverse=True,
      unroll=unroll)
  grads = {
      "W": _flat(xs).T @ _flat(dzs),
      "U": _flat(h_prev).T @ _flat(dzs),
      "b": jnp.sum(dzs, axis=(0, 1)),
  }
  return _cotangents((params, xs, LSTMState(c0, c0), mask), (
      {**_zeros_like(params), **grads}, dzs @ params["W"].T, LSTMState(dh0, dc0)))


lstm_sequence.defvjp(_lstm_fwd, _lstm_bwd)


# ----------------------------------------------------------------------------
# GRU (PyTorch form), gates (r, z, n).


def _gru_scan(unroll, params, xs, h0, mask, keep):
  """The forward loop; with ``keep``, also the backward coefficients of each step.

  Given ``dh`` at the new state, the step's gradients are ``dh`` times
  coefficients from the forward pass, saved as ``K = [K_r, K_z, K_un]``
  ``[B, 3H]`` and ``[K_n, z]`` ``[B, 2H]``: ``d(h U) = [dh, dh, dh] * K``,
  ``d(x W)_n = dh * K_n`` and ``dh_prev = d(h U) U^T + dh * z``.
  """
  H = params["U"].shape[0]

  def body(h, inp):
    x_t, m_t = inp
    a = x_t @ params["W"] + params["b"][None]
    u = h @ params["U"]
    rz = _sigmoid(a[:, :2 * H] + u[:, :2 * H])
    r, z = rz[:, :H], rz[:, H:]
    un = u[:, 2 * H:] + params["b_hn"][None]
    n = jnp.tanh(a[:, 2 * H:] + r * un)
    h_new = (1.0 - z) * n + z * h
    h_next = _keep(m_t, h_new, h)
    y = _on(m_t, h_new)
    if not keep:
      return h_next, y
    k_n = (1.0 - z) * (1.0 - n * n)
    k = jnp.concatenate([k_n * un * r * (1.0 - r), (h - n) * z * (1.0 - z), k_n * r], axis=-1)
    nz = jnp.concatenate([k_n, z], axis=-1)
    return h_next, (y, k, nz, None if m_t is None else h_next)

  return jax.lax.scan(body, h0, (xs, mask), unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gru_sequence(unroll, params, xs, h0, mask):
  """``(h_T, hs)`` for the GRU, with a hand-written backward pass."""
  return _gru_scan(unroll, params, xs, h0, mask, keep=False)


def _gru_fwd(unroll, params, xs, h0, mask):
  h_T, (hs, ks, nzs, carried) = _gru_scan(unroll, params, xs, h0, mask, keep=True)
  h_prev = _shifted(h0, hs if carried is None else carried)
  # h0 itself is not needed, only its dtype for the cotangent.
  return (h_T, hs), (params, xs, mask, ks, nzs, h_prev, jnp.zeros((0,), h0.dtype))


def _gru_bwd(unroll, res, cotangents):
  params, xs, mask, ks, nzs, h_prev, h0_dtype = res
  dh_T, dys = cotangents
  H = params["U"].shape[0]
  U_T = params["U"].T

  def body(d, inp):
    dh, buffer = d
    t, dy_t, m_t, nz = inp
    dh_new = _on(m_t, dy_t + dh)
    k = jax.lax.dynamic_index_in_dim(buffer, t, keepdims=False)
    du = jnp.concatenate([dh_new, dh_new, dh_new], axis=-1) * k  # d(h U)
    dh_prev = du @ U_T + dh_new * nz[:, H:] + _off(m_t, dh)
    return (dh_prev, jax.lax.dynamic_update_index_in_dim(buffer, du, t, 0)), dh_new

  # d(h U)_t overwrites K_t, the last read of it: no new [T, B, 3H] buffer.
  (dh0, dus), dh_news = jax.lax.scan(
      body, (dh_T, ks), (jnp.arange(xs.shape[0]), dys, mask, nzs), reverse=True,
      unroll=unroll)
  das = jnp.concatenate(  # d(x W + b): r and z as in d(h U), n without the reset gate
      [dus[..., :2 * H], dh_news * nzs[..., :H]], axis=-1)
  grads = {
      "W": _flat(xs).T @ _flat(das),
      "U": _flat(h_prev).T @ _flat(dus),
      "b": jnp.sum(das, axis=(0, 1)),
      "b_hn": jnp.sum(dus[..., 2 * H:], axis=(0, 1)),
  }
  return _cotangents((params, xs, h0_dtype, mask), (
      {**_zeros_like(params), **grads}, das @ params["W"].T, dh0))


gru_sequence.defvjp(_gru_fwd, _gru_bwd)
