"""CPU kernels: whole-sequence RNN, LSTM and GRU in C++, called from XLA:CPU.

XLA:CPU runs ``lax.scan`` one step at a time, with a fixed cost per iteration
and per kernel. This module builds a small C++ extension with two families of
kernels that run the whole sequence as one call, forward keeping a workspace
and backward from it, as XLA FFI handlers tied by a ``jax.custom_vjp``:

- ``"fused"`` (``csrc/fused_rnn.cc``): written out here, one GEMM per step
  and thread with the gates as its rows, the gate nonlinearities in place;
- ``"rnn"`` (``csrc/onednn_rnn.cc``): oneDNN's RNN primitives
  (``vanilla_rnn``, ``lstm``, ``lbr_gru``).

With ``"fused"`` on, :func:`bptt_jax.readout`'s backward pass is one call as well
(:func:`dense`: oneDNN's sgemm for ``dx`` and ``dW``, where XLA:CPU's dot runs the
weight gradient's shape well below the machine's peak).

``"fused"`` is on by default: it measured faster than the pure-JAX fused path
for every cell, size and mode of the benchmark (README, Performance);
``use_kernels(False)`` or ``BPTT_JAX_KERNELS=0`` turns it off, and
``use_kernels(True)`` turns ``"rnn"`` on as well (``"fused"`` runs where both
apply).

The extension is compiled on first use (or by ``make``) with the system C++
compiler against the oneDNN that the ``kernels`` extra installs
(``onednn-cpu-gomp``, ``onednn-devel-cpu-gomp``), and cached in
``$BPTT_JAX_CACHE`` (default ``~/.cache/bptt_jax``) under a name that hashes
the source, the compiler and the jaxlib and oneDNN it was built against. If
anything is missing or the build fails, :func:`bptt_jax.unroll` keeps the JAX
paths and :func:`kernels` says why.

A kernel runs when its family is on, the backend is the CPU with one device,
every array is float32, the shapes are not empty, no general ``mask`` is given
(``lengths`` only with the written-out kernels), no ``remat`` segments, the cell
has no layer norm and the fused path is chosen (``fused`` not ``False``,
``hoist`` not ``True``). The choice is made when a function is traced. The
written-out kernels read batch-major ``[B, T, D]`` inputs and write ``[B, T, H]``
in place (``unroll``'s default layout, without ``reverse``, for a single cell);
otherwise the sequences go in time-major. A stack's layers run on the kernels
without ``lengths`` only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from bptt_jax._common import length_mask

Array = jax.Array

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "onednn_rnn.cc", _CSRC / "fused_rnn.cc"]
_HEADERS = [_CSRC / "kept.h", _CSRC / "panel_gemm.h", _CSRC / "rnn_calls.h"]
_KINDS = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
_PARAM_KEYS = {"rnn_tanh": {"W", "U", "b"}, "rnn_relu": {"W", "U", "b"},
               "lstm": {"W", "U", "b"}, "gru": {"W", "U", "b", "b_hn"}}


FAMILIES = ("fused", "rnn")
# The cells each family covers; where several are on, the first in FAMILIES runs.
# "readout": bj.readout's backward pass, by oneDNN's sgemm (:func:`dense`).
_COVERS = {"fused": (*_KINDS, "readout"), "rnn": tuple(_KINDS)}
DEFAULT = ("fused",)  # faster than the JAX paths for every benchmark case (README)
# The smallest batch for which the written-out kernels run a cell: their step's products
# take the batch as the columns of 16-float vectors, so a smaller batch leaves lanes
# idle, and the JAX path measured faster there (README, "Small batches": the kernel's
# training step took 1.2-2.3x the JAX path's time for the LSTM and GRU at B = 1 and 4
# with H >= 64, 0.5-1.0x at B = 8 and 16; the RNN's 0.8-1.1x at B = 8, 0.75-0.9x at 16).
MIN_BATCH = {"rnn_tanh": 16, "rnn_relu": 16, "lstm": 8, "gru": 8}
# Below these sizes a written-out kernel's call runs on one thread: a step's products of
# fewer FLOPs take less time than the threads' barrier, and a call of fewer less than
# waking the other threads (under XLA they sleep between calls; README, "Small batches").
PARALLEL_MIN_STEP_FLOPS = 1 << 17
PARALLEL_MIN_CALL_FLOPS = 1 << 23


class KernelStatus(NamedTuple):
  """Which CPU kernels :func:`bptt_jax.unroll` uses, and why.

  Attributes:
    active: whether the extension is loaded and at least one family is on.
    enabled: the families on: ``"fused"`` (the written-out kernels), ``"rnn"``
      (oneDNN's RNN primitives), both or ``()``.
    reason: why, in words.
    library: the compiled extension's path, or ``None``.
    onednn_version: e.g. ``"3.2.0"``, or ``None``.
    threads: the kernels' OpenMP threads, or ``None``.
  """

  active: bool
  enabled: tuple
  reason: str
  library: str | None = None
  onednn_version: str | None = None
  threads: int | None = None


_setting: list = [None]  # None: from BPTT_JAX_KERNELS, else DEFAULT; or a tuple of families
_lock = threading.Lock()
_loaded: list = []  # [(library or None, reason)] once tried


def _families(value, where) -> tuple:
  if value is True:
    return FAMILIES
  if value is False:
    return ()
  names = (value,) if isinstance(value, str) else value
  try:
    names = tuple(names)
  except TypeError:
    names = (value,)
  unknown = [n for n in names if n not in FAMILIES]
  if unknown or not names:
    raise TypeError(f"{where} takes True, False or kernel names from {FAMILIES}, got {value!r}")
  return tuple(f for f in FAMILIES if f in names)


def _enabled() -> tuple:
  if _setting[0] is not None:
    return _setting[0]
  env = os.environ.get("BPTT_JAX_KERNELS", "").strip().lower()
  if env in ("", "default"):
    return DEFAULT
  if env in ("0", "false", "off", "no", "none"):
    return ()
  if env in ("1", "true", "on", "yes", "all"):
    return FAMILIES
  return _families([n.strip() for n in env.split(",")], "BPTT_JAX_KERNELS")


class use_kernels:  # noqa: N801 (a function that is also a context manager)
  """Chooses the CPU kernels; as a context manager, restores the choice on exit.

  ``use_kernels(True)`` turns every family on, ``use_kernels(False)`` every
  one off, ``use_kernels("fused")`` (or a list of names) exactly those:
  ``"fused"``, the written-out RNN, LSTM and GRU kernels, and ``"rnn"``,
  oneDNN's RNN primitives. Without a call,
  ``$BPTT_JAX_KERNELS`` decides (``0``, ``all`` or a comma-separated list of
  names), else the default: ``"fused"`` on the CPU. The setting is read when a function is
  traced: a function jitted before the change keeps the path it was compiled
  with.
  """

  def __init__(self, enabled):
    families = _families(enabled, "use_kernels")
    self._previous = _setting[0]
    _setting[0] = families

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    _setting[0] = self._previous
    return False


def _cache_dir() -> Path:
  if os.environ.get("BPTT_JAX_CACHE"):
    return Path(os.environ["BPTT_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "bptt_jax"


def _find_onednn():
  """``(include_dir, lib_dir)`` of a oneDNN with its C++ headers, or ``None``."""
  roots = [os.environ.get("DNNL_ROOT"), os.environ.get("ONEDNN_ROOT"), sys.prefix,
           sys.base_prefix, "/usr/local", "/usr"]
  for root in filter(None, roots):
    include = Path(root) / "include"
    if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists():
      continue
    for lib in (Path(root) / "lib", Path(root) / "lib64", Path(root) / "lib" / "x86_64-linux-gnu"):
      if (lib / "libdnnl.so.3").exists() or (lib / "libdnnl.so").exists():
        return include, lib
  return None


def _cpu_flags() -> str:
  """The CPU's feature flags (``-march=native`` builds for them), for the cache key."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return line
  except OSError:
    pass
  return ""


def _build() -> tuple[Path | None, str]:
  """Compiles the extension into the cache if it is not there; ``(path, reason)``."""
  if not sys.platform.startswith("linux"):
    return None, f"the oneDNN kernels are built on Linux only (this is {sys.platform})"
  found = _find_onednn()
  if found is None:
    return None, ("oneDNN was not found (install the kernels extra: "
                  "pip install 'bptt_jax[kernels]', or set DNNL_ROOT)")
  include, lib = found
  compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
  if compiler is None:
    return None, "no C++ compiler (g++ or $CXX) to build the oneDNN kernels"
  flags = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-std=c++17",
           "-shared", "-fPIC", "-fopenmp", f"-I{jax.ffi.include_dir()}", f"-I{include}",
           f"-L{lib}", f"-Wl,-rpath,{lib}"]
  digest = hashlib.sha256()
  for part in (*(s.read_bytes() for s in _SOURCES + _HEADERS), compiler.encode(),
               " ".join(flags).encode(), _cpu_flags().encode(), jax.__version__.encode(),
               str((lib / "libdnnl.so.3").resolve()).encode()):
    digest.update(part)
  cache = _cache_dir()
  target = cache / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
  if target.exists():
    return target, "cached"
  try:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / (target.name + ".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several processes start at once
      if target.exists():
        return target, "cached"
      partial = target.with_suffix(f".{os.getpid()}.tmp")
      run = subprocess.run([compiler, *map(str, _SOURCES), *flags, "-o", str(partial), "-ldnnl"],
                           capture_output=True, text=True, timeout=600)
      if run.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = run.stderr.strip().splitlines()
        tail = "\n".join(([l for l in lines if "error" in l] or lines)[:5])
        return None, f"building the oneDNN kernels failed ({compiler}):\n{tail}"
      os.replace(partial, target)
  except (OSError, subprocess.SubprocessError) as e:
    return None, f"building the oneDNN kernels failed: {e}"
  return target, "built"


def _library():
  """The loaded extension (targets registered) or ``None``, and the reason."""
  with _lock:
    if not _loaded:
      path, reason = _build()
      lib = None
      if path is not None:
        try:
          lib = ctypes.CDLL(str(path))
          lib.bptt_rnn_workspace_bytes.restype = ctypes.c_int64
          lib.bptt_rnn_workspace_bytes.argtypes = [ctypes.c_int64] * 5 + [
              ctypes.c_char_p, ctypes.c_int64]
          lib.bptt_rnn_threads.restype = ctypes.c_int64
          lib.bptt_fused_workspace_bytes.restype = ctypes.c_int64
          lib.bptt_fused_workspace_bytes.argtypes = [ctypes.c_int64] * 4
          lib.bptt_fused_kept_sets.restype = ctypes.c_int64
          for name, symbol in (("bptt_rnn_forward", lib.BpttRnnForward),
                               ("bptt_rnn_backward", lib.BpttRnnBackward),
                               ("bptt_fused_forward", lib.BpttFusedForward),
                               ("bptt_fused_backward", lib.BpttFusedBackward),
                               ("bptt_dense_backward", lib.BpttDenseBackward)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
          reason = f"oneDNN kernels loaded from {path}"
        except (OSError, AttributeError) as e:
          lib, reason = None, f"loading the oneDNN kernels failed: {e}"
      _loaded.append((lib, reason))
    return _loaded[0]


def kernels() -> KernelStatus:
  """Which CPU kernels :func:`bptt_jax.unroll` uses on this machine, and why.

  Builds (or loads from the cache) the extension if that has not happened
  yet, even when the kernels are off, so ``library`` says whether they could
  run.

  Returns:
    A :class:`KernelStatus`: ``enabled`` lists the families that run where
    they apply (see :mod:`bptt_jax._kernel`); with ``active=False`` the JAX
    paths run everything, and ``reason`` says why (turned off, not on the
    CPU, several devices, not built).
  """
  lib, reason = _library()
  enabled = _enabled()
  off = _off_reason(enabled)
  if lib is None:
    return KernelStatus(False, (), reason if off is None else f"{off}; {reason}")
  version = (ctypes.c_int64 * 3)()
  lib.bptt_rnn_onednn_version(version)
  built = (lib._name, ".".join(map(str, version)), int(lib.bptt_rnn_threads()))
  if off is not None:
    return KernelStatus(False, (), f"{off} ({reason})", *built)
  return KernelStatus(True, enabled, reason, *built)


def _off_reason(enabled) -> str | None:
  if not enabled:
    return ("off: use_kernels(False) or BPTT_JAX_KERNELS=0 (bptt_jax.use_kernels('fused') "
            "turns the written-out kernels back on, use_kernels(True) every family)")
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not the CPU"
  if jax.device_count() != 1:
    return (f"{jax.device_count()} devices: the kernels do not split a batch over devices, "
            "so sharded computations keep the JAX paths")
  return None


def _family(name: str) -> str | None:
  """The family that runs cell ``name`` here, or ``None``."""
  enabled = _enabled()
  if _off_reason(enabled) is not None:
    return None
  return next((f for f in FAMILIES if f in enabled and name in _COVERS[f]), None)


def usable(name: str, params, xs, carry, mask, batch_major: bool = False,
           lengths: bool = False) -> bool:
  """Whether a kernel runs cell ``name`` here (decided at trace time); ``batch_major``:
  on ``[B, T, D]`` inputs, and ``lengths``: with sequence lengths, both of which the
  written-out (``"fused"``) kernels take. The written-out kernels run batches of at
  least ``MIN_BATCH[name]`` sequences."""
  family = _family(name) if name in _KINDS else None
  if mask is not None or family is None or ((batch_major or lengths) and family != "fused"):
    return False
  if not isinstance(params, dict) or set(params) != _PARAM_KEYS[name]:
    return False
  arrays = [xs, *jax.tree_util.tree_leaves(carry), *params.values()]
  if any(getattr(a, "dtype", None) != jnp.float32 for a in arrays):
    return False
  if xs.ndim != 3 or xs.shape[0] == 0 or xs.shape[1] == 0 or xs.shape[2] == 0:
    return False
  if family == "fused" and xs.shape[0 if batch_major else 1] < MIN_BATCH[name]:
    return False
  return _library()[0] is not None


def sequence(name: str, params, xs: Array, carry, batch_major: bool = False, lengths=None):
  """``(carry at T, hs)`` of a built-in cell over time-major ``xs`` ``[T, B, D]`` by a kernel.

  With ``batch_major``, ``xs`` is ``[B, T, D]`` and ``hs`` ``[B, T, H]``, read and written
  in that layout by the kernel (no transposes around it). With ``lengths`` (int ``[B]``,
  the written-out kernels only), each sequence's states stay past its end and its
  outputs there are zero; its inputs there must be finite (``unroll`` zeros them). Only
  call where :func:`usable` (with the same ``batch_major`` and ``lengths``) is true.
  The GRU's gate blocks go from ``(r, z, n)`` to oneDNN's ``(z, r, n)`` and its bias
  gains ``b_hn`` as a fourth row; autodiff carries the gradients back through those
  permutations.
  """
  kind = _KINDS[name]
  W, U, b = params["W"], params["U"], params["b"]
  if name == "gru":
    H = U.shape[0]
    swap = lambda m: jnp.concatenate([m[..., H:2 * H], m[..., :H], m[..., 2 * H:]], -1)  # noqa: E731
    W, U, b = swap(W), swap(U), jnp.concatenate([swap(b), params["b_hn"]])
  if name == "lstm":
    h0, c0 = carry.h, carry.c
  else:
    h0, c0 = carry, jnp.zeros((0,), jnp.float32)
  target = "bptt_fused" if _family(name) == "fused" else "bptt_rnn"
  lengths = (jnp.zeros((0,), jnp.int32) if lengths is None
             else jnp.asarray(lengths).astype(jnp.int32))
  hs, h_T, c_T = _rnn((target, kind, bool(batch_major)), W, U, b, xs, h0, c0, lengths)
  final = carry._replace(h=h_T, c=c_T) if name == "lstm" else h_T
  return final, hs


def _workspace_bytes(config, T, B, D, H) -> int:
  target, kind, _ = config
  lib = _library()[0]
  if target == "bptt_fused":
    return int(lib.bptt_fused_workspace_bytes(kind, T, B, H))
  error = ctypes.create_string_buffer(512)
  size = lib.bptt_rnn_workspace_bytes(kind, T, B, D, H, error, len(error))
  if size < 0:
    raise ValueError(f"oneDNN refused the shape (T, B, D, H) = {(T, B, D, H)}: "
                     f"{error.value.decode()}")
  return int(size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward(config, training, W, U, b, xs, h0, c0, lengths):
  target, kind, batch_major = config
  T, B, D = _sizes(config, xs)
  H = h0.shape[-1]
  workspace = _workspace_bytes(config, T, B, D, H) if training else 0
  f32 = jnp.float32
  out = (jax.ShapeDtypeStruct(xs.shape[:2] + (H,), f32), jax.ShapeDtypeStruct((B, H), f32),
         jax.ShapeDtypeStruct(c0.shape, f32), jax.ShapeDtypeStruct((workspace,), jnp.uint8))
  call = jax.ffi.ffi_call(f"{target}_forward", out, vmap_method="sequential")
  return call(xs, h0, c0, W, U, b, lengths, batch_major=np.int64(batch_major),
              kind=np.int64(kind), training=np.int64(training),
              threads=np.int64(_threads(config, T, B, D, H)))


def step_flops(kind: int, B: int, D: int, H: int) -> int:
  """The FLOPs of a forward step's products, ``2 B G H (D + H)``, for a kernel ``kind``
  (the values of ``_KINDS``; ``G`` gates: 4 for the LSTM, 3 for the GRU, 1 for the RNN)."""
  return 2 * B * {2: 4, 3: 3}.get(kind, 1) * H * (D + H)


def _threads(config, T, B, D, H) -> int:
  """The most threads a call splits over: 1 for the written-out kernels' small calls (below
  ``PARALLEL_MIN_STEP_FLOPS`` a step or ``PARALLEL_MIN_CALL_FLOPS`` the call), else 0 (all)."""
  target, kind, _ = config
  step = step_flops(kind, B, D, H)
  small = step < PARALLEL_MIN_STEP_FLOPS or step * T < PARALLEL_MIN_CALL_FLOPS
  return 1 if target == "bptt_fused" and small else 0


def _sizes(config, xs) -> tuple:
  """``(T, B, D)`` of ``xs`` in the call's layout."""
  T, B, D = xs.shape
  return (B, T, D) if config[2] else (T, B, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rnn(config, W, U, b, xs, h0, c0, lengths):
  return _forward(config, False, W, U, b, xs, h0, c0, lengths)[:3]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
                   meta_fields=["need_dxs"])
@dataclasses.dataclass(frozen=True)
class _Residuals:
  arrays: tuple  # W, U, b, xs, h0, c0, lengths, hs, h_T, c_T, workspace
  need_dxs: bool  # whether xs is differentiated: if not, no dxs is computed


def _rnn_fwd(config, W, U, b, xs, h0, c0, lengths):
  primals = tuple(p.value for p in (W, U, b, xs, h0, c0, lengths))
  hs, h_T, c_T, workspace = _forward(config, True, *primals)
  return (hs, h_T, c_T), _Residuals((*primals, hs, h_T, c_T, workspace), xs.perturbed)


def _rnn_bwd(config, residuals, cotangents):
  # Symbolic zeros become arrays, but a dhs that the written-out kernels may take as
  # empty (zeros, nothing to read).
  dhs, dh_T, dc_T = (jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c
                     for c in cotangents)
  if config[0] == "bptt_fused" and isinstance(cotangents[0], SymbolicZero):
    dhs = jnp.zeros((0,), jnp.float32)
  dxs, dh0, dc0, dW, dU, db = _backward(config, residuals, (dhs, dh_T, dc_T))
  return dW, dU, db, dxs if residuals.need_dxs else None, dh0, dc0, None


_rnn.defvjp(_rnn_fwd, _rnn_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _backward(config, residuals, cotangents):
  """``(dxs, dh0, dc0, dW, dU, db)``; the written-out kernels compute no ``dxs`` (an empty
  array instead) where ``xs`` is not differentiated, and take an empty ``dhs`` as zeros."""
  target, kind, batch_major = config
  W, U, b, xs, h0, c0, lengths, hs, h_T, c_T, workspace = residuals.arrays
  dhs, dh_T, dc_T = cotangents
  out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (xs, h0, c0, W, U, b))
  if target == "bptt_fused" and not residuals.need_dxs:
    out = (jax.ShapeDtypeStruct((0,), jnp.float32), *out[1:])
  call = jax.ffi.ffi_call(f"{target}_backward", out, vmap_method="sequential")
  return call(xs, h0, c0, W, U, b, hs, h_T, c_T, workspace, dhs, dh_T, dc_T, lengths,
              batch_major=np.int64(batch_major), kind=np.int64(kind))


def _reference(config, W, U, b, xs, h0, c0, lengths):
  """``(hs, h_T, c_T)`` of the kernels' computation written in JAX, in their layout.

  Differentiated for what the kernels' calls do not give: the derivatives past the
  first (``jax.grad`` of ``jax.grad``, Hessian-vector products).
  """
  kind, batch_major = config[1:]
  H = U.shape[0]
  lstm, gru = kind == _KINDS["lstm"], kind == _KINDS["gru"]
  b = b[None]  # [1, rows]: explicit, for jax_numpy_rank_promotion="raise"

  def step(carry, inputs):
    x, live = inputs  # live [B, 1]: the step is one of the sequence's own
    h_prev, c_prev = h, c = carry
    if gru:  # (z, r, n) blocks, b = [b_z, b_r, b_n, b_hn]
      a = x @ W[:, :2 * H] + h @ U[:, :2 * H] + b[:, :2 * H]
      z, r = jax.nn.sigmoid(a[:, :H]), jax.nn.sigmoid(a[:, H:])
      n = jnp.tanh(x @ W[:, 2 * H:] + b[:, 2 * H:3 * H] + r * (h @ U[:, 2 * H:] + b[:, 3 * H:]))
      h = z * h + (1.0 - z) * n
    else:
      a = x @ W + h @ U + b
      if lstm:  # (i, f, g, o)
        i, f, g, o = jnp.split(a, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
      else:
        h = jnp.tanh(a) if kind == _KINDS["rnn_tanh"] else jax.nn.relu(a)
    h, c = jnp.where(live, h, h_prev), jnp.where(live, c, c_prev)
    return (h, c), jnp.where(live, h, 0.0)

  swap = (lambda a: jnp.swapaxes(a, 0, 1)) if batch_major else (lambda a: a)  # noqa: E731
  xs_tm = swap(xs)
  T, B = xs_tm.shape[:2]
  live = (length_mask(lengths, T).T if lengths.size else jnp.ones((T, B), bool))[..., None]
  (h_T, c_T), hs = jax.lax.scan(step, (h0, c0 if lstm else jnp.zeros_like(h0)), (xs_tm, live))
  return swap(hs), h_T, c_T if lstm else jnp.zeros_like(c0)


@_forward.defjvp
def _forward_jvp(config, training, primals, tangents):
  out = _forward(config, training, *primals)
  _, (t_hs, t_h, t_c) = jax.jvp(functools.partial(_reference, config), primals, tangents)
  return out, (t_hs, t_h, t_c, np.zeros(out[3].shape, jax.dtypes.float0))


@_backward.defjvp
def _backward_jvp(config, primals, tangents):
  (residuals, cotangents), (t_residuals, t_cotangents) = primals, tangents
  out = _backward(config, residuals, cotangents)
  H = residuals.arrays[4].shape[-1]
  hs_shape = residuals.arrays[3].shape[:2] + (H,)
  lengths = residuals.arrays[6]

  def backward(W, U, b, xs, h0, c0, dhs, dh_T, dc_T):  # (dxs, dh0, dc0, dW, dU, db)
    if dhs.size == 0:  # zeros, left empty
      dhs = jnp.zeros(hs_shape, dhs.dtype)
    _, vjp = jax.vjp(lambda *a: _reference(config, *a, lengths), W, U, b, xs, h0, c0)
    dW, dU, db, dxs, dh0, dc0 = vjp((dhs, dh_T, dc_T))
    return (dxs if out[0].size else jnp.zeros((0,), dxs.dtype)), dh0, dc0, dW, dU, db

  # hs, h_T, c_T and the workspace are functions of the inputs: their tangents follow.
  _, t_out = jax.jvp(backward, (*residuals.arrays[:6], *cotangents),
                     (*t_residuals.arrays[:6], *t_cotangents))
  return out, t_out


# The fewest multiply-adds (rows x I x O) for which dense's call runs: below, a call's
# fixed cost (oneDNN's sgemm on the OpenMP threads) outweighs what it saves. XLA's
# products took 0.67-0.92x the call's time from 33 thousand to 1 million and 1.05-1.39x
# from 2 million on (bench.readout_ab at H x O = 64 x 8, 128 x 32, 512 x 128; README).
DENSE_MIN_MACS = 1 << 21


def dense_usable(x, W) -> bool:
  """Whether :func:`dense` runs ``x @ W`` here (decided at trace time): the written-out
  kernels are on, the extension is loaded, ``x`` ``[..., I]`` and ``W`` ``[I, O]`` are
  float32 and the product has at least ``DENSE_MIN_MACS`` multiply-adds."""
  if _family("readout") != "fused":
    return False
  if getattr(x, "dtype", None) != jnp.float32 or getattr(W, "dtype", None) != jnp.float32:
    return False
  if x.ndim < 1 or W.ndim != 2 or x.shape[-1] != W.shape[0]:
    return False
  if np.prod(x.shape, dtype=np.int64) * W.shape[1] < DENSE_MIN_MACS:
    return False
  return _library()[0] is not None


@jax.custom_vjp
def dense(x: Array, W: Array) -> Array:
  """``x @ W`` for ``x`` ``[..., I]`` and ``W`` ``[I, O]``, its backward pass one call
  (:func:`dense_backward`). Only call where :func:`dense_usable` is true."""
  return x @ W


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "W"],
                   meta_fields=["need"])
@dataclasses.dataclass(frozen=True)
class _DenseResiduals:
  x: Array
  W: Array
  need: tuple  # (dx, dW): which of the two are differentiated


def _dense_fwd(x, W):
  return x.value @ W.value, _DenseResiduals(x.value, W.value, (x.perturbed, W.perturbed))


def _dense_bwd(residuals, g):
  x, W, need = residuals.x, residuals.W, residuals.need
  if isinstance(g, SymbolicZero):
    return tuple(jnp.zeros(a.shape, a.dtype) if n else None for a, n in zip((x, W), need))
  dx, dW = dense_backward(need, x, W, g)
  return dx if need[0] else None, dW if need[1] else None


dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


def _rows(a: Array) -> Array:
  return a.reshape(-1, a.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def dense_backward(need: tuple, x: Array, W: Array, g: Array) -> tuple:
  """``(dx, dW) = (g W^T, x^T g)`` of ``y = x W`` over every leading axis, by oneDNN's
  sgemm, one after the other in one call; ``need`` (two bools) says which to compute (an
  empty array stands for the other). XLA:CPU runs ``dW``'s shape (a long contraction
  into a small result: a readout's weight gradient over ``B T`` rows) at about 100
  GFLOP/s where sgemm reaches the machine's peak, and would run ``dx`` beside it on
  its own threads while sgemm's take the same cores (README)."""
  f32 = jnp.float32
  out = (jax.ShapeDtypeStruct(x.shape if need[0] else (0,), f32),
         jax.ShapeDtypeStruct(W.shape if need[1] else (0,), f32))
  call = jax.ffi.ffi_call("bptt_dense_backward", out, vmap_method="sequential")
  dx, dW = call(_rows(x), W, _rows(g))
  return dx, dW


@dense_backward.defjvp
def _dense_backward_jvp(need, primals, tangents):  # bilinear: the tangents are XLA's products
  (x, W, g), (t_x, t_W, t_g) = primals, tangents
  out = dense_backward(need, x, W, g)
  t_dx = t_g @ W.T + g @ t_W.T if need[0] else jnp.zeros((0,), x.dtype)
  t_dW = _rows(t_x).T @ _rows(g) + _rows(x).T @ _rows(t_g) if need[1] else jnp.zeros(
      (0,), W.dtype)
  return out, (t_dx, t_dW)
