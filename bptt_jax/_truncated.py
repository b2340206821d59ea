"""Truncated BPTT, explicit: TBPTT(k1, k2) as one jitted scan over chunks."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bptt_jax._common import (
    check_positive_int,
    select_steps,
    step_mask,
    where_rows,
)
from bptt_jax._model import (
    as_model,
    batch_shape,
    batch_xs_ys,
    carry_dtype,
    check_reduction,
    masked_sum,
    reduce_loss,
    settle_carry,
    start_carry,
)
from bptt_jax._training import TrainState, _check_tx, apply_gradients

Array = jax.Array


class StreamCarry(NamedTuple):
  """The streamed state of TBPTT(k1, k2 > k1): what the next batch's first window needs.

  The first window of a batch reaches ``k2 - k1`` steps back into the previous
  batch, so the state keeps the carry at that point and those steps' inputs.

  Attributes:
    carry: the model's carry ``k2 - k1`` steps before the end of the stream so far.
    xs: the inputs of those last ``k2 - k1`` steps, ``[B, k2 - k1, ...]`` (a PyTree
      like the batch's ``xs``).
    mask: ``[B, k2 - k1]`` booleans: which of those steps exist (false before
      the stream's start and after a reset).
  """

  carry: Any
  xs: Any
  mask: Array


def stream_carry(carry, xs, *, k1: int, k2: int | None = None):
  """The carry to start a stream of TBPTT(k1, k2) from.

  ``carry`` itself when ``k2 == k1``; for ``k2 > k1`` a :class:`StreamCarry`
  with no history (its ``k2 - k1`` steps masked), shaped after ``xs`` (a
  batch's inputs ``[B, T, ...]``, or a PyTree of them).

  Example::

      carry = bj.stream_carry(cell.initial_carry(B), batch["xs"], k1=25, k2=50)
      state = bj.TrainState.create(params, tx, carry=carry)
  """
  check_positive_int("k1", k1)
  front = 0 if k2 is None else k2 - k1
  if front < 0:
    raise ValueError(f"k2 must be >= k1, got k1={k1}, k2={k2}")
  if front == 0:
    return carry
  B, _ = batch_shape(xs)
  tail = jax.tree_util.tree_map(
      lambda a: jnp.zeros((B, front) + tuple(jnp.shape(a))[2:], jnp.result_type(a)), xs)
  return StreamCarry(carry, tail, jnp.zeros((B, front), bool))


def _nonfinite_rows(carry) -> Array:
  """``[B]``: rows of the carry holding a NaN or Inf."""
  bad = None
  for leaf in jax.tree_util.tree_leaves(carry):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      row = ~jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
      bad = row if bad is None else bad | row
  return bad


def _restart_nonfinite(carry, fresh):
  """Rows of the carry holding a NaN/Inf start again from ``fresh``."""
  bad = _nonfinite_rows(carry)
  return carry if bad is None else where_rows(bad, fresh, carry)


def _pad_time(tree, front, back, value=0):
  def pad(a):
    return jnp.pad(a, [(0, 0), (front, back)] + [(0, 0)] * (a.ndim - 2),
                   constant_values=value)
  return jax.tree_util.tree_map(pad, tree)


def _cat_time(head, tree):
  return jax.tree_util.tree_map(
      lambda h, a: jnp.concatenate([h.astype(a.dtype), a], axis=1), head, tree)


def tbptt_step(model, step_loss: Callable, tx: optax.GradientTransformation, *,
               k1: int, k2: int | None = None, reduction: str = "mean",
               max_norm: float | None = None, return_carries: bool = False,
               jit: bool = True, donate: bool = True, **unroll_kwargs):
  """Truncated BPTT(k1, k2): an optimizer update every ``k1`` steps, each
  backpropagating through the last ``k2 >= k1`` steps.

  The ``T`` steps of a batch are cut into ``N = ceil(T / k1)`` chunks. Update
  ``n`` runs the model over the window of ``k2`` steps that ends with chunk
  ``n``, starting from the carry at the window's start passed through
  ``jax.lax.stop_gradient`` (so no gradient crosses the cut), takes the loss
  on the window's last ``k1`` steps (chunk ``n``: every step's loss is counted
  exactly once), and applies one optax update. The forward state advances
  ``k1`` steps per update. ``k2 == k1`` (the default) is the common truncated
  BPTT with disjoint chunks (min-char-rnn, Keras ``stateful``); ``k2 > k1``
  gives every step's loss at least ``k2 - k1`` steps of history, across batch
  boundaries too when streaming (the state keeps the last ``k2 - k1`` steps:
  :class:`StreamCarry`), so streamed batches whose length is a multiple of
  ``k1`` give the same updates as one run over their concatenation. The whole
  pass is one ``lax.scan`` over chunks: no Python loop, no retrace per chunk.
  A last partial chunk (``T`` not a multiple of ``k1``) is padded and masked,
  never dropped (a stream then continues from the batch's end with no steps
  of history); steps before the stream's start are masked as well. Masked
  steps of ``xs`` and ``ys`` are selected out before the model sees them: NaN
  padding is harmless.

  Equivalent loop for ``k2 == k1``::

      for n in range(N):
        x, y = xs[:, n*k1:(n+1)*k1], ys[:, n*k1:(n+1)*k1]
        loss, grads = value_and_grad(chunk_loss)(params, stop_gradient(carry), x, y)
        params = optax update(params, grads)
        carry = state after the chunk (computed with the old params)

  Args:
    model: a :class:`bptt_jax.Model` (any ``apply(params, carry, xs, mask) ->
      (carry, outputs)``), or a cell, whose params then live at
      ``params["cell"]`` (:func:`bptt_jax.cell_model`).
    step_loss: ``step_loss(params, outputs [B, K, ...], ys [B, K, ...]) -> [B, K]``
      per-step losses (e.g. readout then :func:`bptt_jax.mse`).
    tx: optax optimizer; the state comes from ``TrainState.create``.
    k1: steps between updates (the chunk length ``K``).
    k2: steps backpropagated through per update; ``k1`` by default.
    reduction: ``"mean"`` (over the chunk's valid steps) or ``"sum"`` (over
      steps, mean over the batch), as in :func:`bptt_jax.sequence_loss`.
    max_norm: the clipping threshold, to report ``clipped``.
    return_carries: add ``metrics["carry"]``, the (stop-gradient) carry after
      each chunk, stacked over chunks.
    jit: compile with ``jax.jit``.
    donate: with ``jit``, donate the input state's buffers to the output state
      (the state passed in must not be used again).
    **unroll_kwargs: with a cell, settings for :func:`bptt_jax.unroll`
      (``fused``, ``hoist``, ``remat``, ``unroll``, ``dtype``).

  Returns:
    ``step(state, batch) -> (state, metrics)``. ``batch`` is a dict with
    ``"xs"`` and ``"ys"`` (PyTrees of ``[B, T, ...]`` arrays), and optionally
    ``"lengths"`` ``[B]`` or ``"mask"`` ``[B, T]`` and ``"reset"`` ``[B]``
    booleans. If ``state.carry`` is not ``None`` the batch continues from it
    (streaming; rows with ``reset``, e.g. at a document boundary, and rows
    whose carry turned non-finite start from the model's zeros) and the
    returned state holds the carry after the batch, in the dtype it came in;
    for ``k2 > k1`` it is a :class:`StreamCarry` (start one with
    :func:`stream_carry`). Otherwise every batch starts from zeros. Metrics are
    arrays over the ``N`` chunks: those of :func:`bptt_jax.apply_gradients`
    plus ``steps``, the number of loss terms in each chunk.

  Raises:
    ValueError: ``k1 <= 0``, ``k2 < k1``, unknown reduction, shapes that
      disagree, a streamed carry that is not a :class:`StreamCarry` when
      ``k2 > k1``.

  References:
    Williams and Peng 1990, "An efficient gradient-based algorithm for on-line
    training of recurrent network trajectories"; Sutskever 2013, "Training
    recurrent neural networks" (PhD thesis), section 2.8.6.
  """
  model = as_model(model, **unroll_kwargs)
  _check_tx(tx)
  check_positive_int("k1", k1)
  k2 = k1 if k2 is None else k2
  check_positive_int("k2", k2)
  if k2 < k1:
    raise ValueError(f"k2 must be >= k1 (backpropagate at least k1 steps), got k1={k1}, k2={k2}")
  check_reduction(reduction)
  front = k2 - k1

  def window_loss(params, carry, xw, yw, mw):
    c_mid, outs = model.apply(params, carry, _cut(xw, 0, k1), mw[:, :k1])
    c_end = c_mid
    if front:
      c_end, outs2 = model.apply(params, c_mid, _cut(xw, k1, k2), mw[:, k1:])
      outs = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=1), outs, outs2)
    lm = mw[:, front:]
    total = masked_sum(step_loss(params, _cut(outs, front, k2), _cut(yw, front, k2)), lm)
    count = jnp.sum(lm)
    return reduce_loss(total, count, lm.shape[0], reduction), (c_mid, c_end, count)

  def step(state: TrainState, batch):
    xs, ys = batch_xs_ys(batch)
    B, T = batch_shape(xs, ys)
    mask = step_mask(B, T, lengths=batch.get("lengths"), mask=batch.get("mask"))
    mask = jnp.ones((B, T), bool) if mask is None else mask
    xs, ys = select_steps(mask, (xs, ys))
    reset = batch.get("reset")
    if reset is not None:
      reset = jnp.asarray(reset, bool)
      if reset.shape != (B,):
        raise ValueError(f"reset must be [B] = ({B},), got {tuple(reset.shape)}")

    streaming = state.carry is not None
    dt = carry_dtype(model, state.params, xs)
    if not streaming:
      carry = start_carry(model, None, state.params, xs, B)
      fresh = carry
      history = stream_carry(carry, xs, k1=k1, k2=k2) if front else None
    else:
      history = state.carry
      if front and not isinstance(history, StreamCarry):
        raise ValueError(
            f"TBPTT(k1={k1}, k2={k2}) streams the last k2 - k1 = {front} steps too: "
            "start from bj.stream_carry(carry, batch['xs'], k1=k1, k2=k2), got a "
            f"{type(history).__name__}")
      if not front and isinstance(history, StreamCarry):
        raise ValueError("a StreamCarry is for k2 > k1; with k2 == k1 stream the carry itself")
      carry = start_carry(model, history.carry if front else history, state.params, xs, B)
      fresh = (model.initial_carry(B, dt) if model.initial_carry
               else jax.tree_util.tree_map(jnp.zeros_like, carry))
      restart = _nonfinite_rows(carry)
      if reset is not None:
        restart = reset if restart is None else restart | reset
      if restart is not None:
        carry = where_rows(restart, fresh, carry)
        if front:
          history = history._replace(mask=history.mask & ~restart[:, None])
    if front:
      if jax.tree_util.tree_structure(history.xs) != jax.tree_util.tree_structure(xs):
        raise ValueError("StreamCarry.xs must have the structure of the batch's xs")
      if history.mask.shape != (B, front):
        raise ValueError(
            f"StreamCarry.mask must be [B, k2 - k1] = {(B, front)}, got "
            f"{tuple(history.mask.shape)}")

    n_chunks = -(-T // k1)
    back = n_chunks * k1 - T
    if front:
      xs = _cat_time(history.xs, _pad_time(xs, 0, back))
      mask = jnp.concatenate([history.mask, _pad_time(mask, 0, back, False)], axis=1)
    else:
      xs, mask = _pad_time(xs, 0, back), _pad_time(mask, 0, back, False)
    ys = _pad_time(ys, front, back)

    first = _window(xs, 0, k1), mask[:, :k1]
    carry = settle_carry(model, state.params, carry, *first)
    fresh = settle_carry(model, state.params, fresh, *first)

    def body(loop, n):
      state, carry = loop
      cut = lambda tree: _window(tree, n * k1, k2)  # noqa: E731
      (loss, (c_mid, c_end, count)), grads = jax.value_and_grad(
          window_loss, has_aux=True)(state.params, jax.lax.stop_gradient(carry),
                                     cut(xs), cut(ys), cut(mask))
      state, metrics = apply_gradients(tx, state, loss, grads, max_norm=max_norm,
                                       skip=count == 0)
      metrics["steps"] = count
      c_mid, c_end = jax.lax.stop_gradient((c_mid, c_end))
      c_mid = _restart_nonfinite(c_mid, fresh)
      if return_carries:
        metrics["carry"] = _restart_nonfinite(c_end, fresh)  # after chunk n
      return (state, c_mid), metrics

    (state, carry), metrics = jax.lax.scan(body, (state, carry), jnp.arange(n_chunks))
    if streaming:
      carry = _like(carry, history.carry if front else history)
      if front:
        carry = StreamCarry(carry, _cut(xs, n_chunks * k1, n_chunks * k1 + front),
                            mask[:, n_chunks * k1:])
      state = state._replace(carry=carry)
    return state, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=0) if donate else jax.jit(step)


def _like(tree, reference):
  """``tree`` with each leaf cast to the dtype of ``reference``'s leaf."""
  return jax.tree_util.tree_map(lambda a, r: a.astype(jnp.result_type(r)), tree, reference)


def _cut(tree, start, stop):
  """Steps ``[start, stop)`` of every ``[B, T, ...]`` leaf."""
  return jax.tree_util.tree_map(lambda a: a[:, start:stop], tree)


def _window(tree, start, size):
  """``size`` steps from a traced ``start`` of every ``[B, T, ...]`` leaf."""
  return jax.tree_util.tree_map(
      lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), tree)
