"""Running a cell over time with ``jax.lax.scan``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bptt_jax._cells import Cell, as_cell
from bptt_jax._common import (
  cast_floats,
  check_carry,
  check_lengths,
  check_positive_int,
  compute_dtype,
  select_steps,
  step_mask,
  where_rows,
)

Array = jax.Array


def check_inputs(xs, name="xs", *, ndim=3) -> None:
  """Raises ``ValueError``/``TypeError`` unless ``xs`` is an array of rank ``ndim``."""
  if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(xs).__name__}")
  if xs.ndim != ndim:
    raise ValueError(
        f"{name} must have rank {ndim} ([B, T, D] batch-major or [T, B, D] "
        f"time-major), got shape {tuple(xs.shape)}"
    )


def check_feature_size(cell: Cell, params, xs) -> None:
  if cell.input_size is None:
    return
  expected = cell.input_size(params)
  if expected is not None and xs.shape[-1] != expected:
    raise ValueError(
        f"{cell.name}: inputs have {xs.shape[-1]} features but the params expect "
        f"D = {expected}"
    )


def initial_carry(cell: Cell, carry, batch_size: int, dtype):
  """``carry`` (checked against ``B``, cast to ``dtype``) or the cell's zeros."""
  if carry is None:
    if cell.initial_carry is None:
      raise ValueError(f"{cell.name} has no initial_carry: pass carry=")
    return cell.initial_carry(batch_size, dtype)
  check_carry(carry, batch_size)
  return cast_floats(carry, dtype)


def _flip_within_lengths(xs_tm: Array, lengths: Array) -> Array:
  """Reverses each sequence of a time-major ``[T, B, ...]`` array within its length."""
  T = xs_tm.shape[0]
  t = jnp.arange(T)[:, None]
  idx = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # [T, B]
  idx = idx.reshape(idx.shape + (1,) * (xs_tm.ndim - 2))
  return jnp.take_along_axis(xs_tm, idx, axis=0)


def default_hoist() -> bool:
  """Whether to hoist the input projection out of the scan by default.

  Hoisted (one ``[T*B, D] x [D, G*H]`` matmul before the loop) on GPU and TPU,
  as cuDNN does; per step inside the loop on CPU, where it measured faster.
  """
  return jax.default_backend() != "cpu"


def remat_segments(num_steps: int, remat) -> int:
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
           time_major: bool = False, reverse: bool = False, hoist: bool | None = None,
           unroll: int = 1, remat=None, fused: bool | None = None, dtype=None):
  """Runs ``cell`` over the time axis of ``xs`` with one ``jax.lax.scan``.

  Equivalent Python loop (batch-major, no lengths, forward)::

      carry = cell.initial_carry(B) if carry is None else carry
      for t in range(T):
        carry, hs[:, t] = cell.step(params, carry, xs[:, t])
      return carry, hs

  With ``lengths`` (right-padded batches) sequence ``b`` is stepped only for
  ``t < lengths[b]``: its carry stops changing after its last valid step (so the
  returned carry is the state at each sequence's own end) and its outputs are
  zero from there on. Padded inputs are selected out before any arithmetic:
  padding that holds NaN or Inf changes neither the values nor the gradients
  (the gradient at a padded input is exactly zero). With ``reverse=True`` each
  sequence is read from its own last valid step back to step 0 and the outputs
  are returned in the original order (``hs[:, t]`` is the state after reading
  ``x_{T-1}`` ... ``x_t``).

  A :func:`bptt_jax.stack` runs layer by layer, each layer over the whole
  sequence on its own path (the hand-written backward pass for built-in cells).

  Dtypes: the computation runs in ``dtype`` if given, else in the params' float
  dtype. Params and floating inputs are cast to it (gradients come back in the
  params' own dtype) and the carry is kept in it, so float32 params with
  ``dtype=jnp.bfloat16`` compute in bf16, and bf16 inputs with float32 params
  and no ``dtype`` compute in float32.

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
      :func:`default_hoist`. A cell without a separate projection always
      projects per step. ``hoist=True`` selects the autodiff path for cells
      with a fused one (``fused=True`` with ``hoist=True`` is an error).
    unroll: steps per loop iteration, passed to ``jax.lax.scan`` (also on the
      fused path, forward and backward).
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
    dtype: the compute dtype (e.g. ``jnp.bfloat16``); the params' by default.

  Returns:
    ``(final_carry, hs)`` with ``hs`` ``[B, T, H]`` (``[T, B, H]`` if
    ``time_major``), both in the compute dtype.

  Raises:
    TypeError, ValueError: wrong rank, feature size, lengths shape/values, a
      missing carry for a cell without ``initial_carry``, settings that
      contradict each other (``fused=True`` with ``hoist=True`` or a cell
      without a fused path, ``reverse`` with a general ``mask``).
  """
  cell = as_cell(cell)
  check_inputs(xs)
  xs = jnp.asarray(xs)
  xs_tm = xs if time_major else jnp.swapaxes(xs, 0, 1)
  T, B = xs_tm.shape[:2]
  check_feature_size(cell, params, xs_tm)
  check_positive_int("unroll", unroll)
  dt = compute_dtype(params, dtype, fallback=xs.dtype)
  params, xs_tm = cast_floats(params, dt), cast_floats(xs_tm, dt)
  carry = initial_carry(cell, carry, B, dt)
  if mask is not None and reverse:
    raise ValueError("reverse=True needs lengths, not a general mask")
  mask = step_mask(B, T, lengths=lengths, mask=mask)
  if lengths is not None:
    lengths = check_lengths(lengths, B, T)
  segments = remat_segments(T, remat)
  run = _runner(cell, params, hoist=hoist, unroll=unroll, fused=fused)

  mask_tm = None if mask is None else jnp.swapaxes(mask, 0, 1)
  inputs = select_steps(mask_tm, xs_tm)
  if reverse:
    inputs = inputs[::-1] if lengths is None else _flip_within_lengths(inputs, lengths)
  carry, hs = _segmented(run, carry, inputs, mask_tm, segments)
  if reverse:
    hs = hs[::-1] if lengths is None else _flip_within_lengths(hs, lengths)
  return carry, (hs if time_major else jnp.swapaxes(hs, 0, 1))


def _runner(cell, params, *, hoist, unroll, fused):
  """``run(carry, inputs [T, B, D], mask [T, B] | None) -> (carry, hs [T, B, H])``.

  Picks the path: a stack layer by layer, the fused sequence, or ``lax.scan``
  over the step (projection hoisted or per step). Masked inputs are zero.
  """
  if cell.layers is not None:
    if not isinstance(params, (tuple, list)) or len(params) != len(cell.layers):
      raise ValueError(
          f"{cell.name}: params must be a tuple with one entry per layer "
          f"({len(cell.layers)}), got {type(params).__name__}")
    runs = [_runner(c, p, hoist=hoist, unroll=unroll, fused=fused)
            for c, p in zip(cell.layers, params)]

    def run_layers(carry, inputs, mask):
      carries = []
      for run_layer, c in zip(runs, carry):
        c, inputs = run_layer(c, inputs, mask)
        carries.append(c)
      return tuple(carries), inputs

    return run_layers

  if fused is None:
    fused = cell.sequence is not None and not (default_hoist() if hoist is None else hoist)
  elif fused:
    if cell.sequence is None:
      raise ValueError(f"{cell.name} has no fused sequence implementation; use fused=None")
    if hoist:
      raise ValueError(
          "the fused path projects the inputs per step: hoist=True needs fused=False "
          "(or fused=None)")
  if fused:
    def run_fused(carry, inputs, mask):
      return cell.sequence(params, inputs, carry, None if mask is None else mask[..., None],
                           unroll)

    return run_fused

  if hoist is None:
    hoist = default_hoist()
  if cell.project is not None and hoist:
    project, body_step = (lambda xs: cell.project(params, xs)), cell.recur
  else:
    project, body_step = (lambda xs: xs), cell.step

  def run_scan(carry, inputs, mask):
    inputs = project(inputs)
    if mask is None:
      return jax.lax.scan(lambda c, x_t: body_step(params, c, x_t), carry, inputs,
                          unroll=unroll)

    def body(c, inp):
      x_t, m_t = inp
      new_c, h_t = body_step(params, c, x_t)
      return where_rows(m_t, new_c, c), where_rows(m_t, h_t, jnp.zeros_like(h_t))

    return jax.lax.scan(body, carry, (inputs, mask), unroll=unroll)

  return run_scan


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


def bidirectional_stack(layers, params, xs, *, lengths=None, carry=None, **kwargs):
  """Stacked bidirectional layers, as PyTorch's ``bidirectional=True`` with ``num_layers > 1``.

  Layer ``l`` runs its forward cell and its backward cell (from each
  sequence's own end) over its input with :func:`bidirectional`; their
  outputs, concatenated, are the input of layer ``l + 1``.

  Args:
    layers: a sequence of ``(forward_cell, backward_cell)`` pairs, bottom first.
    params: a matching sequence of ``(forward_params, backward_params)``.
    xs: ``[B, T, D]``.
    lengths: optional ``[B]``.
    carry: optional sequence of ``(forward_carry, backward_carry)`` per layer.
    **kwargs: passed to :func:`unroll`.

  Returns:
    ``(carries, hs)``: a tuple of ``(forward_carry, backward_carry)`` per layer
    and the top layer's ``hs`` ``[B, T, H_f + H_b]``.

  Raises:
    ValueError: ``params`` (or ``carry``) of another length than ``layers``, or
      a layer that is not a pair.
  """
  layers = tuple(layers)
  for what, seq in (("params", params), ("carry", carry)):
    if seq is not None and len(seq) != len(layers):
      raise ValueError(
          f"bidirectional_stack: {what} must hold one entry per layer ({len(layers)}), "
          f"got {len(seq)}")
  carries = []
  for l, pair in enumerate(layers):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(
          f"bidirectional_stack: layer {l} must be a (forward_cell, backward_cell) pair, "
          f"got {type(pair).__name__}")
    c, xs = bidirectional(*pair, params[l], xs, lengths=lengths,
                          carry=None if carry is None else carry[l], **kwargs)
    carries.append(c)
  return tuple(carries), xs
