"""Optimizers (optax), the train state and the jitted full-BPTT train step."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# Consecutive non-finite steps optax itself tolerates; the fit loop stops far
# earlier (``max_nonfinite``), with an error that names the step.
_NEVER = 2**31 - 1


class TrainState(NamedTuple):
  """Everything a training step reads and writes.

  Attributes:
    params: model params (a PyTree).
    opt_state: optax state of the guarded optimizer (see :func:`guard`).
    step: steps taken so far (a skipped non-finite step counts), ``[]`` int32.
    carry: the recurrent state handed from one batch to the next when
      streaming (truncated BPTT over a long stream), or ``None``.
  """

  params: Any
  opt_state: Any
  step: Array
  carry: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, *, carry=None):
    """A fresh state: ``guard(tx)`` initialized on ``params``, step 0.

    The state holds its own copy of ``params`` and ``carry`` (one buffer per
    leaf), so a train step that donates the state never invalidates the arrays
    passed in here.
    """
    _check_tx(tx)
    params, carry = jax.tree_util.tree_map(jnp.array, (params, carry))
    return cls(params, guard(tx).init(params), jnp.zeros((), jnp.int32), carry)


def _check_tx(tx):
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
        f"expected an optax.GradientTransformation, got {type(tx).__name__}")


def guard(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optax.apply_if_finite``: a non-finite gradient leaves params and state as they were."""
  return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER)


_OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "adagrad": optax.adagrad,
    "rmsprop": optax.rmsprop,
}


def optimizer(learning_rate=1e-3, *, name: str = "adam", max_norm: float | None = 1.0,
              clip_value: float | None = None,
              transform: optax.GradientTransformation | None = None,
              **kwargs) -> optax.GradientTransformation:
  """The usual recurrent-network optimizer: clip, then Adam (or another optax rule).

  ``optax.chain(clip_by_global_norm(max_norm), clip(clip_value), rule)``, each
  part present only when its setting is given. Clipping by the global norm is
  the remedy for exploding gradients of Pascanu et al. 2013; element-wise
  clipping with Adagrad at ``learning_rate=0.1`` is min-char-rnn's setup.

  Args:
    learning_rate: a float or an optax schedule (``step -> rate``).
    name: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"adagrad"`` or ``"rmsprop"``.
    max_norm: global-norm clipping threshold; ``None`` for none.
    clip_value: element-wise clipping to ``[-clip_value, clip_value]``; ``None``
      for none.
    transform: a user-supplied ``optax.GradientTransformation`` used instead of
      ``name``/``learning_rate`` (clipping still applies first).
    **kwargs: passed to the optax rule (e.g. ``b1``, ``momentum``).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: unknown name, or a non-positive threshold.

  References:
    Pascanu, Mikolov and Bengio 2013, "On the difficulty of training recurrent
    neural networks".
  """
  parts = []
  for label, v in (("max_norm", max_norm), ("clip_value", clip_value)):
    if v is not None and not v > 0:
      raise ValueError(f"{label} must be positive or None, got {v!r}")
  if max_norm is not None:
    parts.append(optax.clip_by_global_norm(max_norm))
  if clip_value is not None:
    parts.append(optax.clip(clip_value))
  if transform is not None:
    _check_tx(transform)
    parts.append(transform)
  else:
    if name not in _OPTIMIZERS:
      raise ValueError(f"name must be one of {sorted(_OPTIMIZERS)}, got {name!r}")
    parts.append(_OPTIMIZERS[name](learning_rate, **kwargs))
  return optax.chain(*parts)


def nonfinite_counts(opt_state) -> tuple[Array, Array]:
  """``(consecutive, total)`` non-finite steps skipped, read from a guarded state."""
  return opt_state.notfinite_count, opt_state.total_notfinite


def apply_gradients(tx, state: TrainState, loss, grads, *, max_norm=None,
                    skip=None):
  """One guarded optax update; returns ``(state, metrics)``.

  A non-finite loss or gradient leaves ``params`` and the inner optimizer
  state untouched and is counted (``optax.apply_if_finite``). ``skip=True`` (a
  traced boolean) skips the update altogether, e.g. for a chunk with no valid
  step.

  Metrics: ``loss``, ``grad_norm`` (global norm before clipping), ``clipped``
  (``grad_norm > max_norm``, if given), ``finite``, ``nonfinite`` (consecutive)
  and ``nonfinite_total``.
  """
  finite = jnp.isfinite(loss)
  # A non-finite loss with finite gradients must not update either.
  grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.nan), grads)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = guard(tx).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  if skip is not None:
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(skip, o, n), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    step = jnp.where(skip, state.step, step)
  consecutive, total = nonfinite_counts(opt_state)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "finite": jnp.isfinite(grad_norm),
      "nonfinite": consecutive,
      "nonfinite_total": total,
  }
  if max_norm is not None:
    metrics["clipped"] = grad_norm > max_norm
  return state._replace(params=params, opt_state=opt_state, step=step), metrics


def train_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
               max_norm: float | None = None, has_aux: bool = False, jit: bool = True,
               donate: bool = True):
  """A full-BPTT train step ``(state, batch) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``; a dict ``aux`` is merged into the metrics). Gradients are
      exact BPTT through whatever unroll it runs. :func:`bptt_jax.model_loss`
      makes one from a model and a per-step loss.
    tx: the optax optimizer (e.g. from :func:`optimizer`); the state must come
      from ``TrainState.create(params, tx)``.
    max_norm: the clipping threshold, to report ``clipped`` in the metrics.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    jit: compile the step with ``jax.jit``.
    donate: with ``jit``, donate the input state's buffers to the output state
      (no copy of params and optimizer state per step; the state passed in
      must not be used again).

  Returns:
    The step function.
  """
  _check_tx(tx)

  def step(state: TrainState, batch):
    out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(state.params, batch)
    loss, aux = out if has_aux else (out, None)
    state, metrics = apply_gradients(tx, state, loss, grads, max_norm=max_norm)
    if isinstance(aux, dict):
      metrics.update(aux)
    return state, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=0) if donate else jax.jit(step)
