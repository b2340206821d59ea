"""A fit loop for scripts: epochs, evaluation, metrics history, checkpoints, resume."""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from bptt_jax import _checkpoint


class NonFiniteError(FloatingPointError):
  """Training produced too many consecutive non-finite (NaN/Inf) steps."""


def _scalar(name, value):
  a = np.asarray(value)
  if a.ndim == 0:
    return a.item()
  if name in ("nonfinite", "nonfinite_total"):
    return a.reshape(-1)[-1].item()  # counters: the value after the last chunk
  if name == "steps":
    return a.sum().item()
  return a.astype(np.float64).mean().item()


def summarize(metrics: dict) -> dict:
  """Per-step metrics (scalars, or arrays over chunks) as plain Python numbers."""
  return {k: _scalar(k, v) for k, v in metrics.items() if k != "carry"}


def _epoch_batches(batches, epoch, key):
  if callable(batches):
    return batches(epoch, jax.random.fold_in(key, epoch))
  return batches


def _truncate_log(path, last_step):
  """Drops log lines after ``last_step`` (written by a run that was cut off),
  and a line the crash cut short."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for ln in f:
      try:
        record = json.loads(ln)
      except json.JSONDecodeError:
        continue
      if record.get("step", 0) <= last_step:
        lines.append(ln if ln.endswith("\n") else ln + "\n")
  with open(path, "w") as f:
    f.writelines(lines)


def fit(step_fn: Callable, state, batches, *, epochs: int, key=None,
        eval_fn: Callable[[Any], dict] | None = None, eval_every: int | None = None,
        log_path: str | None = None, checkpoint_dir: str | None = None,
        checkpoint_every: int | None = None, keep: int = 3, max_nonfinite: int = 10,
        progress: bool | None = None, desc: str = "train"):
  """Runs ``step_fn`` over ``batches`` for ``epochs`` epochs.

  Args:
    step_fn: ``step_fn(state, batch) -> (state, metrics)``, e.g. from
      :func:`bptt_jax.train_step` or :func:`bptt_jax.tbptt_step`.
    state: a :class:`bptt_jax.TrainState` (ignored when resuming).
    batches: a sequence of batches (the same every epoch), or
      ``batches(epoch, key) -> iterable of batches`` with ``key`` derived from
      ``key`` and the epoch (e.g. :func:`bptt_jax.data.shuffled_batches`).
    epochs: number of passes over the data.
    key: PRNG key for the data order; ``jax.random.key(0)`` by default.
    eval_fn: ``eval_fn(params) -> dict`` of numbers, run every ``eval_every``
      steps and at the end; recorded with an ``eval_`` prefix.
    eval_every: steps between evaluations.
    log_path: append one JSON line of metrics per step to this file.
    checkpoint_dir: save checkpoints here every ``checkpoint_every`` steps and
      at the end, and resume from the newest readable one if present. The
      checkpoint holds the train state (params, optimizer state, step,
      carry), the data position (epoch, batch) and the key.
    checkpoint_every: steps between checkpoints.
    keep: checkpoints kept.
    max_nonfinite: stop after this many consecutive non-finite updates.
    progress: show a tqdm bar; by default only when stderr is a terminal.
    desc: progress-bar label.

  Returns:
    ``(state, history)``: the final state and the list of per-step metric dicts.

  Raises:
    NonFiniteError: ``max_nonfinite`` consecutive non-finite updates; the
      message names the step.
    ValueError: bad settings.
  """
  if not isinstance(epochs, int) or epochs < 0:
    raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
  for name, v in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
    if v is not None and (not isinstance(v, int) or v <= 0):
      raise ValueError(f"{name} must be a positive int or None, got {v!r}")
  if max_nonfinite < 1:
    raise ValueError(f"max_nonfinite must be >= 1, got {max_nonfinite}")
  key = jax.random.key(0) if key is None else key
  if progress is None:
    progress = sys.stderr.isatty()

  epoch, position, step = 0, 0, 0
  if checkpoint_dir is not None:
    template = {"state": state, "epoch": 0, "position": 0, "step": 0,
                "key": jax.random.key_data(key)}
    restored = _checkpoint.restore_latest(checkpoint_dir, template)
    if restored is not None:
      _, tree = restored
      state = jax.tree_util.tree_map(jax.numpy.asarray, tree["state"])
      epoch, position, step = int(tree["epoch"]), int(tree["position"]), int(tree["step"])
      key = jax.random.wrap_key_data(np.asarray(tree["key"]))
  if log_path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    _truncate_log(log_path, step)

  def checkpoint():
    if checkpoint_dir is not None:
      _checkpoint.save(checkpoint_dir, step, {
          "state": state, "epoch": epoch, "position": position, "step": step,
          "key": jax.random.key_data(key)}, keep=keep)

  history = []
  log = open(log_path, "a") if log_path is not None else None
  bar = tqdm(desc=desc, disable=not progress, initial=step, dynamic_ncols=True)
  try:
    while epoch < epochs:
      it: Iterable = _epoch_batches(batches, epoch, key)
      for batch in itertools.islice(it, position, None):
        state, metrics = step_fn(state, batch)
        step += 1
        position += 1
        record = {"step": step, "epoch": epoch, **summarize(metrics)}
        if record.get("nonfinite", 0) >= max_nonfinite:
          raise NonFiniteError(
              f"{record['nonfinite']} consecutive non-finite updates (NaN/Inf loss or "
              f"gradients) up to step {step} (epoch {epoch}, batch {position - 1}); "
              "params were left at their last finite values")
        if eval_fn is not None and eval_every and step % eval_every == 0:
          record.update({f"eval_{k}": float(v) for k, v in eval_fn(state.params).items()})
        history.append(record)
        if log is not None:
          log.write(json.dumps(record) + "\n")
          log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", epoch=epoch)
        if checkpoint_every and step % checkpoint_every == 0:
          checkpoint()
      epoch, position = epoch + 1, 0
    if eval_fn is not None and history and not any(
        k.startswith("eval_") for k in history[-1]):
      history[-1].update(
          {f"eval_{k}": float(v) for k, v in eval_fn(state.params).items()})
    checkpoint()
  finally:
    bar.close()
    if log is not None:
      log.close()
  return state, history
