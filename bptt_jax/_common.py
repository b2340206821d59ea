"""What every module shares: the LSTM carry, the mask and dtype rules, argument checks.

Each rule is written once here:

- **Masks select, never multiply.** A step that is masked out keeps the carry
  (``where_rows``), and its inputs are replaced by zeros before any arithmetic
  (``select_steps``), so a padded position holding NaN or Inf reaches neither a
  value nor a gradient (``0 * NaN`` is NaN; ``where(False, NaN, 0)`` is 0).
- **One dtype rule.** The compute dtype is ``dtype`` if given (e.g.
  ``jnp.bfloat16``), else the params' float dtype (float32 usually; float64 under
  ``jax_enable_x64``). Params are cast to it inside the computation (their
  gradients come back in their own dtype), floating inputs are cast to it, and
  the carry is kept in it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class LSTMState(NamedTuple):
  """The carry of an LSTM.

  Attributes:
    h: hidden state, ``[B, H]``.
    c: cell state, ``[B, H]``.
  """

  h: Array
  c: Array


def check_positive_int(name: str, value) -> None:
  """Raises ``ValueError`` unless ``value`` is a positive Python int."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


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
        f"lengths must have shape [B] = ({batch_size},), got {tuple(lengths.shape)}")
  if is_concrete(lengths):
    values = np.asarray(lengths)
    if values.size and (values.min() < 0 or values.max() > num_steps):
      raise ValueError(
          f"lengths must lie in [0, T] = [0, {num_steps}], got values from "
          f"{values.min()} to {values.max()}")
  return jnp.asarray(lengths, jnp.int32)


def length_mask(lengths: Array, num_steps: int) -> Array:
  """``[B, T]`` boolean mask, true where ``t < lengths[b]``."""
  return jnp.arange(num_steps)[None, :] < lengths[:, None]


def step_mask(batch_size: int, num_steps: int, *, lengths=None, mask=None):
  """The ``[B, T]`` boolean mask given by ``lengths`` ``[B]`` or ``mask`` ``[B, T]``.

  Returns ``None`` when neither is given.

  Raises:
    ValueError: both given, or a shape that does not fit ``[B]`` / ``[B, T]``.
    TypeError: non-integer lengths.
  """
  if lengths is not None and mask is not None:
    raise ValueError("give lengths or mask, not both")
  if lengths is not None:
    return length_mask(check_lengths(lengths, batch_size, num_steps), num_steps)
  if mask is not None:
    if tuple(jnp.shape(mask)) != (batch_size, num_steps):
      raise ValueError(
          f"mask must have shape [B, T] = {(batch_size, num_steps)}, got "
          f"{tuple(jnp.shape(mask))}")
    return jnp.asarray(mask, bool)
  return None


def check_carry(carry, batch_size: int) -> None:
  """Raises ``ValueError`` unless every leaf of ``carry`` is ``[B, ...]``."""
  for leaf in jax.tree_util.tree_leaves(carry):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch_size:
      raise ValueError(
          f"carry has batch size {(jnp.shape(leaf) or ('none',))[0]} but xs has "
          f"B = {batch_size} (carry leaves are [B, ...])")


def _expand(m, like):
  """``m`` with trailing unit axes up to ``like``'s rank."""
  return m.reshape(m.shape + (1,) * (like.ndim - m.ndim))


def where_rows(rows: Array, new, old):
  """Row-wise select over PyTrees: ``new`` where ``rows`` ``[B]`` is true, else ``old``."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(_expand(rows, n), n, o), new, old)


def select_steps(mask: Array | None, tree):
  """Zeros every masked-out step of a PyTree of ``[B, T, ...]`` (or ``[T, B, ...]``)
  arrays, by selection: whatever a masked position held, NaN included, is gone."""
  if mask is None:
    return tree
  return jax.tree_util.tree_map(
      lambda a: jnp.where(_expand(mask, a), a, jnp.zeros((), a.dtype)), tree)


# ----------------------------------------------------------------------------
# The dtype rule.


def _floating(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def compute_dtype(params, dtype=None, fallback=None):
  """The dtype a sequence is computed in.

  ``dtype`` when given; else the widest float dtype among ``params``' leaves;
  else ``fallback`` (e.g. the inputs' dtype) if it is a float dtype; else
  float32.

  Raises:
    TypeError: ``dtype`` is not a floating dtype.
  """
  if dtype is not None:
    dtype = jnp.dtype(dtype)
    if not _floating(dtype):
      raise TypeError(f"dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype}")
    return dtype
  floats = [jnp.result_type(a) for a in jax.tree_util.tree_leaves(params)
            if hasattr(a, "dtype") and _floating(jnp.result_type(a))]
  if floats:
    return jnp.dtype(jnp.result_type(*floats))
  if fallback is not None and _floating(fallback):
    return jnp.dtype(fallback)
  return jnp.dtype(jnp.float32)


def cast_floats(tree, dtype):
  """Casts the floating leaves of ``tree`` to ``dtype``; other leaves are left alone."""
  def cast(a):
    if hasattr(a, "dtype") and _floating(a.dtype) and a.dtype != dtype:
      return jnp.asarray(a).astype(dtype)
    return a
  return jax.tree_util.tree_map(cast, tree)
