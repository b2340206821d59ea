"""Readout, per-step losses and their masked reductions over time.

Per-step losses come from ``optax.losses``; this module adds the sequence
structure: masks from lengths, the last valid step of each sequence, and
reductions that stay finite (and have zero gradient) on an all-masked batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bptt_jax import _kernel
from bptt_jax._common import check_lengths, check_positive_int, step_mask

Array = jax.Array


def init_readout(key, hidden_size: int, output_size: int, dtype=jnp.float32):
  """Params of the linear readout ``y_t = h_t W_hy + b_y``.

  Returns:
    ``{"W_hy": [H, O] (Glorot uniform), "b_y": [O] (zeros)}``.
  """
  check_positive_int("hidden_size", hidden_size)
  check_positive_int("output_size", output_size)
  return {
      "W_hy": jax.nn.initializers.glorot_uniform()(key, (hidden_size, output_size), dtype),
      "b_y": jnp.zeros((output_size,), dtype),
  }


def readout(params, hs: Array) -> Array:
  """Linear readout ``y = h W_hy + b_y`` over ``[..., H]`` -> ``[..., O]``.

  With the written-out CPU kernels on (``use_kernels("fused")``) and float32 ``hs`` and
  ``W_hy``, the backward pass is one call of the extension (oneDNN's sgemm for the
  gradients of ``hs`` and ``W_hy``); forward mode (``jax.jvp``) is then refused, as on
  the kernels' ``unroll``.

  Raises:
    ValueError: if the last axis of ``hs`` is not ``W_hy``'s first.
  """
  W = params["W_hy"]
  if hs.shape[-1] != W.shape[0]:
    raise ValueError(
        f"readout expects hidden states [..., H] with H = {W.shape[0]}, got shape "
        f"{tuple(hs.shape)}"
    )
  # With the written-out CPU kernels on, the backward pass is one call (_kernel.dense).
  ys = _kernel.dense(hs, W) if _kernel.dense_usable(hs, W) else hs @ W
  return ys + jnp.reshape(params["b_y"], (1,) * (hs.ndim - 1) + (-1,))


def mse(preds: Array, targets: Array) -> Array:
  """Squared error summed over the feature axis: ``[..., O] -> [...]``."""
  if preds.shape != targets.shape:
    raise ValueError(
        f"mse: preds and targets must have the same shape, got {tuple(preds.shape)} "
        f"and {tuple(targets.shape)}"
    )
  return jnp.sum(optax.losses.squared_error(preds, targets), axis=-1)


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Cross-entropy with integer labels: logits ``[..., C]``, labels ``[...]`` -> ``[...]``."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
  if logits.shape[:-1] != labels.shape:
    raise ValueError(
        f"logits [..., C] and labels [...] disagree: {tuple(logits.shape)} vs "
        f"{tuple(labels.shape)}"
    )
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_binary_cross_entropy(logits: Array, labels: Array) -> Array:
  """Binary cross-entropy on logits, summed over the last axis: ``[..., O] -> [...]``."""
  if logits.shape != labels.shape:
    raise ValueError(
        f"logits and labels must have the same shape, got {tuple(logits.shape)} and "
        f"{tuple(labels.shape)}"
    )
  return jnp.sum(
      optax.losses.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)),
      axis=-1)


def sequence_loss(losses: Array, *, lengths=None, mask=None,
                  reduction: str = "sum") -> Array:
  """Reduces per-step losses ``[B, T]`` over valid steps to a scalar.

  Args:
    losses: ``[B, T]`` per-step losses.
    lengths: optional ``[B]``: steps ``t >= lengths[b]`` are ignored.
    mask: optional ``[B, T]`` booleans (instead of ``lengths``).
    reduction: ``"sum"`` sums over time and averages over the batch,
      ``L = (1/B) sum_b sum_t m_bt L_bt``; ``"mean"`` averages over all valid
      steps, ``L = sum m L / max(sum m, 1)``.

  Returns:
    A scalar; 0 (with zero gradient) when no step is valid. Masked entries never
    reach the result, even when they are NaN.

  Raises:
    ValueError: wrong shapes, both lengths and mask, unknown reduction.
  """
  if losses.ndim != 2:
    raise ValueError(f"losses must be [B, T], got shape {tuple(losses.shape)}")
  B, T = losses.shape
  m = step_mask(B, T, lengths=lengths, mask=mask)
  m = jnp.ones((B, T), bool) if m is None else m
  total = jnp.sum(jnp.where(m, losses, jnp.zeros((), losses.dtype)))
  if reduction == "sum":
    return total / losses.shape[0]
  if reduction == "mean":
    return total / jnp.maximum(jnp.sum(m), 1)
  raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def last_step(hs: Array, lengths=None) -> Array:
  """The output at each sequence's last valid step: ``[B, T, ...]`` -> ``[B, ...]``.

  ``hs[b, lengths[b] - 1]``, or zeros where ``lengths[b] == 0``; ``hs[:, -1]``
  without lengths.
  """
  if hs.ndim < 2:
    raise ValueError(f"hs must be [B, T, ...], got shape {tuple(hs.shape)}")
  if lengths is None:
    return hs[:, -1]
  B, T = hs.shape[:2]
  lengths = check_lengths(lengths, B, T)
  idx = jnp.maximum(lengths - 1, 0).reshape((B, 1) + (1,) * (hs.ndim - 2))
  last = jnp.take_along_axis(hs, idx, axis=1)[:, 0]
  keep = (lengths > 0).reshape((B,) + (1,) * (hs.ndim - 2))
  return jnp.where(keep, last, 0)


def final_loss(losses: Array, lengths=None) -> Array:
  """Mean over the batch of a per-sequence loss ``[B]``, ignoring empty sequences.

  Used for sequence-to-one training: ``L = mean_b Loss(y_b, target_b)`` over
  sequences with ``lengths[b] > 0``; 0 if there are none.
  """
  if losses.ndim != 1:
    raise ValueError(f"losses must be [B], got shape {tuple(losses.shape)}")
  if lengths is None:
    return jnp.mean(losses)
  keep = check_lengths(lengths, losses.shape[0], jnp.iinfo(jnp.int32).max) > 0
  return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
