"""Checkpoints on orbax-checkpoint: sharded, written atomically, verified on read.

A checkpoint is a directory ``ckpt_{step:09d}`` holding ``tree/``, the PyTree's
leaves written by orbax (``StandardCheckpointHandler``; every process writes
the shards it holds, a host value is written once), and ``manifest.json``: the
path, shape and dtype of every leaf and the size and SHA-256 of every file
under ``tree/``. A checkpoint is written under a temporary name
(``.tmp_ckpt_{step:09d}``), its manifest last, then renamed into place by
process 0 (a directory rename is atomic), so a crash leaves either the old
checkpoint or the new one, never half of one: a directory without its final
name is never read. A file cut short, altered or missing fails the manifest
check and is reported with :class:`CheckpointError`; :func:`restore_latest`
then falls back to the previous checkpoint.

Restoring reads into the template's shardings: a leaf of the template that is
a ``jax.Array`` over several devices (or a ``jax.ShapeDtypeStruct`` with a
sharding) comes back as a ``jax.Array`` laid out the same way, whatever mesh the
checkpoint was written from (a run saved on 2 devices resumes on 1 or 4); any
other leaf comes back as a numpy array. Typed PRNG keys
(``jax.random.key``) are stored as their key data and rebuilt with the
implementation of the template's key.

With several processes (``jax.distributed``) every process calls :func:`save`
and :func:`load` with the same arguments; the directory must be one that all
of them see (a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings

import jax
import numpy as np

_NAME = re.compile(r"^ckpt_(\d{9})$")
_TMP_PREFIX = ".tmp_ckpt_"
_TREE = "tree"
_MANIFEST = "manifest.json"
_FORMAT = "bptt_jax checkpoint 2"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read back: cut short, altered, or not one."""


def _is_key(x) -> bool:
  """Whether ``x`` is a typed PRNG key array (dtype ``key<impl>``)."""
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_sharded(x) -> bool:
  """A ``jax.Array`` (or abstract one) laid out over more than one device."""
  sharding = getattr(x, "sharding", None)
  return sharding is not None and len(sharding.device_set) > 1


def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """Waits for every process (a no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def _checkpointer():
  """A synchronous orbax checkpointer, closed after use."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    yield checkpointer, ocp.args
  finally:
    checkpointer.close()


def _flatten(tree):
  """``(paths, leaves, treedef)`` of ``tree``, paths as ``jax.tree_util.keystr``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat], treedef


def _item(i: int) -> str:
  return f"{i:06d}"


def _savable(leaves) -> list:
  """What orbax writes for each leaf: a sharded ``jax.Array`` as is (each process
  writes its shards), anything else as a host array (one device fetch for all)."""
  leaves = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
  on_host = [i for i, x in enumerate(leaves) if not _is_sharded(x)]
  fetched = jax.device_get([leaves[i] for i in on_host])
  for i, a in zip(on_host, fetched):
    leaves[i] = np.asarray(a)
  return leaves


def _describe(x) -> dict:
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return {"shape": list(data.shape), "dtype": str(data.dtype),
            "key": str(jax.random.key_impl(x))}
  a = x if hasattr(x, "dtype") and hasattr(x, "shape") else np.asarray(x)
  return {"shape": list(a.shape), "dtype": str(np.dtype(a.dtype)), "key": None}


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(root: str) -> dict:
  """``{relative path: {size, sha256}}`` of every file under ``root``."""
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      p = os.path.join(base, name)
      out[os.path.relpath(p, root)] = {"size": os.path.getsize(p), "sha256": _digest(p)}
  return dict(sorted(out.items()))


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _remove(path: str) -> bool:
  """Removes the file or directory ``path``; False if it was already gone."""
  try:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  except FileNotFoundError:
    return False
  return True


def _remove_temporaries(directory: str) -> None:
  """Removes what a write cut short by a crash left behind."""
  for name in os.listdir(directory):
    if name.startswith(_TMP_PREFIX):
      _remove(os.path.join(directory, name))


def save(directory: str, step: int, tree, *, keep: int = 3) -> str:
  """Writes ``tree`` as ``directory/ckpt_{step:09d}``, atomically.

  The checkpoint just written is never deleted. Checkpoints with a step
  greater than ``step`` are stale (left by a run that was cut off, or by the
  run being started over) and are deleted; of the others, the newest ``keep``
  (the one just written included) are kept and the older ones deleted.
  Temporary directories left by a write cut short are deleted too. With
  several processes, every process must call it (each writes its shards);
  process 0 writes the manifest, renames and prunes.

  Args:
    directory: the checkpoint directory; created if missing.
    step: the training step, the checkpoint's name and its place in the order.
    tree: a PyTree of arrays (``jax.Array`` sharded over any mesh, or on one
      device), numpy arrays, numbers and typed PRNG keys.
    keep: how many checkpoints to keep, at least 1.

  Returns:
    The path written.

  Raises:
    ValueError: ``keep`` is less than 1.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  step = int(step)
  paths, leaves, _ = _flatten(tree)
  final = os.path.join(directory, f"ckpt_{step:09d}")
  tmp = os.path.join(directory, f"{_TMP_PREFIX}{step:09d}")
  if _primary():
    os.makedirs(directory, exist_ok=True)
    _remove(tmp)  # left by an earlier attempt at this step
  _sync(f"bptt_jax_ckpt_begin_{step}")
  items = {_item(i): x for i, x in enumerate(_savable(leaves))}
  with _checkpointer() as (checkpointer, args):
    checkpointer.save(os.path.join(tmp, _TREE), args=args.StandardSave(items))
  if _primary():
    manifest = {
        "format": _FORMAT, "step": step,
        "leaves": [{"path": p, **_describe(x)} for p, x in zip(paths, leaves)],
        "files": _files(os.path.join(tmp, _TREE)),
    }
    with open(os.path.join(tmp, _MANIFEST), "w") as f:
      json.dump(manifest, f)
      f.flush()
      os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step written again: the old one goes first
      os.replace(final, tmp + ".old")
    os.replace(tmp, final)
    _fsync_dir(directory)
    _remove_temporaries(directory)
    older = []
    for other, p in list_checkpoints(directory):
      if other > step:
        _remove(p)  # stale: a later step of an earlier run
      elif other < step:
        older.append(p)
    for p in older[:max(len(older) - (keep - 1), 0)]:
      _remove(p)
  _sync(f"bptt_jax_ckpt_end_{step}")
  return final


def clear(directory: str) -> int:
  """Deletes every checkpoint and temporary checkpoint in ``directory``.

  Other files, and the directory itself, are left alone. With several
  processes, process 0 deletes and the others wait for it.

  Args:
    directory: a checkpoint directory; it need not exist.

  Returns:
    How many checkpoints there were (temporary ones not counted).
  """
  found = list_checkpoints(directory)
  _sync("bptt_jax_clear_begin")
  if _primary() and os.path.isdir(directory):
    _remove_temporaries(directory)
    for _, p in found:
      _remove(p)
  _sync("bptt_jax_clear_end")
  return len(found)


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


def _read_manifest(path: str) -> dict:
  try:
    with open(os.path.join(path, _MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f"{path}: not a bptt_jax checkpoint (no readable {_MANIFEST}: {e})") from e
  if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
    raise CheckpointError(f"{path}: not a bptt_jax checkpoint (expected format {_FORMAT!r})")
  return manifest


def _verify(path: str, manifest: dict) -> None:
  root = os.path.join(path, _TREE)
  for name, want in manifest["files"].items():
    p = os.path.join(root, name)
    if not os.path.isfile(p):
      raise CheckpointError(f"{path}: file {name} is missing: the checkpoint was altered")
    size = os.path.getsize(p)
    if size != want["size"] or _digest(p) != want["sha256"]:
      raise CheckpointError(
          f"{path}: checksum mismatch in {name} ({size} bytes, {want['size']} written): the "
          "file was cut short or altered")


def _target(x, stored: dict):
  """What orbax restores ``stored`` into, for the template leaf ``x``."""
  shape, dtype = tuple(stored["shape"]), np.dtype(stored["dtype"])
  if not _is_key(x) and _is_sharded(x):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=x.sharding)
  return np.zeros(shape, dtype)


def load(path: str, template):
  """Reads a checkpoint into the structure, and the shardings, of ``template``.

  Args:
    path: a checkpoint directory written by :func:`save`.
    template: a PyTree of the expected structure (e.g. the initial state). A
      leaf that is a ``jax.Array`` sharded over several devices, or a
      ``jax.ShapeDtypeStruct`` with such a sharding, is restored as a
      ``jax.Array`` with that sharding (each process reads the shards it
      holds); where it holds a typed PRNG key, the stored key data is wrapped
      into a key of the same implementation; other leaves come back as numpy
      arrays.

  Returns:
    The checkpoint's tree in the structure of ``template``.

  Raises:
    CheckpointError: the checkpoint is cut short, altered or not one, or does
      not fit ``template`` (structure, shapes, dtypes or key implementation).
  """
  manifest = _read_manifest(path)
  _verify(path, manifest)
  paths, leaves, treedef = _flatten(template)
  stored = manifest["leaves"]
  if [s["path"] for s in stored] != paths:
    raise CheckpointError(
        f"{path}: does not fit the expected structure: it holds {len(stored)} leaves "
        f"{[s['path'] for s in stored][:8]}..., the template {len(paths)} leaves "
        f"{paths[:8]}...")
  for p, x, s in zip(paths, leaves, stored):
    want = _describe(x)
    if (want["shape"], want["dtype"], want["key"]) != (s["shape"], s["dtype"], s["key"]):
      raise CheckpointError(
          f"{path}: does not fit the expected structure: leaf {p} is stored as "
          f"{s['dtype']}{s['shape']} (key {s['key']}), the template has "
          f"{want['dtype']}{want['shape']} (key {want['key']})")
  target = {_item(i): _target(x, s) for i, (x, s) in enumerate(zip(leaves, stored))}
  with _checkpointer() as (checkpointer, args):
    try:
      restored = checkpointer.restore(os.path.join(path, _TREE),
                                      args=args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001 -- whatever orbax raises on a damaged store
      raise CheckpointError(f"{path}: could not be read back: {e}") from e
  out = []
  for i, x in enumerate(leaves):
    a = restored[_item(i)]
    if _is_key(x):
      a = jax.random.wrap_key_data(np.asarray(a), impl=jax.random.key_impl(x))
    out.append(a)
  return jax.tree_util.tree_unflatten(treedef, out)


def restore_latest(directory: str, template):
  """The newest readable checkpoint in ``directory``.

  Unreadable checkpoints are skipped with a warning naming them.

  Returns:
    ``(step, tree)``, or ``None`` if there is no readable checkpoint.
  """
  for step, path in reversed(list_checkpoints(directory)):
    try:
      return step, load(path, template)
    except CheckpointError as e:
      warnings.warn(f"skipping unreadable checkpoint: {e}", RuntimeWarning, stacklevel=2)
  return None
