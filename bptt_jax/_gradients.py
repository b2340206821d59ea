"""Explicit BPTT for the vanilla RNN and gradient-flow diagnostics for any cell."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax._cells import _ACTIVATIONS, as_cell
from bptt_jax._common import (
    cast_floats,
    compute_dtype,
    select_steps,
    step_mask,
    where_rows,
)
from bptt_jax._unroll import check_feature_size, check_inputs, initial_carry

Array = jax.Array


class RNNGrads(NamedTuple):
  """What :func:`rnn_bptt` returns.

  Attributes:
    grads: ``{"W": [D, H], "U": [H, H], "b": [H]}``, summed over every step.
    dcarry: ``dL/dh_0`` for the initial carry, ``[B, H]``.
    dh: ``dL/dh_t`` (total: the loss at ``t`` and everything after it),
      ``[B, T, H]``.
    per_step: ``None``, or the contribution of each step to ``grads``:
      ``{"W": [T, D, H], "U": [T, H, H], "b": [T, H]}``; summed over ``T`` it
      gives ``grads``.
  """

  grads: dict
  dcarry: Array
  dh: Array
  per_step: dict | None


def _rnn_forward(params, xs_tm, h0, f, mask_tm):
  def body(h, inp):
    x_t, m_t = inp
    h_new = f(x_t @ params["W"] + h @ params["U"] + params["b"][None])
    h_new = where_rows(m_t, h_new, h)
    return h_new, h_new
  _, hs = jax.lax.scan(body, h0, (xs_tm, mask_tm))
  return hs


def rnn_bptt(params, xs, dhs, *, activation: str = "tanh", carry=None,
             lengths=None, per_step: bool = False) -> RNNGrads:
  r"""Backpropagation through time for ``h_t = f(x_t W + h_{t-1} U + b)``, by hand.

  A reverse ``lax.scan`` from ``t = T`` down to 1 (min-char-rnn's backward
  pass, done over a batch and accumulated correctly)::

      dh = dhs[t] + dh_next              # loss at t, and everything after t
      da = dh * f'(a_t)                  # tanh: 1 - h_t**2;  relu: h_t > 0
      dW += x_t^T da;  dU += h_{t-1}^T da;  db += sum_b da
      dh_next = da U^T

  The forward states are recomputed from ``xs``. Padded steps (``t >=
  lengths[b]``) copy the carry forward, so their gradient passes straight
  through and they contribute nothing to ``dW``, ``dU``, ``db``.

  Args:
    params: ``{"W": [D, H], "U": [H, H], "b": [H]}`` (e.g. from
      ``bptt_jax.rnn(H).init``; layer norm is not supported here).
    xs: inputs ``[B, T, D]``.
    dhs: the direct gradient of the loss with respect to each output,
      ``dL_t/dh_t`` ``[B, T, H]`` (e.g. ``jax.grad`` of the loss with respect to
      the hidden states, with no path through time).
    activation: ``"tanh"`` or ``"relu"``.
    carry: initial hidden state ``[B, H]``; zeros by default.
    lengths: optional ``[B]`` valid lengths.
    per_step: also return each step's contribution to the weight gradients.

  Returns:
    :class:`RNNGrads`.

  Raises:
    ValueError: unknown activation, or shapes that do not fit the params.
  """
  if activation not in _ACTIVATIONS:
    raise ValueError(
        f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
  for key in ("W", "U", "b"):
    if key not in params:
      raise ValueError(f"params must hold W, U and b, missing {key!r}")
  check_inputs(xs)
  B, T, D = xs.shape
  H = params["U"].shape[0]
  if params["W"].shape != (D, H):
    raise ValueError(
        f"W must be [D, H] = {(D, H)} for inputs with D = {D}, got "
        f"{tuple(params['W'].shape)}")
  if tuple(dhs.shape) != (B, T, H):
    raise ValueError(f"dhs must be [B, T, H] = {(B, T, H)}, got {tuple(dhs.shape)}")
  params, xs, dhs, h0, mask = _rnn_inputs(params, xs, carry, lengths, dhs)
  f = _ACTIVATIONS[activation]
  xs_tm, dhs_tm, mask_tm = (jnp.swapaxes(a, 0, 1) for a in (xs, dhs, mask))
  hs_tm = _rnn_forward(params, xs_tm, h0, f, mask_tm)
  hprev_tm = jnp.concatenate([h0[None], hs_tm[:-1]], axis=0)
  if activation == "tanh":
    fprime_tm = 1.0 - hs_tm ** 2
  else:
    fprime_tm = (hs_tm > 0).astype(hs_tm.dtype)
  U_T = params["U"].T

  def back(c, inp):
    dh_next, acc = c
    x_t, h_prev, fp, g_t, m_t = inp
    dh = g_t + dh_next
    da = where_rows(m_t, dh * fp, jnp.zeros_like(dh))
    step = {"W": x_t.T @ da, "U": h_prev.T @ da, "b": jnp.sum(da, axis=0)}
    acc = jax.tree_util.tree_map(lambda a, s: a + s.astype(a.dtype), acc, step)
    # A padded step copied h_{t-1} into h_t: its gradient flows through as is.
    dh_prev = da @ U_T + where_rows(m_t, jnp.zeros_like(dh), dh)
    return (dh_prev, acc), (dh, step if per_step else None)

  zeros = jax.tree_util.tree_map(jnp.zeros_like,
                                 {k: params[k] for k in ("W", "U", "b")})
  (dh0, grads), (dh_tm, steps) = jax.lax.scan(
      back, (jnp.zeros_like(h0), zeros),
      (xs_tm, hprev_tm, fprime_tm, dhs_tm, mask_tm), reverse=True)
  return RNNGrads(grads, dh0, jnp.swapaxes(dh_tm, 0, 1), steps)


def rnn_value_and_grad(params, xs, loss_of_hs: Callable[[Array], Array], *,
                       activation: str = "tanh", carry=None, lengths=None,
                       per_step: bool = False):
  """Loss and explicit-BPTT gradients of ``loss_of_hs(hs)`` for a vanilla RNN.

  Runs the forward pass, takes the direct gradients ``dL/dh_t`` of
  ``loss_of_hs`` with respect to the hidden states ``[B, T, H]`` (no path
  through time), and hands them to :func:`rnn_bptt`.

  Returns:
    ``(loss, RNNGrads)``.
  """
  check_inputs(xs)
  if activation not in _ACTIVATIONS:
    raise ValueError(
        f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
  p, xs_c, _, h0, mask = _rnn_inputs(params, xs, carry, lengths)
  hs_tm = _rnn_forward(p, jnp.swapaxes(xs_c, 0, 1), h0,
                       _ACTIVATIONS[activation], jnp.swapaxes(mask, 0, 1))
  hs = select_steps(mask, jnp.swapaxes(hs_tm, 0, 1))
  loss, dhs = jax.value_and_grad(loss_of_hs)(hs)
  return loss, rnn_bptt(params, xs, dhs, activation=activation, carry=h0,
                        lengths=lengths, per_step=per_step)


def _rnn_inputs(params, xs, carry, lengths, dhs=None):
  """Params, inputs (masked steps zero), ``dhs``, ``h0`` in the compute dtype; the mask.

  ``dhs`` is not masked: a gradient given at a padded step flows back through
  the copied carry (see :func:`rnn_bptt`).
  """
  B, T, _ = xs.shape
  dt = compute_dtype(params, fallback=xs.dtype)
  params = cast_floats({k: params[k] for k in ("W", "U", "b")}, dt)
  H = params["U"].shape[0]
  h0 = jnp.zeros((B, H), dt) if carry is None else cast_floats(carry, dt)
  mask = step_mask(B, T, lengths=lengths)
  mask = jnp.ones((B, T), bool) if mask is None else mask
  xs = select_steps(mask, cast_floats(jnp.asarray(xs), dt))
  return params, xs, cast_floats(dhs, dt), h0, mask


def _inexact(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _perturb(c, e):
  return c + e if _inexact(c) else c


def _perturbed_unroll(cell, params, xs_tm, eps, carry, mask_tm):
  """Unroll in which ``eps[t]`` is added to the carry right after step ``t``."""

  def body(c, inp):
    x_t, e_t, m_t = inp
    new_c, _ = cell.step(params, c, x_t)
    new_c = where_rows(m_t, jax.tree_util.tree_map(_perturb, new_c, e_t), c)
    h = cell.hidden(new_c)
    return new_c, where_rows(m_t, h, jnp.zeros_like(h))

  final, hs_tm = jax.lax.scan(body, carry, (xs_tm, eps, mask_tm))
  return final, hs_tm


def _prepare(cell, params, xs, carry, lengths):
  cell = as_cell(cell)
  check_inputs(xs)
  B, T, _ = xs.shape
  check_feature_size(cell, params, xs)
  dt = compute_dtype(params, fallback=xs.dtype)
  params = cast_floats(params, dt)
  carry = initial_carry(cell, carry, B, dt)
  mask = step_mask(B, T, lengths=lengths)
  mask = jnp.ones((B, T), bool) if mask is None else mask
  xs = select_steps(mask, cast_floats(jnp.asarray(xs), dt))
  # Integer and boolean leaves (a mask, a counter) are not perturbed: a [T]
  # placeholder keeps the tree's structure.
  eps = jax.tree_util.tree_map(
      lambda leaf: jnp.zeros((T,) + leaf.shape, leaf.dtype) if _inexact(leaf)
      else jnp.zeros((T,), dt), carry)
  return cell, params, jnp.swapaxes(xs, 0, 1), carry, jnp.swapaxes(mask, 0, 1), eps


def _norms(cell, deps_tm):
  """``[T, B, H]`` gradient (read with ``cell.hidden``) -> ``[B, T]`` norms."""
  g = jax.vmap(cell.hidden)(deps_tm)
  return jnp.swapaxes(jnp.sqrt(jnp.sum(g ** 2, axis=-1)), 0, 1)


def gradient_flow(cell, params, xs, loss_of_hs: Callable[[Array], Array], *,
                  carry=None, lengths=None):
  """The norm of ``dL/dh_t`` at every step, from one backward pass.

  ``dL/dh_t`` is the total derivative of the loss with respect to the hidden
  state at step ``t`` (the loss at ``t`` and everything after it, through the
  recurrence) — the quantity that vanishes or explodes as ``T - t`` grows
  (Bengio et al. 1994; Pascanu et al. 2013). It is measured by adding a zero
  perturbation to the carry after every step and differentiating the loss with
  respect to it; for an LSTM it is the ``h`` part (``c`` held fixed).

  Args:
    cell: any cell (a user cell needs ``hidden``, default: the carry itself).
    params: its params.
    xs: ``[B, T, D]``.
    loss_of_hs: ``loss_of_hs(hs [B, T, H]) -> scalar``.
    carry: initial carry; zeros by default.
    lengths: optional ``[B]``.

  Returns:
    ``(loss, norms)`` with ``norms`` ``[B, T]``: ``||dL/dh_t||`` per sequence.
  """
  cell, params, xs_tm, carry, mask_tm, eps = _prepare(cell, params, xs, carry, lengths)

  def loss_of_eps(eps):
    _, hs_tm = _perturbed_unroll(cell, params, xs_tm, eps, carry, mask_tm)
    return loss_of_hs(jnp.swapaxes(hs_tm, 0, 1))

  loss, deps = jax.value_and_grad(loss_of_eps)(eps)
  return loss, _norms(cell, deps)


def jacobian_norms(cell, params, xs, *, carry=None, lengths=None) -> Array:
  """Frobenius norm of ``dh_T/dh_t`` for every ``t``: ``[B, T]``.

  ``h_T`` is each sequence's final hidden state (at its own length). One
  backward pass per hidden unit (``vmap`` over the rows of the Jacobian).
  """
  cell, params, xs_tm, carry, mask_tm, eps = _prepare(cell, params, xs, carry, lengths)

  def final_h(eps):
    final, _ = _perturbed_unroll(cell, params, xs_tm, eps, carry, mask_tm)
    return cell.hidden(final)  # [B, H]

  h_T, vjp = jax.vjp(final_h, eps)
  H = h_T.shape[-1]
  rows = jnp.eye(H, dtype=h_T.dtype)[:, None, :] * jnp.ones_like(h_T)[None]

  def row(v):
    return _norms(cell, vjp(v)[0]) ** 2  # [B, T]

  return jnp.sqrt(jnp.sum(jax.lax.map(row, rows), axis=0))
