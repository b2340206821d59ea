"""Running a cell over time with ``jax.lax.scan``."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax._cells import Cell, as_cell

Array = jax.Array


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_inputs(xs, name="xs", *, ndim=3) -> None:
  """Raises ``ValueError``/``TypeError`` unless ``xs`` is a float array of rank ``ndim``."""
  if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(xs).__name__}")
  if xs.ndim != ndim:
    raise ValueError(
        f"{name} must have rank {ndim} ([B, T, D] batch-major or [T, B, D] "
        f"time-major), got shape {tuple(xs.shape)}"
    )


def check_lengths(lengths, batch_size: int, num_steps: int) -> Array:
  """Checks ``lengths`` ``[B]`` against ``B`` and ``T``; returns it as int32.

  Raises:
    TypeError: non-integer lengths.
    ValueError: wrong shape, or (when the values are known at trace time) a
      length outside ``[0, T]``.
  """
  if not hasattr(lengths, "shape"):
    lengths = np.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
  if tuple(lengths.shape) != (batch_size,):
    raise ValueError(
        f"lengths must have shape [B] = ({batch_size},), got {tuple(lengths.shape)}"
    )
  if _is_concrete(lengths):
    values = np.asarray(lengths)
    if values.size and (values.min() < 0 or values.max() > num_steps):
      raise ValueError(
          f"lengths must lie in [0, T] = [0, {num_steps}], got values from "
          f"{values.min()} to {values.max()}"
      )
  return jnp.asarray(lengths, jnp.int32)


def length_mask(lengths: Array, num_steps: int) -> Array:
  """``[B, T]`` boolean mask, true where ``t < lengths[b]``."""
  return jnp.arange(num_steps)[None, :] < lengths[:, None]


def _check_feature_size(cell: Cell, params, xs) -> None:
  if cell.input_size is None:
    return
  expected = cell.input_size(params)
  if expected is not None and xs.shape[-1] != expected:
    raise ValueError(
        f"{cell.name}: inputs have {xs.shape[-1]} features but the params expect "
        f"D = {expected}"
    )


def _flip_within_lengths(xs_tm: Array, lengths: Array) -> Array:
  """Reverses each sequence of a time-major ``[T, B, ...]`` array within its length."""
  T = xs_tm.shape[0]
  t = jnp.arange(T)[:, None]
  idx = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # [T, B]
  idx = idx.reshape(idx.shape + (1,) * (xs_tm.ndim - 2))
  return jnp.take_along_axis(xs_tm, idx, axis=0)


def _where_tree(mask, new, old):
  return jax.tree_util.tree_map(
      lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o),
      new, old)


def default_hoist() -> bool:
  """Whether to hoist the input projection out of the scan by default.

  Hoisted (one ``[T*B, D] x [D, G*H]`` matmul before the loop) on GPU and TPU,
  as cuDNN does; per step inside the loop on CPU, where it measured faster.
  """
  return jax.default_backend() != "cpu"


def _segments(num_steps: int, remat) -> int:
  if remat is None or remat is False:
    return 1
  if remat is True or remat == "sqrt":
    return max(1, int(round(math.sqrt(num_steps))))
  if isinstance(remat, int) and not isinstance(remat, bool) and remat > 0:
    return min(remat, max(num_steps, 1))
  raise ValueError(
      f"remat must be None, True, 'sqrt' or a positive number of segments, got {remat!r}"
  )


def unroll(cell, params, xs, *, lengths=None, mask=None, carry=None,
           time_major: bool = False,
           reverse: bool = False, hoist: bool | None = None, unroll: int = 1,
           remat=None, fused: bool | None = None):
  """Runs ``cell`` over the time axis of ``xs`` with one ``jax.lax.scan``.

  Equivalent Python loop (batch-major, no lengths, forward)::

      carry = cell.initial_carry(B) if carry is None else carry
      for t in range(T):
        carry, hs[:, t] = cell.step(params, carry, xs[:, t])
      return carry, hs

  With ``lengths`` (right-padded batches) sequence ``b`` is stepped only for
  ``t < lengths[b]``: its carry stops changing after its last valid step (so the
  returned carry is the state at each sequence's own end) and its outputs are
  zero from there on. With ``reverse=True`` each sequence is read from its own
  last valid step back to step 0 and the outputs are returned in the original
  order (``hs[:, t]`` is the state after reading ``x_{T-1}`` ... ``x_t``).

  Args:
    cell: a :class:`Cell`, or a step function ``step(params, carry, x_t) ->
      (carry, h_t)`` (then ``carry`` is required).
    params: the cell's params.
    xs: inputs ``[B, T, D]`` (or ``[T, B, D]`` with ``time_major=True``).
    lengths: optional ``[B]`` integers in ``[0, T]``.
    mask: optional ``[B, T]`` booleans, a general form of ``lengths``: sequence
      ``b`` is stepped at ``t`` only where ``mask[b, t]``; elsewhere its carry is
      kept and its output is zero. Not with ``reverse``.
    carry: initial carry; zeros (``cell.initial_carry``) by default.
    time_major: take and return time-major arrays.
    reverse: run from the end of each sequence to its start.
    hoist: compute the input projection for all steps in one matmul before the
      loop (``True``) or per step inside it (``False``); default
      :func:`default_hoist`. Ignored for cells without a separate projection.
    unroll: passed to ``jax.lax.scan``.
    remat: memory-saving BPTT (Chen et al. 2016; Gruslys et al. 2016): split
      the ``T`` steps into segments (``"sqrt"``/``True`` for about ``sqrt(T)``,
      or an int), keep only the carry at each segment boundary for the backward
      pass, and recompute inside a segment. Same values and gradients.
    fused: use the cell's hand-written backward pass over the whole sequence
      (``cell.sequence``: the built-in RNN, LSTM and GRU without layer norm),
      which keeps only what the backward pass needs and computes the weight
      gradients as a few large matmuls after the loop. Default: when the cell
      has one and the projection is not hoisted. Its gradients equal autodiff's
      to float rounding; it is first-order only (no ``jax.hessian``): pass
      ``fused=False`` for higher derivatives.

  Returns:
    ``(final_carry, hs)`` with ``hs`` ``[B, T, H]`` (``[T, B, H]`` if
    ``time_major``).

  Raises:
    TypeError, ValueError: wrong rank, feature size, lengths shape/values, a
      missing carry for a cell without ``initial_carry``.
  """
  cell = as_cell(cell)
  check_inputs(xs)
  xs = jnp.asarray(xs)
  xs_tm = xs if time_major else jnp.swapaxes(xs, 0, 1)
  T, B = xs_tm.shape[:2]
  _check_feature_size(cell, params, xs_tm)
  if carry is None:
    if cell.initial_carry is None:
      raise ValueError(
          f"{cell.name} has no initial_carry: pass carry= to unroll"
      )
    carry = cell.initial_carry(B, xs.dtype)
  else:
    for leaf in jax.tree_util.tree_leaves(carry):
      if leaf.shape[0] != B:
        raise ValueError(
            f"carry has batch size {leaf.shape[0]} but xs has B = {B}"
        )
  if lengths is not None and mask is not None:
    raise ValueError("give lengths or mask, not both")
  if lengths is not None:
    lengths = check_lengths(lengths, B, T)
    mask = length_mask(lengths, T)
  elif mask is not None:
    if reverse:
      raise ValueError("reverse=True needs lengths, not a general mask")
    if tuple(mask.shape) != (B, T):
      raise ValueError(f"mask must have shape [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    mask = jnp.asarray(mask, bool)
  if hoist is None:
    hoist = default_hoist()
  segments = _segments(T, remat)
  if fused is None:
    fused = cell.sequence is not None and not hoist
  elif fused and cell.sequence is None:
    raise ValueError(f"{cell.name} has no fused sequence implementation; use fused=None")

  if fused:
    inputs = xs_tm
    run = _fused_runner(cell, params, xs.dtype)
  else:
    if cell.project is not None and hoist:
      inputs, body_step = cell.project(params, xs_tm), cell.recur
    else:
      inputs, body_step = xs_tm, cell.step
    run = _scan_runner(body_step, params, unroll)

  mask_tm = None if mask is None else jnp.swapaxes(mask, 0, 1)
  if reverse:
    if lengths is not None:
      inputs, mask_tm = _flip_within_lengths(inputs, lengths), mask_tm
    else:
      inputs = inputs[::-1]
  carry, hs = _segmented(run, carry, inputs, mask_tm, segments)
  if reverse:
    hs = _flip_within_lengths(hs, lengths) if lengths is not None else hs[::-1]
  return carry, (hs if time_major else jnp.swapaxes(hs, 0, 1))


def _scan_runner(body_step, params, unroll):
  """``run(carry, xs, mask) -> (carry, hs)`` with ``lax.scan`` over the step (time-major)."""

  def run(carry, inputs, mask):
    if mask is None:
      return jax.lax.scan(lambda c, x_t: body_step(params, c, x_t), carry, inputs,
                          unroll=unroll)

    def body(c, inp):
      x_t, m_t = inp
      new_c, h_t = body_step(params, c, x_t)
      return _where_tree(m_t, new_c, c), jnp.where(m_t[:, None], h_t, 0)

    return jax.lax.scan(body, carry, (inputs, mask), unroll=unroll)

  return run


def _fused_runner(cell, params, dtype):
  """``run`` with the cell's hand-written-backward sequence function."""

  def run(carry, inputs, mask):
    m = None if mask is None else mask[..., None].astype(dtype)
    return cell.sequence(params, inputs, carry, m)

  return run


def _segmented(run, carry, inputs, mask, segments):
  """``run(carry, inputs, mask)``, rematerialized per segment if ``segments > 1``.

  The segments are scanned with ``jax.checkpoint`` on each: the backward pass
  keeps only the carry at each segment boundary and recomputes the inside of a
  segment when it gets there.
  """
  if segments <= 1:
    return run(carry, inputs, mask)
  T = inputs.shape[0]
  size = -(-T // segments)
  segments = -(-T // size)
  pad = segments * size - T
  # Padded steps come after the data and are masked: the carry skips them.
  valid = jnp.broadcast_to((jnp.arange(segments * size) < T)[:, None],
                           (segments * size, inputs.shape[1]))
  mask = valid if mask is None else valid & jnp.pad(mask, [(0, pad), (0, 0)])
  inputs = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1))
  split = lambda a: a.reshape((segments, size) + a.shape[1:])  # noqa: E731

  @jax.checkpoint
  def segment(c, seg):
    return run(c, *seg)

  carry, hs = jax.lax.scan(segment, carry, (split(inputs), split(mask)))
  return carry, hs.reshape((segments * size,) + hs.shape[2:])[:T]


def bidirectional(forward_cell, backward_cell, params, xs, *, lengths=None,
                  carry=None, **kwargs):
  """Runs one cell forward and one backward over ``xs``; concatenates outputs.

  Args:
    forward_cell, backward_cell: cells.
    params: ``(forward_params, backward_params)``.
    xs: ``[B, T, D]``.
    lengths: optional ``[B]``; the backward cell starts at each sequence's end.
    carry: optional ``(forward_carry, backward_carry)``.
    **kwargs: passed to :func:`unroll`.

  Returns:
    ``((forward_carry, backward_carry), hs)`` with ``hs`` ``[B, T, H_f + H_b]``.
  """
  fc, bc = (None, None) if carry is None else carry
  f_carry, f_hs = unroll(forward_cell, params[0], xs, lengths=lengths,
                         carry=fc, **kwargs)
  b_carry, b_hs = unroll(backward_cell, params[1], xs, lengths=lengths,
                         carry=bc, reverse=True, **kwargs)
  return (f_carry, b_carry), jnp.concatenate([f_hs, b_hs], axis=-1)


def segmented_loss(cell, params, xs, ys, step_loss: Callable, *, lengths=None, carry=None,
                   segments="sqrt", reduction: str = "sum", **unroll_kwargs):
  """A sequence loss under full BPTT in O(sqrt(T)) memory (Chen et al. 2016).

  The ``T`` steps are cut into segments; each segment runs the cell, its
  per-step losses and their masked sum inside one ``jax.checkpoint``, so the
  backward pass keeps only the carry at each segment boundary (and the inputs)
  and recomputes a segment's activations when it reaches it. Unlike
  ``unroll(..., remat=...)``, which must return every hidden state, the hidden
  states ``[B, T, H]`` never exist in full. The loss and its gradient equal
  ``sequence_loss(step_loss(params, unroll(...)[1], ys), lengths=lengths)``.

  Args:
    cell: a cell; its params are ``params["cell"]``.
    params: a dict with the cell's params at ``"cell"`` and whatever
      ``step_loss`` reads.
    xs: inputs ``[B, T, D]``.
    ys: targets ``[B, T, ...]``.
    step_loss: ``step_loss(params, hs [B, K, H], ys [B, K, ...]) -> [B, K]``.
    lengths: optional ``[B]``.
    carry: initial carry; zeros by default.
    segments: ``"sqrt"`` (about ``sqrt(T)`` segments) or a number of segments.
    reduction: ``"sum"`` (over time, mean over the batch) or ``"mean"`` (over
      valid steps), as in :func:`bptt_jax.sequence_loss`.
    **unroll_kwargs: passed to :func:`unroll` for each segment (``fused``,
      ``hoist``).

  Returns:
    ``(loss, final_carry)``.

  References:
    Chen, Xu, Zhang and Guestrin 2016, "Training Deep Nets with Sublinear Memory
    Cost"; Gruslys, Munos, Danihelka, Lanctot and Graves 2016, "Memory-Efficient
    Backpropagation Through Time".
  """
  cell = as_cell(cell)
  check_inputs(xs)
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  B, T = xs.shape[:2]
  if ys.shape[:2] != (B, T):
    raise ValueError(f"ys must share [B, T] = {(B, T)} with xs, got {tuple(ys.shape)}")
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  for bad in ("lengths", "mask", "reverse", "remat", "time_major"):
    if bad in unroll_kwargs:
      raise ValueError(f"segmented_loss does not take {bad}= for its segments")
  mask = (jnp.ones((B, T), bool) if lengths is None
          else length_mask(check_lengths(lengths, B, T), T))
  if carry is None:
    if cell.initial_carry is None:
      raise ValueError(f"{cell.name} has no initial_carry: pass carry=")
    carry = cell.initial_carry(B, xs.dtype)
  n = _segments(T, segments)
  size = -(-T // n)
  n = -(-T // size)
  pad = n * size - T

  def split(a, value=0):
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=value)
    return jnp.swapaxes(a.reshape((B, n, size) + a.shape[2:]), 0, 1)  # [n, B, size, ...]

  @jax.checkpoint
  def segment(c, inp):
    x, y, m = inp
    c, hs = unroll(cell, params["cell"], x, mask=m, carry=c, **unroll_kwargs)
    losses = step_loss(params, hs, y)
    if losses.shape != m.shape:
      raise ValueError(f"step_loss must return [B, K] = {m.shape}, got {losses.shape}")
    return c, jnp.sum(jnp.where(m, losses, 0.0))

  carry, sums = jax.lax.scan(segment, carry, (split(xs), split(ys), split(mask, False)))
  total = jnp.sum(sums)
  loss = total / B if reduction == "sum" else total / jnp.maximum(jnp.sum(mask), 1)
  return loss, carry
