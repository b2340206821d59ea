"""Checkpoints in a safe, non-pickle format, written atomically and verified.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is
``flax.serialization.msgpack_serialize`` of the PyTree's state dict. Writing
goes to a temporary file in the same directory, is flushed to disk, then
renamed over the final name (``os.replace`` is atomic), so a crash leaves
either the old or the new checkpoint, never half of one. A file cut short or
altered fails its checksum and is reported with :class:`CheckpointError`;
:func:`restore_latest` then falls back to the previous checkpoint.
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


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read back: truncated, altered, or not one."""


def _to_host(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def save(directory: str, step: int, tree, *, keep: int = 3) -> str:
  """Writes ``tree`` as ``directory/ckpt_{step:09d}.msgpack``, atomically.

  Keeps the ``keep`` most recent checkpoints and deletes older ones.

  Returns:
    The path written.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  os.makedirs(directory, exist_ok=True)
  payload = serialization.msgpack_serialize(serialization.to_state_dict(_to_host(tree)))
  data = MAGIC + hashlib.sha256(payload).digest() + payload
  path = os.path.join(directory, f"ckpt_{int(step):09d}.msgpack")
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_ckpt_")
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
  for old in list_checkpoints(directory)[:-keep]:
    os.remove(old[1])
  return path


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


def load(path: str, template):
  """Reads a checkpoint into the structure of ``template``.

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
    return serialization.from_state_dict(template, state)
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
