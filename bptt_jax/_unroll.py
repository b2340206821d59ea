"""Running a cell over time with ``jax.lax.scan``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bptt_jax import _deer, _kernel, _linear_rnn
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
           unroll: int = 1, remat=None, fused: bool | None = None, dtype=None,
           method=None):
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
    method: how time is traversed. For a cell linear in its state
      (:func:`bptt_jax.min_gru`, :func:`bptt_jax.min_lstm`, :func:`bptt_jax.lru`):
      ``"parallel"`` (``jax.lax.associative_scan``, ``O(log T)`` depth) or
      ``"sequential"`` (``jax.lax.scan``), both with a hand-written backward
      pass that is the same scan reversed; default
      :func:`bptt_jax.default_linear_method` (sequential on CPU, where it
      measured faster; parallel on GPU/TPU). ``fused=False`` runs such a cell's
      plain step under ``lax.scan`` with autodiff instead. For the other cells:
      ``None``/``"sequential"`` (the scan over the step), ``"deer"`` or
      ``"quasi_deer"`` (Newton's method over the whole sequence, see
      :class:`bptt_jax.Deer`; pass a ``Deer(...)`` for its tolerance, iteration
      cap and fallback, and :func:`bptt_jax.deer_unroll` to read the iteration
      count). A stack applies ``method`` to every layer.

  Returns:
    ``(final_carry, hs)`` with ``hs`` ``[B, T, H]`` (``[T, B, H]`` if
    ``time_major``), both in the compute dtype.

  Raises:
    TypeError, ValueError: wrong rank, feature size, lengths shape/values, a
      missing carry for a cell without ``initial_carry``, settings that
      contradict each other (``fused=True`` with ``hoist=True`` or a cell
      without a fused path, ``reverse`` with a general ``mask``, a ``method``
      the cell has no path for).
  """
  check_positive_int("unroll", unroll)
  segments = lambda T: remat_segments(T, remat)  # noqa: E731
  make_run = lambda c, p: _runner(c, p, hoist=hoist, unroll=unroll, fused=fused,  # noqa: E731
                                  method=method)
  return _unroll(cell, params, xs, make_run, lengths=lengths, mask=mask, carry=carry,
                 time_major=time_major, reverse=reverse, dtype=dtype, segments=segments)


def _unroll(cell, params, xs, make_run, *, lengths, mask, carry, time_major, reverse, dtype,
            segments):
  """:func:`unroll`'s checks, casts, masking and reversal around ``make_run(cell, params)``."""
  cell = as_cell(cell)
  check_inputs(xs)
  xs = jnp.asarray(xs)
  T, B = xs.shape[:2] if time_major else xs.shape[1::-1]
  check_feature_size(cell, params, xs)
  dt = compute_dtype(params, dtype, fallback=xs.dtype)
  params, xs = cast_floats(params, dt), cast_floats(xs, dt)
  carry = initial_carry(cell, carry, B, dt)
  if mask is not None and reverse:
    raise ValueError("reverse=True needs lengths, not a general mask")
  given_mask = mask is not None
  mask = step_mask(B, T, lengths=lengths, mask=mask)
  if lengths is not None:
    lengths = check_lengths(lengths, B, T)
  n_segments = segments(T)
  run = make_run(cell, params)
  # A built-in cell's CPU kernel, where one applies: it takes lengths (not a general
  # mask), and reads [B, T, D] and writes [B, T, H] where they lie (no transposes) when
  # the steps run forward.
  kernel = getattr(run, "kernel", None)
  batch_major = not time_major and not reverse
  if not (kernel is not None and not given_mask and n_segments <= 1
          and _kernel.usable(kernel, params, xs, carry, None, batch_major=batch_major,
                             lengths=lengths is not None)):
    kernel = None
  if kernel is not None and batch_major:
    return _kernel.sequence(kernel, params, select_steps(mask, xs), carry, batch_major=True,
                            lengths=lengths)
  xs_tm = xs if time_major else jnp.swapaxes(xs, 0, 1)

  mask_tm = None if mask is None else jnp.swapaxes(mask, 0, 1)
  inputs = select_steps(mask_tm, xs_tm)
  if reverse:
    inputs = inputs[::-1] if lengths is None else _flip_within_lengths(inputs, lengths)
  if kernel is not None:
    carry, hs = _kernel.sequence(kernel, params, inputs, carry, lengths=lengths)
  else:
    carry, hs = _segmented(run, carry, inputs, mask_tm, n_segments)
  if reverse:
    hs = hs[::-1] if lengths is None else _flip_within_lengths(hs, lengths)
  return carry, (hs if time_major else jnp.swapaxes(hs, 0, 1))


def deer_unroll(cell, params, xs, *, method="deer", lengths=None, mask=None, carry=None,
                time_major: bool = False, reverse: bool = False, dtype=None):
  """:func:`unroll` by DEER or quasi-DEER, with what the solve did.

  The same as ``unroll(cell, params, xs, method=method, ...)``, and also
  returns the :class:`bptt_jax.DeerInfo` of the solve: the number of Newton
  iterations, the final residual ``max |s_t - f(s_{t-1}, x_t)|``, whether it
  converged and whether the sequential fallback gave the trajectory.

  Args:
    cell: a cell that is not linear in its state (the built-in RNN, GRU and
      LSTM, with or without layer norm, or a user cell whose carry leaves are
      ``[B, ...]`` arrays). Not a stack: run its layers one by one.
    params, xs, lengths, mask, carry, time_major, reverse, dtype: as in
      :func:`unroll`.
    method: ``"deer"``, ``"quasi_deer"`` or a :class:`bptt_jax.Deer`.

  Returns:
    ``(final_carry, hs, info)`` with ``hs`` ``[B, T, H]`` and ``info`` a
    :class:`bptt_jax.DeerInfo`.

  Raises:
    ValueError, TypeError: as :func:`unroll`; a stack or a linear cell; bad
      :class:`bptt_jax.Deer` settings.
  """
  cell = as_cell(cell)
  if cell.layers is not None or cell.linear is not None:
    raise ValueError(
        f"deer_unroll takes a single cell that is not linear in its state, got {cell.name}")
  deer = _deer.as_deer(method)
  infos = []

  def make_run(c, p):
    def run(carry, inputs, mask):
      carry, hs, info = _deer.run(c, deer, p, carry, inputs, mask)
      infos.append(info)
      return carry, hs
    return run

  carry, hs = _unroll(cell, params, xs, make_run, lengths=lengths, mask=mask, carry=carry,
                      time_major=time_major, reverse=reverse, dtype=dtype,
                      segments=lambda T: 1)
  return carry, hs, infos[0]


def _runner(cell, params, *, hoist, unroll, fused, method=None):
  """``run(carry, inputs [T, B, D], mask [T, B] | None) -> (carry, hs [T, B, H])``.

  Picks the path: a stack layer by layer, a linear recurrence's scan, DEER,
  the fused sequence, or ``lax.scan`` over the step (projection hoisted or per
  step). Masked inputs are zero.
  """
  if cell.layers is not None:
    if not isinstance(params, (tuple, list)) or len(params) != len(cell.layers):
      raise ValueError(
          f"{cell.name}: params must be a tuple with one entry per layer "
          f"({len(cell.layers)}), got {type(params).__name__}")
    runs = [_runner(c, p, hoist=hoist, unroll=unroll, fused=fused, method=method)
            for c, p in zip(cell.layers, params)]

    def run_layers(carry, inputs, mask):
      carries = []
      for run_layer, c in zip(runs, carry):
        c, inputs = run_layer(c, inputs, mask)
        carries.append(c)
      return tuple(carries), inputs

    return run_layers

  if cell.wraps is not None:
    inner, before, after = cell.wraps
    run_inner = _runner(inner, params["cell"], hoist=hoist, unroll=unroll, fused=fused,
                        method=method)

    def run_wrapped(carry, inputs, mask):
      us = before(params, inputs)
      if mask is not None:  # the inner cell's masked inputs are zeros, as the contract says
        us = where_rows(mask, us, jnp.zeros_like(us))
      carry, hs = run_inner(carry, us, mask)
      ys = after(params, inputs, hs)
      return carry, ys if mask is None else where_rows(mask, ys, jnp.zeros_like(ys))

    return run_wrapped

  special = _special_runner(cell, params, hoist=hoist, unroll=unroll, fused=fused,
                            method=method)
  if special is not None:
    return special
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

    run_fused.kernel = getattr(cell.sequence, "kernel", None)  # a built-in cell's kernel
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


def _special_runner(cell, params, *, hoist, unroll, fused, method):
  """The run of a linear recurrence or of a DEER solve; ``None`` for the ordinary paths."""
  if cell.linear is not None:
    if fused is False:
      if method is not None:
        raise ValueError(
            f"{cell.name}: fused=False runs the plain step under lax.scan with autodiff; "
            f"it takes no method (got {method!r})")
      return None
    if method is not None and not isinstance(method, str):
      raise ValueError(f"{cell.name} is linear in its state: method must be one of "
                       f"{_linear_rnn.METHODS} or None, got {method!r}")
    if method is not None:
      _linear_rnn.check_method(method)
    if hoist is False:
      raise ValueError(
          f"{cell.name}: the linear-recurrence path computes the input projection for all "
          "steps at once; hoist=False needs fused=False")

    def run_linear(carry, inputs, mask):
      chosen = method or _linear_rnn.default_method(inputs.shape[0])
      return _linear_rnn.run(cell.linear, params, carry, inputs, mask, chosen, unroll)

    return run_linear

  if method is None or method == "sequential":
    return None
  if method == "parallel":
    raise ValueError(
        f"{cell.name} is not linear in its state: method='parallel' is for min_gru, "
        "min_lstm and lru; use 'deer' or 'quasi_deer' for a parallel-in-time solve")
  deer = _deer.as_deer(method)
  if fused or hoist is not None or unroll != 1:
    raise ValueError(
        f"method={method!r} evaluates the step for all time steps at once: it takes "
        f"neither fused=True, hoist= nor unroll= (got fused={fused!r}, hoist={hoist!r}, "
        f"unroll={unroll!r})")

  def run_deer(carry, inputs, mask):
    carry, hs, _ = _deer.run(cell, deer, params, carry, inputs, mask)
    return carry, hs

  return run_deer


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
