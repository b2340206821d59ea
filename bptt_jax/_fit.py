"""A fit loop for scripts: epochs, evaluation, metrics history, checkpoints, resume."""

from __future__ import annotations

import itertools
import json
import os
import sys
import warnings
from typing import Any, Callable, Iterable, NamedTuple

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


def _check_batches(batches, epochs):
  """Rejects what cannot be read once per epoch."""
  if callable(batches):
    return
  try:
    it = iter(batches)
  except TypeError:
    raise TypeError(
        "batches must be a callable batches(epoch, key) or an iterable of batches, got "
        f"{type(batches).__name__}") from None
  if it is batches and epochs > 1:
    raise ValueError(
        f"batches is a one-shot iterator ({type(batches).__name__}), which cannot be read "
        f"again for epochs={epochs}; pass a callable batches(epoch, key) or a sequence "
        "(list or tuple) of batches")


def _epoch_batches(batches, epoch, key) -> Iterable:
  if callable(batches):
    return batches(epoch, jax.random.fold_in(key, epoch))
  return batches


def _parse(line: bytes):
  """The record on a log line, or None if the line is not one."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  if not isinstance(record, dict):
    return None
  step = record.get("step")
  return record if isinstance(step, int) and not isinstance(step, bool) else None


def _read_log(data: bytes, resumed_at: int | None):
  """``(records of the run resumed, offset to cut the log at)`` for the log ``data``.

  A log holds runs appended one after another; a run is a maximal stretch of
  records whose step increases. A last line cut short (by a crash mid-write)
  is cut off. When resuming from a checkpoint at step ``resumed_at``, the
  records of the last run after that step (written after the checkpoint by
  the run that was cut off) are cut off too, and that run's records up to the
  step are returned.
  """
  lines, offset = [], 0  # (offset, line, record or None)
  for line in data.splitlines(keepends=True):
    lines.append((offset, line, _parse(line)))
    offset += len(line)
  end = len(data)
  if lines and not lines[-1][1].endswith(b"\n") and lines[-1][2] is None:
    end = lines.pop()[0]  # cut short
  records = [(off, rec) for off, _, rec in lines if rec is not None]
  start = 0
  for i in range(1, len(records)):
    if records[i][1]["step"] <= records[i - 1][1]["step"]:
      start = i  # a new run begins
  resumed = []
  if resumed_at is not None:
    for off, rec in records[start:]:
      if rec["step"] > resumed_at:
        end = off
        break
      resumed.append(rec)
  return resumed, end


def _prepare_log(path: str, resumed_at: int | None, *, write: bool = True) -> list[dict]:
  """Readies the log at ``path`` for appending; returns the records of the run resumed.

  The log is cut as :func:`_read_log` says; everything else in the file is
  kept as is. With ``write=False`` (a process other than the one writing the
  log) the file is only read.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  resumed, end = _read_log(data, resumed_at)
  if write:
    with open(path, "r+b") as f:
      f.truncate(end)
      if end and not data[:end].endswith(b"\n"):
        f.seek(end)
        f.write(b"\n")
  return resumed


class _Pending(NamedTuple):
  """A step whose metrics are still on the device."""
  step: int
  epoch: int
  batch: int  # position of the batch in its epoch
  metrics: dict  # device arrays


def fit(step_fn: Callable, state, batches, *, epochs: int, key=None,
        eval_fn: Callable[[Any], dict] | None = None, eval_every: int | None = None,
        log_path: str | None = None, log_every: int = 20, checkpoint_dir: str | None = None,
        checkpoint_every: int | None = None, keep: int = 3, resume: bool | str | None = None,
        max_nonfinite: int = 10, progress: bool | None = None, desc: str = "train"):
  """Runs ``step_fn`` over ``batches`` for ``epochs`` epochs.

  The steps are dispatched without waiting for them: each step's metrics stay
  on the device and are fetched together, in one ``jax.device_get``, every
  ``log_every`` steps, before an evaluation, before a checkpoint and at the
  end. Only then are they summarized, checked for non-finite updates, added to
  the history and the log, and shown on the progress bar (whose count advances
  every step).

  Args:
    step_fn: ``step_fn(state, batch) -> (state, metrics)``, e.g. from
      :func:`bptt_jax.train_step` or :func:`bptt_jax.tbptt_step`. It may donate
      its input state (``jax.jit(..., donate_argnums=0)``): fit never uses a
      state again after passing it to ``step_fn``.
    state: a :class:`bptt_jax.TrainState` (ignored when resuming, except as
      the structure to read the checkpoint into).
    batches: ``batches(epoch, key) -> iterable of batches`` with ``key``
      derived from ``key`` and the epoch (e.g.
      :func:`bptt_jax.data.shuffled_batches`); or an iterable read once per
      epoch: a sequence (list, tuple) or an object whose ``iter()`` returns a
      fresh iterator each time. A one-shot iterator (a generator) is only
      accepted with ``epochs=1``.
    epochs: number of passes over the data.
    key: PRNG key for the data order; ``jax.random.key(0)`` by default.
    eval_fn: ``eval_fn(params) -> dict`` of numbers, run every ``eval_every``
      steps and after the last step; recorded with an ``eval_`` prefix. With
      a donating ``step_fn`` it must copy any params it keeps.
    eval_every: steps between evaluations.
    log_path: append one JSON line of metrics per step to this file. Logs are
      never erased: each call appends its run after what the file holds (a
      record whose step is not greater than the previous record's begins a
      new run). A last line cut short by a crash is removed, and when
      resuming from a checkpoint at step ``s``, so are the records of the
      log's last run after step ``s`` (written after the checkpoint by the run
      that was cut off). Everything else in the file is kept as is.
    log_every: steps between fetches of the metrics from the device. A run
      cut off loses the metrics of the steps not yet fetched (up to
      ``log_every``; everything is fetched before each checkpoint).
    checkpoint_dir: save checkpoints here every ``checkpoint_every`` steps and
      at the end. The checkpoint holds the train state (params, optimizer
      state, step, carry), the data position (epoch, batch) and the key.
    checkpoint_every: steps between checkpoints.
    keep: checkpoints kept.
    resume: what to do with checkpoints already in ``checkpoint_dir``.
      ``None`` (default): raise if there are any, else start fresh.
      ``"auto"``: resume from the newest readable checkpoint if there is one,
      else start fresh. ``True``: resume from the newest readable checkpoint;
      raise if there is none. ``False``: start fresh and delete the existing
      checkpoints (with a warning), so that a later resume cannot pick up the
      old run. A resumed run ends bit-identical to an uninterrupted one.
    max_nonfinite: stop after this many consecutive non-finite updates.
    progress: show a tqdm bar; by default only when stderr is a terminal.
      With several processes (``jax.distributed``) only process 0 shows it
      and writes the log; every process runs the steps, evaluates (on the
      global params) and takes part in each checkpoint.
    desc: progress-bar label.

  Returns:
    ``(state, history)``: the final state and the list of per-step metric
    dicts (``step``, ``epoch``, the summarized metrics and any ``eval_``
    entries). After a resume the history is the whole run's: the records up
    to the checkpoint read back from the log, then the new steps, as in an
    uninterrupted run; without ``log_path``, only the new steps.

  Raises:
    NonFiniteError: ``max_nonfinite`` consecutive non-finite updates; the
      message names the step where the count was reached. It is raised when
      that step's metrics are fetched, up to ``log_every`` steps later.
    ValueError: bad settings; ``checkpoint_dir`` holds checkpoints and
      ``resume`` is None; ``resume=True`` and there is no readable
      checkpoint; a one-shot iterator of batches with ``epochs > 1``.
    TypeError: ``batches`` is neither callable nor iterable.
  """
  if not isinstance(epochs, int) or epochs < 0:
    raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
  for name, v in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
    if v is not None and (not isinstance(v, int) or v <= 0):
      raise ValueError(f"{name} must be a positive int or None, got {v!r}")
  if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every <= 0:
    raise ValueError(f"log_every must be a positive int, got {log_every!r}")
  if max_nonfinite < 1:
    raise ValueError(f"max_nonfinite must be >= 1, got {max_nonfinite}")
  if not (resume is None or isinstance(resume, bool) or
          (isinstance(resume, str) and resume == "auto")):
    raise ValueError(f"resume must be None, 'auto', True or False, got {resume!r}")
  _check_batches(batches, epochs)
  key = jax.random.key(0) if key is None else key
  primary = jax.process_index() == 0  # the one process that writes the log and the bar
  if progress is None:
    progress = sys.stderr.isatty()
  progress = progress and primary

  epoch, position, step = 0, 0, 0
  restored = None
  if checkpoint_dir is None:
    if resume is True:
      raise ValueError("resume=True needs a checkpoint_dir to resume from, got None")
  elif resume is None:
    found = _checkpoint.list_checkpoints(checkpoint_dir)
    if found:
      raise ValueError(
          f"{checkpoint_dir} holds checkpoints of an earlier run (the newest at step "
          f"{found[-1][0]}); pass resume='auto' or resume=True to continue it, or "
          "resume=False to start over")
  elif resume is False:
    removed = _checkpoint.clear(checkpoint_dir)
    if removed:
      warnings.warn(f"resume=False: removed {removed} checkpoint(s) of an earlier run from "
                    f"{checkpoint_dir}", UserWarning, stacklevel=2)
  else:
    template = {"state": state, "epoch": 0, "position": 0, "step": 0, "key": key}
    restored = _checkpoint.restore_latest(checkpoint_dir, template)
    if restored is None and resume is True:
      raise ValueError(f"resume=True but {checkpoint_dir} holds no readable checkpoint")
  if restored is not None:
    tree = restored[1]
    state = jax.tree_util.tree_map(jax.numpy.asarray, tree["state"])
    epoch, position, step = int(tree["epoch"]), int(tree["position"]), int(tree["step"])
    key = jax.numpy.asarray(tree["key"])  # a typed key, or a raw uint32 one

  history = []
  if log_path is not None:
    if primary:
      os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    history = _prepare_log(log_path, step if restored is not None else None, write=primary)
  pending: list[_Pending] = []  # steps whose metrics are still on the device

  def fetch(evaluate):
    """Fetches the pending metrics, checks and records them, evaluating after the last."""
    if not pending:
      return
    fetched = jax.device_get([p.metrics for p in pending])
    records = []
    for p, metrics in zip(pending, fetched, strict=True):
      record = {"step": p.step, "epoch": p.epoch, **summarize(metrics)}
      if record.get("nonfinite", 0) >= max_nonfinite:
        history.extend(records)
        write(records)
        raise NonFiniteError(
            f"{record['nonfinite']} consecutive non-finite updates (NaN/Inf loss or "
            f"gradients) up to step {p.step} (epoch {p.epoch}, batch {p.batch}); "
            "params were left at their last finite values")
      records.append(record)
    pending.clear()
    if evaluate and eval_fn is not None:
      results = jax.device_get(eval_fn(state.params))  # state after the last pending step
      records[-1].update({f"eval_{k}": float(v) for k, v in results.items()})
    history.extend(records)
    write(records)
    bar.set_postfix(loss=f"{records[-1].get('loss', float('nan')):.4f}",
                    epoch=records[-1]["epoch"])

  def write(records):
    if log is not None and records:
      log.write("".join(json.dumps(r) + "\n" for r in records))
      log.flush()

  def checkpoint():
    """Saves the latest state and the position of the next batch."""
    if checkpoint_dir is not None:
      _checkpoint.save(checkpoint_dir, step, {
          "state": state, "epoch": epoch, "position": position, "step": step, "key": key},
          keep=keep)

  def settle():
    """Does what is due after the last step, before the next step consumes the state.

    Deferred to this point (rather than done right after the step), the work
    due after the run's last step is done once, at the end, with its evaluation
    in the log.
    """
    if not pending:
      return
    eval_due = bool(eval_fn is not None and eval_every and step % eval_every == 0)
    ckpt_due = bool(checkpoint_dir is not None and checkpoint_every and
                    step % checkpoint_every == 0)
    if eval_due or ckpt_due or step % log_every == 0:
      fetch(evaluate=eval_due)
    if ckpt_due:
      checkpoint()

  log = open(log_path, "a") if log_path is not None and primary else None
  bar = tqdm(desc=desc, disable=not progress, initial=step, dynamic_ncols=True)
  try:
    while epoch < epochs:
      for batch in itertools.islice(_epoch_batches(batches, epoch, key), position, None):
        settle()
        state, metrics = step_fn(state, batch)
        step += 1
        pending.append(_Pending(step, epoch, position,
                                {k: v for k, v in metrics.items() if k != "carry"}))
        position += 1
        bar.update(1)
      epoch, position = epoch + 1, 0
    fetch(evaluate=True)  # the last step, evaluated unless nothing ran
    checkpoint()
  finally:
    bar.close()
    if log is not None:
      log.close()
  return state, history
