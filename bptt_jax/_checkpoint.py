"""Checkpoints in a safe, non-pickle format, written atomically and verified.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is
``flax.serialization.msgpack_serialize`` of the PyTree's state dict. Writing
goes to a temporary file in the same directory, is flushed to disk, then
renamed over the final name (``os.replace`` is atomic), so a crash leaves
either the old or the new checkpoint, never half of one. A file cut short or
altered fails its checksum and is reported with :class:`CheckpointError`;
:func:`restore_latest` then falls back to the previous checkpoint.

Typed PRNG keys (``jax.random.key``) are stored as their key data and rebuilt
on load with the implementation of the template's key.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings

import jax
import numpy as np
from flax import serialization

MAGIC = b"BPTTJAX1"
_NAME = re.compile(r"^ckpt_(\d{9})\.msgpack$")
_TMP_PREFIX = ".tmp_ckpt_"


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read back: truncated, altered, or not one."""


def _is_key(x) -> bool:
  """Whether ``x`` is a typed PRNG key array (dtype ``key<impl>``)."""
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_host(tree):
  """Host numpy copy of ``tree``, typed keys as their key data: one device fetch."""
  tree = jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _remove(path: str) -> bool:
  """Removes ``path``; False if it was already gone."""
  try:
    os.remove(path)
  except FileNotFoundError:
    return False
  return True


def _remove_temporaries(directory: str) -> None:
  """Removes the temporary files a write cut short by a crash left behind."""
  for name in os.listdir(directory):
    if name.startswith(_TMP_PREFIX):
      _remove(os.path.join(directory, name))


def save(directory: str, step: int, tree, *, keep: int = 3) -> str:
  """Writes ``tree`` as ``directory/ckpt_{step:09d}.msgpack``, atomically.

  The file just written is never deleted. Checkpoints with a step greater than
  ``step`` are stale (left by a run that was cut off, or by the run being
  started over) and are deleted; of the others, the newest ``keep`` (the one
  just written included) are kept and the older ones deleted. Temporary files
  left by a write cut short are deleted too.

  Args:
    directory: the checkpoint directory; created if missing.
    step: the training step, the checkpoint's name and its place in the order.
    tree: a PyTree of arrays, numbers and typed PRNG keys.
    keep: how many checkpoints to keep, at least 1.

  Returns:
    The path written.

  Raises:
    ValueError: ``keep`` is less than 1.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  step = int(step)
  os.makedirs(directory, exist_ok=True)
  payload = serialization.msgpack_serialize(serialization.to_state_dict(_to_host(tree)))
  data = MAGIC + hashlib.sha256(payload).digest() + payload
  path = os.path.join(directory, f"ckpt_{step:09d}.msgpack")
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)
  _remove_temporaries(directory)
  older = []
  for other, p in list_checkpoints(directory):
    if other > step:
      _remove(p)  # stale: a later step of an earlier run
    elif other < step:
      older.append(p)
  for p in older[:max(len(older) - (keep - 1), 0)]:
    _remove(p)
  return path


def clear(directory: str) -> int:
  """Deletes every checkpoint and temporary checkpoint file in ``directory``.

  Other files, and the directory itself, are left alone.

  Args:
    directory: a checkpoint directory; it need not exist.

  Returns:
    How many checkpoints were deleted (temporary files not counted).
  """
  if not os.path.isdir(directory):
    return 0
  _remove_temporaries(directory)
  return sum(_remove(p) for _, p in list_checkpoints(directory))


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
  """``(step, path)`` of every checkpoint in ``directory``, oldest first."""
  if not os.path.isdir(directory):
    return []
  found = []
  for name in os.listdir(directory):
    m = _NAME.match(name)
    if m:
      found.append((int(m.group(1)), os.path.join(directory, name)))
  return sorted(found)


def _rewrap_keys(template, tree):
  """``tree`` with the key data at the template's typed keys made keys again."""
  return jax.tree_util.tree_map(
      lambda t, x: jax.random.wrap_key_data(np.asarray(x), impl=jax.random.key_impl(t))
      if _is_key(t) else x, template, tree)


def load(path: str, template):
  """Reads a checkpoint into the structure of ``template``.

  Args:
    path: a file written by :func:`save`.
    template: a PyTree of the expected structure (e.g. the initial state);
      where it holds a typed PRNG key, the stored key data is wrapped into a
      key of the same implementation.

  Returns:
    The checkpoint's tree in the structure of ``template``, with numpy arrays
    (and typed keys) as leaves.

  Raises:
    CheckpointError: the file is truncated, altered or not a checkpoint, or
      does not fit ``template``.
  """
  with open(path, "rb") as f:
    data = f.read()
  head = len(MAGIC) + 32
  if len(data) < head or not data.startswith(MAGIC):
    raise CheckpointError(
        f"{path}: not a bptt_jax checkpoint (expected header {MAGIC!r}, "
        f"file has {len(data)} bytes)")
  digest, payload = data[len(MAGIC):head], data[head:]
  if hashlib.sha256(payload).digest() != digest:
    raise CheckpointError(
        f"{path}: checksum mismatch ({len(payload)} payload bytes): the file was cut "
        "short or altered")
  try:
    state = serialization.msgpack_restore(payload)
    return _rewrap_keys(template, serialization.from_state_dict(template, state))
  except Exception as e:  # a checkpoint of another model
    raise CheckpointError(f"{path}: does not fit the expected structure: {e}") from e


def restore_latest(directory: str, template):
  """The newest readable checkpoint in ``directory``.

  Unreadable checkpoints are skipped with a warning naming the file.

  Returns:
    ``(step, tree)``, or ``None`` if there is no readable checkpoint.
  """
  for step, path in reversed(list_checkpoints(directory)):
    try:
      return step, load(path, template)
    except CheckpointError as e:
      warnings.warn(f"skipping unreadable checkpoint: {e}", RuntimeWarning, stacklevel=2)
  return None
