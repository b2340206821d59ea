"""The model contract every training path takes, and full BPTT in O(sqrt(T)) memory.

A :class:`Model` is anything that runs a chunk of a sequence from a carry:
``apply(params, carry, xs [B, K, ...], mask [B, K]) -> (carry, outputs [B, K,
...])``. A cell is the easy case (:func:`cell_model`); an embedding + stacked
cells + readout, an encoder feeding a decoder, or two RNNs side by side are
models too. :func:`bptt_jax.tbptt_step`, :func:`segmented_loss` and
:func:`model_loss` (for :func:`bptt_jax.train_step`) take a model and nothing
else about its structure: where its params live is its own business.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax._cells import Cell, as_cell
from bptt_jax._common import (
    cast_floats,
    check_carry,
    compute_dtype,
    select_steps,
    step_mask,
)
from bptt_jax._unroll import remat_segments, unroll

Array = jax.Array

_NOT_FOR_MODELS = ("lengths", "mask", "carry", "reverse", "time_major")


class Model(NamedTuple):
  """A sequence model for training: pure functions, no arrays.

  Attributes:
    apply: ``apply(params, carry, xs, mask) -> (carry, outputs)`` over one
      chunk: ``xs`` a PyTree of ``[B, K, ...]`` arrays (masked steps hold
      zeros), ``mask`` ``[B, K]`` booleans; where ``mask[b, t]`` is false the
      carry of row ``b`` must not change (outputs there are ignored).
      ``outputs`` is whatever the per-step loss reads (``[B, K, ...]``).
    initial_carry: optional ``initial_carry(batch_size, dtype) -> carry``
      (zeros); without it a carry must be given, and rows are restarted from
      zeros.
    dtype: the compute dtype (e.g. ``jnp.bfloat16``); ``None``: the params'
      float dtype. The carry is kept in it.
    name: a short name for messages.
  """

  apply: Callable[[Any, Any, Any, Array], tuple[Any, Any]]
  initial_carry: Callable[[int, Any], Any] | None = None
  dtype: Any = None
  name: str = "model"


def cell_model(cell, *, params_key: str | None = "cell", **unroll_kwargs) -> Model:
  """A cell as a model: ``unroll(cell, params[params_key], xs, mask=mask, carry=carry)``.

  Args:
    cell: a :class:`bptt_jax.Cell` (a stack too) or a step function.
    params_key: where the cell's params live in the model's params (a dict);
      ``None`` when the params are the cell's own.
    **unroll_kwargs: settings for :func:`bptt_jax.unroll` (``fused``,
      ``hoist``, ``unroll``, ``remat``, ``dtype``).

  Returns:
    A :class:`Model` whose outputs are the hidden states ``[B, K, H]``.

  Raises:
    ValueError: an unroll setting that the training paths set themselves.
  """
  cell = as_cell(cell)
  for bad in _NOT_FOR_MODELS:
    if bad in unroll_kwargs:
      raise ValueError(
          f"{bad}= is set by the training path for each chunk, not by the model")

  def apply(params, carry, xs, mask):
    p = params if params_key is None else params[params_key]
    return unroll(cell, p, xs, mask=mask, carry=carry, **unroll_kwargs)

  return Model(apply=apply, initial_carry=cell.initial_carry,
               dtype=unroll_kwargs.get("dtype"), name=cell.name)


def as_model(model, **unroll_kwargs) -> Model:
  """A :class:`Model` as is; a cell (or step function) as :func:`cell_model`.

  A bare cell reads its params at ``params["cell"]`` (the short form); use
  :func:`cell_model` for another place.

  Raises:
    ValueError: unroll settings given with a :class:`Model` (they belong to
      the model).
    TypeError: neither a model nor a cell.
  """
  if isinstance(model, Model):
    if unroll_kwargs:
      raise ValueError(
          f"unroll settings {sorted(unroll_kwargs)} are given to cell_model(...), "
          "not with a Model")
    return model
  if isinstance(model, Cell) or callable(model):
    return cell_model(model, **unroll_kwargs)
  raise TypeError(f"expected a bptt_jax.Model or a Cell, got {type(model).__name__}")


def batch_shape(xs, ys=None) -> tuple[int, int]:
  """``(B, T)`` shared by every leaf of ``xs`` (and ``ys``).

  Raises:
    ValueError: a leaf of rank < 2 or leaves that disagree on ``[B, T]``.
  """
  leaves = jax.tree_util.tree_leaves((xs, ys))
  if not leaves:
    raise ValueError("xs holds no arrays")
  shapes = [tuple(jnp.shape(a)) for a in leaves]
  if any(len(s) < 2 for s in shapes) or len({s[:2] for s in shapes}) != 1:
    raise ValueError(
        f"xs and ys must share [B, T] (every leaf [B, T, ...]), got shapes {shapes}")
  return shapes[0][:2]


def loss_dtype(losses: Array):
  """At least float32 for sums of per-step losses (bf16 losses are summed in float32)."""
  return jnp.promote_types(losses.dtype, jnp.float32)


def masked_sum(losses: Array, mask: Array) -> Array:
  """``sum(losses)`` over the steps where ``mask`` ``[B, K]`` is true, by selection."""
  if losses.shape != mask.shape:
    raise ValueError(
        f"step_loss must return per-step losses [B, K] = {mask.shape}, got "
        f"{tuple(losses.shape)}")
  losses = losses.astype(loss_dtype(losses))
  return jnp.sum(jnp.where(mask, losses, jnp.zeros((), losses.dtype)))


def reduce_loss(total: Array, count: Array, batch_size: int, reduction: str) -> Array:
  """``"sum"``: total over the batch size; ``"mean"``: total over the valid steps."""
  if reduction == "sum":
    return total / batch_size
  return total / jnp.maximum(count, 1)


def check_reduction(reduction: str) -> None:
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _float_dtype(tree):
  for a in jax.tree_util.tree_leaves(tree):
    if jnp.issubdtype(a.dtype, jnp.floating):
      return a.dtype
  return None


def carry_dtype(model: Model, params, xs):
  """The compute dtype, which the carry is kept in: the model's, else the params'."""
  return compute_dtype(params, model.dtype, fallback=_float_dtype(xs))


def start_carry(model: Model, carry, params, xs, batch_size: int):
  """The carry to start from, in the compute dtype: ``carry`` cast, or the model's zeros."""
  dt = carry_dtype(model, params, xs)
  if carry is None:
    if model.initial_carry is None:
      raise ValueError(
          f"{model.name} has no initial_carry: pass a carry (to tbptt_step: the state's "
          "carry)")
    return model.initial_carry(batch_size, dt)
  check_carry(carry, batch_size)
  return cast_floats(carry, dt)


def settle_carry(model: Model, params, carry, xs_chunk, mask_chunk):
  """``carry`` cast to the dtypes ``model.apply`` returns it in, so that a loop
  over chunks keeps one carry type whatever the model computes in (a model may
  run parts of its params in another dtype)."""
  out = jax.eval_shape(lambda c: model.apply(params, c, xs_chunk, mask_chunk)[0], carry)
  if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(carry):
    raise ValueError(
        f"{model.name}: apply must return a carry of the structure it takes, got "
        f"{jax.tree_util.tree_structure(out)} for {jax.tree_util.tree_structure(carry)}")
  return jax.tree_util.tree_map(lambda c, o: c.astype(o.dtype), carry, out)


def segmented_loss(model, params, xs, ys, step_loss: Callable, *, lengths=None, mask=None,
                   carry=None, remat="sqrt", reduction: str = "sum", **unroll_kwargs):
  """A sequence loss under full BPTT in O(sqrt(T)) memory (Chen et al. 2016).

  The ``T`` steps are cut into segments; each segment runs the model, its
  per-step losses and their masked sum inside one ``jax.checkpoint``, so the
  backward pass keeps only the carry at each segment boundary (and the inputs)
  and recomputes a segment's activations when it reaches it. Unlike
  ``unroll(..., remat=...)``, which must return every hidden state, the hidden
  states ``[B, T, H]`` never exist in full. The loss and its gradient equal
  ``sequence_loss(step_loss(params, outputs, ys), lengths=lengths)`` over the
  whole sequence. Masked steps of ``xs`` and ``ys`` are selected out first:
  NaN padding reaches neither the loss nor its gradient.

  Args:
    model: a :class:`Model`, or a cell (its params at ``params["cell"]``).
    params: the model's params, also passed to ``step_loss``.
    xs: inputs, a PyTree of ``[B, T, ...]`` arrays.
    ys: targets, a PyTree of ``[B, T, ...]`` arrays.
    step_loss: ``step_loss(params, outputs [B, K, ...], ys [B, K, ...]) -> [B, K]``.
    lengths: optional ``[B]``.
    mask: optional ``[B, T]`` booleans (instead of ``lengths``).
    carry: initial carry; the model's zeros by default.
    remat: ``"sqrt"`` (about ``sqrt(T)`` segments), a number of segments, or
      ``None`` (one segment: no recomputation), as in :func:`bptt_jax.unroll`.
    reduction: ``"sum"`` (over time, mean over the batch) or ``"mean"`` (over
      valid steps), as in :func:`bptt_jax.sequence_loss`.
    **unroll_kwargs: with a cell, settings for :func:`bptt_jax.unroll`
      (``fused``, ``hoist``, ``dtype``).

  Returns:
    ``(loss, final_carry)``.

  References:
    Chen, Xu, Zhang and Guestrin 2016, "Training Deep Nets with Sublinear Memory
    Cost"; Gruslys, Munos, Danihelka, Lanctot and Graves 2016, "Memory-Efficient
    Backpropagation Through Time".
  """
  model = as_model(model, **unroll_kwargs)
  check_reduction(reduction)
  B, T = batch_shape(xs, ys)
  m = step_mask(B, T, lengths=lengths, mask=mask)
  m = jnp.ones((B, T), bool) if m is None else m
  xs, ys = select_steps(m, (xs, ys))
  carry = start_carry(model, carry, params, xs, B)
  n = remat_segments(T, remat)
  size = -(-T // n)
  n = -(-T // size)
  pad = n * size - T

  def split(a):  # [B, T, ...] -> [n, B, size, ...], padded steps masked
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.swapaxes(a.reshape((B, n, size) + a.shape[2:]), 0, 1)

  def segment(c, inp):
    x, y, mk = inp
    c, outputs = model.apply(params, c, x, mk)
    return c, masked_sum(step_loss(params, outputs, y), mk)

  if n > 1:
    segment = jax.checkpoint(segment)
  chunks = jax.tree_util.tree_map(split, (xs, ys, m))
  carry = settle_carry(model, params, carry, *jax.tree_util.tree_map(lambda a: a[0], chunks[::2]))
  carry, sums = jax.lax.scan(segment, carry, chunks)
  loss = reduce_loss(jnp.sum(sums), jnp.sum(m), B, reduction)
  return loss, carry


def model_loss(model, step_loss: Callable, *, reduction: str = "mean", remat=None,
               **unroll_kwargs) -> Callable:
  """``loss_fn(params, batch)`` for :func:`bptt_jax.train_step`: full BPTT of a model.

  The batch is the dict :func:`bptt_jax.tbptt_step` takes: ``"xs"``, ``"ys"``
  and optionally ``"lengths"`` or ``"mask"``; each sequence starts from the
  model's zeros. ``remat`` as in :func:`segmented_loss` (``None``: store every
  step).
  """
  model = as_model(model, **unroll_kwargs)
  check_reduction(reduction)

  def loss_fn(params, batch):
    xs, ys = batch_xs_ys(batch)
    return segmented_loss(model, params, xs, ys, step_loss, lengths=batch.get("lengths"),
                          mask=batch.get("mask"), remat=remat, reduction=reduction)[0]

  return loss_fn


def batch_xs_ys(batch):
  if not isinstance(batch, dict) or "xs" not in batch or "ys" not in batch:
    raise TypeError(
        "batch must be a dict with 'xs' [B, T, ...] and 'ys' [B, T, ...], got "
        f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict)
                                      else ""))
  return batch["xs"], batch["ys"]
