"""Data-parallel training over many devices and many processes, on ``jax.sharding``.

The training steps need no change: ``jax.jit`` compiles them for whatever
layout their inputs have. This module lays the inputs out. A mesh over all
devices has a ``"data"`` axis; params and optimizer state are replicated on
every device (or split over ``"data"``, FSDP-style, with ``fsdp=True``); each
batch, and the streamed carry of truncated BPTT, is split along ``B``. The
gradient is then the mean over the whole global batch, all-reduced by the
compiler, and every device ends each step with the same params::

    mesh = bj.sharding.data_mesh()                          # all devices, axis "data"
    state = bj.sharding.shard_state(bj.TrainState.create(params, tx), mesh)
    state, metrics = step(state, bj.sharding.shard_batch(batch, mesh))

With several processes (one per host, or per GPU), start each with
:func:`initialize`; each process then reads only its rows of every global
batch (``bptt_jax.data.shuffled_batches(..., process_index=, process_count=)``)
and :func:`global_batch` joins them into one global array
(``jax.make_array_from_process_local_data``). Host values (params at start,
keys) must be the same in every process: derive them from the same seed.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bptt_jax._checkpoint import _is_key
from bptt_jax._training import TrainState

DATA = "data"


def data_mesh(devices=None) -> Mesh:
  """A one-axis mesh ``("data",)`` over ``devices`` (all devices by default).

  Devices are ordered by process, then by id, so each process holds one
  contiguous block of every batch's rows.

  Args:
    devices: a sequence of devices; ``jax.devices()`` (every process's) by default.

  Returns:
    A ``jax.sharding.Mesh`` with the axis ``"data"``.

  Raises:
    ValueError: an empty device list.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices is empty: a mesh needs at least one device")
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA,))


def _data_size(mesh: Mesh) -> int:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  if DATA not in mesh.axis_names:
    raise ValueError(f"the mesh needs an axis named {DATA!r}, got axes {mesh.axis_names}")
  return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of a value held whole by every device of ``mesh``."""
  _data_size(mesh)
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of ``[B, ...]`` values split along ``B`` over the ``"data"`` axis."""
  _data_size(mesh)
  return NamedSharding(mesh, PartitionSpec(DATA))


def _from_host(x, sharding: NamedSharding):
  """A global array of the host value ``x`` (the same in every process) laid out
  by ``sharding``; each process transfers only the pieces its devices hold."""
  if _is_key(x):
    data = _from_host(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # already global: re-laid out
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
  """Every leaf of ``tree`` held whole by every device of ``mesh``.

  ``tree`` holds the same values in every process (e.g. params made from the
  same seed). Typed PRNG keys are kept as keys.
  """
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda x: _from_host(x, sharding), tree)


def _check_rows(name: str, tree, n: int, what: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} is a scalar; every leaf of a batch or carry "
          "is [B, ...]")
    if shape[0] % n:
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has {shape[0]} rows ([B, ...] with B = "
          f"{shape[0]}), which do not split evenly over the {n} {what}; choose a batch "
          f"size divisible by {n}, or pad the batch with rows masked out (lengths 0)")


def shard_batch(tree, mesh: Mesh):
  """Every ``[B, ...]`` leaf of ``tree`` split along ``B`` over the mesh's ``"data"`` axis.

  For a batch (a dict of ``xs``, ``ys``, ``lengths``, ...) or a carry (its
  leaves are ``[B, ...]``; a :class:`bptt_jax.StreamCarry` too). ``tree``
  holds the whole global batch, the same in every process; each process
  transfers only its own rows. With several processes that each read only
  their rows, use :func:`global_batch`.

  Raises:
    ValueError: a leaf whose ``B`` does not divide by the size of the
      ``"data"`` axis, or a scalar leaf.
  """
  return _split_rows(tree, mesh, "batch")


def _split_rows(tree, mesh: Mesh, name: str):
  n = _data_size(mesh)
  _check_rows(name, tree, n, f"devices of the mesh's {DATA!r} axis")
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: _from_host(x, sharding), tree)


def _local_devices(mesh: Mesh) -> int:
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def global_batch(local, mesh: Mesh):
  """The global batch made of every process's rows (``jax.make_array_from_process_local_data``).

  Each process passes its own rows (``[B / P, ...]`` leaves, ``P`` processes,
  e.g. from ``data.shuffled_batches(..., process_index=, process_count=)``);
  the result is one global ``[B, ...]`` array per leaf, split along ``B``,
  rows in process order. With one process it equals :func:`shard_batch`.

  Raises:
    ValueError: a leaf whose local rows do not divide by this process's
      devices in the mesh, or a scalar leaf.
  """
  n = _data_size(mesh)
  local_devices = _local_devices(mesh)
  if local_devices == 0:
    raise ValueError(f"the mesh holds none of process {jax.process_index()}'s devices")
  _check_rows("local batch", local, local_devices,
              f"devices this process holds in the mesh (of {n} in all)")
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    shape = (x.shape[0] * n // local_devices,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree_util.tree_map(put, local)


class _GlobalBatches:
  """Re-iterable: each batch of ``batches`` made global on ``mesh``."""

  def __init__(self, batches, mesh):
    self.batches, self.mesh = batches, mesh

  def __iter__(self):
    return (global_batch(b, self.mesh) for b in self.batches)


def global_batches(batches, mesh: Mesh):
  """:func:`global_batch` over every batch, for :func:`bptt_jax.fit`.

  Args:
    batches: this process's batches: ``batches(epoch, key) -> iterable`` (as
      from ``data.shuffled_batches(..., process_index=, process_count=)``) or
      a re-iterable such as a list.
    mesh: the mesh the global batches are laid out on.

  Returns:
    The same kind of object, yielding global batches (one at a time, as fit
    reads them).
  """
  _data_size(mesh)
  if callable(batches):
    return lambda epoch, key: (global_batch(b, mesh) for b in batches(epoch, key))
  return _GlobalBatches(batches, mesh)


def _fsdp_sharding(mesh: Mesh, x) -> NamedSharding:
  """Split along the first axis that divides by the ``"data"`` size, else replicate."""
  n = mesh.shape[DATA]
  for axis, size in enumerate(np.shape(x)):
    if size >= n and size % n == 0:
      return NamedSharding(mesh, PartitionSpec(*([None] * axis + [DATA])))
  return NamedSharding(mesh, PartitionSpec())


def shard_params(tree, mesh: Mesh, *, fsdp: bool = False):
  """Params (or optimizer state) laid out on ``mesh``: replicated, or with
  ``fsdp=True`` each array split over ``"data"`` along its first axis that
  divides by the axis size (arrays with none, and scalars, replicated).

  FSDP keeps ``1 / n`` of each large array per device; the compiled step
  gathers a weight where it is used and reduce-scatters its gradient.
  """
  _data_size(mesh)
  if not fsdp:
    return replicate(tree, mesh)
  return jax.tree_util.tree_map(lambda x: _from_host(x, _fsdp_sharding(mesh, x)), tree)


def shard_state(state: TrainState, mesh: Mesh, *, fsdp: bool = False) -> TrainState:
  """A :class:`bptt_jax.TrainState` laid out for data-parallel training on ``mesh``.

  Params and optimizer state are replicated (or split FSDP-style with
  ``fsdp=True``, see :func:`shard_params`), the step counter replicated, and
  the streamed carry (``[B, ...]`` leaves) split along ``B`` like the batches.

  Raises:
    TypeError: ``state`` is not a TrainState.
    ValueError: a carry whose ``B`` does not divide by the ``"data"`` axis size.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"expected a bptt_jax.TrainState, got {type(state).__name__}")
  carry = None if state.carry is None else _split_rows(state.carry, mesh, "state.carry")
  return TrainState(shard_params(state.params, mesh, fsdp=fsdp),
                    shard_params(state.opt_state, mesh, fsdp=fsdp),
                    replicate(state.step, mesh), carry)


def process_rows(batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> slice:
  """The rows of a global batch of ``batch_size`` that a process reads.

  Process ``p`` of ``P`` reads the ``p``-th contiguous block of ``B / P`` rows,
  the block its devices hold in :func:`data_mesh`.

  Raises:
    ValueError: ``batch_size`` does not divide by the number of processes, or
      a process index outside ``[0, P)``.
  """
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  for name, v in (("batch_size", batch_size), ("process_count", count)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if not isinstance(p, (int, np.integer)) or not 0 <= p < count:
    raise ValueError(f"process_index must lie in [0, {count}), got {p!r}")
  if batch_size % count:
    raise ValueError(
        f"a global batch of {batch_size} rows does not split evenly over {count} processes; "
        f"choose a batch size divisible by {count}")
  size = batch_size // count
  return slice(p * size, (p + 1) * size)


def _wait_for(host: str, port: int, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(1.0, timeout)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise ConnectionError(
          f"cannot reach the jax.distributed coordinator at {host}:{port} within "
          f"{timeout:g} s ({last}); is process 0 running, and is the address right?")
    time.sleep(0.1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: int = 300, **kwargs: Any) -> None:
  """Starts this process's part of a multi-process run (``jax.distributed.initialize``).

  Call it first, before anything else touches JAX. Without arguments JAX
  detects the cluster (SLURM, Open MPI, Kubernetes, TPU pods, ...); on one
  machine or an unmanaged cluster give all three: process ``i`` of ``N``
  calls ``initialize("10.0.0.1:1234", N, i)``, process 0 being the coordinator
  and listening on that port.

  A process other than the coordinator first waits up to ``timeout`` seconds
  for the coordinator's port to accept a connection and raises
  ``ConnectionError`` if it does not: JAX itself, past its timeout, aborts the
  whole process from C++ rather than raising. Once connected, every process
  waits up to ``timeout`` seconds for all ``N`` to register (JAX aborts the
  process past it).

  Args:
    coordinator_address: ``"host:port"`` of process 0, or ``None`` to detect.
    num_processes: ``N``, or ``None`` to detect.
    process_id: this process's index in ``[0, N)``, or ``None`` to detect.
    timeout: seconds to wait for the coordinator, then for all processes.
    **kwargs: passed to ``jax.distributed.initialize`` (e.g. ``local_device_ids``).

  Raises:
    ValueError: a malformed address, or a process id outside ``[0, N)``.
    ConnectionError: the coordinator cannot be reached within ``timeout``.
  """
  if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
    raise ValueError(f"timeout must be a positive int (seconds), got {timeout!r}")
  if coordinator_address is not None:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}")
    if num_processes is not None and process_id is not None:
      if not isinstance(num_processes, int) or num_processes <= 0:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
      if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must lie in [0, num_processes) = [0, {num_processes}), got "
            f"{process_id!r}")
      if process_id != 0:
        _wait_for(host.strip("[]"), int(port), timeout)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout, **kwargs)
