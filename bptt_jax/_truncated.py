"""Truncated BPTT, explicit: TBPTT(k1, k2) as one jitted scan over chunks."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bptt_jax._cells import as_cell
from bptt_jax._training import TrainState, _check_tx, apply_gradients
from bptt_jax._unroll import check_lengths, length_mask, unroll

Array = jax.Array


def _positive_int(name, v):
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ValueError(f"{name} must be a positive int, got {v!r}")


def _reset_nonfinite(carry, initial):
  """Rows of the carry holding a NaN/Inf start again from the initial carry."""
  leaves = jax.tree_util.tree_leaves(carry)
  bad = jnp.zeros(leaves[0].shape[0], bool)
  for leaf in leaves:
    bad = bad | ~jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
  return _where_rows(bad, initial, carry)


def _where_rows(rows, a, b):
  return jax.tree_util.tree_map(
      lambda x, y: jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def _carry_dtype(params, xs):
  """The float dtype of the carry: the widest of the float params and inputs.

  A cell step promotes its carry with these, so a carry of this dtype keeps
  its type through ``lax.scan`` (float64 under ``jax_enable_x64``).
  """
  leaves = jax.tree_util.tree_leaves(params) + [xs]
  floats = [jnp.result_type(a) for a in leaves
            if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
  return jnp.result_type(*floats) if floats else jnp.float32


def _pad_time(a, front, back, value=0):
  widths = [(0, 0), (front, back)] + [(0, 0)] * (a.ndim - 2)
  return jnp.pad(a, widths, constant_values=value)


def tbptt_step(cell, step_loss: Callable, tx: optax.GradientTransformation, *,
               k1: int, k2: int | None = None, reduction: str = "mean",
               encode: Callable | None = None, max_norm: float | None = None,
               return_carries: bool = False, jit: bool = True, **unroll_kwargs):
  """Truncated BPTT(k1, k2): an optimizer update every ``k1`` steps, each
  backpropagating through the last ``k2 >= k1`` steps.

  The ``T`` steps of a batch are cut into ``N = ceil(T / k1)`` chunks. Update
  ``n`` runs the cell over the window of ``k2`` steps that ends with chunk
  ``n``, starting from the carry at the window's start passed through
  ``jax.lax.stop_gradient`` (so no gradient crosses the cut), takes the loss
  on the window's last ``k1`` steps (chunk ``n``: every step's loss is counted
  exactly once), and applies one optax update. The forward state advances
  ``k1`` steps per update. ``k2 == k1`` (the default) is the common truncated
  BPTT with disjoint chunks (min-char-rnn, Keras ``stateful``); ``k2 > k1``
  gives every step's loss at least ``k2 - k1`` steps of history. The whole
  pass is one ``lax.scan`` over chunks: no Python loop, no retrace per chunk.
  A last partial chunk (``T`` not a multiple of ``k1``) is padded and masked,
  never dropped; steps before the first window are masked as well.

  Equivalent loop for ``k2 == k1``::

      for n in range(N):
        x, y = xs[:, n*k1:(n+1)*k1], ys[:, n*k1:(n+1)*k1]
        loss, grads = value_and_grad(chunk_loss)(params, stop_gradient(carry), x, y)
        params = optax update(params, grads)
        carry = state after the chunk (computed with the old params)

  Args:
    cell: a :class:`bptt_jax.Cell` (or step function); its params live at
      ``params["cell"]``.
    step_loss: ``step_loss(params, hs [B, K, H], ys [B, K, ...]) -> [B, K]``
      per-step losses (e.g. readout then :func:`bptt_jax.mse`).
    tx: optax optimizer; the state comes from ``TrainState.create``.
    k1: steps between updates (the chunk length ``K``).
    k2: steps backpropagated through per update; ``k1`` by default.
    reduction: ``"mean"`` (over the chunk's valid steps) or ``"sum"`` (over
      steps, mean over the batch), as in :func:`bptt_jax.sequence_loss`.
    encode: optional ``encode(params, xs_window) -> [B, k2, D]`` applied to
      the inputs of each window (embedding, one-hot).
    max_norm: the clipping threshold, to report ``clipped``.
    return_carries: add ``metrics["carry"]``, the (stop-gradient) carry after
      each chunk, stacked over chunks.
    jit: compile with ``jax.jit``.
    **unroll_kwargs: passed to :func:`bptt_jax.unroll` (``hoist``, ``remat``,
      ``unroll``).

  Returns:
    ``step(state, batch) -> (state, metrics)``. ``batch`` is a dict with
    ``"xs"`` ``[B, T, ...]``, ``"ys"`` ``[B, T, ...]``, and optionally
    ``"lengths"`` ``[B]`` or ``"mask"`` ``[B, T]`` and ``"reset"`` ``[B]``
    booleans. If ``state.carry`` is not ``None`` the batch continues from it
    (streaming; rows with ``reset`` start from zeros, e.g. at a document
    boundary) and the returned state holds the carry after the batch;
    otherwise every batch starts from zeros. Metrics are arrays over the
    ``N`` chunks: those of :func:`bptt_jax.apply_gradients` plus ``steps``, the
    number of loss terms in each chunk.

  Raises:
    ValueError: ``k1 <= 0``, ``k2 < k1``, unknown reduction, shapes that
      disagree.

  References:
    Williams and Peng 1990, "An efficient gradient-based algorithm for on-line
    training of recurrent network trajectories"; Sutskever 2013, "Training
    recurrent neural networks" (PhD thesis), section 2.8.6.
  """
  cell = as_cell(cell)
  _check_tx(tx)
  _positive_int("k1", k1)
  k2 = k1 if k2 is None else k2
  _positive_int("k2", k2)
  if k2 < k1:
    raise ValueError(f"k2 must be >= k1 (backpropagate at least k1 steps), got k1={k1}, k2={k2}")
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  if "lengths" in unroll_kwargs or "mask" in unroll_kwargs or "reverse" in unroll_kwargs:
    raise ValueError("lengths/mask go in the batch; reverse is not supported by tbptt")
  front = k2 - k1

  def window_loss(params, carry, xw, yw, mw):
    xw = encode(params, xw) if encode is not None else xw
    c_mid, hs = unroll(cell, params["cell"], xw[:, :k1], mask=mw[:, :k1],
                       carry=carry, **unroll_kwargs)
    c_end = c_mid
    if front:
      c_end, hs2 = unroll(cell, params["cell"], xw[:, k1:], mask=mw[:, k1:],
                          carry=c_mid, **unroll_kwargs)
      hs = jnp.concatenate([hs, hs2], axis=1)
    losses = step_loss(params, hs[:, front:], yw[:, front:])
    lm = mw[:, front:]
    if losses.shape != lm.shape:
      raise ValueError(
          f"step_loss must return per-step losses [B, K] = {lm.shape}, got {losses.shape}")
    total = jnp.sum(jnp.where(lm, losses, 0.0))
    count = jnp.sum(lm)
    loss = total / (jnp.maximum(count, 1) if reduction == "mean" else lm.shape[0])
    return loss, (c_mid, c_end, count)

  def step(state: TrainState, batch):
    if not isinstance(batch, dict) or "xs" not in batch or "ys" not in batch:
      raise TypeError("batch must be a dict with 'xs' [B, T, ...] and 'ys' [B, T, ...]")
    xs, ys = batch["xs"], batch["ys"]
    if xs.ndim < 2 or ys.ndim < 2 or xs.shape[:2] != ys.shape[:2]:
      raise ValueError(
          f"xs and ys must share [B, T], got {tuple(xs.shape)} and {tuple(ys.shape)}")
    B, T = xs.shape[:2]
    if batch.get("lengths") is not None:
      mask = length_mask(check_lengths(batch["lengths"], B, T), T)
    elif batch.get("mask") is not None:
      mask = jnp.asarray(batch["mask"], bool)
      if mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    else:
      mask = jnp.ones((B, T), bool)
    n_chunks = -(-T // k1)
    back = n_chunks * k1 - T
    xs, ys = _pad_time(xs, front, back), _pad_time(ys, front, back)
    mask = _pad_time(mask, front, back, False)

    dtype = _carry_dtype(state.params, xs)
    initial = cell.initial_carry(B, dtype) if cell.initial_carry else None
    reset = batch.get("reset")
    if reset is not None:
      reset = jnp.asarray(reset, bool)
      if reset.shape != (B,):
        raise ValueError(f"reset must be [B] = ({B},), got {tuple(reset.shape)}")
    carry = state.carry
    if carry is None:
      if initial is None:
        raise ValueError(f"{cell.name} has no initial_carry: give the state a carry")
      carry = initial
    else:
      for leaf in jax.tree_util.tree_leaves(carry):
        if leaf.shape[0] != B:
          raise ValueError(f"state.carry has batch size {leaf.shape[0]}, batch has B = {B}")
      if initial is not None:
        carry = _reset_nonfinite(carry, initial)
        if reset is not None:
          carry = _where_rows(reset, initial, carry)

    def body(loop, n):
      state, carry = loop
      cut = lambda a: jax.lax.dynamic_slice_in_dim(a, n * k1, k2, axis=1)  # noqa: E731
      (loss, (c_mid, c_end, count)), grads = jax.value_and_grad(
          window_loss, has_aux=True)(state.params, jax.lax.stop_gradient(carry),
                                     cut(xs), cut(ys), cut(mask))
      state, metrics = apply_gradients(tx, state, loss, grads, max_norm=max_norm,
                                       skip=count == 0)
      metrics["steps"] = count
      c_mid, c_end = jax.lax.stop_gradient((c_mid, c_end))
      if initial is not None:
        c_mid, c_end = _reset_nonfinite(c_mid, initial), _reset_nonfinite(c_end, initial)
      if return_carries:
        metrics["carry"] = c_end  # after chunk n (c_mid is k2 - k1 steps earlier)
      return (state, c_mid), (metrics, c_end)

    (state, _), (metrics, c_ends) = jax.lax.scan(
        body, (state, carry), jnp.arange(n_chunks))
    if state.carry is not None:
      state = state._replace(carry=jax.tree_util.tree_map(lambda a: a[-1], c_ends))
    return state, metrics

  return jax.jit(step) if jit else step
